"""Benchmark of one scheduler step as a pipeline calls it: ``scheduler.step(model_output, t, sample,
generator=g)``, fastgen's drop-in schedulers (``fastgen.schedulers``) against diffusers' own classes on
the same tensors, the same timestep and the same generator.

Ops (``--ops schedulers`` selects them all); diffusers' default schedule (linear betas 1e-4 .. 0.02,
T = 1000), timesteps set on the sample's device as a pipeline sets them, and the timestep passed as
the element of the scheduler's own ``timesteps`` that a pipeline's loop hands the step:

    scheduler_ddpm          DDPMScheduler, 1000 inference steps, t = 500 -> 499: epsilon, fixed_small,
                            clip_sample (noise drawn)
    scheduler_ddim_eta0     DDIMScheduler, 50 inference steps, t = 500 -> 480, eta = 0 (no noise)
    scheduler_ddim_eta1     the same step with eta = 1 (noise drawn)

Shapes: [1, 4, 64, 64] (one 512 px latent), [16, 3, 32, 32], [4, 4, 64, 64] and, for a GPU,
[16, 4, 128, 128]; fp32. Other sizes (``--sizes``) are [size / 4096, 4, 32, 32] batches. The quick
size (CPU smoke runs) is [2, 4, 8, 8].

Bytes moved: model_output and sample read, prev_sample and pred_original_sample written (4 tensors of
the shape); the noise diffusers' generator draws is not counted (both schedulers draw it alike).

Providers:
    fastgen                 fastgen's scheduler as a pipeline runs it (backend "auto"): the fused
                            Triton step on CUDA; on a CPU the torch path "auto" picks there (the
                            float64 reference), a real timing
    fastgen, seed noise     the same step with ``seed=``: the noise drawn inside the step from
                            fastgen's counter-based stream instead of by the generator (noisy ops only)
    reference               ``backend="torch"`` (CUDA only: on a CPU it is the fastgen row)
    diffusers               diffusers' DDPMScheduler / DDIMScheduler (when installed)
Both schedulers are built once per device, outside the timed call.

    python -m fastgen bench --ops schedulers      # through the report (bench/README.md)
    python bench/bench_schedulers.py [--quick]    # this family alone: median per step, ratio to diffusers
    pytest bench/bench_schedulers.py              # pytest-benchmark
"""
import argparse
import functools
import importlib.util
import os
import sys

import torch

if __name__ == "__main__" and not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as the CLI does: the interpreter runs CPU tensors

from fastgen.bench import (fastgen as fastgen_provider, harness, peer, pytest_benchmarks, random_tensor, reference,
                           register)
from fastgen.bench.registry import Op

HAVE_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
SEED = 0x5C4E_D01E
T = 500
STEPS = {"ddpm": 1000, "ddim": 50}
SHAPES = [(1, 4, 64, 64), (16, 3, 32, 32), (4, 4, 64, 64), (16, 4, 128, 128)]
QUICK_SHAPES = [(2, 4, 8, 8)]


def _numel(shape):
    return torch.Size(shape).numel()


def shape_of(size):
    """The declared shape of ``size`` elements; other sizes as [size / 4096, 4, 32, 32]."""
    for shape in SHAPES + QUICK_SHAPES:
        if _numel(shape) == size:
            return shape
    if size % 4096:
        raise ValueError(f"sizes of the scheduler ops must be one of {[_numel(s) for s in SHAPES]} or a multiple "
                         f"of 4096 (a [B, 4, 32, 32] batch), got {size}")
    return (size // 4096, 4, 32, 32)


class Step:
    """The two schedulers of one op on one device and the timestep each is stepped from: the element of
    its own ``timesteps`` equal to T (no tensor here is an input the harness counts as traffic)."""

    def __init__(self, kind, device):
        import diffusers

        import fastgen.schedulers

        name = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler"}[kind]
        self.ours = getattr(fastgen.schedulers, name)()
        self.reference = getattr(fastgen.schedulers, name)(backend="torch")
        self.theirs = getattr(diffusers, name)()
        self.t = {}
        for key in ("ours", "reference", "theirs"):
            scheduler = getattr(self, key)
            scheduler.set_timesteps(STEPS[kind], device=device)
            self.t[key] = scheduler.timesteps[scheduler.timesteps.tolist().index(T)]
        self.generator = torch.Generator(device).manual_seed(SEED)


@functools.cache
def _step(kind, device):
    return Step(kind, torch.device(device))


def make_inputs_for(kind):
    def make_inputs(size, dtype, device, generator):
        """model_output (an eps prediction) ~ N(0, 1) and sample x_t ~ N(0, 1) of ``shape_of(size)``."""
        shape = shape_of(size)
        return {"model_output": random_tensor(shape, dtype, device, generator),
                "sample": random_tensor(shape, dtype, device, generator),
                "step": _step(kind, str(torch.device(device)))}
    return make_inputs


def stepper(which, **kwargs):
    """A provider's fn: ``which`` ("ours", "reference" or "theirs") steps from T with ``kwargs``."""
    def fn(model_output, sample, step):
        scheduler, noise = getattr(step, which), {} if "seed" in kwargs else {"generator": step.generator}
        return scheduler.step(model_output, step.t[which], sample, return_dict=False, **noise, **kwargs)
    return fn


def scheduler_op(name, kind, description, noisy, **step_kwargs):
    providers = [
        fastgen_provider(stepper("ours", **step_kwargs), cpu="always",
                         note="fused Triton step on CUDA; on a CPU the torch path backend='auto' picks"),
        reference(stepper("reference", **step_kwargs), cpu="never", note="on a CPU the fastgen row is this path"),
    ]
    if noisy:
        providers.append(peer("fastgen, seed noise", stepper("ours", seed=SEED, **step_kwargs),
                              note="seed=: counter-based noise drawn in the step, no generator"))
    if HAVE_DIFFUSERS:
        providers.append(peer("diffusers", stepper("theirs", **step_kwargs)))
    sizes = sorted(_numel(s) for s in SHAPES)
    return register(Op(name=name, description=description, providers=providers, make_inputs=make_inputs_for(kind),
                       sizes=sizes, dtypes=[torch.float32], quick_sizes=[_numel(s) for s in QUICK_SHAPES],
                       quick_dtypes=[torch.float32], shape_of=shape_of))


SCHEDULER_DDPM = scheduler_op("scheduler_ddpm", "ddpm", f"DDPMScheduler.step t = {T} -> {T - 1} of 1000: epsilon, "
                              "fixed_small, clip_sample", noisy=True)
SCHEDULER_DDIM_ETA0 = scheduler_op("scheduler_ddim_eta0", "ddim", f"DDIMScheduler.step t = {T} -> {T - 20} of 50: "
                                   "eta = 0", noisy=False, eta=0.0)
SCHEDULER_DDIM_ETA1 = scheduler_op("scheduler_ddim_eta1", "ddim", f"DDIMScheduler.step t = {T} -> {T - 20} of 50: "
                                   "eta = 1", noisy=True, eta=1.0)
OPS = (SCHEDULER_DDPM, SCHEDULER_DDIM_ETA0, SCHEDULER_DDIM_ETA1)

test_scheduler_ddpm = pytest_benchmarks(SCHEDULER_DDPM)
test_scheduler_ddim_eta0 = pytest_benchmarks(SCHEDULER_DDIM_ETA0)
test_scheduler_ddim_eta1 = pytest_benchmarks(SCHEDULER_DDIM_ETA1)


# --- this family alone: median per step, ratio to diffusers ----------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="one scheduler step: fastgen's schedulers against diffusers'")
    parser.add_argument("--quick", action="store_true", help="the quick size ([2, 4, 8, 8]): a smoke run")
    parser.add_argument("--ops", nargs="+", default=None, help="only these ops (e.g. scheduler_ddpm)")
    parser.add_argument("--sizes", nargs="+", type=int, default=None, help="only these sizes (elements per batch)")
    harness.add_timing_arguments(parser, min_time=0.5)
    args = parser.parse_args(argv)
    device = harness.timing_device(args)
    config = harness.TimerConfig(cpu_min_time_s=args.min_time)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
          + (f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else "") + "; fp32")
    print("| op | shape | provider | median us | p20-p80 us | this / diffusers |")
    print("|---|---|---|---|---|---|")
    for op in OPS:
        if args.ops and op.name not in args.ops:
            continue
        for size in op.quick_sizes if args.quick else op.sizes:
            if args.sizes and size not in args.sizes:
                continue
            case = harness.Case(op, "fwd", size, torch.float32, device)
            n_sets = min(case.n_sets(), config.max_input_sets)
            calls = {p.name: case.callable(p, n_sets) for p in op.providers if p.runs_on(device, args.quick)}
            timings = {name: t.summary() for name, t in
                       harness.time_calls(calls, device, config, input_sets=n_sets).items()}
            for name, s in timings.items():
                ratio = f"{s['median_ms'] / timings['diffusers']['median_ms']:.2f}" if "diffusers" in timings else "-"
                print(f"| {op.name} | {tuple(case.shape)} | {name} | {1e3 * s['median_ms']:.1f} | "
                      f"{1e3 * s['p20_ms']:.1f}-{1e3 * s['p80_ms']:.1f} | {ratio} |")


if __name__ == "__main__":
    sys.exit(main())

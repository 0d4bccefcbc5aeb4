"""Benchmark of one step of the sigma-space samplers as a pipeline calls it: ``scheduler.step(model_output,
t, sample, generator=g)``, fastgen's drop-in schedulers against diffusers' own classes on the same
tensors, the same step of the same schedule and the same generator, timed interleaved in one run.

Samplers: every sampler of ``fastgen.registry`` with a StepTable (all but DDPM and DDIM, whose steps
``bench_schedulers.py`` times), by registry name, in its registry configuration; a class that takes
``beta_schedule`` gets Stable Diffusion's (scaled_linear, 0.00085 .. 0.012), flow matching shift 3
(SD3's). Steps: 20, or the count in STEPS (a pipeline's default for that sampler). Each scheduler is
first stepped to the middle of its run, so its state holds what the next step reads (a multistep
solver's previous outputs, a two-stage method's first stage); that state is restored before every
timed call (its lists copied: a few microseconds, for both providers alike), so every call is the
same step.

Shapes: [1, 4, 128, 128] (one SDXL latent), [4, 4, 64, 64] (four SD 1.5 latents), [1, 16, 128, 128]
(one SD3 latent); ``--quick``: [2, 4, 8, 8]. fp32.

Providers:
    fastgen                fastgen's scheduler as a pipeline runs it (backend "auto"): the fused Triton
                           step on CUDA; on a CPU the fp32 torch path "auto" picks there
    fastgen, seed noise    the same with ``seed=`` (samplers whose run draws noise): the noise drawn in
                           the step from the counter-based stream, not by the generator
    diffusers              diffusers' class

``--host-cost``: fastgen's classes on backend "triton" with every kernel launch replaced by a no-op,
at [2, 4, 8, 8]: the Python a GPU step costs around its one launch (argument checks, the row lookup,
the custom op's dispatch), on any machine; Triton's own launcher is not in it. diffusers' step runs
whole on the same tiny tensors, where its few tensor ops cost little next to its own Python.

    python bench/bench_samplers.py --threads 1        # median per step and ratio to diffusers
    python bench/bench_samplers.py --quick            # a smoke run
    python bench/bench_samplers.py --host-cost        # the host cost of a fused step
"""
import argparse
import inspect
import os
import sys

import torch

if __name__ == "__main__" and not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as the CLI does: the interpreter runs CPU tensors

from fastgen import registry  # noqa: E402
from fastgen.bench import harness  # noqa: E402

SEED = 0x5A3B_1E55
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
STEPS = {"euler": 30, "euler_ancestral": 30, "heun": 15, "kdpm2": 15, "kdpm2_ancestral": 15, "pndm": 50,
         "dpm_sde": 10, "flow_match": 28, "consistency": 2, "lcm": 4, "tcd": 4, "edm_euler": 30}
SAMPLERS = tuple(sampler.name for sampler in registry.SAMPLERS if sampler.reference and registry.available(sampler))
SHAPES = [(1, 4, 128, 128), (4, 4, 64, 64), (1, 16, 128, 128)]
QUICK_SHAPES = [(2, 4, 8, 8)]


def make(module, name: str, **kwargs):
    """``module``'s class (fastgen.schedulers or diffusers) of the registry sampler ``name``, configured
    (``kwargs``: e.g. fastgen's backend)."""
    sampler = registry.BY_NAME[name]
    cls = getattr(module, sampler.scheduler)
    accepted = inspect.signature(cls.__init__).parameters
    config = dict(SD_BETAS if "beta_schedule" in accepted else {}, **sampler.config)
    if name == "flow_match":
        config["shift"] = 3.0
    return cls(**config, **kwargs)


def stub_launches():
    """Every kernel launch a no-op from now on (``--host-cost``): what is left of a step is its host cost."""
    import fastgen.kernels

    real = fastgen.kernels.launch
    for module in list(sys.modules.values()):
        if getattr(module, "launch", None) is real:
            module.launch = lambda kernel, grid, *args, **kwargs: None


class Stepper:
    """A zero-argument call: one scheduler stepping the same middle step of its run on ``model_output``
    and ``sample`` every time (its state restored first; ``index`` is that step's index)."""

    def __init__(self, scheduler, steps, model_output, sample, **step_kwargs):
        self.scheduler, self.model_output, self.sample, self.step_kwargs = scheduler, model_output, sample, step_kwargs
        scheduler.set_timesteps(steps, device=sample.device)
        timesteps = scheduler.timesteps
        self.index = len(timesteps) // 2
        self.t = timesteps[self.index]
        scale = getattr(scheduler, "scale_model_input", lambda x, t: x)  # as a pipeline calls it (flow matching: none)
        x = sample
        for t in timesteps[:self.index]:  # the run up to the middle: the state the timed step reads
            scale(x, t)
            x = scheduler.step(model_output, t, x, return_dict=False, **step_kwargs)[0]
        scale(sample, self.t)
        self.state = dict(vars(scheduler))

    def __call__(self):
        vars(self.scheduler).update({k: list(v) if isinstance(v, list) else v for k, v in self.state.items()})
        return self.scheduler.step(self.model_output, self.t, self.sample, return_dict=False, **self.step_kwargs)


def draws_noise(scheduler, steps: int) -> bool:
    """Whether a run of ``steps`` steps of ``scheduler`` draws noise after its initial sample (its StepTable)."""
    from fastgen.step_table import step_table

    scheduler.set_timesteps(steps)
    return step_table(scheduler).any_draws


def calls_for(name, shape, device, **fastgen_kwargs):
    """{provider: Stepper} of one sampler and shape (fresh N(0, 1) inputs); ``fastgen_kwargs``: the
    arguments of fastgen's classes (e.g. backend="triton")."""
    import diffusers

    import fastgen.schedulers

    steps = STEPS.get(name, 20)
    generator = torch.Generator(device).manual_seed(SEED)
    sample = torch.randn(shape, device=device, generator=generator)
    model_output = torch.randn(shape, device=device, generator=generator)
    takes_generator = "generator" in inspect.signature(make(diffusers, name).step).parameters
    noise = dict(generator=generator) if takes_generator else {}
    steppers = {"fastgen": Stepper(make(fastgen.schedulers, name, **fastgen_kwargs), steps, model_output, sample,
                                   **noise)}
    if draws_noise(make(fastgen.schedulers, name), steps):
        steppers["fastgen, seed noise"] = Stepper(make(fastgen.schedulers, name, **fastgen_kwargs), steps,
                                                  model_output, sample, seed=SEED)
    steppers["diffusers"] = Stepper(make(diffusers, name), steps, model_output, sample, **noise)
    return steppers


def main(argv=None):
    parser = argparse.ArgumentParser(description="one sampler step: fastgen's sigma-space schedulers against "
                                                 "diffusers'")
    parser.add_argument("--quick", action="store_true", help="the quick size ([2, 4, 8, 8]): a smoke run")
    parser.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=None, help="only these samplers")
    parser.add_argument("--host-cost", action="store_true",
                        help="fastgen on backend triton with the kernel launches stubbed out, at [2, 4, 8, 8]")
    harness.add_timing_arguments(parser, min_time=0.5)
    args = parser.parse_args(argv)
    if args.host_cost:
        stub_launches()
    device = harness.timing_device(args)
    config = harness.TimerConfig.quick() if args.quick else harness.TimerConfig(cpu_min_time_s=args.min_time)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
          + (f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else "") + "; fp32")
    print("| sampler | shape | provider | median us | p20-p80 us | this / diffusers |")
    print("|---|---|---|---|---|---|")
    for name in args.samplers or SAMPLERS:
        for shape in QUICK_SHAPES if args.quick or args.host_cost else SHAPES:
            calls = calls_for(name, shape, device, **({"backend": "triton"} if args.host_cost else {}))
            timings = {p: t.summary() for p, t in harness.time_calls(calls, device, config).items()}
            for provider, s in timings.items():
                ratio = s["median_ms"] / timings["diffusers"]["median_ms"]
                print(f"| {name} | {shape} | {provider} | {1e3 * s['median_ms']:.1f} | "
                      f"{1e3 * s['p20_ms']:.1f}-{1e3 * s['p80_ms']:.1f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())

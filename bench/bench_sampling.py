"""Benchmark of whole sampling loops: 1000 DDPM steps and 50 DDIM steps with a small MLP denoiser
(flat [B, 64] data), a UNet ([B, 3, 32, 32] images) and no denoiser at all (a fixed output: what
each loop costs on its own, the part of a step a sampler controls), per loop and per step; and the
loops real pipelines run, with and without classifier-free guidance (the model on the doubled
batch, the combination fused into the step): Euler 30 steps, DPM-Solver++ 2M 20 steps, flow-matching
Euler 28 steps, with the MLP and the fixed output; and the few-step samplers: multistep consistency
sampling 2 steps (CMStochasticIterativeScheduler) and LCM 4 steps, unguided.

Providers (each one call = one full sampling run from x_T to x_0):
    fastgen                 ``fastgen.sampling.Sampler`` as it runs by default: on CUDA the fused Triton
                            step, model call + step captured once as a CUDA graph and replayed per
                            step; on a CPU the torch loop (backend "torch": fp32 whole-tensor ops,
                            coefficients precomputed, counter-based noise drawn for many steps per call)
    fastgen eager           the Triton loop without the graph (one launch of the fused step per step)
    fastgen, diffusers noise  the default loop with ``generator=``: the noise drawn by torch.randn as
                            diffusers draws it, so it differs from "diffusers" only in the step
    reference               the loop with ``backend="reference"`` (every step through the float64 reference)
    diffusers               the loop diffusers' pipelines run: ``scheduler.step(model(x, t), t, x).prev_sample``
                            (with ``scale_model_input`` first, and with guidance the doubled batch and
                            ``u + w (c - u)`` before the step, as the pipelines write it)``
    model only              the model called once per timestep and nothing else: the floor for a
                            loop whose model dominates (the UNet); not run for the fixed output
Per-step time = a call's time / the steps. Traffic (bytes): per step, x and the model output read
and x written once (the model's own traffic excluded), times the steps.

Targets: on a GPU the graph-captured loop >= 5x the diffusers loop for the MLP and within 3%
of "model only" for the UNet; on a CPU the fastgen loop faster than the diffusers loop.

    python -m fastgen bench --ops sample_ddim50_mlp           # through the report (bench/README.md)
    python bench/bench_sampling.py [--quick]                  # this family alone: per-step table
    pytest bench/bench_sampling.py                            # pytest-benchmark

The quick sizes (CPU smoke runs) are tiny models sampling 2 steps, not the full 1000 / 50. On a CPU "fastgen
eager" runs the fused step in the Triton interpreter (a smoke test, not a timing); every other row is a timing.
"""
import argparse
import os
import sys

import torch

if __name__ == "__main__" and not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as the CLI does: the interpreter runs CPU tensors

from fastgen.bench import fastgen as fastgen_provider, harness, peer, pytest_benchmarks, reference, register
from fastgen.bench.registry import Op
from fastgen.models import MLPDenoiser, UNetDenoiser
from fastgen.sampling import Sampler, make_scheduler


class FixedOutput(torch.nn.Module):
    """A stand-in denoiser that returns one fixed epsilon prediction (standard normal, drawn at
    construction) whatever x_t and t are: a loop around it costs what the loop itself costs."""

    def __init__(self, shape):
        super().__init__()
        self.output = torch.nn.Parameter(torch.randn(shape), requires_grad=False)

    def forward(self, x, t, class_labels=None):
        return self.output


class _Conditional(torch.nn.Module):
    """A bench denoiser that takes class labels (and ignores them): what a guided loop calls."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, class_labels=None):
        return self.model(x, t)


QUICK_STEPS = 2
MODELS = {
    # name: {"full" | "quick": (per-sample shape, constructor of the batch shape, batch sizes)}; the
    # quick sizes (tiny models, QUICK_STEPS steps) never coincide with the full ones, so the size
    # says which it is
    "mlp": {"full": ((64,), lambda shape: MLPDenoiser(dim=64, hidden=256, depth=3), [64, 1024]),
            "quick": ((16,), lambda shape: MLPDenoiser(dim=16, hidden=32, depth=1, time_dim=16), [4])},
    "unet": {"full": ((3, 32, 32), lambda shape: UNetDenoiser(in_channels=3, channels=64, channel_mults=(1, 2, 2),
                                                              attention_resolutions=(8,), image_size=32), [16, 64]),
             "quick": ((1, 8, 8), lambda shape: UNetDenoiser(in_channels=1, channels=8, channel_mults=(1, 2),
                                                             attention_resolutions=(4,), image_size=8), [2])},
    "fixed": {"full": ((64,), FixedOutput, [64, 1024]), "quick": ((16,), FixedOutput, [4])},
}
# name: (scheduler kind of fastgen.sampling.SCHEDULERS, steps, guidance scale or None)
SAMPLERS = {"ddpm1000": ("ddpm", 1000, None), "ddim50": ("ddim", 50, None),
            "euler30": ("euler", 30, None), "euler30_cfg": ("euler", 30, 7.5),
            "dpmpp2m20": ("dpmsolver++", 20, None), "dpmpp2m20_cfg": ("dpmsolver++", 20, 7.5),
            "flowmatch28": ("flow_match", 28, None), "flowmatch28_cfg": ("flow_match", 28, 7.5),
            "consistency2": ("consistency", 2, None), "lcm4": ("lcm", 4, None)}
GUIDED_LABEL, NULL_LABEL = 3, 10


def _diffusers_scheduler(kind):
    try:
        import diffusers
    except ImportError:
        return None
    from fastgen.sampling import SCHEDULERS

    name, overrides = SCHEDULERS[kind]
    return getattr(diffusers, name)(**overrides)


def _sizes(model_name, which):
    sample_shape, _, batches = MODELS[model_name][which]
    return [b * torch.Size(sample_shape).numel() for b in batches]


def make_inputs_for(model_name, sampler_name):
    kind, full_steps, guidance = SAMPLERS[sampler_name]

    def make_inputs(size, dtype, device, generator):
        """A random-weight model (weights seeded from ``generator``) and the prepared loops."""
        which = "quick" if size in _sizes(model_name, "quick") else "full"
        sample_shape, build, _ = MODELS[model_name][which]
        steps = QUICK_STEPS if which == "quick" else full_steps
        shape = (size // torch.Size(sample_shape).numel(), *sample_shape)
        model_batch = (2 if guidance else 1) * shape[0]
        seed = int(torch.randint(0, 1 << 62, (1,), generator=generator, device=generator.device).item())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build((model_batch, *sample_shape)).to(device=device, dtype=dtype).eval().requires_grad_(False)
        if guidance:
            model = _Conditional(model)
        loops = _Loops(model, shape, kind, steps, seed, dtype, guidance)
        return {"shape": shape, "steps": steps, "dtype": dtype, "device": torch.device(device), "seed": seed,
                "model": model, "loops": loops, "diffusers_scheduler": _diffusers_scheduler(kind),
                "guidance": guidance}

    return make_inputs


class _Loops(dict):
    """The prepared fastgen loops ("graph", "eager", "reference"), each built on first use (a
    Triton loop cannot be built on a CPU without the interpreter, where its provider never runs)."""
    SETTINGS = {"default": dict(), "eager": dict(cuda_graph=False, backend="triton"),
                "reference": dict(cuda_graph=False, backend="reference")}

    def __init__(self, model, shape, kind, steps, seed, dtype, guidance=None):
        super().__init__()
        self.args = dict(model=model, shape=shape, kind=kind, steps=steps, seed=seed, dtype=dtype,
                         model_device=next(model.parameters()).device)
        self.guided = {} if guidance is None else dict(class_labels=GUIDED_LABEL, guidance_scale=guidance,
                                                         null_class_label=NULL_LABEL)

    def __missing__(self, name):
        a = self.args
        if name == "diffusers noise":  # every call draws on from its generator, as diffusers' loop does
            noise = dict(generator=torch.Generator(a["model_device"]).manual_seed(a["seed"]), **self.SETTINGS["default"])
        else:
            noise = dict(seed=a["seed"], **self.SETTINGS[name])
        self[name] = Sampler(a["model"], a["shape"], make_scheduler(a["kind"]), num_inference_steps=a["steps"],
                             dtype=a["dtype"], **self.guided, **noise)
        return self[name]


def diffusers_loop(*, shape, steps, dtype, device, seed, model, diffusers_scheduler, guidance, **_):
    """The loop of diffusers' pipelines (x_N from a seeded generator, scaled by init_noise_sigma; the
    model input scaled by ``scale_model_input``; with guidance the doubled batch and the combination
    before the step, as the pipelines write it)."""
    generator = torch.Generator(device).manual_seed(seed)
    diffusers_scheduler.set_timesteps(steps, device=device)
    x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    x = x * getattr(diffusers_scheduler, "init_noise_sigma", 1.0)  # flow matching has none
    scale = getattr(diffusers_scheduler, "scale_model_input", lambda x, t: x)
    with torch.no_grad():
        for t in diffusers_scheduler.timesteps:
            if guidance:
                uncond, cond = model(scale(torch.cat([x] * 2), t), t).chunk(2)
                out = uncond + guidance * (cond - uncond)
            else:
                out = model(scale(x, t), t)
            x = diffusers_scheduler.step(out, t, x, generator=generator).prev_sample
    return x


def model_only(*, shape, dtype, device, model, loops, guidance, **_):
    """The model once per timestep on a fixed x (the doubled batch with guidance): what a loop costs
    without its steps."""
    x = torch.ones(((2 if guidance else 1) * shape[0], *shape[1:]), dtype=dtype, device=device)
    with torch.no_grad():
        for t in loops["default"].model_timesteps:
            out = model(x, t)
    return out


def bytes_moved(inputs, outputs):
    """Per step: x and the model output read, x written; times the steps (the model's traffic excluded)."""
    return 3 * torch.Size(inputs["shape"]).numel() * inputs["dtype"].itemsize * inputs["steps"]


def _register(model_name, sampler_name):
    providers = [
        fastgen_provider(lambda loops, **_: loops["default"](), name="fastgen", cpu="always",
                         note="CUDA graph of the fused step on a GPU; the torch loop on a CPU"),
        peer("fastgen eager", lambda loops, **_: loops["eager"](), cpu="quick",
             note="on CPU: Triton interpreter, a smoke test, not a timing"),
        peer("fastgen, diffusers noise", lambda loops, **_: loops["diffusers noise"](),
             note="generator= noise (torch.randn, as diffusers draws it)"),
        reference(lambda loops, **_: loops["reference"]()),
    ]
    if model_name != "fixed":
        providers.append(peer("model only", model_only))
    if _diffusers_scheduler("ddpm") is not None:
        providers.append(peer("diffusers", diffusers_loop))
    kind, steps, guidance = SAMPLERS[sampler_name]
    return register(Op(
        name=f"sample_{sampler_name}_{model_name}",
        description=f"full sampling, {steps} {kind} steps{f', guidance {guidance}' if guidance else ''}, "
                    + ("a fixed output for a denoiser (the loop's own cost)" if model_name == "fixed"
                       else f"{model_name} denoiser"),
        providers=providers,
        make_inputs=make_inputs_for(model_name, sampler_name),
        sizes=_sizes(model_name, "full"),
        quick_sizes=_sizes(model_name, "quick"),
        dtypes=[torch.float32],
        quick_dtypes=[torch.float32],
        bytes_moved=bytes_moved,
    ))


SAMPLE_DDPM1000_MLP = _register("mlp", "ddpm1000")
SAMPLE_DDIM50_MLP = _register("mlp", "ddim50")
SAMPLE_DDPM1000_UNET = _register("unet", "ddpm1000")
SAMPLE_DDIM50_UNET = _register("unet", "ddim50")
SAMPLE_DDPM1000_FIXED = _register("fixed", "ddpm1000")
SAMPLE_DDIM50_FIXED = _register("fixed", "ddim50")
# the pipelines' samplers, with and without guidance
PIPELINE_LOOPS = [_register(model_name, sampler_name) for sampler_name in SAMPLERS if sampler_name[:4] not in ("ddpm", "ddim")
                  for model_name in ("fixed", "mlp")]

test_sample_ddpm1000_mlp = pytest_benchmarks(SAMPLE_DDPM1000_MLP)
test_sample_ddim50_mlp = pytest_benchmarks(SAMPLE_DDIM50_MLP)
test_sample_ddpm1000_unet = pytest_benchmarks(SAMPLE_DDPM1000_UNET)
test_sample_ddim50_unet = pytest_benchmarks(SAMPLE_DDIM50_UNET)
test_sample_ddpm1000_fixed = pytest_benchmarks(SAMPLE_DDPM1000_FIXED)
test_sample_ddim50_fixed = pytest_benchmarks(SAMPLE_DDIM50_FIXED)
for _op in PIPELINE_LOOPS:
    globals()[f"test_{_op.name}"] = pytest_benchmarks(_op)


# --- this family alone: per-step table -------------------------------------------------------------

def _time(calls, device, reps):
    """Median seconds of each of ``calls`` (name -> callable): one warm-up call each (compiles,
    captures), then ``reps`` rounds calling each once, the device synchronised after each call
    (``harness.time_calls`` with wall_clock: a loop of 1000 steps needs no do_bench)."""
    config = harness.TimerConfig(cpu_warmup_s=0.0, cpu_min_reps=reps, cpu_min_time_s=0.0, cpu_max_reps=reps)
    timings = harness.time_calls(calls, device, config, warmup_calls=0, wall_clock=True)
    return {name: timing.summary()["median_ms"] / 1e3 for name, timing in timings.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description="sampling loops: total and per-step time per provider")
    parser.add_argument("--quick", action="store_true", help="the quick sizes (3 steps): a smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--ops", nargs="+", default=None, help="only these ops (e.g. sample_ddim50_mlp)")
    parser.add_argument("--sizes", nargs="+", type=int, default=None, help="only these sizes (elements per batch)")
    parser.add_argument("--providers", nargs="+", default=None, help="only these providers (e.g. fastgen diffusers)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    from fastgen.bench.registry import _interpreting

    print("| op | batch shape | steps | provider | total ms | per step us | diffusers / this | this / model only |")
    print("|---|---|---|---|---|---|---|---|")
    # the UNet loops last: the slowest, so a run cut off by its time limit has the rest
    for op in (SAMPLE_DDPM1000_FIXED, SAMPLE_DDIM50_FIXED, SAMPLE_DDPM1000_MLP, SAMPLE_DDIM50_MLP,
               *PIPELINE_LOOPS, SAMPLE_DDIM50_UNET, SAMPLE_DDPM1000_UNET):
        if args.ops and op.name not in args.ops:
            continue
        for size in op.quick_sizes if args.quick else op.sizes:
            if args.sizes and size not in args.sizes:
                continue
            inputs = op.make_inputs(size, torch.float32, device, torch.Generator(device).manual_seed(size))
            calls = {p.name: (lambda p=p: p.fn(**inputs)) for p in op.providers
                     if p.runs_on(device, args.quick) and (not args.providers or p.name in args.providers)}
            results = _time(calls, device, args.reps)
            for name, seconds in results.items():
                vs_diffusers = f"{results['diffusers'] / seconds:.2f}x" if "diffusers" in results else "-"
                vs_model = f"{seconds / results['model only']:.3f}" if "model only" in results else "-"
                interpreted = " (interpreter)" if device.type == "cpu" and name == "fastgen eager" and \
                    _interpreting() else ""
                print(f"| {op.name} | {tuple(inputs['shape'])} | {inputs['steps']} | {name}{interpreted} | "
                      f"{1e3 * seconds:.1f} | {1e6 * seconds / inputs['steps']:.1f} | {vs_diffusers} | "
                      f"{vs_model} |")


if __name__ == "__main__":
    sys.exit(main())

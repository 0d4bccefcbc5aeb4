"""Benchmark of one step of the sigma-space samplers as a pipeline calls it: ``scheduler.step(model_output,
t, sample, generator=g)``, fastgen's drop-in schedulers against diffusers' own classes on the same
tensors, the same step of the same schedule and the same generator, timed interleaved in one run.

Samplers (each at the middle step of its run, the step index restored before every call so each call
is the same step; the multistep solver holds its previous x0, so its second-order update is timed):

    euler                  EulerDiscreteScheduler, 30 steps (SDXL's default)
    euler_ancestral        EulerAncestralDiscreteScheduler, 30 steps (noise every step)
    dpmpp_2m_karras        DPMSolverMultistepScheduler, 20 steps, use_karras_sigmas
    dpmpp_2m_sde_karras    the same with algorithm_type "sde-dpmsolver++" (noise every step)
    flow_match             FlowMatchEulerDiscreteScheduler, 28 steps, shift 3 (SD3's default)

Shapes: [1, 4, 128, 128] (one SDXL latent), [4, 4, 64, 64] (four SD 1.5 latents), [1, 16, 128, 128]
(one SD3 latent); ``--quick``: [2, 4, 8, 8]. fp32.

Providers:
    fastgen                fastgen's scheduler as a pipeline runs it (backend "auto"): the fused Triton
                           step on CUDA; on a CPU the fp32 torch path "auto" picks there
    fastgen, seed noise    the same with ``seed=`` (noisy samplers): the noise drawn in the step from
                           the counter-based stream, not by the generator
    diffusers              diffusers' class

    python bench/bench_samplers.py --threads 1        # median per step and ratio to diffusers
    python bench/bench_samplers.py --quick            # a smoke run
"""
import argparse
import os
import sys

import torch

if __name__ == "__main__" and not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as the CLI does: the interpreter runs CPU tensors

from fastgen.bench import harness  # noqa: E402

SEED = 0x5A3B_1E55
SAMPLERS = {  # name: (class name, config, inference steps, noisy)
    "euler": ("EulerDiscreteScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), 30,
              False),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                                beta_end=0.012), 30, True),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                            beta_end=0.012, use_karras_sigmas=True), 20, False),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                                beta_end=0.012, use_karras_sigmas=True,
                                                                algorithm_type="sde-dpmsolver++"), 20, True),
    "flow_match": ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0), 28, False),
    "tcd": ("TCDScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), 4, True),
    "edm_euler": ("EDMEulerScheduler", {}, 30, False),
    "edm_dpmpp_2m_sde": ("EDMDPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"), 20, True),
}
SHAPES = [(1, 4, 128, 128), (4, 4, 64, 64), (1, 16, 128, 128)]
QUICK_SHAPES = [(2, 4, 8, 8)]


class Stepper:
    """One scheduler stepping the same middle step of its run on every call (state restored first)."""

    def __init__(self, scheduler, steps, device, sample, **step_kwargs):
        self.scheduler, self.step_kwargs = scheduler, step_kwargs
        scheduler.set_timesteps(steps, device=device)
        self.index = steps // 2
        self.t = scheduler.timesteps[self.index]
        self.previous = 0.9 * sample  # a previous x0 for the multistep solver's second-order update
        if hasattr(scheduler, "scale_model_input"):
            scheduler.scale_model_input(sample, self.t)  # as a pipeline does (and silences diffusers' warning)

    def __call__(self, model_output, sample):
        s = self.scheduler
        s._step_index = self.index
        if hasattr(s, "lower_order_nums"):
            s.lower_order_nums, s.model_outputs = 1, [None, self.previous]
        return s.step(model_output, self.t, sample, return_dict=False, **self.step_kwargs)


def calls_for(name, shape, device):
    """{provider: zero-argument call} of one sampler and shape (fresh N(0, 1) inputs)."""
    import diffusers

    import fastgen.schedulers

    class_name, config, steps, noisy = SAMPLERS[name]
    generator = torch.Generator(device).manual_seed(SEED)
    sample = torch.randn(shape, device=device, generator=generator)
    model_output = torch.randn(shape, device=device, generator=generator)
    steppers = {"fastgen": Stepper(getattr(fastgen.schedulers, class_name)(**config), steps, device, sample,
                                   generator=generator)}
    if noisy:
        steppers["fastgen, seed noise"] = Stepper(getattr(fastgen.schedulers, class_name)(**config), steps, device,
                                                  sample, seed=SEED)
    steppers["diffusers"] = Stepper(getattr(diffusers, class_name)(**config), steps, device, sample,
                                    generator=generator)
    return {provider: (lambda s=stepper: s(model_output, sample)) for provider, stepper in steppers.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description="one sampler step: fastgen's sigma-space schedulers against "
                                                 "diffusers'")
    parser.add_argument("--quick", action="store_true", help="the quick size ([2, 4, 8, 8]): a smoke run")
    parser.add_argument("--samplers", nargs="+", choices=sorted(SAMPLERS), default=None, help="only these samplers")
    harness.add_timing_arguments(parser, min_time=0.5)
    args = parser.parse_args(argv)
    device = harness.timing_device(args)
    config = harness.TimerConfig.quick() if args.quick else harness.TimerConfig(cpu_min_time_s=args.min_time)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
          + (f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else "") + "; fp32")
    print("| sampler | shape | provider | median us | p20-p80 us | this / diffusers |")
    print("|---|---|---|---|---|---|")
    for name in args.samplers or SAMPLERS:
        for shape in QUICK_SHAPES if args.quick else SHAPES:
            calls = calls_for(name, shape, device)
            timings = {p: t.summary() for p, t in harness.time_calls(calls, device, config).items()}
            for provider, s in timings.items():
                ratio = s["median_ms"] / timings["diffusers"]["median_ms"]
                print(f"| {name} | {shape} | {provider} | {1e3 * s['median_ms']:.1f} | "
                      f"{1e3 * s['p20_ms']:.1f}-{1e3 * s['p80_ms']:.1f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""The CPU table: fastgen's default CPU path (the compiled loop, fastgen._compile) against diffusers'
own schedulers, loop only (a fixed model output: what each loop costs on its own), and the counter
noise against torch.randn. Ratios come from one interleaved run (every provider once per round,
rounds repeated, medians): speed-up = diffusers' median / fastgen's median (>= 1: fastgen faster).

    python bench/bench_cpu.py --threads 1 --out bench/results/cpu_threads1.md
    python bench/bench_cpu.py --threads 2 --quick

Rows: the counter noise (2^20 normals: ``fastgen.randn`` as it runs by default, and the compiled
Philox the loops fuse into their steps) beside torch.randn; every loop-only sampler (DDPM-1000,
DDIM-50, Euler 30 with and without guidance, Euler ancestral 30, DPM-Solver++ 2M 20, SDE-DPM-Solver++
20, flow matching 28, LCM 4, TCD 4, consistency 2, EDM Euler 30, EDM DPM-Solver++ 2M 20, DPM-Solver++
2S 20, Heun 15, KDPM2 15 and its ancestral variant, DEIS 20) at
64x64,
1024x64 and the Stable-Diffusion latent 4x4x64x64; and the
whole DDIM-50 loop with the digits-sized MLP beside the model alone. The first call's compile time
is its own column, apart from the steady state.
"""
import argparse
import os
import statistics
import sys
import time

import torch

SHAPES = {"64x64": (64, 64), "1024x64": (1024, 64), "4x4x64x64": (4, 4, 64, 64)}
# name: (fastgen.sampling.SCHEDULERS kind, steps, guidance scale)
LOOPS = {"ddpm1000": ("ddpm", 1000, None), "ddim50": ("ddim", 50, None), "euler30": ("euler", 30, None),
         "euler30_cfg": ("euler", 30, 7.5), "euler_ancestral30": ("euler_ancestral", 30, None),
         "dpmpp2m20": ("dpmsolver++", 20, None), "sde_dpmpp2m20": ("sde-dpmsolver++", 20, None),
         "flowmatch28": ("flow_match", 28, None), "lcm4": ("lcm", 4, None), "tcd4": ("tcd", 4, None),
         "consistency2": ("consistency", 2, None), "edm_euler30": ("edm_euler", 30, None),
         "edm_dpmpp2m20": ("edm_dpmsolver++", 20, None), "dpmpp2s20": ("dpmsolver++_singlestep", 20, None),
         "heun15": ("heun", 15, None), "kdpm2_15": ("kdpm2", 15, None),
         "kdpm2_ancestral15": ("kdpm2_ancestral", 15, None), "deis20": ("deis", 20, None),
         "lms20": ("lms", 20, None), "pndm50": ("pndm", 50, None),
         "unipc20": ("unipc", 20, None), "dpm_sde10": ("dpm_sde", 10, None)}
NULL_LABEL = 10


class FixedOutput(torch.nn.Module):
    """A model whose output is one fixed tensor (drawn once): the loop's own cost, nothing else."""

    def __init__(self, shape):
        super().__init__()
        self.output = torch.randn(shape)

    def forward(self, x, t, class_labels=None):
        return self.output


def diffusers_loop(kind, steps, shape, guidance):
    """The loop diffusers' pipelines run: scale_model_input, the model (doubled batch and u + w (c - u)
    with guidance), scheduler.step."""
    import diffusers

    from fastgen.sampling import SCHEDULERS

    name, overrides = SCHEDULERS[kind]
    scheduler = getattr(diffusers, name)(**overrides)
    model = FixedOutput(((2 if guidance else 1) * shape[0], *shape[1:]))

    def run():
        scheduler.set_timesteps(steps)
        x = torch.randn(shape) * getattr(scheduler, "init_noise_sigma", 1.0)
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            out = model(torch.cat([x_in, x_in]) if guidance else x_in, t)
            if guidance:
                uncond, cond = out.chunk(2)
                out = uncond + guidance * (cond - uncond)
            x = scheduler.step(out, t, x).prev_sample
        return x
    return run


def fastgen_loop(kind, steps, shape, guidance, model=None):
    """``fastgen.sampling.Sampler`` as it runs by default on a CPU (backend "auto")."""
    from fastgen.sampling import Sampler, make_scheduler

    model = model or FixedOutput(((2 if guidance else 1) * shape[0], *shape[1:]))
    labels = dict(class_labels=torch.full((shape[0],), 3), null_class_label=NULL_LABEL,
                  guidance_scale=guidance) if guidance else {}
    return Sampler(model, shape, make_scheduler(kind), num_inference_steps=steps, seed=0, **labels)


def interleaved(providers: dict, rounds: int) -> dict:
    """Median seconds of each provider, every provider run once per round."""
    times = {name: [] for name in providers}
    for _ in range(rounds):
        for name, fn in providers.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def first_call(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def noise_rows(rounds):
    import fastgen
    from fastgen import _compile
    from fastgen.reference import random as ref_random

    n = 1 << 20

    def philox(seed, stream):
        return ref_random.normals(n, seed=seed, stream=stream, dtype=torch.float32)

    fused = _compile.compiled(philox, "bench")
    seed, stream = torch.tensor(12345), torch.tensor([7])
    compile_s = first_call(lambda: fused(seed, stream))
    medians = interleaved({"torch.randn": lambda: torch.randn(n),
                           "fastgen.randn": lambda: fastgen.randn(n, seed=12345, stream=7),
                           "compiled Philox": lambda: fused(seed, stream)}, rounds)
    base = medians["torch.randn"]
    return [("counter noise 2^20", name, medians[name] * 1e3, medians[name] / base, compile_s if "compiled" in name
             else 0.0) for name in ("fastgen.randn", "compiled Philox")]


def loop_rows(names, shapes, rounds):
    rows = []
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        for name in names:
            kind, steps, guidance = LOOPS[name]
            sampler = fastgen_loop(kind, steps, shape, guidance)
            compile_s = first_call(sampler)
            medians = interleaved({"diffusers": diffusers_loop(kind, steps, shape, guidance), "fastgen": sampler},
                                  rounds)
            rows.append((f"{name} {shape_name}", "loop only", medians["fastgen"] * 1e3,
                         medians["diffusers"] / medians["fastgen"], compile_s))
            print(*rows[-1], file=sys.stderr, flush=True)
    return rows


def model_rows(rounds):
    """The whole DDIM-50 loop with the digits-sized MLP (64 features, batch 1024) beside the model alone."""
    from fastgen.models import MLPDenoiser

    shape, steps = (1024, 64), 50
    model = MLPDenoiser(dim=64, hidden=256, depth=3).eval().requires_grad_(False)
    sampler = fastgen_loop("ddim", steps, shape, None, model=model)
    timesteps = torch.arange(steps)
    x = torch.randn(shape)

    def model_only():
        for t in timesteps:
            model(x, t.expand(shape[0]))

    compile_s = first_call(sampler)
    with torch.no_grad():
        medians = interleaved({"model only": model_only, "fastgen": sampler}, rounds)
    return [("ddim50 1024x64 MLP", "whole loop", medians["fastgen"] * 1e3, medians["fastgen"] / medians["model only"],
             compile_s)]


def markdown(rows, threads) -> str:
    lines = [f"CPU, {threads} thread(s), {os.cpu_count()} cores, torch {torch.__version__}; medians of interleaved "
             "rounds",
             "", "| what | row | fastgen median ms | ratio | first-call compile s |", "|---|---|---|---|---|"]
    lines += [f"| {what} | {row} | {ms:.3f} | {ratio:.2f} | {compile_s:.1f} |"
              for what, row, ms, ratio, compile_s in rows]
    lines += ["", "ratio: loop only = diffusers / fastgen (>= 1.0: fastgen faster); counter noise = time / "
              "torch.randn's "
              "(goal <= 1.15); whole loop = time / model-only time (goal <= 1.05)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="64x64 only, three loops, three rounds")
    parser.add_argument("--loops", nargs="+", choices=sorted(LOOPS), help="only these loops (and no noise or MLP rows)")
    parser.add_argument("--out", help="write the markdown table here as well")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("FASTGEN_COMPILE", "1")
    names, shapes, rounds = list(LOOPS), list(SHAPES), args.rounds
    if args.quick:
        names, shapes, rounds = ["ddim50", "euler_ancestral30", "flowmatch28"], ["64x64"], 3
    if args.loops:
        rows = loop_rows(args.loops, shapes, rounds)
    else:
        rows = noise_rows(rounds) + loop_rows(names, shapes, rounds) + model_rows(rounds)
    table = markdown(rows, args.threads)
    print(table)
    if args.out:
        from fastgen._files import atomic_write

        with atomic_write(args.out, "w", encoding="utf-8") as f:
            f.write(table)


if __name__ == "__main__":
    main()

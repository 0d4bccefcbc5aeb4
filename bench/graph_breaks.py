"""Graph breaks under torch.compile of each drop-in scheduler's first step, called as a pipeline calls
it (``scale_model_input`` first, t from ``scheduler.timesteps``), fastgen's class beside diffusers' own:

    python bench/graph_breaks.py            # a markdown table: scheduler | diffusers | fastgen
"""
import warnings

import torch

from fastgen import registry

SCHEDULERS = registry.AVAILABLE_CLASSES


def breaks(scheduler_class, steps=10) -> int:
    """torch._dynamo.explain's graph-break count of the scheduler's first step."""
    scheduler = scheduler_class()
    scheduler.set_timesteps(steps)
    x, model_output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = scheduler.timesteps[0]
    if hasattr(scheduler, "scale_model_input"):
        scheduler.scale_model_input(x, t)
    explained = torch._dynamo.explain(lambda f, t, x: scheduler.step(f, t, x).prev_sample)
    return explained(model_output, t, x).graph_break_count


def main():
    import diffusers

    import fastgen

    warnings.filterwarnings("ignore")
    rows, totals = [], [0, 0]
    for name in SCHEDULERS:
        counts = [breaks(getattr(diffusers, name)), breaks(getattr(fastgen, name))]
        totals = [a + b for a, b in zip(totals, counts)]
        rows.append(f"| {name} | {counts[0]} | {counts[1]} |")
    print("| scheduler | diffusers | fastgen |\n|---|---|---|")
    print("\n".join(rows))
    print(f"| all | {totals[0]} | {totals[1]} |")


if __name__ == "__main__":
    main()

"""What makes a training loop resumable, shared by the reference models' trainers (flow, DDPM, GAN).

A run's checkpoint holds, beside the model, a "training" entry: everything the next step depends on.

    training = dict(step=..., seconds=..., rng=<torch.Generator state>, torch_rng=<torch's CPU state>,
                    <name>=<optimizer state_dict> for each optimizer, **settings, **extra)

``settings`` are the run's arguments (steps, seed, lr, batch size, ...): a resumed run takes them from
the checkpoint, not from its caller. ``extra`` is what a trainer keeps on top (the raw weights beside
an EMA, a data order and its cursor). With every random draw coming from the run's generator, torch's
default generator or fastgen's counter-based stream at a stored offset, a resumed run takes the same
steps as an uninterrupted one, bit for bit on the same machine and thread count.

    out = check_output(out, resume)                  # before any work: writable, and there if resuming
    if resume:
        training = load(...)["training"]
        start, seconds = restore(training, optimizers={"optimizer": opt}, generator=rng)
    clock = Stopwatch(seconds)
    for step in range(start, steps):
        ...
        set_learning_rate(opt, learning_rate(step, steps, lr, warmup))
        if checkpoint_due(step, steps, checkpoint_every):
            save(..., training=state(step + 1, clock.seconds(), settings, {"optimizer": opt}, rng))
"""
import math
import os
import time

import torch

from fastgen import _checks
from fastgen._files import prepare_output


def check_output(out, resume: bool, *, name: str = "out") -> str:
    """``out`` checked for writing before any work (``prepare_output``); with ``resume`` it must exist."""
    out = prepare_output(out, name=name)
    if resume and not os.path.isfile(out):
        raise FileNotFoundError(f"resume=True needs the checkpoint {name}={out!r}, which does not exist")
    return out


def start(out, resume: bool, threads, load):
    """What every trainer does first: (out, checkpoint, training) with ``out`` checked for writing
    (``check_output``), torch's CPU threads set when ``threads`` is given, and for a resumed run the
    checkpoint at ``out`` (``load(out)``) and its training entry; (out, None, None) otherwise."""
    out = check_output(out, resume)
    if threads:
        torch.set_num_threads(_checks.as_int(threads, "threads"))
    if not resume:
        return out, None, None
    checkpoint = load(out)
    return out, checkpoint, training_of(checkpoint, out)


def state(step: int, seconds: float, settings: dict, optimizers: dict, generator: torch.Generator, **extra) -> dict:
    """The "training" entry of a checkpoint taken after ``step`` steps (see the module docstring)."""
    return dict(step=step, seconds=seconds, rng=generator.get_state(), torch_rng=torch.get_rng_state(),
                **{name: opt.state_dict() for name, opt in optimizers.items()}, **settings, **extra)


def training_of(checkpoint: dict, path) -> dict:
    """The "training" entry of a loaded checkpoint; ValueError if it was saved without one."""
    if "training" not in checkpoint:
        raise ValueError(f"checkpoint {str(path)!r} holds no training state (saved slim: weights only), "
                         "so it cannot be resumed")
    return checkpoint["training"]


def restore(training: dict, optimizers: dict, generator: torch.Generator):
    """Load the optimizers' states and both random generators from ``training``; returns (step, seconds)."""
    for name, opt in optimizers.items():
        opt.load_state_dict(training[name])
    generator.set_state(training["rng"])
    torch.set_rng_state(training["torch_rng"])
    return training["step"], training["seconds"]


def checkpoint_due(step: int, steps: int, every: int) -> bool:
    """After step ``step`` (0-based): time for a periodic checkpoint? (The last step writes the final one.)"""
    return (step + 1) % every == 0 and step + 1 < steps


def learning_rate(step: int, steps: int, lr: float, warmup: int = 200) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine decay to 0 at ``steps``."""
    return lr * min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(step / max(steps, 1), 1.0))))


def set_learning_rate(optimizer: torch.optim.Optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = value


class Stopwatch:
    """Training seconds over every sitting of a run: ``seconds()`` is those of earlier sittings plus this one's."""

    def __init__(self, before: float = 0.0):
        self.before, self.began = before, time.perf_counter()

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.began


def record_loss(losses: list, loss: torch.Tensor, step: int, bar, run: str, label: str = "loss",
                digits: int = 4) -> None:
    """Append the step's loss to ``losses``; a non-finite one stops the run (FloatingPointError naming
    ``run`` and the step); every 50 steps ``bar`` shows the mean of the last 50 as ``label``."""
    losses.append(loss.item())
    if not math.isfinite(losses[-1]):
        raise FloatingPointError(f"{run} diverged at step {step + 1}: loss {losses[-1]}")
    if step % 50 == 0:
        bar.set_postfix({label: f"{sum(losses[-50:]) / len(losses[-50:]):.{digits}f}"}, refresh=False)


def progress(total: int, enabled: bool, description: str):
    """A tqdm bar (silent unless ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, disable=not enabled, dynamic_ncols=True)

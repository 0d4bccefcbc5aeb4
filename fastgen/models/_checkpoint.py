"""Checkpoint files of the reference models: written whole or not at all."""
import torch

from fastgen._files import atomic_write


def save(state: dict, path) -> None:
    """``torch.save(state)`` to ``path`` through the atomic writer: a failed write leaves the old file."""
    with atomic_write(path, "wb") as f:
        torch.save(state, f)

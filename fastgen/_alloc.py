"""Output allocation for kernel launches. Tests switch on poisoning so an element a kernel
forgets to write shows up as NaN instead of whatever the allocator left behind."""
import contextlib

import torch

POISON = False


def empty(shape, *, dtype, device) -> torch.Tensor:
    """torch.empty, or a NaN-filled (integers: -1-filled) tensor while poisoning is on."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


@contextlib.contextmanager
def poisoned_outputs(enabled: bool = True):
    """Within the block, every kernel output fastgen allocates starts out poisoned."""
    global POISON
    previous, POISON = POISON, enabled
    try:
        yield
    finally:
        POISON = previous

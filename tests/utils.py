"""Test helpers: float64 comparison (from fastgen.testing), poisoning, shape lists, non-contiguous views."""
import torch

from fastgen.testing import TOLERANCES, assert_close, compare, compare_exact, tolerance  # noqa: F401

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Odd sizes on purpose: a single element, sizes that are no multiple of any block, a 5-d tensor.
ODD_SHAPES = [(1,), (3, 5), (7, 129), (5, 123, 123), (16, 7, 57, 32, 29)]
# The same without the 5.9M-element case, for sweeps over many variants in the interpreter.
SMALL_SHAPES = ODD_SHAPES[:4]


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN (integers: -1) in place, so a kernel that skips an element is caught."""
    return t.fill_(float("nan") if t.is_floating_point() else -1)


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view holding the same values as ``t``: every other element of a buffer
    twice as wide in the last dimension (for 0-d/empty tensors a plain copy)."""
    if t.dim() == 0 or t.numel() == 0:
        return t.clone()
    wide = poison(torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device))
    view = wide[..., ::2]
    view.copy_(t)
    assert t.numel() == 1 or not view.is_contiguous()  # torch calls every 1-element view contiguous
    return view


NONFINITE = (float("nan"), float("inf"), -float("inf"))


def with_nonfinite(t: torch.Tensor, generator: torch.Generator, fraction: float = 0.2,
                   values=NONFINITE) -> torch.Tensor:
    """A copy of ``t`` with ``values`` (default NaN, +inf, -inf) at random positions (about ``fraction``
    of the elements), each position drawing one of them."""
    flat = t.detach().clone().reshape(-1)
    hit = torch.rand(flat.shape, generator=generator) < fraction
    kind = torch.randint(0, len(values), flat.shape, generator=generator)
    specials = torch.tensor(values, dtype=t.dtype)[kind]
    return torch.where(hit.to(t.device), specials.to(t.device), flat).reshape(t.shape)


def transposed(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view of ``t``'s values in ``t``'s shape, laid out as its transpose (first and
    last dims swapped in memory); for fewer than 2 dims a plain copy."""
    if t.dim() < 2:
        return t.clone()
    return t.transpose(0, -1).contiguous().transpose(0, -1)


def rand_like_shape(shape, dtype=torch.float32, device="cpu", *, scale=1.0, generator=None) -> torch.Tensor:
    """Fresh random normal data (never zeros) of ``shape`` in ``dtype``."""
    return (torch.randn(shape, dtype=torch.float64, generator=generator) * scale).to(device=device, dtype=dtype)


def interrupted_at_adam_step(monkeypatch, calls: int, train):
    """Run ``train()`` with torch.optim.Adam.step raising KeyboardInterrupt at its ``calls``-th call
    (Ctrl-C during training), then restore Adam: what a resume test interrupts a run with."""
    import pytest

    real_step, counted = torch.optim.Adam.step, []

    def step_then_stop(self, *args, **kwargs):
        counted.append(1)
        if len(counted) == calls:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train()
    monkeypatch.setattr(torch.optim.Adam, "step", real_step)

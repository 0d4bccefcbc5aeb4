"""Comparing a fast path to its float64 reference: per-dtype tolerances, NaN/inf accounted separately.

Used by ``python -m fastgen validate`` and by the test suite (tests/utils.py).
An element passes when both values are finite and |actual - expected| <= atol + rtol * |expected|,
or when both are the same infinity. NaN never passes unless ``equal_nan`` says the reference is
NaN there too. A reference value too large for the compared dtype counts as the infinity it
rounds to (an fp16 sum of 2e5 is inf in fp16).
"""
import dataclasses
import math

import torch

# (rtol, atol) by the dtype the fast path computed in. Kernels compute in fp32 and round once, so
# fp16/bf16 results sit within one ulp of the rounded float64 reference: 2^-10 and 2^-7 relative.
TOLERANCES = {
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1e-2, 1e-5),
    torch.float64: (1e-12, 1e-12),
}


def tolerance(dtype: torch.dtype, rtol=None, atol=None):
    """(rtol, atol) for ``dtype``, either overridable."""
    default_rtol, default_atol = TOLERANCES[dtype]
    return (default_rtol if rtol is None else rtol), (default_atol if atol is None else atol)


@dataclasses.dataclass
class Comparison:
    """What ``compare`` found: error figures, failure counts and the worst offenders."""
    numel: int
    rtol: float
    atol: float
    max_abs_err: float
    max_rel_err: float          # over elements with |expected| >= atol (relative error of ~0 means nothing)
    worst_ratio: float          # max |a - e| / (atol + rtol |e|) over finite pairs; <= 1 passes
    n_out_of_tol: int           # finite pairs outside the tolerance
    n_nonfinite_mismatch: int   # NaN/inf in one and not (the same) in the other
    worst: list                 # (index tuple, actual, expected) of the worst elements

    @property
    def ok(self) -> bool:
        return self.n_out_of_tol == 0 and self.n_nonfinite_mismatch == 0

    def describe(self) -> str:
        lines = [f"{self.n_out_of_tol} of {self.numel} elements outside rtol={self.rtol:g}, atol={self.atol:g} "
                 f"(max abs err {self.max_abs_err:.3g}, max rel err {self.max_rel_err:.3g}, "
                 f"worst err/tol {self.worst_ratio:.3g}); {self.n_nonfinite_mismatch} NaN/inf mismatches"]
        lines += [f"  at {idx}: actual {a!r}, expected {e!r}" for idx, a, e in self.worst]
        return "\n".join(lines)


def _overflow_to_inf(expected: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The reference as ``dtype`` represents its magnitude: values at or past the rounding boundary
    above dtype's largest finite number (max + half an ulp, e.g. 65520 for fp16) round to +-inf."""
    if not dtype.is_floating_point or dtype == torch.float64:
        return expected
    info = torch.finfo(dtype)
    boundary = info.max + info.eps * 2.0 ** math.floor(math.log2(info.max)) / 2
    return torch.where(expected.abs() >= boundary, expected.sign() * math.inf, expected)


def compare(actual: torch.Tensor, expected: torch.Tensor, *, dtype=None, rtol=None, atol=None,
            equal_nan: bool = False, n_worst: int = 8) -> Comparison:
    """Compare ``actual`` to the (float64) reference ``expected`` at the tolerance of ``dtype``
    (default: ``actual.dtype``)."""
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: actual {tuple(actual.shape)} vs expected {tuple(expected.shape)}")
    rtol, atol = tolerance(dtype or actual.dtype, rtol, atol)
    a = actual.detach().to("cpu", torch.float64)
    e = _overflow_to_inf(expected.detach().to("cpu", torch.float64), dtype or actual.dtype)
    finite = torch.isfinite(a) & torch.isfinite(e)
    same_nonfinite = (a == e) & ~finite  # the same infinity
    if equal_nan:
        same_nonfinite |= torch.isnan(a) & torch.isnan(e)
    nonfinite_mismatch = ~finite & ~same_nonfinite
    err = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    ratio = err / (atol + rtol * e.abs().where(finite, torch.zeros_like(e)))
    rel = torch.where(finite & (e.abs() >= atol), err / e.abs().clamp_min(atol), torch.zeros_like(err))
    score = ratio.where(~nonfinite_mismatch, torch.full_like(ratio, float("inf")))
    bad = (ratio > 1) | nonfinite_mismatch
    worst = []
    if bad.any():
        flat = score.reshape(-1)
        k = min(n_worst, int(bad.sum()))
        for i in flat.topk(k).indices.tolist():
            idx = tuple(torch.unravel_index(torch.tensor(i), a.shape)) if a.dim() else ()
            idx = tuple(int(j) for j in idx)
            worst.append((idx, a.reshape(-1)[i].item(), e.reshape(-1)[i].item()))
    empty = a.numel() == 0
    return Comparison(
        numel=a.numel(), rtol=rtol, atol=atol,
        max_abs_err=0.0 if empty else err.max().item(),
        max_rel_err=0.0 if empty else rel.max().item(),
        worst_ratio=0.0 if empty else ratio.max().item(),
        n_out_of_tol=int((ratio > 1).sum()), n_nonfinite_mismatch=int(nonfinite_mismatch.sum()), worst=worst)


def compare_exact(actual: torch.Tensor, expected: torch.Tensor, n_worst: int = 8) -> Comparison:
    """Bit-exact comparison of integer tensors (e.g. Philox words): every differing element fails."""
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: actual {tuple(actual.shape)} vs expected {tuple(expected.shape)}")
    a, e = actual.detach().cpu().long(), expected.detach().cpu().long()
    differ = a != e
    worst = [(tuple(int(j) for j in idx), a[tuple(idx)].item(), e[tuple(idx)].item())
             for idx in differ.nonzero()[:n_worst].tolist()]
    n_bad = int(differ.sum())
    return Comparison(numel=a.numel(), rtol=0.0, atol=0.0, max_abs_err=float((a - e).abs().max()) if a.numel() else 0.0,
                      max_rel_err=0.0, worst_ratio=float("inf") if n_bad else 0.0, n_out_of_tol=n_bad,
                      n_nonfinite_mismatch=0, worst=worst)


def assert_close(actual, expected, **kwargs) -> Comparison:
    """``compare`` and raise AssertionError listing the worst elements unless everything passes."""
    result = compare(actual, expected, **kwargs)
    if not result.ok:
        raise AssertionError(result.describe())
    return result

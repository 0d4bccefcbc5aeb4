"""Public op of the normalizing-flow family: the fused affine coupling (kernels/flows.py).

    y, logdet = fastgen.affine_coupling(x, log_scale, shift)                 # y = x exp(s) + t,  logdet = sum s
    x, logdet = fastgen.affine_coupling(y, log_scale, shift, reverse=True)   # x = (y - t) exp(-s), logdet = -sum s

Triton path: a torch.autograd.Function around one fused pass forward (the transform and the
per-sample log-det, fp32 partial sums per (row, chunk)) and one backward pass; torch path: the
reference in fastgen/reference/flows.py, differentiated by autograd.
"""
import math

import torch

from fastgen import _checks
from fastgen._alloc import empty
from fastgen.backend import resolve_backend
from fastgen.reference import flows as ref_flows


class _AffineCoupling(torch.autograd.Function):
    """(y, logdet) in one pass; backward in one pass from the kept inputs (x, s, t): exp(s) is recomputed."""

    @staticmethod
    def forward(ctx, x, log_scale, shift, reverse):
        from fastgen.kernels import flows as k_flows

        x, log_scale, shift = x.contiguous(), log_scale.contiguous(), shift.contiguous()
        n_rows, row_len = x.shape[0], math.prod(x.shape[1:])
        y = empty(x.shape, dtype=x.dtype, device=x.device)
        ctx.reverse, ctx.tiling = reverse, None
        if x.numel():
            ctx.tiling = t = k_flows.tiling(n_rows, row_len)
            partial = empty((n_rows, t.n_chunks), dtype=torch.float32, device=x.device)
            k_flows.forward(t, x, log_scale, shift, y=y, partial=partial, reverse=reverse)
            logdet = partial.sum(1).to(x.dtype)
        else:  # no elements: every per-sample sum is empty, 0
            logdet = torch.zeros(n_rows, dtype=x.dtype, device=x.device)
        ctx.save_for_backward(x, log_scale, shift if reverse else None)
        return y, logdet

    @staticmethod
    def backward(ctx, grad_y, grad_logdet):
        from fastgen.kernels import flows as k_flows

        x, log_scale, shift = ctx.saved_tensors
        need_x, need_log_scale, need_shift = ctx.needs_input_grad[:3]
        grads = {"grad_x": need_x, "grad_log_scale": need_log_scale, "grad_shift": need_shift and ctx.reverse}
        grads = {k: empty(x.shape, dtype=x.dtype, device=x.device) if need else None for k, need in grads.items()}
        if ctx.tiling is not None and any(g is not None for g in grads.values()):
            k_flows.backward(ctx.tiling, x, log_scale, x if shift is None else shift, grad_y.contiguous(),
                             grad_logdet.contiguous(), reverse=ctx.reverse, **grads)
        elif x.numel() == 0:
            grads = {k: None if g is None else torch.zeros_like(g) for k, g in grads.items()}
        grad_shift = grads["grad_shift"] if ctx.reverse else (grad_y if need_shift else None)
        return grads["grad_x"], grads["grad_log_scale"], grad_shift, None


def affine_coupling(x, log_scale, shift, *, reverse=False, backend="auto"):
    """The affine coupling of RealNVP / Glow and its per-sample log-determinant, fused.

    Forward: y = x * exp(log_scale) + shift, logdet = log_scale summed over all dims but the first.
    Reverse: x = (y - shift) * exp(-log_scale), logdet = -(that sum). ``x`` is the half that is
    transformed; log_scale and shift are s(x1), t(x1) computed by the caller's network from the
    other half (Dinh et al., arXiv 1605.08803, Eq. 7-9). Differentiable in all three; fp32 inside,
    results in x's dtype.

    Args:
        x: float32/float16/bfloat16 tensor [N, ...] with a batch dimension (a 1-d x has one element
            per sample); any strides.
        log_scale, shift: tensors of x's shape, dtype and device (no broadcasting).
        reverse: bool; True applies the inverse.
        backend: "auto", "triton", "torch" or "reference" (the last two: the reference; see fastgen.backend).

    Returns:
        (y, logdet): y like x, logdet [N] in x's dtype.
    """
    _checks.float_tensor(x, "x")
    _checks.like(log_scale, "log_scale", x, "x")
    _checks.like(shift, "shift", x, "x")
    if x.dim() == 0:
        raise ValueError("x must have a batch dimension (logdet is per sample), got a 0-d tensor")
    if not isinstance(reverse, bool):
        raise TypeError(f"reverse must be a bool, got {type(reverse).__name__} {reverse!r}")
    backend = resolve_backend(backend, x.device)
    if backend != "triton":  # "torch" and "reference": the reference is this op's torch path
        coupling = ref_flows.affine_coupling_inverse if reverse else ref_flows.affine_coupling
        return coupling(x, log_scale, shift)
    return _AffineCoupling.apply(x, log_scale, shift, reverse)

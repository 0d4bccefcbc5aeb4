"""Public op of the normalizing-flow family: the fused affine coupling (kernels/flows.py).

    y, logdet = fastgen.affine_coupling(x, log_scale, shift)                 # y = x exp(s) + t,  logdet = sum s
    x, logdet = fastgen.affine_coupling(y, log_scale, shift, reverse=True)   # x = (y - t) exp(-s), logdet = -sum s

A torch custom op (``torch.ops.fastgen.affine_coupling``) that torch.compile traces without a graph
break. Triton path: one fused pass forward (the transform and the per-sample log-det, fp32 partial
sums per (row, chunk)) and one backward pass (the custom op ``fastgen::affine_coupling_backward``);
torch path: the reference in fastgen/reference/flows.py, differentiated by autograd.
"""
import math

import torch

from fastgen import _checks
from fastgen._alloc import empty
from fastgen.ops._library import kernel_op
from fastgen.backend import resolve_backend
from fastgen.ops._autograd import reference_grads, scattered
from fastgen.reference import flows as ref_flows


def _torch_affine_coupling(x, log_scale, shift, reverse):
    coupling = ref_flows.affine_coupling_inverse if reverse else ref_flows.affine_coupling
    return coupling(x, log_scale, shift)


@kernel_op("fastgen::affine_coupling")
def _affine_coupling_op(x: torch.Tensor, log_scale: torch.Tensor, shift: torch.Tensor, reverse: bool,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, logdet); Triton: one pass, fp32 partial sums of +-s per (row, chunk) added up here."""
    if backend != "triton":  # "torch" and "reference": the reference is this op's torch path
        y, logdet = _torch_affine_coupling(x, log_scale, shift, reverse)
        # a 1-d log_scale is its own per-sample sum, and an op's output must not alias an input
        return y, logdet.clone() if x.dim() == 1 and not reverse else logdet
    from fastgen.kernels import flows as k_flows

    n_rows, row_len = x.shape[0], math.prod(x.shape[1:])
    y = empty(x.shape, dtype=x.dtype, device=x.device)
    if not x.numel():  # no elements: every per-sample sum is empty, 0
        return y, torch.zeros(n_rows, dtype=x.dtype, device=x.device)
    t = k_flows.tiling(n_rows, row_len)
    partial = empty((n_rows, t.n_chunks), dtype=torch.float32, device=x.device)
    k_flows.forward(t, x.contiguous(), log_scale.contiguous(), shift.contiguous(), y=y, partial=partial,
                    reverse=reverse)
    return y, partial.sum(1).to(x.dtype)


@kernel_op("fastgen::affine_coupling_backward")
def _affine_coupling_backward_op(grad_y: torch.Tensor, grad_logdet: torch.Tensor, x: torch.Tensor,
                                 log_scale: torch.Tensor, shift: torch.Tensor, reverse: bool, need_x: bool,
                                 need_log_scale: bool, need_shift: bool) -> list[torch.Tensor]:
    """The Triton backward, one pass from the kept inputs (exp(s) recomputed): the needed ones of
    (grad_x, grad_log_scale, grad_shift) in that order; grad_shift only reversing (forward it is
    grad_y itself)."""
    from fastgen.kernels import flows as k_flows

    grads = {"grad_x": need_x, "grad_log_scale": need_log_scale, "grad_shift": need_shift and reverse}
    grads = {k: empty(x.shape, dtype=x.dtype, device=x.device) if need else None for k, need in grads.items()}
    if x.numel() and any(g is not None for g in grads.values()):
        t = k_flows.tiling(x.shape[0], math.prod(x.shape[1:]))
        k_flows.backward(t, x.contiguous(), log_scale.contiguous(), shift.contiguous(), grad_y.contiguous(),
                         grad_logdet.contiguous(), reverse=reverse, **grads)
    return [g for g in grads.values() if g is not None]


def _setup_affine_coupling(ctx, inputs, output):
    """Keeps the inputs; the Triton backward reads the shift only when reversing."""
    x, log_scale, shift, reverse, backend = inputs
    ctx.reverse, ctx.backend = reverse, backend
    ctx.save_for_backward(x, log_scale, shift if reverse or backend != "triton" else None)


def _affine_coupling_backward(ctx, grad_y, grad_logdet):
    """Forward: dx = g exp(s), ds = g x exp(s) + gl, dt = g; reverse: dy = g exp(-s),
    ds = -g (y - t) exp(-s) - gl, dt = -g exp(-s) (kernels/flows.py)."""
    inputs, needs = ctx.saved_tensors, ctx.needs_input_grad[:3]
    if ctx.backend != "triton":
        grads = reference_grads(lambda *t: _torch_affine_coupling(*t, ctx.reverse), inputs, needs,
                                (grad_y, grad_logdet))
        return (*grads, None, None)
    x, log_scale, shift = inputs
    grad_x, grad_log_scale, grad_shift = scattered(
        (needs[0], needs[1], needs[2] and ctx.reverse),
        torch.ops.fastgen.affine_coupling_backward(grad_y, grad_logdet, x, log_scale, x if shift is None else shift,
                                                   ctx.reverse, *needs))
    if not ctx.reverse and needs[2]:
        grad_shift = grad_y
    return grad_x, grad_log_scale, grad_shift, None, None


torch.library.register_autograd("fastgen::affine_coupling", _affine_coupling_backward,
                                setup_context=_setup_affine_coupling)


def affine_coupling(x, log_scale, shift, *, reverse=False, backend="auto"):
    """The affine coupling of RealNVP / Glow and its per-sample log-determinant, fused.

    Forward: y = x * exp(log_scale) + shift, logdet = log_scale summed over all dims but the first.
    Reverse: x = (y - shift) * exp(-log_scale), logdet = -(that sum). ``x`` is the half that is
    transformed; log_scale and shift are s(x1), t(x1) computed by the caller's network from the
    other half (Dinh et al., arXiv 1605.08803, Eq. 7-9). Differentiable in all three; fp32 inside,
    results in x's dtype. The custom op ``torch.ops.fastgen.affine_coupling``.

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
    return torch.ops.fastgen.affine_coupling(x, log_scale, shift, reverse, backend)

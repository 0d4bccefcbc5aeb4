"""Gaussian (VAE) ops: reparameterize, gaussian_kl, reparameterize_with_kl (kernels/gaussian.py;
fastgen/reference/gaussian.py).

Triton path: a torch.autograd.Function per op around kernels/gaussian.py (one fused pass forward,
one backward); torch path: the reference, differentiated by autograd.
"""
import math

import torch

from fastgen import _checks
from fastgen._alloc import empty
from fastgen.backend import resolve_backend
from fastgen.reference import gaussian as ref_gaussian
from fastgen.reference import random as ref_random


def _gaussian_inputs(mu, logvar):
    _checks.compute_tensor(mu, "mu")
    _checks.like(logvar, "logvar", mu, "mu")


def _noise_source(mu, seed, noise, stream, offset, backend):
    """(seed, stream, element offset, backend): the counter-based eps's coordinates, ``offset`` (in
    rows of mu) converted to the counter element of mu's first element, or (None, 0, 0) when
    ``noise`` is given, and the resolved backend. Everything is validated before a missing seed is
    drawn from torch's generator, so a rejected call leaves its state alone."""
    stream = _checks.nonneg_int(stream, "stream")
    element_offset = _checks.sample_offset(offset, mu.shape)
    if noise is None:
        backend = resolve_backend(backend, mu.device)
        return _checks.seed64(seed), stream, element_offset, backend
    if seed is not None:
        raise ValueError("seed and noise are exclusive: pass seed= to draw eps from the counter-based stream, "
                         "or noise= to read it from a tensor")
    offset = _checks.as_int(offset, "offset")
    if stream or offset:
        raise ValueError(f"stream and offset select counter-based noise; with noise= they must be 0, "
                         f"got stream={stream}, offset={offset}")
    _checks.like(noise, "noise", mu, "mu")
    return None, 0, 0, resolve_backend(backend, mu.device)


def _reference_noise(mu, seed, stream, offset):
    return ref_random.randn(mu.shape, seed=seed, stream=stream, offset=offset, device=mu.device, dtype=mu.dtype)


def _rows(shape: torch.Size):
    """(rows, row length) of a tensor read as samples along dim 0."""
    return shape[0], math.prod(shape[1:])


def _prior_operands(mu2, logvar2, shape: torch.Size):
    """The prior as the kernel reads it: contiguous flat tensors of ``period`` elements that repeat
    along mu's flat index. A prior that broadcasts only over leading dims (shape [*ones, *shape[k:]])
    keeps its size (period = prod(shape[k:])); any other broadcast is materialised (period = numel)."""
    def suffix_start(t):
        dims = (1,) * (len(shape) - t.dim()) + tuple(t.shape)
        k = len(shape)
        while k > 0 and dims[k - 1] == shape[k - 1]:
            k -= 1
        return k if all(d == 1 for d in dims[:k]) else 0

    given = [t for t in (mu2, logvar2) if t is not None]
    if not given or shape.numel() == 0:  # an empty mu launches no kernel: nothing to read
        return None, None, 0
    k = min(suffix_start(t) for t in given)
    flat = [None if t is None else t.expand(shape)[(0,) * k].contiguous().reshape(-1) for t in (mu2, logvar2)]
    return flat[0], flat[1], math.prod(shape[k:])


def _prior_grad(shape, prior_shape, dtype, device):
    """Buffer for an elementwise prior gradient: the gradient itself when the prior has mu's shape,
    else fp32, summed over the broadcast dims by ``_sum_to_prior``."""
    return empty(shape, dtype=dtype if prior_shape == shape else torch.float32, device=device)


def _sum_to_prior(grad, prior_shape, dtype):
    return grad if grad.shape == prior_shape else grad.sum_to_size(prior_shape).to(dtype)


class _Reparameterize(torch.autograd.Function):
    """z = mu + exp(logvar / 2) eps; backward: grad_mu = g, grad_logvar = g exp(logvar / 2) eps / 2,
    with eps recomputed from (seed, stream, offset) or read again from ``noise``: only logvar (and
    noise) are kept. ``offset`` here is the element offset (the counter element of mu's first
    element), as the kernels take it."""

    @staticmethod
    def forward(ctx, mu, logvar, noise, seed, stream, offset):
        from fastgen.kernels import gaussian as k_gaussian

        logvar, noise = logvar.contiguous(), None if noise is None else noise.contiguous()
        source = k_gaussian.NOISE_TILES if noise is None else k_gaussian.NOISE_TENSOR
        ctx.tiling = k_gaussian.tiling(1, mu.numel(), noise=source, offset=offset)
        ctx.seed, ctx.stream, ctx.offset = seed, stream, offset
        z = empty(mu.shape, dtype=mu.dtype, device=mu.device)
        if mu.numel():
            k_gaussian.forward(ctx.tiling, mu.contiguous(), logvar, noise=noise, seed=seed, stream=stream,
                               offset=offset, z=z)
        ctx.save_for_backward(logvar, noise)
        return z

    @staticmethod
    def backward(ctx, grad_z):
        from fastgen.kernels import gaussian as k_gaussian

        logvar, noise = ctx.saved_tensors
        _, need_logvar, need_noise = ctx.needs_input_grad[:3]
        grad_logvar = empty(logvar.shape, dtype=logvar.dtype, device=logvar.device) if need_logvar else None
        grad_noise = empty(logvar.shape, dtype=logvar.dtype, device=logvar.device) if need_noise else None
        if (need_logvar or need_noise) and logvar.numel():
            k_gaussian.backward(ctx.tiling, logvar, logvar, noise=noise, seed=ctx.seed, stream=ctx.stream,
                                offset=ctx.offset, grad_z=grad_z.contiguous(), grad_logvar=grad_logvar,
                                grad_noise=grad_noise)
        return grad_z, grad_logvar, grad_noise, None, None, None


def reparameterize(mu, logvar, *, seed=None, noise=None, stream=0, offset=0, backend="auto"):
    """The reparameterization sample z = mu + exp(logvar / 2) * eps (Kingma & Welling, Eq. 10), fused.

    eps is read from ``noise`` when given; otherwise it is generated inside the kernel, never stored,
    and equals ``fastgen.randn(mu.shape, seed=seed, stream=stream, offset=offset)``. Differentiable in
    mu, logvar (and noise); the backward recomputes eps instead of storing it.

    Args:
        mu, logvar: float32/float16/bfloat16 tensors of one shape, dtype and device (any strides).
        seed: 64-bit int; None draws one from torch's default generator. Exclusive with ``noise``.
        noise: a tensor like mu holding eps; with it, stream and offset must stay 0.
        stream: selects the counter-based noise, as in ``fastgen.randn``.
        offset: non-negative int, counted in samples (rows of mu, dim 0), as in ``fastgen.randn``:
            ``offset=k`` on rows k.. of a batch draws the eps of those rows in the whole batch's call
            (counter element k * prod(mu.shape[1:]) onwards; a 0-d or 1-d mu counts elements).
        backend: "auto", "triton", "torch" or "reference" (the last two: the reference; see fastgen.backend).
    """
    _gaussian_inputs(mu, logvar)
    seed, stream, offset, backend = _noise_source(mu, seed, noise, stream, offset, backend)
    if backend != "triton":  # "torch" and "reference": the reference is this op's torch path
        eps = _reference_noise(mu, seed, stream, offset) if noise is None else noise
        return ref_gaussian.reparameterize(mu, logvar, eps)
    return _Reparameterize.apply(mu, logvar, noise, seed, stream, offset)


class _GaussianKL(torch.autograd.Function):
    """KL(N(mu, e^logvar) || N(mu2, e^logvar2)) with a reduction, in one pass (fp32 partial sums per
    (row, chunk), added up here); backward: one pass writing the gradients that are needed."""

    @staticmethod
    def forward(ctx, mu, logvar, mu2, logvar2, reduction):
        from fastgen.kernels import gaussian as k_gaussian

        shape, n = mu.shape, mu.numel()
        mu_c, logvar_c = mu.contiguous(), logvar.contiguous()
        mu2_flat, logvar2_flat, period = _prior_operands(mu2, logvar2, shape)
        n_rows, row_len = _rows(shape) if reduction == "per_sample" else (1, n)
        t = k_gaussian.tiling(n_rows, row_len)
        launch = dict(mu2=mu2_flat, logvar2=logvar2_flat, prior_period=period)
        if reduction == "none":
            out = empty(shape, dtype=mu.dtype, device=mu.device)
            if n:
                k_gaussian.forward(t, mu_c, logvar_c, kl=out, **launch)
        else:
            partial = empty((n_rows, t.n_chunks), dtype=torch.float32, device=mu.device)
            if n:
                k_gaussian.forward(t, mu_c, logvar_c, partial=partial, **launch)
            out = partial.sum(1) if reduction == "per_sample" else partial.sum()
            if reduction == "batchmean":
                out = out / shape[0]
            out = out.to(mu.dtype)
        ctx.tiling, ctx.reduction, ctx.prior_period = t, reduction, period
        ctx.prior_shapes = [None if p is None else p.shape for p in (mu2, logvar2)]
        ctx.save_for_backward(mu_c, logvar_c, mu2_flat, logvar2_flat)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from fastgen.kernels import gaussian as k_gaussian

        mu, logvar, mu2_flat, logvar2_flat = ctx.saved_tensors
        need_mu, need_logvar, need_mu2, need_logvar2 = ctx.needs_input_grad[:4]
        shape, dtype, device = mu.shape, mu.dtype, mu.device
        grads = {
            "grad_mu": empty(shape, dtype=dtype, device=device) if need_mu else None,
            "grad_logvar": empty(shape, dtype=dtype, device=device) if need_logvar else None,
            "grad_mu2": _prior_grad(shape, ctx.prior_shapes[0], dtype, device) if need_mu2 else None,
            "grad_logvar2": _prior_grad(shape, ctx.prior_shapes[1], dtype, device) if need_logvar2 else None,
        }
        mode = {"none": k_gaussian.GRAD_KL_ELEMENTWISE, "per_sample": k_gaussian.GRAD_KL_PER_ROW}.get(
            ctx.reduction, k_gaussian.GRAD_KL_SCALAR)
        scale = 1.0 / shape[0] if ctx.reduction == "batchmean" and shape[0] else 1.0  # B = 0: no element to scale
        if mu.numel() and any(g is not None for g in grads.values()):
            k_gaussian.backward(ctx.tiling, mu, logvar, mu2=mu2_flat, logvar2=logvar2_flat,
                                prior_period=ctx.prior_period, grad_kl=grad_out.contiguous(),
                                grad_kl_mode=mode.value, kl_scale=scale, **grads)
        grad_mu2, grad_logvar2 = grads["grad_mu2"], grads["grad_logvar2"]
        if grad_mu2 is not None:
            grad_mu2 = _sum_to_prior(grad_mu2, ctx.prior_shapes[0], dtype)
        if grad_logvar2 is not None:
            grad_logvar2 = _sum_to_prior(grad_logvar2, ctx.prior_shapes[1], dtype)
        return grads["grad_mu"], grads["grad_logvar"], grad_mu2, grad_logvar2, None


def gaussian_kl(mu, logvar, mu2=None, logvar2=None, *, reduction="per_sample", backend="auto"):
    """KL(N(mu, diag(exp(logvar))) || N(mu2, diag(exp(logvar2)))) of diagonal Gaussians, fused.

    Elementwise 1/2 (logvar2 - logvar + (exp(logvar) + (mu - mu2)^2) / exp(logvar2) - 1); mu2 and
    logvar2 default to the standard normal's 0 (Kingma & Welling, Appendix B). One pass over the
    inputs, fp32 accumulation, gradients for all four inputs.

    Args:
        mu, logvar: float32/float16/bfloat16 tensors of one shape, dtype and device.
        mu2, logvar2: None or tensors of mu's dtype and device that broadcast to mu's shape without
            changing it (e.g. mu.shape, mu.shape[1:] for a prior shared over the batch, or ()).
        reduction: "none" (elementwise, mu's shape), "per_sample" (sum over all dims but the first,
            shape [B]), "sum" (a scalar) or "batchmean" (the sum / B). Results have mu's dtype.
        backend: "auto", "triton", "torch" or "reference" (the last two: the reference; see fastgen.backend).
    """
    _gaussian_inputs(mu, logvar)
    for t, name in ((mu2, "mu2"), (logvar2, "logvar2")):
        if t is not None:
            _checks.like(t, name, mu, "mu", shape=False)
            ref_gaussian.check_prior(t, name, mu.shape)
    if not isinstance(reduction, str) or reduction not in ref_gaussian.REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, ref_gaussian.REDUCTIONS))}, "
                         f"got {reduction!r}")
    if reduction in ("per_sample", "batchmean") and mu.dim() == 0:
        raise ValueError(f"reduction={reduction!r} needs mu with a batch dimension, got a 0-d tensor")
    backend = resolve_backend(backend, mu.device)
    if backend != "triton":  # "torch" and "reference": the reference is this op's torch path
        return ref_gaussian.reduce(ref_gaussian.gaussian_kl(mu, logvar, mu2, logvar2), reduction)
    return _GaussianKL.apply(mu, logvar, mu2, logvar2, reduction)


class _ReparameterizeWithKL(torch.autograd.Function):
    """(z, KL to N(0, I) per sample) in one pass over mu and logvar; backward in one pass:
    grad_mu = gz + gk mu, grad_logvar = gz exp(logvar / 2) eps / 2 + gk (exp(logvar) - 1) / 2.
    ``offset``: the element offset, as in _Reparameterize."""

    @staticmethod
    def forward(ctx, mu, logvar, noise, seed, stream, offset):
        from fastgen.kernels import gaussian as k_gaussian

        mu, logvar, noise = mu.contiguous(), logvar.contiguous(), None if noise is None else noise.contiguous()
        source = k_gaussian.NOISE_TILES if noise is None else k_gaussian.NOISE_TENSOR
        ctx.tiling = t = k_gaussian.tiling(*_rows(mu.shape), noise=source, offset=offset)
        ctx.seed, ctx.stream, ctx.offset = seed, stream, offset
        z = empty(mu.shape, dtype=mu.dtype, device=mu.device)
        partial = empty((t.n_rows, t.n_chunks), dtype=torch.float32, device=mu.device)
        if mu.numel():
            k_gaussian.forward(t, mu, logvar, noise=noise, seed=seed, stream=stream, offset=offset, z=z,
                               partial=partial)
        ctx.save_for_backward(mu, logvar, noise)
        ctx.set_materialize_grads(False)
        return z, partial.sum(1).to(mu.dtype)

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        from fastgen.kernels import gaussian as k_gaussian

        mu, logvar, noise = ctx.saved_tensors
        need_mu, need_logvar, need_noise = ctx.needs_input_grad[:3]
        if grad_kl is None:  # z alone carries a gradient: grad_mu is grad_z itself
            if grad_z is None:
                return None, None, None, None, None, None
            need_mu, grad_mu = False, grad_z
        like = dict(dtype=mu.dtype, device=mu.device)
        grads = dict(grad_mu=empty(mu.shape, **like) if need_mu else None,
                     grad_logvar=empty(mu.shape, **like) if need_logvar else None,
                     grad_noise=empty(mu.shape, **like) if need_noise and grad_z is not None else None)
        if mu.numel() and any(g is not None for g in grads.values()):
            k_gaussian.backward(ctx.tiling, mu, logvar, noise=noise, seed=ctx.seed, stream=ctx.stream,
                                offset=ctx.offset, grad_z=None if grad_z is None else grad_z.contiguous(),
                                grad_kl=None if grad_kl is None else grad_kl.contiguous(),
                                grad_kl_mode=k_gaussian.GRAD_KL_PER_ROW.value, **grads)
        if grad_kl is not None:
            grad_mu = grads["grad_mu"]
        # without grad_z, grad_noise stays None: the KL does not depend on the noise
        return grad_mu, grads["grad_logvar"], grads["grad_noise"], None, None, None


def reparameterize_with_kl(mu, logvar, *, seed=None, noise=None, stream=0, offset=0, backend="auto"):
    """``(z, kl)``: the reparameterization sample z = mu + exp(logvar / 2) * eps and the KL to the
    standard normal summed per sample (shape [B]), in ONE pass over mu and logvar: the two Gaussian
    terms of the VAE's ELBO (Kingma & Welling, Eq. 10). Arguments as in ``reparameterize`` (offset
    counted in samples, rows of mu); mu needs a batch dimension. Differentiable in mu, logvar (and
    noise) through both outputs."""
    _gaussian_inputs(mu, logvar)
    if mu.dim() == 0:
        raise ValueError("mu must have a batch dimension (the KL is summed per sample), got a 0-d tensor")
    seed, stream, offset, backend = _noise_source(mu, seed, noise, stream, offset, backend)
    if backend != "triton":  # "torch" and "reference": the reference is this op's torch path
        eps = _reference_noise(mu, seed, stream, offset) if noise is None else noise
        return ref_gaussian.reparameterize_with_kl(mu, logvar, eps)
    return _ReparameterizeWithKL.apply(mu, logvar, noise, seed, stream, offset)

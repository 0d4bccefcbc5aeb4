"""Gaussian (VAE) ops: reparameterize, gaussian_kl, reparameterize_with_kl (kernels/gaussian.py;
fastgen/reference/gaussian.py).

Each is a torch custom op (``torch.ops.fastgen.<name>``) that torch.compile traces without a graph
break. Triton path: one fused pass of kernels/gaussian.py forward and one backward (the custom ops
``fastgen::reparameterize_backward``, shared with reparameterize_with_kl, and
``fastgen::gaussian_kl_backward``); torch path: the reference, differentiated by autograd.
Offsets inside the custom ops are element offsets (the counter element of mu's first element), as
the kernels take them; the public ops count samples.
"""
import math
from typing import Optional

import torch

from fastgen import _checks
from fastgen._alloc import empty
from fastgen.ops._library import kernel_op
from fastgen.backend import resolve_backend
from fastgen.ops._autograd import reference_grads, scattered
from fastgen.ops.random import seed_of, seed_operands
from fastgen.reference import gaussian as ref_gaussian
from fastgen.reference import random as ref_random


def _gaussian_inputs(mu, logvar):
    _checks.compute_tensor(mu, "mu")
    _checks.like(logvar, "logvar", mu, "mu")


def _noise_source(mu, seed, noise, stream, offset, backend):
    """(seed, seed_bits, stream, element offset, backend): the counter-based eps's coordinates
    (seed as ``random.seed_operands`` gives it), ``offset`` (in rows of mu) converted to the counter
    element of mu's first element, or (0, None, 0, 0) when ``noise`` is given, and the resolved
    backend. Everything is validated before a missing seed is drawn from torch's generator, so a
    rejected call leaves its state alone."""
    stream = _checks.nonneg_int(stream, "stream")
    element_offset = _checks.sample_offset(offset, mu.shape)
    if noise is None:
        backend = resolve_backend(backend, mu.device)
        return (*seed_operands(seed, backend), stream, element_offset, backend)
    if seed is not None:
        raise ValueError("seed and noise are exclusive: pass seed= to draw eps from the counter-based stream, "
                         "or noise= to read it from a tensor")
    offset = _checks.as_int(offset, "offset")
    if stream or offset:
        raise ValueError(f"stream and offset select counter-based noise; with noise= they must be 0, "
                         f"got stream={stream}, offset={offset}")
    _checks.like(noise, "noise", mu, "mu")
    return 0, None, 0, 0, resolve_backend(backend, mu.device)


def _reference_eps(mu, noise, seed, seed_bits, stream, offset):
    """The torch path's eps: ``noise`` when given, else the counter-based draw like mu."""
    if noise is not None:
        return noise
    return ref_random.randn(mu.shape, seed=seed_of(seed, seed_bits), stream=stream, offset=offset, device=mu.device,
                            dtype=mu.dtype)


def _rows(shape: torch.Size):
    """(rows, row length) of a tensor read as samples along dim 0."""
    return shape[0], math.prod(shape[1:])


def _sample_tiling(shape, noise, offset: int, *, per_row: bool):
    """The kernels' tiling of a sample z like ``shape`` (eps from ``noise`` or the counter): one flat
    row, or a row per sample where a per-sample KL is summed or read."""
    from fastgen.kernels import gaussian as k_gaussian

    source = k_gaussian.NOISE_TILES if noise is None else k_gaussian.NOISE_TENSOR
    rows = _rows(shape) if per_row else (1, math.prod(shape))
    return k_gaussian.tiling(*rows, noise=source, offset=offset)


def _kl_tiling(shape, reduction: str):
    """The kernels' tiling of a KL: a row per sample for "per_sample", else one flat row."""
    from fastgen.kernels import gaussian as k_gaussian

    return k_gaussian.tiling(*(_rows(shape) if reduction == "per_sample" else (1, math.prod(shape))))


def _contiguous(t):
    return None if t is None else t.contiguous()


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


# --- reparameterize --------------------------------------------------------------------------------

def _torch_reparameterize(mu, logvar, noise, seed, seed_bits, stream, offset):
    return ref_gaussian.reparameterize(mu, logvar, _reference_eps(mu, noise, seed, seed_bits, stream, offset))


@kernel_op("fastgen::reparameterize")
def _reparameterize_op(mu: torch.Tensor, logvar: torch.Tensor, noise: Optional[torch.Tensor], seed: int,
                       seed_bits: Optional[torch.Tensor], stream: int, offset: int, backend: str) -> torch.Tensor:
    """z = mu + exp(logvar / 2) eps, eps from ``noise`` or counter element ``offset`` on (elements);
    ``seed``/``seed_bits`` as in ``torch.ops.fastgen.randn``."""
    if backend != "triton":  # "torch" and "reference": the reference is this op's torch path
        return _torch_reparameterize(mu, logvar, noise, seed, seed_bits, stream, offset)
    from fastgen.kernels import gaussian as k_gaussian

    z = empty(mu.shape, dtype=mu.dtype, device=mu.device)
    if mu.numel():
        k_gaussian.forward(_sample_tiling(mu.shape, noise, offset, per_row=False), mu.contiguous(),
                           logvar.contiguous(), noise=_contiguous(noise), seed=seed, stream=stream, offset=offset, z=z)
    return z


@kernel_op("fastgen::reparameterize_backward")
def _reparameterize_backward_op(grad_z: Optional[torch.Tensor], grad_kl: Optional[torch.Tensor], mu: torch.Tensor,
                                logvar: torch.Tensor, noise: Optional[torch.Tensor], seed: int, stream: int,
                                offset: int, need_mu: bool, need_logvar: bool, need_noise: bool) -> list[torch.Tensor]:
    """The Triton backward of z = mu + s eps (s = exp(logvar / 2)) and of the per-sample KL to N(0, I)
    (when ``grad_kl`` is given), in one pass recomputing eps: the needed ones of

        grad_mu = gz + gk mu,   grad_logvar = gz s eps / 2 + gk (exp(logvar) - 1) / 2,   grad_noise = gz s

    in that order (mu is read only for the KL's gradient)."""
    from fastgen.kernels import gaussian as k_gaussian

    like = dict(dtype=logvar.dtype, device=logvar.device)
    grads = dict(grad_mu=empty(logvar.shape, **like) if need_mu else None,
                 grad_logvar=empty(logvar.shape, **like) if need_logvar else None,
                 grad_noise=empty(logvar.shape, **like) if need_noise else None)
    if logvar.numel() and any(g is not None for g in grads.values()):
        tiling = _sample_tiling(logvar.shape, noise, offset, per_row=grad_kl is not None)
        k_gaussian.backward(tiling, mu.contiguous(), logvar.contiguous(), noise=_contiguous(noise), seed=seed,
                            stream=stream, offset=offset, grad_z=_contiguous(grad_z), grad_kl=_contiguous(grad_kl),
                            grad_kl_mode=k_gaussian.GRAD_KL_PER_ROW.value, **grads)
    return [g for g in grads.values() if g is not None]


def _setup_reparameterize(ctx, inputs, output):
    """Keeps what the backward recomputes eps from: logvar, noise or (seed, stream, offset); mu too
    on the torch path (its backward reruns the reference)."""
    mu, logvar, noise, seed, seed_bits, stream, offset, backend = inputs
    ctx.seed, ctx.stream, ctx.offset, ctx.backend = seed, stream, offset, backend
    ctx.save_for_backward(None if backend == "triton" else mu, logvar, noise, seed_bits)


def _reparameterize_backward(ctx, grad_z):
    """grad_mu = g, grad_logvar = g exp(logvar / 2) eps / 2, grad_noise = g exp(logvar / 2)."""
    mu, logvar, noise, seed_bits = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    if ctx.backend != "triton":
        grads = reference_grads(
            lambda m, lv, e: _torch_reparameterize(m, lv, e, ctx.seed, seed_bits, ctx.stream, ctx.offset),
            (mu, logvar, noise), needs, grad_z)
        return (*grads, None, None, None, None, None)
    grad_logvar, grad_noise = scattered(needs[1:], torch.ops.fastgen.reparameterize_backward(
        grad_z, None, logvar, logvar, noise, ctx.seed, ctx.stream, ctx.offset, False, *needs[1:]))
    return grad_z, grad_logvar, grad_noise, None, None, None, None, None


torch.library.register_autograd("fastgen::reparameterize", _reparameterize_backward,
                                setup_context=_setup_reparameterize)


def reparameterize(mu, logvar, *, seed=None, noise=None, stream=0, offset=0, backend="auto"):
    """The reparameterization sample z = mu + exp(logvar / 2) * eps (Kingma & Welling, Eq. 10), fused.

    eps is read from ``noise`` when given; otherwise it is generated inside the kernel, never stored,
    and equals ``fastgen.randn(mu.shape, seed=seed, stream=stream, offset=offset)``. Differentiable in
    mu, logvar (and noise); the backward recomputes eps instead of storing it. The custom op
    ``torch.ops.fastgen.reparameterize``; under torch.compile, pass an int seed (or noise) on the
    Triton path (see ``fastgen.randn``).

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
    seed, seed_bits, stream, offset, backend = _noise_source(mu, seed, noise, stream, offset, backend)
    return torch.ops.fastgen.reparameterize(mu, logvar, noise, seed, seed_bits, stream, offset, backend)


# --- gaussian_kl -----------------------------------------------------------------------------------

def _torch_gaussian_kl(mu, logvar, mu2, logvar2, reduction):
    return ref_gaussian.reduce(ref_gaussian.gaussian_kl(mu, logvar, mu2, logvar2), reduction)


@kernel_op("fastgen::gaussian_kl")
def _gaussian_kl_op(mu: torch.Tensor, logvar: torch.Tensor, mu2: Optional[torch.Tensor],
                    logvar2: Optional[torch.Tensor], reduction: str, backend: str) -> torch.Tensor:
    """KL(N(mu, e^logvar) || N(mu2, e^logvar2)) with a reduction; Triton: one pass, fp32 partial
    sums per (row, chunk) added up here."""
    if backend != "triton":  # "torch" and "reference": the reference is this op's torch path
        return _torch_gaussian_kl(mu, logvar, mu2, logvar2, reduction)
    from fastgen.kernels import gaussian as k_gaussian

    shape, n = mu.shape, mu.numel()
    mu2_flat, logvar2_flat, period = _prior_operands(mu2, logvar2, shape)
    t = _kl_tiling(shape, reduction)
    operands = dict(mu2=mu2_flat, logvar2=logvar2_flat, prior_period=period)
    if reduction == "none":
        out = empty(shape, dtype=mu.dtype, device=mu.device)
        if n:
            k_gaussian.forward(t, mu.contiguous(), logvar.contiguous(), kl=out, **operands)
        return out
    partial = empty((t.n_rows, t.n_chunks), dtype=torch.float32, device=mu.device)
    if n:
        k_gaussian.forward(t, mu.contiguous(), logvar.contiguous(), partial=partial, **operands)
    out = partial.sum(1) if reduction == "per_sample" else partial.sum()
    if reduction == "batchmean":
        out = out / shape[0]
    return out.to(mu.dtype)


@kernel_op("fastgen::gaussian_kl_backward")
def _gaussian_kl_backward_op(grad_out: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                             mu2: Optional[torch.Tensor], logvar2: Optional[torch.Tensor], reduction: str,
                             need_mu: bool, need_logvar: bool, need_mu2: bool,
                             need_logvar2: bool) -> list[torch.Tensor]:
    """The Triton backward of ``gaussian_kl``, one pass: the needed ones of (grad_mu, grad_logvar,
    grad_mu2, grad_logvar2) in that order, prior gradients summed to the prior's shape."""
    from fastgen.kernels import gaussian as k_gaussian

    shape, dtype, device = mu.shape, mu.dtype, mu.device
    prior_shapes = [None if p is None else p.shape for p in (mu2, logvar2)]
    grads = {
        "grad_mu": empty(shape, dtype=dtype, device=device) if need_mu else None,
        "grad_logvar": empty(shape, dtype=dtype, device=device) if need_logvar else None,
        "grad_mu2": _prior_grad(shape, prior_shapes[0], dtype, device) if need_mu2 else None,
        "grad_logvar2": _prior_grad(shape, prior_shapes[1], dtype, device) if need_logvar2 else None,
    }
    mode = {"none": k_gaussian.GRAD_KL_ELEMENTWISE, "per_sample": k_gaussian.GRAD_KL_PER_ROW}.get(
        reduction, k_gaussian.GRAD_KL_SCALAR)
    scale = 1.0 / shape[0] if reduction == "batchmean" and shape[0] else 1.0  # B = 0: no element to scale
    if mu.numel() and any(g is not None for g in grads.values()):
        mu2_flat, logvar2_flat, period = _prior_operands(mu2, logvar2, shape)
        k_gaussian.backward(_kl_tiling(shape, reduction), mu.contiguous(), logvar.contiguous(), mu2=mu2_flat,
                            logvar2=logvar2_flat, prior_period=period, grad_kl=grad_out.contiguous(),
                            grad_kl_mode=mode.value, kl_scale=scale, **grads)
    for key, prior_shape in zip(("grad_mu2", "grad_logvar2"), prior_shapes):
        if grads[key] is not None:
            grads[key] = _sum_to_prior(grads[key], prior_shape, dtype)
    return [g for g in grads.values() if g is not None]


def _setup_gaussian_kl(ctx, inputs, output):
    mu, logvar, mu2, logvar2, reduction, backend = inputs
    ctx.reduction, ctx.backend = reduction, backend
    ctx.save_for_backward(mu, logvar, mu2, logvar2)


def _gaussian_kl_backward(ctx, grad_out):
    inputs, needs = ctx.saved_tensors, ctx.needs_input_grad[:4]
    if ctx.backend != "triton":
        grads = reference_grads(lambda *t: _torch_gaussian_kl(*t, ctx.reduction), inputs, needs, grad_out)
    else:
        grads = scattered(needs, torch.ops.fastgen.gaussian_kl_backward(grad_out, *inputs, ctx.reduction, *needs))
    return (*grads, None, None)


torch.library.register_autograd("fastgen::gaussian_kl", _gaussian_kl_backward, setup_context=_setup_gaussian_kl)


def gaussian_kl(mu, logvar, mu2=None, logvar2=None, *, reduction="per_sample", backend="auto"):
    """KL(N(mu, diag(exp(logvar))) || N(mu2, diag(exp(logvar2)))) of diagonal Gaussians, fused.

    Elementwise 1/2 (logvar2 - logvar + (exp(logvar) + (mu - mu2)^2) / exp(logvar2) - 1); mu2 and
    logvar2 default to the standard normal's 0 (Kingma & Welling, Appendix B). One pass over the
    inputs, fp32 accumulation, gradients for all four inputs. The custom op
    ``torch.ops.fastgen.gaussian_kl``.

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
    return torch.ops.fastgen.gaussian_kl(mu, logvar, mu2, logvar2, reduction, backend)


# --- reparameterize_with_kl ------------------------------------------------------------------------

def _torch_reparameterize_with_kl(mu, logvar, noise, seed, seed_bits, stream, offset):
    eps = _reference_eps(mu, noise, seed, seed_bits, stream, offset)
    return ref_gaussian.reparameterize_with_kl(mu, logvar, eps)


@kernel_op("fastgen::reparameterize_with_kl")
def _reparameterize_with_kl_op(mu: torch.Tensor, logvar: torch.Tensor, noise: Optional[torch.Tensor], seed: int,
                               seed_bits: Optional[torch.Tensor], stream: int,
                               offset: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, KL to N(0, I) per sample) in one pass over mu and logvar; arguments as in
    ``torch.ops.fastgen.reparameterize``."""
    if backend != "triton":  # "torch" and "reference": the reference is this op's torch path
        return _torch_reparameterize_with_kl(mu, logvar, noise, seed, seed_bits, stream, offset)
    from fastgen.kernels import gaussian as k_gaussian

    t = _sample_tiling(mu.shape, noise, offset, per_row=True)
    z = empty(mu.shape, dtype=mu.dtype, device=mu.device)
    partial = empty((t.n_rows, t.n_chunks), dtype=torch.float32, device=mu.device)
    if mu.numel():
        k_gaussian.forward(t, mu.contiguous(), logvar.contiguous(), noise=_contiguous(noise), seed=seed, stream=stream,
                           offset=offset, z=z, partial=partial)
    return z, partial.sum(1).to(mu.dtype)


def _setup_reparameterize_with_kl(ctx, inputs, output):
    """Keeps mu, logvar, noise and eps's coordinates; an unused output's gradient stays None."""
    mu, logvar, noise, seed, seed_bits, stream, offset, backend = inputs
    ctx.seed, ctx.stream, ctx.offset, ctx.backend = seed, stream, offset, backend
    ctx.save_for_backward(mu, logvar, noise, seed_bits)
    ctx.set_materialize_grads(False)


def _reparameterize_with_kl_backward(ctx, grad_z, grad_kl):
    """grad_mu = gz + gk mu, grad_logvar = gz exp(logvar / 2) eps / 2 + gk (exp(logvar) - 1) / 2,
    grad_noise = gz exp(logvar / 2); an output without a gradient adds nothing."""
    mu, logvar, noise, seed_bits = ctx.saved_tensors
    need_mu, need_logvar, need_noise = needs = ctx.needs_input_grad[:3]
    if ctx.backend != "triton":
        grads = reference_grads(
            lambda m, lv, e: _torch_reparameterize_with_kl(m, lv, e, ctx.seed, seed_bits, ctx.stream, ctx.offset),
            (mu, logvar, noise), needs, (grad_z, grad_kl))
        return (*grads, None, None, None, None, None)
    if grad_kl is None:  # z alone carries a gradient: grad_mu is grad_z itself
        if grad_z is None:
            return (None,) * 8
        need_mu = False
    need_noise = need_noise and grad_z is not None  # the KL does not depend on the noise
    grad_mu, grad_logvar, grad_noise = scattered((need_mu, need_logvar, need_noise),
                                                 torch.ops.fastgen.reparameterize_backward(
                                                     grad_z, grad_kl, mu, logvar, noise, ctx.seed, ctx.stream,
                                                     ctx.offset, need_mu, need_logvar, need_noise))
    if grad_kl is None:
        grad_mu = grad_z
    return grad_mu, grad_logvar, grad_noise, None, None, None, None, None


torch.library.register_autograd("fastgen::reparameterize_with_kl", _reparameterize_with_kl_backward,
                                setup_context=_setup_reparameterize_with_kl)


def reparameterize_with_kl(mu, logvar, *, seed=None, noise=None, stream=0, offset=0, backend="auto"):
    """``(z, kl)``: the reparameterization sample z = mu + exp(logvar / 2) * eps and the KL to the
    standard normal summed per sample (shape [B]), in ONE pass over mu and logvar: the two Gaussian
    terms of the VAE's ELBO (Kingma & Welling, Eq. 10). Arguments as in ``reparameterize`` (offset
    counted in samples, rows of mu); mu needs a batch dimension. Differentiable in mu, logvar (and
    noise) through both outputs. The custom op ``torch.ops.fastgen.reparameterize_with_kl``."""
    _gaussian_inputs(mu, logvar)
    if mu.dim() == 0:
        raise ValueError("mu must have a batch dimension (the KL is summed per sample), got a 0-d tensor")
    seed, seed_bits, stream, offset, backend = _noise_source(mu, seed, noise, stream, offset, backend)
    return torch.ops.fastgen.reparameterize_with_kl(mu, logvar, noise, seed, seed_bits, stream, offset, backend)

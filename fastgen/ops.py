"""Public functional ops: validate arguments, pick the backend, call the kernel or the reference.

This module is the one place that calls into ``fastgen.kernels``; kernels are imported on first
use so ``import fastgen`` works without triton and TRITON_INTERPRET may be set after it.
"""
import math
import numbers

import torch

from fastgen import _checks
from fastgen._alloc import empty
from fastgen.backend import resolve_backend
from fastgen.reference import random as ref_random
from fastgen.reference import latents as ref_latents
from fastgen.reference import gaussian as ref_gaussian


def randn(shape, *, seed=None, stream=0, offset=0, device=None, dtype=torch.float32, backend="auto"):
    """Standard normals from the counter-based stream: element i (row-major) is a pure function of
    (seed, stream, offset + i), identical across backends, devices, block sizes and batch splits.

    Args:
        shape: int or sequence of non-negative ints.
        seed: 64-bit int; None draws one from torch's default generator (torch.manual_seed governs it).
        stream: non-negative int separating independent uses of one seed (e.g. the sampling step).
        offset: non-negative int; ``offset=k*n`` reproduces rows k.. of a larger draw with rows of n elements.
        dtype: torch.float32, torch.float16 or torch.bfloat16 (computed in fp32, rounded once).
        backend: "auto", "triton" or "torch" (see fastgen.backend).
    """
    shape = _checks.shape(shape)
    stream = _checks.nonneg_int(stream, "stream")
    offset = _checks.nonneg_int(offset, "offset", limit=_checks.INT64_MAX - shape.numel())
    dtype = _checks.float_dtype(dtype)
    device = _checks.compute_device(device)
    backend = resolve_backend(backend, device)
    seed = _checks.seed64(seed)
    if backend == "torch":
        return ref_random.randn(shape, seed=seed, stream=stream, offset=offset, device=device, dtype=dtype)
    from fastgen.kernels import random as k_random

    out = empty(shape, dtype=dtype, device=device)
    if out.numel():
        k_random.randn(out, seed, stream, offset)
    return out


def _truncation(psi):
    """None, or the truncation threshold as a finite positive float."""
    if psi is None:
        return None
    if isinstance(psi, bool) or not isinstance(psi, numbers.Real):
        raise TypeError(f"truncation must be None or a real number, got {type(psi).__name__} {psi!r}")
    psi = float(psi)
    if not math.isfinite(psi) or psi <= 0.0:
        raise ValueError(f"truncation must be a finite number > 0 (the threshold psi of |z| <= psi), got {psi}")
    return psi


def latents(n, dim, *, seed=None, offset=0, truncation=None, dtype=torch.float32, device=None, backend="auto"):
    """An [n, dim] batch of GAN latents from the counter-based noise; sample k is identical however
    the batch is split (element (r, c) is counter element (offset + r) * dim + c).

    Without truncation this is ``randn((n, dim), seed=seed, offset=offset * dim)`` exactly. With
    ``truncation=psi`` (BigGAN's truncation trick) every coordinate is a standard normal truncated to
    [-psi, psi], sampled exactly by the inverse CDF (never by clamping); see fastgen/reference/latents.py.

    Args:
        n: number of samples; dim: latent size (non-negative ints).
        seed: 64-bit int; None draws one from torch's default generator.
        offset: non-negative int, counted in samples: ``offset=k`` gives samples k .. k + n - 1.
        truncation: None, or psi > 0 (finite).
        dtype: torch.float32, torch.float16 or torch.bfloat16 (computed in fp32, rounded once).
        backend: "auto", "triton" or "torch" (see fastgen.backend).
    """
    n = _checks.nonneg_int(n, "n")
    dim = _checks.nonneg_int(dim, "dim")
    if n * dim > _checks.INT64_MAX:
        raise ValueError(f"n * dim must be at most {_checks.INT64_MAX}, got {n} * {dim}")
    offset = _checks.nonneg_int(offset, "offset", limit=_checks.INT64_MAX // max(dim, 1) - n)
    psi = _truncation(truncation)
    dtype = _checks.float_dtype(dtype)
    device = _checks.compute_device(device)
    backend = resolve_backend(backend, device)
    seed = _checks.seed64(seed)
    if backend == "torch":
        return ref_latents.latents(n, dim, seed=seed, offset=offset, truncation=psi, dtype=dtype, device=device)
    from fastgen.kernels import latents as k_latents, random as k_random

    out = empty((n, dim), dtype=dtype, device=device)
    if out.numel() == 0:
        return out
    if psi is None:
        return k_random.randn(out, seed, 0, offset * dim)
    erf_psi, erfc_psi = math.erf(psi / math.sqrt(2.0)), math.erfc(psi / math.sqrt(2.0))
    bound = ref_latents.largest_at_most(psi, dtype)
    return k_latents.truncated_latents(out, seed, ref_latents.TRUNCATED_STREAM, offset * dim, erf_psi, erfc_psi, bound)
# --- Gaussian (VAE): reparameterize, gaussian_kl, reparameterize_with_kl ---------------------------
# Triton path: a torch.autograd.Function per op around kernels/gaussian.py (one fused pass forward,
# one backward); torch path: fastgen/reference/gaussian.py, differentiated by autograd.

def _gaussian_inputs(mu, logvar):
    _checks.compute_tensor(mu, "mu")
    _checks.like(logvar, "logvar", mu, "mu")


def _noise_source(mu, seed, noise, stream, offset, backend):
    """(seed, stream, offset, backend): the counter-based eps's coordinates, or (None, 0, 0) when
    ``noise`` is given, and the resolved backend. Everything is validated before a missing seed is
    drawn from torch's generator, so a rejected call leaves its state alone."""
    stream = _checks.nonneg_int(stream, "stream")
    offset = _checks.nonneg_int(offset, "offset", limit=_checks.INT64_MAX - mu.numel())
    if noise is None:
        backend = resolve_backend(backend, mu.device)
        return _checks.seed64(seed), stream, offset, backend
    if seed is not None:
        raise ValueError("seed and noise are exclusive: pass seed= to draw eps from the counter-based stream, "
                         "or noise= to read it from a tensor")
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
    noise) are kept."""

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
        stream, offset: select the counter-based noise, as in ``fastgen.randn``.
        backend: "auto", "triton" or "torch" (see fastgen.backend).
    """
    _gaussian_inputs(mu, logvar)
    seed, stream, offset, backend = _noise_source(mu, seed, noise, stream, offset, backend)
    if backend == "torch":
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
        backend: "auto", "triton" or "torch" (see fastgen.backend).
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
    if backend == "torch":
        return ref_gaussian.reduce(ref_gaussian.gaussian_kl(mu, logvar, mu2, logvar2), reduction)
    return _GaussianKL.apply(mu, logvar, mu2, logvar2, reduction)


class _ReparameterizeWithKL(torch.autograd.Function):
    """(z, KL to N(0, I) per sample) in one pass over mu and logvar; backward in one pass:
    grad_mu = gz + gk mu, grad_logvar = gz exp(logvar / 2) eps / 2 + gk (exp(logvar) - 1) / 2."""

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
    terms of the VAE's ELBO (Kingma & Welling, Eq. 10). Arguments as in ``reparameterize``; mu needs
    a batch dimension. Differentiable in mu, logvar (and noise) through both outputs."""
    _gaussian_inputs(mu, logvar)
    if mu.dim() == 0:
        raise ValueError("mu must have a batch dimension (the KL is summed per sample), got a 0-d tensor")
    seed, stream, offset, backend = _noise_source(mu, seed, noise, stream, offset, backend)
    if backend == "torch":
        eps = _reference_noise(mu, seed, stream, offset) if noise is None else noise
        return ref_gaussian.reparameterize_with_kl(mu, logvar, eps)
    return _ReparameterizeWithKL.apply(mu, logvar, noise, seed, stream, offset)
# --- diffusion: q_sample, ddpm_step, ddim_step (kernels/diffusion.py, fastgen/reference/diffusion.py) ---

def _schedule_arg(schedule):
    from fastgen.schedules import NoiseSchedule

    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a fastgen.NoiseSchedule, got {type(schedule).__name__}")
    return schedule


def _batched(t, name: str) -> torch.Tensor:
    _checks.compute_tensor(t, name)
    if t.dim() == 0:
        raise ValueError(f"{name} must have a batch dimension first, got a 0-d tensor")
    return t


def _check_prev_below(prev_t, t):
    """prev_t < t wherever both are known on the host (ints or CPU tensors)."""
    known = [not isinstance(v, torch.Tensor) or v.device.type == "cpu" for v in (prev_t, t)]
    if all(known) and not bool(torch.all(torch.as_tensor(prev_t) < torch.as_tensor(t))):
        raise ValueError(f"prev_t must be smaller than t, got prev_t={prev_t} and t={t}")


def _t_is_zero_everywhere(t) -> bool:
    return isinstance(t, int) and t == 0


def _choice(value, name: str, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _float_in(value, name: str, *, low=0.0, high=float("inf"), low_open=True):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (value > low if low_open else value >= low) or not value <= high or value != value:
        bound = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bound}{low}, {high}], got {value}")
    return value


def _clip_args(clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value):
    for name, flag in (("clip_sample", clip_sample), ("thresholding", thresholding)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")
    _float_in(clip_sample_range, "clip_sample_range")
    _float_in(dynamic_thresholding_ratio, "dynamic_thresholding_ratio", high=1.0)
    _float_in(sample_max_value, "sample_max_value")


def _noise_arg(noise, sample):
    if noise is not None:
        _checks.like(noise, "noise", sample, "sample")
        return noise.contiguous()
    return None


def _threshold_scales(k_diffusion, step, model_output, sample, t, prev_t, table, ratio, max_value, **extra):
    """Dynamic thresholding's s per sample: unclipped x0 (fp32) from the step kernel, then the
    reference's quantile rule on it (in fp32)."""
    from fastgen.reference import diffusion as ref

    x0 = empty(sample.shape, dtype=torch.float32, device=sample.device)
    step(None, x0, model_output, sample, t, prev_t, table, clip=k_diffusion.CLIP_NONE,
         noise_mode=k_diffusion.NOISE_NONE, **extra)
    return ref.dynamic_threshold_scale(x0, ratio, max_value).contiguous()


def _step_args(t, prev_t, sample, schedule, noise, seed, offset, backend):
    """The validated (t, prev_t, noise, seed, offset, backend) of a reverse step; prev_t may be None
    (ddpm_step's t - 1); the seed is drawn last, and only when the noise is counter-based."""
    steps = dict(num_steps=schedule.num_train_timesteps, batch=sample.shape[0], device=sample.device)
    t = _checks.timesteps(t, "t", **steps)
    if prev_t is not None:
        prev_t = _checks.timesteps(prev_t, "prev_t", low=-1, **steps)
        _check_prev_below(prev_t, t)
    noise = _noise_arg(noise, sample)
    offset = _checks.nonneg_int(offset, "offset", limit=_checks.INT64_MAX - sample.numel())
    backend = resolve_backend(backend, sample.device)
    seed = _checks.seed64(seed) if noise is None else 0
    return t, prev_t, noise, seed, offset, backend


def _fused_step(kernel_name, model_output, t, prev_t, sample, schedule, *, noise, draws, seed, offset, return_x0,
                clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value,
                step_only=None, **kernel_kwargs):
    """The Triton path shared by ddpm_step and ddim_step: allocate, pick noise and clip modes, run the
    thresholding pre-pass if asked, then the one fused step kernel. ``noise``: a tensor to read, or
    None; ``draws``: whether the kernel draws counter-based noise; ``kernel_kwargs`` reach both the
    step and the thresholding pass, ``step_only`` the step alone."""
    from fastgen.kernels import diffusion as k_diffusion

    step = getattr(k_diffusion, kernel_name)
    prev = empty(sample.shape, dtype=sample.dtype, device=sample.device)
    x0 = empty(sample.shape, dtype=sample.dtype, device=sample.device) if return_x0 else None
    if sample.numel() == 0:
        return prev, x0
    model_output, sample = model_output.contiguous(), sample.contiguous()
    table = schedule.kernel_table(sample.device)
    if noise is not None:
        noise_mode = k_diffusion.NOISE_TENSOR
    else:
        noise_mode = k_diffusion.NOISE_PHILOX if draws else k_diffusion.NOISE_NONE
    scale = None
    clip = k_diffusion.CLIP_RANGE if clip_sample else k_diffusion.CLIP_NONE
    if thresholding:
        clip = k_diffusion.CLIP_THRESHOLD
        scale = _threshold_scales(k_diffusion, step, model_output, sample, t, prev_t, table,
                                  dynamic_thresholding_ratio, sample_max_value, **kernel_kwargs)
    step(prev, x0, model_output, sample, t, prev_t, table, clip=clip, clip_range=clip_sample_range, scale=scale,
         noise_mode=noise_mode, noise=noise, seed=seed, offset=offset, **kernel_kwargs, **(step_only or {}))
    return prev, x0


def q_sample(x0, t, schedule, *, seed=None, noise=None, offset=0, return_noise=False, backend="auto"):
    """Diffuse data to timestep t: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. eq. 4).

    Args:
        x0: [B, ...] fp32/fp16/bf16 tensor, batch first.
        t: int in [0, T) or an integer tensor of shape [B] (or []) on x0's device.
        schedule: a fastgen.NoiseSchedule.
        seed, offset: the counter-based noise: element g of sample b is
            ``fastgen.randn(x0.shape, seed=seed, stream=t[b], offset=offset)[b, g]``; ignored when
            ``noise`` is given. seed=None draws one from torch's default generator.
        noise: optional eps tensor like x0 (diffusers' add_noise parity).
        return_noise: also return the noise used (the regenerated one when drawn in-kernel).
    Returns x_t (and the noise) in x0's dtype.
    """
    _batched(x0, "x0")
    schedule = _schedule_arg(schedule)
    t = _checks.timesteps(t, "t", num_steps=schedule.num_train_timesteps, batch=x0.shape[0], device=x0.device)
    noise = _noise_arg(noise, x0)
    offset = _checks.nonneg_int(offset, "offset", limit=_checks.INT64_MAX - x0.numel())
    backend = resolve_backend(backend, x0.device)
    seed = _checks.seed64(seed) if noise is None else 0
    if backend == "torch":
        from fastgen.reference import diffusion as ref

        if noise is None:
            noise = ref.noise_like(x0.shape, t, seed=seed, offset=offset).to(x0.device)
        x_t = ref.q_sample(x0, t, schedule, noise).to(x0.dtype)
        return (x_t, noise.to(x0.dtype)) if return_noise else x_t
    from fastgen.kernels import diffusion as k_diffusion

    out = empty(x0.shape, dtype=x0.dtype, device=x0.device)
    noise_out = empty(x0.shape, dtype=x0.dtype, device=x0.device) if return_noise and noise is None else None
    if out.numel():
        k_diffusion.q_sample(out, x0.contiguous(), t, schedule.kernel_table(x0.device), seed=seed, offset=offset,
                             noise=noise, noise_out=noise_out)
    if return_noise:
        return out, (noise_out if noise is None else noise.to(x0.dtype))
    return out


def ddpm_step(model_output, t, sample, schedule, *, prev_t=None, prediction_type="epsilon",
              variance_type="fixed_small", clip_sample=True, clip_sample_range=1.0, thresholding=False,
              dynamic_thresholding_ratio=0.995, sample_max_value=1.0, seed=None, noise=None, offset=0,
              return_pred_original_sample=True, backend="auto"):
    """One DDPM reverse step x_t -> x_{prev_t} in one fused pass (Ho et al. eqs. 6-7, 15; Algorithm 2).

    Args:
        model_output: like ``sample`` ([B, 2C, ...] for variance_type "learned"/"learned_range": the
            second half of dim 1 is the predicted variance, diffusers' convention).
        t: int in [0, T) or integer tensor of shape [B] (or []) on the sample's device.
        sample: x_t, [B, C, ...] fp32/fp16/bf16.
        schedule: a fastgen.NoiseSchedule.
        prev_t: the timestep stepped to, in [-1, t) (-1: the end of the chain, abar = 1); default t - 1.
        prediction_type: "epsilon", "sample" or "v_prediction".
        variance_type: "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned",
            "learned_range".
        clip_sample, clip_sample_range: clamp the predicted x0 to +-range.
        thresholding, dynamic_thresholding_ratio, sample_max_value: Imagen's dynamic thresholding
            (takes precedence over clip_sample, as in diffusers).
        seed, offset, noise: the noise z (see q_sample: stream t[b]); none is added where t == 0.
        return_pred_original_sample: False skips writing x0 and returns (prev_sample, None).
    Returns (prev_sample, pred_original_sample) in the sample's dtype. On a GPU, timesteps outside
    the schedule inside a device tensor are not checked on the host (that would synchronise): the
    affected samples come out NaN.
    """
    _batched(sample, "sample")
    _checks.like(model_output, "model_output", sample, "sample", shape=False)
    schedule = _schedule_arg(schedule)
    _choice(prediction_type, "prediction_type", ("epsilon", "sample", "v_prediction"))
    _choice(variance_type, "variance_type", ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log",
                                             "learned", "learned_range"))
    learned = variance_type in ("learned", "learned_range")
    expected = sample.shape
    if learned:
        if sample.dim() < 2:
            raise ValueError(f"sample must have a channel dimension (dim 1) for variance_type={variance_type!r}")
        if model_output.dim() >= 2 and model_output.shape[1] % 2:
            raise ValueError(f"model_output must have an even channel count (dim 1) for variance_type="
                             f"{variance_type!r} (prediction and variance), got {model_output.shape[1]}")
        expected = torch.Size((sample.shape[0], 2 * sample.shape[1], *sample.shape[2:]))
    if model_output.shape != expected:
        raise ValueError(f"model_output must have shape {tuple(expected)} for sample of shape {tuple(sample.shape)}"
                         f" and variance_type={variance_type!r}, got {tuple(model_output.shape)}")
    _clip_args(clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value)
    t, prev_t, noise, seed, offset, backend = _step_args(t, prev_t, sample, schedule, noise, seed, offset, backend)
    if backend == "torch":
        from fastgen.reference import diffusion as ref

        prev, x0 = ref.ddpm_step(model_output, t, sample, schedule, prev_t=prev_t, prediction_type=prediction_type,
                                 variance_type=variance_type, clip_sample=clip_sample,
                                 clip_sample_range=clip_sample_range, thresholding=thresholding,
                                 dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                                 sample_max_value=sample_max_value, seed=seed, noise=noise, offset=offset)
        return prev.to(sample.dtype), (x0.to(sample.dtype) if return_pred_original_sample else None)
    draws = noise is None and not _t_is_zero_everywhere(t)
    return _fused_step("ddpm_step", model_output, t, prev_t, sample, schedule, noise=noise, draws=draws, seed=seed,
                       offset=offset, return_x0=return_pred_original_sample, clip_sample=clip_sample,
                       clip_sample_range=clip_sample_range, thresholding=thresholding,
                       dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value,
                       prediction_type=prediction_type, variance_type=variance_type)


def ddim_step(model_output, t, prev_t, sample, schedule, *, eta=0.0, prediction_type="epsilon", clip_sample=True,
              clip_sample_range=1.0, thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
              use_clipped_model_output=False, set_alpha_to_one=True, seed=None, noise=None, offset=0,
              return_pred_original_sample=True, backend="auto"):
    """One DDIM step x_t -> x_{prev_t} in one fused pass (Song et al. eqs. 12 and 16).

    Args as ddpm_step, and:
        prev_t: int or integer tensor in [-1, t); -1 is the end of the chain, where abar is 1
            (``set_alpha_to_one``) or abar_0 (set_alpha_to_one=False, diffusers' final_alpha_cumprod).
        eta: in [0, 1]; sigma = eta sqrt(beta~). eta = 0 is the deterministic DDIM.
        use_clipped_model_output: recompute eps from the clipped x0 before the update.
    Returns (prev_sample, pred_original_sample) in the sample's dtype.
    """
    _batched(sample, "sample")
    _checks.like(model_output, "model_output", sample, "sample")
    schedule = _schedule_arg(schedule)
    _choice(prediction_type, "prediction_type", ("epsilon", "sample", "v_prediction"))
    _clip_args(clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value)
    eta = _float_in(eta, "eta", high=1.0, low_open=False)
    for name, flag in (("use_clipped_model_output", use_clipped_model_output), ("set_alpha_to_one", set_alpha_to_one)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")
    if prev_t is None:
        raise TypeError("prev_t must be an int or an integer tensor (the timestep DDIM steps to), got None")
    t, prev_t, noise, seed, offset, backend = _step_args(t, prev_t, sample, schedule, noise, seed, offset, backend)
    final_abar = 1.0 if set_alpha_to_one else float(schedule.alphas_cumprod[0])
    final_bbar = 0.0 if set_alpha_to_one else float(schedule.one_minus_alphas_cumprod[0])
    if backend == "torch":
        from fastgen.reference import diffusion as ref

        prev, x0 = ref.ddim_step(model_output, t, prev_t, sample, schedule, eta=eta, prediction_type=prediction_type,
                                 clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                                 thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                                 sample_max_value=sample_max_value, use_clipped_model_output=use_clipped_model_output,
                                 final_alpha_cumprod=final_abar, seed=seed, noise=noise, offset=offset)
        return prev.to(sample.dtype), (x0.to(sample.dtype) if return_pred_original_sample else None)
    noisy = eta > 0  # eta = 0: deterministic, any noise is ignored
    draws = noisy and noise is None and not _t_is_zero_everywhere(t)
    return _fused_step("ddim_step", model_output, t, prev_t, sample, schedule, noise=noise if noisy else None,
                       draws=draws, seed=seed, offset=offset, return_x0=return_pred_original_sample,
                       clip_sample=clip_sample, clip_sample_range=clip_sample_range, thresholding=thresholding,
                       dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value,
                       prediction_type=prediction_type, final_abar=final_abar, final_bbar=final_bbar,
                       step_only=dict(eta=eta, use_clipped_model_output=use_clipped_model_output))

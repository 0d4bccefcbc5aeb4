"""Public functional ops: validate arguments, pick the backend, call the kernel or the reference.

This module is the one place that calls into ``fastgen.kernels``; kernels are imported on first
use so ``import fastgen`` works without triton and TRITON_INTERPRET may be set after it.
"""
import torch

from fastgen import _checks
from fastgen._alloc import empty
from fastgen.backend import resolve_backend
from fastgen.reference import random as ref_random


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
    device = _checks.device(device)
    backend = resolve_backend(backend, device)
    seed = _checks.seed64(seed)
    if backend == "torch":
        return ref_random.randn(shape, seed=seed, stream=stream, offset=offset, device=device, dtype=dtype)
    from fastgen.kernels import random as k_random

    out = empty(shape, dtype=dtype, device=device)
    if out.numel():
        k_random.randn(out, seed, stream, offset)
    return out


# --- diffusion: q_sample, ddpm_step, ddim_step (kernels/diffusion.py, fastgen/reference/diffusion.py) ---

def _schedule_arg(schedule):
    from fastgen.schedules import NoiseSchedule

    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a fastgen.NoiseSchedule, got {type(schedule).__name__}")
    return schedule


def _batched(t, name: str) -> torch.Tensor:
    _checks.float_tensor(t, name)
    if t.dim() == 0:
        raise ValueError(f"{name} must have a batch dimension first, got a 0-d tensor")
    return t


def _timestep_arg(t, name: str, sample: torch.Tensor, num_steps: int, low: int = 0):
    """An int in [low, T) or an integer tensor of shape [] or [B] on the sample's device (values
    checked where that needs no device synchronisation: on the CPU)."""
    if isinstance(t, torch.Tensor):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an int or an integer tensor, got a tensor of dtype {t.dtype}")
        if t.device != sample.device:
            raise ValueError(f"{name} must be on sample's device {sample.device}, got {t.device}")
        if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != sample.shape[0]):
            raise ValueError(f"{name} must be an int or a tensor of shape [] or [batch={sample.shape[0]}], "
                             f"got shape {tuple(t.shape)}")
        if t.device.type == "cpu" and t.numel() and not ((t >= low) & (t < num_steps)).all():
            bad = t[(t < low) | (t >= num_steps)][0].item()
            raise ValueError(f"{name} must hold timesteps in [{low}, {num_steps}), got {bad}")
        return t
    t = _checks.as_int(t, name)
    if not low <= t < num_steps:
        raise ValueError(f"{name} must be a timestep in [{low}, {num_steps}), got {t}")
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


def _threshold_scales(k_diffusion, step, model_output, sample, t, prev_t, table, prediction_type, ratio, max_value,
                      **extra):
    """Dynamic thresholding's s per sample: unclipped x0 (fp32) from the step kernel, then its quantile."""
    x0 = empty(sample.shape, dtype=torch.float32, device=sample.device)
    step(None, x0, model_output, sample, t, prev_t, table, prediction_type=prediction_type,
         clip=k_diffusion.CLIP_NONE, noise_mode=k_diffusion.NOISE_NONE, **extra)
    ordered = x0.reshape(sample.shape[0], -1).abs().sort(dim=1).values
    # torch.quantile's linear interpolation, without its 2^24-element limit
    position = ratio * (ordered.shape[1] - 1)
    below = int(position)
    above = min(below + 1, ordered.shape[1] - 1)
    scale = torch.lerp(ordered[:, below], ordered[:, above], position - below)
    return scale.clamp(min=1.0, max=max_value).contiguous()


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
    t = _timestep_arg(t, "t", x0, schedule.num_train_timesteps)
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
    num_steps = schedule.num_train_timesteps
    t = _timestep_arg(t, "t", sample, num_steps)
    if prev_t is not None:
        prev_t = _timestep_arg(prev_t, "prev_t", sample, num_steps, low=-1)
        _check_prev_below(prev_t, t)
    noise = _noise_arg(noise, sample)
    offset = _checks.nonneg_int(offset, "offset", limit=_checks.INT64_MAX - sample.numel())
    backend = resolve_backend(backend, sample.device)
    seed = _checks.seed64(seed) if noise is None else 0
    if backend == "torch":
        from fastgen.reference import diffusion as ref

        prev, x0 = ref.ddpm_step(model_output, t, sample, schedule, prev_t=prev_t, prediction_type=prediction_type,
                                 variance_type=variance_type, clip_sample=clip_sample,
                                 clip_sample_range=clip_sample_range, thresholding=thresholding,
                                 dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                                 sample_max_value=sample_max_value, seed=seed, noise=noise, offset=offset)
        return prev.to(sample.dtype), (x0.to(sample.dtype) if return_pred_original_sample else None)
    from fastgen.kernels import diffusion as k_diffusion

    prev = empty(sample.shape, dtype=sample.dtype, device=sample.device)
    x0 = empty(sample.shape, dtype=sample.dtype, device=sample.device) if return_pred_original_sample else None
    if sample.numel() == 0:
        return prev, x0
    model_output, sample = model_output.contiguous(), sample.contiguous()
    table = schedule.kernel_table(sample.device)
    if noise is not None:
        noise_mode = k_diffusion.NOISE_TENSOR
    else:
        noise_mode = k_diffusion.NOISE_NONE if _t_is_zero_everywhere(t) else k_diffusion.NOISE_PHILOX
    common = dict(prediction_type=prediction_type, variance_type=variance_type)
    scale = None
    clip = k_diffusion.CLIP_RANGE if clip_sample else k_diffusion.CLIP_NONE
    if thresholding:
        clip = k_diffusion.CLIP_THRESHOLD
        scale = _threshold_scales(k_diffusion, k_diffusion.ddpm_step, model_output, sample, t, prev_t, table,
                                  prediction_type, dynamic_thresholding_ratio, sample_max_value,
                                  variance_type=variance_type)
    k_diffusion.ddpm_step(prev, x0, model_output, sample, t, prev_t, table, clip=clip, clip_range=clip_sample_range,
                          scale=scale, noise_mode=noise_mode, noise=noise, seed=seed, offset=offset, **common)
    return prev, x0


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
    num_steps = schedule.num_train_timesteps
    t = _timestep_arg(t, "t", sample, num_steps)
    prev_t = _timestep_arg(prev_t, "prev_t", sample, num_steps, low=-1)
    _check_prev_below(prev_t, t)
    noise = _noise_arg(noise, sample)
    offset = _checks.nonneg_int(offset, "offset", limit=_checks.INT64_MAX - sample.numel())
    backend = resolve_backend(backend, sample.device)
    seed = _checks.seed64(seed) if noise is None else 0
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
    from fastgen.kernels import diffusion as k_diffusion

    prev = empty(sample.shape, dtype=sample.dtype, device=sample.device)
    x0 = empty(sample.shape, dtype=sample.dtype, device=sample.device) if return_pred_original_sample else None
    if sample.numel() == 0:
        return prev, x0
    model_output, sample = model_output.contiguous(), sample.contiguous()
    table = schedule.kernel_table(sample.device)
    if noise is not None:
        noise_mode = k_diffusion.NOISE_TENSOR if eta > 0 else k_diffusion.NOISE_NONE
    else:
        noise_mode = k_diffusion.NOISE_PHILOX if eta > 0 and not _t_is_zero_everywhere(t) else k_diffusion.NOISE_NONE
    common = dict(prediction_type=prediction_type, final_abar=final_abar, final_bbar=final_bbar)
    scale = None
    clip = k_diffusion.CLIP_RANGE if clip_sample else k_diffusion.CLIP_NONE
    if thresholding:
        clip = k_diffusion.CLIP_THRESHOLD
        scale = _threshold_scales(k_diffusion, k_diffusion.ddim_step, model_output, sample, t, prev_t, table,
                                  prediction_type, dynamic_thresholding_ratio, sample_max_value,
                                  final_abar=final_abar, final_bbar=final_bbar)
    k_diffusion.ddim_step(prev, x0, model_output, sample, t, prev_t, table, clip=clip, clip_range=clip_sample_range,
                          scale=scale, eta=eta, use_clipped_model_output=use_clipped_model_output,
                          noise_mode=noise_mode, noise=noise, seed=seed, offset=offset, **common)
    return prev, x0

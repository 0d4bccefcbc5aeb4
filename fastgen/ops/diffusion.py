"""Diffusion ops: q_sample, ddpm_step, ddim_step (kernels/diffusion.py; fastgen/reference/diffusion.py).

A reverse step's settings travel as one ``fastgen.step_spec.StepSpec``: pass ``spec=`` (what the
schedulers and ``fastgen.sample`` do), or the settings as keywords and the op builds the spec once.
Backends: "triton" runs the fused kernel (one pass, plus a per-sample quantile pass first for dynamic
thresholding); "torch" the same update as whole-tensor fp32 torch ops (``torch_update`` on the
per-step scalars of ``torch_coefficients``, which the fast CPU sampling loop also uses); "reference"
the float64 reference. q_sample has no separate torch path: "torch" runs its reference.

``offset`` counts samples in every op here: sample b's noise starts at counter element (offset + b) * n,
n = elements per sample (``fastgen._checks.sample_offset`` converts it; the kernels and the reference
take that element offset).
"""
import dataclasses
from typing import Optional

import torch

from fastgen import _checks
from fastgen._alloc import empty
from fastgen.ops._library import kernel_op
from fastgen.backend import resolve_backend
from fastgen.ops.guidance import check_guided_output, guidance_scale_arg, guided
from fastgen.step_spec import StepSpec


def q_sample(x0, t, schedule, *, seed=None, noise=None, offset=0, return_noise=False, backend="auto"):
    """Diffuse data to timestep t: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. eq. 4).

    Args:
        x0: [B, ...] fp32/fp16/bf16 tensor, batch first.
        t: int in [0, T) or an integer tensor of shape [B] (or []) on x0's device.
        schedule: a fastgen.NoiseSchedule.
        seed, offset: the counter-based noise: element g of sample b is
            ``fastgen.randn(x0.shape, seed=seed, stream=t[b], offset=offset)[b, g]``, the normal of
            counter element (offset + b) * n + g, n = elements per sample; ignored when ``noise`` is
            given. seed=None draws one from torch's default generator. ``offset`` is a non-negative
            int counted in samples: ``offset=k`` on samples k.. of a batch gives them the noise they
            get in the whole batch.
        noise: optional eps tensor like x0 (diffusers' add_noise parity).
        return_noise: also return the noise used (the regenerated one when drawn in-kernel).
    Returns x_t (and the noise) in x0's dtype.
    """
    _checks.batched(x0, "x0")
    schedule = _checks.noise_schedule(schedule)
    t = _checks.timesteps(t, "t", num_steps=schedule.num_train_timesteps, batch=x0.shape[0], device=x0.device)
    noise = _noise_arg(noise, x0)
    element_offset = _checks.sample_offset(offset, x0.shape)
    backend = resolve_backend(backend, x0.device)
    seed = _seed(seed, backend) if noise is None else 0
    if backend != "triton":
        from fastgen.reference import diffusion as ref

        if noise is None:
            noise = ref.noise_like(x0.shape, t, seed=seed, offset=element_offset).to(x0.device)
        x_t = ref.q_sample(x0, t, schedule, noise).to(x0.dtype)
        return (x_t, noise.to(x0.dtype)) if return_noise else x_t
    outs = _q_sample_op(x0, *_timestep_operands(t), schedule.kernel_table(x0.device), _int64_bits(seed),
                        element_offset, noise, return_noise and noise is None)
    if return_noise:
        return outs[0], (outs[1] if noise is None else noise.to(x0.dtype))
    return outs[0]


@kernel_op("fastgen::q_sample", direct=True)
def _q_sample_op(x0: torch.Tensor, t: Optional[torch.Tensor], t_int: int, table: torch.Tensor, seed: int, offset: int,
                 noise: Optional[torch.Tensor], return_noise: bool) -> list[torch.Tensor]:
    """The fused q_sample (kernels/diffusion.py): [x_t], and the drawn noise with ``return_noise``.
    t: an int64 tensor [] / [B], or None and ``t_int``; ``table``: the schedule's kernel table;
    ``seed`` the 64-bit seed's bits as an int64; ``offset`` in elements."""
    from fastgen.kernels import diffusion as k_diffusion

    out = empty(x0.shape, dtype=x0.dtype, device=x0.device)
    noise_out = empty(x0.shape, dtype=x0.dtype, device=x0.device) if return_noise else None
    if out.numel():
        k_diffusion.q_sample(out, x0.contiguous(), t_int if t is None else t, table, seed=seed, offset=offset,
                             noise=noise, noise_out=noise_out)
    return [out] if noise_out is None else [out, noise_out]


def _timestep_operands(t):
    """(tensor or None, int): a timestep as an op takes it (an int timestep stays a host int)."""
    return (None, t) if isinstance(t, int) else (t, 0)


def _int64_bits(seed):
    """A seed as an op's int64 argument: a 64-bit int's bits (a traced seed tensor as it is)."""
    from fastgen.ops.random import _int64_bits as bits

    return seed if isinstance(seed, torch.Tensor) else bits(seed)


def ddpm_step(model_output, t, sample, schedule, *, prev_t=None, spec=None, seed=None, noise=None, offset=0,
              guidance_scale=None, return_pred_original_sample=True, backend="auto", **settings):
    """One DDPM reverse step x_t -> x_{prev_t} in one fused pass (Ho et al. eqs. 6-7, 15; Algorithm 2).

    Args:
        model_output: like ``sample`` ([B, 2C, ...] for variance_type "learned"/"learned_range": the
            second half of dim 1 is the predicted variance, diffusers' convention).
        t: int in [0, T) or integer tensor of shape [B] (or []) on the sample's device.
        sample: x_t, [B, C, ...] fp32/fp16/bf16.
        schedule: a fastgen.NoiseSchedule.
        prev_t: the timestep stepped to, in [-1, t) (-1: the end of the chain, abar = 1); default t - 1.
        spec: a StepSpec of kind "ddpm"; or, instead, its settings as keywords: prediction_type,
            variance_type, clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio,
            sample_max_value (diffusers' names and defaults; see fastgen.step_spec).
        seed, offset, noise: the noise z (see q_sample: stream t[b], offset counted in samples); none
            is added where t == 0.
        guidance_scale: None, or w: classifier-free guidance fused into the step; model_output is then
            [2B, ...], the model on the doubled batch, unconditional half first (fastgen.ops.guidance;
            not with a learned variance).
        return_pred_original_sample: False skips writing x0 and returns (prev_sample, None).
    Returns (prev_sample, pred_original_sample) in the sample's dtype. On a GPU, timesteps outside
    the schedule inside a device tensor are not checked on the host (that would synchronise): the
    affected samples come out NaN.
    """
    spec = _spec_arg("ddpm", spec, settings)
    return _step(spec, model_output, t, prev_t, sample, schedule, seed=seed, noise=noise,
                 offset=_element_offset(offset, sample), guidance_scale=guidance_scale,
                 return_x0=return_pred_original_sample, backend=backend)


def ddim_step(model_output, t, prev_t, sample, schedule, *, spec=None, seed=None, noise=None, offset=0,
              guidance_scale=None, return_pred_original_sample=True, backend="auto", **settings):
    """One DDIM step x_t -> x_{prev_t} in one fused pass (Song et al. eqs. 12 and 16).

    Args as ddpm_step, and:
        prev_t: int or integer tensor in [-1, t); -1 is the end of the chain, where abar is 1
            (``set_alpha_to_one``) or abar_0 (set_alpha_to_one=False, diffusers' final_alpha_cumprod).
        spec: a StepSpec of kind "ddim"; or its settings as keywords: those of ddpm_step but
            variance_type, and eta (in [0, 1]; sigma = eta sqrt(beta~), 0 is the deterministic DDIM),
            use_clipped_model_output (eps from the clipped x0) and set_alpha_to_one.
    Returns (prev_sample, pred_original_sample) in the sample's dtype.
    """
    if prev_t is None:
        raise TypeError("prev_t must be an int or an integer tensor (the timestep DDIM steps to), got None")
    spec = _spec_arg("ddim", spec, settings)
    return _step(spec, model_output, t, prev_t, sample, schedule, seed=seed, noise=noise,
                 offset=_element_offset(offset, sample), guidance_scale=guidance_scale,
                 return_x0=return_pred_original_sample, backend=backend)


def _spec_arg(kind: str, spec, settings: dict) -> StepSpec:
    """The step's spec: the one given, or one built from keyword settings (not both)."""
    if spec is None:
        return StepSpec(kind, **settings)
    if not isinstance(spec, StepSpec):
        raise TypeError(f"spec must be a fastgen.step_spec.StepSpec, got {type(spec).__name__}")
    if settings:
        raise TypeError(f"pass the step's settings either as spec= or as keywords, not both; got spec and "
                        f"{sorted(settings)}")
    if spec.kind != kind:
        raise ValueError(f"spec must be of kind {kind!r} for {kind}_step, got {spec.kind!r}")
    return spec


def _element_offset(offset, sample):
    """A step's public ``offset`` (in samples of ``sample``) as the element offset ``_step`` takes."""
    _checks.batched(sample, "sample")
    return _checks.sample_offset(offset, sample.shape)


def _noise_arg(noise, sample):
    if noise is not None:
        _checks.like(noise, "noise", sample, "sample")
        return noise.contiguous()
    return None


def _step(spec: StepSpec, model_output, t, prev_t, sample, schedule, *, seed, noise, offset, return_x0, backend,
          guidance_scale=None):
    """What ddpm_step and ddim_step share: validation (before any random draw), then the reference
    or the fused kernel. prev_t None: t - 1 (DDPM only).

    The one internal entry to a step, and the one that counts ``offset`` in ELEMENTS: the counter
    element of sample 0's first element, as the kernels and the reference take it (ddpm_step and
    ddim_step convert their offset in samples first). fastgen.sample calls it directly, on a batch
    read as one long sample [1, B * n] with the element offset of its first sample."""
    _checks.batched(sample, "sample")
    _checks.like(model_output, "model_output", sample, "sample", shape=False)
    guidance_scale = guidance_scale_arg(guidance_scale)
    if guidance_scale is None:
        spec.check_model_output(model_output, sample)
    elif spec.learned_variance:
        raise ValueError(f"guidance_scale is not supported with variance_type={spec.variance_type!r} (which half's "
                         "variance would be ambiguous); use a fixed variance type")
    else:
        check_guided_output(model_output, sample.shape, guidance_scale)
    schedule = _checks.noise_schedule(schedule)
    steps = dict(num_steps=schedule.num_train_timesteps, batch=sample.shape[0], device=sample.device)
    t = _checks.timesteps(t, "t", **steps)
    if prev_t is not None:
        prev_t = _checks.timesteps(prev_t, "prev_t", low=-1, **steps)
        _checks.prev_below(prev_t, t)
    noise = _noise_arg(noise, sample)
    if not spec.adds_noise:  # DDIM with eta = 0 ignores any noise
        noise = None
    offset = _checks.nonneg_int(offset, "offset", limit=_checks.INT64_MAX - sample.numel())  # elements
    backend_arg, backend = backend, resolve_backend(backend, sample.device)
    seed = _seed(seed, backend) if noise is None and spec.adds_noise else 0
    if backend == "reference":
        from fastgen.reference import diffusion as ref

        prev, x0 = ref.step(spec, guided(model_output.double(), guidance_scale), t, prev_t, sample, schedule,
                            seed=seed, noise=noise, offset=offset)
        return prev.to(sample.dtype), (x0.to(sample.dtype) if return_x0 else None)
    if backend == "torch":
        return _torch_step(spec, guided(model_output.float(), guidance_scale), t, prev_t, sample, schedule, seed=seed,
                           noise=noise, offset=offset, return_x0=return_x0, backend_arg=backend_arg)
    draws = spec.adds_noise and noise is None and not (isinstance(t, int) and t == 0)
    return _fused_step(spec, model_output, t, prev_t, sample, schedule, noise=noise, draws=draws, seed=seed,
                       offset=offset, return_x0=return_x0, guidance_scale=guidance_scale)


def _seed(seed, backend: str):
    """The seed a step draws with: an int (None drawn from torch's generator), or under torch.compile
    on the torch path an int64 tensor holding a drawn seed (fastgen.ops.random.seed_operands)."""
    from fastgen.ops.random import seed_of, seed_operands

    seed, seed_bits = seed_operands(seed, backend)
    return seed_of(seed & ((1 << 64) - 1), seed_bits)


def _fused_step(spec, model_output, t, prev_t, sample, schedule, *, noise, draws, seed, offset, return_x0,
                guidance_scale=None):
    """The Triton path: the custom op ``fastgen::diffusion_step`` on the spec's settings and the
    schedule's kernel table. ``noise``: a tensor to read, or None; ``draws``: whether the kernel draws
    counter-based noise."""
    extra = (spec.final_alpha_cumprod(schedule), 0.0 if spec.set_alpha_to_one else schedule.first_one_minus_alpha_cumprod) \
        if spec.kind == "ddim" else (1.0, 0.0)
    prev_tensor, prev_int = (None, None) if prev_t is None else _timestep_operands(prev_t)
    outs = _step_op(model_output, *_timestep_operands(t), prev_tensor, prev_int, sample,
                    schedule.kernel_table(sample.device), *(getattr(spec, name) for name in _SPEC_FIELDS), *extra,
                    noise, draws, _int64_bits(seed), offset, guidance_scale, return_x0)
    return outs[0], (outs[1] if return_x0 else None)


_SPEC_FIELDS = tuple(field.name for field in dataclasses.fields(StepSpec))  # the op's settings, in order


@kernel_op("fastgen::diffusion_step", direct=True)
def _step_op(model_output: torch.Tensor, t: Optional[torch.Tensor], t_int: int, prev_t: Optional[torch.Tensor],
             prev_int: Optional[int], sample: torch.Tensor, table: torch.Tensor, kind: str, prediction_type: str,
             variance_type: str, clip_sample: bool, clip_sample_range: float, thresholding: bool,
             dynamic_thresholding_ratio: float, sample_max_value: float, eta: float, use_clipped_model_output: bool,
             set_alpha_to_one: bool, final_abar: float, final_bbar: float, noise: Optional[torch.Tensor], draws: bool,
             seed: int, offset: int, guidance: Optional[float], return_x0: bool) -> list[torch.Tensor]:
    """One fused DDPM or DDIM step (kernels/diffusion.py, as ``kind`` says): [x_prev], and x0 with
    ``return_x0``. The settings are a StepSpec's fields in order; t / prev_t: int64 tensors, or None
    and the ints ``t_int`` / ``prev_int`` (prev_int None: t - 1); final_abar / final_bbar: DDIM's abar
    and 1 - abar after the last step; ``noise``: a tensor to read, or None (``draws``: counter noise);
    ``seed``: the 64-bit seed's bits as an int64; ``offset`` in elements. Dynamic thresholding runs a
    per-sample quantile pass on the unclipped x0 first."""
    from fastgen.kernels import diffusion as k_diffusion

    spec = StepSpec(kind, prediction_type, variance_type, clip_sample, clip_sample_range, thresholding,
                    dynamic_thresholding_ratio, sample_max_value, eta, use_clipped_model_output, set_alpha_to_one)
    t = t_int if t is None else t
    prev_t = prev_int if prev_t is None else prev_t
    launch_step = k_diffusion.ddpm_step if kind == "ddpm" else k_diffusion.ddim_step
    extra = dict(final_abar=final_abar, final_bbar=final_bbar) if kind == "ddim" else {}
    prev = empty(sample.shape, dtype=sample.dtype, device=sample.device)
    x0 = empty(sample.shape, dtype=sample.dtype, device=sample.device) if return_x0 else None
    outs = [prev] if x0 is None else [prev, x0]
    if sample.numel() == 0:
        return outs
    model_output, sample = model_output.contiguous(), sample.contiguous()
    noise_mode = (k_diffusion.NOISE_TENSOR if noise is not None else
                  k_diffusion.NOISE_PHILOX if draws else k_diffusion.NOISE_NONE)
    scale = None
    if thresholding:  # s per sample: the reference's quantile rule on the unclipped x0 (fp32)
        from fastgen.reference import diffusion as ref

        unclipped = empty(sample.shape, dtype=torch.float32, device=sample.device)
        launch_step(None, unclipped, model_output, sample, t, prev_t, table,
                    spec.replace(thresholding=False, clip_sample=False), noise_mode=k_diffusion.NOISE_NONE,
                    guidance=guidance, **extra)
        scale = ref.dynamic_threshold_scale(unclipped, dynamic_thresholding_ratio, sample_max_value).contiguous()
    launch_step(prev, x0, model_output, sample, t, prev_t, table, spec, scale=scale, noise_mode=noise_mode,
                noise=None if noise is None else noise.contiguous(), seed=seed, offset=offset, guidance=guidance,
                **extra)
    return outs


# --- the "torch" backend: the fused kernels' update in whole-tensor fp32 torch ops -------------------

def torch_coefficients(spec: StepSpec, schedule, t, prev_t) -> dict:
    """The per-step scalars of the fused update for steps t -> prev_t (int64 CPU tensors of N steps):
    float64 [N] tensors, computed by the reference (step_coefficients, model_variance):

        sqrt_abar_t, sqrt_bbar_t                 x0 from the prediction (Ho et al. eq. 15)
        DDPM  coef_x0, coef_xt                   the posterior mean (Ho et al. eq. 7)
              sigma (fixed variances), or log_small, log_large, noisy (learned variances)
        DDIM  sqrt_abar_s, direction, sigma      Song et al. eqs. 12, 16 (direction without cancellation)
    sigma is 0 where t = 0 (no step adds noise there)."""
    from fastgen.reference import diffusion as ref

    n = len(t)
    abar_t, bbar_t, abar_s, bbar_s, beta_ts = ref.step_coefficients(schedule, t, prev_t, n,
                                                                    spec.final_alpha_cumprod(schedule))
    columns = dict(sqrt_abar_t=abar_t.sqrt(), sqrt_bbar_t=bbar_t.sqrt())
    noisy = (t > 0).double()
    if spec.kind == "ddpm":
        columns.update(coef_x0=abar_s.sqrt() * beta_ts / bbar_t, coef_xt=(abar_t / abar_s).sqrt() * bbar_s / bbar_t)
        if spec.learned_variance:
            small, _ = ref.model_variance(t, prev_t, schedule, "fixed_small", batch=n)
            large, _ = ref.model_variance(t, prev_t, schedule, "fixed_large", batch=n)
            columns.update(log_small=small.log(), log_large=large.log(), noisy=noisy)
        else:
            variance, _ = ref.model_variance(t, prev_t, schedule, spec.variance_type, batch=n)
            columns.update(sigma=variance.sqrt() * noisy)
    else:
        eta2 = spec.eta ** 2
        sigma = spec.eta * (bbar_s / bbar_t * beta_ts).sqrt()
        direction = (bbar_s * ((1 - eta2) * bbar_t + eta2 * abar_t * bbar_s / abar_s) / bbar_t).sqrt()
        columns.update(sqrt_abar_s=abar_s.sqrt(), direction=direction, sigma=sigma * noisy)
    return columns


def torch_update(spec: StepSpec, c: dict, model_output, sample, noise):
    """x_s and x0 (fp32) from x_t = ``sample`` and the model output: the fused kernels' equations in
    whole-tensor torch ops. ``c``: torch_coefficients of this step as Python floats (one step for the
    batch), or as fp32 tensors broadcasting over the sample ([B, 1, ...], one per sample); ``noise``:
    z like the sample (fp32), or None where the step adds none."""
    from fastgen.reference import diffusion as ref

    x, out = sample.float(), model_output.float()
    if spec.learned_variance:
        out, predicted_variance = out.chunk(2, dim=1)
    if spec.prediction_type == "epsilon":            # Ho et al. eq. 15
        x0 = (x - c["sqrt_bbar_t"] * out) / c["sqrt_abar_t"]
    elif spec.prediction_type == "sample":
        x0 = out
    else:                                            # Salimans & Ho sec. 4
        x0 = c["sqrt_abar_t"] * x - c["sqrt_bbar_t"] * out
    if spec.kind == "ddim":                          # eps from the unclipped x0
        if spec.prediction_type == "epsilon":
            eps = out
        elif spec.prediction_type == "sample":
            eps = (x - c["sqrt_abar_t"] * x0) / c["sqrt_bbar_t"]
        else:
            eps = c["sqrt_abar_t"] * out + c["sqrt_bbar_t"] * x
    if spec.thresholding:                            # Imagen's dynamic thresholding, per sample
        scale = ref.dynamic_threshold_scale(x0, spec.dynamic_thresholding_ratio, spec.sample_max_value)
        scale = scale.float().reshape(-1, *([1] * (x0.dim() - 1)))
        x0 = torch.minimum(torch.maximum(x0, -scale), scale) / scale
    elif spec.clip_sample:
        x0 = x0.clamp(-spec.clip_sample_range, spec.clip_sample_range)
    if spec.kind == "ddim" and spec.use_clipped_model_output:
        eps = (x - c["sqrt_abar_t"] * x0) / c["sqrt_bbar_t"]
    if spec.kind == "ddpm":
        prev = c["coef_x0"] * x0 + c["coef_xt"] * x
        if spec.learned_variance:                    # Nichol & Dhariwal eq. 15 for learned_range
            if spec.variance_type == "learned":
                sigma = predicted_variance.sqrt()
            else:
                frac = (predicted_variance + 1) / 2
                sigma = torch.exp(0.5 * (frac * c["log_large"] + (1 - frac) * c["log_small"]))
            sigma = sigma * c["noisy"]
        else:
            sigma = c["sigma"]
    else:
        prev = c["sqrt_abar_s"] * x0 + c["direction"] * eps
        sigma = c["sigma"]
    if noise is not None:  # where, not a product: a step at t = 0 adds nothing, even for a NaN variance
        adds = c["noisy"] if spec.learned_variance else sigma
        prev = prev + torch.where(torch.as_tensor(adds != 0, device=prev.device), sigma * noise, 0.0)
    return prev, x0


def row_update(spec: StepSpec, names, row, stream, model_output, sample, *, noise=None, draws=False, seed=0, offset=0,
               guidance_scale=None):
    """``torch_update`` on one step's coefficients held in a tensor (fp32, the ``torch_coefficients``
    columns ``names``, in order), with no host read: what torch.compile fuses, the counter noise
    included, into one loop (the compiled CPU sampling loop's DDPM/DDIM step). noise: z like the
    sample, or None: drawn when ``draws`` from counter stream ``stream`` (an int64 tensor), element
    g of the flat batch at counter element offset + g (``offset`` in elements; ``seed`` an int or an
    int64 tensor). Returns x_prev in the sample's dtype."""
    from fastgen.reference.random import normals

    if noise is None and draws:
        noise = normals(sample.numel(), seed=seed, stream=stream.reshape(1), offset=offset, device=sample.device,
                        dtype=torch.float32).reshape(sample.shape)
    c = dict(zip(names, row.unbind()))
    prev, _ = torch_update(spec, c, guided(model_output.float(), guidance_scale), sample,
                           None if noise is None else noise.float())
    return prev.to(sample.dtype)


def _counter_noise(sample, t_host, *, seed, offset, backend_arg):
    """A torch step's counter noise (fp32): stream t[b] for sample b (``reference.diffusion.noise_like``),
    or, where every sample has one timestep and the CPU runs compiled (fastgen._compile), the same
    normals from the compiled Philox loop."""
    from fastgen import _compile

    if (_compile.runs_compiled(backend_arg, "torch", sample.device) and not isinstance(seed, torch.Tensor)
            and bool((t_host == t_host[0]).all())):  # runs_compiled first: never true while tracing
        from fastgen.ops.random import compiled_normals

        return compiled_normals(sample.shape, seed, int(t_host[0]), offset)
    from fastgen.reference import diffusion as ref

    return ref.noise_like(sample.shape, t_host, seed=seed, offset=offset).to(sample.device, torch.float32)


def _torch_step(spec, model_output, t, prev_t, sample, schedule, *, seed, noise, offset, return_x0,
                backend_arg="torch"):
    """The "torch" backend of a step: torch_coefficients for each sample's (t, prev_t), then torch_update.
    Timesteps on a device are read back (this path runs on the host anyway), except while
    torch.compile traces the step: then the coefficients are computed from the timestep tensors in
    the graph (the schedule's tables are its constants), so one graph serves every step."""
    prev = empty(sample.shape, dtype=sample.dtype, device=sample.device)
    x0 = empty(sample.shape, dtype=sample.dtype, device=sample.device) if return_x0 else None
    if sample.numel() == 0:
        return prev, x0
    batch = sample.shape[0]
    t_host = torch.as_tensor(t).to("cpu", torch.int64).expand(batch)
    prev_host = t_host - 1 if prev_t is None else torch.as_tensor(prev_t).to("cpu", torch.int64).expand(batch)
    if torch.compiler.is_compiling():
        shape = (batch,) + (1,) * (sample.dim() - 1)
        c = {name: column.float().reshape(shape) for name, column in
             torch_coefficients(spec, schedule, t_host, prev_host).items()}
    else:
        c = _torch_step_coefficients(spec, schedule, t_host, prev_host, sample)
    if noise is None and spec.adds_noise:
        noise = _counter_noise(sample, t_host, seed=seed, offset=offset, backend_arg=backend_arg)
    prev_fp32, x0_fp32 = torch_update(spec, c, model_output, sample, None if noise is None else noise.float())
    prev.copy_(prev_fp32)
    if x0 is not None:
        x0.copy_(x0_fp32)
    return prev, x0


def _torch_step_coefficients(spec, schedule, t_host, prev_host, sample) -> dict:
    """torch_coefficients of a batch's steps as fp32 tensors broadcasting over ``sample``, cached on the
    schedule (a scheduler steps along the same few timesteps over and over): the per-call cost of the
    torch step is then its whole-tensor ops alone."""
    key = ("torch_step", spec, sample.device, sample.dim(), tuple(t_host.tolist()), tuple(prev_host.tolist()))
    if key not in schedule._cache:
        if len(schedule._cache) > 4096:  # bounded: a run touches at most T steps per configuration
            schedule._cache.clear()
        columns = torch_coefficients(spec, schedule, t_host, prev_host)
        shape = (len(t_host),) + (1,) * (sample.dim() - 1)
        schedule._cache[key] = {name: column.to(device=sample.device, dtype=torch.float32).reshape(shape)
                                for name, column in columns.items()}
    return schedule._cache[key]

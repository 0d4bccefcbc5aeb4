"""DDIMScheduler: a drop-in for diffusers' DDIMScheduler whose step is one fused pass (``fastgen.ddim_step``).

Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models", arXiv 2010.02502. A step from timestep
t to s = t - T // N (N = num_inference_steps; s < 0 means the end, where abar_s = 1 with
set_alpha_to_one, else abar_0):

    x0      = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)     epsilon (eps = model output)    eq. (9)
            = model output,  eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)        sample
            = sqrt(abar_t) x_t - sqrt(1 - abar_t) v,  eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t
                                                                                     v_prediction
    x0      = clamp(x0, -s_b, s_b) / s_b (dynamic thresholding)  or  clamp(x0, -r, r) (clip_sample);
              use_clipped_model_output recomputes eps from the clipped x0
    sigma   = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s)                   eq. (16)
    x_s     = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + sigma z,  z ~ N(0, I)          eq. (12)

eta = 0 is the deterministic DDIM; eta = 1 the DDPM posterior variance.

Noise (eta > 0): by default z is drawn exactly as diffusers draws it (``randn_tensor(model_output.shape,
generator=...)`` at every step), or taken from ``variance_noise``; the same generator gives diffusers'
result (to fp32 rounding against diffusers with a float64 schedule; stock diffusers' float32 schedule
is up to ~1e-3 away near t = 1). ``step(..., seed=)``
draws z in the kernel from fastgen's counter-based stream (stream t, element offset + b n + g):
no noise tensor, and sample k is the same in any batch (``offset=k * n`` for a shard from sample k).

Known diffusers quirk, matched on purpose: s = t - T // N for every spacing, so with "linspace"
(and "trailing" when N does not divide T) s is not the next inference timestep (e.g. T = 1000,
N = 10, linspace: 999 -> 899 while the next timestep is 888). Parity with diffusers needs it, so it
is the default. For a chain that steps exactly along its timesteps pass them as custom timesteps
(a fastgen extension): ``set_timesteps(timesteps=[...])`` makes s the next one in the list.

Numerics: sqrt(1 - abar_s - sigma^2) is clamped at 0 (with eta = 1 and a zero-SNR schedule the value
is 0 and rounding can make it negative: diffusers then returns NaN). The fused kernel forms it in
fp32 by subtraction, so where abar_t ~ 0 (cosine / zero-SNR schedules at t = T - 1) it carries
~sqrt(fp32 eps) ~ 3e-4 absolute error, as diffusers' own fp32 path does.

Other differences: unsupported config values raise ValueError at construction (diffusers: at the
first step, or NotImplementedError); "laplace" and "sigmoid" beta schedules are accepted (as in
DDPMScheduler); a model output of the wrong shape or device raises ValueError.
"""
import torch

import fastgen
from fastgen.schedulers._common import SchedulerBase, SchedulerOutput, randn_tensor


class DDIMSchedulerOutput(SchedulerOutput):
    """``prev_sample`` (x_{t-1}) and ``pred_original_sample`` (x_0) of a DDIMScheduler step."""


class DDIMScheduler(SchedulerBase):
    """diffusers' DDIMScheduler, same arguments and defaults (see diffusers' documentation), with a fused step.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr:
            the noise schedule (``fastgen.NoiseSchedule``).
        clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value,
            prediction_type, timestep_spacing, steps_offset: as in DDPMScheduler.
        set_alpha_to_one: abar after the last step is 1 (else abar_0).
        backend (keyword-only, not part of the config): "auto", "triton" or "torch" for the fused ops.
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 clip_sample_range: float = 1.0, sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False, *, backend: str = "auto"):
        config = {k: v for k, v in locals().items() if k in self._config_keys()}
        self._setup(config, backend)
        self.final_alpha_cumprod = self.one.clone() if self.config.set_alpha_to_one else self.alphas_cumprod[0].clone()

    def set_timesteps(self, num_inference_steps: int = None, device=None, timesteps=None):
        """The inference timesteps (descending, in ``self.timesteps`` on ``device``): ``num_inference_steps``
        spaced by ``config.timestep_spacing`` (steps go t -> t - T // N, as in diffusers), or custom
        ``timesteps`` (a fastgen extension: descending, in [0, T); steps go to the next one in the list)."""
        super().set_timesteps(num_inference_steps, device, timesteps)

    def previous_timestep(self, timestep):
        """The timestep a step from ``timestep`` lands on: t - T // N (below 0: -1, the end), or the next
        custom timestep."""
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        if self.custom_timesteps:
            return self._scheduled_prev(timestep)
        prev = timestep - self.config.num_train_timesteps // self.num_inference_steps
        return max(prev, -1) if isinstance(prev, int) else prev.clamp_min(-1)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise=None, return_dict: bool = True,
             *, seed=None, offset: int = 0, backend=None):
        """x_t -> x_{prev} (module docstring), one fused pass.

        Args:
            model_output, timestep, sample, generator, return_dict, seed, offset, backend: as
                DDPMScheduler.step.
            eta: in [0, 1], the weight of the noise (0: deterministic DDIM, 1: DDPM's variance).
            use_clipped_model_output: recompute eps from the clipped x0.
            variance_noise: the noise z itself, like ``sample`` (not with ``generator`` or ``seed``).
        Returns DDIMSchedulerOutput(prev_sample, pred_original_sample).
        """
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        backend = self.backend if backend is None else backend
        offset = self._noise_source(generator, seed, offset)
        t = self._timestep(timestep, sample)
        noise_dtype = getattr(model_output, "dtype", None)  # diffusers draws in the model output's dtype
        model_output = self._tensors(model_output, sample, sample.shape, "the sample's shape")
        prev_t = self.previous_timestep(t)
        noise = None
        if isinstance(eta, bool) or not isinstance(eta, (int, float)):
            raise TypeError(f"eta must be a number in [0, 1], got {type(eta).__name__} {eta!r}")
        if eta > 0:
            if variance_noise is not None and (generator is not None or seed is not None):
                raise ValueError(
                    "Cannot pass both generator and variance_noise. Please make sure that either `generator` or"
                    " `variance_noise` stays `None` (and seed too).")
            if variance_noise is not None:
                _check_noise(variance_noise, sample)
                noise = variance_noise.to(sample.dtype)
            elif seed is None:
                noise = randn_tensor(sample.shape, generator=generator, device=model_output.device,
                                     dtype=noise_dtype).to(sample.dtype)
        cfg = self.config
        prev_sample, pred_original_sample = fastgen.ddim_step(
            model_output, t, prev_t, sample, self.schedule, eta=eta, prediction_type=cfg.prediction_type,
            clip_sample=cfg.clip_sample, clip_sample_range=cfg.clip_sample_range, thresholding=cfg.thresholding,
            dynamic_thresholding_ratio=cfg.dynamic_thresholding_ratio, sample_max_value=cfg.sample_max_value,
            use_clipped_model_output=use_clipped_model_output, set_alpha_to_one=cfg.set_alpha_to_one,
            seed=0 if seed is None else seed, noise=noise, offset=offset, backend=backend)
        if not return_dict:
            return prev_sample, pred_original_sample
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


def _check_noise(noise, sample):
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise TypeError(f"variance_noise must be a float tensor, got {type(noise).__name__}")
    if noise.device != sample.device or noise.shape != sample.shape:
        raise ValueError(f"variance_noise must have the sample's shape {tuple(sample.shape)} on {sample.device}, "
                         f"got {tuple(noise.shape)} on {noise.device}")

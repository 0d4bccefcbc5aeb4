"""DDPMScheduler: a drop-in for diffusers' DDPMScheduler whose step is one fused pass (``fastgen.ddpm_step``).

Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", arXiv 2006.11239. A step from
timestep t to s (the next inference timestep; t - 1 before ``set_timesteps``; s = -1 at the end,
abar_{-1} = 1), with beta_{t|s} = 1 - abar_t / abar_s:

    x0  = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)                    epsilon         eq. (15)
        = model output                                                   sample
        = sqrt(abar_t) x_t - sqrt(1 - abar_t) v                          v_prediction    (Salimans & Ho 2022)
    x0  = clamp(x0, -s_b, s_b) / s_b (dynamic thresholding, Imagen)  or  clamp(x0, -r, r) (clip_sample)
    mu  = sqrt(abar_s) beta_{t|s} / (1 - abar_t) x0 + sqrt(abar_t / abar_s) (1 - abar_s) / (1 - abar_t) x_t
                                                                                         eq. (7)
    x_s = mu + [t > 0] sigma z,  z ~ N(0, I)                                             Algorithm 2
    sigma^2 = beta~ = (1 - abar_s) / (1 - abar_t) beta_{t|s}  (>= 1e-20)   fixed_small(_log)   eq. (7)
            = beta_{t|s}                                                fixed_large(_log)   sec. 3.2
            = v (the model's second C channels)                         learned
            = exp(f log beta_{t|s} + (1 - f) log beta~), f = (v + 1) / 2  learned_range (Nichol & Dhariwal eq. 15)

Noise: by default z is drawn exactly as diffusers draws it (``randn_tensor(model_output.shape,
generator=...)``, only when t > 0), so the same generator gives diffusers' result: to fp32 rounding
when diffusers' schedule is computed in float64; stock diffusers computes it in float32 (a float32
cumprod and 1 - abar_t / abar_s, which cancels near t = 1), which puts it up to ~1e-3 away there.
``step(..., seed=)`` instead draws z in the kernel from fastgen's counter-based stream (stream t,
element offset + b n + g): no noise tensor, and sample k is the same in any batch (pass
``offset=k * n`` for a shard starting at sample k).

Where this differs from diffusers (0.42) on purpose:
  * variance_type="fixed_large_log": diffusers takes the square root of log(beta) and returns NaN for
    every t > 0; here it is the same variance as "fixed_large" (what the name means).
  * beta_schedule / prediction_type / variance_type / timestep_spacing are checked at construction
    (ValueError naming the allowed values); a timestep that is no inference timestep, custom
    timesteps below 0, and a model output of the wrong shape raise ValueError instead of an
    IndexError or a broadcast deep inside the step.
  * custom timesteps set ``num_inference_steps = len(timesteps)`` (diffusers leaves the old value).
"""
import torch

import fastgen
from fastgen.schedulers._common import SchedulerBase, SchedulerOutput, _choice, randn_tensor

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


class DDPMSchedulerOutput(SchedulerOutput):
    """``prev_sample`` (x_{t-1}) and ``pred_original_sample`` (x_0) of a DDPMScheduler step."""


class DDPMScheduler(SchedulerBase):
    """diffusers' DDPMScheduler, same arguments and defaults (see diffusers' documentation), with a fused step.

    Args:
        num_train_timesteps: T. beta_start, beta_end, beta_schedule ("linear", "scaled_linear",
            "squaredcos_cap_v2", "laplace", "sigmoid"), trained_betas (T betas), rescale_betas_zero_snr:
            the noise schedule (``fastgen.NoiseSchedule``).
        variance_type: "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned",
            "learned_range" (learned: the model output has 2C channels, the second half the variance).
        clip_sample, clip_sample_range: clamp x0 to +-range. thresholding, dynamic_thresholding_ratio,
            sample_max_value: Imagen's dynamic thresholding (takes precedence over clip_sample).
        prediction_type: "epsilon", "sample" or "v_prediction".
        timestep_spacing ("leading", "linspace", "trailing"), steps_offset: how set_timesteps spaces steps.
        backend (keyword-only, not part of the config): "auto", "triton" or "torch" for the fused ops.
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, variance_type: str = "fixed_small",
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False, *, backend: str = "auto"):
        config = {k: v for k, v in locals().items() if k in self._config_keys()}
        _choice(variance_type, "variance_type", VARIANCE_TYPES)
        self._setup(config, backend)
        self.variance_type = variance_type

    def previous_timestep(self, timestep):
        """The timestep a step from ``timestep`` lands on: the next inference timestep (-1 after the
        last one), or timestep - 1 before set_timesteps."""
        if self.custom_timesteps or self.num_inference_steps:
            return self._scheduled_prev(timestep)
        return timestep - 1

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, *, seed=None, offset: int = 0, backend=None):
        """x_t -> x_{prev} (module docstring), one fused pass.

        Args:
            model_output: the model's prediction, like ``sample`` ([B, 2C, ...] for learned variances).
            timestep: int, or an integer tensor of shape [] (e.g. an element of ``self.timesteps``) or
                [B] (one timestep per sample, a fastgen extension).
            sample: x_t, [B, C, ...] fp32/fp16/bf16 (the step runs in its dtype).
            generator: a torch.Generator or a list of B of them: the noise diffusers would draw.
            return_dict: False returns the tuple (prev_sample, pred_original_sample).
            seed, offset: fastgen's in-kernel counter-based noise instead (not with ``generator``).
            backend: overrides the constructor's backend for this step.
        Returns DDPMSchedulerOutput(prev_sample, pred_original_sample).
        """
        backend = self.backend if backend is None else backend
        offset = self._noise_source(generator, seed, offset)
        t = self._timestep(timestep, sample)
        learned = self.variance_type in ("learned", "learned_range")
        expected = sample.shape
        if learned:
            if sample.dim() < 2:
                raise ValueError("sample must have a channel dimension (dim 1) for variance_type="
                                 f"{self.variance_type!r}")
            expected = torch.Size((sample.shape[0], 2 * sample.shape[1], *sample.shape[2:]))
        what = (f"prediction and variance channels for variance_type={self.variance_type!r}" if learned
                else f"variance_type={self.variance_type!r}")
        noise_dtype = getattr(model_output, "dtype", None)  # diffusers draws in the model output's dtype
        model_output = self._tensors(model_output, sample, expected, what)
        prev_t = self.previous_timestep(t) if (self.custom_timesteps or self.num_inference_steps) else None
        noise = None
        if seed is None:
            seed = 0  # no in-kernel noise; never touches torch's global generator
            if self._any_positive(t):
                noise = randn_tensor(sample.shape, generator=generator, device=model_output.device,
                                     dtype=noise_dtype).to(sample.dtype)
        cfg = self.config
        prev_sample, pred_original_sample = fastgen.ddpm_step(
            model_output, t, sample, self.schedule, prev_t=prev_t, prediction_type=cfg.prediction_type,
            variance_type=self.variance_type, clip_sample=cfg.clip_sample, clip_sample_range=cfg.clip_sample_range,
            thresholding=cfg.thresholding, dynamic_thresholding_ratio=cfg.dynamic_thresholding_ratio,
            sample_max_value=cfg.sample_max_value, seed=seed, noise=noise, offset=offset, backend=backend)
        if not return_dict:
            return prev_sample, pred_original_sample
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

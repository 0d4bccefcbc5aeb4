"""DDIMScheduler: diffusers' DDIMScheduler whose step is one fused pass (``fastgen.ddim_step``).

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

eta = 0 is the deterministic DDIM; eta = 1 the DDPM posterior variance. s = t - T // N holds for
every timestep spacing, as in diffusers (with "linspace" it need not be the next inference timestep),
and for any t in [0, T), scheduled or not.

abar is the scheduler's own ``alphas_cumprod`` (diffusers' float32 values), so a step equals
diffusers' to fp32 rounding. Noise (eta > 0): drawn exactly as diffusers draws it
(``randn_tensor(model_output.shape, generator=...)``), or taken from ``variance_noise``;
``step(..., seed=)`` draws z in the kernel from fastgen's counter-based stream (stream t, counter
element (offset + b) n + g, n = elements per sample): no noise tensor, and sample k is the same in
any batch (``offset`` counts samples: ``offset=k`` for a shard from sample k).

Numerics: sqrt(1 - abar_s - sigma^2) is formed as a sum of non-negative terms and beta_{t|s} is
never negative, so rounding cannot turn a step into NaN (with eta = 1 on a zero-SNR schedule, or at
the last step with set_alpha_to_one=False, where diffusers' float32 difference can cancel).

Where this differs from diffusers on purpose:
  * an unknown prediction_type raises ValueError at construction (diffusers: at every step).
  * a timestep outside [0, T) and a model output or variance_noise of the wrong shape raise
    ValueError instead of an IndexError or a broadcast deep inside the step.
  * what every fastgen scheduler refuses (``fastgen.schedulers``): trained_betas of a length other
    than num_train_timesteps, a num_inference_steps that is not a positive int (diffusers accepts
    -5 and steps nowhere), a generator list not of the batch size, a missing local folder in
    ``from_pretrained``.
"""
import diffusers
import torch

import fastgen
from fastgen import _checks
from fastgen.schedulers._common import FusedStepMixin, with_backend
from fastgen.step_spec import StepSpec


class DDIMScheduler(FusedStepMixin, diffusers.DDIMScheduler):
    """diffusers' DDIMScheduler (same arguments, defaults, config, save/load and timesteps) with a fused
    ``step`` and ``add_noise``; ``backend`` (keyword-only, not part of the config): "auto", "triton",
    "torch" or "reference", as for every op."""

    __init__ = with_backend(diffusers.DDIMScheduler)
    _inference_steps_capped = True  # diffusers' set_timesteps: num_inference_steps <= num_train_timesteps
    __module__ = "fastgen"  # what a saved pipeline's model_index.json records: ["fastgen", "DDIMScheduler"]

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise=None, return_dict: bool = True,
             *, seed=None, offset: int = 0, backend=None):
        """x_t -> x_{prev} (module docstring), one fused pass.

        Args:
            model_output, timestep, sample, generator, return_dict, seed, offset, backend: as
                DDPMScheduler.step.
            eta: in [0, 1], the weight of the noise (0: deterministic DDIM, 1: DDPM's variance).
            use_clipped_model_output: recompute eps from the clipped x0 (None: False, as pipelines pass it).
            variance_noise: the noise z itself, like ``sample`` (not with ``generator`` or ``seed``).
        Returns DDIMSchedulerOutput(prev_sample, pred_original_sample).
        """
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        backend = self._backend_arg(backend)
        offset = self._noise_source(generator, seed, offset, variance_noise, sample=sample)
        clipped = False if use_clipped_model_output is None else use_clipped_model_output  # pipelines pass None
        spec = StepSpec.from_config("ddim", self.config, eta=eta, use_clipped_model_output=clipped)
        t, t_host = self._timestep(timestep, sample)
        noise_dtype = getattr(model_output, "dtype", None)  # diffusers draws in the model output's dtype
        model_output = self._tensors(model_output, sample, sample.shape, "the sample's shape")
        prev_t = spec.prev_timesteps(t if t_host is None else [t_host], self.config.num_train_timesteps,
                                     self.num_inference_steps)
        prev_t = prev_t if t_host is None else prev_t[0]
        noise = None
        if spec.adds_noise and seed is None:
            if variance_noise is not None:
                _checks.float_tensor(variance_noise, "variance_noise")
                noise = _checks.like(variance_noise.to(sample.dtype), "variance_noise", sample, "sample")
            else:
                noise = self._draw(sample.shape, generator, sample, noise_dtype)
        prev_sample, pred_original_sample = fastgen.ddim_step(
            model_output, t, prev_t, sample, self.schedule, spec=spec, seed=0 if seed is None else seed, noise=noise,
            offset=offset, backend=backend)
        if not return_dict:
            return prev_sample, pred_original_sample
        return diffusers.schedulers.scheduling_ddim.DDIMSchedulerOutput(
            prev_sample=prev_sample, pred_original_sample=pred_original_sample)

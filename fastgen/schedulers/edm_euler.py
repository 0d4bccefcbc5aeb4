"""EDMEulerScheduler: diffusers' EDMEulerScheduler (EDM-trained models: the preconditioned denoiser)
whose step is one fused pass.

Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models" (the equations,
the float64 reference and the coefficient table: fastgen/reference/edm.py). Per step, from sigma_i to
sigma_i+1 (sigma^ = sigma_i (1 + gamma_i), gamma_i = min(s_churn / N, sqrt(2) - 1) in [s_tmin, s_tmax]):

    x^    = x + s_noise sqrt(sigma^^2 - sigma_i^2) z                     (churn, gamma_i > 0 only)
    D     = c_skip(sigma^) x^ + c_out(sigma^) F                          (Table 1; F at the pre-churn
                                                                          sample, as diffusers)
    x_i+1 = x^ + (sigma_i+1 - sigma^) (x^ - D) / sigma^

``sigma_schedule`` ("karras" / "exponential"), ``final_sigmas_type`` and custom ``sigmas`` are diffusers'
``set_timesteps``. Noise (s_churn > 0): diffusers' draw from ``generator``, or ``step(..., seed=,
offset=)``: counter-based noise, sample k the same in any batch (offset counts samples).
"""
import diffusers
import torch
from diffusers.schedulers import scheduling_edm_euler

from fastgen.reference import edm  # noqa: F401  (registers the table builder)
from fastgen.schedulers._common import with_backend
from fastgen.schedulers._sigma import SigmaStepMixin, refuse_step_index


class EDMEulerScheduler(SigmaStepMixin, diffusers.EDMEulerScheduler):
    """diffusers' EDMEulerScheduler (same arguments, defaults, config, save/load, timesteps and sigmas)
    with a fused ``step``; ``backend`` (keyword-only, not part of the config): "auto", "triton",
    "torch" or "reference"."""

    __init__ = with_backend(diffusers.EDMEulerScheduler)
    __module__ = "fastgen"  # a saved pipeline records ["fastgen", "EDMEulerScheduler"]
    _step_defaults = dict(s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0)  # step()'s defaults

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             return_dict: bool = True, pred_original_sample=None, *, seed=None, offset: int = 0, backend=None):
        """x_i -> x_i+1 (module docstring), one fused pass.

        Args:
            model_output: the network's output F at ``scale_model_input(sample, timestep)``, like ``sample``.
            timestep: one of ``scheduler.timesteps`` (not an index).
            sample: x_i [B, ...] fp32/fp16/bf16.
            s_churn, s_tmin, s_tmax, s_noise: Karras et al.'s churn (s_churn >= 0; 0: no noise).
            generator: diffusers' noise; seed, offset: fastgen's counter-based noise; at most one of them.
            return_dict: EDMEulerSchedulerOutput or a tuple.
            pred_original_sample: D itself (diffusers' argument): then the step is diffusers' own.
            backend: this step's backend (default: the scheduler's).
        Returns EDMEulerSchedulerOutput(prev_sample, pred_original_sample).
        """
        refuse_step_index(timestep, "EDMEulerScheduler")
        if pred_original_sample is not None:
            if seed is not None:
                raise ValueError("seed= needs the fused step: pred_original_sample runs diffusers' own step, pass "
                                 "generator= instead")
            return super().step(model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator,
                                return_dict, pred_original_sample)
        self._warn_unless_scaled(scheduling_edm_euler.logger)
        prev_sample, denoised = self._fused_step(model_output, timestep, sample, generator=generator, seed=seed,
                                                 offset=offset, backend=backend, s_churn=s_churn, s_tmin=s_tmin,
                                                 s_tmax=s_tmax, s_noise=s_noise)
        if not return_dict:
            return prev_sample, denoised
        return scheduling_edm_euler.EDMEulerSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

"""EulerDiscreteScheduler: diffusers' EulerDiscreteScheduler whose step is one fused pass.

Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", arXiv
2206.00364: the Euler step with the churn of their Alg. 2, as diffusers' EulerDiscreteScheduler
takes it (the equations, the float64 reference and the coefficient table: fastgen/reference/karras.py).
Per step, from sigma_i to sigma_i+1, with F the model output the caller evaluated at the pre-churn
sample (``scale_model_input(x_i, t_i)``, noise level sigma_i):

    sigma^ = sigma_i (1 + gamma_i),  gamma_i = min(s_churn / N, sqrt(2) - 1) where s_tmin <= sigma_i <= s_tmax
    x^     = x + s_noise sqrt(sigma^^2 - sigma_i^2) z                          (churn, gamma_i > 0 only)
    D      = x^ - sigma^ F | x^ / (sigma_i^2 + 1) - sigma_i / sqrt(sigma_i^2 + 1) F | F
                                                  (epsilon | v_prediction | sample)
    x_i+1  = x^ + (sigma_i+1 - sigma^) (x^ - D) / sigma^

That is, the output F at x_i is reused at the churned x^ (diffusers' convention, kept for drop-in
parity: the same trajectory as diffusers from the same generator). Alg. 2 proper evaluates the
denoiser at the churned sample, D(x^; sigma^), which needs the model called after the churn noise is
added, i.e. a model call inside the step; a scheduler's step is handed F and cannot make it.
``fastgen.sample(..., s_churn=)`` runs that form: its loop adds the churn before the model call and
calls the model at x^ and the timestep of sigma^. Without churn (s_churn = 0, the default) the two
agree: Alg. 1's Euler step. Alg. 2's second-order correction is not taken either.

Every sigma option of diffusers' class works unchanged (``use_karras_sigmas``, ``use_exponential_sigmas``,
``use_beta_sigmas``, ``interpolation_type``, ``timestep_spacing``, ``timestep_type``, ``final_sigmas_type``,
custom ``sigmas`` / ``timesteps``): diffusers' ``set_timesteps`` computes the sigmas, and the step's
coefficients are made from them once per run (per churn setting) in float64.

Noise (s_churn > 0): diffusers' draw from ``generator`` (the same trajectory as diffusers to fp32
rounding), or ``step(..., seed=, offset=)``: in-kernel counter-based noise, stream = the step index,
sample k the same in any batch (offset counts samples).
"""
import diffusers
import torch
from diffusers.schedulers import scheduling_euler_discrete

from fastgen.reference import karras  # also registers the table builder
from fastgen.schedulers._common import with_backend
from fastgen.schedulers._sigma import SigmaStepMixin, refuse_step_index


class EulerDiscreteScheduler(SigmaStepMixin, diffusers.EulerDiscreteScheduler):
    """diffusers' EulerDiscreteScheduler (same arguments, defaults, config, save/load, timesteps and
    sigmas) with a fused ``step``; ``backend`` (keyword-only, not part of the config): "auto",
    "triton", "torch" or "reference"."""

    __init__ = with_backend(diffusers.EulerDiscreteScheduler)
    _prediction_types = karras.EULER_PREDICTION_TYPES
    _needs_set_timesteps = False  # diffusers' step also runs on the training schedule
    _step_defaults = dict(s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0)  # step()'s defaults
    __module__ = "fastgen"  # what a saved pipeline's model_index.json records: ["fastgen", "EulerDiscreteScheduler"]

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             return_dict: bool = True, *, seed=None, offset: int = 0, backend=None):
        """x_i -> x_i+1 (module docstring), one fused pass.

        Args:
            model_output: the model's output at ``scale_model_input(sample, timestep)``, like ``sample``.
            timestep: one of ``scheduler.timesteps`` (not an index).
            sample: x_i [B, ...] fp32/fp16/bf16.
            s_churn, s_tmin, s_tmax, s_noise: Karras et al.'s churn (s_churn >= 0; 0: no noise).
            generator: diffusers' noise (torch.Generator); seed, offset: fastgen's counter-based noise
                (offset counts samples); at most one of them.
            return_dict: EulerDiscreteSchedulerOutput or a tuple.
            backend: this step's backend (default: the scheduler's).
        Returns EulerDiscreteSchedulerOutput(prev_sample, pred_original_sample).
        """
        refuse_step_index(timestep, "EulerDiscreteScheduler")
        self._warn_unless_scaled(scheduling_euler_discrete.logger)
        prev_sample, denoised = self._fused_step(model_output, timestep, sample, generator=generator, seed=seed,
                                                 offset=offset, backend=backend, s_churn=s_churn, s_tmin=s_tmin,
                                                 s_tmax=s_tmax, s_noise=s_noise)
        if not return_dict:
            return prev_sample, denoised
        return scheduling_euler_discrete.EulerDiscreteSchedulerOutput(prev_sample=prev_sample,
                                                                      pred_original_sample=denoised)

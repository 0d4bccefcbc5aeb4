"""EulerAncestralDiscreteScheduler: diffusers' EulerAncestralDiscreteScheduler whose step is one fused pass.

The ancestral Euler step (k-diffusion's sample_euler_ancestral; the equations, the float64 reference
and the coefficient table: fastgen/reference/karras.py). Per step, from sigma_i to sigma_i+1:

    sigma_up = sqrt(sigma_i+1^2 (sigma_i^2 - sigma_i+1^2) / sigma_i^2),  sigma_down = sqrt(sigma_i+1^2 - sigma_up^2)
    D        = x - sigma_i F | x / (sigma_i^2 + 1) - sigma_i / sqrt(sigma_i^2 + 1) F    (epsilon | v_prediction)
    x_i+1    = x + (sigma_down - sigma_i) (x - D) / sigma_i + sigma_up z

Every step draws noise: diffusers' draw from ``generator`` (diffusers' trajectory to fp32 rounding), or
``step(..., seed=, offset=)``: in-kernel counter-based noise (stream = the step index), so sample k
is the same whatever the batch it is drawn in (offset counts samples): the same seed gives the same
image at any batch size.
"""
import diffusers
import torch
from diffusers.schedulers import scheduling_euler_ancestral_discrete

from fastgen.reference import karras  # also registers the table builder
from fastgen.schedulers._common import with_backend
from fastgen.schedulers._sigma import SigmaStepMixin, refuse_step_index


class EulerAncestralDiscreteScheduler(SigmaStepMixin, diffusers.EulerAncestralDiscreteScheduler):
    """diffusers' EulerAncestralDiscreteScheduler (same arguments, defaults, config, save/load, timesteps
    and sigmas) with a fused ``step``; ``backend`` (keyword-only, not part of the config): "auto",
    "triton", "torch" or "reference"."""

    __init__ = with_backend(diffusers.EulerAncestralDiscreteScheduler)
    _prediction_types = karras.ANCESTRAL_PREDICTION_TYPES  # diffusers' step has no "sample"
    _needs_set_timesteps = False  # diffusers' step also runs on the training schedule
    __module__ = "fastgen"  # a saved pipeline records ["fastgen", "EulerAncestralDiscreteScheduler"]

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, *, seed=None, offset: int = 0, backend=None):
        """x_i -> x_i+1 (module docstring), one fused pass.

        Args:
            model_output: the model's output at ``scale_model_input(sample, timestep)``, like ``sample``.
            timestep: one of ``scheduler.timesteps`` (not an index).
            sample: x_i [B, ...] fp32/fp16/bf16.
            generator: diffusers' noise (torch.Generator); seed, offset: fastgen's counter-based noise
                (offset counts samples); at most one of them. Neither: torch's global generator, as diffusers.
            return_dict: EulerAncestralDiscreteSchedulerOutput or a tuple.
            backend: this step's backend (default: the scheduler's).
        Returns EulerAncestralDiscreteSchedulerOutput(prev_sample, pred_original_sample).
        """
        refuse_step_index(timestep, "EulerDiscreteScheduler")  # diffusers' own message names that class
        self._warn_unless_scaled(scheduling_euler_ancestral_discrete.logger)
        prev_sample, denoised = self._fused_step(model_output, timestep, sample, generator=generator, seed=seed,
                                                 offset=offset, backend=backend)
        if not return_dict:
            return prev_sample, denoised
        return scheduling_euler_ancestral_discrete.EulerAncestralDiscreteSchedulerOutput(
            prev_sample=prev_sample, pred_original_sample=denoised)

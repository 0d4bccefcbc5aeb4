"""LMSDiscreteScheduler: diffusers' LMSDiscreteScheduler whose step is one fused pass.

The linear multistep (Adams) method on the probability-flow ODE in sigma (the equations, the float64
reference and the coefficient table: fastgen/reference/lms.py). Per step, from sigma_i to sigma_i+1,
with d_j = (x_j - D(x_j; sigma_j)) / sigma_j the ODE's derivative at step j:

    x_i+1 = x_i + sum_{k < p} c_k d_i-k,   c_k = integral_{sigma_i}^{sigma_i+1} of the Lagrange basis
                                                 polynomial through sigma_i, ..., sigma_i-p+1

p = min(step index + 1, order). The last order - 1 derivatives stay on the device between steps, in a
ring the kernel writes as it steps. Fused: step()'s order 1 to 5 (default 4), every prediction type,
every sigma option (Karras, exponential, beta) and timestep spacing, a run started mid-schedule
(``set_begin_index``). order > 5 steps with diffusers' own ``step``. The step draws no noise.

pred_original_sample is x_i - sigma_i d_i, formed from the kept derivative (one more pass; diffusers
returns it from every step).
"""
import warnings

import diffusers
import torch
from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteSchedulerOutput

from fastgen.reference import lms
from fastgen.schedulers._common import with_backend
from fastgen.schedulers._sigma import SigmaStepMixin


class LMSDiscreteScheduler(SigmaStepMixin, diffusers.LMSDiscreteScheduler):
    """diffusers' LMSDiscreteScheduler (same arguments, defaults, config, save/load, timesteps and
    sigmas) with a fused ``step``; ``backend`` (keyword-only, not part of the config): "auto",
    "triton", "torch" or "reference"."""

    __init__ = with_backend(diffusers.LMSDiscreteScheduler)
    _prediction_types = lms.PREDICTION_TYPES
    _needs_set_timesteps = False  # diffusers' step also runs on the training schedule
    _step_defaults = dict(order=4, start=0)
    __module__ = "fastgen"  # a saved pipeline records ["fastgen", "LMSDiscreteScheduler"]

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, order: int = 4,
             return_dict: bool = True, *, backend=None):
        """x_i -> x_i+1 (module docstring), one fused pass.

        Args:
            model_output: the model's output at ``scale_model_input(sample, timestep)``, like ``sample``.
            timestep: one of ``scheduler.timesteps``.
            sample: x_i [B, ...] fp32/fp16/bf16.
            order: the multistep order (1 to 5 fused; more: diffusers' own step).
            return_dict: LMSDiscreteSchedulerOutput or a tuple.
            backend: this step's backend (default: the scheduler's).
        Returns LMSDiscreteSchedulerOutput(prev_sample, pred_original_sample).
        """
        if lms.fused_settings(order) is not None:
            return super().step(model_output, timestep, sample, order=order, return_dict=return_dict)
        if not self.is_scale_input_called:
            warnings.warn("The `scale_model_input` function should be called before `step` to ensure correct "
                          "denoising. See `StableDiffusionPipeline` for a usage example.")
        if self.step_index is None:
            self._init_step_index(timestep)
        if self._run_start is None:
            self._run_start = self.step_index  # the run's first step (its derivatives start there)
        sigma = self._sigma_values[self.step_index].to(sample.device)  # a tensor: no host read, no recompile per step
        prev_sample, derivative = self._fused_step(model_output, timestep, sample, backend=backend, order=order,
                                                   start=int(self._run_start))
        pred_original_sample = (sample.float() - sigma * derivative.float()).to(sample.dtype)  # x_i - sigma_i d_i
        if not return_dict:
            return prev_sample, pred_original_sample
        return LMSDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def _prepare_tables(self):
        """After ``set_timesteps``: the tables of every fused order, and the sigmas on the timesteps'
        device (a step traced by torch.compile only reads them)."""
        device = torch.as_tensor(self.timesteps).device
        self._sigma_values = self.sigmas.detach().to(device, torch.float32)
        super()._prepare_tables()
        try:
            for order in range(1, lms.MAX_FUSED_ORDER + 1):
                self._step_table(order=order, start=0).on(device)
        except (ValueError, TypeError):  # left to the step to raise
            return

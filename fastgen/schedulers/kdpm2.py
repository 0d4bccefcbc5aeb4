"""KDPM2DiscreteScheduler and KDPM2AncestralDiscreteScheduler: diffusers' DPM-Solver-2 in sigma space (k-diffusion's DPM2) whose every stage
is one fused pass.

Karras et al. 2022 sec. 4 / k-diffusion's sample_dpm_2 (the equations, the float64 reference and the
coefficient table: fastgen/reference/karras.py). diffusers interleaves each step's log-space midpoint
sigma_mid = sqrt(sigma_i sigma_i+1) with the sigmas, so a step is two calls of ``step``:

    x_mid  = x_i + (sigma_mid - sigma_i) (x_i - D(x_i; sigma_i)) / sigma_i             the first stage
    x_i+1  = x_i + (sigma_i+1 - sigma_i) (x - D(x; sigma_mid)) / sigma_mid             the second, at x

The step's start x_i stays on the device between the two calls (the first stage's denoised output,
which diffusers keeps as ``sample``). prediction_type "sample" is refused, as diffusers' step refuses it.
"""
import diffusers
import torch
from diffusers.schedulers.scheduling_k_dpm_2_ancestral_discrete import KDPM2AncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_k_dpm_2_discrete import KDPM2DiscreteSchedulerOutput

from fastgen.reference import karras
from fastgen.schedulers._common import with_backend
from fastgen.schedulers.heun import TwoStageMixin


class KDPM2DiscreteScheduler(TwoStageMixin, diffusers.KDPM2DiscreteScheduler):
    """diffusers' KDPM2DiscreteScheduler (same arguments, defaults, config, save/load, timesteps and
    sigmas) with a fused ``step``; ``backend`` (keyword-only, not part of the config): "auto",
    "triton", "torch" or "reference"."""

    __init__ = with_backend(diffusers.KDPM2DiscreteScheduler)
    _prediction_types = karras.ANCESTRAL_PREDICTION_TYPES
    __module__ = "fastgen"  # a saved pipeline records ["fastgen", "KDPM2DiscreteScheduler"]

    def _set_first_stage_done(self, done: bool, sample):
        self.sample = sample if done else None  # diffusers' marker: the step's start, None in a first stage

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, *,
             seed=None, offset: int = 0, backend=None):
        """One stage (module docstring), one fused pass.

        Args:
            model_output: the model's output at ``scale_model_input(sample, timestep)``, like ``sample``.
            timestep: one of ``scheduler.timesteps``.
            sample: x [B, ...] fp32/fp16/bf16.
            return_dict: KDPM2DiscreteSchedulerOutput or a tuple.
            seed, offset: accepted for the common interface (KDPM2 draws no noise).
            backend: this step's backend (default: the scheduler's).
        Returns KDPM2DiscreteSchedulerOutput(prev_sample, pred_original_sample).
        """
        prev_sample, denoised = self._two_stage_step(model_output, timestep, sample, seed=seed, offset=offset,
                                                     backend=backend)
        if not return_dict:
            return prev_sample, denoised
        return KDPM2DiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)


class KDPM2AncestralDiscreteScheduler(TwoStageMixin, diffusers.KDPM2AncestralDiscreteScheduler):
    """diffusers' KDPM2AncestralDiscreteScheduler (same arguments, defaults, config, save/load, timesteps
    and sigmas) with a fused ``step``: the stages of KDPM2DiscreteScheduler to the ancestral sigma_down,
    and sigma_up z added in the second (fastgen/reference/karras.py, ``kdpm2_ancestral_stage``). Noise:
    diffusers' draw from ``generator`` in every second stage, or ``step(..., seed=, offset=)``:
    counter-based noise, sample k the same in any batch (offset counts samples)."""

    __init__ = with_backend(diffusers.KDPM2AncestralDiscreteScheduler)
    _prediction_types = karras.ANCESTRAL_PREDICTION_TYPES
    __module__ = "fastgen"  # a saved pipeline records ["fastgen", "KDPM2AncestralDiscreteScheduler"]

    def _set_first_stage_done(self, done: bool, sample):
        self.sample = sample if done else None  # diffusers' marker: the step's start, None in a first stage

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, *, seed=None, offset: int = 0, backend=None):
        """One stage (class docstring), one fused pass.

        Args:
            model_output: the model's output at ``scale_model_input(sample, timestep)``, like ``sample``.
            timestep: one of ``scheduler.timesteps``.
            sample: x [B, ...] fp32/fp16/bf16.
            generator: diffusers' noise; seed, offset: fastgen's counter-based noise; at most one of them.
            return_dict: KDPM2AncestralDiscreteSchedulerOutput or a tuple.
            backend: this step's backend (default: the scheduler's).
        Returns KDPM2AncestralDiscreteSchedulerOutput(prev_sample, pred_original_sample).
        """
        prev_sample, denoised = self._two_stage_step(model_output, timestep, sample, generator=generator, seed=seed,
                                                     offset=offset, backend=backend)
        if not return_dict:
            return prev_sample, denoised
        return KDPM2AncestralDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

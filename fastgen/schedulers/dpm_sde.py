"""DPMSolverSDEScheduler: diffusers' DPMSolverSDEScheduler (stochastic DPM-Solver++, two stages a step)
whose every stage is one fused pass when its noise is fastgen's.

Lu et al. 2022, DPM-Solver++ with the ancestral split of each move (the equations, the float64
reference and the coefficient table: fastgen/reference/dpm_sde.py). diffusers interleaves each step's
midpoint sigma_m = sqrt(sigma_i sigma_i+1) with the sigmas, so a step is two calls of ``step``:

    x_m    = (sd_1 / sigma_i) x_i + (1 - sd_1 / sigma_i) D(x_i; sigma_i) + s_noise su_1 n_1     first stage
    x_i+1  = (sd_2 / sigma_i) x_i + (1 - sd_2 / sigma_i) D(x_m; sigma_m) + s_noise su_2 n_2     second stage

n_1, n_2: the normalised increments of one Brownian path over sigma_i -> sigma_m and sigma_i -> sigma_i+1
(correlated). The step's start x_i stays on the device between the two calls.

Noise: without ``seed=`` the step is diffusers' own (its Brownian tree from torchsde, seeded by
``noise_sampler_seed``: diffusers' trajectory exactly). With ``step(..., seed=, offset=)`` it is fused,
the increments formed from two independent counter-based halves (the first stage's stream drawn again
in the second), sample k the same in any batch: the same law as the tree, not torchsde's numbers. Pass
``seed=`` at every step of a run or at none. prediction_type "sample" is refused, as diffusers' step
refuses it.
"""
import math

import diffusers
import torch
from diffusers.schedulers.scheduling_dpmsolver_sde import DPMSolverSDESchedulerOutput

from fastgen.reference import dpm_sde
from fastgen.schedulers._common import with_backend
from fastgen.schedulers.heun import TwoStageMixin


class DPMSolverSDEScheduler(TwoStageMixin, diffusers.DPMSolverSDEScheduler):
    """diffusers' DPMSolverSDEScheduler (same arguments, defaults, config, save/load, timesteps and
    sigmas) with a fused ``step`` for ``seed=`` noise; ``backend`` (keyword-only, not part of the
    config): "auto", "triton", "torch" or "reference"."""

    __init__ = with_backend(diffusers.DPMSolverSDEScheduler)
    _prediction_types = dpm_sde.PREDICTION_TYPES
    _step_defaults = dict(start=0, s_noise=1.0)
    __module__ = "fastgen"  # a saved pipeline records ["fastgen", "DPMSolverSDEScheduler"]

    def _prepare_tables(self):
        """After ``set_timesteps``: also the sigmas as host floats (a traced step reads them as constants)."""
        self._sigma_values = self.sigmas.detach().cpu().double().tolist()
        super()._prepare_tables()

    def _set_first_stage_done(self, done: bool, sample):
        """diffusers' markers: the step's start (None in a first stage) and the midpoint sigma the second
        stage's model input is scaled by (``scale_model_input``)."""
        self.sample = sample if done else None
        i = self.step_index - 1  # the stage just taken
        self.mid_point_sigma = math.sqrt(self._sigma_values[i] * self._sigma_values[i + 1]) if done else None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True,
             s_noise: float = 1.0, *, seed=None, offset: int = 0, backend=None):
        """One stage (module docstring): diffusers' own step, or with ``seed=`` one fused pass.

        Args:
            model_output: the model's output at ``scale_model_input(sample, timestep)``, like ``sample``.
            timestep: one of ``scheduler.timesteps``.
            sample: x [B, ...] fp32/fp16/bf16.
            return_dict: DPMSolverSDESchedulerOutput or a tuple.
            s_noise: the noise's scale.
            seed, offset: fastgen's counter-based noise (offset counts samples); None: diffusers' step.
            backend: this step's backend (default: the scheduler's).
        Returns DPMSolverSDESchedulerOutput(prev_sample, pred_original_sample).
        """
        if seed is None:
            return super().step(model_output, timestep, sample, return_dict=return_dict, s_noise=s_noise)
        prev_sample, denoised = self._two_stage_step(model_output, timestep, sample, seed=seed, offset=offset,
                                                     backend=backend, s_noise=s_noise)
        if not return_dict:
            return prev_sample, denoised
        return DPMSolverSDESchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

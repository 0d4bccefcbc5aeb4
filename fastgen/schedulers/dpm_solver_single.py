"""DPMSolverSinglestepScheduler: diffusers' singlestep DPM-Solver++ whose step is one fused pass.

Lu et al. 2022, "DPM-Solver++" (the equations, the float64 reference and the coefficient table:
fastgen/reference/dpm_solver.py). Steps come in pairs (diffusers' order list): a first-order DPM-Solver++
step from s1 to s0, then the second stage from the pair's start s1 to t with the data predictions at s1
and s0 (2S), which reads the previous step's data prediction D' and this step's sample as one affine
map. "sde-dpmsolver++" (its first stage adds noise), solver_order 3, the deprecated "dpmsolver" and
learned variances run diffusers' own step (``fused_config`` says why).
"""
import diffusers
import torch
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from fastgen.reference import dpm_solver
from fastgen.schedulers._common import with_backend
from fastgen.schedulers._sigma import SigmaStepMixin


class DPMSolverSinglestepScheduler(SigmaStepMixin, diffusers.DPMSolverSinglestepScheduler):
    """diffusers' DPMSolverSinglestepScheduler (same arguments, defaults, config, save/load, timesteps
    and sigmas) with a fused ``step``; ``backend`` (keyword-only, not part of the config): "auto",
    "triton", "torch" or "reference"."""

    __init__ = with_backend(diffusers.DPMSolverSinglestepScheduler)
    _prediction_types = dpm_solver.PREDICTION_TYPES
    __module__ = "fastgen"  # a saved pipeline records ["fastgen", "DPMSolverSinglestepScheduler"]
    _run_start = None  # the step index the run started at (its first step is first order)
    _step_defaults = dict(start=0)  # a run from the first timestep
    _unknown_timestep_is_last = True

    @property
    def fused_config(self):
        """None where ``step`` is fused; else why this configuration steps with diffusers' own step."""
        return dpm_solver.singlestep_fused_settings(self.config)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, *, seed=None, offset: int = 0, backend=None):
        """x_s -> x_t (module docstring), one fused pass.

        Args:
            model_output: the model's output at (sample, timestep), like ``sample``.
            timestep: the current timestep (one of ``scheduler.timesteps``).
            sample: x_s [B, ...] fp32/fp16/bf16.
            generator: diffusers' noise (the SDE variant, diffusers' own step).
            return_dict: SchedulerOutput or a tuple.
            backend: this step's backend (default: the scheduler's).
        Returns SchedulerOutput(prev_sample).
        """
        reason = self.fused_config
        if reason is not None:
            if seed is not None:
                raise ValueError(f"seed= needs the fused step, which this configuration has not ({reason}); pass "
                                 "generator= for diffusers' step")
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        if self.step_index is None:
            self._init_step_index(timestep)
        if self._run_start is None or self.model_outputs[-1] is None:  # no model output yet: a new run
            self._run_start = self.step_index
        self._denoised = self.model_outputs[-1]  # D': diffusers' history (what the last step left there)
        prev_sample, denoised = self._fused_step(model_output, timestep, sample, generator=generator, seed=seed,
                                                 offset=offset, backend=backend, start=int(self._run_start))
        self.model_outputs = [*self.model_outputs[1:], denoised]  # diffusers' history of x0, kept as it keeps it
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

"""DPMSolverMultistepScheduler: diffusers' DPMSolverMultistepScheduler whose step is one fused pass.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
arXiv 2211.01095 (the equations, the float64 reference and the coefficient table:
fastgen/reference/dpm_solver.py). Per step from s to t (h = lambda_t - lambda_s, lambda = log(alpha / sigma)):

    x0    = the data prediction from the model output (epsilon, sample, v_prediction, flow_prediction;
            dynamic thresholding)
    x_t   = (sigma_t / sigma_s) x + alpha_t (1 - e^-h) (x0 + (x0 - x0_prev) / 2r)        "dpmsolver++" 2M
    x_t   = (sigma_t / sigma_s) e^-h x + alpha_t (1 - e^-2h) (x0 + (x0 - x0_prev) / 2r)
            + sigma_t sqrt(1 - e^-2h) z                                                 "sde-dpmsolver++" 2M

The previous data prediction x0_prev stays on the device between steps (the kernel writes x0 as it
steps). Fused: algorithm_type "dpmsolver++" / "sde-dpmsolver++", solver_order 1 / 2, solver_type
"midpoint" / "heun", every sigma option of diffusers' ``set_timesteps`` (use_karras_sigmas,
use_lu_lambdas, use_exponential_sigmas, use_beta_sigmas, use_flow_sigmas with flow_shift or
``set_timesteps(mu=)``), final_sigmas_type, lower_order_final, euler_at_final, thresholding, a run
started mid-schedule (set_begin_index). Other configurations (solver_order 3, the deprecated
"dpmsolver" / "sde-dpmsolver", learned variances) step with diffusers' own ``step``:
``fused_config`` says why; ``seed=`` needs the fused step.

Noise ("sde-dpmsolver++"): diffusers' draw from ``generator`` (diffusers' trajectory to fp32 rounding)
or ``variance_noise``, or ``step(..., seed=, offset=)``: in-kernel counter-based noise, sample k the
same in any batch (offset counts samples).
"""
import diffusers
import torch
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from fastgen.reference import dpm_solver
from fastgen.schedulers._common import with_backend
from fastgen.schedulers._sigma import SigmaStepMixin


class MultistepMixin(SigmaStepMixin):
    """The step of a DPM-Solver++ multistep scheduler on its StepTable, with diffusers' history kept as
    diffusers keeps it (``model_outputs``, ``lower_order_nums``): a configuration without a fused table
    (``fused_config`` says why) runs diffusers' own step."""

    _run_start = None  # the step index the run started at (set at its first step)
    _step_defaults = dict(start=0)  # a run from the first timestep
    _unknown_timestep_is_last = True

    def _multistep(self, model_output, timestep, sample, *, generator, variance_noise, seed, offset, backend,
                   diffusers_step):
        """(prev_sample,) of the step at ``timestep``; ``diffusers_step()``: diffusers' own step's result."""
        reason = self.fused_config
        if reason is not None:
            if seed is not None:
                raise ValueError(f"seed= needs the fused step, which this configuration has not ({reason}); pass "
                                 "generator= for diffusers' step")
            return diffusers_step()
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.lower_order_nums == 0 or self._run_start is None:
            self._run_start = self.step_index - self.lower_order_nums  # the run's first step is first order
        self._denoised = self.model_outputs[-1]  # x0_prev: diffusers' history (what the last step left there)
        prev_sample, denoised = self._fused_step(model_output, timestep, sample, generator=generator,
                                                 variance_noise=variance_noise, seed=seed, offset=offset,
                                                 backend=backend, start=int(self._run_start))
        self.model_outputs = [*self.model_outputs[1:], denoised]  # diffusers' history of x0, kept as it keeps it
        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
        return (prev_sample,)


class DPMSolverMultistepScheduler(MultistepMixin, diffusers.DPMSolverMultistepScheduler):
    """diffusers' DPMSolverMultistepScheduler (same arguments, defaults, config, save/load, timesteps and
    sigmas) with a fused ``step``; ``backend`` (keyword-only, not part of the config): "auto",
    "triton", "torch" or "reference"."""

    __init__ = with_backend(diffusers.DPMSolverMultistepScheduler)
    _prediction_types = dpm_solver.PREDICTION_TYPES
    __module__ = "fastgen"  # a saved pipeline records ["fastgen", "DPMSolverMultistepScheduler"]
    _noise_dtype = torch.float32  # diffusers draws its SDE noise in float32

    @property
    def fused_config(self):
        """None where ``step`` is fused; else why this configuration steps with diffusers' own step."""
        return dpm_solver.fused_settings(self.config)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None, variance_noise=None,
             return_dict: bool = True, *, seed=None, offset: int = 0, backend=None):
        """x_s -> x_t (module docstring), one fused pass.

        Args:
            model_output: the model's output at (sample, timestep), like ``sample``.
            timestep: the current timestep (one of ``scheduler.timesteps``).
            sample: x_s [B, ...] fp32/fp16/bf16.
            generator, variance_noise: diffusers' noise ("sde-dpmsolver++"); seed, offset: fastgen's
                counter-based noise (offset counts samples); at most one of them.
            return_dict: SchedulerOutput or a tuple.
            backend: this step's backend (default: the scheduler's).
        Returns SchedulerOutput(prev_sample).
        """
        def diffusers_step():
            return super(DPMSolverMultistepScheduler, self).step(
                model_output, timestep, sample, generator=generator, variance_noise=variance_noise, return_dict=False)

        result = self._multistep(model_output, timestep, sample, generator=generator, variance_noise=variance_noise,
                                 seed=seed, offset=offset, backend=backend, diffusers_step=diffusers_step)
        return SchedulerOutput(prev_sample=result[0]) if return_dict else result

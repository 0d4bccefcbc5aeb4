"""EDMDPMSolverMultistepScheduler: diffusers' DPM-Solver++ for EDM-trained models (the preconditioned
denoiser) whose step is one fused pass.

Lu et al. 2022, "DPM-Solver++"; Karras et al. 2022, "Elucidating the Design Space" (the equations, the
float64 reference and the coefficient table: fastgen/reference/edm.py and fastgen/reference/dpm_solver.py).
x is not rescaled (alpha = 1, sigma_t = sigma, lambda = -log sigma; the model sees c_in x), and the data
prediction is D = c_skip(sigma) x + c_out(sigma) F; per step from sigma_s to sigma_t, h = lambda_t - lambda_s:

    2M (ODE):  x_t = (sigma_t / sigma_s) x + (1 - e^-h) (D + D1 / 2),  D1 = (D - D') / r    ("midpoint")
    SDE:       x_t = (sigma_t / sigma_s) e^-h x + (1 - e^-2h) (D + D1 / 2) + sigma_t sqrt(1 - e^-2h) z

solver_order 3 runs diffusers' own step (say ``fused_config``). Noise ("sde-dpmsolver++"): diffusers' draw
from ``generator``, or ``step(..., seed=, offset=)``: counter-based noise (offset counts samples).
"""
import diffusers
import torch
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from fastgen.reference import edm
from fastgen.schedulers._common import with_backend
from fastgen.schedulers.dpm_solver import MultistepMixin


class EDMDPMSolverMultistepScheduler(MultistepMixin, diffusers.EDMDPMSolverMultistepScheduler):
    """diffusers' EDMDPMSolverMultistepScheduler (same arguments, defaults, config, save/load, timesteps
    and sigmas) with a fused ``step``; ``backend`` (keyword-only, not part of the config): "auto",
    "triton", "torch" or "reference"."""

    __init__ = with_backend(diffusers.EDMDPMSolverMultistepScheduler)
    _prediction_types = edm.EDM_PREDICTION_TYPES
    __module__ = "fastgen"  # a saved pipeline records ["fastgen", "EDMDPMSolverMultistepScheduler"]

    @property
    def fused_config(self):
        """None where ``step`` is fused; else why this configuration steps with diffusers' own step."""
        return edm.multistep_fused_settings(self.config)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, *, seed=None, offset: int = 0, backend=None):
        """x_s -> x_t (module docstring), one fused pass.

        Args:
            model_output: the network's output F at (``scale_model_input(sample)``, timestep), like ``sample``.
            timestep: the current timestep (one of ``scheduler.timesteps``).
            sample: x_s [B, ...] fp32/fp16/bf16.
            generator: diffusers' noise ("sde-dpmsolver++"); seed, offset: fastgen's counter-based noise
                (offset counts samples); at most one of them.
            return_dict: SchedulerOutput or a tuple.
            backend: this step's backend (default: the scheduler's).
        Returns SchedulerOutput(prev_sample).
        """
        def diffusers_step():
            return super(EDMDPMSolverMultistepScheduler, self).step(model_output, timestep, sample,
                                                                     generator=generator, return_dict=False)

        result = self._multistep(model_output, timestep, sample, generator=generator, variance_noise=None, seed=seed,
                                 offset=offset, backend=backend, diffusers_step=diffusers_step)
        return SchedulerOutput(prev_sample=result[0]) if return_dict else result

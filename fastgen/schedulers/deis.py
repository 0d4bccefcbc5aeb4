"""DEISMultistepScheduler: diffusers' DEISMultistepScheduler whose step is one fused pass.

Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator", arXiv 2204.13902
(the equations, the float64 reference and the coefficient table: fastgen/reference/deis.py). In
rho = sigma_t / alpha_t, with eps = (x - alpha_s x0) / sigma_s from the model's data prediction x0,
per step from s to t:

    order 1:  x_t = alpha_t (x / alpha_s + (rho_t - rho_s) eps)                                  (DDIM)
    order 2:  x_t = alpha_t (x / alpha_s + c_0 eps + c_1 eps_prev),  c_j the integrals from rho_s to
              rho_t of the Lagrange basis through (log rho_s, log rho_prev)

The previous eps stays on the device between steps (the kernel writes eps as it steps). Fused:
solver_order 1 / 2, every prediction type, thresholding, lower_order_final, every sigma option of
diffusers' ``set_timesteps`` (Karras, exponential, beta, flow sigmas), a run started mid-schedule.
solver_order 3 steps with diffusers' own ``step`` (``fused_config`` says why). The step draws no noise.
"""
import diffusers
import torch
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from fastgen.reference import deis
from fastgen.schedulers._common import with_backend
from fastgen.schedulers.dpm_solver import MultistepMixin


class DEISMultistepScheduler(MultistepMixin, diffusers.DEISMultistepScheduler):
    """diffusers' DEISMultistepScheduler (same arguments, defaults, config, save/load, timesteps and
    sigmas) with a fused ``step``; ``backend`` (keyword-only, not part of the config): "auto",
    "triton", "torch" or "reference"."""

    __init__ = with_backend(diffusers.DEISMultistepScheduler)
    _prediction_types = deis.PREDICTION_TYPES
    __module__ = "fastgen"  # a saved pipeline records ["fastgen", "DEISMultistepScheduler"]

    @property
    def fused_config(self):
        """None where ``step`` is fused; else why this configuration steps with diffusers' own step."""
        return deis.fused_settings(self.config)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, *,
             backend=None):
        """x_s -> x_t (module docstring), one fused pass.

        Args:
            model_output: the model's output at (sample, timestep), like ``sample``.
            timestep: the current timestep (one of ``scheduler.timesteps``).
            sample: x_s [B, ...] fp32/fp16/bf16.
            return_dict: SchedulerOutput or a tuple.
            backend: this step's backend (default: the scheduler's).
        Returns SchedulerOutput(prev_sample).
        """
        def diffusers_step():
            return super(DEISMultistepScheduler, self).step(model_output, timestep, sample, return_dict=False)

        result = self._multistep(model_output, timestep, sample, generator=None, variance_noise=None, seed=None,
                                 offset=0, backend=backend, diffusers_step=diffusers_step)
        return SchedulerOutput(prev_sample=result[0]) if return_dict else result

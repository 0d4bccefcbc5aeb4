"""UniPCMultistepScheduler: diffusers' UniPCMultistepScheduler whose step (corrector and predictor) is one
fused pass.

Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models", arXiv 2302.04867 (the equations, the float64 reference and the coefficient table:
fastgen/reference/unipc.py). Per step i, with m the model's data prediction (or eps, predict_x0=False):

    x_i^c  = UniC: the previous step taken again from its start with m_i included      (from step 1 on)
    x_i+1  = UniP: the multistep exponential-integrator step from x_i^c on m_i, m_i-1, ...

Both are affine in the sample and the outputs m, and the corrector's start is recovered from x_i by
inverting the previous predictor, so the step is one affine pass over x_i, m_i and the last
solver_order outputs, which stay on the device in a ring the kernel writes as it steps. Fused:
solver_order 1 to 4, solver_type "bh1" / "bh2", predict_x0 either way, every prediction type (flow
included), thresholding, lower_order_final, disable_corrector, every sigma option of diffusers'
``set_timesteps`` (Karras, exponential, beta, flow sigmas with shift or ``mu=``), both final sigmas, a
run started mid-schedule. ``solver_p`` (another scheduler as the predictor) and solver_order > 4 step
with diffusers' own ``step``: ``fused_config`` says why. The step draws no noise.

diffusers' ``last_sample``, ``model_outputs`` and ``this_order`` are not kept by the fused step (the
ring holds the outputs, the table the orders); ``lower_order_nums`` is.
"""
import diffusers
import torch
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from fastgen.reference import unipc
from fastgen.schedulers._common import with_backend
from fastgen.schedulers._sigma import SigmaStepMixin


class UniPCMultistepScheduler(SigmaStepMixin, diffusers.UniPCMultistepScheduler):
    """diffusers' UniPCMultistepScheduler (same arguments, defaults, config, save/load, timesteps and
    sigmas) with a fused ``step``; ``backend`` (keyword-only, not part of the config): "auto",
    "triton", "torch" or "reference"."""

    __init__ = with_backend(diffusers.UniPCMultistepScheduler)
    _prediction_types = unipc.PREDICTION_TYPES
    _step_defaults = dict(start=0)
    _unknown_timestep_is_last = True
    __module__ = "fastgen"  # a saved pipeline records ["fastgen", "UniPCMultistepScheduler"]

    @property
    def fused_config(self):
        """None where ``step`` is fused; else why this configuration steps with diffusers' own step."""
        if getattr(self, "solver_p", None) is not None:
            return "solver_p: the predictor is another scheduler's step"
        return unipc.fused_settings(self.config)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, *,
             backend=None):
        """x_i -> x_i+1 (module docstring), corrector and predictor in one fused pass.

        Args:
            model_output: the model's output at (sample, timestep), like ``sample``.
            timestep: the current timestep (one of ``scheduler.timesteps``).
            sample: x_i [B, ...] fp32/fp16/bf16.
            return_dict: SchedulerOutput or a tuple.
            backend: this step's backend (default: the scheduler's).
        Returns SchedulerOutput(prev_sample).
        """
        if self.fused_config is not None:
            return super().step(model_output, timestep, sample, return_dict=return_dict)
        if self.step_index is None:
            self._init_step_index(timestep)
        if self._run_start is None:
            self._run_start = self.step_index  # the run's first step: first order, no corrector
        prev_sample, _ = self._fused_step(model_output, timestep, sample, backend=backend,
                                          start=int(self._run_start))
        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

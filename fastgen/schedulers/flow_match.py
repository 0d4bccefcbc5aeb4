"""FlowMatchEulerDiscreteScheduler: diffusers' FlowMatchEulerDiscreteScheduler (SD3, FLUX, Wan,
HunyuanVideo, LTX) whose step is one fused pass.

Lipman et al. 2023, "Flow Matching for Generative Modeling"; Esser et al. 2024, "Scaling Rectified Flow
Transformers" (the equations, the float64 reference and the coefficient table:
fastgen/reference/flow_matching.py). The model predicts the velocity v of x_sigma = (1 - sigma) x0 +
sigma eps; per step, from sigma_i to sigma_i+1 of the scheduler's own (shifted) sigmas:

    x_i+1 = x + (sigma_i+1 - sigma_i) v                                 (Euler step of the ODE)
    x_i+1 = (1 - sigma_i+1) (x - sigma_i v) + sigma_i+1 z               (stochastic_sampling)

``shift``, ``use_dynamic_shifting`` (``set_timesteps(mu=)``), ``shift_terminal``, ``invert_sigmas`` and
the Karras / exponential / beta sigmas are diffusers' ``set_timesteps``; the step reads its sigmas.
With ``per_token_timesteps`` the step is diffusers' own (one sigma per token is no per-step row).

Noise (stochastic_sampling): diffusers' draw from ``generator``, or ``step(..., seed=, offset=)``:
in-kernel counter-based noise, the same for sample k in any batch (offset counts samples).
"""
import diffusers
import torch
from diffusers.schedulers import scheduling_flow_match_euler_discrete

from fastgen.reference import flow_matching  # noqa: F401  (registers the table builder)
from fastgen.schedulers._common import with_backend
from fastgen.schedulers._sigma import SigmaStepMixin, refuse_step_index


class FlowMatchEulerDiscreteScheduler(SigmaStepMixin, diffusers.FlowMatchEulerDiscreteScheduler):
    """diffusers' FlowMatchEulerDiscreteScheduler (same arguments, defaults, config, save/load,
    timesteps and sigmas) with a fused ``step``; ``backend`` (keyword-only, not part of the config):
    "auto", "triton", "torch" or "reference"."""

    __init__ = with_backend(diffusers.FlowMatchEulerDiscreteScheduler)
    __module__ = "fastgen"  # a saved pipeline records ["fastgen", "FlowMatchEulerDiscreteScheduler"]
    _noise_dtype = torch.float32  # diffusers draws in the upcast sample's dtype

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             per_token_timesteps=None, return_dict: bool = True, *, seed=None, offset: int = 0, backend=None):
        """x_i -> x_i+1 (module docstring), one fused pass.

        Args:
            model_output: the model's velocity at (sample, timestep), like ``sample``.
            timestep: one of ``scheduler.timesteps`` (not an index).
            sample: x_i [B, ...] fp32/fp16/bf16.
            s_churn, s_tmin, s_tmax, s_noise: accepted and unused, as in diffusers.
            generator: diffusers' noise (stochastic_sampling); seed, offset: fastgen's counter-based
                noise (offset counts samples); at most one of them.
            per_token_timesteps: diffusers' per-token sigmas: the step is diffusers' own (not with seed).
            return_dict: FlowMatchEulerDiscreteSchedulerOutput or a tuple.
            backend: this step's backend (default: the scheduler's).
        Returns FlowMatchEulerDiscreteSchedulerOutput(prev_sample).
        """
        refuse_step_index(timestep, "FlowMatchEulerDiscreteScheduler")
        if per_token_timesteps is not None:
            if seed is not None:
                raise ValueError("seed= needs the fused step: per_token_timesteps runs diffusers' own step, pass "
                                 "generator= instead")
            return super().step(model_output, timestep, sample, generator=generator,
                                per_token_timesteps=per_token_timesteps, return_dict=return_dict)
        prev_sample, _ = self._fused_step(model_output, timestep, sample, generator=generator, seed=seed,
                                          offset=offset, backend=backend)
        if not return_dict:
            return (prev_sample,)
        return scheduling_flow_match_euler_discrete.FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)

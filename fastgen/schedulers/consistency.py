"""CMStochasticIterativeScheduler: diffusers' multistep consistency sampler whose step is one fused pass
of the sigma-space samplers' kernel (kernels/samplers.py) on a coefficient row.

Song, Dhariwal, Chen, Sutskever 2023, "Consistency Models", Algorithm 1 (equations and the row in
fastgen/reference/consistency.py): from x at sigma_i,

    D      = clip(c_skip(sigma_i) x + c_out(sigma_i) F)      the boundary-conditioned output, clip_denoised
    x_next = D + s_noise sqrt(sigma_hat^2 - sigma_min^2) z    sigma_hat = clamp(sigma_{i+1}, sigma_min, sigma_max)

Conventions, diffusers' own: the model sees ``scale_model_input(x, t)`` = c_in(sigma) x =
x / sqrt(sigma^2 + sigma_data^2) at the timestep t = 250 log(sigma) (``timesteps`` holds these
floats, ``sigma_to_t``); x_N = sigma_max z (``init_noise_sigma``). Noise: diffusers' generator draw
(``randn_tensor`` at every step of a run of more than one step, the last one's unused), the noise
itself (``variance_noise``), or ``seed=`` counter-based noise drawn in the kernel (stream: the step
index; ``offset`` in samples, so sample k is the same alone or in any batch). Like diffusers' step,
it runs on the constructor's timesteps before any ``set_timesteps``.
"""
import diffusers
import torch
from diffusers.schedulers.scheduling_consistency_models import CMStochasticIterativeSchedulerOutput
from diffusers.schedulers.scheduling_consistency_models import logger as _diffusers_logger

from fastgen.reference import consistency as _reference  # noqa: F401  (registers the StepTable builder)
from fastgen.schedulers._common import with_backend
from fastgen.schedulers._sigma import SigmaStepMixin, refuse_step_index


class CMStochasticIterativeScheduler(SigmaStepMixin, diffusers.CMStochasticIterativeScheduler):
    """diffusers' CMStochasticIterativeScheduler (same arguments, defaults, config, save/load, timesteps,
    ``scale_model_input``, ``add_noise``) with a fused ``step``; ``backend`` (keyword-only, not part
    of the config): "auto", "triton", "torch" or "reference", as for every op."""

    __init__ = with_backend(diffusers.CMStochasticIterativeScheduler)
    _inference_steps_capped = True  # diffusers' set_timesteps: num_inference_steps <= num_train_timesteps
    __module__ = "fastgen"  # what a saved pipeline records: ["fastgen", "CMStochasticIterativeScheduler"]
    _needs_set_timesteps = False  # diffusers' step also runs on the constructor's sigmas

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, *, variance_noise=None, seed=None, offset: int = 0, backend=None):
        """x at sigma_i -> x at sigma_{i+1} (module docstring), one fused pass.

        Args:
            model_output: F, the network's output at (``scale_model_input(sample, timestep)``, timestep).
            timestep: one of ``self.timesteps`` (a float; integer timesteps are refused, as diffusers does).
            sample: x [B, ...] fp32/fp16/bf16.
            generator: diffusers' noise (``randn_tensor``); or ``variance_noise`` (the noise itself, like
                sample), or ``seed`` (counter-based, in the kernel; ``offset``: the first sample's index).
            backend: this step's backend (default: the scheduler's).
        Returns CMStochasticIterativeSchedulerOutput(prev_sample), or (prev_sample,).
        """
        refuse_step_index(timestep, type(self).__name__)
        self._warn_unless_scaled(_diffusers_logger)
        prev_sample, _ = self._fused_step(model_output, timestep, sample, generator=generator,
                                          variance_noise=variance_noise, seed=seed, offset=offset, backend=backend)
        if not return_dict:
            return (prev_sample,)
        return CMStochasticIterativeSchedulerOutput(prev_sample=prev_sample)

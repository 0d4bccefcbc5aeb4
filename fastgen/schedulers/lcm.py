"""LCMScheduler: diffusers' latent consistency model scheduler whose step is one fused pass of the
sigma-space samplers' kernel (kernels/samplers.py) on a coefficient row.

Luo, Tan, Huang, Li, Zhao 2023, "Latent Consistency Models" (equations and the row in
fastgen/reference/consistency.py): at timestep t with abar_t = alphas_cumprod[t],

    x0     = clip(x0 from the model output: epsilon, sample or v_prediction)   clip_sample / thresholding
    D      = c_skip(t) x + c_out(t) x0                     LCM's boundary condition (timestep_scaling)
    x_prev = sqrt(abar_s) D + sqrt(1 - abar_s) z            s the next timestep; the last step: x_prev = D

Conventions, diffusers' own: the model sees x unscaled at the integer timestep t of ``timesteps``;
x_N = z. Noise: diffusers' generator draw (every step but step num_inference_steps - 1), the noise
itself (``variance_noise``), or ``seed=`` counter-based noise drawn in the kernel (stream: the step
index; ``offset`` in samples). diffusers' step reads abar_t and the boundary scalings at the
``timestep`` it is given and the next timestep at its step index; both name the same step in every
loop over ``timesteps``. A step whose timestep is not the one at its step index (a caller's own
timestep after ``set_begin_index``) runs diffusers' own step, so the result is still diffusers'.
"""
import diffusers
import torch
from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput

from fastgen.reference import consistency as _reference  # noqa: F401  (registers the StepTable builder)
from fastgen.schedulers._common import with_backend
from fastgen.schedulers._sigma import SigmaStepMixin, require_timesteps


class LCMScheduler(SigmaStepMixin, diffusers.LCMScheduler):
    """diffusers' LCMScheduler (same arguments, defaults, config, save/load, timesteps, ``add_noise``)
    with a fused ``step``; ``backend`` (keyword-only, not part of the config): "auto", "triton",
    "torch" or "reference", as for every op."""

    __init__ = with_backend(diffusers.LCMScheduler)
    _prediction_types = _reference.PREDICTION_TYPES
    _inference_steps_capped = True  # diffusers' set_timesteps: num_inference_steps <= num_train_timesteps
    __module__ = "fastgen"  # what a saved pipeline records: ["fastgen", "LCMScheduler"]

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, *, variance_noise=None, seed=None, offset: int = 0, backend=None):
        """x_t -> x_prev (module docstring), one fused pass.

        Args:
            model_output: the model's output at (sample, timestep), as the config's prediction_type says.
            timestep: one of ``self.timesteps``.
            sample: x_t [B, ...] fp32/fp16/bf16.
            generator: diffusers' noise (``randn_tensor``); or ``variance_noise`` (the noise itself, like
                sample), or ``seed`` (counter-based, in the kernel; ``offset``: the first sample's index).
            backend: this step's backend (default: the scheduler's).
        Returns LCMSchedulerOutput(prev_sample, denoised), or (prev_sample, denoised).
        """
        require_timesteps(self)
        self._noise_source(generator, seed, offset, variance_noise, sample=sample)  # before the step index moves
        if self.step_index is None:
            self._init_step_index(timestep)
        host = self._host_timestep(timestep)
        if host is not None and host != self._host_timesteps[self.step_index]:
            if seed is not None or variance_noise is not None or offset or backend is not None:
                raise ValueError(f"timestep {host:g} is not the timestep of step {self.step_index} "
                                 f"({self._host_timesteps[self.step_index]:g}); only diffusers' own step (generator "
                                 "noise, no seed, variance_noise, offset or backend) takes such a timestep")
            return super(SigmaStepMixin, self).step(model_output, timestep, sample, generator, return_dict)
        prev_sample, denoised = self._fused_step(model_output, timestep, sample, generator=generator,
                                                 variance_noise=variance_noise, seed=seed, offset=offset,
                                                 backend=backend)
        if not return_dict:
            return (prev_sample, denoised)
        return LCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)

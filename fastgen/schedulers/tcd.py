"""TCDScheduler: diffusers' Trajectory Consistency Distillation scheduler whose step is one fused pass
of the sigma-space samplers' kernel (kernels/samplers.py) on a coefficient row.

Zheng et al. 2024, "Trajectory Consistency Distillation" (equations and the row in
fastgen/reference/tcd.py): at timestep t, the next timestep t' and s = floor((1 - gamma) t'),

    x0    = x0 from the model output (epsilon, sample or v_prediction)
    x_s   = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps,   eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)
    x_t'  = sqrt(abar_t' / abar_s) x_s + sqrt(1 - abar_t' / abar_s) z      (gamma > 0; not the last step)

gamma is step()'s ``eta`` (diffusers' name; default 0.3). Conventions, diffusers' own: the model sees x
unscaled at the integer timestep t of ``timesteps``; x_N = z. Noise: diffusers' generator draw, or
``seed=`` counter-based noise drawn in the kernel (stream: the step index; ``offset`` in samples). A
step whose timestep is not the one at its step index runs diffusers' own step, as for LCMScheduler.
"""
import diffusers
import torch
from diffusers.schedulers.scheduling_tcd import TCDSchedulerOutput

from fastgen.reference import tcd as _reference  # noqa: F401  (registers the StepTable builder)
from fastgen.schedulers._common import with_backend
from fastgen.schedulers._sigma import SigmaStepMixin, require_timesteps


class TCDScheduler(SigmaStepMixin, diffusers.TCDScheduler):
    """diffusers' TCDScheduler (same arguments, defaults, config, save/load, timesteps, ``add_noise``)
    with a fused ``step``; ``backend`` (keyword-only, not part of the config): "auto", "triton",
    "torch" or "reference", as for every op."""

    __init__ = with_backend(diffusers.TCDScheduler)
    __module__ = "fastgen"  # what a saved pipeline records: ["fastgen", "TCDScheduler"]
    _step_defaults = dict(eta=0.3)  # step()'s default gamma

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.3, generator=None,
             return_dict: bool = True, *, seed=None, offset: int = 0, backend=None):
        """x_t -> x_t' (module docstring), one fused pass.

        Args:
            model_output: the model's output at (sample, timestep), as the config's prediction_type says.
            timestep: one of ``self.timesteps``.
            sample: x_t [B, ...] fp32/fp16/bf16.
            eta: gamma in [0, 1], the share of the step taken back and re-noised (0: deterministic).
            generator: diffusers' noise (``randn_tensor``); or ``seed`` (counter-based, in the kernel;
                ``offset``: the first sample's index).
            backend: this step's backend (default: the scheduler's).
        Returns TCDSchedulerOutput(prev_sample, pred_noised_sample), or the tuple.
        """
        require_timesteps(self)
        if self.step_index is None:
            self._init_step_index(timestep)
        host = self._host_timestep(timestep)
        if host is not None and host != self._host_timesteps[self.step_index]:
            if seed is not None or offset or backend is not None:
                raise ValueError(f"timestep {host:g} is not the timestep of step {self.step_index} "
                                 f"({self._host_timesteps[self.step_index]:g}); only diffusers' own step (generator "
                                 "noise, no seed, offset or backend) takes such a timestep")
            return super(SigmaStepMixin, self).step(model_output, timestep, sample, eta, generator, return_dict)
        prev_sample, pred_noised = self._fused_step(model_output, timestep, sample, generator=generator, seed=seed,
                                                    offset=offset, backend=backend, eta=float(eta))
        if not return_dict:
            return (prev_sample, pred_noised)
        return TCDSchedulerOutput(prev_sample=prev_sample, pred_noised_sample=pred_noised)

"""PNDMScheduler: diffusers' PNDMScheduler whose PLMS steps are one fused pass each.

Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds", arXiv 2202.09778 (the
equations, the float64 reference and the coefficient table: fastgen/reference/pndm.py). Per step, the
transfer part phi(x_t, e, t, s) = sqrt(abar_s / abar_t) x_t - (abar_s - abar_t) e / (...) ([Liu22]
eq. 9) with the noise estimate e a linear multistep combination of the model's last outputs ([Liu22]
eq. 12: (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24 once the run has them; orders 1, 2, 3 before).

The model outputs the combination needs (up to four back: the second model call only corrects the
first step and is not one of them) stay on the device in a ring the kernel writes as it steps; the
second step restarts from the first step's sample, which the table recovers from the first transfer.
Fused: ``skip_prk_steps=True`` (Stable Diffusion's configuration), epsilon / v_prediction, every
timestep spacing, ``set_alpha_to_one`` either way; with ``skip_prk_steps=False`` (the class default)
the Runge-Kutta warm-up (the first 12 model calls) runs diffusers' own step and the PLMS steps after it
are fused, its three kept model outputs handed to the ring. ``step_prk`` / ``step_plms`` called
directly are diffusers' own. The step draws no noise.

The step follows the scheduler's own timesteps by its call counter, as diffusers' does; the timestep
passed is not read.
"""
import diffusers
import torch
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from fastgen.ops.samplers import sampler_step
from fastgen.reference import pndm
from fastgen.schedulers._common import with_backend
from fastgen.schedulers._sigma import SigmaStepMixin


class PNDMScheduler(SigmaStepMixin, diffusers.PNDMScheduler):
    """diffusers' PNDMScheduler (same arguments, defaults, config, save/load and timesteps) with a fused
    ``step``; ``backend`` (keyword-only, not part of the config): "auto", "triton", "torch" or
    "reference"."""

    __init__ = with_backend(diffusers.PNDMScheduler)
    _prediction_types = pndm.PREDICTION_TYPES
    __module__ = "fastgen"  # a saved pipeline records ["fastgen", "PNDMScheduler"]

    @property
    def fused_config(self):
        """None where every step is fused; else which steps run diffusers' own step."""
        return pndm.fused_settings(self.config)

    def _prepare_tables(self):
        """After ``set_timesteps``: the run's table (a step traced by torch.compile only reads it)."""
        try:
            self._plms_table().on(torch.as_tensor(self.timesteps).device)
        except (ValueError, TypeError):  # left to the step to raise
            return

    def _plms_table(self):
        return self._step_table(after_prk=not self.config.skip_prk_steps)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, *,
             backend=None):
        """One model call's step (module docstring): a PLMS step in one fused pass, or a Runge-Kutta
        warm-up stage (skip_prk_steps=False) with diffusers' own step.

        Args:
            model_output: the model's output at (sample, timestep), like ``sample``.
            timestep: the current timestep (one of ``scheduler.timesteps``; not read, see the module).
            sample: x_t [B, ...] fp32/fp16/bf16.
            return_dict: SchedulerOutput or a tuple.
            backend: this step's backend (default: the scheduler's).
        Returns SchedulerOutput(prev_sample).
        """
        warm_up = len(self.prk_timesteps)
        if not self.config.skip_prk_steps and self.counter < warm_up:
            return super().step(model_output, timestep, sample, return_dict=return_dict)
        if self.num_inference_steps is None:
            return super().step(model_output, timestep, sample, return_dict=return_dict)  # diffusers' error
        backend = self._backend_arg(backend)
        model_output = self._tensors(model_output, sample, sample.shape, "the sample's shape")
        table = self._plms_table()
        lead = 0 if self.config.skip_prk_steps else 3
        i = self.counter - warm_up + lead
        if self._denoised is None or self._denoised.shape[1:] != sample.shape:
            self._denoised = sample.new_zeros((table.history, *sample.shape))  # the ring of kept model outputs
            for k, kept in enumerate(self.ets[-lead:] if lead else ()):  # the warm-up's three, as steps 0, 1, 2
                self._denoised[k % table.history].copy_(kept)
        prev_sample, _ = sampler_step(table, i, model_output, sample, prev_denoised=self._denoised if i else None,
                                      denoised_out=self._denoised, return_denoised=False, backend=backend)
        self.counter += 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

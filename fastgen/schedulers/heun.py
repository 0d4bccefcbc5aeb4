"""HeunDiscreteScheduler: diffusers' Heun (Karras et al.'s second-order sampler) whose every stage is
one fused pass.

Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", Alg. 1 (the
equations, the float64 reference and the coefficient table: fastgen/reference/karras.py). diffusers
lists every sigma but the first twice, so a step from sigma_i to sigma_i+1 is two calls of ``step``:

    d = (x_i - D(x_i; sigma_i)) / sigma_i,   x_mid = x_i + dt d,   H = x_i + dt d / 2     the Euler stage
    d' = (x - D(x; sigma_i+1)) / sigma_i+1,   x_i+1 = H + dt d' / 2                      the corrector

(dt = sigma_i+1 - sigma_i; x the sample the second call is given, x_mid in a pipeline's loop). The half
step H stays on the device between the two calls, as a multistep solver's previous output does: it
carries the step's start and its first derivative, which diffusers keeps as ``sample``,
``prev_derivative`` and ``dt``. The last step (to a final sigma of 0) is the Euler stage alone, as
in diffusers. A first stage's ``pred_original_sample`` is computed beside the fused pass (the kernel's
second output is H there).
"""
import diffusers
import torch
from diffusers.schedulers.scheduling_heun_discrete import HeunDiscreteSchedulerOutput

from fastgen.reference import karras
from fastgen.schedulers._common import with_backend
from fastgen.schedulers._sigma import SigmaStepMixin


class TwoStageMixin(SigmaStepMixin):
    """The step of a two-stage sampler (Heun, KDPM2) on its StepTable: every call one stage, diffusers'
    stage marker kept (``state_in_first_order``), a first stage's ``pred_original_sample`` computed
    beside the fused pass (the kernel's second output there is what the second stage reads)."""

    _run_start = None  # the step index the run started at (its first step is a first stage)
    _step_defaults = dict(start=0)  # a run from the first timestep

    def _set_first_stage_done(self, done: bool, sample):
        """Sets diffusers' own marker of the stage (``dt`` / ``sample`` is None in a first stage);
        ``sample``: the stage's input."""
        raise NotImplementedError

    def _two_stage_step(self, model_output, timestep, sample, *, seed, offset, backend, generator=None,
                        **step_settings):
        """(prev_sample, pred_original_sample) of one stage; step_settings: the table's (e.g. s_noise)."""
        if self.step_index is None:
            self._init_step_index(timestep)
        if self._run_start is None or self.state_in_first_order and self._denoised is None:
            self._run_start = self.step_index  # a new run: its first step is a first stage
        first, i = self.state_in_first_order, self.step_index
        prev_sample, denoised = self._fused_step(model_output, timestep, sample, generator=generator, seed=seed,
                                                 offset=offset, backend=backend, start=int(self._run_start),
                                                 **step_settings)
        if first:  # the kernel's output carries the step to the second stage: x0 itself for the caller
            denoised = self._first_stage_x0(model_output, sample, i, step_settings)
        self._set_first_stage_done(first, sample)
        return prev_sample, denoised

    def _first_stage_x0(self, model_output, sample, i, step_settings):
        """x0 = CX x + CF F of step i's row (clipped as diffusers clips it), on the device."""
        row = self._step_table(start=int(self._run_start), **step_settings).row(i)
        x0 = torch.add(sample.float() * row["cx"], model_output.float(), alpha=row["cf"])
        if getattr(self.config, "clip_sample", False):
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x0.to(sample.dtype)


class HeunDiscreteScheduler(TwoStageMixin, diffusers.HeunDiscreteScheduler):
    """diffusers' HeunDiscreteScheduler (same arguments, defaults, config, save/load, timesteps and
    sigmas) with a fused ``step``; ``backend`` (keyword-only, not part of the config): "auto",
    "triton", "torch" or "reference"."""

    __init__ = with_backend(diffusers.HeunDiscreteScheduler)
    _prediction_types = karras.EULER_PREDICTION_TYPES[:3]
    __module__ = "fastgen"  # a saved pipeline records ["fastgen", "HeunDiscreteScheduler"]

    def _set_first_stage_done(self, done: bool, sample):
        self.dt = 1.0 if done else None  # diffusers' marker: dt is None in a first stage

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, *,
             seed=None, offset: int = 0, backend=None):
        """One stage (module docstring), one fused pass.

        Args:
            model_output: the model's output at ``scale_model_input(sample, timestep)``, like ``sample``.
            timestep: one of ``scheduler.timesteps``.
            sample: x [B, ...] fp32/fp16/bf16.
            return_dict: HeunDiscreteSchedulerOutput or a tuple.
            seed, offset: accepted for the common interface (Heun draws no noise).
            backend: this step's backend (default: the scheduler's).
        Returns HeunDiscreteSchedulerOutput(prev_sample, pred_original_sample).
        """
        prev_sample, denoised = self._two_stage_step(model_output, timestep, sample, seed=seed, offset=offset,
                                                     backend=backend)
        if not return_dict:
            return prev_sample, denoised
        return HeunDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

"""What fastgen's sigma-space schedulers (Euler, Euler ancestral, DPM-Solver++, flow matching,
consistency, LCM) add to diffusers' classes: each step is one fused pass on the run's StepTable.

diffusers' ``set_timesteps`` computes the sigmas and timesteps as it always does; fastgen builds the
run's ``fastgen.step_table.StepTable`` from them once, on the host, in float64 (the builder of each
diffusers class, registered with ``fastgen.step_table.table_builder`` next to the sampler's float64
reference), and ``step`` is ``fastgen.ops.samplers.sampler_step`` at the step index diffusers
tracks. Finding that index never synchronises with the host: a timestep taken from
``self.timesteps`` is looked up in a host copy taken when the timesteps were assigned. A multistep
solver's previous denoised output stays on the device between steps.
"""
import numpy as np
import torch

from fastgen import _checks
from fastgen.backend import resolve_backend
from fastgen.ops.samplers import device_step, fused_step, keep_denoised, sampler_step
from fastgen.schedulers._common import FastgenMixin
from fastgen.step_table import (TABLES, StepTable, host_sigmas, require_timesteps, scheduler_table,  # noqa: F401
                                step_table, table_builder)


class SigmaStepMixin(FastgenMixin):
    """The step of a sigma-space scheduler on its StepTable (module docstring)."""

    _noise_dtype = None  # the dtype diffusers' step draws its noise in; None: the model output's
    _needs_set_timesteps = True  # False where diffusers' step also runs on the training schedule (Euler)
    _step_defaults = {}  # the step settings of a plain ``step(...)`` call (e.g. Euler's churn off)
    _unknown_timestep_is_last = False  # diffusers' DPM-Solver rule: a timestep outside the schedule is the last step

    def _prepare_tables(self):
        """After ``set_timesteps`` (FastgenMixin wraps it): the run's table of a plain step and its copy
        on the timesteps' device, so a step traced by torch.compile only reads them (errors are left
        to the step to raise)."""
        try:
            table = self._step_table(**self._step_defaults)
        except (ValueError, TypeError):
            return
        table.on(torch.as_tensor(self.timesteps).device)

    def _setup_fused(self):
        self._tables = {}
        self._denoised = None

    @property
    def timesteps(self) -> torch.Tensor:
        return self._run_timesteps

    @timesteps.setter
    def timesteps(self, value):
        """Assigned by diffusers' ``__init__`` / ``set_timesteps``: a new run. A host copy is taken once
        (what the step index is found in), and the run's tables and previous output are dropped."""
        self._run_timesteps = value
        self._host_timesteps = (None if value is None else
                                np.asarray(torch.as_tensor(value).detach().cpu().double().reshape(-1).tolist()))
        self._tables = {}
        self._denoised = None
        self._run_start = None

    def _host_timestep(self, timestep):
        """``timestep`` as a Python float where that costs no synchronisation (and not while
        torch.compile traces the step, where reading a tensor would break the graph), else None."""
        if not isinstance(timestep, torch.Tensor):
            return float(timestep)
        if timestep.numel() != 1 or torch.compiler.is_compiling():
            return None
        if timestep.device.type == "cpu":
            return float(timestep.reshape(()).item())
        table = self.timesteps
        if (isinstance(table, torch.Tensor) and table.dim() == 1 and table.stride(0) == 1
                and timestep.device == table.device and timestep.dtype == table.dtype
                and timestep.untyped_storage().data_ptr() == table.untyped_storage().data_ptr()):
            index = timestep.storage_offset() - table.storage_offset()
            if 0 <= index < len(self._host_timesteps):
                return float(self._host_timesteps[index])
        return None

    def index_for_timestep(self, timestep, schedule_timesteps=None):
        """diffusers' rule (the first match; the second if there are several, so a run started in the
        middle of the schedule does not skip a sigma), found in the host copy where possible."""
        host = (self._host_timestep(timestep) if schedule_timesteps is None and self._host_timesteps is not None
                else None)
        if host is None:
            return super().index_for_timestep(timestep, schedule_timesteps)
        matches = np.flatnonzero(self._host_timesteps == host)
        if not len(matches) and self._unknown_timestep_is_last:
            return len(self._host_timesteps) - 1
        if not len(matches):
            raise ValueError(f"timestep must be one of the scheduler's timesteps, got {host}")
        return int(matches[1 if len(matches) > 1 else 0])

    def _warn_unless_scaled(self, logger):
        """diffusers' warning (on its module's ``logger``) for a step whose model input was not scaled."""
        if not self.is_scale_input_called:
            logger.warning("The `scale_model_input` function should be called before `step` to ensure correct "
                           "denoising. See `StableDiffusionPipeline` for a usage example.")

    def _init_step_index(self, timestep):
        """diffusers' rule (``begin_index`` if set, else the timestep's place in ``self.timesteps``). While
        torch.compile traces the step, the timestep's value is not read (a data-dependent host index
        breaks the graph): the run starts at ``begin_index``, or 0 when none is set, the first
        timestep. A run begun in the middle of its schedule (img2img) is compiled correctly when
        ``set_begin_index`` is called, as diffusers' pipelines do."""
        if torch.compiler.is_compiling():
            self._step_index = self._begin_index or 0
        else:
            super()._init_step_index(timestep)

    def _step_table(self, **step_settings) -> StepTable:
        """This run's table for these step-time settings (e.g. Euler's s_churn), made once."""
        key = tuple((name, step_settings[name]) for name in sorted(step_settings))
        if key not in self._tables:
            self._tables[key] = step_table(self, **step_settings)
        return self._tables[key]

    def _fused_step(self, model_output, timestep, sample, *, generator=None, variance_noise=None, seed=None,
                    offset=0, backend=None, **step_settings):
        """(x_next, denoised) of the step at ``timestep``; advances the step index."""
        if self._needs_set_timesteps:
            require_timesteps(self)
        backend = self._backend_arg(backend)
        offset = self._noise_source(generator, seed, offset, variance_noise, sample=sample)
        noise_dtype = self._noise_dtype or getattr(model_output, "dtype", None)  # what diffusers draws in
        model_output = self._tensors(model_output, sample, sample.shape, "the sample's shape")
        if self.step_index is None:
            self._init_step_index(timestep)
        table = self._step_table(**step_settings)
        i = self.step_index
        traced = torch.compiler.is_compiling()
        noise = None
        if seed is None:
            seed = 0  # no in-kernel noise; never touches torch's global generator
            if variance_noise is not None:
                noise = self._checked_noise(variance_noise, sample)
            elif table.any_generator_draws if traced else bool(table.generator_draws[i]):
                # traced: every step draws (one graph for all steps); a step whose noise coefficients are 0 adds none
                noise = self._draw(sample.shape, generator, sample, noise_dtype)
        if table.history > 1 and (self._denoised is None or self._denoised.shape[1:] != sample.shape):
            self._denoised = sample.new_zeros((table.history, *sample.shape))  # the ring of the last H
        prev = self._denoised if table.reads_previous else None
        traced_backend = resolve_backend(backend, sample.device) if traced else None
        if traced_backend == "torch":
            # traced: the torch formulation, which inductor fuses into its own loop
            out, denoised = device_step(table, i, model_output, sample, prev, noise=noise, seed=seed,
                                        offset=_checks.sample_offset(offset, sample.shape))
            out, denoised = out.to(sample.dtype), denoised.to(sample.dtype)
        elif traced_backend == "triton":  # traced: the custom op, whose kernel inductor places in its graph
            out, denoised = fused_step(table, i, model_output, sample, prev, noise=noise, seed=seed,
                                       offset=_checks.sample_offset(offset, sample.shape), guidance_scale=None,
                                       return_denoised=True, denoised_out=None)
        else:
            out, denoised = sampler_step(table, i, model_output, sample, prev_denoised=prev, seed=seed, noise=noise,
                                         offset=offset, backend=backend)
        if table.reads_previous and table.history == 1:
            self._denoised = denoised
        elif table.reads_previous:
            keep_denoised(table, self._denoised, i, denoised)
        self._step_index += 1
        return out, denoised

    @staticmethod
    def _checked_noise(noise, sample):
        from fastgen import _checks

        _checks.float_tensor(noise, "variance_noise")
        return _checks.like(noise.to(sample.dtype), "variance_noise", sample, "sample")


def refuse_step_index(timestep, class_name: str):
    """diffusers' Euler-family steps take one of ``scheduler.timesteps``, never an integer index."""
    if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
        raise ValueError(
            "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to"
            f" `{class_name}.step()` is not supported. Make sure to pass"
            " one of the `scheduler.timesteps` as a timestep.")

"""What fastgen's sigma-space schedulers (Euler, Euler ancestral, DPM-Solver++, flow matching,
consistency, LCM) add to diffusers' classes: each step is one fused pass on the run's StepTable.

diffusers' ``set_timesteps`` computes the sigmas and timesteps as it always does; fastgen builds the
run's ``fastgen.ops.samplers.StepTable`` from them once, on the host, in float64 (``TABLES``: the
builder of each diffusers class, registered with ``table_builder`` next to the sampler's float64
reference), and ``step`` is ``fastgen.ops.samplers.sampler_step`` at the step index diffusers
tracks. Finding that index never synchronises with the host: a timestep taken from
``self.timesteps`` is looked up in a host copy taken when the timesteps were assigned. A multistep
solver's previous denoised output stays on the device between steps.
"""
import numpy as np
import torch

from fastgen.ops.samplers import StepTable, sampler_step
from fastgen.schedulers._common import FastgenMixin

TABLES = {}  # diffusers class name -> builder(scheduler, **step_settings) -> StepTable
# diffusers classes whose constructor already makes a run (timesteps, sigmas) that their step accepts
STEPS_WITHOUT_SET_TIMESTEPS = set()


def table_builder(diffusers_name: str, *, needs_set_timesteps: bool = True):
    """Registers ``builder(scheduler, **step_settings) -> StepTable`` for a diffusers scheduler class;
    ``needs_set_timesteps=False`` where diffusers' step runs on the constructor's timesteps too."""
    def register(builder):
        TABLES[diffusers_name] = builder
        if not needs_set_timesteps:
            STEPS_WITHOUT_SET_TIMESTEPS.add(diffusers_name)
        return builder
    return register


def _diffusers_name(scheduler):
    for cls in type(scheduler).__mro__:
        if cls.__module__.startswith("diffusers.") and cls.__name__ in TABLES:
            return cls.__name__
    return None


def check_ready(scheduler):
    """diffusers' error for a step before ``set_timesteps``, where diffusers' step needs it."""
    if (getattr(scheduler, "num_inference_steps", None) is None
            and _diffusers_name(scheduler) not in STEPS_WITHOUT_SET_TIMESTEPS):
        raise ValueError(
            "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")


def step_table(scheduler, **step_settings) -> StepTable:
    """The StepTable of ``scheduler`` (fastgen's class or diffusers' own) after its ``set_timesteps``."""
    name = _diffusers_name(scheduler)
    if name is None:
        names = "".join(", " + n for n in sorted(TABLES))
        raise TypeError(f"scheduler must be one of DDPMScheduler, DDIMScheduler{names} (diffusers' or fastgen's), "
                        f"got {type(scheduler).__name__}")
    check_ready(scheduler)
    return TABLES[name](scheduler, **step_settings)


class SigmaStepMixin(FastgenMixin):
    """The step of a sigma-space scheduler on its StepTable (module docstring)."""

    def _setup_fused(self):
        self._tables = {}
        self._denoised = None

    @property
    def timesteps(self) -> torch.Tensor:
        return self._timesteps

    @timesteps.setter
    def timesteps(self, value):
        """Assigned by diffusers' ``__init__`` / ``set_timesteps``: a new run. A host copy is taken once
        (what the step index is found in), and the run's tables and previous output are dropped."""
        self._timesteps = value
        self._host_timesteps = (None if value is None else
                                np.asarray(torch.as_tensor(value).detach().cpu().double().reshape(-1).tolist()))
        self._tables = {}
        self._denoised = None

    def _host_timestep(self, timestep):
        """``timestep`` as a Python float where that costs no synchronisation, else None."""
        if not isinstance(timestep, torch.Tensor):
            return float(timestep)
        if timestep.numel() != 1:
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
        host = self._host_timestep(timestep) if schedule_timesteps is None and self._host_timesteps is not None else None
        if host is None:
            return super().index_for_timestep(timestep, schedule_timesteps)
        matches = np.flatnonzero(self._host_timesteps == host)
        if not len(matches):
            raise ValueError(f"timestep must be one of the scheduler's timesteps, got {host}")
        return int(matches[1 if len(matches) > 1 else 0])

    def _step_table(self, **step_settings) -> StepTable:
        """This run's table for these step-time settings (e.g. Euler's s_churn), made once."""
        key = tuple(sorted(step_settings.items()))
        if key not in self._tables:
            self._tables[key] = step_table(self, **step_settings)
        return self._tables[key]

    def _fused_step(self, model_output, timestep, sample, *, generator=None, variance_noise=None, seed=None,
                    offset=0, backend=None, **step_settings):
        """(x_next, denoised) of the step at ``timestep``; advances the step index."""
        check_ready(self)
        backend = self._backend_arg(backend)
        offset = self._noise_source(generator, seed, offset, variance_noise)
        model_output = self._tensors(model_output, sample, sample.shape, "the sample's shape")
        if self.step_index is None:
            self._init_step_index(timestep)
        table = self._step_table(**step_settings)
        i = self.step_index
        noise = None
        if seed is None:
            seed = 0  # no in-kernel noise; never touches torch's global generator
            if variance_noise is not None:
                noise = self._checked_noise(variance_noise, sample)
            elif bool(table.generator_draws[i]):
                noise = self._draw(sample.shape, generator, sample, model_output.dtype)
        prev = self._denoised if table.reads_previous else None
        out, denoised = sampler_step(table, i, model_output, sample, prev_denoised=prev, seed=seed, noise=noise,
                                     offset=offset, backend=backend)
        if table.reads_previous:
            self._denoised = denoised
        self._step_index += 1
        return out, denoised

    @staticmethod
    def _checked_noise(noise, sample):
        from fastgen import _checks

        _checks.float_tensor(noise, "variance_noise")
        return _checks.like(noise.to(sample.dtype), "variance_noise", sample, "sample")

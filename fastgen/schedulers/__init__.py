"""Drop-in replacements for diffusers' DDPMScheduler and DDIMScheduler whose step is one fused kernel.

Change one import::

    from fastgen.schedulers import DDPMScheduler   # was: from diffusers import DDPMScheduler

Same constructor arguments and defaults, ``config``, ``from_config``, ``set_timesteps``, ``timesteps``,
``step(...)`` and outputs; given the same generator the same trajectory as diffusers (to fp32 rounding of the float64
schedule; stock diffusers' float32 schedule is up to ~1e-3 away near t = 1).
``step(..., seed=)`` draws the noise in the kernel instead (batch-invariant, no noise tensor).
"""
from fastgen.schedulers._common import FrozenDict, SchedulerOutput, randn_tensor
from fastgen.schedulers.ddim import DDIMScheduler, DDIMSchedulerOutput
from fastgen.schedulers.ddpm import DDPMScheduler, DDPMSchedulerOutput

__all__ = ["DDPMScheduler", "DDPMSchedulerOutput", "DDIMScheduler", "DDIMSchedulerOutput", "FrozenDict",
           "SchedulerOutput", "randn_tensor"]

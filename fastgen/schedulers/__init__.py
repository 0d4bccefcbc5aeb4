"""Drop-in replacements for diffusers' schedulers whose step is one fused kernel: every class of
``fastgen.registry.SCHEDULER_CLASSES`` (DDPM, DDIM and the sigma-space samplers: Euler, Heun, KDPM2,
DPM-Solver++ (and its SDE), DEIS, UniPC, LMS, PNDM, flow matching, the consistency and EDM samplers; the README's sampler table
lists them with what each fuses).

They are subclasses of diffusers' own classes: change one import::

    from fastgen.schedulers import DDPMScheduler   # was: from diffusers import DDPMScheduler

Config, ``from_config``, ``save_pretrained`` / ``from_pretrained``, ``set_timesteps``, ``timesteps``,
``compatibles`` and the outputs are diffusers'; ``step`` and ``add_noise`` run fused ops on the
scheduler's own tables, so the same generator gives diffusers' trajectory to fp32 rounding.
``step(..., seed=)`` draws the noise in the kernel instead (batch-invariant, no noise tensor).

Where every one of them differs from diffusers on purpose (each class's own list is in its module):
  * a ``prediction_type`` its step does not know raises ValueError at construction (diffusers: at
    the first step), and ``trained_betas`` must hold ``num_train_timesteps`` betas (diffusers takes
    the betas and steps outside or short of them);
  * ``set_timesteps`` refuses a num_inference_steps that is not a positive int (at most
    num_train_timesteps where diffusers requires it) with a ValueError/TypeError naming it, instead
    of a ZeroDivisionError or an empty run; ``None`` stays allowed with custom timesteps= / sigmas=;
  * ``step(generator=[...])`` needs one generator per sample (or one for all) instead of raising an
    IndexError inside the draw;
  * ``from_pretrained`` of a local path that does not exist raises FileNotFoundError naming it
    (diffusers tries the Hub and reports a failed connection), and expands ``~``;
  * ``from_config`` ignores config keys a config object cannot hold (``__class__``, ``items``, ...)
    with diffusers' warning for unexpected keys, where diffusers raises a TypeError.

Threads: a scheduler is stateful (the timesteps ``set_timesteps`` set, the step index and a
multistep solver's previous outputs), so one scheduler object shared by threads that step
concurrently races, as diffusers' does. Use one scheduler per thread (``copy.deepcopy`` or
``from_config``), or ``fastgen.sample``, which steps a private copy.
"""
from diffusers.schedulers.scheduling_consistency_models import CMStochasticIterativeSchedulerOutput
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from fastgen import registry

globals().update({name: registry.scheduler_class(name) for name in registry.AVAILABLE_CLASSES})

__all__ = [*registry.AVAILABLE_CLASSES, "DDPMSchedulerOutput", "DDIMSchedulerOutput", "EulerDiscreteSchedulerOutput",
           "EulerAncestralDiscreteSchedulerOutput", "FlowMatchEulerDiscreteSchedulerOutput",
           "CMStochasticIterativeSchedulerOutput", "LCMSchedulerOutput", "SchedulerMixin"]

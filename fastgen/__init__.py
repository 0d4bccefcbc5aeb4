"""fastgen: fused Triton kernels for sampling from generative models, each checked against a torch reference."""
import importlib

from fastgen import registry
from fastgen.backend import resolve_backend
from fastgen.ops import (affine_coupling, ddim_step, ddpm_step, gaussian_kl, latents, q_sample, randn,
                         reparameterize, reparameterize_with_kl)
from fastgen.sampling import sample
from fastgen.schedules import NoiseSchedule

__version__ = "0.1.0"

# The drop-in schedulers subclass diffusers' classes: imported on first use, so ``import fastgen``
# does not import diffusers. They are attributes of the top-level package because diffusers' pipelines
# record a component's library by its top-level module ("fastgen") and look up the class and its
# loadable base (SchedulerMixin) there when they load a saved pipeline.
_SCHEDULER_EXPORTS = (*registry.SCHEDULER_CLASSES, "SchedulerMixin")


def __getattr__(name):
    if name == "schedulers" or name in _SCHEDULER_EXPORTS:
        schedulers = importlib.import_module("fastgen.schedulers")
        return schedulers if name == "schedulers" else getattr(schedulers, name)
    raise AttributeError(f"module 'fastgen' has no attribute {name!r}")


__all__ = [
    "randn", "latents",                                             # counter-based noise
    "reparameterize", "gaussian_kl", "reparameterize_with_kl",      # Gaussian ops (VAE)
    "NoiseSchedule", "q_sample", "ddpm_step", "ddim_step",          # diffusion steps
    "sample", "schedulers", *_SCHEDULER_EXPORTS,                    # sampling loop, drop-in schedulers
    "affine_coupling",                                              # normalizing flows
    "resolve_backend", "__version__",
]

"""fastgen: fused Triton kernels for sampling from generative models, each checked against a torch reference."""
import importlib
import os
import sys

import torch

# Kernels run on CPU tensors only under the Triton interpreter, which must be chosen before triton is
# imported (importing fastgen imports it, through torch.compile's machinery). A CPU build of torch has
# no GPU to compile for: choose the interpreter here unless the caller chose already or imported triton
# first (then backend="triton" on CPU tensors raises and says how). TRITON_INTERPRET=0 keeps the compiler
# (compiling for a GPU target on a machine without one, as ``fastgen bench --static`` does).
if torch.version.cuda is None and getattr(torch.version, "hip", None) is None and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastgen import registry  # noqa: E402
from fastgen.backend import resolve_backend  # noqa: E402
from fastgen.ops import (affine_coupling, ddim_step, ddpm_step, gaussian_kl, latents, q_sample, randn,  # noqa: E402
                         reparameterize, reparameterize_with_kl)
from fastgen.sampling import sample  # noqa: E402
from fastgen.schedules import NoiseSchedule  # noqa: E402

__version__ = "0.1.0"

# The drop-in schedulers subclass diffusers' classes: imported on first use, so ``import fastgen``
# does not import diffusers. They are attributes of the top-level package because diffusers' pipelines
# record a component's library by its top-level module ("fastgen") and look up the class and its
# loadable base (SchedulerMixin) there when they load a saved pipeline.
_SCHEDULER_EXPORTS = (*registry.SCHEDULER_CLASSES, "SchedulerMixin")


def __getattr__(name):
    if name == "schedulers" or name in _SCHEDULER_EXPORTS:
        schedulers = importlib.import_module("fastgen.schedulers")
        if name == "schedulers":
            return schedulers
        # a class whose diffusers base needs a package that is missing: ImportError naming it
        return getattr(schedulers, name) if hasattr(schedulers, name) else registry.scheduler_class(name)
    raise AttributeError(f"module 'fastgen' has no attribute {name!r}")


__all__ = [
    "randn", "latents",                                             # counter-based noise
    "reparameterize", "gaussian_kl", "reparameterize_with_kl",      # Gaussian ops (VAE)
    "NoiseSchedule", "q_sample", "ddpm_step", "ddim_step",          # diffusion steps
    "sample", "schedulers", *_SCHEDULER_EXPORTS,                    # sampling loop, drop-in schedulers
    "affine_coupling",                                              # normalizing flows
    "resolve_backend", "__version__",
]

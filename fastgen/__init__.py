"""fastgen: fused Triton kernels for sampling from generative models, each checked against a torch reference."""
from fastgen import schedulers
from fastgen.backend import resolve_backend
from fastgen.flows import affine_coupling
from fastgen.ops import (ddim_step, ddpm_step, gaussian_kl, latents, q_sample, randn, reparameterize,
                         reparameterize_with_kl)
from fastgen.sampling import sample
from fastgen.schedules import NoiseSchedule

__version__ = "0.1.0"

__all__ = [
    "randn", "latents",                                             # counter-based noise
    "reparameterize", "gaussian_kl", "reparameterize_with_kl",      # Gaussian ops (VAE)
    "NoiseSchedule", "q_sample", "ddpm_step", "ddim_step",          # diffusion steps
    "sample", "schedulers",                                         # sampling loop, drop-in schedulers
    "affine_coupling",                                              # normalizing flows
    "resolve_backend", "__version__",
]

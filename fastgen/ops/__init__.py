"""Public functional ops, one module per op family: validate arguments (fastgen._checks), pick the
backend (fastgen.backend), call the kernel's launcher (kernels/<family>.py) or the reference
(fastgen/reference/<family>.py).

    random     randn                                            counter-based normals
    latents    latents                                          GAN latents, plain or truncated
    gaussian   reparameterize, gaussian_kl, reparameterize_with_kl   the VAE's ops, with autograd
    diffusion  q_sample, ddpm_step, ddim_step                   the diffusion steps (a StepSpec each)
    flows      affine_coupling                                  a normalizing flow's coupling, with its log-det
    samplers   sampler_step, StepTable                          the sigma-space samplers' step (Euler, DPM-Solver++, LMS,
                                                                flow matching, consistency): one affine kernel

These modules are the one place that calls into ``fastgen.kernels``; kernels are imported on first
use so ``import fastgen`` works without triton and TRITON_INTERPRET may be set after it.
"""
from fastgen.ops.diffusion import ddim_step, ddpm_step, q_sample
from fastgen.ops.flows import affine_coupling
from fastgen.ops.gaussian import gaussian_kl, reparameterize, reparameterize_with_kl
from fastgen.ops.latents import latents
from fastgen.ops.random import randn

__all__ = ["randn", "latents", "reparameterize", "gaussian_kl", "reparameterize_with_kl", "q_sample", "ddpm_step",
           "ddim_step", "affine_coupling"]

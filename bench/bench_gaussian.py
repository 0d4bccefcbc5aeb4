"""Benchmarks of the Gaussian (VAE) ops of kernels/gaussian.py: ``fastgen.reparameterize``,
``fastgen.gaussian_kl`` and ``fastgen.reparameterize_with_kl``.

    reparameterize          z = mu + exp(logvar / 2) eps                 (Kingma & Welling, Eq. 10)
    gaussian_kl             KL_j = 1/2 (logvar2 - logvar + (exp(logvar) + (mu - mu2)^2) / exp(logvar2) - 1)
                            (Appendix B at mu2 = logvar2 = 0), reduced "none" or "per_sample"
    reparameterize_with_kl  (z, KL to N(0, I) summed per sample) in one pass

Ops (one per variant, so each gets its own rows and plots; ``--ops gaussian`` selects them all):

    reparameterize                  eps drawn in the kernel from (seed, offset * row + i), never stored
    reparameterize_noise            eps read from a ``noise=`` tensor (diffusers-style parity path)
    gaussian_kl_none                standard-normal prior, elementwise KL
    gaussian_kl_per_sample          standard-normal prior, KL summed per sample ([B])
    gaussian_kl_prior_none          general prior (mu2, logvar2 of mu's shape), elementwise
    gaussian_kl_prior_per_sample    general prior, summed per sample
    reparameterize_with_kl          eps drawn in the kernel

Inputs: mu, logvar (and noise, mu2, logvar2) of shape [B, 4, 16, 16] (a latent-diffusion-style
latent of 1024 elements per sample; B = size / 1024), fresh normal data; logvar scaled by 0.5.
Every op is timed forward ("fwd") and forward + backward ("fwd+bwd", gradients of every tensor
input but ``noise``). The seed is the same in every input set, so torch.compile compiles once.

Bytes moved (the op's minimal traffic). E = bytes of one [B, 4, 16, 16] tensor, R = bytes of the
per-sample [B] result.

    op                              fwd             fwd+bwd = fwd + backward
    reparameterize                  3E (mu, logvar  + 3E: grad_z, logvar read, grad_logvar written;
                                    read, z written)  grad_mu is grad_z itself (no traffic), eps is
                                                      recomputed from the seed
    reparameterize_noise            4E (+ noise)    + 4E: grad_z, logvar, noise read, grad_logvar written
    gaussian_kl_none                3E              + 5E: grad, mu, logvar read, 2 gradients written
    gaussian_kl_per_sample          2E + R          + R + 4E
    gaussian_kl_prior_none          5E              + 9E: grad, 4 inputs read, 4 gradients written
    gaussian_kl_prior_per_sample    4E + R          + R + 8E
    reparameterize_with_kl          3E + R          + 5E + R: grad_z, grad_kl, mu, logvar read,
                                                      grad_mu, grad_logvar written

The KL ops and reparameterize_with_kl follow the harness's default (forward traffic + grad_outputs
read + the differentiated inputs read again + one gradient each written); the reparameterize ops
declare theirs. Autograd may copy grad_z into mu.grad (it cannot take a gradient the caller still
holds): that copy is counted against the provider's time, not in the bytes.

Providers: fastgen (backend="triton"), the eager reference (backend="torch"), torch.compile of
that reference, and, for the ops that draw eps, the expression people write with torch's own
generator, ``mu + exp(logvar / 2) * torch.randn_like(mu)`` (a different stream; the peer everyone knows).
"""
import torch

import fastgen
from fastgen.bench import (batched_shape, compiled, fastgen as fastgen_provider, peer, pytest_benchmarks,
                           random_tensor, reference, register)
from fastgen.bench.registry import Op, default_bytes_moved, tensor_bytes

SEED = 0x5EED_CAFE_F00D   # one seed for every input set: torch.compile specialises on Python ints
PER_SAMPLE = (4, 16, 16)  # elements of one sample: a [4, 16, 16] latent
SAMPLE_SIZE = 4 * 16 * 16
SIZES = [1 << k for k in range(16, 29, 2)]  # 64K .. 256M elements of mu
QUICK_SIZES = [1 << 12]  # [4, 4, 16, 16]


def latent_shape(size):
    return batched_shape(size, PER_SAMPLE, "Gaussian ops")


def make_inputs(size, dtype, device, generator, *, noise=False, prior=False):
    """mu ~ N(0, 1), logvar ~ N(0, 1/4) (and noise ~ N(0, 1), mu2 ~ N(0, 1), logvar2 ~ N(0, 1/4))."""
    shape = latent_shape(size)
    inputs = {"mu": random_tensor(shape, dtype, device, generator),
              "logvar": random_tensor(shape, dtype, device, generator, scale=0.5)}
    if noise:
        inputs["noise"] = random_tensor(shape, dtype, device, generator)
    if prior:
        inputs["mu2"] = random_tensor(shape, dtype, device, generator)
        inputs["logvar2"] = random_tensor(shape, dtype, device, generator, scale=0.5)
    return inputs


def reparameterize_backward_bytes(inputs, outputs):
    """Forward traffic + grad_z, logvar (and noise) read + grad_logvar written; grad_mu is grad_z."""
    reread = tensor_bytes([inputs["logvar"], inputs.get("noise")])
    return default_bytes_moved(inputs, outputs) + tensor_bytes(outputs) + reread + tensor_bytes(inputs["logvar"])


def torch_reparameterize(mu, logvar):
    """What people write with torch's own generator."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


def gaussian_op(name, description, providers, *, noise=False, prior=False, grad_inputs=("mu", "logvar"),
                bytes_moved_backward=None):
    return register(Op(
        name=name, description=description, providers=providers,
        make_inputs=lambda size, dtype, device, generator: make_inputs(size, dtype, device, generator,
                                                                       noise=noise, prior=prior),
        sizes=SIZES, dtypes=[torch.float32, torch.bfloat16], quick_sizes=QUICK_SIZES,
        shape_of=latent_shape, grad_inputs=grad_inputs, bytes_moved_backward=bytes_moved_backward))


def reparameterize_with(backend):
    return lambda mu, logvar: fastgen.reparameterize(mu, logvar, seed=SEED, backend=backend)


REPARAMETERIZE = gaussian_op(
    "reparameterize", "z = mu + exp(logvar / 2) eps, eps drawn in the kernel (seed=)",
    [fastgen_provider(reparameterize_with("triton")), reference(reparameterize_with("torch")),
     compiled(reparameterize_with("torch")), peer("torch.randn_like", torch_reparameterize)],
    bytes_moved_backward=reparameterize_backward_bytes)


def reparameterize_noise_with(backend):
    return lambda mu, logvar, noise: fastgen.reparameterize(mu, logvar, noise=noise, backend=backend)


REPARAMETERIZE_NOISE = gaussian_op(
    "reparameterize_noise", "z = mu + exp(logvar / 2) eps, eps read from noise=",
    [fastgen_provider(reparameterize_noise_with("triton")), reference(reparameterize_noise_with("torch")),
     compiled(reparameterize_noise_with("torch"))],
    noise=True, bytes_moved_backward=reparameterize_backward_bytes)


def kl_with(backend, reduction):
    def kl(mu, logvar, mu2=None, logvar2=None):
        return fastgen.gaussian_kl(mu, logvar, mu2, logvar2, reduction=reduction, backend=backend)
    return kl


def kl_providers(reduction):
    return [fastgen_provider(kl_with("triton", reduction)), reference(kl_with("torch", reduction)),
            compiled(kl_with("torch", reduction))]


GAUSSIAN_KL_NONE = gaussian_op("gaussian_kl_none", "KL to N(0, I), elementwise", kl_providers("none"))
GAUSSIAN_KL_PER_SAMPLE = gaussian_op("gaussian_kl_per_sample", "KL to N(0, I) summed per sample",
                                     kl_providers("per_sample"))
GAUSSIAN_KL_PRIOR_NONE = gaussian_op("gaussian_kl_prior_none", "KL to N(mu2, exp(logvar2)), elementwise",
                                     kl_providers("none"), prior=True,
                                     grad_inputs=("mu", "logvar", "mu2", "logvar2"))
GAUSSIAN_KL_PRIOR_PER_SAMPLE = gaussian_op("gaussian_kl_prior_per_sample",
                                           "KL to N(mu2, exp(logvar2)) summed per sample",
                                           kl_providers("per_sample"), prior=True,
                                           grad_inputs=("mu", "logvar", "mu2", "logvar2"))


def reparameterize_with_kl_with(backend):
    return lambda mu, logvar: fastgen.reparameterize_with_kl(mu, logvar, seed=SEED, backend=backend)


def torch_reparameterize_with_kl(mu, logvar):
    kl = 0.5 * (torch.exp(logvar) + mu * mu - 1.0 - logvar)
    return torch_reparameterize(mu, logvar), kl.sum(dim=tuple(range(1, mu.dim())))


REPARAMETERIZE_WITH_KL = gaussian_op(
    "reparameterize_with_kl", "(z, KL to N(0, I) per sample) in one pass, eps drawn in the kernel",
    [fastgen_provider(reparameterize_with_kl_with("triton")), reference(reparameterize_with_kl_with("torch")),
     compiled(reparameterize_with_kl_with("torch")), peer("torch.randn_like", torch_reparameterize_with_kl)])

test_reparameterize = pytest_benchmarks(REPARAMETERIZE)
test_reparameterize_noise = pytest_benchmarks(REPARAMETERIZE_NOISE)
test_gaussian_kl_none = pytest_benchmarks(GAUSSIAN_KL_NONE)
test_gaussian_kl_per_sample = pytest_benchmarks(GAUSSIAN_KL_PER_SAMPLE)
test_gaussian_kl_prior_none = pytest_benchmarks(GAUSSIAN_KL_PRIOR_NONE)
test_gaussian_kl_prior_per_sample = pytest_benchmarks(GAUSSIAN_KL_PRIOR_PER_SAMPLE)
test_reparameterize_with_kl = pytest_benchmarks(REPARAMETERIZE_WITH_KL)

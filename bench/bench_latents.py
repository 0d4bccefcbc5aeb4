"""Benchmarks of GAN latent sampling: ``fastgen.latents`` (kernels/random.py and kernels/latents.py).

    latents              z ~ N(0, I), [n, 512]: the counter-based Philox stream (== fastgen.randn)
    latents_truncated    each coordinate N(0, 1) conditioned on |z| <= psi, psi = 0.7 (BigGAN's
                         truncation trick), drawn exactly by the inverse CDF of |z| from one Philox
                         word per element: erf(|z| / sqrt 2) = w erf(psi / sqrt 2), w ~ U[0, 1)

Shape: [n, 512] (a StyleGAN/BigGAN-sized latent; n = size / 512). The seed is fixed (torch.compile
specialises on Python ints).

Bytes moved: the output written once (n x 512 x element size); nothing is read. The target on a GPU
is >= 90% of the copy bandwidth (a copy_ moving the same bytes, timed in the same run).

Providers: fastgen (backend="triton"), the eager reference (backend="torch", the same numbers in
torch integer ops; the truncated reference draws on the CPU and copies to the device), torch.compile
of the reference, and torch's own generator as peers (a different stream):
- latents: ``torch.randn(n, 512)``;
- latents_truncated: ``torch.randn(...).clamp_(-psi, psi)`` (the cheap approximation people use: not
  the truncated distribution, it piles 48% of the mass onto +-psi) and the exact peer, a resample loop
  that redraws every |z| > psi until none is left (about 27 rounds at 2^28 elements for psi = 0.7,
  each round synchronising with the host to size the redraw).
"""
import torch

import fastgen
from fastgen.bench import compiled, fastgen as fastgen_provider, peer, pytest_benchmarks, reference, register
from fastgen.bench.registry import Op
from fastgen.reference import latents as ref_latents

SEED = 0x6A7E_5EED
DIM = 512
PSI = 0.7
SIZES = [1 << k for k in range(16, 29, 2)]  # 64K .. 256M elements
QUICK_SIZES = [1 << 10, 1 << 14]


def latent_shape(size):
    if size % DIM:
        raise ValueError(f"sizes of the latents ops must be multiples of {DIM} (an [n, {DIM}] batch), got {size}")
    return (size // DIM, DIM)


def make_inputs(size, dtype, device, generator):
    """No tensors: the op only writes."""
    n, dim = latent_shape(size)
    return {"n": n, "dim": dim, "dtype": dtype, "device": device}


def latents_with(backend, truncation=None):
    return lambda n, dim, dtype, device: fastgen.latents(n, dim, seed=SEED, truncation=truncation, dtype=dtype,
                                                         device=device, backend=backend)


def reference_latents(truncation=None):
    return lambda n, dim, dtype, device: ref_latents.latents(n, dim, seed=SEED, truncation=truncation, dtype=dtype,
                                                             device=device)


def torch_randn(n, dim, dtype, device):
    return torch.randn(n, dim, dtype=dtype, device=device)


def torch_randn_clamp(n, dim, dtype, device):
    return torch.randn(n, dim, dtype=dtype, device=device).clamp_(-PSI, PSI)


def torch_randn_resample(n, dim, dtype, device):
    """Exact truncation by rejection: redraw every coordinate outside [-psi, psi] until none is."""
    z = torch.randn(n, dim, dtype=dtype, device=device)
    outside = z.abs() > PSI
    count = int(outside.sum())
    while count:
        z[outside] = torch.randn(count, dtype=dtype, device=device)
        outside = z.abs() > PSI
        count = int(outside.sum())
    return z


def latents_op(name, description, providers):
    return register(Op(name=name, description=description, providers=providers, make_inputs=make_inputs,
                       sizes=SIZES, dtypes=[torch.float32, torch.bfloat16], quick_sizes=QUICK_SIZES,
                       shape_of=latent_shape))


LATENTS = latents_op(
    "latents", f"[n, {DIM}] standard normal latents",
    [fastgen_provider(latents_with("triton")), reference(latents_with("torch")), compiled(reference_latents()),
     peer("torch.randn", torch_randn)])

LATENTS_TRUNCATED = latents_op(
    "latents_truncated", f"[n, {DIM}] latents truncated to [-{PSI}, {PSI}] (exact)",
    [fastgen_provider(latents_with("triton", PSI)), reference(latents_with("torch", PSI)),
     compiled(reference_latents(PSI)), peer("torch.randn+clamp", torch_randn_clamp),
     peer("torch.randn resample", torch_randn_resample)])

test_latents = pytest_benchmarks(LATENTS)
test_latents_truncated = pytest_benchmarks(LATENTS_TRUNCATED)

"""GAN latents in plain torch, optionally with the truncation trick: the same numbers as ``kernels/latents.py``.

A batch of n latents of size dim is an [n, dim] tensor; element (r, c) takes counter element
g = (offset + r) * dim + c, so ``offset`` counts samples and sample k never depends on the batch split.

Without truncation: z = ``fastgen.randn((n, dim), seed=seed, offset=offset)`` (stream 0; both count
samples), i.e. ``fastgen.reference.random.randn((n, dim), seed=seed, offset=offset * dim)`` in elements.

With the truncation trick (Brock et al., arXiv 1809.11096, Sec. 3.1) each coordinate is
N(0, 1) conditioned on |z| <= psi, sampled exactly by inverting the CDF of |z| (no clamping):

    F(a)  = P(|z| <= a  |  |z| <= psi) = erf(a / sqrt 2) / erf(psi / sqrt 2),   0 <= a <= psi
    a     = F^-1(w) = sqrt(2) * erfinv(w * erf(psi / sqrt 2)),                  w ~ U[0, 1)
    z     = s * a,  s = +-1 with probability 1/2 each

w and s come from one Philox word x per element (stream TRUNCATED_STREAM): s from the lowest bit,
w = (x >> 8) 2^-24 from the top 24 bits.

a < psi exactly, but rounding to the output dtype could land one ulp above psi, so the result is
finally limited to the largest value of the dtype that is <= psi (a rounding guard that moves values
by at most one ulp; the sampling itself never clamps).
"""
import math

import torch

from fastgen.reference import random as ref_random

# The Philox stream truncated latents draw their words from ("trunc" in ASCII), apart from stream 0.
TRUNCATED_STREAM = 0x7472756E63


def philox_words(n: int, *, seed: int, stream: int, offset: int) -> torch.Tensor:
    """The uint32 word (held in int64) of elements offset .. offset + n - 1: word g % 4 of block g // 4."""
    first, last = offset // 4, (offset + n + 3) // 4
    q = torch.arange(first, last, dtype=torch.int64)
    words = torch.stack(ref_random.philox_blocks(seed, stream, q), dim=1).reshape(-1)
    start = offset - 4 * first
    return words[start:start + n]


def truncated_normal(x: torch.Tensor, psi: float) -> torch.Tensor:
    """Float64 N(0, 1) truncated to [-psi, psi], one per uint32 word ``x`` (held in int64)."""
    sign = 1.0 - 2.0 * (x & 1).double()                              # s
    w = (x >> 8).double() * 2.0**-24                                  # w ~ U[0, 1)
    return sign * math.sqrt(2.0) * torch.special.erfinv(w * math.erf(psi / math.sqrt(2.0)))  # s F^-1(w)


def truncated_normals(n: int, psi: float, *, seed: int, offset: int = 0) -> torch.Tensor:
    """Float64 N(0, 1) truncated to [-psi, psi] of elements offset .. offset + n - 1 (flat)."""
    return truncated_normal(philox_words(n, seed=seed, stream=TRUNCATED_STREAM, offset=offset), psi)


def largest_at_most(psi: float, dtype: torch.dtype) -> float:
    """The largest value representable in ``dtype`` that is <= psi."""
    t = torch.tensor([psi], dtype=torch.float64).to(dtype)
    if t.item() > psi:
        t = torch.nextafter(t, torch.zeros_like(t))
    return t.item()


def latents(n: int, dim: int, *, seed: int, offset: int = 0, truncation=None, dtype=torch.float32, device=None):
    """[n, dim] latents; sample r of the batch is sample offset + r of the seed's sequence."""
    if truncation is None:
        return ref_random.randn((n, dim), seed=seed, offset=offset * dim, dtype=dtype, device=device)
    z = truncated_normals(n * dim, float(truncation), seed=seed, offset=offset * dim)
    bound = largest_at_most(float(truncation), dtype)
    return z.reshape(n, dim).to(device=device, dtype=dtype).clamp_(-bound, bound)

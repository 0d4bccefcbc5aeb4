"""GAN latents with the truncation trick, drawn exactly by the inverse CDF, one Philox word per element.

A latent batch is an [n, dim] tensor whose element (r, c) has the flat counter index
g = (offset + r) * dim + c, so sample k is the same however a batch is split.

Without truncation the latents are ``fastgen.randn`` itself (stream 0, element offset ``offset * dim``):
the launcher calls ``random.randn``, nothing here.

With ``truncation = psi`` (the truncation trick: Brock, Donahue, Simonyan, "Large Scale GAN Training
for High Fidelity Natural Image Synthesis", arXiv 1809.11096, Sec. 3.1) each coordinate is a standard
normal conditioned on |z| <= psi. It is symmetric, so z = s * a with a random sign s and |z| = a
following the half-normal truncated to [0, psi], whose CDF is F(a) = erf(a / sqrt 2) / erf(psi / sqrt 2).
Inverting F (exact sampling, no clamping, no rejection loop):

    x       = word (g % 4) of Philox4x32-10 at counter block g // 4, stream TRUNCATED_STREAM
    s       = -1 if x & 1 else +1                    the lowest bit: the sign
    w       = (x >> 8) * 2^-24  in [0, 1)            the top 24 bits: the uniform
    E       = erf(psi / sqrt 2),   Ec = erfc(psi / sqrt 2) = 1 - E          (host, float64)
    y       = w * E                                  the half-normal CDF value, in [0, E)
    1 - y   = (1 - w) + w * Ec                       computed as a sum of positive terms, no cancellation
    z       = s * sqrt(2) * erfinv(y)

erfinv is M. Giles' single-precision approximation ("Approximating the erfinv function", GPU
Computing Gems, 2011): with t = -ln((1 - y)(1 + y)), erfinv(y) = y * P(t) where P is a degree-8
polynomial in t - 2.5 for t < 5 and in sqrt(t) - 3 otherwise (max relative error ~3.4e-7 in fp32,
measured against float64 over every 24-bit w for psi in 0.01 .. 20). Passing 1 - y separately keeps
the tail accurate when psi is large (y near 1). ``fastgen/reference/latents.py`` computes the same
z from the same words with torch.special.erfinv in float64, so kernel and reference agree to fp32
rounding. The approximation error (a few ulps) could put |z| a hair above psi, so |z| is finally
limited to ``bound``, the largest value of the output dtype <= psi (a rounding guard of at most a few
ulps, as in the reference; the sampling itself never clamps). z varies continuously with psi for a fixed seed: a smaller psi pulls every sample inward.
"""
import triton
import triton.language as tl

from . import launch, launch_block
from .random import TWO_POW_M24, as_int64, int64_arg, num_tiles, philox, tile_mask

# Globals a kernel reads must be tl.constexpr (compiled Triton rejects plain Python floats).
SQRT2 = tl.constexpr(1.4142135623730951)
UNIFORM_SCALE = tl.constexpr(TWO_POW_M24)  # 2^-24: the top 24 bits of a word as a uniform in [0, 1)


@triton.jit
def erfinv_giles(y, one_minus_y):
    """erfinv(y) for y in [0, 1) given y and 1 - y (fp32), Giles' two-branch polynomial."""
    t = -tl.log(one_minus_y * (1.0 + y))
    a = t - 2.5
    p = 2.81022636e-08
    p = 3.43273939e-07 + p * a
    p = -3.5233877e-06 + p * a
    p = -4.39150654e-06 + p * a
    p = 0.00021858087 + p * a
    p = -0.00125372503 + p * a
    p = -0.00417768164 + p * a
    p = 0.246640727 + p * a
    p = 1.50140941 + p * a
    b = tl.sqrt(t) - 3.0
    q = -0.000200214257
    q = 0.000100950558 + q * b
    q = 0.00134934322 + q * b
    q = -0.00367342844 + q * b
    q = 0.00573950773 + q * b
    q = -0.0076224613 + q * b
    q = 0.00943887047 + q * b
    q = 1.00167406 + q * b
    q = 2.83297682 + q * b
    return tl.where(t < 5.0, p, q) * y


@triton.jit
def truncated_normal(x, erf_psi, erfc_psi, bound):
    """One N(0, 1) truncated to [-psi, psi] (fp32) per uint32 word ``x``."""
    w = (x >> 8).to(tl.float32) * UNIFORM_SCALE
    y = w * erf_psi
    one_minus_y = (1.0 - w) + w * erfc_psi
    magnitude = tl.minimum(SQRT2 * erfinv_giles(y, one_minus_y), bound, propagate_nan=tl.PropagateNan.ALL)
    return tl.where((x & 1) != 0, -magnitude, magnitude)


@triton.jit
def truncated_normal_tile(seed, stream, offset, erf_psi, erfc_psi, bound, pid, BLOCK: tl.constexpr,
                          PHASE0: tl.constexpr):
    """(idx, z) like ``random.normal_tile``, with truncated normals: the same Philox-aligned tiling
    (the first tile starts at -(offset % 4), at 0 with PHASE0); the caller masks 0 <= idx < n."""
    offset = int64_arg(offset)
    QB: tl.constexpr = BLOCK // 4
    tile = pid.to(tl.int64)
    q = (offset >> 2) + tile * QB + tl.arange(0, QB)
    x0, x1, x2, x3 = philox(seed, stream, q)
    z0 = truncated_normal(x0, erf_psi, erfc_psi, bound)
    z1 = truncated_normal(x1, erf_psi, erfc_psi, bound)
    z2 = truncated_normal(x2, erf_psi, erfc_psi, bound)
    z3 = truncated_normal(x3, erf_psi, erfc_psi, bound)
    # [q, a, b] = (z0, z2 | z1, z3)[a][b], so row-major order is z0, z1, z2, z3 (as in normal_tile)
    z = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [BLOCK])
    if PHASE0:
        idx = tile * BLOCK + tl.arange(0, BLOCK)
    else:
        idx = tile * BLOCK - (offset & 3) + tl.arange(0, BLOCK)
    return idx, z


@triton.jit(do_not_specialize=["seed", "noise_stream", "offset", "erf_psi", "erfc_psi", "bound"])
def _truncated_latents_kernel(out_ptr, n, seed: tl.int64, noise_stream: tl.int64, offset: tl.int64,
                              erf_psi: tl.float32, erfc_psi: tl.float32, bound: tl.float32, BLOCK: tl.constexpr,
                              PHASE0: tl.constexpr):
    idx, z = truncated_normal_tile(seed, noise_stream, offset, erf_psi, erfc_psi, bound, tl.program_id(0), BLOCK, PHASE0)
    tl.store(out_ptr + idx, z.to(out_ptr.dtype.element_ty), mask=tile_mask(idx, n, PHASE0))


def truncated_latents(out, seed: int, stream: int, offset: int, erf_psi: float, erfc_psi: float, bound: float,
                      block=None):
    """Fill contiguous ``out`` with truncated normals of elements offset .. offset + out.numel() - 1,
    |z| <= ``bound`` (psi rounded down to out's dtype)."""
    n = out.numel()
    block = launch_block(_truncated_latents_kernel, block, 2048)
    grid = (num_tiles(n, offset, block),)
    launch(_truncated_latents_kernel, grid, out, n, as_int64(seed), stream, offset, erf_psi, erfc_psi, bound,
           BLOCK=block, PHASE0=offset & 3 == 0)
    return out

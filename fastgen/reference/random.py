"""Counter-based normal noise in plain torch: the same numbers as ``kernels/random.py``.

Philox-4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3", SC'11)
on uint32 words held in int64 tensors, then Box-Muller. Element g = offset + i of a draw:

    q       = g // 4
    counter = (lo32(q), hi32(q), lo32(stream), hi32(stream)),   key = (lo32(seed), hi32(seed))
    one round:  c0' = hi(B * c2) ^ c1 ^ k0     c1' = lo(B * c2)
                c2' = hi(A * c0) ^ c3 ^ k1     c3' = lo(A * c0)
                k0 += 0x9E3779B9,  k1 += 0xBB67AE85            (A = 0xD2511F53, B = 0xCD9E8D57)
    u(x) = 1 - (x >> 8) 2^-24 in (0, 1],   v(x) = (x >> 8) 2^-24 in [0, 1)
    z[4q+0], z[4q+1] = sqrt(-2 ln u(x0)) (cos, sin)(2 pi v(x1))
    z[4q+2], z[4q+3] = sqrt(-2 ln u(x2)) (cos, sin)(2 pi v(x3))

The integers match the kernel bit for bit; the normals are computed in float64 here, so the
kernel's fp32 values agree to float rounding.
"""
import math

import torch

MASK32 = 0xFFFFFFFF
PHILOX_A, PHILOX_B = 0xD2511F53, 0xCD9E8D57          # round multipliers
PHILOX_KEY_A, PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
PHILOX_ROUNDS = 10


def _mulhilo32(a: int, x: torch.Tensor):
    """(hi32, lo32) of the 64-bit product a * x for a < 2^32 and x holding uint32 in int64.

    a * x can reach 2^64, past int64, so multiply by a's 16-bit halves: both partial products
    stay below 2^48 and a * x = mid * 2^16 + (p_lo mod 2^16) with mid = p_hi + p_lo // 2^16.
    """
    p_lo = x * (a & 0xFFFF)
    p_hi = x * (a >> 16)
    mid = p_hi + (p_lo >> 16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (p_lo & 0xFFFF)


def philox4x32(c0, c1, c2, c3, seed: int, rounds: int = PHILOX_ROUNDS):
    """Philox-4x32-``rounds`` of counter words c0..c3 (int64 tensors holding uint32) under a 64-bit seed."""
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(PHILOX_B, c2)
        hi_a, lo_a = _mulhilo32(PHILOX_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + PHILOX_KEY_A) & MASK32, (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def philox_blocks(seed: int, stream: int, q: torch.Tensor):
    """The four Philox words of counter blocks ``q`` (int64 tensor) in stream ``stream``."""
    zero = torch.zeros_like(q)
    return philox4x32(q & MASK32, (q >> 32) & MASK32, zero + (stream & MASK32), zero + (stream >> 32), seed)


def box_muller(x_radius: torch.Tensor, x_angle: torch.Tensor):
    """Two float64 standard normals from two uint32 words (held in int64)."""
    u = 1.0 - (x_radius >> 8).double() * 2.0**-24
    v = (x_angle >> 8).double() * 2.0**-24
    r = torch.sqrt(-2.0 * torch.log(u))
    theta = 2.0 * math.pi * v
    return r * torch.cos(theta), r * torch.sin(theta)


def normals(n: int, *, seed: int, stream: int = 0, offset: int = 0, device=None) -> torch.Tensor:
    """Float64 normals of elements offset .. offset + n - 1 (a flat tensor of n values)."""
    first, last = offset // 4, (offset + n + 3) // 4
    q = torch.arange(first, last, dtype=torch.int64, device=device)
    x0, x1, x2, x3 = philox_blocks(seed, stream, q)
    z0, z1 = box_muller(x0, x1)
    z2, z3 = box_muller(x2, x3)
    z = torch.stack((z0, z1, z2, z3), dim=1).reshape(-1)  # element 4q + j at row q, column j
    start = offset - 4 * first
    return z[start:start + n]


def randn(shape, *, seed: int, stream: int = 0, offset: int = 0, device=None, dtype=torch.float32):
    """``shape`` normals, element i (row-major) drawn from counter element offset + i."""
    shape = torch.Size(shape)
    z = normals(shape.numel(), seed=seed, stream=stream, offset=offset, device=device)
    return z.to(dtype).reshape(shape)

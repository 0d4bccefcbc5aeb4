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

The integers match the kernel bit for bit; the normals are computed in float64 here by default
(or in fp32, the kernel's precision, where a caller asks), so the kernel's fp32 values agree to
float rounding. Many draws at once (rows with their own stream and offset, e.g. the noise of
several sampling steps) go through one call: the cost of these whole-tensor integer ops is per
op, so one call over R rows costs about what one row costs while rows are small.
"""
import math

import torch

MASK32 = 0xFFFFFFFF
PHILOX_A, PHILOX_B = 0xD2511F53, 0xCD9E8D57          # round multipliers
PHILOX_KEY_A, PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
PHILOX_ROUNDS = 10


def philox4x32(c0, c1, c2, c3, seed, rounds: int = PHILOX_ROUNDS):
    """Philox-4x32-``rounds`` of counter words c0..c3 (int64 tensors holding uint32, broadcasting
    against each other) under a 64-bit seed (an int, or an int64 tensor of one element).

    Each round takes hi(a x) and lo(a x) from one int64 product: a x < 2^64 can pass 2^63, and
    torch's int64 multiply wraps modulo 2^64 (two's complement), so the product's low 64 bits are
    exact. A product stands for its lo word until read: its high bits vanish under the mask of the
    xor that consumes it next round (or the final mask). The rounds work in place on copies of the
    words, so a round is ten whole-tensor ops and allocates nothing.
    """
    c0, c1, c2, c3 = (c.clone() for c in torch.broadcast_tensors(c0, c1, c2, c3))
    shifted = torch.empty_like(c0)
    if isinstance(seed, torch.Tensor):
        seed = seed.reshape(())
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(rounds):
        c0.mul_(PHILOX_A)  # product_a = A c0
        c2.mul_(PHILOX_B)  # product_b = B c2
        # c0' = hi(product_b) ^ c1 ^ k0, over c1;   c1' = lo(product_b), in c2's buffer
        c1.bitwise_xor_(torch.bitwise_right_shift(c2, 32, out=shifted)).bitwise_xor_(k0).bitwise_and_(MASK32)
        # c2' = hi(product_a) ^ c3 ^ k1, over c3;   c3' = lo(product_a), in c0's buffer
        c3.bitwise_xor_(torch.bitwise_right_shift(c0, 32, out=shifted)).bitwise_xor_(k1).bitwise_and_(MASK32)
        c0, c1, c2, c3 = c1, c2, c3, c0
        k0, k1 = (k0 + PHILOX_KEY_A) & MASK32, (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1.bitwise_and_(MASK32), c2, c3.bitwise_and_(MASK32)


def philox_blocks(seed, stream, q: torch.Tensor):
    """The four Philox words of counter blocks ``q`` (non-negative int64 tensor) in ``stream`` (an int,
    or an int64 tensor broadcasting against q: one stream per row) under ``seed`` (an int, or an int64
    tensor of one element holding the 64-bit seed's bits)."""
    stream = torch.as_tensor(stream, dtype=torch.int64, device=q.device)
    return philox4x32(q & MASK32, q >> 32, stream & MASK32, stream >> 32, seed)


def box_muller(x_radius: torch.Tensor, x_angle: torch.Tensor, dtype=torch.float64):
    """Two standard normals (in ``dtype``, float64 or the kernel's fp32) from two uint32 words (held in int64):
    r = sqrt(-2 ln u), theta = 2 pi v, (r cos theta, r sin theta). In place after the first op of each
    line; theta = (x >> 8) (2 pi 2^-24) rounds exactly as 2 pi ((x >> 8) 2^-24), as scaling by 2^-24 is exact."""
    r = (x_radius >> 8).to(dtype).mul_(-2.0**-24).add_(1.0).log_().mul_(-2.0).sqrt_()
    theta = (x_angle >> 8).to(dtype).mul_(2.0 * math.pi * 2.0**-24)
    return torch.cos(theta).mul_(r), theta.sin_().mul_(r)


def normals(n: int, *, seed, stream=0, offset=0, device=None, dtype=torch.float64) -> torch.Tensor:
    """Normals of counter elements offset .. offset + n - 1 in ``stream``: a flat tensor of n values.

    ``stream`` and ``offset`` may also be int64 tensors of R values (or one of them an int): then
    the result is [R, n], row r drawn from stream[r] at offset[r], in one pass over all rows.
    ``seed`` is an int or an int64 tensor of one element (what a compiled caller passes, so a new
    seed is a new input rather than a new graph). Nothing here reads a tensor back to the host, so
    torch.compile traces it whole: inductor fuses the rounds and Box-Muller into one loop.
    """
    rows = isinstance(stream, torch.Tensor) or isinstance(offset, torch.Tensor)
    stream = torch.as_tensor(stream, dtype=torch.int64, device=device).reshape(-1, 1)
    blocks = (n + 3) // 4 + 1  # covers elements start .. start + n - 1 for any start = offset - 4 first in 0..3
    if isinstance(offset, torch.Tensor):
        offset = offset.to(device=device, dtype=torch.int64).reshape(-1, 1)
        first = offset // 4
    else:  # a host offset: the slice of the words is known when tracing
        first = offset // 4
    q = first + torch.arange(blocks, dtype=torch.int64, device=device)
    x0, x1, x2, x3 = philox_blocks(seed, stream, q)
    z0, z1 = box_muller(x0, x1, dtype)
    z2, z3 = box_muller(x2, x3, dtype)
    z = torch.stack((z0, z1, z2, z3), dim=-1).reshape(x0.shape[0], -1)  # element 4q + j at [row, 4 (q - first) + j]
    start = offset - 4 * first
    if not isinstance(start, torch.Tensor):
        z = z[:, start:start + n]
    elif start.numel() == 1:
        z = z.gather(1, (start.reshape(1, 1) + torch.arange(n, device=z.device)).expand(z.shape[0], n))
    else:
        z = z.gather(1, (start + torch.arange(n, device=z.device)).expand(z.shape[0], n))
    return z if rows else z.reshape(n)


def randn(shape, *, seed: int, stream: int = 0, offset: int = 0, device=None, dtype=torch.float32):
    """``shape`` normals, element i (row-major) drawn from counter element offset + i: ``offset``
    counts elements here (as in the kernels); ``fastgen.randn`` counts rows and passes k * row."""
    shape = torch.Size(shape)
    z = normals(shape.numel(), seed=seed, stream=stream, offset=offset, device=device)
    return z.to(dtype).reshape(shape)

"""Counter-based normal noise: Philox-4x32-10 + Box-Muller, a pure function of the element index.

Element g of a draw (g = offset + i, i the flat row-major index; every launcher here takes the
offset in elements, the public ops convert their offset in samples to it) takes its value from

    q       = g // 4                                  the Philox counter block of g
    counter = (lo32(q), hi32(q), lo32(stream), hi32(stream)),   key = (lo32(seed), hi32(seed))
    x0..x3  = Philox4x32-10(counter, key)             (Salmon et al., SC'11; Triton's tl.philox_impl)
    u(x)    = 1 - (x >> 8) * 2^-24   in (0, 1]        the radius uniform, never 0, so log is finite
    v(x)    =     (x >> 8) * 2^-24   in [0, 1)        the angle uniform
    z[4q+0], z[4q+1] = sqrt(-2 ln u(x0)) * (cos, sin)(2 pi v(x1))     Box-Muller
    z[4q+2], z[4q+3] = sqrt(-2 ln u(x2)) * (cos, sin)(2 pi v(x3))

so one Philox call yields four normals and nothing depends on BLOCK, grid, batch size or device.
``fastgen/reference/random.py`` computes the same numbers with torch integer ops.

``normal_tile`` is the building block for fused kernels: a program works on a tile of BLOCK
consecutive elements aligned to Philox blocks (the first tile starts at -(offset % 4), the
last may run past n), gets the normals for it and masks ``0 <= idx < n`` itself.
seed, stream and offset are int64 arguments that are never specialised, so new values never
recompile. The one exception is the constexpr PHASE0, which a launcher sets when offset % 4 == 0
(always so when a sample's size is a multiple of 4, as the public offsets count samples): then the
tiles start at multiples of BLOCK and the compiler can prove the accesses aligned (128-bit vectors).
Both variants draw the same Philox blocks; at most two compile per configuration.
"""
import triton
import triton.language as tl

from . import launch, launch_block

TWO_POW_M24 = tl.constexpr(5.9604644775390625e-08)  # 2^-24: scales a 24-bit integer into [0, 1)
TWO_PI = tl.constexpr(6.283185307179586)
# Where a kernel's noise z comes from (one numbering for every kernel family that draws or reads it).
NOISE_NONE = tl.constexpr(0)    # no z
NOISE_TENSOR = tl.constexpr(1)  # read from a tensor
NOISE_PHILOX = tl.constexpr(2)  # drawn in the kernel from the counter-based stream (normal_tile)


def as_int64(value: int) -> int:
    """A 64-bit pattern (0 <= value < 2^64) as the signed int64 a kernel argument can carry."""
    return value - (1 << 64) if value >= (1 << 63) else value


@triton.jit
def int64_arg(x):
    """A scalar integer kernel argument as int64. Compiled, both casts are free. The Triton
    interpreter carries a Python int in [2^31, 2^32) as uint32 data under an int64 type, so
    ``x.to(tl.int64)`` is a no-op there and later ops read the data as int32 (offset 2^31 became
    -2^31); the round trip through uint64 converts the data itself."""
    return x.to(tl.uint64).to(tl.int64)


@triton.jit
def philox(seed, stream, q):
    """Four uint32 blocks of Philox4x32-10 for int64 counter blocks ``q`` (seed, stream: int64 scalars)."""
    seed = int64_arg(seed)
    stream = int64_arg(stream)
    zero = tl.zeros(q.shape, tl.uint32)
    c0 = q.to(tl.uint32)  # int64 -> uint32 truncates: lo32(q)
    c1 = (q >> 32).to(tl.uint32)
    c2 = zero + stream.to(tl.uint32)
    c3 = zero + (stream >> 32).to(tl.uint32)
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    return tl.philox_impl(c0, c1, c2, c3, k0, k1, 10)


@triton.jit
def box_muller(x_radius, x_angle):
    """Two standard normals (fp32) from two uint32 blocks."""
    u = 1.0 - (x_radius >> 8).to(tl.float32) * TWO_POW_M24
    v = (x_angle >> 8).to(tl.float32) * TWO_POW_M24
    r = tl.sqrt(-2.0 * tl.log(u))
    theta = TWO_PI * v
    return r * tl.cos(theta), r * tl.sin(theta)


@triton.jit
def normal_tile(seed, stream, offset, pid, BLOCK: tl.constexpr, PHASE0: tl.constexpr):
    """(idx, z): positions ``idx`` (int64, relative to the draw's first element) of tile ``pid``
    and their normals ``z`` (fp32). Tiles are aligned to Philox blocks, so the first starts at
    -(offset % 4); the caller masks 0 <= idx < n (``tile_mask``). PHASE0 (offset % 4 == 0) drops
    the shift from the index, so the compiler sees tiles at multiples of BLOCK."""
    offset = int64_arg(offset)
    QB: tl.constexpr = BLOCK // 4
    tile = pid.to(tl.int64)
    q = (offset >> 2) + tile * QB + tl.arange(0, QB)
    x0, x1, x2, x3 = philox(seed, stream, q)
    z0, z1 = box_muller(x0, x1)
    z2, z3 = box_muller(x2, x3)
    # join stacks on a new last axis: [q, a, b] = (z0, z2 | z1, z3)[a][b], so row-major order is z0, z1, z2, z3
    z = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [BLOCK])
    if PHASE0:
        idx = tile * BLOCK + tl.arange(0, BLOCK)
    else:
        idx = tile * BLOCK - (offset & 3) + tl.arange(0, BLOCK)
    return idx, z


@triton.jit
def tile_mask(idx, n, PHASE0: tl.constexpr):
    """0 <= idx < n; with PHASE0 no index is negative."""
    if PHASE0:
        mask = idx < n
    else:
        mask = (idx >= 0) & (idx < n)
    return mask


def num_tiles(n: int, offset: int, block: int) -> int:
    """Programs ``normal_tile`` needs to cover n elements drawn from ``offset``."""
    return triton.cdiv(n + (offset & 3), block)


@triton.jit(do_not_specialize=["seed", "noise_stream", "offset"])
def _randn_kernel(out_ptr, n, seed: tl.int64, noise_stream: tl.int64, offset: tl.int64, BLOCK: tl.constexpr,
                  PHASE0: tl.constexpr):
    idx, z = normal_tile(seed, noise_stream, offset, tl.program_id(0), BLOCK, PHASE0)
    tl.store(out_ptr + idx, z.to(out_ptr.dtype.element_ty), mask=tile_mask(idx, n, PHASE0))


@triton.jit(do_not_specialize=["seed", "noise_stream", "counter"])
def _philox_kernel(out_ptr, n_blocks, seed: tl.int64, noise_stream: tl.int64, counter: tl.int64,
                   BLOCK: tl.constexpr):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x0, x1, x2, x3 = philox(seed, noise_stream, int64_arg(counter) + j)
    mask = j < n_blocks
    row = out_ptr + 4 * j
    tl.store(row + 0, x0.to(tl.int32, bitcast=True), mask=mask)
    tl.store(row + 1, x1.to(tl.int32, bitcast=True), mask=mask)
    tl.store(row + 2, x2.to(tl.int32, bitcast=True), mask=mask)
    tl.store(row + 3, x3.to(tl.int32, bitcast=True), mask=mask)


def randn(out, seed: int, stream: int, offset: int, block=None):
    """Fill contiguous ``out`` with normals of elements offset .. offset + out.numel() - 1."""
    n = out.numel()
    block = launch_block(_randn_kernel, block, 2048)
    grid = (num_tiles(n, offset, block),)
    # 8 warps: 8 normals per thread (two fp32 / one 16-bit 128-bit store); with 4 warps ptxas spills
    launch(_randn_kernel, grid, out, n, as_int64(seed), stream, offset, BLOCK=block, PHASE0=offset & 3 == 0,
           num_warps=8)
    return out


def philox_bits(out, seed: int, stream: int, counter: int, block=None):
    """Raw Philox words of counter blocks counter .. counter + out.shape[0] - 1 into int32 ``out`` [m, 4]."""
    n_blocks = out.shape[0]
    block = launch_block(_philox_kernel, block, 256)
    grid = (triton.cdiv(n_blocks, block),)
    launch(_philox_kernel, grid, out, n_blocks, as_int64(seed), stream, counter, BLOCK=block)
    return out

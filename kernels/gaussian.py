"""Fused diagonal-Gaussian kernels of the VAE: reparameterization sample, Gaussian KL, and both at once.

Math (Kingma & Welling, arXiv 1312.6114; per element, computed in fp32):

    z   = mu + s * eps,            s = exp(logvar / 2)                        (Sec. 2.4, Eq. 10)
    KL  = 1/2 (lv2 - lv + exp(lv - lv2) + d^2 exp(-lv2) - 1),  d = mu - mu2    (Appendix B; the standard
          normal prior is mu2 = 0, lv2 = 0: KL = 1/2 (exp(lv) + mu^2 - 1 - lv))

    backward, with upstream gradients gz (of z) and gk (of KL, already broadcast to the element):
    dz/dmu  = 1                    dz/dlv  = s * eps / 2  (= (z - mu) / 2)      dz/deps = s
    dKL/dmu = d exp(-lv2)          dKL/dlv = (exp(lv - lv2) - 1) / 2
    dKL/dmu2 = -d exp(-lv2)        dKL/dlv2 = (1 - exp(lv - lv2) - d^2 exp(-lv2)) / 2

The backward recomputes eps (from the seed, or reads the noise tensor) instead of keeping z and
forming z - mu: nothing extra is stored, and s * eps does not lose the digits that z - mu loses
when |mu| >> s in fp16/bf16.

Layout. The logical tensor is viewed as ``n_rows`` rows of ``row_len`` elements (per-sample KL:
rows = samples; everything else: one row). A program owns a [ROWS, CHUNK] tile (ROWS rows, CHUNK
consecutive columns): short rows are packed many to a tile, long rows are split into ``n_chunks``
chunks whose fp32 partial sums go to ``partial[row, chunk]`` (summed by the caller: a tiny tensor,
so the inputs are read once, whatever the row length, and the result is deterministic).

Noise. Element i (flat, row-major) takes eps = fastgen.randn's element i (kernels/random.py):
 * NOISE_TILES: every row starts on the same Philox lane (one row, or row_len % 4 == 0), so the tile
   is shifted left by offset % 4 and each Philox call yields four neighbouring normals (as normal_tile);
 * NOISE_EACH: otherwise each element runs its own Philox call and keeps one of the four normals
   (4x the integer work; only reparameterize_with_kl on rows whose length is not a multiple of 4).
"""
from typing import NamedTuple

import triton
import triton.language as tl

from . import launch, launch_block
from .random import NOISE_NONE, NOISE_PHILOX, NOISE_TENSOR, as_int64, box_muller, int64_arg, philox

# What the kernels get eps from (forward), or whether a z gradient exists (backward).
# z's sources: NOISE_NONE (KL only / no gradient of z) and NOISE_TENSOR from kernels/random.py, and
NOISE_TILES = NOISE_PHILOX      # counter-based, four normals per Philox call
NOISE_EACH = tl.constexpr(3)    # counter-based, one Philox call per element
# How the KL gradient reaches an element.
GRAD_KL_NONE = tl.constexpr(0)
GRAD_KL_ELEMENTWISE = tl.constexpr(1)
GRAD_KL_PER_ROW = tl.constexpr(2)
GRAD_KL_SCALAR = tl.constexpr(3)

BLOCK = 2048  # elements per program on a GPU


@triton.jit
def _normal_at(seed, stream, g):
    """Normal of counter element ``g`` (any int64 tensor): its own Philox call, one of four lanes."""
    lane = g & 3
    x0, x1, x2, x3 = philox(seed, stream, g >> 2)
    second_pair = lane >= 2
    z_cos, z_sin = box_muller(tl.where(second_pair, x2, x0), tl.where(second_pair, x3, x1))
    return tl.where((lane & 1) == 0, z_cos, z_sin)


@triton.jit
def _normal_rows(seed, stream, q_start, ROWS: tl.constexpr, CHUNK: tl.constexpr):
    """Normals [ROWS, CHUNK] of the CHUNK elements from counter block ``q_start[r]`` on, per row."""
    q = q_start[:, None] + tl.arange(0, CHUNK // 4)[None, :]
    x0, x1, x2, x3 = philox(seed, stream, q)
    z0, z1 = box_muller(x0, x1)
    z2, z3 = box_muller(x2, x3)
    # [r, q, a, b] = (z0, z2 | z1, z3)[a][b]: row-major order within q is z0, z1, z2, z3 (as normal_tile)
    return tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [ROWS, CHUNK])


@triton.jit
def _tile(n_rows, row_len, n_chunks, shift, ROWS: tl.constexpr, CHUNK: tl.constexpr):
    """This program's rows [ROWS], chunk, flat indices [ROWS, CHUNK] and their mask."""
    pid = tl.program_id(0)
    row_block = pid // n_chunks
    chunk = pid - row_block * n_chunks
    rows = row_block.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = chunk.to(tl.int64) * CHUNK - shift + tl.arange(0, CHUNK)
    mask = (rows < n_rows)[:, None] & ((cols >= 0) & (cols < row_len))[None, :]
    return rows, chunk, rows[:, None] * row_len + cols[None, :], mask


@triton.jit
def _eps(noise_ptr, idx, mask, rows, chunk, row_len, seed, stream, offset,
         NOISE: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr):
    """eps of the tile's elements (fp32), from the tensor or the counter-based stream."""
    offset = int64_arg(offset)
    if NOISE == NOISE_TENSOR:
        eps = tl.load(noise_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    elif NOISE == NOISE_TILES:
        # the tile's first column sits at counter 4 (offset // 4) + r row_len + chunk CHUNK, a multiple of 4
        q_start = (offset >> 2) + (rows * row_len + chunk.to(tl.int64) * CHUNK) // 4
        eps = _normal_rows(seed, stream, q_start, ROWS, CHUNK)
    else:
        eps = _normal_at(seed, stream, offset + idx)
    return eps


@triton.jit
def _load(ptr, idx, mask):
    return tl.load(ptr + idx, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _kl_terms(mu, logvar, mu2_ptr, logvar2_ptr, idx, mask, prior_period, HAS_MU2: tl.constexpr,
              HAS_LOGVAR2: tl.constexpr, PERIODIC_PRIOR: tl.constexpr):
    """(d, d exp(-lv2), exp(lv - lv2), lv2) with d = mu - mu2 at the tile's elements. A prior of
    ``prior_period`` elements repeats along the flat index (it is shared over leading dims); an absent
    mu2 or logvar2 is the standard normal's 0 (and costs no load, no exp)."""
    if PERIODIC_PRIOR:
        idx = idx % prior_period
    if HAS_MU2:
        d = mu - _load(mu2_ptr, idx, mask)
    else:
        d = mu
    if HAS_LOGVAR2:
        logvar2 = _load(logvar2_ptr, idx, mask)
        d_scaled = d * tl.exp(-logvar2)
        var_ratio = tl.exp(logvar - logvar2)
    else:
        logvar2 = tl.zeros_like(mu)
        d_scaled = d
        var_ratio = tl.exp(logvar)
    return d, d_scaled, var_ratio, logvar2


@triton.jit(do_not_specialize=["seed", "noise_stream", "offset"])
def _gaussian_fwd_kernel(
        mu_ptr, logvar_ptr, mu2_ptr, logvar2_ptr, noise_ptr,   # inputs (unused ones: any pointer)
        z_ptr, kl_ptr, partial_ptr,                             # outputs: z, elementwise KL, partial sums
        n_rows, row_len, n_chunks, shift, prior_period,
        seed: tl.int64, noise_stream: tl.int64, offset: tl.int64,
        HAS_MU2: tl.constexpr, HAS_LOGVAR2: tl.constexpr, PERIODIC_PRIOR: tl.constexpr,
        NOISE: tl.constexpr, STORE_KL: tl.constexpr, STORE_PARTIAL: tl.constexpr,
        ROWS: tl.constexpr, CHUNK: tl.constexpr):
    rows, chunk, idx, mask = _tile(n_rows, row_len, n_chunks, shift, ROWS, CHUNK)
    mu = _load(mu_ptr, idx, mask)
    logvar = _load(logvar_ptr, idx, mask)
    if NOISE != NOISE_NONE:
        eps = _eps(noise_ptr, idx, mask, rows, chunk, row_len, seed, noise_stream, offset, NOISE, ROWS, CHUNK)
        z = mu + tl.exp(0.5 * logvar) * eps
        tl.store(z_ptr + idx, z.to(z_ptr.dtype.element_ty), mask=mask)
    if STORE_KL or STORE_PARTIAL:
        d, d_scaled, var_ratio, logvar2 = _kl_terms(mu, logvar, mu2_ptr, logvar2_ptr, idx, mask, prior_period,
                                                    HAS_MU2, HAS_LOGVAR2, PERIODIC_PRIOR)
        kl = 0.5 * (logvar2 - logvar + var_ratio + d * d_scaled - 1.0)
        if STORE_KL:
            tl.store(kl_ptr + idx, kl.to(kl_ptr.dtype.element_ty), mask=mask)
        if STORE_PARTIAL:
            row_sum = tl.sum(tl.where(mask, kl, 0.0), axis=1)
            tl.store(partial_ptr + rows * n_chunks + chunk, row_sum, mask=rows < n_rows)


@triton.jit(do_not_specialize=["seed", "noise_stream", "offset"])
def _gaussian_bwd_kernel(
        mu_ptr, logvar_ptr, mu2_ptr, logvar2_ptr, noise_ptr, grad_z_ptr, grad_kl_ptr,   # inputs
        grad_mu_ptr, grad_logvar_ptr, grad_mu2_ptr, grad_logvar2_ptr, grad_noise_ptr,  # outputs
        n_rows, row_len, n_chunks, shift, prior_period, kl_scale,
        seed: tl.int64, noise_stream: tl.int64, offset: tl.int64,
        HAS_MU2: tl.constexpr, HAS_LOGVAR2: tl.constexpr, PERIODIC_PRIOR: tl.constexpr,
        NOISE: tl.constexpr, GRAD_KL: tl.constexpr,
        WRITE_MU: tl.constexpr, WRITE_LOGVAR: tl.constexpr, WRITE_MU2: tl.constexpr,
        WRITE_LOGVAR2: tl.constexpr, WRITE_NOISE: tl.constexpr,
        ROWS: tl.constexpr, CHUNK: tl.constexpr):
    rows, chunk, idx, mask = _tile(n_rows, row_len, n_chunks, shift, ROWS, CHUNK)
    logvar = _load(logvar_ptr, idx, mask)
    grad_mu = tl.zeros([ROWS, CHUNK], tl.float32)
    grad_logvar = tl.zeros([ROWS, CHUNK], tl.float32)
    if NOISE != NOISE_NONE:  # through z = mu + s eps
        gz = _load(grad_z_ptr, idx, mask)
        std = tl.exp(0.5 * logvar)
        eps = _eps(noise_ptr, idx, mask, rows, chunk, row_len, seed, noise_stream, offset, NOISE, ROWS, CHUNK)
        grad_mu += gz
        grad_logvar += 0.5 * gz * std * eps
        if WRITE_NOISE:
            tl.store(grad_noise_ptr + idx, (gz * std).to(grad_noise_ptr.dtype.element_ty), mask=mask)
    if GRAD_KL != GRAD_KL_NONE:  # through KL(mu, logvar || mu2, logvar2)
        if GRAD_KL == GRAD_KL_ELEMENTWISE:
            gk = _load(grad_kl_ptr, idx, mask) * kl_scale
        elif GRAD_KL == GRAD_KL_PER_ROW:
            gk = (tl.load(grad_kl_ptr + rows, mask=rows < n_rows, other=0.0).to(tl.float32) * kl_scale)[:, None]
        else:
            gk = tl.load(grad_kl_ptr).to(tl.float32) * kl_scale
        mu = _load(mu_ptr, idx, mask)
        d, d_scaled, var_ratio, _ = _kl_terms(mu, logvar, mu2_ptr, logvar2_ptr, idx, mask, prior_period,
                                              HAS_MU2, HAS_LOGVAR2, PERIODIC_PRIOR)
        grad_mu += gk * d_scaled
        grad_logvar += gk * 0.5 * (var_ratio - 1.0)
        if WRITE_MU2:
            tl.store(grad_mu2_ptr + idx, (-gk * d_scaled).to(grad_mu2_ptr.dtype.element_ty), mask=mask)
        if WRITE_LOGVAR2:
            grad_logvar2 = gk * 0.5 * (1.0 - var_ratio - d * d_scaled)
            tl.store(grad_logvar2_ptr + idx, grad_logvar2.to(grad_logvar2_ptr.dtype.element_ty), mask=mask)
    if WRITE_MU:
        tl.store(grad_mu_ptr + idx, grad_mu.to(grad_mu_ptr.dtype.element_ty), mask=mask)
    if WRITE_LOGVAR:
        tl.store(grad_logvar_ptr + idx, grad_logvar.to(grad_logvar_ptr.dtype.element_ty), mask=mask)


# --- launchers -----------------------------------------------------------------------------------

class Tiling(NamedTuple):
    """How a launch covers n_rows x row_len elements: [rows, chunk] tiles, n_chunks per row, the
    first chunk starting ``shift`` columns early (Philox alignment), eps drawn as ``noise`` says."""
    n_rows: int
    row_len: int
    rows: int
    chunk: int
    n_chunks: int
    shift: int
    noise: int

    @property
    def grid(self):
        return (triton.cdiv(self.n_rows, self.rows) * self.n_chunks,)


def tiling(n_rows: int, row_len: int, *, noise: int = 0, offset: int = 0, block=None) -> Tiling:
    """The tiling of a launch (forward and backward use the same one). ``noise``: NOISE_NONE,
    NOISE_TENSOR, or NOISE_TILES for counter-based noise, which becomes NOISE_EACH where rows
    would start on different Philox lanes."""
    noise = int(noise)
    block = launch_block(_gaussian_fwd_kernel, block, BLOCK)
    if noise == NOISE_TILES.value and n_rows > 1 and row_len % 4:
        noise = NOISE_EACH.value
    shift = offset & 3 if noise == NOISE_TILES.value else 0
    chunk = min(triton.next_power_of_2(max(row_len + shift, 1)), block)
    if noise == NOISE_TILES.value:
        chunk = max(chunk, 4)
    rows = min(block // chunk, triton.next_power_of_2(max(n_rows, 1)))
    n_chunks = triton.cdiv(row_len + shift, chunk) if row_len else 0  # empty rows: no chunk, a zero sum
    return Tiling(n_rows, row_len, rows, chunk, n_chunks, shift, noise)


def _prior_args(mu, mu2, logvar2, prior_period):
    return dict(mu2_ptr=mu if mu2 is None else mu2, logvar2_ptr=mu if logvar2 is None else logvar2,
                prior_period=max(prior_period, 1), HAS_MU2=mu2 is not None, HAS_LOGVAR2=logvar2 is not None,
                PERIODIC_PRIOR=(mu2 is not None or logvar2 is not None) and prior_period != mu.numel())


def forward(t: Tiling, mu, logvar, *, mu2=None, logvar2=None, prior_period=0, noise=None, seed=0, stream=0,
            offset=0, z=None, kl=None, partial=None):
    """One pass over contiguous mu, logvar (and the prior, noise) writing any of z, the elementwise KL
    ``kl`` and the fp32 per-(row, chunk) KL sums ``partial`` [n_rows, n_chunks]. The prior holds
    ``prior_period`` elements repeated along the flat index."""
    launch(
        _gaussian_fwd_kernel, t.grid,
        mu, logvar, noise_ptr=mu if noise is None else noise,
        z_ptr=mu if z is None else z, kl_ptr=mu if kl is None else kl,
        partial_ptr=mu if partial is None else partial,
        n_rows=t.n_rows, row_len=t.row_len, n_chunks=t.n_chunks, shift=t.shift,
        seed=as_int64(seed or 0), noise_stream=stream, offset=offset,
        NOISE=t.noise if z is not None else 0, STORE_KL=kl is not None, STORE_PARTIAL=partial is not None,
        ROWS=t.rows, CHUNK=t.chunk, **_prior_args(mu, mu2, logvar2, prior_period))


def backward(t: Tiling, mu, logvar, *, mu2=None, logvar2=None, prior_period=0, noise=None, seed=0, stream=0,
             offset=0, grad_z=None, grad_kl=None, grad_kl_mode=0, kl_scale=1.0, grad_mu=None, grad_logvar=None,
             grad_mu2=None, grad_logvar2=None, grad_noise=None):
    """Gradients of z (``grad_z``, elementwise) and of the KL (``grad_kl``: elementwise, per row or a
    scalar, times ``kl_scale``) into whichever of grad_mu, grad_logvar, grad_mu2, grad_logvar2,
    grad_noise are given (elementwise, like mu)."""
    dummy = mu
    launch(
        _gaussian_bwd_kernel, t.grid,
        mu, logvar, noise_ptr=dummy if noise is None else noise,
        grad_z_ptr=dummy if grad_z is None else grad_z, grad_kl_ptr=dummy if grad_kl is None else grad_kl,
        grad_mu_ptr=dummy if grad_mu is None else grad_mu,
        grad_logvar_ptr=dummy if grad_logvar is None else grad_logvar,
        grad_mu2_ptr=dummy if grad_mu2 is None else grad_mu2,
        grad_logvar2_ptr=dummy if grad_logvar2 is None else grad_logvar2,
        grad_noise_ptr=dummy if grad_noise is None else grad_noise,
        n_rows=t.n_rows, row_len=t.row_len, n_chunks=t.n_chunks, shift=t.shift, kl_scale=float(kl_scale),
        seed=as_int64(seed or 0), noise_stream=stream, offset=offset,
        NOISE=t.noise if grad_z is not None else 0, GRAD_KL=grad_kl_mode if grad_kl is not None else 0,
        WRITE_MU=grad_mu is not None, WRITE_LOGVAR=grad_logvar is not None, WRITE_MU2=grad_mu2 is not None,
        WRITE_LOGVAR2=grad_logvar2 is not None, WRITE_NOISE=grad_noise is not None,
        ROWS=t.rows, CHUNK=t.chunk, **_prior_args(mu, mu2, logvar2, prior_period))

"""Fused affine coupling of normalizing flows (RealNVP, Glow): the transform and its per-sample
log-determinant in one pass, forward and reverse, and one backward pass.

Math (Dinh et al., arXiv 1605.08803, Eq. 7-9; per element, computed in fp32; s = log_scale, t = shift):

    forward   y = x exp(s) + t            logdet[n] = sum_i s[n, i]
    reverse   x = (y - t) exp(-s)         logdet[n] = -sum_i s[n, i]

    backward, with upstream gradients g (of the output, elementwise) and gl (of logdet, per sample n):
    forward   dx = g exp(s)               ds = g x exp(s) + gl[n]          dt = g
    reverse   dy = g exp(-s)              ds = -g (y - t) exp(-s) - gl[n]  dt = -g exp(-s)

The backward recomputes exp(s) from the inputs it keeps (x or y, s, t); nothing else is stored.
Forward, dt = g is the upstream gradient itself, so the kernel does not write it.

Layout. The tensor is viewed as ``n_rows`` samples of ``row_len`` elements. A program owns a
[ROWS, CHUNK] tile (ROWS rows, CHUNK consecutive columns): short rows are packed many to a tile,
long rows are split into ``n_chunks`` chunks whose fp32 sums of s go to ``partial[row, chunk]``
(summed by the caller: a tiny tensor, so every input is read once and the result is deterministic).
NaN and inf take the same arithmetic as in the reference, so they land where the reference's do.
"""
from typing import NamedTuple

import triton
import triton.language as tl

from . import launch, launch_block

BLOCK = 2048  # elements per program on a GPU


@triton.jit
def _tile(n_rows, row_len, n_chunks, ROWS: tl.constexpr, CHUNK: tl.constexpr):
    """This program's rows [ROWS], chunk, flat indices [ROWS, CHUNK] and their mask."""
    pid = tl.program_id(0)
    row_block = pid // n_chunks
    chunk = pid - row_block * n_chunks
    rows = row_block.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = chunk.to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    mask = (rows < n_rows)[:, None] & (cols < row_len)[None, :]
    return rows, chunk, rows[:, None] * row_len + cols[None, :], mask


@triton.jit
def _coupling_fwd_kernel(x_ptr, log_scale_ptr, shift_ptr, y_ptr, partial_ptr, n_rows, row_len, n_chunks,
                         REVERSE: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr):
    rows, chunk, idx, mask = _tile(n_rows, row_len, n_chunks, ROWS, CHUNK)
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(log_scale_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(shift_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if REVERSE:
        y = (x - t) * tl.exp(-s)
        s = -s
    else:
        y = x * tl.exp(s) + t
    tl.store(y_ptr + idx, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + rows * n_chunks + chunk, tl.sum(s, axis=1), mask=rows < n_rows)


@triton.jit
def _coupling_bwd_kernel(x_ptr, log_scale_ptr, shift_ptr, grad_out_ptr, grad_logdet_ptr,      # inputs
                         grad_x_ptr, grad_log_scale_ptr, grad_shift_ptr,                      # outputs
                         n_rows, row_len, n_chunks,
                         REVERSE: tl.constexpr, WRITE_X: tl.constexpr, WRITE_LOG_SCALE: tl.constexpr,
                         WRITE_SHIFT: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr):
    rows, chunk, idx, mask = _tile(n_rows, row_len, n_chunks, ROWS, CHUNK)
    s = tl.load(log_scale_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_out_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if REVERSE:
        scale = tl.exp(-s)
    else:
        scale = tl.exp(s)
    grad_x = g * scale
    if WRITE_X:
        tl.store(grad_x_ptr + idx, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
    if WRITE_SHIFT:  # reverse only: dt = -g exp(-s) (forward, dt = g is the upstream gradient itself)
        tl.store(grad_shift_ptr + idx, (-grad_x).to(grad_shift_ptr.dtype.element_ty), mask=mask)
    if WRITE_LOG_SCALE:
        x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        gl = tl.load(grad_logdet_ptr + rows, mask=rows < n_rows, other=0.0).to(tl.float32)[:, None]
        if REVERSE:
            t = tl.load(shift_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            grad_s = -(grad_x * (x - t)) - gl
        else:
            grad_s = grad_x * x + gl
        tl.store(grad_log_scale_ptr + idx, grad_s.to(grad_log_scale_ptr.dtype.element_ty), mask=mask)


# --- launchers -----------------------------------------------------------------------------------

class Tiling(NamedTuple):
    """How a launch covers n_rows x row_len elements: [rows, chunk] tiles, n_chunks per row."""
    n_rows: int
    row_len: int
    rows: int
    chunk: int
    n_chunks: int

    @property
    def grid(self):
        return (triton.cdiv(self.n_rows, self.rows) * self.n_chunks,)


def tiling(n_rows: int, row_len: int, *, block=None) -> Tiling:
    """The tiling of a launch (forward and backward use the same one); rows and row_len >= 1."""
    block = launch_block(_coupling_fwd_kernel, block, BLOCK)
    chunk = min(triton.next_power_of_2(row_len), block)
    rows = min(block // chunk, triton.next_power_of_2(n_rows))
    return Tiling(n_rows, row_len, rows, chunk, triton.cdiv(row_len, chunk))


def forward(t: Tiling, x, log_scale, shift, *, y, partial, reverse: bool):
    """y = x exp(s) + t (reverse: (x - t) exp(-s)) and the fp32 sums of +-s per (row, chunk) into
    ``partial`` [n_rows, n_chunks]; all tensors contiguous."""
    launch(_coupling_fwd_kernel, t.grid, x, log_scale, shift, y, partial, t.n_rows, t.row_len, t.n_chunks,
           REVERSE=reverse, ROWS=t.rows, CHUNK=t.chunk)


def backward(t: Tiling, x, log_scale, shift, grad_out, grad_logdet, *, reverse: bool, grad_x=None,
             grad_log_scale=None, grad_shift=None):
    """Gradients into whichever of grad_x, grad_log_scale, grad_shift (reverse only) are given;
    ``x`` is the input of the pass (y when reversing), ``grad_logdet`` holds one value per row."""
    launch(
        _coupling_bwd_kernel, t.grid, x, log_scale, shift, grad_out, grad_logdet,
        x if grad_x is None else grad_x, x if grad_log_scale is None else grad_log_scale,
        x if grad_shift is None else grad_shift, t.n_rows, t.row_len, t.n_chunks,
        REVERSE=reverse, WRITE_X=grad_x is not None, WRITE_LOG_SCALE=grad_log_scale is not None,
        WRITE_SHIFT=grad_shift is not None, ROWS=t.rows, CHUNK=t.chunk)

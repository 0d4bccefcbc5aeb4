"""The fused step of the sigma-space samplers: Euler, Euler ancestral, Heun, KDPM2, DPM-Solver++ (2M,
SDE), DEIS, UniPC, LMS, PNDM, flow matching, consistency and EDM sampling, one kernel for all of them.

Each of these steps is, per element, affine in the sample x, the model output F, the data
prediction D' kept from the previous step and one standard normal z, once the data prediction x0
is clipped. So a run's sampler is a table of coefficient rows (fp32 [N, ROW] on the device, made in
float64 on the host by ``fastgen.ops.samplers``), and step i gathers row r = table[i] in the kernel,
i read from a device int64 (no host value changes between steps, so a CUDA graph replays it):

    F   = m                                        the model output, or with classifier-free guidance
        = m_u + w (m_c - m_u)                      on a [2B] output (unconditional half first)
    x^  = x + r[CHURN] z                           Karras et al. 2022 Alg. 2's churn (Euler, s_churn > 0)
    x0  = clip(r[CX] x^ + r[CF] F)                 the data prediction (clip_sample, dynamic thresholding)
    D   = r[DX] x^ + r[D0] x0                      the step's denoised output (x0; a consistency
                                                   model's boundary-conditioned output)
    out = r[AX] x^ + r[AD] D + r[AP] D_i-1 + r[AP2] D_i-2 + r[AP3] D_i-3 + r[AP4] D_i-4 + r[AF] F
          + r[NOISE_PREV] z_i-1 + r[NOISE] z                z_i-1: step i-1's counter noise, drawn again

D is stored when asked: the multistep solvers keep it for the next steps. A solver that reads the
last H of them (HISTORY = H, 1 to 4) keeps them in a ring of H slots, [H, B, ...]: D_j in slot j mod H,
so step i reads slots (i - k) mod H and writes slot i mod H, over the D_i-H it no longer needs (each
element is read before it is written, by the same program). With H = 1 the ring is one tensor like the
sample (the step may overwrite its D' in place). A term with a zero coefficient is dropped, not
multiplied: the history before the first steps and the noise of a step that draws none may hold
anything, NaN included. NaN or inf in x or F reaches the
outputs as it does in the float64 references (clamps propagate NaN).

Noise: z of element g of sample b is the normal of counter element offset + b n + g in stream
streams[i] (``normal_tile``; offset in elements here, the ops pass k n for an offset of k samples),
or read from a tensor.
"""
import triton
import triton.language as tl

from . import launch
from .diffusion import CLIP_NONE, CLIP_RANGE, CLIP_THRESHOLD, _block, _clip_x0, _model_output, _phase0, _tile, _tiles
from .random import NOISE_NONE, NOISE_TENSOR, as_int64, int64_arg

# The columns of a coefficient row (fastgen.ops.samplers builds the rows in this order).
CHURN, CX, CF, DX, D0, AX, AD, AP, AP2, AP3, AP4, AF, NOISE_PREV, NOISE = (tl.constexpr(i) for i in range(14))
ROW = tl.constexpr(14)
MAX_HISTORY = 4  # the columns AP, AP2, AP3, AP4
CLIP = {"none": CLIP_NONE.value, "range": CLIP_RANGE.value, "threshold": CLIP_THRESHOLD.value}


@triton.jit
def _term(coefficient, value):
    """coefficient * value, and 0 where the coefficient is 0 whatever the value (NaN, inf, garbage)."""
    return tl.where(coefficient != 0.0, coefficient * value, 0.0)


@triton.jit
def _slot(i, k, HISTORY: tl.constexpr):
    """The ring slot of D_(i - k): (i - k) mod HISTORY, never negative (k <= 4)."""
    return (i + 4 * HISTORY - k) % HISTORY


@triton.jit
def _history_term(coefficient, ptr, i, k, slot_size, base, mask, HISTORY: tl.constexpr):
    """coefficient * D_(i - k), read from its ring slot."""
    return _term(coefficient, tl.load(ptr + _slot(i, k, HISTORY) * slot_size + base, mask=mask).to(tl.float32))


@triton.jit(do_not_specialize=["step_ptr", "seed", "offset"])  # step_ptr: one int64 of a table, 8-byte aligned
def _sampler_step_kernel(out_ptr, denoised_ptr, model_ptr, sample_ptr, prev_ptr, noise_ptr, scale_ptr,
                         table, streams, step_ptr, n, half, tiles, guidance, clip_range,
                         seed: tl.int64, offset: tl.int64,
                         GUIDED: tl.constexpr, CLIP: tl.constexpr, NOISE_SOURCE: tl.constexpr,
                         READ_PREV: tl.constexpr, STORE_DENOISED: tl.constexpr, HISTORY: tl.constexpr,
                         DENOISED_IN_RING: tl.constexpr, NOISE_PREV_STREAM: tl.constexpr, BLOCK: tl.constexpr,
                         PHASE0: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // tiles).to(tl.int64)
    i = tl.load(step_ptr).to(tl.int64)
    row = table + i * ROW
    churn, cx, cf, dx, d0 = tl.load(row + CHURN), tl.load(row + CX), tl.load(row + CF), tl.load(row + DX), tl.load(row + D0)
    ax, ad, ap, af, cz = tl.load(row + AX), tl.load(row + AD), tl.load(row + AP), tl.load(row + AF), tl.load(row + NOISE)
    stream = tl.load(streams + i)
    idx, mask, z = _tile(seed, stream, int64_arg(offset) + b * n, pid % tiles, n, NOISE_SOURCE, BLOCK, PHASE0)
    base = b * n + idx
    if NOISE_SOURCE == NOISE_TENSOR:
        z = tl.load(noise_ptr + base, mask=mask).to(tl.float32)
    x = tl.load(sample_ptr + base, mask=mask).to(tl.float32)
    f = _model_output(model_ptr + base, mask, half, guidance, GUIDED)
    if NOISE_SOURCE != NOISE_NONE:
        x = x + _term(churn, z)
    x0 = _clip_x0(cx * x + cf * f, scale_ptr, b, clip_range, CLIP)
    denoised = dx * x + d0 * x0
    out = ax * x + ad * denoised + af * f
    if READ_PREV:  # half: the elements of one ring slot (the batch's)
        out += _history_term(ap, prev_ptr, i, 1, half, base, mask, HISTORY)
        if HISTORY > 1:
            out += _history_term(tl.load(row + AP2), prev_ptr, i, 2, half, base, mask, HISTORY)
        if HISTORY > 2:
            out += _history_term(tl.load(row + AP3), prev_ptr, i, 3, half, base, mask, HISTORY)
        if HISTORY > 3:
            out += _history_term(tl.load(row + AP4), prev_ptr, i, 4, half, base, mask, HISTORY)
    if NOISE_SOURCE != NOISE_NONE:
        out += _term(cz, z)
    if NOISE_PREV_STREAM:  # counter noise only: step i - 1's normals at the same counter elements
        stream_prev = tl.load(streams + tl.maximum(i - 1, 0))
        _, _, z_prev = _tile(seed, stream_prev, int64_arg(offset) + b * n, pid % tiles, n, NOISE_SOURCE, BLOCK, PHASE0)
        out += _term(tl.load(row + NOISE_PREV), z_prev)
    if STORE_DENOISED:
        slot = _slot(i, 0, HISTORY) if DENOISED_IN_RING else 0
        tl.store(denoised_ptr + slot * half + base, denoised.to(denoised_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + base, out.to(out_ptr.dtype.element_ty), mask=mask)


def sampler_step(out, denoised, model_output, sample, prev_denoised, table, streams, step, *, guided=False,
                 guidance=1.0, clip="none", clip_range=1.0, scale=None, noise_mode, noise=None, seed=0, offset=0,
                 history=1, noise_prev=False, block=None):
    """One step of the sampler whose coefficients are ``table`` (fp32 [N, ROW]) at the step index
    ``step`` (an int64 tensor of one element on the device) into ``out`` (and the denoised output
    into ``denoised`` when not None: like the sample, or the ring itself, [history, ...], whose slot
    step mod history it writes). model_output: like the sample, or [2B, ...] with ``guided``
    (guidance: w); prev_denoised: the ring of the last ``history`` denoised outputs (history 1: D' like
    the sample), or None (not read); noise_prev: add the NOISE_PREV term (noise_mode NOISE_PHILOX);
    clip: "none" | "range" (clip_range) | "threshold" (scale: fp32 [B] thresholds); noise_mode:
    NOISE_*; offset: the element offset of sample 0's noise."""
    batch = sample.shape[0]
    n = sample.numel() // batch
    phase0 = _phase0(offset, batch, n, noise_mode)
    block = _block(_sampler_step_kernel, n, block, phase0)
    tiles = _tiles(n, block, phase0)
    launch(_sampler_step_kernel, (batch * tiles,),
           out, denoised if denoised is not None else out, model_output, sample,
           prev_denoised if prev_denoised is not None else sample, noise if noise is not None else sample,
           scale if scale is not None else table, table, streams, step, n, sample.numel(), tiles, float(guidance),
           float(clip_range), as_int64(seed), offset,
           GUIDED=guided, CLIP=CLIP[clip], NOISE_SOURCE=noise_mode, READ_PREV=prev_denoised is not None,
           STORE_DENOISED=denoised is not None, HISTORY=history,
           DENOISED_IN_RING=denoised is not None and denoised.numel() != sample.numel(), NOISE_PREV_STREAM=noise_prev,
           BLOCK=block, PHASE0=phase0)
    return out

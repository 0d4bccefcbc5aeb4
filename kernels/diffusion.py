"""Fused DDPM / DDIM updates: one pass reads x_t and the model output and writes x_{t-1} (and x_0).

A step goes from timestep t to s = prev_t < t (s = -1: the end of the chain, abar_s = final_abar).
Per sample b the kernel gathers, from the fp32 [5, T] schedule table (rows abar, 1 - abar,
sqrt(abar), sqrt(1 - abar), beta, each computed in float64):

    beta_{t|s} = beta_t                                            if s = t - 1 (and abar_{-1} = 1)
               = 1 - abar_t / abar_s = ((1 - abar_t) - (1 - abar_s)) / abar_s  while 1 - abar_t < 1/2
                                     = (abar_s - abar_t) / abar_s               otherwise
(the difference of the two smaller numbers, so fp32 loses at most eps / beta_{t|s} to cancellation;
clamped at 0, so a cancellation never makes a variance negative), then per element:

    x0   = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)   epsilon        (Ho et al. eq. 15)
         = model output                                  sample
         = sqrt(abar_t) x_t - sqrt(1 - abar_t) v         v_prediction   (Salimans & Ho sec. 4)
    x0   = clamp(x0, -r, r)  or  clamp(x0, -s_b, s_b) / s_b             (Imagen dynamic thresholding;
                                                                         s_b from a reduction pass)
  DDPM (Ho et al. eqs. 6-7, Algorithm 2):
    x_s  = sqrt(abar_s) beta_{t|s} / (1 - abar_t) x0 + sqrt(abar_t / abar_s) (1 - abar_s) / (1 - abar_t) x_t
           + [t > 0] sigma z
    sigma^2 = beta~ = max((1 - abar_s) / (1 - abar_t) beta_{t|s}, 1e-20)  fixed_small(_log)
            = beta_{t|s}                                                  fixed_large(_log)
            = v                                                           learned (extra channels)
            = exp(f log beta_{t|s} + (1 - f) log beta~), f = (v + 1) / 2  learned_range (Nichol & Dhariwal eq. 15)
  DDIM (Song et al. eqs. 12, 16):
    sigma = eta sqrt(beta~),  x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + [t > 0] sigma z

With classifier-free guidance (GUIDED) the model output is [2B, ...], the unconditional half first,
and eps (or x0, v) above is m_u + w (m_c - m_u), combined as both halves are read.

Grid: programs (b, j) flattened, j tiling the n elements of sample b, so t, s, the coefficients
and s_b are scalars per program. Every clamp propagates NaN (``_clamp``): a NaN or inf in the model
output, the sample or the noise reaches the outputs exactly where it does in the float64 reference,
so a broken model never yields plausible samples. The noise z of element g of sample b is the normal of counter
element offset + b n + g in stream t_b (``normal_tile``), or read from a tensor; ``offset`` counts elements
here (the public ops pass k n for their offset of k samples). A timestep outside
[0, T) or s outside [-1, t) turns the sample's outputs into NaN (checked on the host where that
costs no synchronisation).
"""
import triton
import triton.language as tl

from . import launch, launch_block
from .random import NOISE_NONE, NOISE_PHILOX, NOISE_TENSOR, as_int64, int64_arg, normal_tile, tile_mask

# The constexpr codes of the step kernels; the launchers translate a step specification's names into them.
EPSILON, SAMPLE, V_PREDICTION = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
PREDICTION = {"epsilon": EPSILON.value, "sample": SAMPLE.value, "v_prediction": V_PREDICTION.value}
FIXED_SMALL, FIXED_SMALL_LOG, FIXED_LARGE, FIXED_LARGE_LOG = (tl.constexpr(i) for i in range(4))
LEARNED, LEARNED_RANGE = tl.constexpr(4), tl.constexpr(5)
VARIANCE = {"fixed_small": FIXED_SMALL.value, "fixed_small_log": FIXED_SMALL_LOG.value,
            "fixed_large": FIXED_LARGE.value, "fixed_large_log": FIXED_LARGE_LOG.value, "learned": LEARNED.value,
            "learned_range": LEARNED_RANGE.value}
CLIP_NONE, CLIP_RANGE, CLIP_THRESHOLD = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
PREV_SCALAR, PREV_TENSOR, PREV_T_MINUS_1 = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
MIN_VARIANCE = tl.constexpr(1e-20)  # diffusers clamps beta~ before its log


@triton.jit
def _timestep(arg, stride, b, IS_TENSOR: tl.constexpr):
    """Sample b's timestep: from an integer tensor (arg + b * stride) or the scalar ``arg``."""
    if IS_TENSOR:
        t = tl.load(arg + b * stride).to(tl.int64)
    else:
        t = arg.to(tl.int64)
    return t


@triton.jit
def _prev_timestep(arg, stride, b, t, MODE: tl.constexpr):
    if MODE == PREV_T_MINUS_1:
        s = t - 1
    else:
        s = _timestep(arg, stride, b, MODE == PREV_TENSOR)
    return s


@triton.jit
def _schedule_at(table, T, t):
    """(abar_t, 1 - abar_t, sqrt(abar_t), sqrt(1 - abar_t)) at t clamped into [0, T)."""
    i = tl.minimum(tl.maximum(t, 0), T - 1)
    return tl.load(table + i), tl.load(table + T + i), tl.load(table + 2 * T + i), tl.load(table + 3 * T + i)


@triton.jit
def _step_coefficients(table, T, t, s, final_abar, final_bbar):
    """valid, abar_t, 1 - abar_t, sqrt(abar_t), sqrt(1 - abar_t), abar_s, 1 - abar_s, beta_{t|s}."""
    abar_t, bbar_t, sqrt_abar_t, sqrt_bbar_t = _schedule_at(table, T, t)
    abar_s, bbar_s, _, _ = _schedule_at(table, T, s)
    abar_s = tl.where(s >= 0, abar_s, final_abar)
    bbar_s = tl.where(s >= 0, bbar_s, final_bbar)
    beta_ts = tl.where(bbar_t < 0.5, bbar_t - bbar_s, abar_s - abar_t) / abar_s
    # two roundings of one value (s = -1 with final_abar = abar_0) may differ below 0: clamped, NaN kept
    beta_ts = tl.maximum(beta_ts, 0.0, propagate_nan=tl.PropagateNan.ALL)
    one_step = (s == t - 1) & ((s >= 0) | (final_bbar == 0.0))  # beta_{t|t-1} = beta_t (abar_{-1} = 1)
    beta_ts = tl.where(one_step, tl.load(table + 4 * T + tl.minimum(tl.maximum(t, 0), T - 1)), beta_ts)
    valid = (t >= 0) & (t < T) & (s >= -1) & (s < t)
    return valid, abar_t, bbar_t, sqrt_abar_t, sqrt_bbar_t, abar_s, bbar_s, beta_ts


@triton.jit
def _tile(seed, stream, draw_offset, j, n, NOISE: tl.constexpr, BLOCK: tl.constexpr, PHASE0: tl.constexpr):
    """(idx, mask, z) of tile j over a sample's n elements; z is Philox noise when NOISE == NOISE_PHILOX.
    PHASE0: every sample's draw starts on a Philox block, so tiles start at multiples of BLOCK (vector
    accesses)."""
    if NOISE == NOISE_PHILOX:
        idx, z = normal_tile(seed, stream, draw_offset, j, BLOCK, PHASE0)
        mask = tile_mask(idx, n, PHASE0)
    else:
        idx = j.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        z = tl.zeros([BLOCK], tl.float32)
        mask = idx < n
    return idx, mask, z


@triton.jit
def _predict_x0(m, x, sqrt_abar_t, sqrt_bbar_t, PRED: tl.constexpr):
    if PRED == EPSILON:
        x0 = (x - sqrt_bbar_t * m) / sqrt_abar_t
    elif PRED == SAMPLE:
        x0 = m
    else:
        x0 = sqrt_abar_t * x - sqrt_bbar_t * m
    return x0


@triton.jit
def _model_output(ptr, mask, half, guidance, GUIDED: tl.constexpr):
    """The model output at ``ptr`` (fp32); with classifier-free guidance m_u + w (m_c - m_u), the
    conditional value ``half`` elements further on (the [2B] output's second half)."""
    m = tl.load(ptr, mask=mask).to(tl.float32)
    if GUIDED:
        m = m + guidance * (tl.load(ptr + half, mask=mask).to(tl.float32) - m)
    return m


@triton.jit
def _clamp(x, low, high):
    """min(max(x, low), high), NaN where x is NaN (as torch.clamp): tl.minimum / tl.maximum drop a
    NaN operand unless told to propagate it."""
    x = tl.maximum(x, low, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(x, high, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _clip_x0(x0, scale_ptr, b, clip_range, CLIP: tl.constexpr):
    if CLIP == CLIP_RANGE:
        x0 = _clamp(x0, -clip_range, clip_range)
    elif CLIP == CLIP_THRESHOLD:
        s = tl.load(scale_ptr + b)
        x0 = _clamp(x0, -s, s) / s
    return x0


@triton.jit(do_not_specialize=["t_arg", "seed", "offset"])
def _q_sample_kernel(out_ptr, noise_out_ptr, x0_ptr, noise_ptr, table, T, t_arg, t_stride, n, tiles,
                     seed: tl.int64, offset: tl.int64,
                     T_TENSOR: tl.constexpr, NOISE: tl.constexpr, STORE_NOISE: tl.constexpr, BLOCK: tl.constexpr,
                     PHASE0: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // tiles).to(tl.int64)
    t = _timestep(t_arg, t_stride, b, T_TENSOR)
    abar_t, bbar_t, sqrt_abar_t, sqrt_bbar_t = _schedule_at(table, T, t)
    idx, mask, z = _tile(seed, t, int64_arg(offset) + b * n, pid % tiles, n, NOISE, BLOCK, PHASE0)
    base = b * n + idx
    if NOISE == NOISE_TENSOR:
        z = tl.load(noise_ptr + base, mask=mask).to(tl.float32)
    x0 = tl.load(x0_ptr + base, mask=mask).to(tl.float32)
    x_t = sqrt_abar_t * x0 + sqrt_bbar_t * z  # Ho et al. eq. (4)
    x_t = tl.where((t >= 0) & (t < T), x_t, float("nan"))
    tl.store(out_ptr + base, x_t.to(out_ptr.dtype.element_ty), mask=mask)
    if STORE_NOISE:
        tl.store(noise_out_ptr + base, z.to(noise_out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["t_arg", "s_arg", "seed", "offset"])
def _ddpm_step_kernel(prev_ptr, x0_ptr, model_ptr, sample_ptr, noise_ptr, scale_ptr, table, T,
                      t_arg, t_stride, s_arg, s_stride, n, model_stride, tiles, seed: tl.int64, offset: tl.int64,
                      clip_range, half, guidance,
                      T_TENSOR: tl.constexpr, S_MODE: tl.constexpr, PRED: tl.constexpr, VAR: tl.constexpr,
                      CLIP: tl.constexpr, NOISE: tl.constexpr, GUIDED: tl.constexpr, STORE_PREV: tl.constexpr,
                      STORE_X0: tl.constexpr, BLOCK: tl.constexpr, PHASE0: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // tiles).to(tl.int64)
    t = _timestep(t_arg, t_stride, b, T_TENSOR)
    s = _prev_timestep(s_arg, s_stride, b, t, S_MODE)
    valid, abar_t, bbar_t, sqrt_abar_t, sqrt_bbar_t, abar_s, bbar_s, beta_ts = _step_coefficients(
        table, T, t, s, 1.0, 0.0)
    idx, mask, z = _tile(seed, t, int64_arg(offset) + b * n, pid % tiles, n, NOISE, BLOCK, PHASE0)
    x = tl.load(sample_ptr + b * n + idx, mask=mask).to(tl.float32)
    m = _model_output(model_ptr + b * model_stride + idx, mask, half, guidance, GUIDED)
    x0 = _clip_x0(_predict_x0(m, x, sqrt_abar_t, sqrt_bbar_t, PRED), scale_ptr, b, clip_range, CLIP)
    nan = float("nan")
    if STORE_X0:
        tl.store(x0_ptr + b * n + idx, tl.where(valid, x0, nan).to(x0_ptr.dtype.element_ty), mask=mask)
    if STORE_PREV:
        coef_x0 = tl.sqrt(abar_s) * beta_ts / bbar_t                 # eq. (7)
        coef_xt = tl.sqrt(abar_t / abar_s) * bbar_s / bbar_t
        x_prev = coef_x0 * x0 + coef_xt * x
        if NOISE != NOISE_NONE:
            posterior = tl.maximum(bbar_s / bbar_t * beta_ts, MIN_VARIANCE, propagate_nan=tl.PropagateNan.ALL)
            if (VAR == FIXED_SMALL) or (VAR == FIXED_SMALL_LOG):
                sigma = tl.sqrt(posterior)
            elif (VAR == FIXED_LARGE) or (VAR == FIXED_LARGE_LOG):
                sigma = tl.sqrt(beta_ts)
            else:
                v = tl.load(model_ptr + b * model_stride + n + idx, mask=mask).to(tl.float32)
                if VAR == LEARNED:
                    sigma = tl.sqrt(v)
                else:
                    frac = (v + 1.0) * 0.5
                    sigma = tl.exp(0.5 * (frac * tl.log(beta_ts) + (1.0 - frac) * tl.log(posterior)))
            if NOISE == NOISE_TENSOR:
                z = tl.load(noise_ptr + b * n + idx, mask=mask).to(tl.float32)
            x_prev += tl.where(t > 0, sigma * z, 0.0)
        tl.store(prev_ptr + b * n + idx, tl.where(valid, x_prev, nan).to(prev_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["t_arg", "s_arg", "seed", "offset"])
def _ddim_step_kernel(prev_ptr, x0_ptr, model_ptr, sample_ptr, noise_ptr, scale_ptr, table, T,
                      t_arg, t_stride, s_arg, s_stride, n, tiles, seed: tl.int64, offset: tl.int64,
                      clip_range, half, guidance, eta, final_abar, final_bbar,
                      T_TENSOR: tl.constexpr, S_MODE: tl.constexpr, PRED: tl.constexpr, CLIP: tl.constexpr,
                      USE_CLIPPED: tl.constexpr, NOISE: tl.constexpr, GUIDED: tl.constexpr, STORE_PREV: tl.constexpr,
                      STORE_X0: tl.constexpr, BLOCK: tl.constexpr, PHASE0: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // tiles).to(tl.int64)
    t = _timestep(t_arg, t_stride, b, T_TENSOR)
    s = _prev_timestep(s_arg, s_stride, b, t, S_MODE)
    valid, abar_t, bbar_t, sqrt_abar_t, sqrt_bbar_t, abar_s, bbar_s, beta_ts = _step_coefficients(
        table, T, t, s, final_abar, final_bbar)
    idx, mask, z = _tile(seed, t, int64_arg(offset) + b * n, pid % tiles, n, NOISE, BLOCK, PHASE0)
    x = tl.load(sample_ptr + b * n + idx, mask=mask).to(tl.float32)
    m = _model_output(model_ptr + b * n + idx, mask, half, guidance, GUIDED)
    x0 = _clip_x0(_predict_x0(m, x, sqrt_abar_t, sqrt_bbar_t, PRED), scale_ptr, b, clip_range, CLIP)
    nan = float("nan")
    if STORE_X0:
        tl.store(x0_ptr + b * n + idx, tl.where(valid, x0, nan).to(x0_ptr.dtype.element_ty), mask=mask)
    if STORE_PREV:
        if USE_CLIPPED:
            eps = (x - sqrt_abar_t * x0) / sqrt_bbar_t
        elif PRED == EPSILON:
            eps = m
        elif PRED == SAMPLE:
            eps = (x - sqrt_abar_t * m) / sqrt_bbar_t
        else:
            eps = sqrt_abar_t * m + sqrt_bbar_t * x
        sigma = eta * tl.sqrt(bbar_s / bbar_t * beta_ts)      # Song et al. eq. (16)
        # sqrt(1 - abar_s - sigma^2) without its cancellation where abar_t ~ 0: with
        # bbar_t - beta_ts = abar_t bbar_s / abar_s it is a sum of non-negative terms
        direction = tl.sqrt(bbar_s * ((1.0 - eta * eta) * bbar_t + eta * eta * abar_t * bbar_s / abar_s) / bbar_t)
        x_prev = tl.sqrt(abar_s) * x0 + direction * eps         # eq. (12)
        if NOISE != NOISE_NONE:
            if NOISE == NOISE_TENSOR:
                z = tl.load(noise_ptr + b * n + idx, mask=mask).to(tl.float32)
            x_prev += tl.where(t > 0, sigma * z, 0.0)
        tl.store(prev_ptr + b * n + idx, tl.where(valid, x_prev, nan).to(prev_ptr.dtype.element_ty), mask=mask)


# --- launchers: contiguous tensors, validated arguments ----------------------------------------------

def _phase0(offset: int, batch: int, n: int, noise: int) -> bool:
    """Every sample's draw (element offset + b n) starts on a Philox block: tiles at multiples of BLOCK."""
    return getattr(noise, "value", noise) != NOISE_PHILOX.value or (offset % 4 == 0 and (n % 4 == 0 or batch == 1))


def _block(kernel, n: int, block, phase0: bool) -> int:
    """A power of two covering one sample (+3 for a Philox phase), at least 16, at most the launch block."""
    return max(16, min(triton.next_power_of_2(n + (0 if phase0 else 3)), launch_block(kernel, block, 1024)))


def _tiles(n: int, block: int, phase0: bool) -> int:
    return triton.cdiv(n + (0 if phase0 else 3), block)


def _timestep_args(t):
    """(arg, stride, is_tensor) for an int or an integer tensor of shape [] / [B]."""
    if isinstance(t, int):
        return t, 0, False
    return t, (t.stride(0) if t.dim() else 0), True


def q_sample(out, x0, t, table, *, seed=0, offset=0, noise=None, noise_out=None, block=None):
    batch = x0.shape[0]
    n = x0.numel() // batch
    mode = NOISE_TENSOR if noise is not None else NOISE_PHILOX
    phase0 = _phase0(offset, batch, n, mode)
    block = _block(_q_sample_kernel, n, block, phase0)
    tiles = _tiles(n, block, phase0)
    t_arg, t_stride, t_tensor = _timestep_args(t)
    launch(
        _q_sample_kernel, (batch * tiles,),
        out, noise_out if noise_out is not None else out, x0, noise if noise is not None else x0, table,
        table.shape[1], t_arg, t_stride, n, tiles, as_int64(seed), offset,
        T_TENSOR=t_tensor, NOISE=mode, STORE_NOISE=noise_out is not None, BLOCK=block, PHASE0=phase0)
    return out


def _prev_args(prev_t):
    if prev_t is None:
        return 0, 0, PREV_T_MINUS_1
    arg, stride, is_tensor = _timestep_args(prev_t)
    return arg, stride, PREV_TENSOR if is_tensor else PREV_SCALAR


def _step_launch(kernel, prev, x0, model_output, sample, t, prev_t, table, scale, noise_mode, noise, block, offset):
    """What the two step kernels share: (grid, leading arguments up to n, tiles, meta-parameters)."""
    batch = sample.shape[0]
    n = sample.numel() // batch
    phase0 = _phase0(offset, batch, n, noise_mode)
    block = _block(kernel, n, block, phase0)
    tiles = _tiles(n, block, phase0)
    t_arg, t_stride, t_tensor = _timestep_args(t)
    s_arg, s_stride, s_mode = _prev_args(prev_t)
    any_out = prev if prev is not None else x0
    leading = (any_out, x0 if x0 is not None else any_out, model_output, sample,
               noise if noise is not None else sample, scale if scale is not None else table, table, table.shape[1],
               t_arg, t_stride, s_arg, s_stride, n)
    meta = dict(T_TENSOR=t_tensor, S_MODE=s_mode, NOISE=noise_mode, STORE_PREV=prev is not None,
                STORE_X0=x0 is not None, BLOCK=block, PHASE0=phase0)
    return (batch * tiles,), leading, tiles, meta


def _spec_constexprs(spec) -> dict:
    """A step specification's settings (fastgen.step_spec.StepSpec: names) as this kernel's codes."""
    clip = CLIP_THRESHOLD if spec.thresholding else CLIP_RANGE if spec.clip_sample else CLIP_NONE
    return dict(PRED=PREDICTION[spec.prediction_type], CLIP=clip)


def _guidance_args(model_output, guidance):
    """(half, w, GUIDED) of a launch: the conditional half's element offset in a [2B] output."""
    if guidance is None:
        return (0, 1.0), dict(GUIDED=False)
    return (model_output.numel() // 2, float(guidance)), dict(GUIDED=True)


def ddpm_step(prev, x0, model_output, sample, t, prev_t, table, spec, *, scale=None, noise_mode, noise=None, seed=0,
              offset=0, guidance=None, block=None):
    """x_s into ``prev`` (if not None) and x0 into ``x0`` (if not None), as ``spec`` says (a StepSpec of
    kind "ddpm"). scale: fp32 [B] thresholds when spec.thresholding; noise_mode: NOISE_* (noise: the
    tensor for NOISE_TENSOR); offset: the element offset of sample 0's noise; guidance: None, or w for
    a [2B] model output (classifier-free guidance, unconditional half first)."""
    grid, leading, tiles, meta = _step_launch(_ddpm_step_kernel, prev, x0, model_output, sample, t, prev_t, table,
                                              scale, noise_mode, noise, block, offset)
    guidance_args, guided = _guidance_args(model_output, guidance)
    model_stride = model_output.numel() // (sample.shape[0] * (2 if guidance is not None else 1))
    launch(_ddpm_step_kernel, grid, *leading, model_stride, tiles, as_int64(seed), offset,
           float(spec.clip_sample_range), *guidance_args, VAR=VARIANCE[spec.variance_type], **_spec_constexprs(spec),
           **guided, **meta)


def ddim_step(prev, x0, model_output, sample, t, prev_t, table, spec, *, final_abar=1.0, final_bbar=0.0, scale=None,
              noise_mode, noise=None, seed=0, offset=0, guidance=None, block=None):
    """The DDIM update of ``sample`` into ``prev`` / ``x0`` (either may be None) as ``spec`` says (kind
    "ddim"); final_abar / final_bbar: abar and 1 - abar after the last step; the rest as ddpm_step."""
    grid, leading, tiles, meta = _step_launch(_ddim_step_kernel, prev, x0, model_output, sample, t, prev_t, table,
                                              scale, noise_mode, noise, block, offset)
    guidance_args, guided = _guidance_args(model_output, guidance)
    launch(_ddim_step_kernel, grid, *leading, tiles, as_int64(seed), offset, float(spec.clip_sample_range),
           *guidance_args, float(spec.eta), float(final_abar), float(final_bbar),
           USE_CLIPPED=spec.use_clipped_model_output, **_spec_constexprs(spec), **guided, **meta)

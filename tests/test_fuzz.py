"""Differential fuzzing (Hypothesis) of every public op: the Triton backend (the interpreter without a
GPU) against the float64 torch reference, over random shapes (empty and odd ones included), dtypes,
strides (transposed and strided views), values with NaN, +-inf and huge log-variances, and extreme
timesteps (0, T - 1, prev_t = -1, and a few out of range).

Each example runs the op on both backends: they raise the same exception type or neither raises.
When neither does, the Triton result matches the float64 reference within its dtype's tolerance,
with NaN and inf at the same places (fastgen.testing.compare, equal_nan). Tolerances grow only where
the problem's conditioning demands it (an exponent rounded in fp32, a division by sqrt(abar_t), an
fp32 sum of many terms: see the constants and check_step). Examples are derandomised, so every run
(and CI) checks the same ones.
"""
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastgen
from fastgen import _checks
from fastgen.reference import diffusion as ref_diffusion
from fastgen.reference import gaussian as ref_gaussian
from fastgen.reference import latents as ref_latents
from fastgen.reference import random as ref_random
from tests.utils import FLOAT_DTYPES, NONFINITE, assert_close, noncontiguous, tolerance, transposed, with_nonfinite

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

MAX_ELEMENTS = 2000
NAMED_SHAPES = [(1,), (5,), (5, 3, 7), (0,), (0, 3), (3, 0), (2, 1, 1), (7, 129), (4, 2, 3, 5), (3, 2, 9), (16, 7),
                (2, 3, 4, 5)]
SHAPES = st.one_of(st.sampled_from(NAMED_SHAPES),
                   st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple)
                   .filter(lambda s: math.prod(s) <= MAX_ELEMENTS))
LAYOUTS = {"contiguous": lambda t: t, "transposed": transposed, "strided": noncontiguous}
# Huge log-variances whose exp(lv), exp(lv / 2) and exp(lv - lv2) stay in fp32's range (|x| < 88.7;
# 40 - (-40) = 80) or leave float64's too (1e4): in between fp32 math overflows (to inf, and inf - inf
# = NaN in a sum) where the float64 reference does not, a difference no kernel computing in fp32 avoids.
HUGE_LOGVAR = (40.0, -40.0, 1e4, -1e4)
# exp(x) in fp32 is off by up to |x| 2^-24 relative when x itself is a rounded fp32 value (lv - lv2),
# and by about as much on a GPU, whose exp is exp2 of the rounded x log2(e): per unit of |x|
EXP_ROUNDING = 2.0**-23
# An fp32 sum of terms t_i (a broadcast prior's gradient) is off by up to ~log2(n) 2^-24 sum |t_i|:
# per unit of sum |t_i| (enough for 2^16 terms)
SUM_ROUNDING = 2.0**-20
SCHEDULES = {
    "linear": fastgen.NoiseSchedule(),                                                     # T = 1000
    "cosine": fastgen.NoiseSchedule("squaredcos_cap_v2", num_train_timesteps=50),
    "latent": fastgen.NoiseSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012),   # final abar_0 cancels
    "zero_snr": fastgen.NoiseSchedule("scaled_linear", num_train_timesteps=20, rescale_betas_zero_snr=True),
}


# --- drawing inputs ----------------------------------------------------------------------------------

def draw_tensor(data, name, shape, dtype, device, *, scale=1.0, specials=NONFINITE, transform=None):
    """Normal values * scale (``transform`` applied in float64), some replaced by ``specials``, in
    ``dtype`` on ``device`` with a drawn memory layout."""
    seed = data.draw(st.integers(0, 2**32 - 1), label=f"{name} seed")
    fraction = data.draw(st.sampled_from([0.0, 0.05, 0.3]), label=f"{name} special fraction")
    layout = data.draw(st.sampled_from(list(LAYOUTS)), label=f"{name} layout")
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if transform is not None:
        values = transform(values)
    if fraction:
        values = with_nonfinite(values, g, fraction, specials)
    return LAYOUTS[layout](values.to(dtype).to(device))


def draw_timesteps(data, name, batch, num_steps, device, *, low=0, below=None):
    """Timesteps in [low, num_steps), below ``below`` (per-sample exclusive bounds, a list) when given:
    an int, a [] tensor or a [batch] tensor of an integer dtype, now and then one out of range where
    the ops check it on the host (ints, CPU tensors): both backends must then raise."""
    kind = data.draw(st.sampled_from(["int", "tensor", "tensor", "scalar tensor"]), label=f"{name} kind")
    tops = [num_steps] * batch if below is None else [min(int(b), num_steps) for b in below]
    if kind != "tensor":  # one value for the whole batch
        tops = [min(tops, default=num_steps)]
    values = []
    for i, top in enumerate(tops):
        top = max(top, low + 1)
        choices = [st.just(low), st.just(min(low + 1, top - 1)), st.just(top - 1), st.integers(low, top - 1)]
        values.append(data.draw(st.one_of(*choices), label=f"{name}[{i}]"))
    checked = kind == "int" or torch.device(device).type == "cpu"
    if values and checked and data.draw(st.sampled_from([False] * 9 + [True]), label=f"{name} out of range"):
        values[0] = data.draw(st.sampled_from([low - 1, num_steps]), label=f"{name} bad value")
    if kind == "int":
        return values[0]
    fits_uint8 = all(0 <= v <= 255 for v in values)
    dtype = data.draw(st.sampled_from([torch.int64, torch.int32, torch.uint8 if fits_uint8 else torch.int16]),
                      label=f"{name} dtype")
    t = torch.tensor(values, dtype=dtype, device=device)
    return t.reshape(()) if kind == "scalar tensor" else t


def per_sample(t, batch):
    """Timesteps as a list of one int per sample."""
    return torch.as_tensor(t.cpu() if isinstance(t, torch.Tensor) else t).expand(batch).tolist() if batch else []


# --- running both backends and comparing --------------------------------------------------------------

def on_both_backends(call):
    """``call(backend)`` on "triton" and "reference": the Triton result, or None when both raised (which
    they must do together, with the same exception type)."""
    outcomes = {}
    for backend in ("triton", "reference"):
        try:
            outcomes[backend] = call(backend)
        except Exception as err:  # noqa: BLE001 - compared across backends below
            outcomes[backend] = err
    if any(isinstance(outcome, Exception) for outcome in outcomes.values()):
        assert type(outcomes["triton"]) is type(outcomes["reference"]), (
            f"triton: {outcomes['triton']!r}; torch: {outcomes['torch']!r}")
        return None
    return outcomes["triton"]


def check(actual, expected, dtype, **tolerances):
    """``actual`` (dtype) against the float64 reference: values within the dtype's tolerance, the
    same NaN and inf positions."""
    assert actual.dtype == dtype and actual.shape == expected.shape, (actual.dtype, actual.shape, expected.shape)
    assert_close(actual, expected, dtype=dtype, equal_nan=True, **tolerances)


def grads(fn, tensors, grad_outputs):
    """The outputs of fn(*tensors) and the gradients of sum(out * g) with respect to every tensor."""
    leaves = [t.detach().requires_grad_(True) for t in tensors]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return outs, torch.autograd.grad(outs, leaves, grad_outputs, allow_unused=True)


def f64(tensors):
    return [t.detach().cpu().double() for t in tensors]


# --- noise ---------------------------------------------------------------------------------------------

@FUZZ
@given(data=st.data())
def test_randn(device, data):
    shape = data.draw(SHAPES, label="shape")
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="dtype")
    seed = data.draw(st.integers(-(2**63), 2**64 - 1), label="seed")
    stream = data.draw(st.one_of(st.integers(0, 2**62), st.just(-1)), label="stream")
    offset = data.draw(st.one_of(st.integers(0, 2**40), st.integers(0, 7)), label="offset")
    z = on_both_backends(lambda backend: fastgen.randn(shape, seed=seed, stream=stream, offset=offset, dtype=dtype,
                                                       device=device, backend=backend))
    if z is not None:
        check(z, ref_random.randn(shape, seed=seed & (2**64 - 1), stream=stream,
                                  offset=_checks.sample_offset(offset, shape), dtype=torch.float64),
              dtype)


@FUZZ
@given(data=st.data())
def test_latents(device, data):
    n, dim = data.draw(st.integers(0, 40), label="n"), data.draw(st.integers(0, 40), label="dim")
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="dtype")
    truncation = data.draw(st.one_of(st.none(), st.floats(1e-3, 50.0), st.sampled_from([0.0, -1.0, math.inf])),
                           label="truncation")
    seed = data.draw(st.integers(0, 2**64 - 1), label="seed")
    offset = data.draw(st.integers(0, 2**30), label="offset")
    z = on_both_backends(lambda backend: fastgen.latents(n, dim, seed=seed, offset=offset, truncation=truncation,
                                                         dtype=dtype, device=device, backend=backend))
    if z is not None:
        check(z, ref_latents.latents(n, dim, seed=seed, offset=offset, truncation=truncation, dtype=torch.float64),
              dtype)


# --- Gaussian ops: forward and gradients ---------------------------------------------------------------

def draw_gaussian(data, device):
    shape = data.draw(SHAPES, label="shape")
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="dtype")
    mu = draw_tensor(data, "mu", shape, dtype, device, scale=3.0)
    logvar = draw_tensor(data, "logvar", shape, dtype, device, specials=NONFINITE + HUGE_LOGVAR)
    return shape, dtype, mu, logvar


def draw_noise_source(data, shape, dtype, device):
    """(kwargs of the op, float64 eps the reference uses, the noise tensor or None). Counter-based eps
    is fastgen.randn's (Triton) draw: the kernels' own fp32 normals, whose absolute error against the
    float64 normals (checked by test_randn) exp(lv / 2) would scale far past the tolerance of z."""
    if data.draw(st.booleans(), label="noise tensor"):
        noise = draw_tensor(data, "noise", shape, dtype, device)
        return dict(noise=noise), noise.cpu().double(), noise
    seed = data.draw(st.integers(0, 2**64 - 1), label="seed")
    stream = data.draw(st.integers(0, 2**40), label="stream")
    offset = data.draw(st.integers(0, 2**40), label="offset")
    eps = fastgen.randn(shape, seed=seed, stream=stream, offset=offset, device=device, backend="triton")
    return dict(seed=seed, stream=stream, offset=offset), eps.cpu().double(), None


def exp_rtol(dtype, *logvars):
    """The relative tolerance of results holding exp(lv) or exp(lv - lv2): the dtype's, plus the
    rounding of the exponent (EXP_ROUNDING) at the largest finite exponent below overflow."""
    exponent = 0.0
    for t in logvars:
        if t is not None:
            magnitudes = t.detach().cpu().double().abs()
            exponent += magnitudes[magnitudes < 100].max().item() if (magnitudes < 100).any() else 0.0
    return tolerance(dtype)[0] + EXP_ROUNDING * exponent


@FUZZ
@given(data=st.data())
def test_reparameterize(device, data):
    shape, dtype, mu, logvar = draw_gaussian(data, device)
    source, eps, noise = draw_noise_source(data, shape, dtype, device)
    z = on_both_backends(lambda backend: fastgen.reparameterize(mu, logvar, backend=backend, **source))
    if z is None:
        return
    inputs = [mu, logvar] + ([noise] if noise is not None else [])
    grad_z = draw_tensor(data, "grad_z", shape, dtype, device, specials=(1.0,))

    def fused(m, lv, *e):
        return fastgen.reparameterize(m, lv, backend="triton", **(dict(source, noise=e[0]) if e else source))

    def reference(m, lv, *e):
        return ref_gaussian.reparameterize(m, lv, e[0] if e else eps)

    outs, gr = grads(fused, inputs, [grad_z])
    outs64, gr64 = grads(reference, f64(inputs), f64([grad_z]))
    for a, e in zip([z, *outs, *gr], [outs64[0], *outs64, *gr64]):
        check(a, e, dtype, rtol=exp_rtol(dtype, logvar))


PRIOR_SHAPES = {"full": lambda s: s, "shared": lambda s: s[1:], "scalar": lambda s: (),
                "per-sample": lambda s: s[:1] + (1,) * (len(s) - 1)}


@FUZZ
@given(data=st.data())
def test_gaussian_kl(device, data):
    shape, dtype, mu, logvar = draw_gaussian(data, device)
    reduction = data.draw(st.sampled_from(ref_gaussian.REDUCTIONS), label="reduction")
    prior = data.draw(st.sampled_from(["none", "mu2", "logvar2", "both"]), label="prior")
    prior_shape = PRIOR_SHAPES[data.draw(st.sampled_from(list(PRIOR_SHAPES)), label="prior shape")](shape)
    mu2 = draw_tensor(data, "mu2", prior_shape, dtype, device, scale=3.0) if prior in ("mu2", "both") else None
    logvar2 = (draw_tensor(data, "logvar2", prior_shape, dtype, device, specials=NONFINITE + HUGE_LOGVAR)
               if prior in ("logvar2", "both") else None)
    prior_kwargs = {name: t for name, t in (("mu2", mu2), ("logvar2", logvar2)) if t is not None}
    kl = on_both_backends(lambda backend: fastgen.gaussian_kl(mu, logvar, reduction=reduction, backend=backend,
                                                              **prior_kwargs))
    if kl is None:
        return

    def fused(m, lv, *prior):
        return fastgen.gaussian_kl(m, lv, reduction=reduction, backend="triton", **dict(zip(prior_kwargs, prior)))

    def reference(m, lv, *prior):
        return ref_gaussian.reduce(ref_gaussian.gaussian_kl(m, lv, **dict(zip(prior_kwargs, prior))), reduction)

    grad_kl = draw_tensor(data, "grad_kl", kl.shape, dtype, device, specials=(1.0,))
    inputs = [mu, logvar, *prior_kwargs.values()]
    outs, gr = grads(fused, inputs, [grad_kl])
    outs64, gr64 = grads(reference, f64(inputs), f64([grad_kl]))
    rtol = exp_rtol(dtype, logvar, logvar2)
    for a, e in zip([kl, *outs, *gr[:2]], [outs64[0], *outs64, *gr64[:2]]):
        check(a, e, dtype, rtol=rtol)
    # a broadcast prior's gradient sums its elementwise terms in fp32: its tolerance grows with their magnitudes
    priors = f64(prior_kwargs.values())
    _, terms = grads(reference, f64([mu, logvar]) + [p.expand(shape) for p in priors], f64([grad_kl]))
    for a, e, term, prior in zip(gr[2:], gr64[2:], terms[2:], priors):
        magnitude = term.abs().nan_to_num(0.0, 0.0, 0.0).sum_to_size(prior.shape)
        atol = tolerance(dtype)[1] + SUM_ROUNDING * (magnitude.max().item() if magnitude.numel() else 0.0)
        check(a, e, dtype, rtol=rtol, atol=atol)


@FUZZ
@given(data=st.data())
def test_reparameterize_with_kl(device, data):
    shape, dtype, mu, logvar = draw_gaussian(data, device)
    source, eps, noise = draw_noise_source(data, shape, dtype, device)
    out = on_both_backends(lambda backend: fastgen.reparameterize_with_kl(mu, logvar, backend=backend, **source))
    if out is None:
        return
    inputs = [mu, logvar] + ([noise] if noise is not None else [])
    grad_z = draw_tensor(data, "grad_z", shape, dtype, device, specials=(1.0,))
    grad_kl = draw_tensor(data, "grad_kl", shape[:1], dtype, device, specials=(1.0,))

    def fused(m, lv, *e):
        return fastgen.reparameterize_with_kl(m, lv, backend="triton", **(dict(source, noise=e[0]) if e else source))

    def reference(m, lv, *e):
        return ref_gaussian.reparameterize_with_kl(m, lv, e[0] if e else eps)

    outs, gr = grads(fused, inputs, [grad_z, grad_kl])
    outs64, gr64 = grads(reference, f64(inputs), f64([grad_z, grad_kl]))
    for a, e in zip([*out, *outs, *gr], [*outs64, *outs64, *gr64]):
        check(a, e, dtype, rtol=exp_rtol(dtype, logvar))


# --- diffusion: q_sample, ddpm_step, ddim_step --------------------------------------------------------

def draw_diffusion(data):
    name = data.draw(st.sampled_from(list(SCHEDULES)), label="schedule")
    shape = data.draw(SHAPES, label="shape")
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="dtype")
    return SCHEDULES[name], shape, dtype


def draw_step_noise(data, shape, dtype, device):
    """(kwargs of the op: seed and offset, or a noise tensor, kwargs of the reference)."""
    if data.draw(st.booleans(), label="noise tensor"):
        noise = draw_tensor(data, "noise", shape, dtype, device)
        return dict(noise=noise), dict(noise=noise.cpu())
    seed = data.draw(st.integers(0, 2**64 - 1), label="seed")
    offset = data.draw(st.integers(0, 2**40), label="offset")  # in samples; the reference takes elements
    return dict(seed=seed, offset=offset), dict(seed=seed, offset=_checks.sample_offset(offset, shape))


def draw_clip(data):
    kind = data.draw(st.sampled_from(["none", "clip", "threshold"]), label="clip")
    if kind == "none":
        return dict(clip_sample=False)
    if kind == "clip":
        return dict(clip_sample=True, clip_sample_range=data.draw(st.sampled_from([1.0, 1.5, 4.0]), label="range"))
    return dict(thresholding=True, dynamic_thresholding_ratio=data.draw(st.sampled_from([0.5, 0.9, 0.995, 1.0]),
                                                                        label="ratio"),
                sample_max_value=data.draw(st.sampled_from([1.0, 2.5]), label="max value"))


def cpu(t):
    return t.cpu() if isinstance(t, torch.Tensor) else t


def check_step(actual, expected, dtype, schedule, t, prediction_type):
    """``check`` per sample. Epsilon prediction divides by sqrt(abar_t): the fp32 rounding of
    x_t - sqrt(1 - abar_t) eps grows by 1/sqrt(abar_t) in x0, and reaches x_s through x0's
    coefficient (at most 1: sqrt(abar_s) beta_{t|s} / (1 - abar_t), or DDIM's sqrt(abar_s)), so the
    absolute tolerance of sample b grows by 1/sqrt(abar_t[b])."""
    assert actual.dtype == dtype and actual.shape == expected.shape, (actual.dtype, actual.shape, expected.shape)
    atol = tolerance(dtype)[1]
    for b, sqrt_abar in enumerate(schedule.sqrt_alphas_cumprod[per_sample(t, actual.shape[0])].tolist()):
        grown = atol if prediction_type != "epsilon" else (atol / sqrt_abar if sqrt_abar > 0 else math.inf)
        check(actual[b], expected[b], dtype, atol=grown)


@FUZZ
@given(data=st.data())
def test_q_sample(device, data):
    schedule, shape, dtype = draw_diffusion(data)
    x0 = draw_tensor(data, "x0", shape, dtype, device, scale=2.0)
    t = draw_timesteps(data, "t", shape[0], schedule.num_train_timesteps, device)
    kwargs, ref_kwargs = draw_step_noise(data, shape, dtype, device)
    x_t = on_both_backends(lambda backend: fastgen.q_sample(x0, t, schedule, backend=backend, **kwargs))
    if x_t is None:
        return
    noise = ref_kwargs.get("noise")
    if noise is None:
        noise = ref_diffusion.noise_like(shape, cpu(t), seed=ref_kwargs["seed"], offset=ref_kwargs["offset"])
    check(x_t, ref_diffusion.q_sample(x0.cpu(), cpu(t), schedule, noise), dtype)


def draw_model_output(data, shape, dtype, device, variance_type):
    out = draw_tensor(data, "model_output", shape, dtype, device, scale=1.5)
    if variance_type == "learned":      # a variance: positive where finite
        variance = draw_tensor(data, "variance", shape, dtype, device, transform=lambda v: v.abs() * 1e-2 + 1e-4)
    elif variance_type == "learned_range":  # an interpolation fraction in [-1, 1] where finite
        variance = draw_tensor(data, "variance", shape, dtype, device, transform=torch.tanh)
    else:
        return out
    return torch.cat([out, variance], 1)


@FUZZ
@given(data=st.data())
def test_ddpm_step(device, data):
    schedule, shape, dtype = draw_diffusion(data)
    prediction_type = data.draw(st.sampled_from(ref_diffusion.PREDICTION_TYPES), label="prediction_type")
    variances = ref_diffusion.VARIANCE_TYPES if len(shape) >= 2 else ref_diffusion.VARIANCE_TYPES[:4]
    variance_type = data.draw(st.sampled_from(variances), label="variance_type")
    clip = draw_clip(data)
    sample = draw_tensor(data, "sample", shape, dtype, device)
    out = draw_model_output(data, shape, dtype, device, variance_type)
    t = draw_timesteps(data, "t", shape[0], schedule.num_train_timesteps, device)
    prev_t = None
    if data.draw(st.booleans(), label="prev_t given"):
        prev_t = draw_timesteps(data, "prev_t", shape[0], schedule.num_train_timesteps, device, low=-1,
                                below=per_sample(t, shape[0]))
    kwargs, ref_kwargs = draw_step_noise(data, shape, dtype, device)
    options = dict(prediction_type=prediction_type, variance_type=variance_type, **clip)
    result = on_both_backends(lambda backend: fastgen.ddpm_step(out, t, sample, schedule, prev_t=prev_t,
                                                                backend=backend, **options, **kwargs))
    if result is None:
        return
    prev, x0 = result
    prev_ref, x0_ref = ref_diffusion.ddpm_step(out.cpu(), cpu(t), sample.cpu(), schedule, prev_t=cpu(prev_t),
                                               **options, **ref_kwargs)
    for a, e in [(prev, prev_ref), (x0, x0_ref)]:
        check_step(a, e, dtype, schedule, t, prediction_type)


@FUZZ
@given(data=st.data())
def test_ddim_step(device, data):
    schedule, shape, dtype = draw_diffusion(data)
    prediction_type = data.draw(st.sampled_from(ref_diffusion.PREDICTION_TYPES), label="prediction_type")
    eta = data.draw(st.sampled_from([0.0, 0.3, 1.0]), label="eta")
    use_clipped = data.draw(st.booleans(), label="use_clipped_model_output")
    set_alpha_to_one = data.draw(st.booleans(), label="set_alpha_to_one")
    clip = draw_clip(data)
    sample = draw_tensor(data, "sample", shape, dtype, device)
    out = draw_tensor(data, "model_output", shape, dtype, device, scale=1.5)
    t = draw_timesteps(data, "t", shape[0], schedule.num_train_timesteps, device)
    prev_t = draw_timesteps(data, "prev_t", shape[0], schedule.num_train_timesteps, device, low=-1,
                            below=per_sample(t, shape[0]))
    kwargs, ref_kwargs = draw_step_noise(data, shape, dtype, device)
    options = dict(eta=eta, prediction_type=prediction_type, use_clipped_model_output=use_clipped, **clip)
    result = on_both_backends(lambda backend: fastgen.ddim_step(out, t, prev_t, sample, schedule,
                                                                set_alpha_to_one=set_alpha_to_one, backend=backend,
                                                                **options, **kwargs))
    if result is None:
        return
    prev, x0 = result
    final = 1.0 if set_alpha_to_one else schedule.alphas_cumprod[0].item()
    prev_ref, x0_ref = ref_diffusion.ddim_step(out.cpu(), cpu(t), cpu(prev_t), sample.cpu(), schedule,
                                               final_alpha_cumprod=final, **options, **ref_kwargs)
    for a, e in [(prev, prev_ref), (x0, x0_ref)]:
        check_step(a, e, dtype, schedule, t, prediction_type)

"""DDPM / DDIM: the float64 reference against its formulas, torch.distributions and diffusers; the fused
kernels (backend="triton") against the reference for every variant, whole stochastic trajectories, the
per-sample timestep rule, and bad input."""
import itertools
import math
import zlib

import pytest
import scipy.stats
import torch

import fastgen
from fastgen.step_spec import StepSpec
from fastgen.kernels import diffusion as k_diffusion
from fastgen.reference import diffusion as ref
from tests.utils import FLOAT_DTYPES, TOLERANCES, assert_close, noncontiguous, rand_like_shape, with_nonfinite

import diffusers  # a dependency of fastgen.schedulers: never skipped

SCHEDULE = fastgen.NoiseSchedule()  # linear, T = 1000
SHAPE = (3, 2, 5, 7)                # [B, C, H, W]: 70 elements per sample, no multiple of 4
PREDICTIONS = ["epsilon", "sample", "v_prediction"]
VARIANCES = ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"]
CLIPS = {"none": dict(clip_sample=False), "clip": dict(clip_sample=True, clip_sample_range=1.5),
         "threshold": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5)}
TIMESTEPS = [999, 500, 1]
SEED = 0x9E3779B97F4A7C15


def gen(seed):
    return torch.Generator().manual_seed(seed)


def model_output_for(variance_type, shape, dtype, device, g):
    """A model output: prediction channels and, for learned variances, the variance channels."""
    out = rand_like_shape(shape, dtype, device, generator=g)
    if variance_type == "learned":      # a variance: positive
        var = (rand_like_shape(shape, torch.float64, generator=g).abs() * 1e-2 + 1e-4).to(device, dtype)
        return torch.cat([out, var], 1)
    if variance_type == "learned_range":  # an interpolation fraction in about [-1, 1]
        var = (rand_like_shape(shape, torch.float64, generator=g).tanh()).to(device, dtype)
        return torch.cat([out, var], 1)
    return out


def per_sample_t(t, batch, device):
    """Distinct timesteps per sample, t among them."""
    values = [t, max(t - 137, 0), min(t + 211, 999)][:batch]
    return torch.tensor(values, dtype=torch.int64, device=device)


# --- the reference against formulas and other implementations -------------------------------------

def test_normal_kl_matches_torch_distributions():
    g = gen(1)
    m1, m2, lv1, lv2 = (torch.randn(4, 9, generator=g, dtype=torch.float64) for _ in range(4))
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                                 torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    assert_close(ref.normal_kl(m1, lv1, m2, lv2), expected, dtype=torch.float64, rtol=1e-10)
    assert ref.normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-15


def test_discretized_gaussian_log_likelihood():
    g = gen(2)
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)             # the 256 pixel values
    x = bins[torch.randint(0, 256, (5, 40), generator=g)]
    means = torch.randn(5, 40, generator=g, dtype=torch.float64) * 0.5
    log_scales = torch.randn(5, 40, generator=g, dtype=torch.float64) * 0.5 - 2
    normal = torch.distributions.Normal(means, log_scales.exp())
    upper = torch.where(x > 0.999, torch.ones_like(x), normal.cdf(x + 1 / 255))
    lower = torch.where(x < -0.999, torch.zeros_like(x), normal.cdf(x - 1 / 255))
    expected = torch.log((upper - lower).clamp_min(1e-12))
    got = ref.discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)
    assert_close(got, expected, dtype=torch.float64, rtol=1e-8, atol=1e-9)
    # the 256 bin probabilities of one Gaussian sum to 1
    probs = ref.discretized_gaussian_log_likelihood(bins, means=torch.full_like(bins, 0.3),
                                                    log_scales=torch.full_like(bins, math.log(0.2))).exp()
    assert abs(probs.sum().item() - 1) < 1e-9


def test_q_posterior_matches_schedule_tables():
    g = gen(3)
    x0, xt = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    for t in [1, 17, 999]:
        mean, var, log_var = ref.q_posterior_mean_variance(x0, xt, t, SCHEDULE)
        expected = SCHEDULE.posterior_mean_coef1[t] * x0.double() + SCHEDULE.posterior_mean_coef2[t] * xt.double()
        assert_close(mean, expected, dtype=torch.float64, rtol=1e-10, atol=1e-12)
        assert_close(var.reshape(-1), SCHEDULE.posterior_variance[t].expand(2), dtype=torch.float64, rtol=1e-10)
        assert_close(log_var.reshape(-1), SCHEDULE.posterior_log_variance_clipped[t].expand(2), dtype=torch.float64,
                     rtol=1e-10)


def test_predictions_invert_q_sample():
    g = gen(4)
    x0, eps = torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randn(3, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([3, 400, 990])
    xt = ref.q_sample(x0, t, SCHEDULE, eps)
    a = SCHEDULE.sqrt_alphas_cumprod[t][:, None]
    b = SCHEDULE.sqrt_one_minus_alphas_cumprod[t][:, None]
    v = a * eps - b * x0  # Salimans & Ho: v = alpha eps - sigma x
    for kind, out in [("epsilon", eps), ("sample", x0), ("v_prediction", v)]:
        assert_close(ref.predict_x0(out, t, xt, SCHEDULE, kind), x0, dtype=torch.float64, rtol=1e-9, atol=1e-9)
        assert_close(ref.predict_eps(out, t, xt, SCHEDULE, kind), eps, dtype=torch.float64, rtol=1e-9, atol=1e-9)


def test_vlb_terms_and_simple_loss():
    g = gen(5)
    x0 = torch.linspace(-1, 1, 256)[torch.randint(0, 256, (2, 1, 4, 4), generator=g)]
    eps = torch.randn(2, 1, 4, 4, generator=g)
    t = torch.tensor([0, 10])
    xt = ref.q_sample(x0, t, SCHEDULE, eps)
    # the true eps with the true posterior variance: KL = 0 at t = 10, a finite NLL at t = 0
    terms = ref.vlb_terms(eps, x0, xt, t, SCHEDULE)
    assert terms[1].abs() < 1e-9 and torch.isfinite(terms).all() and terms[0] >= 0
    assert torch.equal(ref.simple_loss(eps, eps), torch.zeros(2, dtype=torch.float64))
    assert_close(ref.simple_loss(eps.double() + 0.5, eps), torch.full((2,), 0.25, dtype=torch.float64), dtype=torch.float64)


def in_float64(sched):
    """A diffusers scheduler computing in float64 from our float64 schedule, so the formulas can be
    compared to float64 rounding (diffusers' own fp32 tables lose ~1e-3 in 1 - abar_t / abar_{t-1})."""
    sched.betas, sched.alphas = SCHEDULE.betas.clone(), SCHEDULE.alphas.clone()
    sched.alphas_cumprod, sched.one = SCHEDULE.alphas_cumprod.clone(), torch.tensor(1.0, dtype=torch.float64)
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = SCHEDULE.alphas_cumprod[0].clone()
    return sched


def test_vlb_terms_match_torch_distributions():
    """L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) in bits per dimension, checked with
    torch.distributions; L_0 = -log p(x0 | x1) (discretized Gaussian) in bits per dimension."""
    g = gen(19)
    shape = (3, 2, 4, 4)
    x0 = torch.linspace(-1, 1, 256, dtype=torch.float64)[torch.randint(0, 256, shape, generator=g)]
    out = torch.cat([torch.randn(shape, generator=g, dtype=torch.float64),
                     torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1], 1)  # eps and the fraction
    t = torch.tensor([0, 5, 700])
    x_t = ref.q_sample(x0, t, SCHEDULE, torch.randn(shape, generator=g, dtype=torch.float64))
    terms = ref.vlb_terms(out, x0, x_t, t, SCHEDULE, variance_type="learned_range")
    p = ref.p_mean_variance(out, t, x_t, SCHEDULE, variance_type="learned_range", clip_sample=False)
    for b in (1, 2):
        abar_t, abar_s = SCHEDULE.alphas_cumprod[t[b]], SCHEDULE.alphas_cumprod[t[b] - 1]
        beta = SCHEDULE.betas[t[b]]
        q_mean = (abar_s.sqrt() * beta * x0[b] + (1 - beta).sqrt() * (1 - abar_s) * x_t[b]) / (1 - abar_t)
        q_std = ((1 - abar_s) / (1 - abar_t) * beta).sqrt()
        kl = torch.distributions.kl_divergence(torch.distributions.Normal(q_mean, q_std),
                                               torch.distributions.Normal(p["mean"][b], p["variance"][b].sqrt()))
        assert abs(terms[b].item() - kl.mean().item() / math.log(2)) < 1e-9 * max(1.0, abs(terms[b].item()))
    small = ref.p_mean_variance(out[:, :2], t, x_t, SCHEDULE, clip_sample=False)
    assert torch.all(small["variance"][0] == SCHEDULE.posterior_variance[1])  # Improved DDPM's clipped beta~ at t = 0
    nll = -ref.discretized_gaussian_log_likelihood(x0[0], means=p["mean"][0], log_scales=0.5 * p["log_variance"][0])
    assert abs(terms[0].item() - nll.mean().item() / math.log(2)) < 1e-9


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_reference_ddpm_step_matches_diffusers(prediction_type, variance_type):
    g = gen(6)
    sched = in_float64(diffusers.DDPMScheduler(prediction_type=prediction_type, variance_type=variance_type,
                                               clip_sample=True, clip_sample_range=1.5))
    shape = (2, 3, 4, 4)
    sample = torch.randn(shape, generator=g, dtype=torch.float64)
    out = model_output_for(variance_type, shape, torch.float64, "cpu", g)
    for t in [700, 1]:
        noise = torch.randn(shape, generator=gen(t), dtype=torch.float64)
        expected = sched.step(out, t, sample, generator=gen(t), return_dict=False)
        got = ref.ddpm_step(out, t, sample, SCHEDULE, prediction_type=prediction_type, variance_type=variance_type,
                            clip_sample_range=1.5, noise=noise)
        for a, e in zip(got, expected):
            assert_close(a, e, dtype=torch.float64, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("eta, use_clipped, prediction_type", [(0.0, False, "epsilon"), (1.0, True, "v_prediction"),
                                                                (0.5, False, "sample")])
def test_reference_ddim_step_matches_diffusers(eta, use_clipped, prediction_type):
    g = gen(7)
    sched = in_float64(diffusers.DDIMScheduler(prediction_type=prediction_type, set_alpha_to_one=False,
                                               clip_sample=True))
    sched.set_timesteps(10)
    sample, out = (torch.randn(2, 3, 4, generator=g, dtype=torch.float64) for _ in range(2))
    for t in [sched.timesteps[0].item(), sched.timesteps[-1].item()]:  # 900 -> 800 and 0 -> the end
        prev_t = t - 100 if t >= 100 else -1
        noise = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
        expected = sched.step(out, t, sample, eta=eta, use_clipped_model_output=use_clipped, variance_noise=noise,
                              return_dict=False)
        got = ref.ddim_step(out, t, prev_t, sample, SCHEDULE, eta=eta, prediction_type=prediction_type,
                            use_clipped_model_output=use_clipped, final_alpha_cumprod=SCHEDULE.alphas_cumprod[0].item(),
                            noise=noise)
        for a, e in zip(got, expected):
            assert_close(a, e, dtype=torch.float64, rtol=1e-10, atol=1e-12)


def test_reference_thresholding_matches_diffusers():
    g = gen(8)
    sched = in_float64(diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9,
                                               sample_max_value=2.5, prediction_type="sample"))
    sample = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    out = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) * 2
    expected = sched.step(out, 0, sample, return_dict=False)
    got = ref.ddpm_step(out, 0, sample, SCHEDULE, prediction_type="sample", **CLIPS["threshold"], seed=1)
    for a, e in zip(got, expected):
        assert_close(a, e, dtype=torch.float64, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 70, 1001])
@pytest.mark.parametrize("q", [1e-4, 0.5, 0.9, 0.995, 1.0])
def test_row_quantile_is_torch_quantile(n, q):
    values = torch.randn(3, n, generator=gen(n), dtype=torch.float64)
    assert_close(ref.row_quantile(values, q), torch.quantile(values, q, dim=1), dtype=torch.float64)
    assert_close(ref.row_quantile(values.float(), q), torch.quantile(values, q, dim=1), dtype=torch.float32)


def test_row_quantile_nonfinite_rows():
    inf, nan = math.inf, math.nan
    values = torch.tensor([[1.0, 2.0, nan], [1.0, inf, inf], [1.0, 2.0, inf], [1.0, 2.0, 3.0]], dtype=torch.float64)
    got = ref.row_quantile(values, 0.75)  # position 1.5: between the 2nd and 3rd order statistics
    assert torch.isnan(got[0]) and got[1] == inf and got[2] == inf and got[3] == 2.5
    assert torch.isnan(ref.row_quantile(values[:, :0], 0.5)).all()  # an empty row has no quantile
    # a NaN anywhere in a sample poisons its threshold, as torch.quantile does; the other samples keep theirs
    scale = ref.dynamic_threshold_scale(values * 2, 0.75, 10.0)
    assert torch.isnan(scale[0]) and torch.equal(scale[1:], torch.tensor([10.0, 10.0, 5.0], dtype=torch.float64))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dynamic_thresholding_above_2_24_elements_per_sample(backend):
    """torch.quantile refuses rows of more than 2^24 elements; the threshold of one such sample."""
    n = (1 << 24) + 1
    out = torch.linspace(-4, 4, n, dtype=torch.float64)[torch.randperm(n, generator=gen(12))].float()[None]
    _, x0 = fastgen.ddim_step(out, 10, 5, torch.zeros_like(out), SCHEDULE, prediction_type="sample",
                              thresholding=True, dynamic_thresholding_ratio=0.5, sample_max_value=3.0, backend=backend)
    scale = out.double().abs().kthvalue(n // 2 + 1).values  # the median of |x0|: position (n - 1) / 2 exactly
    assert 1.9 < scale < 2.1
    assert_close(x0, out.double().clamp(-scale, scale) / scale)


# --- kernels against the reference -----------------------------------------------------------------

def _variant_cases():
    """prediction x variance x clip, each with a dtype, a timestep and int or per-sample t such that
    every dtype meets every prediction, variance and clip mode (a pairwise sweep)."""
    cases = []
    for i, (p, v, c) in enumerate(itertools.product(range(3), range(6), range(3))):
        dtype = FLOAT_DTYPES[(p + v + c) % 3]
        t = TIMESTEPS[(v + 2 * c + p) % 3]
        tensor_t = (i // 3 + c) % 2 == 1
        cases.append(pytest.param(PREDICTIONS[p], VARIANCES[v], list(CLIPS)[c], dtype, t, tensor_t,
                                  id=f"{PREDICTIONS[p]}-{VARIANCES[v]}-{list(CLIPS)[c]}-{str(dtype)[6:]}-t{t}"
                                     f"{'-tensor' if tensor_t else ''}"))
    return cases


@pytest.mark.parametrize("prediction_type, variance_type, clip, dtype, t, tensor_t", _variant_cases())
def test_ddpm_step_kernel_matches_reference(device, prediction_type, variance_type, clip, dtype, t, tensor_t):
    g = gen(zlib.crc32(f"{prediction_type}/{variance_type}/{clip}".encode()))
    sample = rand_like_shape(SHAPE, dtype, device, generator=g)
    out = model_output_for(variance_type, SHAPE, dtype, device, g)
    if tensor_t:
        t = per_sample_t(t, SHAPE[0], device)
    kwargs = dict(prediction_type=prediction_type, variance_type=variance_type, **CLIPS[clip])
    prev, x0 = fastgen.ddpm_step(out, t, sample, SCHEDULE, seed=SEED, offset=5, backend="triton", **kwargs)
    assert prev.dtype == x0.dtype == dtype and prev.shape == x0.shape == SHAPE
    t_cpu = t.cpu() if tensor_t else t
    # offset counts samples; the reference takes the element offset: 5 samples of 70 (mid-Philox-block)
    prev_ref, x0_ref = ref.ddpm_step(out.cpu(), t_cpu, sample.cpu(), SCHEDULE, seed=SEED, offset=5 * 70, **kwargs)
    if prediction_type == "epsilon":
        # x0 = (x - sqrt(1 - abar) eps) / sqrt(abar): the numerator's fp32 rounding grows by 1/sqrt(abar)
        # (~160 at t = 999), so compare x0 in the numerator's units: sqrt(abar) x0
        sqrt_abar = SCHEDULE.sqrt_alphas_cumprod[torch.as_tensor(t_cpu)].reshape(-1, 1, 1, 1)
        assert_close(x0.cpu().double() * sqrt_abar, x0_ref * sqrt_abar, dtype=dtype)
    else:
        assert_close(x0, x0_ref)
    assert_close(prev, prev_ref)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("eta, use_clipped, prediction_type, clip, set_alpha_to_one", [
    (0.0, False, "epsilon", "clip", True),
    (1.0, True, "v_prediction", "threshold", False),
    (0.3, False, "sample", "none", True),
    (0.7, True, "epsilon", "none", False),
])
def test_ddim_step_kernel_matches_reference(device, dtype, eta, use_clipped, prediction_type, clip, set_alpha_to_one):
    g = gen(9)
    sample, out = (rand_like_shape(SHAPE, dtype, device, generator=g) for _ in range(2))
    final = 1.0 if set_alpha_to_one else SCHEDULE.alphas_cumprod[0].item()
    kwargs = dict(eta=eta, prediction_type=prediction_type, use_clipped_model_output=use_clipped, **CLIPS[clip])
    for t, prev_t in [(980, 960), (torch.tensor([999, 40, 0]), torch.tensor([949, -1, -1])), (0, -1)]:
        t_dev, prev_dev = ((v.to(device) if isinstance(v, torch.Tensor) else v) for v in (t, prev_t))
        prev, x0 = fastgen.ddim_step(out, t_dev, prev_dev, sample, SCHEDULE, seed=SEED, backend="triton",
                                     set_alpha_to_one=set_alpha_to_one, **kwargs)
        prev_ref, x0_ref = ref.ddim_step(out.cpu(), t, prev_t, sample.cpu(), SCHEDULE, seed=SEED,
                                         final_alpha_cumprod=final, **kwargs)
        assert_close(x0, x0_ref)
        assert_close(prev, prev_ref)


# Stable Diffusion's schedule: 1 - abar_0 from the table and 1 - final_abar differ by ~1e-17 in float64
LATENT_SCHEDULE = fastgen.NoiseSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012)


def test_step_coefficients_never_give_a_negative_beta():
    t = torch.tensor([0, 0, 1, 999])
    s = torch.tensor([-1, -1, 0, 998])
    for final in [LATENT_SCHEDULE.alphas_cumprod[0].item(), 1.0]:
        *_, beta_ts = ref.step_coefficients(LATENT_SCHEDULE, t, s, 4, final)
        assert (beta_ts >= 0).all()
    nan_schedule_value = ref.step_coefficients(LATENT_SCHEDULE, 0, -1, 1, math.nan)[-1]
    assert torch.isnan(nan_schedule_value).all()  # the clamp keeps NaN


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_last_step_to_final_abar_0_is_finite(device, backend, eta):
    """t = 0 -> s = -1 with set_alpha_to_one=False (abar_s = abar_0): beta_{t|s} = 0, not a NaN from a
    rounding difference below 0."""
    g = gen(13)
    sample, out = (rand_like_shape((3, 2, 5), torch.float32, device, generator=g) for _ in range(2))
    kwargs = dict(eta=eta, clip_sample=False)
    prev, x0 = fastgen.ddim_step(out, 0, -1, sample, LATENT_SCHEDULE, set_alpha_to_one=False, seed=1, backend=backend,
                                 **kwargs)
    assert torch.isfinite(prev).all() and torch.isfinite(x0).all()
    prev_ref, x0_ref = ref.ddim_step(out.cpu(), 0, -1, sample.cpu(), LATENT_SCHEDULE, seed=1,
                                     final_alpha_cumprod=LATENT_SCHEDULE.alphas_cumprod[0].item(), **kwargs)
    assert_close(prev, prev_ref)
    assert_close(x0, x0_ref)
    assert_close(prev, sample.cpu().double())  # abar_s = abar_t and no noise: x_s = x_t


def test_ddim_direction_is_zero_where_sigma_takes_all_the_variance(device):
    """eta = 1 from abar_t = 0 (zero terminal SNR) to abar_s: sqrt(1 - abar_s - sigma^2) is exactly 0
    on both backends, so an infinite eps gives 0 * inf = NaN on both (the reference's old difference
    left ~1e-18 there, and inf)."""
    schedule = fastgen.NoiseSchedule("scaled_linear", num_train_timesteps=20, rescale_betas_zero_snr=True)
    g = gen(15)
    sample, out = (rand_like_shape((2, 3, 4), torch.float32, "cpu", generator=g) for _ in range(2))
    sample[0, 1, 2] = math.inf
    noise = torch.zeros_like(sample)
    kwargs = dict(eta=1.0, use_clipped_model_output=True, noise=noise)
    abar_0 = schedule.alphas_cumprod[0].item()
    prev_ref, x0_ref = ref.ddim_step(out, 19, -1, sample, schedule, final_alpha_cumprod=abar_0, **kwargs)
    assert torch.equal(prev_ref.isnan(), sample.isinf())
    finite = ~sample.isinf()
    assert torch.equal(prev_ref[finite], math.sqrt(abar_0) * x0_ref[finite])  # no eps term at all
    prev, _ = fastgen.ddim_step(out.to(device), 19, -1, sample.to(device), schedule, set_alpha_to_one=False,
                                backend="triton", **dict(kwargs, noise=noise.to(device)))
    assert_close(prev, prev_ref, equal_nan=True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_q_sample_kernel_matches_reference(device, dtype):
    g = gen(10)
    x0 = rand_like_shape(SHAPE, dtype, device, generator=g)
    for t in [0, 999, per_sample_t(420, 3, device)]:
        x_t, noise = fastgen.q_sample(noncontiguous(x0), t, SCHEDULE, seed=SEED, offset=3, return_noise=True,
                                      backend="triton")
        t_cpu = t.cpu() if isinstance(t, torch.Tensor) else t
        expected_noise = ref.noise_like(SHAPE, t_cpu, seed=SEED, offset=3 * 70)  # 3 samples of 70 elements
        assert_close(noise, expected_noise)
        assert_close(x_t, ref.q_sample(x0.cpu(), t_cpu, SCHEDULE, expected_noise))
    given = rand_like_shape(SHAPE, dtype, device, generator=g)
    x_t = fastgen.q_sample(x0, 321, SCHEDULE, noise=noncontiguous(given), backend="triton")
    assert_close(x_t, ref.q_sample(x0.cpu(), 321, SCHEDULE, given.cpu()))


def test_noncontiguous_inputs_and_given_noise(device):
    g = gen(11)
    shape = (2, 4, 3, 5)
    sample = rand_like_shape(shape, torch.float32, device, generator=g)
    out = model_output_for("learned_range", shape, torch.float32, device, g)
    noise = rand_like_shape(shape, torch.float32, device, generator=g)
    kwargs = dict(variance_type="learned_range", prediction_type="v_prediction", prev_t=250)
    prev, x0 = fastgen.ddpm_step(noncontiguous(out), 300, noncontiguous(sample), SCHEDULE,
                                 noise=noncontiguous(noise), backend="triton", **kwargs)
    prev_ref, x0_ref = ref.ddpm_step(out.cpu(), 300, sample.cpu(), SCHEDULE, noise=noise.cpu(), **kwargs)
    assert_close(prev, prev_ref)
    assert_close(x0, x0_ref)
    prev_ddim, _ = fastgen.ddim_step(noncontiguous(out[:, :4]), 300, 250, noncontiguous(sample), SCHEDULE, eta=1.0,
                                     noise=noncontiguous(noise), backend="triton")
    assert_close(prev_ddim, ref.ddim_step(out[:, :4].cpu(), 300, 250, sample.cpu(), SCHEDULE, eta=1.0,
                                          noise=noise.cpu())[0])


# --- NaN and inf go where the reference puts them ---------------------------------------------------

def nonfinite_step_inputs(shape, channels_out, device, seed):
    """(model_output, sample, noise) with NaN/+-inf at random positions of every sample but the first."""
    g = gen(seed)
    out_shape = (shape[0], channels_out, *shape[2:])
    tensors = [rand_like_shape(s, torch.float32, "cpu", generator=g) for s in (out_shape, shape, shape)]
    for i, t in enumerate(tensors):
        t[1:] = with_nonfinite(t[1:], g)
    if channels_out != shape[1]:  # learned variances: keep the finite ones positive / in [-1, 1]
        variance = tensors[0][:, shape[1]:]
        variance.copy_(torch.where(torch.isfinite(variance), variance.abs().tanh(), variance))
    return [t.to(device) for t in tensors]


T_NONFINITE = torch.tensor([300, 100, 1, 0])


@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("prediction_type, variance_type", [("epsilon", "fixed_small"), ("sample", "fixed_large_log"),
                                                            ("v_prediction", "learned_range"), ("epsilon", "learned")])
def test_ddpm_step_kernel_propagates_nan_and_inf_as_the_reference(device, prediction_type, variance_type, clip):
    shape = (4, 2, 3, 5)
    learned = variance_type.startswith("learned")
    out, sample, noise = nonfinite_step_inputs(shape, 4 if learned else 2, device, seed=20)
    kwargs = dict(prediction_type=prediction_type, variance_type=variance_type, **CLIPS[clip])
    got = fastgen.ddpm_step(out, T_NONFINITE.to(device), sample, SCHEDULE, noise=noise, backend="triton", **kwargs)
    expected = ref.ddpm_step(out.cpu(), T_NONFINITE, sample.cpu(), SCHEDULE, noise=noise.cpu(), **kwargs)
    for a, e in zip(got, expected):
        assert not torch.isfinite(e[1:]).all() and torch.isfinite(e[0]).all()
        assert_close(a, e, equal_nan=True)


@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("eta, use_clipped, prediction_type, set_alpha_to_one", [
    (0.0, False, "epsilon", True), (1.0, True, "sample", False), (0.5, False, "v_prediction", False)])
def test_ddim_step_kernel_propagates_nan_and_inf_as_the_reference(device, eta, use_clipped, prediction_type,
                                                                   set_alpha_to_one, clip):
    out, sample, noise = nonfinite_step_inputs((4, 2, 3, 5), 2, device, seed=21)
    prev_t = torch.tensor([200, -1, 0, -1])
    kwargs = dict(eta=eta, prediction_type=prediction_type, use_clipped_model_output=use_clipped, **CLIPS[clip])
    got = fastgen.ddim_step(out, T_NONFINITE.to(device), prev_t.to(device), sample, SCHEDULE, noise=noise,
                            set_alpha_to_one=set_alpha_to_one, backend="triton", **kwargs)
    final = 1.0 if set_alpha_to_one else SCHEDULE.alphas_cumprod[0].item()
    expected = ref.ddim_step(out.cpu(), T_NONFINITE, prev_t, sample.cpu(), SCHEDULE, noise=noise.cpu(),
                             final_alpha_cumprod=final, **kwargs)
    for a, e in zip(got, expected):
        assert not torch.isfinite(e[1:]).all() and torch.isfinite(e[0]).all()
        assert_close(a, e, equal_nan=True)


def test_q_sample_kernel_propagates_nan_and_inf_as_the_reference(device):
    _, x0, noise = nonfinite_step_inputs((4, 2, 3, 5), 2, device, seed=22)
    got = fastgen.q_sample(x0, T_NONFINITE.to(device), SCHEDULE, noise=noise, backend="triton")
    assert_close(got, ref.q_sample(x0.cpu(), T_NONFINITE, SCHEDULE, noise.cpu()), equal_nan=True)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_nan_model_never_yields_finite_samples(device, backend):
    """The symptom: a model returning NaN used to give all -1.0 with clip_sample on the Triton path."""
    sample = torch.zeros(2, 3, 4, device=device)
    nan = torch.full_like(sample, float("nan"))
    for kwargs in [dict(), dict(prediction_type="sample"), dict(thresholding=True)]:
        for prev, x0 in [fastgen.ddpm_step(nan, 500, sample, SCHEDULE, seed=0, backend=backend, **kwargs),
                         fastgen.ddim_step(nan, 500, 400, sample, SCHEDULE, backend=backend, **kwargs)]:
            assert torch.isnan(prev).all() and torch.isnan(x0).all()


# --- the noise rule, timesteps, invariances ---------------------------------------------------------

def test_per_sample_noise_rule(device):
    """Element g of sample b gets fastgen.randn(shape, seed, stream=t[b], offset)[b, g] (both count samples)."""
    shape = (4, 3, 7)
    t = torch.tensor([5, 999, 0, 5], device=device)
    _, noise = fastgen.q_sample(torch.ones(shape, device=device), t, SCHEDULE, seed=77, offset=9, return_noise=True,
                                backend="triton")
    for b in range(4):
        expected = fastgen.randn(shape, seed=77, stream=int(t[b]), offset=9, device=device, backend="triton")[b]
        assert torch.equal(noise[b], expected)


def test_int_and_tensor_timesteps_agree_exactly(device):
    g = gen(12)
    sample, out = (rand_like_shape(SHAPE, torch.float32, device, generator=g) for _ in range(2))
    t_all = torch.full((SHAPE[0],), 613, dtype=torch.int64, device=device)
    a = fastgen.ddpm_step(out, 613, sample, SCHEDULE, seed=SEED, backend="triton")
    b = fastgen.ddpm_step(out, t_all, sample, SCHEDULE, seed=SEED, backend="triton")
    c = fastgen.ddpm_step(out, torch.tensor(613, device=device), sample, SCHEDULE, seed=SEED, backend="triton")
    d = fastgen.ddim_step(out, 613, 600, sample, SCHEDULE, eta=0.5, seed=SEED, backend="triton")
    e = fastgen.ddim_step(out, t_all, t_all - 13, sample, SCHEDULE, eta=0.5, seed=SEED, backend="triton")
    for x, y in [(a, b), (a, c), (d, e)]:
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    q1 = fastgen.q_sample(sample, 613, SCHEDULE, seed=SEED, backend="triton")
    assert torch.equal(q1, fastgen.q_sample(sample, t_all, SCHEDULE, seed=SEED, backend="triton"))


INTEGER_DTYPES = [torch.int8, torch.uint8, torch.int16, torch.uint16, torch.int32, torch.uint32, torch.int64,
                  torch.uint64]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", INTEGER_DTYPES, ids=str)
def test_every_integer_dtype_holds_timesteps(device, dtype, backend):
    """Bounds are compared in int64: 1000 is never squeezed into int8, nor 250 misread in uint8."""
    g = gen(14)
    sample, out = (rand_like_shape((4, 3, 5), torch.float32, device, generator=g) for _ in range(2))
    t_value = 5 if dtype == torch.int8 else 250
    t = torch.full((4,), t_value, dtype=dtype, device=device)
    prev_t = torch.full((4,), 3, dtype=dtype, device=device)
    pairs = [((fastgen.q_sample(sample, t, SCHEDULE, seed=SEED, backend=backend),),
              (fastgen.q_sample(sample, t_value, SCHEDULE, seed=SEED, backend=backend),)),
             (fastgen.ddpm_step(out, t, sample, SCHEDULE, prev_t=prev_t, seed=SEED, backend=backend),
              fastgen.ddpm_step(out, t_value, sample, SCHEDULE, prev_t=3, seed=SEED, backend=backend)),
             (fastgen.ddim_step(out, t[0], prev_t, sample, SCHEDULE, eta=0.5, seed=SEED, backend=backend),
              fastgen.ddim_step(out, t_value, 3, sample, SCHEDULE, eta=0.5, seed=SEED, backend=backend))]
    for got, expected in pairs:
        for a, e in zip(got, expected):
            assert torch.equal(a, e)


@pytest.mark.parametrize("dtype, values, match", [
    (torch.int8, [5, -3], "got -3"),
    (torch.uint8, [5, 250], "got 250"),            # T = 100 here: 250 is out of range
    (torch.int16, [5, 100], "got 100"),
    (torch.uint64, [5, 1 << 63], "uint64 value >= 2\\*\\*63"),
    (torch.uint64, [5, (1 << 64) - 1], "uint64 value >= 2\\*\\*63"),
], ids=str)
def test_narrow_and_unsigned_timesteps_out_of_range_name_the_value(dtype, values, match):
    schedule = fastgen.NoiseSchedule(num_train_timesteps=100)
    x = torch.randn(2, 3)
    t = torch.tensor(values, dtype=dtype) if dtype != torch.uint64 else torch.tensor(
        [v - (1 << 64) if v >= 1 << 63 else v for v in values], dtype=torch.int64).view(torch.uint64)
    for call in [lambda: fastgen.q_sample(x, t, schedule, seed=0),
                 lambda: fastgen.ddpm_step(x, t, x, schedule, seed=0),
                 lambda: fastgen.ddim_step(x, 99, t, x, schedule)]:
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("op", ["q_sample", "ddpm_step", "ddim_step"])
def test_offset_counts_samples(device, op, backend):
    """offset counts samples: the op with offset=k on samples k.. equals samples k.. of the op on the
    whole batch, bit for bit (rows of 18 elements: shards start mid-Philox-block)."""
    g = gen(13)
    sample, out = (rand_like_shape((6, 2, 9), torch.float32, device, generator=g) for _ in range(2))
    t = torch.tensor([10, 20, 30, 40, 50, 60], device=device)
    if backend == "torch":
        sample, out, t = sample.cpu(), out.cpu(), t.cpu()
    calls = {
        "q_sample": lambda s, o, ts, **kw: fastgen.q_sample(s, ts, SCHEDULE, return_noise=True, **kw),
        "ddpm_step": lambda s, o, ts, **kw: fastgen.ddpm_step(o, ts, s, SCHEDULE, **kw),
        "ddim_step": lambda s, o, ts, **kw: fastgen.ddim_step(o, ts, ts - 5, s, SCHEDULE, eta=0.7, **kw),
    }
    call = calls[op]
    full = call(sample, out, t, seed=3, backend=backend)
    for k in (1, 2):
        shard = call(sample[k:5], out[k:5], t[k:5], seed=3, offset=k, backend=backend)
        for a, b in zip(shard, full):
            assert torch.equal(a, b[k:5])


def test_offset_bound_is_in_samples():
    """offset * n + numel must fit int64 (n = elements per sample): the bound is in samples."""
    x = torch.randn(2, 3)
    largest = ((1 << 63) - 1 - 6) // 3
    for call in (lambda offset: fastgen.q_sample(x, 5, SCHEDULE, seed=0, offset=offset, backend="torch"),
                 lambda offset: fastgen.ddpm_step(x, 5, x, SCHEDULE, seed=0, offset=offset, backend="torch"),
                 lambda offset: fastgen.ddim_step(x, 5, 4, x, SCHEDULE, eta=1.0, seed=0, offset=offset,
                                                  backend="torch")):
        call(largest)
        with pytest.raises(ValueError, match=rf"offset must be an integer in \[0, {largest}\]"):
            call(largest + 1)


def test_no_noise_at_t0_and_noise_statistics(device):
    g = gen(14)
    sample, out = (rand_like_shape((2, 3, 8), torch.float32, device, generator=g) for _ in range(2))
    a, _ = fastgen.ddpm_step(out, 0, sample, SCHEDULE, seed=1, backend="triton")
    b, _ = fastgen.ddpm_step(out, 0, sample, SCHEDULE, seed=2, backend="triton")
    c, _ = fastgen.ddpm_step(out, torch.tensor([0, 0], device=device), sample, SCHEDULE, seed=3, backend="triton")
    assert torch.equal(a, b) and torch.equal(a, c)
    # at t > 0 the step adds sigma z with z ~ N(0, 1): standardised residuals pass a KS test
    big = (4, 64, 64)
    x = rand_like_shape(big, torch.float32, device, generator=g)
    m = rand_like_shape(big, torch.float32, device, generator=g)
    prev, _ = fastgen.ddpm_step(m, 500, x, SCHEDULE, seed=None, variance_type="fixed_large", backend="triton")
    mean = ref.p_mean_variance(m.cpu(), 500, x.cpu(), SCHEDULE)["mean"]
    z = ((prev.cpu().double() - mean) / SCHEDULE.betas[500].sqrt()).reshape(-1).numpy()
    assert scipy.stats.kstest(z, "norm").pvalue > 1e-4


def test_seed_none_follows_torch_manual_seed(device):
    x = torch.ones(2, 5, device=device)
    torch.manual_seed(0)
    a = fastgen.q_sample(x, 10, SCHEDULE, backend="triton")
    torch.manual_seed(0)
    b = fastgen.q_sample(x, 10, SCHEDULE, backend="triton")
    c = fastgen.q_sample(x, 10, SCHEDULE, backend="triton")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_pred_original_sample_optional(device):
    g = gen(15)
    sample, out = (rand_like_shape((2, 3), torch.float32, device, generator=g) for _ in range(2))
    full = fastgen.ddpm_step(out, 10, sample, SCHEDULE, seed=1, backend="triton")
    prev, x0 = fastgen.ddpm_step(out, 10, sample, SCHEDULE, seed=1, return_pred_original_sample=False,
                                 backend="triton")
    assert x0 is None and torch.equal(prev, full[0])
    prev, x0 = fastgen.ddim_step(out, 10, 5, sample, SCHEDULE, return_pred_original_sample=False, backend="triton")
    assert x0 is None and prev.shape == (2, 3)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_batch(device, backend):
    x = torch.empty(0, 3, 4, device=device)
    assert fastgen.ddpm_step(x, 5, x, SCHEDULE, seed=0, backend=backend)[0].shape == (0, 3, 4)
    assert fastgen.ddim_step(x, 5, 4, x, SCHEDULE, backend=backend)[0].shape == (0, 3, 4)
    assert fastgen.q_sample(x, 5, SCHEDULE, seed=0, backend=backend).shape == (0, 3, 4)
    for empty in [x, torch.empty(2, 0, device=device)]:  # no samples; samples of no elements
        threshold = dict(thresholding=True, dynamic_thresholding_ratio=0.9)
        assert fastgen.ddpm_step(empty, 5, empty, SCHEDULE, seed=0, backend=backend, **threshold)[0].shape == empty.shape
        assert fastgen.ddim_step(empty, 5, 4, empty, SCHEDULE, backend=backend, **threshold)[0].shape == empty.shape


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_reference_backend_is_the_reference(dtype):
    """backend="reference" is fastgen.reference.diffusion, rounded once to the dtype; q_sample has no
    separate fp32 path, so "torch" is its reference too."""
    g = gen(16)
    sample, out = (rand_like_shape((2, 3, 4), dtype, "cpu", generator=g) for _ in range(2))
    prev, x0 = fastgen.ddpm_step(out, 77, sample, SCHEDULE, seed=4, backend="reference")
    prev_ref, x0_ref = ref.ddpm_step(out, 77, sample, SCHEDULE, seed=4)
    assert prev.dtype == dtype and torch.equal(prev, prev_ref.to(dtype)) and torch.equal(x0, x0_ref.to(dtype))
    prev, _ = fastgen.ddim_step(out, 77, 50, sample, SCHEDULE, eta=0.5, seed=4, backend="reference")
    assert torch.equal(prev, ref.ddim_step(out, 77, 50, sample, SCHEDULE, eta=0.5, seed=4)[0].to(dtype))
    x_t, noise = fastgen.q_sample(sample, 77, SCHEDULE, seed=4, return_noise=True, backend="torch")
    assert torch.equal(noise, ref.noise_like(sample.shape, 77, seed=4).to(dtype))


def test_invalid_device_timesteps_give_nan_in_kernel(device):
    """Device timesteps are not checked on the host (that would synchronise): the kernel marks them NaN."""
    g = gen(17)
    sample, out = (rand_like_shape((3, 6), torch.float32, device, generator=g) for _ in range(2))
    table = SCHEDULE.kernel_table(device)
    prev = torch.empty_like(sample)
    t = torch.tensor([5, 1000, 7], device=device)
    prev_t = torch.tensor([4, 3, 7], device=device)  # sample 2: prev_t == t
    k_diffusion.ddpm_step(prev, None, out, sample, t, prev_t, table, StepSpec("ddpm"), noise_mode=k_diffusion.NOISE_PHILOX)
    assert torch.isfinite(prev[0]).all() and torch.isnan(prev[1:]).all()


# --- whole trajectories -----------------------------------------------------------------------------

def toy_model(x, t):
    """A deterministic stand-in for a denoiser, defined for any float dtype."""
    return 0.8 * torch.tanh(x) + 0.05 * math.sin(0.01 * t)


def kernel_loop(shape, schedule, timesteps, *, seed, device, ddim=False, per_sample=False, **kwargs):
    x = fastgen.randn(shape, seed=seed, stream=schedule.num_train_timesteps, device=device, backend="triton")
    for i, t in enumerate(timesteps):
        prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        t_arg = torch.full((shape[0],), t, device=device) if per_sample else t
        prev_arg = torch.full((shape[0],), prev_t, device=device) if per_sample else prev_t
        if ddim:
            x, _ = fastgen.ddim_step(toy_model(x, t), t_arg, prev_arg, x, schedule, seed=seed, backend="triton",
                                     **kwargs)
        else:
            x, _ = fastgen.ddpm_step(toy_model(x, t), t_arg, x, schedule, prev_t=prev_arg, seed=seed,
                                     backend="triton", **kwargs)
    return x


def test_ddpm_trajectory_50_steps_lands_on_reference(device):
    schedule = fastgen.NoiseSchedule("squaredcos_cap_v2", num_train_timesteps=50)
    timesteps = list(range(49, -1, -1))
    kwargs = dict(variance_type="fixed_small", prediction_type="epsilon")
    x0 = kernel_loop((2, 3, 6, 6), schedule, timesteps, seed=SEED, device=device, **kwargs)
    expected = ref.sample_loop(toy_model, (2, 3, 6, 6), schedule, seed=SEED, **kwargs)
    assert_close(x0, expected, rtol=2e-5, atol=2e-5)
    assert x0.std() > 0.1  # noise was added on the way
    x0_tensor = kernel_loop((2, 3, 6, 6), schedule, timesteps, seed=SEED, device=device, per_sample=True, **kwargs)
    assert torch.equal(x0, x0_tensor)


def test_ddim_trajectory_50_steps_lands_on_reference(device):
    timesteps = list(range(980, -1, -20))  # 50 strided steps over T = 1000
    kwargs = dict(eta=1.0, prediction_type="v_prediction")
    x0 = kernel_loop((2, 3, 6, 6), SCHEDULE, timesteps, seed=SEED, device=device, ddim=True, **kwargs)
    expected = ref.sample_loop(toy_model, (2, 3, 6, 6), SCHEDULE, seed=SEED, timesteps=timesteps, step=ref.ddim_step,
                               **kwargs)
    assert_close(x0, expected, rtol=2e-5, atol=2e-5)


# --- bad input --------------------------------------------------------------------------------------

def _bad_calls():
    x = torch.randn(2, 4, 3)
    s = SCHEDULE
    step, ddim, q = fastgen.ddpm_step, fastgen.ddim_step, fastgen.q_sample
    return [
        ("t above T", lambda: step(x, 1000, x, s), ValueError, r"t must be a timestep in \[0, 1000\)"),
        ("t negative", lambda: step(x, -1, x, s), ValueError, "t must be"),
        ("t tensor out of range", lambda: step(x, torch.tensor([3, 1000]), x, s), ValueError, "t must hold"),
        ("t float", lambda: step(x, 3.0, x, s), TypeError, "t must be an integer"),
        ("t float tensor", lambda: step(x, torch.tensor([3.0, 4.0]), x, s), TypeError, "integer tensor"),
        ("t wrong batch", lambda: step(x, torch.tensor([3, 4, 5]), x, s), ValueError, "batch=2"),
        ("prev_t >= t", lambda: step(x, 5, x, s, prev_t=5), ValueError, "prev_t must be smaller than t"),
        ("prev_t tensor >= t", lambda: ddim(x, torch.tensor([5, 9]), torch.tensor([4, 9]), x, s), ValueError,
         "prev_t must be smaller"),
        ("prev_t below -1", lambda: ddim(x, 5, -2, x, s), ValueError, r"prev_t must be a timestep in \[-1"),
        ("odd channels", lambda: step(torch.randn(2, 7, 3), 5, x, s, variance_type="learned"), ValueError,
         r"must have shape \(2, 8, 3\) \(prediction and variance channels\).*got \(2, 7, 3\)"),
        ("learned wrong channels", lambda: step(torch.randn(2, 6, 3), 5, x, s, variance_type="learned_range"),
         ValueError, "model_output must have shape"),
        ("shape mismatch", lambda: step(torch.randn(2, 4, 4), 5, x, s), ValueError, "model_output must have shape"),
        ("ddim shape mismatch", lambda: ddim(torch.randn(2, 4, 4), 5, 4, x, s), ValueError, "model_output must have"),
        ("dtype mismatch", lambda: step(x.half(), 5, x, s), TypeError, "model_output must have sample's dtype"),
        ("noise shape", lambda: step(x, 5, x, s, noise=torch.randn(2, 4)), ValueError, "noise must have"),
        ("int sample", lambda: step(x, 5, x.long(), s), TypeError, "sample must be a float"),
        ("0-d sample", lambda: q(torch.tensor(1.0), 5, s), ValueError, "x0 must have a batch dimension"),
        ("schedule", lambda: step(x, 5, x, "linear"), TypeError, "schedule must be a fastgen.NoiseSchedule"),
        ("prediction_type", lambda: step(x, 5, x, s, prediction_type="eps"), ValueError, "prediction_type"),
        ("variance_type", lambda: step(x, 5, x, s, variance_type="small"), ValueError, "variance_type"),
        ("clip range", lambda: step(x, 5, x, s, clip_sample_range=0.0), ValueError, "clip_sample_range"),
        ("clip flag", lambda: step(x, 5, x, s, clip_sample=1), TypeError, "clip_sample must be a bool"),
        ("ratio", lambda: step(x, 5, x, s, thresholding=True, dynamic_thresholding_ratio=1.5), ValueError,
         "dynamic_thresholding_ratio"),
        ("eta", lambda: ddim(x, 5, 4, x, s, eta=1.5), ValueError, "eta"),
        ("eta type", lambda: ddim(x, 5, 4, x, s, eta="1"), TypeError, "eta"),
        ("offset", lambda: q(x, 5, s, offset=-1), ValueError, "offset"),
        ("q t", lambda: q(x, 1000, s), ValueError, "t must be a timestep"),
        ("backend", lambda: q(x, 5, s, backend="cuda"), ValueError, "backend"),
    ]


@pytest.mark.parametrize("call, error, match", [pytest.param(*c[1:], id=c[0]) for c in _bad_calls()])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_reference_rejects_odd_channels():
    with pytest.raises(ValueError, match="even channel count"):
        ref.ddpm_step(torch.randn(2, 3, 4), 5, torch.randn(2, 1, 4), SCHEDULE, variance_type="learned", seed=0)


@pytest.mark.parametrize("block", [16, 64])
def test_results_do_not_depend_on_block(device, monkeypatch, block):
    """Many tiles per sample (the interpreter otherwise runs one): same numbers as one big tile."""
    g = gen(18)
    sample, out = (rand_like_shape(SHAPE, torch.float32, device, generator=g) for _ in range(2))
    t = per_sample_t(700, 3, device)
    calls = [
        lambda: fastgen.ddpm_step(out, t, sample, SCHEDULE, seed=SEED, offset=6, backend="triton"),
        lambda: fastgen.ddim_step(out, t, t - 50, sample, SCHEDULE, eta=0.8, seed=SEED, offset=1, backend="triton"),
        lambda: (fastgen.q_sample(sample, t, SCHEDULE, seed=SEED, offset=3, backend="triton"),),
    ]
    expected = [call() for call in calls]
    monkeypatch.setattr(k_diffusion, "launch_block", lambda kernel, *_: block)
    for call, want in zip(calls, expected):
        for a, b in zip(call(), want):
            assert torch.equal(a, b)


def test_validate_diffusion_check_passes_and_catches_a_bad_kernel(device, monkeypatch):
    from fastgen import validate

    lines = []
    assert validate.run(device=device, quick=True, ops=["diffusion"], out=lines.append), "\n".join(lines)
    real = k_diffusion.ddim_step
    monkeypatch.setattr(k_diffusion, "ddim_step", lambda prev, *a, **k: (real(prev, *a, **k), prev.mul_(1.001)))
    lines = []
    assert validate.run(device=device, quick=True, ops=["diffusion"], out=lines.append) is False
    assert "FAIL" in "\n".join(lines)


TORCH_STEP_SWEEP = [
    ("ddpm", dict()), ("ddpm", dict(variance_type="fixed_large", prediction_type="v_prediction")),
    ("ddpm", dict(variance_type="learned_range", clip_sample=False)), ("ddpm", dict(variance_type="learned")),
    ("ddpm", dict(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=2.0)),
    ("ddim", dict(eta=0.0)), ("ddim", dict(eta=1.0, prediction_type="sample")),
    ("ddim", dict(eta=0.6, use_clipped_model_output=True, set_alpha_to_one=False)),
]


@pytest.mark.parametrize("kind, settings", TORCH_STEP_SWEEP)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_torch_step_matches_the_float64_reference(kind, settings, dtype):
    """backend="torch" (the fused update as whole-tensor fp32 ops, fastgen.ops.diffusion.torch_update)
    against backend="reference" (float64): per-sample timesteps, counter noise from the same stream,
    the end of the chain included, each output rounded once to the dtype."""
    g = gen(31)
    sample = rand_like_shape((4, 2, 9), dtype, "cpu", generator=g)
    channels = 4 if settings.get("variance_type", "").startswith("learned") else 2
    out = rand_like_shape((4, channels, 9), dtype, "cpu", generator=g)
    if channels == 4:
        out[:, 2:] = out[:, 2:].float().sigmoid().to(dtype) if settings["variance_type"] == "learned" else \
            out[:, 2:].float().tanh().to(dtype)
    t = torch.tensor([999, 500, 1, 0])
    prev_t = t - 1 if kind == "ddpm" else (t - 50).clamp_min(-1)
    step = fastgen.ddpm_step if kind == "ddpm" else fastgen.ddim_step
    args = (out, t, sample, SCHEDULE) if kind == "ddpm" else (out, t, prev_t, sample, SCHEDULE)
    kwargs = dict(seed=SEED, offset=3, **settings) | (dict(prev_t=prev_t) if kind == "ddpm" else {})
    got, got_x0 = step(*args, backend="torch", **kwargs)
    want, want_x0 = step(*args, backend="reference", **kwargs)
    assert got.dtype == dtype
    rtol = 4 * TOLERANCES[dtype][0]
    assert_close(got, want.double(), dtype=dtype, rtol=rtol)
    assert_close(got_x0, want_x0.double(), dtype=dtype, rtol=rtol)


# --- classifier-free guidance fused into the step ----------------------------------------------------

@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("clip", ["none", "threshold"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_guided_step_is_the_step_on_the_guided_output(device, kind, clip, backend):
    """A [2B] model output with guidance_scale w steps as the unguided step on m_u + w (m_c - m_u),
    fused (the kernel reads both halves) or not, against the float64 reference."""
    g = gen(31)
    x = rand_like_shape(SHAPE, torch.float32, device, generator=g)
    m = rand_like_shape((2 * SHAPE[0], *SHAPE[1:]), torch.float32, device, generator=g)
    settings = dict(CLIPS[clip], **({"eta": 0.7} if kind == "ddim" else {}))
    step = fastgen.ddpm_step if kind == "ddpm" else fastgen.ddim_step
    args = (500,) if kind == "ddpm" else (500, 480)
    got = step(m, *args, x, SCHEDULE, seed=5, offset=1, guidance_scale=4.0, backend=backend, **settings)
    combined = m[:3] + 4.0 * (m[3:] - m[:3])  # the kernel's own fp32 combination
    want = step(combined, *args, x, SCHEDULE, seed=5, offset=1, backend="reference", **settings)
    for a, e in zip(got, want):
        assert_close(a, e.float(), rtol=2e-5, atol=2e-5)


def test_guidance_errors_name_the_shape_and_the_variance(device):
    x = rand_like_shape(SHAPE, torch.float32, device, generator=gen(1))
    with pytest.raises(ValueError, match=r"model_output must be \[2B, \.\.\.\] = \(6, 2, 5, 7\)"):
        fastgen.ddpm_step(x, 10, x, SCHEDULE, seed=0, guidance_scale=2.0)
    doubled = torch.cat([x, x, x, x], 1)
    with pytest.raises(ValueError, match="guidance_scale is not supported with variance_type='learned'"):
        fastgen.ddpm_step(torch.cat([doubled[:, :4], doubled[:, :4]]), 10, x, SCHEDULE, seed=0, guidance_scale=2.0,
                          variance_type="learned")
    with pytest.raises(TypeError, match="guidance_scale must be a number"):
        fastgen.ddim_step(torch.cat([x, x]), 10, 5, x, SCHEDULE, guidance_scale="7")

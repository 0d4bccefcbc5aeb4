"""DDPM / DDIM in plain torch (float64), written to be read beside the papers.

    [Ho]     Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", arXiv 2006.11239
    [ND]     Nichol, Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models", arXiv 2102.09672
    [Song]   Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models", arXiv 2010.02502
    [SH]     Salimans, Ho 2022, "Progressive Distillation", arXiv 2202.00512 (v-prediction)
    [Imagen] Saharia et al. 2022, arXiv 2205.11487 (dynamic thresholding, section 2.3)

Notation: abar_t = alphas_cumprod[t]; a step goes from t to s = prev_t < t (s = t - 1 for the
ancestral chain, anything below t for a strided schedule; s = -1 means "the end", abar_s = 1), with
alpha_{t|s} = abar_t / abar_s and beta_{t|s} = 1 - alpha_{t|s}.

Timesteps ``t`` are a Python int or an integer tensor of shape [B] (one per sample); noise comes
from ``fastgen.reference.random`` under the rule the kernels follow: element g of sample b is the
normal of counter element offset + b * n + g (n = elements per sample) in stream t[b].

``offset`` here (noise_like, ddpm_step, ddim_step, step) counts ELEMENTS, as the kernels take it:
it is the counter element of sample 0's first element. The public ops (``fastgen.q_sample``,
``fastgen.ddpm_step``, ``fastgen.ddim_step``) count samples instead and call this with k * n for
their ``offset=k``; so ``noise_like(shape, t, seed=s, offset=k * n)`` is the noise of
``fastgen.q_sample(x0, t, schedule, seed=s, offset=k)``, and element g of sample b is
``fastgen.randn(shape, seed=s, stream=t[b], offset=k)[b, g]``.
"""
import math

import torch

from fastgen.reference import random as ref_random
from fastgen.step_spec import PREDICTION_TYPES, VARIANCE_TYPES

MIN_VARIANCE = 1e-20  # diffusers clamps beta~ before any log: beta~_0 = 0


# --- gathering schedule values ---------------------------------------------------------------------

def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] (or scalar) values shaped to broadcast over a [B, ...] tensor."""
    values = values.to(like.device)
    return values.reshape(-1, *([1] * (like.dim() - 1))) if values.dim() else values


def _timesteps(t, batch: int) -> torch.Tensor:
    """t as an int64 CPU tensor of shape [B]."""
    t = torch.as_tensor(t, dtype=torch.int64).cpu()
    return t.expand(batch) if t.dim() == 0 else t


def _alphas_cumprod(schedule, t, batch: int, final=1.0):
    """(abar_t, 1 - abar_t) as float64 [B] tensors; t < 0 gives (final, 1 - final)."""
    t = _timesteps(t, batch)
    index = t.clamp_min(0)
    abar = torch.where(t >= 0, schedule.alphas_cumprod[index], torch.tensor(float(final), dtype=torch.float64))
    one_minus = torch.where(t >= 0, schedule.one_minus_alphas_cumprod[index],
                            torch.tensor(1.0 - float(final), dtype=torch.float64))
    return abar, one_minus


def step_coefficients(schedule, t, prev_t, batch: int, final_alpha_cumprod=1.0):
    """The float64 [B] quantities of a step t -> s: abar_t, 1 - abar_t, abar_s, 1 - abar_s, beta_{t|s} >= 0.

    beta_{t|s} = 1 - abar_t / abar_s, written without cancellation as ((1 - abar_t) - (1 - abar_s)) / abar_s,
    except for one step from t to t - 1 (abar_{-1} = 1), where it is the schedule's beta_t: the value
    the kernels read from the same row (a scheduler's schedule holds diffusers' own beta_t there).
    Where two roundings of one value meet (the last DDIM step with abar_s = abar_0) the difference can
    come out below 0: it is clamped, so a variance is never negative; NaN stays NaN.
    """
    abar_t, bbar_t = _alphas_cumprod(schedule, t, batch)
    abar_s, bbar_s = _alphas_cumprod(schedule, prev_t, batch, final_alpha_cumprod)
    beta_ts = ((bbar_t - bbar_s) / abar_s).clamp_min(0.0)
    t, s = _timesteps(t, batch), _timesteps(prev_t, batch)
    one_step = (s == t - 1) & ((s >= 0) | (float(final_alpha_cumprod) == 1.0))
    beta_ts = torch.where(one_step, schedule.betas[t.clamp(0, len(schedule.betas) - 1)], beta_ts)
    return abar_t, bbar_t, abar_s, bbar_s, beta_ts


# --- noise -----------------------------------------------------------------------------------------

def noise_like(shape, t, *, seed: int, offset: int = 0) -> torch.Tensor:
    """The float64 noise a step at timesteps ``t`` draws for a [B, ...] tensor; ``offset`` in elements
    (the counter element of sample 0's first element; see the module docstring)."""
    shape = torch.Size(shape)
    batch = shape[0]
    per_sample = shape[1:].numel()
    if batch == 0:
        return torch.zeros(shape, dtype=torch.float64)
    offsets = offset + per_sample * torch.arange(batch, dtype=torch.int64)
    return ref_random.normals(per_sample, seed=seed, stream=_timesteps(t, batch), offset=offsets).reshape(shape)


# --- the forward process ---------------------------------------------------------------------------

def q_sample(x0, t, schedule, noise):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps                                   [Ho] eq. (4)"""
    x0 = x0.double()
    abar_t, bbar_t = _alphas_cumprod(schedule, t, x0.shape[0])
    return _per_sample(abar_t.sqrt(), x0) * x0 + _per_sample(bbar_t.sqrt(), x0) * noise.double()


def q_posterior_mean_variance(x0, x_t, t, schedule, prev_t=None):
    """q(x_s | x_t, x_0) = N(mean, variance I)                                       [Ho] eqs. (6)-(7)

        mean     = sqrt(abar_s) beta_{t|s} / (1 - abar_t) x_0 + sqrt(alpha_{t|s}) (1 - abar_s) / (1 - abar_t) x_t
        variance = (1 - abar_s) / (1 - abar_t) beta_{t|s}
    Returns (mean, variance, log_variance), variance clamped to >= 1e-20 before the log.
    """
    x0, x_t = x0.double(), x_t.double()
    prev_t = _timesteps(t, x_t.shape[0]) - 1 if prev_t is None else prev_t
    abar_t, bbar_t, abar_s, bbar_s, beta_ts = step_coefficients(schedule, t, prev_t, x_t.shape[0])
    coef_x0 = abar_s.sqrt() * beta_ts / bbar_t
    coef_xt = (abar_t / abar_s).sqrt() * bbar_s / bbar_t
    variance = (bbar_s / bbar_t * beta_ts).clamp_min(MIN_VARIANCE)
    mean = _per_sample(coef_x0, x0) * x0 + _per_sample(coef_xt, x_t) * x_t
    return mean, _per_sample(variance, x_t), _per_sample(variance.log(), x_t)


# --- what the model predicts -----------------------------------------------------------------------

def predict_x0(model_output, t, sample, schedule, prediction_type="epsilon"):
    """x_0 from the model output:
        epsilon:       x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)                 [Ho] eq. (15)
        sample:        x_0 = the model output
        v_prediction:  x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v                       [SH] sec. 4
    """
    model_output, sample = model_output.double(), sample.double()
    abar_t, bbar_t = _alphas_cumprod(schedule, t, sample.shape[0])
    a, b = _per_sample(abar_t.sqrt(), sample), _per_sample(bbar_t.sqrt(), sample)
    if prediction_type == "epsilon":
        return (sample - b * model_output) / a
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return a * sample - b * model_output
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def predict_eps(model_output, t, sample, schedule, prediction_type="epsilon"):
    """eps from the model output (inverting eq. 4 for sample prediction; eps = sqrt(abar) v + sqrt(1-abar) x_t for v)."""
    model_output, sample = model_output.double(), sample.double()
    abar_t, bbar_t = _alphas_cumprod(schedule, t, sample.shape[0])
    a, b = _per_sample(abar_t.sqrt(), sample), _per_sample(bbar_t.sqrt(), sample)
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (sample - a * model_output) / b
    if prediction_type == "v_prediction":
        return a * model_output + b * sample
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def row_quantile(values, q):
    """The ``q`` quantile of each row of a [B, n] tensor, in its dtype, by torch.quantile's linear
    interpolation between order statistics (sorted values v_0 <= ... <= v_{n-1}):

        p = q (n - 1),   quantile = v_floor(p) + (p - floor(p)) (v_ceil(p) - v_floor(p))

    NaN for a row holding a NaN (as torch.quantile) or for an empty row. Where v_floor(p) or v_ceil(p)
    is infinite the quantile is that infinity (torch.quantile's lerp makes inf - inf = NaN of it).
    A sort, so without torch.quantile's limit of 2^24 elements per row."""
    rows, n = values.shape
    if n == 0:
        return values.new_full((rows,), math.nan)
    ordered = values.sort(dim=1).values  # NaN sorts last; the rows holding one are masked below
    position = q * (n - 1)
    below, above = ordered[:, math.floor(position)], ordered[:, math.ceil(position)]
    quantile = torch.lerp(below, above, position - math.floor(position))
    infinite_below, infinite_above = torch.isinf(below), torch.isinf(above)
    infinity = below.where(infinite_below, 0.0) + above.where(infinite_above, 0.0)  # -inf + inf: NaN
    quantile = torch.where(infinite_below | infinite_above, infinity, quantile)
    return quantile.masked_fill(values.isnan().any(dim=1), math.nan)


def dynamic_threshold_scale(x0, ratio=0.995, max_value=1.0):
    """s per sample: the ``ratio`` quantile of |x_0| over the sample, clamped to [1, max_value]   [Imagen] 2.3
    (computed in x0's dtype; NaN for a sample holding a NaN)."""
    per_sample = x0.reshape(x0.shape[0], math.prod(x0.shape[1:]))  # not (B, -1): ambiguous for B = 0
    return row_quantile(per_sample.abs(), ratio).clamp(min=1.0, max=max_value)


def clip_x0(x0, *, clip_sample=True, clip_sample_range=1.0, thresholding=False, dynamic_thresholding_ratio=0.995,
            sample_max_value=1.0):
    """Dynamic thresholding (x_0 -> clamp(x_0, -s, s) / s) if ``thresholding``, else clipping to
    +-clip_sample_range if ``clip_sample``, else x_0 unchanged (diffusers' order)."""
    if thresholding:
        s = _per_sample(dynamic_threshold_scale(x0, dynamic_thresholding_ratio, sample_max_value), x0)
        return torch.minimum(torch.maximum(x0, -s), s) / s
    if clip_sample:
        return x0.clamp(-clip_sample_range, clip_sample_range)
    return x0


def model_variance(t, prev_t, schedule, variance_type="fixed_small", predicted_variance=None, batch=1):
    """(variance, log_variance) of p(x_s | x_t), float64, broadcastable to the sample:
        fixed_small(_log):  beta~ = (1 - abar_s) / (1 - abar_t) beta_{t|s}   (>= 1e-20)     [Ho] sec. 3.2
        fixed_large(_log):  beta_{t|s}                                                       [Ho] sec. 3.2
        learned:            the model's extra channels are the variance itself (diffusers' convention)
        learned_range:      log var = f log beta_{t|s} + (1 - f) log beta~, f = (v + 1) / 2  [ND] eq. (15)
    The _log variants go through the log (as GLIDE/diffusers do); the value is the same. At t = 0,
    where beta~ = 0 and a step draws no noise (only the decoder likelihood L_0 uses the variance),
    beta~ is taken from t = 1 for the small and the large variance, as Improved DDPM does.
    """
    _, bbar_t, _, bbar_s, beta_ts = step_coefficients(schedule, t, prev_t, batch)
    posterior = (bbar_s / bbar_t * beta_ts).clamp_min(MIN_VARIANCE)
    at_zero = _timesteps(t, batch) == 0
    first_step_variance = schedule.posterior_variance[min(1, len(schedule) - 1)].clamp_min(MIN_VARIANCE)
    posterior = torch.where(at_zero, first_step_variance, posterior)
    if variance_type in ("fixed_large", "fixed_large_log"):
        beta_ts = torch.where(at_zero, first_step_variance, beta_ts)
    shape = (-1,) + (1,) * (predicted_variance.dim() - 1 if predicted_variance is not None else 0)
    posterior, beta_ts = posterior.reshape(shape), beta_ts.reshape(shape)
    if predicted_variance is not None:
        posterior, beta_ts = posterior.to(predicted_variance.device), beta_ts.to(predicted_variance.device)
    if variance_type in ("fixed_small", "fixed_small_log"):
        return posterior, posterior.log()
    if variance_type in ("fixed_large", "fixed_large_log"):
        return beta_ts, beta_ts.log()
    if variance_type == "learned":
        v = predicted_variance.double()
        return v, v.log()
    if variance_type == "learned_range":
        frac = (predicted_variance.double() + 1) / 2
        log_variance = frac * beta_ts.log() + (1 - frac) * posterior.log()
        return log_variance.exp(), log_variance
    raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")


def split_model_output(model_output, variance_type):
    """(prediction, predicted_variance): learned variance types carry 2C channels on dim 1."""
    if variance_type in ("learned", "learned_range"):
        channels = model_output.shape[1]
        if channels % 2:
            raise ValueError(f"model_output must have an even channel count (dim 1) for variance_type="
                             f"{variance_type!r}, got {channels}")
        return model_output[:, :channels // 2], model_output[:, channels // 2:]
    return model_output, None


def p_mean_variance(model_output, t, sample, schedule, *, prev_t=None, prediction_type="epsilon",
                    variance_type="fixed_small", clip_sample=True, clip_sample_range=1.0, thresholding=False,
                    dynamic_thresholding_ratio=0.995, sample_max_value=1.0):
    """p_theta(x_s | x_t) = N(mean, variance): x_0 predicted (and clipped), then plugged into the
    posterior mean of eq. (7) ([Ho] eq. 11 in its x_0 form). Returns a dict with mean, variance,
    log_variance and pred_original_sample (all float64)."""
    prediction, predicted_variance = split_model_output(model_output, variance_type)
    sample = sample.double()
    prev_t = _timesteps(t, sample.shape[0]) - 1 if prev_t is None else prev_t
    x0 = predict_x0(prediction, t, sample, schedule, prediction_type)
    x0 = clip_x0(x0, clip_sample=clip_sample, clip_sample_range=clip_sample_range, thresholding=thresholding,
                 dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value)
    mean, _, _ = q_posterior_mean_variance(x0, sample, t, schedule, prev_t)
    variance, log_variance = model_variance(t, prev_t, schedule, variance_type, predicted_variance, sample.shape[0])
    if predicted_variance is None:
        variance, log_variance = _per_sample(variance, sample), _per_sample(log_variance, sample)
    return dict(mean=mean, variance=variance, log_variance=log_variance, pred_original_sample=x0)


# --- reverse steps ---------------------------------------------------------------------------------

def ddpm_step(model_output, t, sample, schedule, *, prev_t=None, prediction_type="epsilon",
              variance_type="fixed_small", clip_sample=True, clip_sample_range=1.0, thresholding=False,
              dynamic_thresholding_ratio=0.995, sample_max_value=1.0, seed=None, noise=None, offset=0):
    """One ancestral step x_t -> x_s = mean + sigma z, z ~ N(0, I), no noise where t == 0   [Ho] Algorithm 2.
    z: ``noise``, or ``noise_like`` at (seed, offset in elements). Returns float64 (prev_sample,
    pred_original_sample)."""
    out = p_mean_variance(model_output, t, sample, schedule, prev_t=prev_t, prediction_type=prediction_type,
                          variance_type=variance_type, clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                          thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                          sample_max_value=sample_max_value)
    z = noise.double() if noise is not None else noise_like(sample.shape, t, seed=seed, offset=offset).to(sample.device)
    nonzero = _per_sample(_timesteps(t, sample.shape[0]) > 0, sample)
    prev_sample = out["mean"] + torch.where(nonzero, torch.exp(0.5 * out["log_variance"]) * z, 0.0)
    return prev_sample, out["pred_original_sample"]


def ddim_step(model_output, t, prev_t, sample, schedule, *, eta=0.0, prediction_type="epsilon", clip_sample=True,
              clip_sample_range=1.0, thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
              use_clipped_model_output=False, final_alpha_cumprod=1.0, seed=None, noise=None, offset=0):
    """One DDIM step x_t -> x_s                                                         [Song] eq. (12)

        x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + sigma z
        sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s)         [Song] eq. (16)
    x0 is clipped/thresholded; with use_clipped_model_output eps is recomputed from the clipped x0.
    prev_t < 0 means the end of the chain, where abar_s = final_alpha_cumprod. No noise where t == 0.
    z: ``noise``, or ``noise_like`` at (seed, offset in elements). Returns float64 (prev_sample,
    pred_original_sample)."""
    sample = sample.double()
    batch = sample.shape[0]
    x0 = predict_x0(model_output, t, sample, schedule, prediction_type)
    eps = predict_eps(model_output, t, sample, schedule, prediction_type)
    x0 = clip_x0(x0, clip_sample=clip_sample, clip_sample_range=clip_sample_range, thresholding=thresholding,
                 dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value)
    abar_t, bbar_t, abar_s, bbar_s, beta_ts = step_coefficients(schedule, t, prev_t, batch, final_alpha_cumprod)
    if use_clipped_model_output:
        eps = (sample - _per_sample(abar_t.sqrt(), sample) * x0) / _per_sample(bbar_t.sqrt(), sample)
    variance = bbar_s / bbar_t * beta_ts
    sigma = eta * variance.sqrt()
    # sqrt(1 - abar_s - sigma^2) as a sum of non-negative terms, with 1 - abar_t - beta_{t|s} =
    # abar_t (1 - abar_s) / abar_s: (1 - abar_s) / (1 - abar_t) ((1 - eta^2)(1 - abar_t) + eta^2 that);
    # exactly 0 where sigma takes all the variance (eta = 1, abar_t = 0), not a rounding residue
    direction = (bbar_s * ((1 - eta ** 2) * bbar_t + eta ** 2 * abar_t * bbar_s / abar_s) / bbar_t).sqrt()
    prev_sample = _per_sample(abar_s.sqrt(), sample) * x0 + _per_sample(direction, sample) * eps
    if eta > 0:
        z = noise.double() if noise is not None else noise_like(sample.shape, t, seed=seed, offset=offset).to(sample.device)
        nonzero = _per_sample(_timesteps(t, batch) > 0, sample)  # where, not a product: z is unused at t = 0
        prev_sample = prev_sample + torch.where(nonzero, _per_sample(sigma, sample) * z, 0.0)
    return prev_sample, x0


def step(spec, model_output, t, prev_t, sample, schedule, *, seed=None, noise=None, offset=0):
    """The reverse step a step specification (fastgen.step_spec.StepSpec) describes: ddpm_step or
    ddim_step with its settings. prev_t None: t - 1 (DDPM). ``offset`` in elements."""
    common = dict(prediction_type=spec.prediction_type, clip_sample=spec.clip_sample,
                  clip_sample_range=spec.clip_sample_range, thresholding=spec.thresholding,
                  dynamic_thresholding_ratio=spec.dynamic_thresholding_ratio, sample_max_value=spec.sample_max_value,
                  seed=seed, noise=noise, offset=offset)
    if spec.kind == "ddpm":
        return ddpm_step(model_output, t, sample, schedule, prev_t=prev_t, variance_type=spec.variance_type, **common)
    return ddim_step(model_output, t, prev_t, sample, schedule, eta=spec.eta,
                     use_clipped_model_output=spec.use_clipped_model_output,
                     final_alpha_cumprod=spec.final_alpha_cumprod(schedule), **common)


# --- training losses -------------------------------------------------------------------------------

def simple_loss(eps_prediction, noise):
    """L_simple = E || eps - eps_theta(x_t, t) ||^2, the mean over all but the batch dim      [Ho] eq. (14)"""
    return ((noise.double() - eps_prediction.double()) ** 2).reshape(noise.shape[0], -1).mean(1)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise:
        1/2 (-1 + logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^-logvar2)"""
    mean1, logvar1, mean2, logvar2 = (torch.as_tensor(v, dtype=torch.float64) for v in (mean1, logvar1, mean2, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def standard_normal_cdf(x):
    """Phi(x) = (1 + erf(x / sqrt 2)) / 2 (exact; Improved DDPM's code uses a tanh approximation)."""
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """log p(x) for data x in [-1, 1] on 256 bins of width 2/255 under N(means, e^(2 log_scales)),
    the edge bins extended to +-infinity                                             [Ho] eq. (13)

        log p = log Phi((x + 1/255 - mu) / sigma)          if x < -0.999
                log (1 - Phi((x - 1/255 - mu) / sigma))    if x > 0.999
                log (Phi(upper) - Phi(lower))  (>= 1e-12)  otherwise
    """
    x, means, log_scales = x.double(), means.double(), torch.as_tensor(log_scales, dtype=torch.float64)
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


def vlb_terms(model_output, x0, x_t, t, schedule, *, prediction_type="epsilon", variance_type="fixed_small",
              clip_sample=False):
    """The variational bound term of each sample in bits per dimension                [ND] eq. (4)-(6)
        L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))   for t > 0
        L_0     = -log p(x_0 | x_1) (discretized Gaussian)          for t = 0
    both averaged over the elements of a sample and divided by log 2."""
    true_mean, _, true_log_variance = q_posterior_mean_variance(x0, x_t, t, schedule)
    out = p_mean_variance(model_output, t, x_t, schedule, prediction_type=prediction_type,
                          variance_type=variance_type, clip_sample=clip_sample)
    kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
    kl = kl.reshape(x0.shape[0], -1).mean(1) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, means=out["mean"], log_scales=0.5 * out["log_variance"])
    nll = nll.reshape(x0.shape[0], -1).mean(1) / math.log(2.0)
    return torch.where(_timesteps(t, x0.shape[0]).to(x0.device) == 0, nll, kl)


# --- sampling --------------------------------------------------------------------------------------

def sample_loop(model, shape, schedule, *, seed: int, timesteps=None, step=ddpm_step, **step_kwargs):
    """Ancestral sampling [Ho] Algorithm 2: x_T ~ N(0, I) from stream T (one past the last timestep),
    then ``step`` over ``timesteps`` (default T-1 .. 0), each drawing its noise from stream t.
    ``model(x_t, t) -> model_output``. Returns float64 x_0."""
    num_steps = schedule.num_train_timesteps
    timesteps = list(range(num_steps - 1, -1, -1)) if timesteps is None else [int(t) for t in timesteps]
    x = ref_random.randn(shape, seed=seed, stream=num_steps, dtype=torch.float64)
    for i, t in enumerate(timesteps):
        prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        if step is ddim_step:
            x, _ = ddim_step(model(x, t), t, prev_t, x, schedule, seed=seed, **step_kwargs)
        else:
            x, _ = step(model(x, t), t, x, schedule, prev_t=prev_t, seed=seed, **step_kwargs)
    return x

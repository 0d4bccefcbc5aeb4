"""Consistency models, float64 reference: the consistency function and its boundary condition, the
multistep consistency sampler (CMStochasticIterativeScheduler) and the latent consistency model's step
(LCMScheduler), and the StepTable builders that turn each into coefficient rows of the sigma-space
samplers' affine kernel (kernels/samplers.py).

Song, Dhariwal, Chen, Sutskever 2023, "Consistency Models", arXiv 2303.01469. Variance-exploding
time t = sigma, x_sigma = x_0 + sigma z; a consistency function maps any point of an ODE trajectory
to its origin, f(x_sigma, sigma) = x_0, with the boundary condition f(x, eps) = x (eps = sigma_min):

    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, sigma)                 eq. (7), App. C
    c_skip      = sigma_data^2 / ((sigma - eps)^2 + sigma_data^2)
    c_out       = sigma_data (sigma - eps) / sqrt(sigma_data^2 + sigma^2)
    c_in        = 1 / sqrt(sigma^2 + sigma_data^2)                        (EDM's input scaling)

c_skip(eps) = 1 and c_out(eps) = 0, so f(x, eps) = x whatever F is. sigma_data = 0.5.

Multistep consistency sampling (Algorithm 1) from sigma_i to the next time sigma_{i+1}:

    D           = clip(f(x, sigma_i))                       clip_denoised: to [-1, 1]
    x_{i+1}     = D + s_noise sqrt(sigma_hat^2 - eps^2) z,  sigma_hat = clamp(sigma_{i+1}, eps, sigma_max)

(the last step re-noises to eps, that is not at all: ``renoise_scale``). The affine row: CX = c_skip, CF = c_out (x0 is
the boundary-conditioned output, clipped by the kernel's clip), D = x0, out = D + NOISE z.

Latent consistency models (Luo, Tan, Huang, Li, Zhao 2023, arXiv 2310.04378; diffusers'
``LCMScheduler``), on a DDPM's discrete timesteps t with abar_t = alphas_cumprod[t]:

    x0          = (x - sqrt(1 - abar_t) F) / sqrt(abar_t)    epsilon
                = F                                           sample
                = sqrt(abar_t) x - sqrt(1 - abar_t) F         v_prediction
    x0          = clip(x0)                                    clip_sample (range) or dynamic thresholding
    c_skip      = sigma_data^2 / ((s t)^2 + sigma_data^2),   c_out = s t / sqrt((s t)^2 + sigma_data^2)
                                                              (s = timestep_scaling; the boundary at t = 0)
    D           = c_skip x + c_out x0
    x_prev      = sqrt(abar_s) D + sqrt(1 - abar_s) z         s: the next timestep; the last step: x_prev = D

The affine row: CX, CF from the prediction type, DX = c_skip, D0 = c_out, AD = sqrt(abar_s),
NOISE = sqrt(1 - abar_s) (AD = 1, NOISE = 0 at the last step).

Every function takes and returns float64 tensors (the per-step numbers as Python floats).
"""
import math

import numpy as np
import torch

from fastgen.reference.diffusion import clip_x0
from fastgen.step_table import host_sigmas, require_timesteps, scheduler_table, table_builder

SIGMA_DATA = 0.5
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


# --- consistency models (Song et al. 2023) ---------------------------------------------------------

def boundary_scalings(sigma: float, sigma_min: float, sigma_data: float = SIGMA_DATA):
    """(c_skip, c_out) of the consistency parameterisation at sigma (a float or a float64 tensor),
    boundary at sigma_min                                                                   eq. (7), App. C"""
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def input_scaling(sigma: float, sigma_data: float = SIGMA_DATA) -> float:
    """c_in(sigma) = 1 / sqrt(sigma^2 + sigma_data^2): what the network F sees is c_in x."""
    return 1.0 / math.sqrt(sigma**2 + sigma_data**2)


def consistency_function(model_output, sample, sigma: float, sigma_min: float, sigma_data: float = SIGMA_DATA):
    """f(x, sigma) = c_skip(sigma) x + c_out(sigma) F, F the network's output at (c_in x, sigma)   eq. (7)"""
    c_skip, c_out = boundary_scalings(sigma, sigma_min, sigma_data)
    return c_skip * sample + c_out * model_output


def consistency_step(model_output, sample, sigma: float, sigma_next: float, *, sigma_min: float, sigma_max: float,
                     sigma_data: float = SIGMA_DATA, s_noise: float = 1.0, clip_denoised: bool = True, noise=None):
    """One step of multistep consistency sampling (Algorithm 1): (x_next, D) from x at sigma.

    noise: z like the sample, or None where the step adds none (its re-noising scale is 0)."""
    denoised = consistency_function(model_output, sample, sigma, sigma_min, sigma_data)
    if clip_denoised:
        denoised = denoised.clamp(-1.0, 1.0)
    scale = renoise_scale(sigma_next, sigma_min=sigma_min, sigma_max=sigma_max, s_noise=s_noise)
    if scale == 0.0:
        return denoised.clone(), denoised
    return denoised + scale * noise, denoised


def renoise_scale(sigma_next: float, *, sigma_min: float, sigma_max: float, s_noise: float = 1.0) -> float:
    """s_noise sqrt(sigma_hat^2 - eps^2), sigma_hat = clamp(sigma_next, eps, sigma_max): the noise that takes
    D to sigma_next. 0 at the end, where sigma_next is eps as a scheduler stores it (float32): the
    rounding of a stored sigma_min is no noise level (diffusers' float32 difference leaves ~7e-7 z there)."""
    sigma_hat = min(max(sigma_next, sigma_min), sigma_max)
    if np.float32(sigma_hat) == np.float32(sigma_min):
        return 0.0
    return s_noise * math.sqrt(sigma_hat**2 - sigma_min**2)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0..n-1,
    decreasing (Karras et al. 2022, eq. 5): the consistency models' discretisation, float64."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_timestep(sigma):
    """The consistency models' time input: t = 250 log(sigma) (diffusers' ``sigma_to_t``)."""
    return 250.0 * torch.log(torch.as_tensor(sigma, dtype=torch.float64) + 1e-44)


def timestep_to_sigma(t):
    """sigma = exp(t / 250), the inverse of ``sigma_to_timestep``."""
    return torch.exp(torch.as_tensor(t, dtype=torch.float64) / 250.0)


# --- latent consistency models (Luo et al. 2023) ---------------------------------------------------

def lcm_boundary_scalings(timestep: float, timestep_scaling: float = 10.0, sigma_data: float = SIGMA_DATA):
    """(c_skip, c_out) of LCM's discrete boundary condition at timestep t (scaled by timestep_scaling)."""
    scaled = timestep * timestep_scaling
    return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / math.sqrt(scaled**2 + sigma_data**2)


def predicted_x0(model_output, sample, alpha_prod_t: float, prediction_type: str):
    """x_0 from the model output at x_t (DDPM's parameterisations)."""
    alpha, beta = _sqrt(alpha_prod_t), _sqrt(1.0 - alpha_prod_t)
    if prediction_type == "epsilon":
        return (sample - beta * model_output) / alpha
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return alpha * sample - beta * model_output
    raise ValueError(f"prediction_type must be one of {', '.join(map(repr, PREDICTION_TYPES))}, "
                     f"got {prediction_type!r}")


def lcm_step(model_output, sample, timestep: float, *, alpha_prod_t: float, alpha_prod_prev: float,
             last: bool, prediction_type: str = "epsilon", timestep_scaling: float = 10.0, clip_sample: bool = False,
             clip_sample_range: float = 1.0, thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
             sample_max_value: float = 1.0, noise=None):
    """One LCM step (module docstring): (x_prev, D). ``last``: the final step, which adds no noise."""
    x0 = predicted_x0(model_output, sample, alpha_prod_t, prediction_type)
    x0 = clip_x0(x0, clip_sample=clip_sample, clip_sample_range=clip_sample_range, thresholding=thresholding,
                 dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value)
    c_skip, c_out = lcm_boundary_scalings(timestep, timestep_scaling)
    denoised = c_out * x0 + c_skip * sample
    if last:
        return denoised.clone(), denoised
    return _sqrt(alpha_prod_prev) * denoised + _sqrt(1.0 - alpha_prod_prev) * noise, denoised


def _sqrt(value: float) -> float:
    """sqrt in IEEE arithmetic (NaN below 0, as a tensor's): a degenerate schedule gives NaN, not an error."""
    return math.sqrt(value) if value >= 0 else math.nan


# --- StepTable builders ----------------------------------------------------------------------------

def _host(values) -> list:
    return torch.as_tensor(values).detach().to("cpu", torch.float64).reshape(-1).tolist()


@table_builder("CMStochasticIterativeScheduler")
def consistency_table(scheduler):
    """The StepTable of a CMStochasticIterativeScheduler's run, from its own sigmas and timesteps
    (those of ``set_timesteps``, or of its constructor before it): step i goes from sigmas[i] to
    diffusers' next sigma (sigmas[i + 1] while i + 1 < num_train_timesteps, else sigmas[-1]).
    diffusers draws generator noise at every step of a run of more than one step."""
    config = scheduler.config
    sigmas, n = host_sigmas(scheduler).tolist(), len(scheduler.timesteps)
    smin, smax, sdata = float(config.sigma_min), float(config.sigma_max), float(config.sigma_data)
    pairs = [(sigmas[i], sigmas[i + 1] if i + 1 < config.num_train_timesteps else sigmas[-1]) for i in range(n)]
    rows = []
    for sigma, sigma_next in pairs:
        c_skip, c_out = boundary_scalings(sigma, smin, sdata)
        rows.append(dict(cx=c_skip, cf=c_out, ad=1.0,
                         noise=renoise_scale(sigma_next, sigma_min=smin, sigma_max=smax,
                                             s_noise=float(config.s_noise))))

    def reference(i, model_output, sample, prev_denoised, noise):
        return consistency_step(model_output, sample, *pairs[i], sigma_min=smin, sigma_max=smax, sigma_data=sdata,
                                s_noise=float(config.s_noise), clip_denoised=bool(config.clip_denoised), noise=noise)

    return scheduler_table(scheduler, "consistency", rows, reference, generator_draws=[n > 1] * n,
                           model_input_scales=[input_scaling(sigma, sdata) for sigma, _ in pairs],
                           init_noise_sigma=scheduler.init_noise_sigma,
                           clip="range" if config.clip_denoised else "none", clip_range=1.0)


@table_builder("LCMScheduler")
def lcm_table(scheduler):
    """The StepTable of an LCMScheduler's run, from its own timesteps and float32 ``alphas_cumprod``:
    step i re-noises to the next timestep of the run (diffusers: the step's own timestep after the
    last one) unless it is step num_inference_steps - 1, which returns D and draws nothing."""
    require_timesteps(scheduler)
    config = scheduler.config
    prediction_type = config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(map(repr, PREDICTION_TYPES))} for LCMScheduler, "
                         f"got {prediction_type!r}")
    timesteps = [int(t) for t in _host(scheduler.timesteps)]
    abar = _host(scheduler.alphas_cumprod)
    final = float(scheduler.final_alpha_cumprod)
    n, scaling = len(timesteps), float(config.timestep_scaling)
    steps = []
    for i, t in enumerate(timesteps):
        prev = timesteps[i + 1] if i + 1 < n else t
        steps.append((t, abar[t], abar[prev] if prev >= 0 else final, i == scheduler.num_inference_steps - 1))
    rows = []
    for t, a_t, a_prev, last in steps:  # IEEE arithmetic: a degenerate config's unused rows hold inf / NaN
        a_t, a_prev = torch.tensor(a_t, dtype=torch.float64), torch.tensor(a_prev, dtype=torch.float64)
        cx, cf = {"epsilon": (1.0 / a_t.sqrt(), -(1.0 - a_t).sqrt() / a_t.sqrt()),
                  "sample": (0.0, 1.0),
                  "v_prediction": (a_t.sqrt(), -(1.0 - a_t).sqrt())}[prediction_type]
        c_skip, c_out = lcm_boundary_scalings(t, scaling)
        rows.append(dict(cx=float(cx), cf=float(cf), dx=c_skip, d0=c_out,
                         ad=1.0 if last else float(a_prev.sqrt()), noise=0.0 if last else float((1.0 - a_prev).sqrt())))
    clip = dict(clip="threshold" if config.thresholding else "range" if config.clip_sample else "none",
                clip_range=float(config.clip_sample_range),
                dynamic_thresholding_ratio=float(config.dynamic_thresholding_ratio),
                sample_max_value=float(config.sample_max_value))

    def reference(i, model_output, sample, prev_denoised, noise):
        t, a_t, a_prev, last = steps[i]
        return lcm_step(model_output, sample, t, alpha_prod_t=a_t, alpha_prod_prev=a_prev, last=last,
                        prediction_type=prediction_type, timestep_scaling=scaling, noise=noise,
                        clip_sample=bool(config.clip_sample), clip_sample_range=clip["clip_range"],
                        thresholding=bool(config.thresholding),
                        dynamic_thresholding_ratio=clip["dynamic_thresholding_ratio"],
                        sample_max_value=clip["sample_max_value"])

    return scheduler_table(scheduler, "lcm", rows, reference, generator_draws=[not last for *_, last in steps],
                           init_noise_sigma=scheduler.init_noise_sigma, **clip)

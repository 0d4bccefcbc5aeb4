"""EDM sampling (float64), written to be read beside the paper, and the StepTable builders of diffusers'
EDMEulerScheduler and EDMDPMSolverMultistepScheduler.

    [Karras] Karras, Aittala, Aila, Laine 2022, "Elucidating the Design Space of Diffusion-Based
             Generative Models", arXiv 2206.00364 (Table 1: the preconditioning; Alg. 2: the sampler)

The network F is wrapped by the preconditioning of [Karras] Table 1 (sigma_data: the data's std):

    c_skip(sigma) = sigma_data^2 / (sigma^2 + sigma_data^2)
    c_out(sigma)  = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)      (negated for v_prediction, diffusers)
    c_in(sigma)   = 1 / sqrt(sigma^2 + sigma_data^2)                     the model sees c_in x
    D(x; sigma)   = c_skip(sigma) x + c_out(sigma) F(c_in x; c_noise(sigma))

and the step is Alg. 2's Euler step with churn (as ``fastgen.reference.karras.euler_step``), D taken at
the churned noise level sigma^ and, as in diffusers (whose step is the drop-in's contract), the model
output F evaluated at the pre-churn sample reused there; or DPM-Solver++ (2M, ODE or SDE;
fastgen.reference.dpm_solver) on x itself: alpha_t = 1, sigma_t = sigma, x0 = D.
"""
import math

from fastgen import _checks
from fastgen.reference import dpm_solver
from fastgen.reference.diffusion import clip_x0
from fastgen.reference.karras import churn_gamma
from fastgen.step_table import host_sigmas, require_timesteps, scheduler_table, table_builder

EDM_PREDICTION_TYPES = ("epsilon", "v_prediction")


def preconditioning(sigma, sigma_data, prediction_type):
    """(c_skip, c_out) of [Karras] Table 1 at sigma."""
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / math.sqrt(sigma ** 2 + sigma_data ** 2)
    return c_skip, (c_out if prediction_type == "epsilon" else -c_out)


def edm_euler_step(model_output, x, sigma, sigma_next, *, sigma_data, prediction_type, gamma=0.0, s_noise=1.0,
                   noise=None):
    """One step of [Karras] Alg. 2 without the second-order correction:

        sigma^ = sigma_i (1 + gamma_i)                                                 l. 5
        x^     = x_i + sqrt(sigma^^2 - sigma_i^2) S_noise z                            l. 6
        D      = c_skip(sigma^) x^ + c_out(sigma^) F                                   Table 1
        x_i+1  = x^ + (sigma_i+1 - sigma^) (x^ - D) / sigma^                           l. 7-8

    Returns (x_i+1, D)."""
    sigma_hat = sigma * (1 + gamma)
    if gamma > 0:
        x = x + math.sqrt(sigma_hat ** 2 - sigma ** 2) * (s_noise * noise)
    c_skip, c_out = preconditioning(sigma_hat, sigma_data, prediction_type)
    d0 = c_skip * x + c_out * model_output
    return x + (sigma_next - sigma_hat) * (x - d0) / sigma_hat, d0


@table_builder("EDMEulerScheduler")
def edm_euler_table(scheduler, *, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """The StepTable of diffusers' EDMEulerScheduler after ``set_timesteps``, with step()'s churn settings.
    From ``edm_euler_step``, per step i (sigma^ = sigma_i (1 + gamma_i), r = sigma_i+1 / sigma^):

        CHURN = S_noise sqrt(sigma^^2 - sigma_i^2)            x^ = x + CHURN z       (0 where gamma_i = 0)
        CX = c_skip(sigma^), CF = c_out(sigma^)               D = CX x^ + CF F
        AX = r, AD = 1 - r                                    x_i+1 = r x^ + (1 - r) D

    The model sees c_in(sigma_i) x at the scheduler's timesteps c_noise(sigma_i); diffusers' step draws
    from its generator where gamma_i > 0 (gamma from N = len(sigmas) - 1, as diffusers counts)."""
    config = scheduler.config
    prediction_type = _checks.choice(config.prediction_type, "prediction_type", EDM_PREDICTION_TYPES)
    sigma_data = float(config.sigma_data)
    s_churn, s_noise = _checks.finite_float(s_churn, "s_churn"), _checks.finite_float(s_noise, "s_noise")
    if s_churn < 0:
        raise ValueError(f"s_churn must be >= 0, got {s_churn}")
    all_sigmas = host_sigmas(scheduler).tolist()
    n = len(scheduler.timesteps)
    sigmas = all_sigmas[:n + 1]
    gammas = [churn_gamma(sigma, len(all_sigmas) - 1, s_churn, float(s_tmin), float(s_tmax)) for sigma in sigmas[:-1]]
    rows = []
    for i in range(n):
        sigma, sigma_hat = sigmas[i], sigmas[i] * (1 + gammas[i])
        c_skip, c_out = preconditioning(sigma_hat, sigma_data, prediction_type)
        ratio = sigmas[i + 1] / sigma_hat
        churn = s_noise * math.sqrt(sigma_hat ** 2 - sigma ** 2) if gammas[i] > 0 else 0.0
        rows.append(dict(churn=churn, cx=c_skip, cf=c_out, ax=ratio, ad=1.0 - ratio))

    def reference(i, f, x, prev, z):
        return edm_euler_step(f, x, sigmas[i], sigmas[i + 1], sigma_data=sigma_data, prediction_type=prediction_type,
                              gamma=gammas[i], s_noise=s_noise, noise=z)

    return scheduler_table(scheduler, "edm_euler", rows, reference, generator_draws=[g > 0 for g in gammas],
                           model_input_scales=[input_scale(sigma, sigma_data) for sigma in sigmas[:-1]],
                           init_noise_sigma=float(scheduler.init_noise_sigma))


def input_scale(sigma, sigma_data):
    """c_in(sigma) = 1 / sqrt(sigma^2 + sigma_data^2): the model sees c_in x   ([Karras] Table 1)."""
    return 1.0 / math.sqrt(sigma ** 2 + sigma_data ** 2)


def multistep_fused_settings(config):
    """None where diffusers' EDMDPMSolverMultistepScheduler ``config`` has a fused table; else why not."""
    try:
        dpm_solver.check_solver(config, EDM_PREDICTION_TYPES)
    except ValueError as error:
        return str(error)
    return None


@table_builder("EDMDPMSolverMultistepScheduler")
def edm_dpm_solver_table(scheduler, *, start=0):
    """The StepTable of diffusers' EDMDPMSolverMultistepScheduler after ``set_timesteps``: DPM-Solver++
    (``fastgen.reference.dpm_solver.multistep_table``) with alpha_i = 1, sigma_i = sigma_i (x is not
    rescaled: the model sees c_in x), lambda_i = -log sigma_i, and x0 = D = c_skip(sigma_i) x +
    c_out(sigma_i) F (dynamic thresholding after, with ``thresholding``)."""
    require_timesteps(scheduler)
    config = scheduler.config
    dpm_solver.check_solver(config, EDM_PREDICTION_TYPES)
    sigma_data, prediction_type = float(config.sigma_data), config.prediction_type
    sigmas = host_sigmas(scheduler).tolist()
    n = len(scheduler.timesteps)
    if len(sigmas) != n + 1:
        raise ValueError(f"the scheduler must have one sigma more than timesteps, got {len(sigmas)} sigmas for "
                         f"{n} timesteps")
    levels = [(1.0, sigma, dpm_solver.half_log_snr(1.0, sigma)) for sigma in sigmas]

    def x0_columns(i):
        return dict(zip(("cx", "cf"), preconditioning(sigmas[i], sigma_data, prediction_type)))

    def x0(i, f, x):
        c_skip, c_out = preconditioning(sigmas[i], sigma_data, prediction_type)
        denoised = c_skip * x + c_out * f
        if not config.thresholding:
            return denoised
        return clip_x0(denoised, clip_sample=False, thresholding=True,
                       dynamic_thresholding_ratio=config.dynamic_thresholding_ratio,
                       sample_max_value=config.sample_max_value)

    return dpm_solver.multistep_table(scheduler, levels, x0_columns, x0, sde=config.algorithm_type == "sde-dpmsolver++",
                                      start=start, model_input_scales=[input_scale(s, sigma_data) for s in sigmas[:-1]])


__all__ = ["preconditioning", "input_scale", "edm_euler_step", "edm_euler_table", "edm_dpm_solver_table",
           "multistep_fused_settings", "EDM_PREDICTION_TYPES"]

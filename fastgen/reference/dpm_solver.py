"""DPM-Solver++ (1S / 2M) and its SDE variant in float64, written to be read beside the papers, and the
StepTable builder of diffusers' DPMSolverMultistepScheduler.

    [Lu22a] Lu, Zhou, Bao, Chen, Li, Zhu 2022, "DPM-Solver: A Fast ODE Solver for Diffusion
            Probabilistic Model Sampling in Around 10 Steps", arXiv 2206.00927
    [Lu22b] Lu, Zhou, Bao, Chen, Li, Zhu 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
            Diffusion Probabilistic Models", arXiv 2211.01095 (eq. 8, Alg. 1 and 2)
    [Imagen] Saharia et al. 2022, arXiv 2205.11487 (dynamic thresholding, section 2.3)

Notation: x_t = alpha_t x0 + sigma_t eps (variance preserving), lambda_t = log(alpha_t / sigma_t)
the half log-SNR, h = lambda_t - lambda_s > 0 a step's length in lambda. diffusers keeps the noise
level as sigma = sigma_t / alpha_t (its ``sigmas``, N + 1 float32 values, the last 0 or sigma_min),
so alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha_t; with ``use_flow_sigmas`` (rectified-flow
models) alpha_t = 1 - sigma, sigma_t = sigma. The solvers integrate the data prediction
x_theta(x_t, t) = x0, which the model output F gives as

    epsilon          x0 = (x - sigma_t F) / alpha_t
    sample           x0 = F
    v_prediction     x0 = alpha_t x - sigma_t F
    flow_prediction  x0 = x - sigma F
    thresholding:    x0 <- clamp(x0, -s, s) / s, s the per-sample quantile of |x0| in [1, max]  [Imagen]

Every step is affine in (x, x0, the previous step's x0, z), which is what the builder writes down as
the fused step's coefficient rows (kernels/samplers.py: D = x0 = clip(CX x + CF F), x_t = AX x + AD D
+ AP D' + NOISE z).
"""
import math

import numpy as np

from fastgen import _checks
from fastgen.reference.diffusion import clip_x0
from fastgen.step_table import host_sigmas, require_timesteps, scheduler_table, table_builder

ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++")
SOLVER_ORDERS = (1, 2)
SOLVER_TYPES = ("midpoint", "heun")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


def alpha_sigma(sigma, flow=False):
    """(alpha_t, sigma_t) of diffusers' sigma (module docstring)."""
    if flow:
        return 1.0 - sigma, sigma
    alpha = 1.0 / math.sqrt(sigma ** 2 + 1)
    return alpha, sigma * alpha


def half_log_snr(alpha, sigma_t):
    """lambda_t = log alpha_t - log sigma_t ([Lu22a] sec. 3.1); +inf at sigma_t = 0 (the clean end)."""
    with np.errstate(divide="ignore"):
        return float(np.log(np.float64(alpha)) - np.log(np.float64(sigma_t)))


def data_prediction(model_output, x, sigma, prediction_type, *, flow=False, thresholding=None):
    """x_theta = x0 from the model output (module docstring); ``thresholding``: None or
    (ratio, max_value) of dynamic thresholding."""
    alpha, sigma_t = alpha_sigma(sigma, flow)
    if prediction_type == "epsilon":
        x0 = (x - sigma_t * model_output) / alpha
    elif prediction_type == "sample":
        x0 = model_output
    elif prediction_type == "v_prediction":
        x0 = alpha * x - sigma_t * model_output
    else:  # flow_prediction
        x0 = x - sigma * model_output
    if thresholding is not None:
        x0 = clip_x0(x0, clip_sample=False, thresholding=True, dynamic_thresholding_ratio=thresholding[0],
                     sample_max_value=thresholding[1])
    return x0


def dpm_solver_pp_step(x, x0, x0_prev, *, s, t, s_prev=None, order=1, solver_type="midpoint", sde=False,
                       noise=None):
    """One DPM-Solver++ step from s to t (each an (alpha, sigma_t, lambda) triple; s_prev: the step
    before s, for order 2). h = lambda_t - lambda_s, r = (lambda_s - lambda_s_prev) / h.

    ODE ([Lu22b] eq. 8 with x_theta constant, Alg. 1's first step; Alg. 2 for 2M):
        order 1:  x_t = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) x0                         (DDIM)
        order 2:  x_t = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) x0
                        - 0.5 alpha_t (e^-h - 1) D1                         "midpoint"  [Lu22b] Alg. 2
                        + alpha_t ((e^-h - 1) / h + 1) D1                   "heun" (the first-order
                                                                            Taylor term of x_theta)
                  D1 = (x0 - x0_prev) / r
    SDE (the data-prediction SDE, its linear part and the noise integrated exactly; [Lu22b] sec. 5's
    SDE-DPM-Solver++, 2M with the same correction):
        order 1:  x_t = (sigma_t / sigma_s) e^-h x + alpha_t (1 - e^-2h) x0 + sigma_t sqrt(1 - e^-2h) z
        order 2:  ... + 0.5 alpha_t (1 - e^-2h) D1                          "midpoint"
                      + alpha_t ((1 - e^-2h) / (-2h) + 1) D1                "heun"
    """
    (alpha_s, sigma_s, lambda_s), (alpha_t, sigma_t, lambda_t) = s, t
    with np.errstate(all="ignore"):  # IEEE arithmetic, as diffusers' tensors: h = 0 gives inf / NaN, not an error
        h = np.float64(lambda_t) - lambda_s
        r = (lambda_s - s_prev[2]) / h if order == 2 else None
        if not sde:
            a_x, a_0 = sigma_t / np.float64(sigma_s), -(alpha_t * (np.exp(-h) - 1.0))
            a_1 = (-0.5 * (alpha_t * (np.exp(-h) - 1.0)) if solver_type == "midpoint"
                   else alpha_t * ((np.exp(-h) - 1.0) / h + 1.0))
        else:
            a_x, a_0 = sigma_t / np.float64(sigma_s) * np.exp(-h), alpha_t * (1 - np.exp(-2.0 * h))
            a_1 = (0.5 * (alpha_t * (1 - np.exp(-2.0 * h))) if solver_type == "midpoint"
                   else alpha_t * ((1.0 - np.exp(-2.0 * h)) / (-2.0 * h) + 1.0))
        noise_scale = sigma_t * np.sqrt(1.0 - np.exp(-2.0 * h)) if sde else 0.0
    x_t = float(a_x) * x + float(a_0) * x0
    if order == 2:
        x_t = x_t + float(a_1) * ((x0 - x0_prev) / float(r))  # a_1 D1, D1 = (x0 - x0_prev) / r
    return x_t + float(noise_scale) * noise if noise_scale else x_t


def step_orders(num_steps, *, solver_order, lower_order_final, euler_at_final, final_sigmas_type, start=0):
    """The order diffusers' step uses at each step index of a run that starts at ``start``: 1 at the
    run's first step (no previous x0) and, at the last step, with euler_at_final, with lower_order_final
    and fewer than 15 steps, or with a final sigma of 0 (its lambda is infinite); else solver_order."""
    orders = []
    for i in range(num_steps):
        final = i == num_steps - 1 and (euler_at_final or (lower_order_final and num_steps < 15)
                                        or final_sigmas_type == "zero")
        orders.append(1 if solver_order == 1 or i <= start or final else 2)
    return orders


def fused_settings(config):
    """The reason diffusers' DPMSolverMultistepScheduler ``config`` has no fused table, or None where
    it has one (the builder's checks, which name the allowed values)."""
    try:
        _settings(config)
    except ValueError as error:
        return str(error)
    return None


def check_solver(config, prediction_types):
    """ValueError unless a DPM-Solver++ config has a fused table: its algorithm, order, solver type,
    final sigmas and prediction type (one of ``prediction_types``) among the allowed values."""
    _checks.choice(config.algorithm_type, "algorithm_type", ALGORITHM_TYPES)
    if config.solver_order not in SOLVER_ORDERS:
        raise ValueError(f"solver_order must be one of {', '.join(map(str, SOLVER_ORDERS))}, got "
                         f"{config.solver_order!r}")
    _checks.choice(config.solver_type, "solver_type", SOLVER_TYPES)
    _checks.choice(config.prediction_type, "prediction_type", prediction_types)
    _checks.choice(config.final_sigmas_type, "final_sigmas_type", FINAL_SIGMAS_TYPES)


def _settings(config):
    check_solver(config, PREDICTION_TYPES)
    if config.variance_type is not None:
        raise ValueError(f"variance_type must be None (a model output like the sample), got {config.variance_type!r}")
    return dict(sde=config.algorithm_type == "sde-dpmsolver++", flow=bool(config.use_flow_sigmas),
                thresholding=((config.dynamic_thresholding_ratio, config.sample_max_value) if config.thresholding
                              else None))


def _x0_columns(prediction_type, sigma, alpha, sigma_t):
    """x0 = CX x + CF F (module docstring) as coefficients."""
    return {"epsilon": dict(cx=1.0 / alpha, cf=-sigma_t / alpha), "sample": dict(cx=0.0, cf=1.0),
            "v_prediction": dict(cx=alpha, cf=-sigma_t), "flow_prediction": dict(cx=1.0, cf=-sigma)}[prediction_type]


@table_builder("DPMSolverMultistepScheduler")
def dpm_solver_table(scheduler, *, start=0):
    """The StepTable of diffusers' DPMSolverMultistepScheduler after ``set_timesteps``, for a run whose
    first step is step ``start`` (diffusers' begin index; that step is first order). algorithm_type
    "dpmsolver++" or "sde-dpmsolver++", solver_order 1 or 2, either solver_type, every sigma option of
    diffusers' set_timesteps (Karras, Lu lambdas, exponential, beta, flow sigmas), both final sigmas,
    lower_order_final, euler_at_final, thresholding. Derivation from ``dpm_solver_pp_step``, per step i
    from s = sigma_i to t = sigma_i+1 (c = alpha_t (1 - e^-h), ODE; c = alpha_t (1 - e^-2h), SDE):

        AX = sigma_t / sigma_s  (ODE)   |  (sigma_t / sigma_s) e^-h   (SDE)
        order 1:  AD = c,  AP = 0
        order 2:  x0 + D1 / 2 = (1 + 1 / 2r) x0 - x0_prev / 2r                         midpoint:
                      AD = c (1 + 1 / 2r),  AP = -c / 2r
                  heun, with e = alpha_t ((e^-h - 1) / h + 1)   (SDE: alpha_t ((1 - e^-2h) / (-2h) + 1)):
                      AD = c + e / r,  AP = -e / r
        NOISE = sigma_t sqrt(1 - e^-2h)  (SDE; 0 for the ODE)

    1 - e^-h is formed as -expm1(-h) (no cancellation for short steps). At a final sigma of 0
    (lambda = inf: h = inf, e^-h = 0) the step is first order and lands on x0. diffusers' SDE step
    draws from its generator at every step."""
    require_timesteps(scheduler)
    config = scheduler.config
    settings = _settings(config)
    sigmas = _run_sigmas(scheduler)
    levels = [(alpha, sigma_t, half_log_snr(alpha, sigma_t))
              for alpha, sigma_t in (alpha_sigma(sigma, settings["flow"]) for sigma in sigmas)]

    def x0_columns(i):
        return _x0_columns(config.prediction_type, sigmas[i], levels[i][0], levels[i][1])

    def x0(i, f, x):
        return data_prediction(f, x, sigmas[i], config.prediction_type, flow=settings["flow"],
                               thresholding=settings["thresholding"])

    return multistep_table(scheduler, levels, x0_columns, x0, sde=settings["sde"], start=start)


def multistep_table(scheduler, levels, x0_columns, x0, *, sde, start=0, model_input_scales=None):
    """The DPM-Solver++ (2M) StepTable of ``scheduler``'s run (``dpm_solver_table``'s derivation) on its
    noise levels (alpha_i, sigma_i, lambda_i), i = 0 .. N: the same update for every parameterisation
    of x, which brings its own data prediction x0 = CX x + CF F (``x0_columns(i)``; ``x0(i, f, x)`` for
    the float64 reference)."""
    config = scheduler.config
    start = _checks.nonneg_int(start, "start")
    n = len(scheduler.timesteps)
    orders = step_orders(n, solver_order=config.solver_order, lower_order_final=config.lower_order_final,
                         euler_at_final=config.euler_at_final, final_sigmas_type=config.final_sigmas_type, start=start)
    rows = []
    for i in range(n):
        (alpha_s, sigma_s, lambda_s), (alpha_t, sigma_t, lambda_t) = levels[i], levels[i + 1]
        with np.errstate(all="ignore"):  # IEEE arithmetic (h = 0 where sigmas repeat), as diffusers' tensors
            h = np.float64(lambda_t) - lambda_s
            decay = 2.0 * h if sde else h
            c = alpha_t * -np.expm1(-decay)
            row = dict(x0_columns(i), ax=sigma_t / np.float64(sigma_s) * (np.exp(-h) if sde else 1.0), ad=c)
            if orders[i] == 2:
                r = (lambda_s - levels[i - 1][2]) / h
                if config.solver_type == "midpoint":
                    row.update(ad=c * (1.0 + 0.5 / r), ap=-0.5 * c / r)
                else:
                    e = alpha_t * (1.0 + np.expm1(-decay) / decay)  # (e^-d - 1) / d + 1, d = h (ODE) or 2h (SDE)
                    row.update(ad=c + e / r, ap=-e / r)
            if sde:
                row["noise"] = sigma_t * np.sqrt(-np.expm1(-2.0 * h))
        rows.append({name: float(value) for name, value in row.items()})

    def reference(i, f, x, prev, z):
        data = x0(i, f, x)
        x_t = dpm_solver_pp_step(x, data, prev, s=levels[i], t=levels[i + 1], s_prev=levels[i - 1] if i else None,
                                 order=orders[i], solver_type=config.solver_type, sde=sde, noise=z)
        return x_t, data

    clip = dict(clip="threshold", dynamic_thresholding_ratio=config.dynamic_thresholding_ratio,
                sample_max_value=config.sample_max_value) if config.thresholding else {}
    return scheduler_table(scheduler, config.algorithm_type, rows, reference, generator_draws=[sde] * n,
                           model_input_scales=model_input_scales, init_noise_sigma=float(scheduler.init_noise_sigma),
                           reads_previous=2 in orders, **clip)


def dpm_solver_2s_step(x_s1, x0_s1, x0_s0, *, s1, s0, t, solver_type="midpoint"):
    """The second stage of singlestep DPM-Solver++(2S) ([Lu22b] Alg. 1, data prediction): from x at
    s1 (the pair's start), with the data predictions at s1 and at the intermediate s0 (each an
    (alpha, sigma_t, lambda) triple), h = lambda_t - lambda_s1, r0 = (lambda_s0 - lambda_s1) / h:

        D0 = x0_s1,  D1 = (x0_s0 - x0_s1) / r0
        x_t = (sigma_t / sigma_s1) x_s1 - alpha_t (e^-h - 1) D0 - 0.5 alpha_t (e^-h - 1) D1       midpoint
        x_t = (sigma_t / sigma_s1) x_s1 - alpha_t (e^-h - 1) D0 + alpha_t ((e^-h - 1) / h + 1) D1   heun
    """
    (alpha_s1, sigma_s1, lambda_s1), (_, _, lambda_s0), (alpha_t, sigma_t, lambda_t) = s1, s0, t
    with np.errstate(all="ignore"):
        h = np.float64(lambda_t) - lambda_s1
        r0 = (lambda_s0 - lambda_s1) / h
        a_1 = (-0.5 * alpha_t * (np.exp(-h) - 1.0) if solver_type == "midpoint"
               else alpha_t * ((np.exp(-h) - 1.0) / h + 1.0))
        a_x, a_0 = sigma_t / np.float64(sigma_s1), -(alpha_t * (np.exp(-h) - 1.0))
    return float(a_x) * x_s1 + float(a_0) * x0_s1 + float(a_1) * ((x0_s0 - x0_s1) / float(r0))


def singlestep_orders(num_steps, *, solver_order, lower_order_final, final_sigmas_type, start=0):
    """The order diffusers' DPMSolverSinglestepScheduler uses at each step index (its get_order_list:
    pairs [1, 2], the last one first order with lower_order_final or a final sigma of 0), a run from
    step ``start`` beginning with a first-order step (diffusers: no earlier model output yet)."""
    if solver_order == 1:
        orders = [1] * num_steps
    elif lower_order_final:
        orders = [1, 2] * (num_steps // 2 - 1) + [1, 1] if num_steps % 2 == 0 else [1, 2] * (num_steps // 2) + [1]
    else:
        orders = [1, 2] * (num_steps // 2)
    if final_sigmas_type == "zero":
        orders[-1] = 1
    return [1 if i == start else order for i, order in enumerate(orders)]


@table_builder("DPMSolverSinglestepScheduler")
def dpm_solver_singlestep_table(scheduler, *, start=0):
    """The StepTable of diffusers' DPMSolverSinglestepScheduler after ``set_timesteps`` (algorithm_type
    "dpmsolver++", solver_order 1 or 2, either solver_type; run from step ``start``). A first-order step
    is DPM-Solver++'s first-order step (``dpm_solver_table``'s rows). A second-order step i ends the
    pair begun at step i - 1 (s1 = sigma_i-1, s0 = sigma_i, t = sigma_i+1): diffusers' update reads the
    pair's start x_s1, which the pair's first-order step maps to this step's x as
    x = (sigma_s0 / sigma_s1) x_s1 + c0 D',  c0 = alpha_s0 (1 - e^-h0), h0 = lambda_s0 - lambda_s1,
    so with c = alpha_t (1 - e^-h), h = lambda_t - lambda_s1, r0 = h0 / h, q = sigma_t / sigma_s0
    and e = c / 2 (midpoint) or alpha_t ((e^-h - 1) / h + 1) (heun):

        AX = q,   AD = e / r0,   AP = c - e / r0 - q c0

    (D = x0 at step i, D' = x0 at step i - 1). "sde-dpmsolver++" (whose first stage adds noise, so x_s1
    is not a function of x and D') and order 3 run diffusers' own step."""
    require_timesteps(scheduler)
    config = scheduler.config
    settings = _settings(config)
    if settings["sde"]:
        raise ValueError("algorithm_type must be 'dpmsolver++' for a fused singlestep table, got 'sde-dpmsolver++'")
    start = _checks.nonneg_int(start, "start")
    sigmas = _run_sigmas(scheduler)
    n = len(scheduler.timesteps)
    orders = singlestep_orders(n, solver_order=config.solver_order, lower_order_final=config.lower_order_final,
                               final_sigmas_type=config.final_sigmas_type, start=start)
    levels = [(alpha, sigma_t, half_log_snr(alpha, sigma_t))
              for alpha, sigma_t in (alpha_sigma(sigma, settings["flow"]) for sigma in sigmas)]
    rows = []
    for i in range(n):
        (alpha_s0, sigma_s0, lambda_s0), (alpha_t, sigma_t, lambda_t) = levels[i], levels[i + 1]
        row = _x0_columns(config.prediction_type, sigmas[i], alpha_s0, sigma_s0)
        with np.errstate(all="ignore"):  # IEEE arithmetic, as diffusers' tensors
            if orders[i] == 1:
                h = np.float64(lambda_t) - lambda_s0
                row.update(ax=sigma_t / np.float64(sigma_s0), ad=alpha_t * -np.expm1(-h))
            else:
                lambda_s1 = levels[i - 1][2]
                h, h0 = np.float64(lambda_t) - lambda_s1, np.float64(lambda_s0) - lambda_s1
                r0, c, c0 = h0 / h, alpha_t * -np.expm1(-h), alpha_s0 * -np.expm1(-h0)
                e = 0.5 * c if config.solver_type == "midpoint" else alpha_t * (1.0 + np.expm1(-h) / h)
                q = sigma_t / np.float64(sigma_s0)
                row.update(ax=q, ad=e / r0, ap=c - e / r0 - q * c0)
        rows.append({name: float(value) for name, value in row.items()})

    def reference(i, f, x, prev, z):
        x0 = data_prediction(f, x, sigmas[i], config.prediction_type, flow=settings["flow"],
                             thresholding=settings["thresholding"])
        if orders[i] == 1:
            return dpm_solver_pp_step(x, x0, None, s=levels[i], t=levels[i + 1]), x0
        s1, s0 = levels[i - 1], levels[i]
        with np.errstate(all="ignore"):  # the pair's start, from its first-order step (a DPM-Solver++ step)
            c0 = s0[0] * -np.expm1(-(np.float64(s0[2]) - s1[2]))
        x_s1 = (x - float(c0) * prev) * float(s1[1] / np.float64(s0[1]))
        return dpm_solver_2s_step(x_s1, prev, x0, s1=s1, s0=s0, t=levels[i + 1], solver_type=config.solver_type), x0

    clip = dict(clip="threshold", dynamic_thresholding_ratio=config.dynamic_thresholding_ratio,
                sample_max_value=config.sample_max_value) if config.thresholding else {}
    return scheduler_table(scheduler, "dpmsolver++ singlestep", rows, reference, generator_draws=[False] * n,
                           init_noise_sigma=float(scheduler.init_noise_sigma), reads_previous=2 in orders, **clip)


def singlestep_fused_settings(config):
    """None where diffusers' DPMSolverSinglestepScheduler ``config`` has a fused table; else why not."""
    try:
        if _settings(config)["sde"]:
            raise ValueError("algorithm_type 'sde-dpmsolver++' steps with diffusers' own step (its first stage adds "
                             "noise)")
    except ValueError as error:
        return str(error)
    return None


def _run_sigmas(scheduler) -> list:
    """The N + 1 sigmas of the run (host floats)."""
    sigmas = host_sigmas(scheduler).tolist()
    n = len(scheduler.timesteps)
    if len(sigmas) != n + 1:
        raise ValueError(f"the scheduler must have one sigma more than timesteps, got {len(sigmas)} sigmas for "
                         f"{n} timesteps")
    return sigmas


__all__ = ["alpha_sigma", "half_log_snr", "data_prediction", "dpm_solver_pp_step", "step_orders", "fused_settings",
           "dpm_solver_table", "multistep_table", "dpm_solver_2s_step", "singlestep_orders",
           "dpm_solver_singlestep_table", "singlestep_fused_settings", "ALGORITHM_TYPES", "SOLVER_ORDERS",
           "SOLVER_TYPES", "PREDICTION_TYPES"]

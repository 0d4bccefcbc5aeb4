"""DEIS (the multistep exponential integrator in log-rho, orders 1 and 2) in float64, written to be read
beside the paper, and the StepTable builder of diffusers' DEISMultistepScheduler.

    [Zhang23] Zhang, Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator",
              ICLR 2023, arXiv 2204.13902 (sec. 4: the exponential integrator, rho-AB-DEIS, eq. 14-15)

Notation: x_t = alpha_t x0 + sigma_t eps (variance preserving), rho_t = sigma_t / alpha_t (diffusers'
``sigmas``; with ``use_flow_sigmas`` alpha_t = 1 - sigma, sigma_t = sigma). The probability-flow ODE in
y = x / alpha and rho is dy / drho = eps(x, t) ([Zhang23] eq. 13, the exponential integrator's change of
variables), so from s to t

    y_t = y_s + integral_{rho_s}^{rho_t} eps(rho) drho.

The model's eps is known at the solver's past points rho_s0 (this step), rho_s1 (the step before); DEIS
extrapolates it by the Lagrange polynomial through them in log rho and integrates that exactly:

    order 1:  eps(rho) = eps_0                                       (DDIM)
    order 2:  eps(rho) = eps_0 l_0(rho) + eps_1 l_1(rho),   l_0 = (log rho - log rho_s1) / (log rho_s0 - log rho_s1),
                                                            l_1 = (log rho - log rho_s0) / (log rho_s1 - log rho_s0)

eps comes from the model output F through the data prediction (diffusers' ``convert_model_output``):
x0 from F as in fastgen/reference/dpm_solver.py (epsilon, sample, v_prediction, flow_prediction,
dynamic thresholding), then eps = (x - alpha_s x0) / sigma_s.

Every step is affine in (x, x0, the previous step's eps): the fused step keeps eps as its "denoised"
output D = (x - alpha_s x0) / sigma_s (kernels/samplers.py: D = DX x + D0 x0) and reads it back as D'.
"""
import numpy as np

from fastgen import _checks
from fastgen.reference.dpm_solver import PREDICTION_TYPES, _run_sigmas, _x0_columns, alpha_sigma, data_prediction
from fastgen.step_table import require_timesteps, scheduler_table, table_builder

SOLVER_ORDERS = (1, 2)
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(32)


def _integral(fn, lo, hi):
    """integral_{lo}^{hi} fn(rho) drho in u = log rho (fn(e^u) e^u is smooth in u): Gauss-Legendre, 32 nodes."""
    a, b = np.log(lo), np.log(hi)
    u = 0.5 * (b - a) * _NODES + 0.5 * (b + a)
    return float(0.5 * (b - a) * np.sum(_WEIGHTS * fn(np.exp(u)) * np.exp(u)))


def deis_step(x, eps, eps_prev, *, s, t, s_prev=None, order=1):
    """One DEIS step from s to t ([Zhang23] eq. 14-15; module docstring); s, t, s_prev: (alpha, sigma_t)
    pairs. The integrals of the Lagrange basis are evaluated by quadrature, not in closed form."""
    (alpha_s, sigma_s), (alpha_t, sigma_t) = s, t
    rho_s, rho_t = sigma_s / alpha_s, sigma_t / alpha_t
    if rho_s == rho_t:  # a repeated sigma: no step
        return alpha_t / alpha_s * x
    y_t = x / alpha_s
    if order == 1:
        y_t = y_t + (rho_t - rho_s) * eps
    else:
        rho_p = s_prev[1] / s_prev[0]
        log_s, log_p = np.log(rho_s), np.log(rho_p)
        w0 = _integral(lambda r: (np.log(r) - log_p) / (log_s - log_p), rho_s, rho_t)
        w1 = _integral(lambda r: (np.log(r) - log_s) / (log_p - log_s), rho_s, rho_t)
        y_t = y_t + w0 * eps + w1 * eps_prev
    return alpha_t * y_t


def step_orders(num_steps, *, solver_order, lower_order_final, start=0):
    """The order diffusers' step uses at each step index of a run that starts at ``start``: 1 at the
    run's first step (no previous eps) and at the last one with lower_order_final and fewer than 15
    steps; else solver_order."""
    final = lower_order_final and num_steps < 15
    return [1 if solver_order == 1 or i <= start or (final and i == num_steps - 1) else 2 for i in range(num_steps)]


def fused_settings(config):
    """The reason diffusers' DEISMultistepScheduler ``config`` has no fused table, or None where it has one."""
    try:
        _check(config)
    except ValueError as error:
        return str(error)
    return None


def _check(config):
    if config.solver_order not in SOLVER_ORDERS:
        raise ValueError(f"solver_order must be one of {', '.join(map(str, SOLVER_ORDERS))}, got "
                         f"{config.solver_order!r}")
    _checks.choice(config.prediction_type, "prediction_type", PREDICTION_TYPES)


@table_builder("DEISMultistepScheduler")
def deis_table(scheduler, *, start=0):
    """The StepTable of diffusers' DEISMultistepScheduler after ``set_timesteps``, for a run whose first
    step is step ``start`` (first order). solver_order 1 or 2, every prediction type, thresholding,
    every sigma option of diffusers' set_timesteps (Karras, exponential, beta, flow sigmas). From
    ``deis_step``, per step i from s = sigma_i to t = sigma_i+1, with D = eps = (x - alpha_s x0) / sigma_s:

        DX = 1 / sigma_s,  D0 = -alpha_s / sigma_s,  AX = alpha_t / alpha_s
        order 1:  AD = alpha_t (rho_t - rho_s)
        order 2:  AD = alpha_t (F(rho_t; rho_s0, rho_s1) - F(rho_s0; rho_s0, rho_s1)),
                  AP = alpha_t (F(rho_t; rho_s1, rho_s0) - F(rho_s0; rho_s1, rho_s0)),
                  F(r; b, c) = r (log r - log c - 1) / (log b - log c), the antiderivative of the basis
                  polynomial (log r - log c) / (log b - log c)

    A repeated sigma (the Karras and flow schedules end on one) has rho_t = rho_s: AX = 1, AD = AP = 0."""
    require_timesteps(scheduler)
    config = scheduler.config
    _check(config)
    start = _checks.nonneg_int(start, "start")
    flow = bool(config.use_flow_sigmas)
    sigmas = _run_sigmas(scheduler)
    levels = [alpha_sigma(sigma, flow) for sigma in sigmas]
    rhos = [sigma_t / alpha for alpha, sigma_t in levels]
    n = len(scheduler.timesteps)
    orders = step_orders(n, solver_order=config.solver_order, lower_order_final=config.lower_order_final,
                         start=start)

    def antiderivative(r, b, c):
        return r * (np.log(r) - np.log(c) - 1.0) / (np.log(b) - np.log(c))

    rows = []
    for i in range(n):
        (alpha_s, sigma_s), (alpha_t, _) = levels[i], levels[i + 1]
        rho_s, rho_t = rhos[i], rhos[i + 1]
        row = dict(_x0_columns(config.prediction_type, sigmas[i], alpha_s, sigma_s), dx=1.0 / sigma_s,
                   d0=-alpha_s / sigma_s, ax=alpha_t / alpha_s)
        if rho_t != rho_s:
            if orders[i] == 1:
                row["ad"] = alpha_t * (rho_t - rho_s)
            else:
                rho_p = rhos[i - 1]
                row["ad"] = alpha_t * (antiderivative(rho_t, rho_s, rho_p) - antiderivative(rho_s, rho_s, rho_p))
                row["ap"] = alpha_t * (antiderivative(rho_t, rho_p, rho_s) - antiderivative(rho_s, rho_p, rho_s))
        rows.append({name: float(value) for name, value in row.items()})

    thresholding = (config.dynamic_thresholding_ratio, config.sample_max_value) if config.thresholding else None

    def reference(i, f, x, prev, z):
        alpha_s, sigma_s = levels[i]
        x0 = data_prediction(f, x, sigmas[i], config.prediction_type, flow=flow, thresholding=thresholding)
        eps = (x - alpha_s * x0) / sigma_s
        x_t = deis_step(x, eps, prev, s=levels[i], t=levels[i + 1], s_prev=levels[i - 1] if i else None,
                        order=orders[i])
        return x_t, eps

    clip = dict(clip="threshold", dynamic_thresholding_ratio=config.dynamic_thresholding_ratio,
                sample_max_value=config.sample_max_value) if config.thresholding else {}
    return scheduler_table(scheduler, "deis", rows, reference, generator_draws=[False] * n,
                           init_noise_sigma=float(scheduler.init_noise_sigma), reads_previous=2 in orders, **clip)


__all__ = ["deis_step", "step_orders", "fused_settings", "deis_table", "SOLVER_ORDERS", "PREDICTION_TYPES"]

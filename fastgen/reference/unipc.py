"""UniPC (the unified predictor-corrector multistep solver) in float64, written to be read beside the
paper, and the StepTable builder of diffusers' UniPCMultistepScheduler.

    [Zhao23] Zhao, Bai, Rao, Zhou, Lu 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast
             Sampling of Diffusion Models", NeurIPS 2023, arXiv 2302.04867 (Alg. 1 UniC, Alg. 2 UniP,
             eq. 6-8: the B(h) variants bh1 = h, bh2 = e^h - 1)

Notation as fastgen/reference/dpm_solver.py: x_t = alpha_t x0 + sigma_t eps, lambda_t = log(alpha_t /
sigma_t). The model's output becomes m = x0 (``predict_x0``, the data prediction, thresholding
included) or m = eps. From s0 to t, h = lambda_t - lambda_s0 (hh = -h for x0, h for eps), with the
earlier outputs m_k at s_k, r_k = (lambda_s_k - lambda_s0) / h and D_k = (m_k - m0) / r_k:

    x0:   x_t = (sigma_t / sigma_s0) x - alpha_t (e^hh - 1) m0 - alpha_t B(h) sum_k rho_k D_k
    eps:  x_t = (alpha_t / alpha_s0) x - sigma_t (e^hh - 1) m0 - sigma_t B(h) sum_k rho_k D_k

UniP (the predictor, order p): the sum over the p - 1 earlier outputs, rho = 1/2 for p = 2, else the
solution of R rho = g on the first p - 1 rows ([Zhao23] Alg. 2; R_jk = r_k^(j-1), g_j = the phi
functions' weights). UniC (the corrector, order p of the step it corrects): the same step taken
again from the previous sample with the new output m_t at t included as one more D = m_t - m0
(r = 1), rho solving the full p x p system (rho = 1/2 for p = 1) ([Zhao23] Alg. 1). diffusers' step i:

    1. m_i from the model output at the sample it was handed, x_i (before any correction)
    2. x_i^c = UniC(x_i-1^c, m_i-1 (m0), the earlier m, m_i) when the run has a previous step
       (and i - 1 is not in disable_corrector); else x_i^c = x_i
    3. x_i+1 = UniP(x_i^c, m_i (m0), m_i-1, ...)

The corrector's start x_i-1^c is the sample the previous predictor stepped from; it is not kept:
inverting that predictor (affine in it, with a nonzero factor) gives it from x_i and the outputs.
So every step is affine in (x_i, m_i, m_i-1, ..., m_i-p): the fused step keeps m as its "denoised"
output D and reads the last p back from its history ring.
"""
import math

import numpy as np

from fastgen import _checks
from fastgen.reference.dpm_solver import PREDICTION_TYPES, _run_sigmas, _x0_columns, alpha_sigma, data_prediction, \
    half_log_snr
from fastgen.step_table import require_timesteps, scheduler_table, table_builder

SOLVER_TYPES = ("bh1", "bh2")
MAX_FUSED_ORDER = 4  # the ring holds 4 earlier outputs (kernels/samplers.py's AP .. AP4)


def unipc_weights(lambdas, lambda_t, *, order, predict_x0, solver_type, corrector):
    """(e^hh - 1, B(h), r_1..r_p-1, rho) of a UniP / UniC step of ``order`` from lambdas[0] = lambda_s0,
    lambdas[k] = lambda_s_k of the earlier outputs ([Zhao23] Alg. 1-2, module docstring)."""
    h = lambda_t - lambdas[0]
    if h == 0:  # a repeated sigma (Karras sigmas end on one): no move, x_t = x
        return 0.0, 0.0, [1.0] * (order - 1), [0.0] * order
    rks = [np.float64(lam - lambdas[0]) / h for lam in lambdas[1:order]]
    hh = -h if predict_x0 else h
    h_phi_1 = math.expm1(hh)
    b_h = hh if solver_type == "bh1" else math.expm1(hh)
    r_all = np.array(rks + [1.0])
    rows, weights = [], []
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    for i in range(1, order + 1):
        rows.append(r_all ** (i - 1))
        weights.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    system, weights = np.array(rows), np.array(weights)
    if corrector:
        rho = [0.5] if order == 1 else _solve(system, weights)
    else:
        rho = [] if order == 1 else [0.5] if order == 2 else _solve(system[:-1, :-1], weights[:-1])
    return h_phi_1, b_h, rks, rho


def _solve(system, weights):
    """R rho = g; NaN where R is singular (two earlier outputs at one noise level: diffusers' D_k divide
    by r_k = 0 there too)."""
    try:
        with np.errstate(all="ignore"):
            return list(np.linalg.solve(system, weights))
    except np.linalg.LinAlgError:
        return [float("nan")] * len(weights)


def unipc_update(x, m0, earlier, rks, rho, h_phi_1, b_h, scale_x, scale_m, m_t=None):
    """scale_x x - scale_m (e^hh - 1) m0 - scale_m B(h) (sum_k rho_k D_k [+ rho_last (m_t - m0)]);
    earlier: the outputs m_1.. at r_1.. (D_k = (m_k - m0) / r_k); m_t: the corrector's new output."""
    corrections = [r * (m - m0) / rk for r, m, rk in zip(rho, earlier, rks)]
    if m_t is not None:
        corrections.append(rho[-1] * (m_t - m0))
    x_t = scale_x * x - scale_m * h_phi_1 * m0
    return x_t - scale_m * b_h * sum(corrections) if corrections else x_t  # none: no B(h) term (bh1's is -inf at sigma 0)


def step_orders(num_steps, *, solver_order, lower_order_final, start=0):
    """diffusers' predictor order at each step index of a run that starts at ``start``."""
    orders = []
    for i in range(num_steps):
        order = min(solver_order, num_steps - i) if lower_order_final else solver_order
        orders.append(min(order, i - start + 1) if i >= start else 1)
    return orders


def fused_settings(config):
    """Why a UniPCMultistepScheduler ``config`` has no fused table, or None where it has one."""
    if config.solver_order > MAX_FUSED_ORDER:
        return f"solver_order {config.solver_order}: the fused step keeps at most {MAX_FUSED_ORDER} earlier outputs"
    if config.solver_type not in SOLVER_TYPES:
        return f"solver_type must be one of {', '.join(map(repr, SOLVER_TYPES))}, got {config.solver_type!r}"
    if not config.predict_x0 and config.prediction_type == "flow_prediction":
        return "predict_x0=False with flow_prediction (diffusers' step refuses it)"
    return None


def _check(scheduler):
    reason = fused_settings(scheduler.config)
    if reason:
        raise ValueError(reason)
    if getattr(scheduler, "solver_p", None) is not None:
        raise ValueError("solver_p: the predictor is another scheduler's step, which runs diffusers' own step")
    _checks.choice(scheduler.config.prediction_type, "prediction_type", PREDICTION_TYPES)


class _Run:
    """The scalars of a run: per step index j, (alpha_j, sigma_j), lambda_j and the predictor's scales."""

    def __init__(self, scheduler, start):
        config = scheduler.config
        self.flow = bool(config.use_flow_sigmas)
        self.sigmas = _run_sigmas(scheduler)
        self.levels = [alpha_sigma(sigma, self.flow) for sigma in self.sigmas]
        self.lambdas = [half_log_snr(*level) for level in self.levels]
        self.predict_x0, self.solver_type = bool(config.predict_x0), config.solver_type
        n = len(scheduler.timesteps)
        self.orders = step_orders(n, solver_order=config.solver_order, lower_order_final=config.lower_order_final,
                                  start=start)
        disabled = set(config.disable_corrector or ())
        self.corrects = [i > start and (i - 1) not in disabled for i in range(n)]

    def scales(self, s0, t):
        """(scale_x, scale_m) from s0 to t: (sigma_t / sigma_s0, alpha_t) or (alpha_t / alpha_s0, sigma_t)."""
        (alpha_s, sigma_s), (alpha_t, sigma_t) = self.levels[s0], self.levels[t]
        with np.errstate(all="ignore"):  # a step from sigma 0: inf, as diffusers'
            return (float(sigma_t / np.float64(sigma_s)), alpha_t) if self.predict_x0 else \
                (float(alpha_t / np.float64(alpha_s)), sigma_t)

    def predictor(self, i):
        """UniP at step i (from s0 = i to i + 1, earlier outputs i - 1, ..): (weights, (scale_x, scale_m),
        the earlier steps)."""
        order = self.orders[i]
        earlier = [i - k for k in range(1, order)]
        weights = unipc_weights([self.lambdas[j] for j in [i, *earlier]], self.lambdas[i + 1], order=order,
                                predict_x0=self.predict_x0, solver_type=self.solver_type, corrector=False)
        return weights, self.scales(i, i + 1), earlier

    def corrector(self, i):
        """UniC at step i (the step from s0 = i - 1 to i taken again, of that step's order)."""
        order = self.orders[i - 1]
        earlier = [i - 1 - k for k in range(1, order)]
        weights = unipc_weights([self.lambdas[j] for j in [i - 1, *earlier]], self.lambdas[i], order=order,
                                predict_x0=self.predict_x0, solver_type=self.solver_type, corrector=True)
        return weights, self.scales(i - 1, i), earlier


def _affine(weights, scales, m0_step, earlier, m_t_step=None):
    """The update (``unipc_update``) as coefficients: (factor on x, {step j: factor on m_j})."""
    (h_phi_1, b_h, rks, rho), (scale_x, scale_m) = weights, scales
    outputs = {m0_step: -scale_m * h_phi_1}
    for r, j, rk in zip(rho, earlier, rks):
        with np.errstate(all="ignore"):  # r_k = 0 (a repeated noise level): inf / NaN, as diffusers' D_k
            weight = float(scale_m * b_h * r / np.float64(rk))
        outputs[j] = outputs.get(j, 0.0) - weight
        outputs[m0_step] += weight
    if m_t_step is not None:
        outputs[m_t_step] = outputs.get(m_t_step, 0.0) - scale_m * b_h * rho[-1]
        outputs[m0_step] += scale_m * b_h * rho[-1]
    return scale_x, outputs


@table_builder("UniPCMultistepScheduler")
def unipc_table(scheduler, *, start=0):
    """The StepTable of diffusers' UniPCMultistepScheduler after ``set_timesteps``, for a run whose first
    step is step ``start``: solver_order 1 to 4, bh1 / bh2, predict_x0 either way, every prediction type,
    thresholding, lower_order_final, disable_corrector, every sigma option (Karras, exponential, beta,
    flow sigmas), both final sigmas. Per step i, with x^c_i-1 = (x_i - sum_j P'_j m_j) / P'_x from the
    previous predictor (P', ``_affine``):

        x_i^c   = C_x x^c_i-1 + sum_j C_j m_j          (UniC; x_i without a corrector)
        x_i+1   = P_x x_i^c + sum_j P_j m_j            (UniP)

    expanded into AX (on x_i), AD (m_i), AP .. AP4 (m_i-1 .. m_i-4); the x0 row makes m (the data
    prediction with its clipping, or eps), D = m."""
    require_timesteps(scheduler)
    _check(scheduler)
    start = _checks.nonneg_int(start, "start")
    config = scheduler.config
    run = _Run(scheduler, start)
    n = len(scheduler.timesteps)
    columns = ("ad", "ap", "ap2", "ap3", "ap4")
    rows = []
    for i in range(n):
        sample = {"x": 1.0}  # x_i^c as coefficients on x_i and the m_j
        if run.corrects[i]:
            px, previous = _affine(*run.predictor(i - 1)[:2], i - 1, run.predictor(i - 1)[2])
            with np.errstate(all="ignore"):
                last = {"x": float(1.0 / np.float64(px)), **{j: float(-c / np.float64(px)) for j, c in previous.items()}}
            (h_phi_1, b_h, rks, rho), scales, earlier = run.corrector(i)
            cx, corrected = _affine((h_phi_1, b_h, rks, rho), scales, i - 1, earlier, m_t_step=i)
            sample = {key: cx * value for key, value in last.items()}
            for j, c in corrected.items():
                sample[j] = sample.get(j, 0.0) + c
        weights, scales, earlier = run.predictor(i)
        px, predicted = _affine(weights, scales, i, earlier)
        out = {key: px * value for key, value in sample.items()}
        for j, c in predicted.items():
            out[j] = out.get(j, 0.0) + c
        alpha, sigma_t = run.levels[i]
        row = dict(_model_columns(config.prediction_type, run.sigmas[i], alpha, sigma_t, run.predict_x0),
                   ax=out.pop("x"))
        for j, c in out.items():
            row[columns[i - j]] = float(c)
        rows.append(row)

    thresholding = (config.dynamic_thresholding_ratio, config.sample_max_value) \
        if config.thresholding and run.predict_x0 else None

    def model_of(f, x, j):
        if run.predict_x0:
            return data_prediction(f, x, run.sigmas[j], config.prediction_type, flow=run.flow,
                                   thresholding=thresholding)
        alpha, sigma_t = run.levels[j]
        x0 = data_prediction(f, x, run.sigmas[j], config.prediction_type, flow=run.flow)
        return (x - alpha * x0) / sigma_t  # eps

    def reference(i, f, x, prev, z):
        previous = () if prev is None else (prev,) if hasattr(prev, "shape") else tuple(prev)
        m = {i: model_of(f, x, i), **{i - k - 1: d for k, d in enumerate(previous)}}
        sample = x
        if run.corrects[i] and run.scales(i, i + 1)[0] != 0:  # (a step to sigma 0 does not read its sample)
            # x^c_i-1 from inverting the previous predictor, then UniC
            weights, (scale_x, scale_m), earlier = run.predictor(i - 1)
            rest = unipc_update(0.0 * x, m[i - 1], [m[j] for j in earlier], weights[2], weights[3], weights[0],
                                weights[1], scale_x, scale_m)
            last = (x - rest) / scale_x
            weights, (scale_x, scale_m), earlier = run.corrector(i)
            sample = unipc_update(last, m[i - 1], [m[j] for j in earlier], weights[2], weights[3], weights[0],
                                  weights[1], scale_x, scale_m, m_t=m[i])
        weights, (scale_x, scale_m), earlier = run.predictor(i)
        x_next = unipc_update(sample, m[i], [m[j] for j in earlier], weights[2], weights[3], weights[0], weights[1],
                              scale_x, scale_m)
        return x_next, m[i]

    clip = dict(clip="threshold", dynamic_thresholding_ratio=config.dynamic_thresholding_ratio,
                sample_max_value=config.sample_max_value) if thresholding else {}
    return scheduler_table(scheduler, "unipc", rows, reference, generator_draws=[False] * n,
                           init_noise_sigma=float(scheduler.init_noise_sigma), reads_previous=n > 1, **clip)


def _model_columns(prediction_type, sigma, alpha, sigma_t, predict_x0):
    """m = CX x + CF F (DX = 0, D0 = 1 by default): the data prediction, or eps = (x - alpha x0) / sigma_t."""
    x0 = _x0_columns(prediction_type, sigma, alpha, sigma_t)
    if predict_x0:
        return x0
    if prediction_type == "epsilon":
        return dict(cx=0.0, cf=1.0)  # eps itself, no cancellation
    return dict(cx=(1.0 - alpha * x0["cx"]) / sigma_t, cf=-alpha * x0["cf"] / sigma_t)


__all__ = ["unipc_weights", "unipc_update", "step_orders", "fused_settings", "unipc_table", "SOLVER_TYPES",
           "PREDICTION_TYPES", "MAX_FUSED_ORDER"]

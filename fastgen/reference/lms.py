"""The linear multistep method (LMS) in sigma space in float64, written to be read beside the textbook
method, and the StepTable builder of diffusers' LMSDiscreteScheduler.

    [Karras] Karras, Aittala, Aila, Laine 2022, "Elucidating the Design Space of Diffusion-Based
             Generative Models", arXiv 2206.00364 (sec. 3: the probability-flow ODE dx/dsigma =
             (x - D(x; sigma)) / sigma, Table 1: the denoiser D of each prediction type)
    [Hairer] Hairer, Norsett, Wanner, "Solving Ordinary Differential Equations I", sec. III.1
             (Adams methods: integrate the polynomial through the past derivatives)

Notation as fastgen/reference/karras.py: x = x0 + sigma eps in sigma space; a step goes from sigma_i to
sigma_i+1 of the scheduler's sigmas (the last one 0). The ODE's derivative at step j is

    d_j = (x_j - D(x_j; sigma_j)) / sigma_j                       ([Karras] eq. 3 with sigma(t) = t)

and the explicit Adams (linear multistep) step of order p integrates the polynomial P through the last
p derivatives (sigma_i-k, d_i-k), k < p, in sigma ([Hairer] III.1, eq. 1.5):

    x_i+1 = x_i + integral_{sigma_i}^{sigma_i+1} P(s) ds
          = x_i + sum_k c_k d_i-k,     c_k = integral_{sigma_i}^{sigma_i+1} l_k(s) ds,
    l_k(s) = prod_{j != k, j < p} (s - sigma_i-j) / (sigma_i-k - sigma_i-j)     (the Lagrange basis)

diffusers' step takes p = min(step index + 1, order) and uses the derivatives its run has made (fewer
than p in a run begun mid-schedule: the basis is that of p nodes, the missing terms dropped).

Every step is affine in (x, F, the previous derivatives): the fused step keeps d as its "denoised"
output D (kernels/samplers.py: D = DX x + D0 x0, with x0's row holding d itself, see ``lms_table``) and
reads the last order - 1 of them back from its history ring (order <= 5).
"""
import numpy as np

from fastgen import _checks
from fastgen.reference.karras import _input_scales, _run_sigmas, denoised
from fastgen.step_table import scheduler_table, table_builder

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
MAX_FUSED_ORDER = 5  # the current derivative and 4 kept ones (kernels/samplers.py's AP, AP2, AP3, AP4)
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(8)  # exact for the basis polynomials (degree <= 7)


def lms_weights(sigmas, lo, hi):
    """(c_0, ..., c_p-1): the integrals from lo to hi of the Lagrange basis through ``sigmas``
    (sigma_i, sigma_i-1, ...), by Gauss-Legendre quadrature in s."""
    s = 0.5 * (hi - lo) * _NODES + 0.5 * (hi + lo)
    weights = []
    for k, sigma_k in enumerate(sigmas):
        basis = np.ones_like(s)
        for j, sigma_j in enumerate(sigmas):
            if j != k:
                basis = basis * (s - sigma_j) / (sigma_k - sigma_j)
        weights.append(float(0.5 * (hi - lo) * np.sum(_WEIGHTS * basis)))
    return weights


def lms_step(x, derivatives, sigmas, sigma_next):
    """One LMS step (module docstring): x_i+1 = x_i + sum_k c_k d_i-k. derivatives: (d_i, d_i-1, ...),
    the ones the run has; sigmas: (sigma_i, sigma_i-1, ..., sigma_i-p+1), the basis' p nodes."""
    weights = lms_weights(sigmas, sigmas[0], sigma_next)
    return x + sum(c * d for c, d in zip(weights, derivatives))


def step_orders(num_steps, *, order, start=0):
    """(p, the derivatives used) at each step index of a run that starts at ``start``: diffusers' p =
    min(i + 1, order), of which the run has i - start + 1."""
    return [(min(i + 1, order), min(i + 1, order, i - start + 1)) for i in range(num_steps)]


def fused_settings(order):
    """Why an LMS step of this ``order`` has no fused table, or None where it has one."""
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        return f"order must be an int >= 1, got {order!r}"
    if order > MAX_FUSED_ORDER:
        return f"order {order} keeps {order - 1} derivatives; the fused step keeps at most {MAX_FUSED_ORDER - 1}"
    return None


def _derivative_columns(prediction_type, sigma):
    """d = (x - D) / sigma = CX x + CF F: D's row of [Karras] Table 1 turned into d's (no cancellation:
    for epsilon d = F exactly)."""
    if prediction_type == "epsilon":
        return dict(cx=0.0, cf=1.0)
    if prediction_type == "v_prediction":  # D = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) F
        return dict(cx=sigma / (sigma ** 2 + 1), cf=1.0 / np.sqrt(sigma ** 2 + 1))
    return dict(cx=1.0 / sigma, cf=-1.0 / sigma)  # "sample": D = F


def _adams_weights(sigmas, orders):
    """Per step i the weights c_k (k < p) in closed form, by the method of undetermined coefficients:
    the rule integrates every polynomial of degree < p exactly, so with u = s - sigma_i, nodes
    u_j = sigma_i-j - sigma_i and h = sigma_i+1 - sigma_i,  sum_k c_k u_k^m = h^(m+1) / (m + 1), m < p
    (a p x p Vandermonde system, solved for all steps of one p at once). A repeated sigma makes the
    system singular: inf / NaN weights (diffusers divides by 0 there too)."""
    weights = [None] * len(orders)
    for p in sorted({p for p, _ in orders}):
        steps = [i for i, (order, _) in enumerate(orders) if order == p]
        u = np.array([[sigmas[i - j] - sigmas[i] for j in range(p)] for i in steps])       # [S, p]
        h = np.array([sigmas[i + 1] - sigmas[i] for i in steps])                           # [S]
        powers = np.arange(p)
        vandermonde = u[:, None, :] ** powers[None, :, None]                               # [S, m, k]
        moments = h[:, None] ** (powers + 1)[None, :] / (powers + 1)[None, :]             # [S, m]
        with np.errstate(all="ignore"):
            try:
                solved = np.linalg.solve(vandermonde, moments[..., None])[..., 0]
            except np.linalg.LinAlgError:
                solved = np.stack([_solve_or_nan(a, b) for a, b in zip(vandermonde, moments)])
        for i, w in zip(steps, solved):
            weights[i] = w
    return weights


def _solve_or_nan(a, b):
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        return np.full(len(b), np.nan)


@table_builder("LMSDiscreteScheduler")
def lms_table(scheduler, *, order=4, start=0):
    """The StepTable of diffusers' LMSDiscreteScheduler after ``set_timesteps`` (every sigma option:
    Karras, exponential, beta; every timestep spacing), for step()'s ``order`` (1 to 5) and a run whose
    first step is step ``start``. From ``lms_step``, per step i (p, m = ``step_orders``):

        x0 row: CX, CF with d_i = CX x + CF F      (DX = 0, D0 = 1: D = d_i, what the ring keeps)
        AX = 1,  AD = c_0,  AP = c_1, ..., AP4 = c_4     (c_k for k >= m: 0)

    c_k = integral_{sigma_i}^{sigma_i+1} l_k, the basis polynomial through sigma_i, ..., sigma_i-p+1, in
    closed form (``_adams_weights``), not by the reference's quadrature."""
    prediction_type = _checks.choice(scheduler.config.prediction_type, "prediction_type", PREDICTION_TYPES)
    reason = fused_settings(order)
    if reason:
        raise ValueError(reason)
    start = _checks.nonneg_int(start, "start")
    sigmas = _run_sigmas(scheduler)
    n = len(sigmas) - 1
    orders = step_orders(n, order=order, start=start)
    weights = _adams_weights(sigmas, orders)
    columns = ("ad", "ap", "ap2", "ap3", "ap4")
    rows = []
    for i, (p, used) in enumerate(orders):
        row = dict(_derivative_columns(prediction_type, sigmas[i]), dx=0.0, d0=1.0, ax=1.0)
        row.update({columns[k]: float(weights[i][k]) for k in range(used)})
        rows.append(row)

    def reference(i, f, x, prev, z):
        previous = () if prev is None else (prev,) if hasattr(prev, "shape") else tuple(prev)
        d = (x - denoised(f, x, sigmas[i], prediction_type)) / sigmas[i]
        p, used = orders[i]
        derivatives = (d, *previous)[:used]
        return lms_step(x, derivatives, [sigmas[i - k] for k in range(p)], sigmas[i + 1]), d

    return scheduler_table(scheduler, "lms", rows, reference, generator_draws=[False] * n,
                           model_input_scales=_input_scales(sigmas), init_noise_sigma=float(scheduler.init_noise_sigma),
                           reads_previous=any(used > 1 for _, used in orders))


__all__ = ["lms_step", "lms_weights", "step_orders", "fused_settings", "lms_table", "PREDICTION_TYPES",
           "MAX_FUSED_ORDER"]

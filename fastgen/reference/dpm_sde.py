"""The stochastic DPM-Solver++ ("DPM++ SDE", two stages per step) in sigma space in float64, and the
StepTable builder of diffusers' DPMSolverSDEScheduler, with its Brownian noise as counter-based
increments.

    [Lu22b] Lu, Zhou, Bao, Chen, Li, Zhu 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
            Diffusion Probabilistic Models", arXiv 2211.01095 (the data-prediction exponential
            integrator; the SDE variant's ancestral split)
    [Karras] Karras et al. 2022, arXiv 2206.00364 (Table 1: D(x; sigma) of each prediction type)

Notation as fastgen/reference/karras.py (x = x0 + sigma eps). A step from sigma_i to sigma_i+1 is two
calls of ``step``, diffusers' interleaved sigmas: with t = -log sigma, the midpoint sigma_m = e^-(t_i +
(t_i+1 - t_i) / 2) = sqrt(sigma_i sigma_i+1), and the ancestral split of a move from sigma to s,

    sigma_up = min(s, sqrt(s^2 (sigma^2 - s^2) / sigma^2)),   sigma_down = sqrt(s^2 - sigma_up^2),

each stage is the first-order data-prediction step to sigma_down plus fresh noise of size sigma_up:

    stage 1:  x_m    = (sd_1 / sigma_i) x_i + (1 - sd_1 / sigma_i) D(x_i; sigma_i) + s_noise su_1 n_1
    stage 2:  x_i+1  = (sd_2 / sigma_i) x_i + (1 - sd_2 / sigma_i) D(x_m; sigma_m) + s_noise su_2 n_2

(sd_1, su_1: the split of sigma_i -> sigma_m; sd_2, su_2: of sigma_i -> sigma_i+1; the second stage
steps from the step's start x_i, which the first hands on). The last step, onto sigma 0, is one Euler
stage. n_1 and n_2 are the normalised increments of one Brownian path W over sigma:

    n_1 = (W(sigma_m) - W(sigma_i)) / sqrt(sigma_i - sigma_m),   n_2 = (W(sigma_i+1) - W(sigma_i)) / sqrt(sigma_i - sigma_i+1)

so they are correlated (n_2 contains n_1's increment). diffusers draws them from torchsde's Brownian
tree. fastgen's counter-based path draws the two independent halves, z_1 (the first stage's stream)
and z_2 (the second stage's), and forms the increments from them:

    n_1 = z_1,    n_2 = (sqrt(sigma_i - sigma_m) z_1 + sqrt(sigma_m - sigma_i+1) z_2) / sqrt(sigma_i - sigma_i+1)

the same law (a Brownian path's increments), not torchsde's numbers; the second stage reads z_1 again
from its stream (the kernel's NOISE_PREV term), so nothing random is stored between the stages.
"""
import math

import numpy as np

from fastgen import _checks
from fastgen.reference.karras import ANCESTRAL_PREDICTION_TYPES, _x0_columns, denoised, heun_stages
from fastgen.step_table import host_sigmas, scheduler_table, table_builder

PREDICTION_TYPES = ANCESTRAL_PREDICTION_TYPES  # diffusers' step has no "sample"


def ancestral_split(sigma, sigma_to):
    """(sigma_down, sigma_up) of a move from sigma to sigma_to (module docstring)."""
    sigma_up = min(sigma_to, math.sqrt(max(sigma_to ** 2 * (sigma ** 2 - sigma_to ** 2) / sigma ** 2, 0.0)))
    return math.sqrt(max(sigma_to ** 2 - sigma_up ** 2, 0.0)), sigma_up


def brownian_increments(z1, z2, sigma, sigma_mid, sigma_next):
    """(n_1, n_2): the normalised increments of one Brownian path over [sigma_next, sigma] from the two
    independent halves z_1 (sigma -> sigma_mid) and z_2 (sigma_mid -> sigma_next)."""
    d1, d2 = sigma - sigma_mid, sigma_mid - sigma_next
    return z1, (math.sqrt(d1) * z1 + math.sqrt(d2) * z2) / math.sqrt(d1 + d2)


def dpm_sde_stage(model_output, x, prev_start, sigma, sigma_mid, sigma_next, *, first, prediction_type,
                  s_noise=1.0, noise=None):
    """One stage (module docstring) as diffusers runs it. noise: (z_1,) in a first stage, (z_2, z_1) in a
    second (the halves, ``brownian_increments``). Returns (x_m, x_i) from a first stage (the start for
    the second), (x_i+1, D(x_m; sigma_m)) from a second; the Euler stage onto sigma 0 returns (x0, x0)."""
    if sigma_next == 0:
        d0 = denoised(model_output, x, sigma, prediction_type)
        return x + (x - d0) / sigma * (sigma_next - sigma), d0
    if first:
        d0 = denoised(model_output, x, sigma, prediction_type)
        sigma_down, sigma_up = ancestral_split(sigma, sigma_mid)
        n1, _ = brownian_increments(noise[0], noise[0], sigma, sigma_mid, sigma_next)
        r = sigma_down / sigma
        return r * x + (1 - r) * d0 + s_noise * sigma_up * n1, x.clone()
    d0 = denoised(model_output, x, sigma_mid, prediction_type)
    sigma_down, sigma_up = ancestral_split(sigma, sigma_next)
    _, n2 = brownian_increments(noise[1], noise[0], sigma, sigma_mid, sigma_next)
    r = sigma_down / sigma
    return r * prev_start + (1 - r) * d0 + s_noise * sigma_up * n2, d0


def _stage_rows(rows, levels, sigmas, first, prediction_type, s_noise):
    """The rows of ``dpm_sde_table`` (its docstring), appended to ``rows``; each stage's (sigma, sigma_m,
    sigma_next) to ``levels``."""
    for k in range(len(first)):
        sigma, sigma_next = (sigmas[k], sigmas[k + 1]) if first[k] else (sigmas[k - 1], sigmas[k])
        sigma_mid = math.sqrt(sigma * sigma_next)
        levels.append((sigma, sigma_mid, sigma_next))
        if sigma_next == 0:
            rows.append(dict(_x0_columns(prediction_type, sigma, sigma), ad=1.0))
        elif first[k]:
            columns = _x0_columns(prediction_type, sigma, sigma)
            sigma_down, sigma_up = ancestral_split(sigma, sigma_mid)
            r = sigma_down / sigma
            rows.append(dict(**columns, dx=1.0, d0=0.0, ax=r + (1 - r) * columns["cx"], af=(1 - r) * columns["cf"],
                             noise=s_noise * sigma_up))
        else:
            sigma_down, sigma_up = ancestral_split(sigma, sigma_next)
            r, d1, d2 = sigma_down / sigma, sigma - sigma_mid, sigma_mid - sigma_next
            rows.append(dict(_x0_columns(prediction_type, sigma_mid, sigma_mid), ap=r, ad=1 - r,
                             noise=s_noise * sigma_up * math.sqrt(d2 / (d1 + d2)),
                             noise_prev=s_noise * sigma_up * math.sqrt(d1 / (d1 + d2))))


@table_builder("DPMSolverSDEScheduler")
def dpm_sde_table(scheduler, *, start=0, s_noise=1.0):
    """The StepTable of diffusers' DPMSolverSDEScheduler after ``set_timesteps`` (its interleaved sigmas;
    a run from step ``start``), step()'s s_noise. From ``dpm_sde_stage``, x0 = CX x + CF F ([Karras]
    Table 1 at sigma_i, resp. sigma_m), r = sigma_down / sigma_i:

        first:   D = x (DX = 1, D0 = 0: the start the second stage reads),  AX = r + (1 - r) CX,
                 AF = (1 - r) CF,  NOISE = s_noise su_1
        second:  D = x0,  AP = r (on the start),  AD = 1 - r,  NOISE = s_noise su_2 sqrt(d_2 / d),
                 NOISE_PREV = s_noise su_2 sqrt(d_1 / d)     (d_1 = sigma_i - sigma_m, d_2 = sigma_m - sigma_i+1)
        onto sigma 0: D = x0, AD = 1 (the Euler step lands on x0)

    Counter noise only: diffusers' own step draws from torchsde's tree (no generator)."""
    prediction_type = _checks.choice(scheduler.config.prediction_type, "prediction_type", PREDICTION_TYPES)
    start = _checks.nonneg_int(start, "start")
    s_noise = _checks.finite_float(s_noise, "s_noise")
    sigmas = [np.float64(sigma) for sigma in host_sigmas(scheduler).tolist()]  # a degenerate schedule: inf / NaN
    n = len(scheduler.timesteps)
    first = heun_stages(n, start)
    rows, levels = [], []
    with np.errstate(all="ignore"):
        _stage_rows(rows, levels, sigmas, first, prediction_type, s_noise)

    def reference(k, f, x, prev, z):
        noise = None if z is None else (z,) if hasattr(z, "shape") else tuple(z)
        return dpm_sde_stage(f, x, prev, *levels[k], first=first[k], prediction_type=prediction_type,
                             s_noise=s_noise, noise=noise)

    scales = [1.0 / math.sqrt((level[0] if first[k] else level[1]) ** 2 + 1) for k, level in enumerate(levels)]
    return scheduler_table(scheduler, "dpm_sde", rows, reference, generator_draws=[False] * n,
                           model_input_scales=scales, init_noise_sigma=float(scheduler.init_noise_sigma),
                           reads_previous=n > 1)


__all__ = ["ancestral_split", "brownian_increments", "dpm_sde_stage", "dpm_sde_table", "PREDICTION_TYPES"]

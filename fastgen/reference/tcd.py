"""Trajectory Consistency Distillation sampling (float64), written to be read beside the paper, and the
StepTable builder of diffusers' TCDScheduler.

    [Zheng] Zheng, Yang, Cai, Wang, Zhang 2024, "Trajectory Consistency Distillation: Improved Latent
            Consistency Distillation by Semi-Linear Consistency Function with Trajectory Mapping",
            arXiv 2402.19159 (the strategic stochastic sampling, eqs. 9-10 and Algorithm 4)

A step from timestep t to the next timestep t' of the run (0 after the last) goes through an earlier
point s = floor((1 - gamma) t') of the same trajectory and re-noises from there:

    x0    = x0(F, x_t)                       the model output's data prediction (epsilon | sample | v)
    eps   = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)                        the matching noise
    x_s   = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps                            [Zheng] eq. 9 (the DDIM map)
    x_t'  = sqrt(abar_t' / abar_s) x_s + sqrt(1 - abar_t' / abar_s) z,  z ~ N(0, I)   eq. 10 (gamma > 0)

gamma (diffusers' ``eta`` argument of step) in [0, 1]: 0 is deterministic (s = t'); the last step of a
run adds no noise and returns x_s. The scheduler returns x_s as ``pred_noised_sample``.
"""
import math
import numpy as np
import torch

from fastgen.reference.consistency import PREDICTION_TYPES, _host, _sqrt, predicted_x0
from fastgen.step_table import require_timesteps, scheduler_table, table_builder


def tcd_step(model_output, sample, *, alpha_prod_t, alpha_prod_s, alpha_prod_prev, prediction_type, noisy,
             noise=None):
    """One step of the module docstring. Returns (x_t', x_s)."""
    x0 = predicted_x0(model_output, sample, alpha_prod_t, prediction_type)
    eps = (sample - _sqrt(alpha_prod_t) * x0) / _sqrt(1.0 - alpha_prod_t)
    x_s = _sqrt(alpha_prod_s) * x0 + _sqrt(1.0 - alpha_prod_s) * eps
    if not noisy:
        return x_s.clone(), x_s
    ratio = alpha_prod_prev / alpha_prod_s
    return _sqrt(ratio) * x_s + _sqrt(1.0 - ratio) * noise, x_s


def intermediate_timestep(prev_timestep: int, gamma: float) -> int:
    """s = floor((1 - gamma) t'), rounded as diffusers rounds it (a float32 product)."""
    return int(torch.floor((1 - gamma) * torch.tensor(prev_timestep)))


def _x0_columns(prediction_type, alpha_prod_t):
    """x0 = CX x + CF F (predicted_x0 as coefficients; numpy float64, IEEE arithmetic)."""
    alpha, beta = np.sqrt(alpha_prod_t), np.sqrt(1.0 - alpha_prod_t)
    if prediction_type == "epsilon":
        return 1.0 / alpha, -beta / alpha
    return (0.0, 1.0) if prediction_type == "sample" else (alpha, -beta)


@table_builder("TCDScheduler")
def tcd_table(scheduler, *, eta=0.3):
    """The StepTable of a TCDScheduler's run with step()'s gamma (``eta``). From ``tcd_step``, per step:

        CX, CF                              x0 = CX x + CF F
        DX = sqrt(1 - abar_s) / sqrt(1 - abar_t),   D0 = sqrt(abar_s) - DX sqrt(abar_t)
                                            D = x_s = DX x + D0 x0       (eps written from x and x0)
        AD = sqrt(abar_t' / abar_s), NOISE = sqrt(1 - abar_t' / abar_s)   (AD = 1, NOISE = 0 without noise)

    diffusers' step draws from its generator where gamma > 0 but at the last step."""
    require_timesteps(scheduler)
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(map(repr, PREDICTION_TYPES))} for TCDScheduler, "
                         f"got {prediction_type!r}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise ValueError(f"eta (TCD's gamma) must be a number in [0, 1], got {eta!r}")
    timesteps = [int(t) for t in _host(scheduler.timesteps)]
    abar, final = _host(scheduler.alphas_cumprod), float(scheduler.final_alpha_cumprod)
    n = len(timesteps)
    steps = []
    for i, t in enumerate(timesteps):
        prev = timesteps[i + 1] if i + 1 < n else 0
        s = intermediate_timestep(prev, eta)
        steps.append(dict(alpha_prod_t=abar[t], alpha_prod_s=abar[s],
                          alpha_prod_prev=abar[prev] if prev >= 0 else final,
                          noisy=eta > 0 and i != scheduler.num_inference_steps - 1))
    rows = []
    with np.errstate(all="ignore"):  # IEEE arithmetic: a degenerate schedule's rows hold inf / NaN, as diffusers'
        for step in steps:
            a_t, a_s, a_prev = (np.float64(step[name]) for name in ("alpha_prod_t", "alpha_prod_s", "alpha_prod_prev"))
            cx, cf = _x0_columns(prediction_type, a_t)
            dx = np.sqrt(1.0 - a_s) / np.sqrt(1.0 - a_t)
            move = (dict(ad=np.sqrt(a_prev / a_s), noise=np.sqrt(1.0 - a_prev / a_s)) if step["noisy"]
                    else dict(ad=1.0))
            row = dict(cx=cx, cf=cf, dx=dx, d0=np.sqrt(a_s) - dx * np.sqrt(a_t), **move)
            rows.append({name: float(value) for name, value in row.items()})

    def reference(i, model_output, sample, prev_denoised, noise):
        return tcd_step(model_output, sample, prediction_type=prediction_type, noise=noise, **steps[i])

    return scheduler_table(scheduler, "tcd", rows, reference, generator_draws=[step["noisy"] for step in steps],
                           init_noise_sigma=scheduler.init_noise_sigma)


__all__ = ["tcd_step", "tcd_table", "intermediate_timestep"]

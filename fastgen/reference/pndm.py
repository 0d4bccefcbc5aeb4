"""PNDM's pseudo linear multistep sampler (PLMS) in float64, written to be read beside the paper, and the
StepTable builder of diffusers' PNDMScheduler.

    [Liu22] Liu, Ren, Lin, Zhao 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds",
            ICLR 2022, arXiv 2202.09778 (eq. 9: the transfer part; eq. 12: the linear multistep
            gradient part; the warm-up by lower orders as diffusers' PLMS without Runge-Kutta steps)

Notation: x_t is the DDPM sample at timestep t, abar_t the training schedule's cumulative alpha (abar of
a timestep below 0: 1 with ``set_alpha_to_one``, else abar_0). The transfer part moves x_t to x_s along
the DDIM direction of a noise estimate e ([Liu22] eq. 9):

    phi(x_t, e, t, s) = sqrt(abar_s / abar_t) x_t
                        - (abar_s - abar_t) e / (sqrt(abar_t) (sqrt(abar_t (1 - abar_s)) + sqrt((1 - abar_t) abar_s)))

and the gradient part estimates e from the model's last outputs e_i, e_i-1, ... as a linear multistep
method ([Liu22] eq. 12), of order 1, 2, 3 as the run starts (diffusers' PLMS warm-up):

    step 0:  e = e_0                                 x_1 = phi(x_0, e, t_0, t_0 - r)
    step 1:  e = (e_1 + e_0) / 2                     x_2 = phi(x_0, e, t_0, t_1)      (from x_0 again:
             the model was evaluated at x_1, t_1 = t_0 - r, which gives the pseudo improved Euler step)
    step 2:  e = (3 e_2 - e_0) / 2                   then (23 e_3 - 16 e_2 + 5 e_0) / 12,
    step k:  e = (55 e'_0 - 59 e'_1 + 37 e'_2 - 9 e'_3) / 24,   e'_j the outputs of the steps before
             (step 1's e_1 is not one of them: it only corrected step 0)

r = T // N, t_k the scheduler's timesteps (t_1 = t_2: the evaluation at x_1 repeats t_0 - r). With
v_prediction the model's v becomes e = sqrt(abar_t) v + sqrt(1 - abar_t) x at the step's (x, t)
([Salimans22] sec. 4), after the combination. x_0 at step 1 is not the sample then handed to the step
(x_1): it is recovered by inverting step 0's transfer, x_0 = phi^-1(x_1, e_0).
"""
import math

from fastgen import _checks
from fastgen.step_table import host_values, require_timesteps, scheduler_table, table_builder

PREDICTION_TYPES = ("epsilon", "v_prediction")
# the gradient part's weights on (e_i, e'_1, e'_2, e'_3) by the number of outputs the run has ([Liu22] eq. 12)
MULTISTEP_WEIGHTS = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def transfer_coefficients(abar_t, abar_s):
    """(a, b): phi(x, e, t, s) = a x + b e ([Liu22] eq. 9)."""
    a = math.sqrt(abar_s / abar_t)
    b = -(abar_s - abar_t) / (math.sqrt(abar_t) * (math.sqrt(abar_t * (1 - abar_s)) + math.sqrt((1 - abar_t) * abar_s)))
    return a, b


def transfer(x, e, abar_t, abar_s):
    a, b = transfer_coefficients(abar_t, abar_s)
    return a * x + b * e


def noise_estimate(model_output, x, abar_t, prediction_type):
    """e from the model's (combined) output at (x, t): itself, or sqrt(abar_t) v + sqrt(1 - abar_t) x."""
    if prediction_type == "v_prediction":
        return math.sqrt(abar_t) * model_output + math.sqrt(1 - abar_t) * x
    return model_output


def plms_schedule(scheduler, num_steps):
    """Per step k: (t, s, the steps whose outputs the gradient part combines, most recent first; the
    sample it restarts from: None for its own, 0 for x_0), as diffusers' PLMS runs (module docstring)."""
    r = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    timesteps = [int(t) for t in host_values(scheduler.timesteps)[:num_steps].tolist()]
    appended, plan = [], []
    for k, t in enumerate(timesteps):
        if k == 1:
            plan.append((t + r, t, (1, 0), 0))
            continue
        outputs = (k, *reversed(appended[-3:]))
        plan.append((t, t - r, outputs, None))
        appended.append(k)
    return plan


def plms_step(entry, model_outputs, x, x_start, abar, prediction_type):
    """One step of a plan (an entry of ``plms_schedule``): model_outputs maps a step index to its
    output; x_start is x_0 for step 1. Returns the next sample."""
    t, s, outputs, restart = entry
    sample = x if restart is None else x_start
    if abar(s) == abar(t):  # no move (the last step onto abar_0 = abar_t): phi is x, whatever e
        return sample.clone()
    weights = (0.5, 0.5) if restart is not None else MULTISTEP_WEIGHTS[len(outputs)]
    combined = sum(w * model_outputs[j] for w, j in zip(weights, outputs))
    return transfer(sample, noise_estimate(combined, sample, abar(t), prediction_type), abar(t), abar(s))


def fused_settings(config):
    """Why a PNDMScheduler ``config`` has no fused table, or None where it has one."""
    if not config.skip_prk_steps:
        return ("skip_prk_steps=False: the Runge-Kutta warm-up (its first 12 model calls) runs diffusers' own step; "
                "the PLMS steps after it are fused")
    return None


@table_builder("PNDMScheduler")
def pndm_table(scheduler, *, after_prk=False):
    """The StepTable of diffusers' PNDMScheduler after ``set_timesteps``: the PLMS run of
    ``skip_prk_steps=True`` (Stable Diffusion's configuration); with ``after_prk`` (skip_prk_steps=False)
    the PLMS steps after diffusers' Runge-Kutta warm-up, preceded by three rows never stepped whose
    denoised outputs are the warm-up's three kept model outputs (the drop-in writes them into the ring).

    The kept "denoised" output is the model output itself (CX = 0, CF = 1: D = F); per step
    k, phi = a x + b e (``transfer_coefficients``), e = sum_j w_j F_j (+ the v conversion):

        AX = a (+ b sqrt(1 - abar_t) for v),  AD = b w_0 (sqrt(abar_t) for v),  AP.. = b w_j on D_k-j
        step 1 restarts from x_0 = (x_1 - B_0 F_0) / A_0 (A_0, B_0: step 0's AX and AD), so
        AX = A_1 / A_0 and AP (on F_0) = B_1 / 2 - A_1 B_0 / A_0."""
    require_timesteps(scheduler)
    config = scheduler.config
    prediction_type = _checks.choice(config.prediction_type, "prediction_type", PREDICTION_TYPES)
    reason = fused_settings(config)
    if reason and not after_prk:
        raise ValueError(f"PNDMScheduler with {reason}; fastgen.sample runs the fused steps only: set "
                         "skip_prk_steps=True")
    alphas = host_values(scheduler.alphas_cumprod).tolist()
    final = float(scheduler.final_alpha_cumprod)

    def abar(t):
        return alphas[t] if t >= 0 else final

    num_steps = len(scheduler.timesteps)
    if after_prk:
        plan, lead = _after_prk_schedule(scheduler), 3
    else:
        plan, lead = plms_schedule(scheduler, num_steps), 0
    history = ("ap", "ap2", "ap3", "ap4")
    rows = [dict(cx=0.0, cf=1.0) for _ in range(lead)]  # the warm-up's outputs: never stepped
    for k, (t, s, outputs, restart) in enumerate(plan, start=lead):
        a, b = transfer_coefficients(abar(t), abar(s))
        weights = (0.5, 0.5) if restart is not None else MULTISTEP_WEIGHTS[len(outputs)]
        scale = math.sqrt(abar(t)) if prediction_type == "v_prediction" else 1.0
        ax = a + (b * math.sqrt(1 - abar(t)) if prediction_type == "v_prediction" else 0.0)
        row = dict(cx=0.0, cf=1.0, ax=ax)
        for w, j in zip(weights, outputs):
            column = "ad" if j == k else history[k - j - 1]
            row[column] = row.get(column, 0.0) + b * scale * w
        if restart is not None:  # step 1: from x_0 = (x_1 - B_0 F_0) / A_0
            a0, b0 = rows[lead]["ax"], rows[lead]["ad"]
            row["ax"] = ax / a0
            row["ap"] = row["ap"] - ax * b0 / a0
        rows.append(row)

    def reference(i, f, x, prev, z):
        previous = () if prev is None else (prev,) if hasattr(prev, "shape") else tuple(prev)
        outputs = {i: f, **{i - j - 1: d for j, d in enumerate(previous)}}
        x_start = None
        if plan[i - lead][3] is not None:  # invert step 0's transfer: x_0 = phi^-1(x_1, e_0)
            t0, s0, _, _ = plan[0]
            a0, b0 = transfer_coefficients(abar(t0), abar(s0))
            e0 = outputs[0]
            if prediction_type == "v_prediction":  # x_1 = a0 x_0 + b0 (sqrt(abar) v_0 + sqrt(1 - abar) x_0)
                x_start = (x - b0 * math.sqrt(abar(t0)) * e0) / (a0 + b0 * math.sqrt(1 - abar(t0)))
            else:
                x_start = (x - b0 * e0) / a0
        return plms_step(plan[i - lead], outputs, x, x_start, abar, prediction_type), f

    steps = len(rows)
    timesteps = [0] * lead + [int(t) for t in host_values(scheduler.timesteps).tolist()][-len(plan):]
    return scheduler_table(scheduler, "pndm", rows, reference, generator_draws=[False] * steps,
                           model_timesteps=timesteps, reads_previous=steps > 1)


def _after_prk_schedule(scheduler):
    """The PLMS steps after diffusers' Runge-Kutta warm-up: each combines its output with the last three
    kept ones (the warm-up's three, then its own), fourth order from the first."""
    r = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    timesteps = [int(t) for t in host_values(scheduler.timesteps).tolist()][len(scheduler.prk_timesteps):]
    lead = 3
    return [(t, t - r, tuple(range(k, k - 4, -1)), None) for k, t in enumerate(timesteps, start=lead)]


__all__ = ["transfer", "transfer_coefficients", "noise_estimate", "plms_schedule", "plms_step", "fused_settings",
           "pndm_table", "PREDICTION_TYPES", "MULTISTEP_WEIGHTS"]

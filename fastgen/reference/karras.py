"""Euler and Euler ancestral sampling in sigma space (float64), written to be read beside the papers,
and the StepTable builders of diffusers' EulerDiscreteScheduler and EulerAncestralDiscreteScheduler.
Euler's churn follows diffusers (the model output at the pre-churn sample reused at the churned one,
``euler_step``), not [Karras] Alg. 2's denoiser evaluated at the churned sample.

    [Karras] Karras, Aittala, Aila, Laine 2022, "Elucidating the Design Space of Diffusion-Based
             Generative Models", arXiv 2206.00364 (Algorithms 1 and 2, Table 1)
    [Song]   Song et al. 2021, "Score-Based Generative Modeling through SDEs", arXiv 2011.13456
             (ancestral sampling, eq. 47)

Notation: x is the sample in sigma space, x = x0 + sigma eps (the variance-exploding form of a
variance-preserving model: x = x_t / sqrt(abar_t), sigma = sqrt((1 - abar_t) / abar_t)); a step goes
from sigma_i to sigma_{i+1} of the scheduler's own sigmas (diffusers' float32 values, N + 1 of them,
the last one 0 or sigma_min). The model is called on c_in x = x / sqrt(sigma^2 + 1) at diffusers'
timestep t_i; its output F becomes the denoiser D(x; sigma) of [Karras] Table 1:

    epsilon        D = x - sigma F                              c_skip = 1,  c_out = -sigma
    v_prediction   D = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) F
    sample         D = F

Each step is affine in (x, F, z) once D is known, which is what the builders below write down: a row
of the fused step's coefficients per step (kernels/samplers.py: x^ = x + CHURN z, x0 = CX x^ + CF F,
D = x0, out = AX x^ + AD D + AF F + NOISE z).
"""
import math

from fastgen import _checks
from fastgen.step_table import host_sigmas, host_values, scheduler_table, table_builder

EULER_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "original_sample")  # "original_sample": "sample"
ANCESTRAL_PREDICTION_TYPES = ("epsilon", "v_prediction")  # diffusers has no "sample" for Euler ancestral


def denoised(model_output, x, sigma, prediction_type, sigma_hat=None):
    """D(x; sigma) from the model output ([Karras] Table 1, module docstring). ``sigma_hat``: the noise
    level x is at after churn (epsilon scales by it; v_prediction keeps diffusers' sigma_i)."""
    sigma_hat = sigma if sigma_hat is None else sigma_hat
    if prediction_type == "epsilon":
        return x - sigma_hat * model_output
    if prediction_type == "v_prediction":
        return x / (sigma ** 2 + 1) - sigma / math.sqrt(sigma ** 2 + 1) * model_output
    return model_output  # "sample" / "original_sample"


def churn_gamma(sigma, num_steps, s_churn, s_tmin, s_tmax):
    """gamma_i = min(S_churn / N, sqrt(2) - 1) if sigma_i in [S_tmin, S_tmax] else 0   [Karras] Alg. 2 l. 4"""
    return min(s_churn / num_steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0


def euler_step(model_output, x, sigma, sigma_next, *, prediction_type, gamma=0.0, s_noise=1.0, noise=None):
    """One Euler step with churn as diffusers' EulerDiscreteScheduler takes it, after [Karras] Alg. 2
    without its second-order correction (lines 9-11):

        eps ~ N(0, S_noise^2 I)                                                       l. 4
        sigma^ = sigma_i + gamma_i sigma_i                                             l. 5
        x^     = x_i + sqrt(sigma^^2 - sigma_i^2) eps                                  l. 6
        d      = (x^ - D) / sigma^,  D = denoised(F, x^, sigma_i, sigma^)              l. 7 (see below)
        x_i+1  = x^ + (sigma_i+1 - sigma^) d                                           l. 8

    ``model_output`` F is the model's output at the pre-churn x_i (diffusers' convention, which the
    drop-in scheduler keeps for parity), reused at x^ and sigma^ through Table 1 (epsilon:
    D = x^ - sigma^ F). Alg. 2 proper evaluates the denoiser D(x^; sigma^) at the churned sample,
    which needs the model called on x^ after the churn noise is drawn. gamma = 0 is [Karras]
    Alg. 1's Euler step, where the two agree. Returns (x_i+1, D)."""
    sigma_hat = sigma * (1 + gamma)
    if gamma > 0:
        x = x + math.sqrt(sigma_hat ** 2 - sigma ** 2) * (s_noise * noise)
    d0 = denoised(model_output, x, sigma, prediction_type, sigma_hat)
    d = (x - d0) / sigma_hat
    return x + (sigma_next - sigma_hat) * d, d0


def euler_ancestral_step(model_output, x, sigma, sigma_next, *, prediction_type, noise):
    """One ancestral Euler step: the deterministic step to sigma_down, then fresh noise of sigma_up, so
    that x_i+1 has the marginal noise level sigma_i+1 ([Song] eq. 47 in sigma space, k-diffusion's
    sample_euler_ancestral with eta = 1):

        sigma_up   = sqrt(sigma_i+1^2 (sigma_i^2 - sigma_i+1^2) / sigma_i^2)
        sigma_down = sqrt(sigma_i+1^2 - sigma_up^2)                    (sigma_down^2 + sigma_up^2 = sigma_i+1^2)
        d          = (x_i - D(x_i; sigma_i)) / sigma_i                  [Karras] Alg. 1 l. 4
        x_i+1      = x_i + (sigma_down - sigma_i) d + sigma_up z,   z ~ N(0, I)

    Returns (x_i+1, D)."""
    sigma_up = math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)
    sigma_down = math.sqrt(max(sigma_next ** 2 - sigma_up ** 2, 0.0))  # a difference of rounded squares
    d0 = denoised(model_output, x, sigma, prediction_type)
    d = (x - d0) / sigma
    x_next = x + (sigma_down - sigma) * d
    if sigma_up:
        x_next = x_next + sigma_up * noise
    return x_next, d0


def _run_sigmas(scheduler):
    """The N + 1 sigmas N steps read (Python floats, float64). diffusers' "log_linear" interpolation
    keeps one more, which its step never reads."""
    sigmas, n = host_sigmas(scheduler).tolist(), len(scheduler.timesteps)
    if len(sigmas) < n + 1:
        raise ValueError(f"the scheduler must have one sigma more than timesteps, got {len(sigmas)} sigmas for "
                         f"{n} timesteps")
    return sigmas[:n + 1]


def _input_scales(sigmas):
    """diffusers' scale_model_input: the model sees x / sqrt(sigma_i^2 + 1)   (c_in, [Karras] Table 1)."""
    return [1.0 / math.sqrt(s ** 2 + 1) for s in sigmas[:-1]]


def _x0_columns(prediction_type, sigma, sigma_hat):
    """x0 = CX x^ + CF F: D(x^; sigma^) of the module docstring as coefficients."""
    if prediction_type == "epsilon":
        return dict(cx=1.0, cf=-sigma_hat)
    if prediction_type == "v_prediction":
        return dict(cx=1.0 / (sigma ** 2 + 1), cf=-sigma / math.sqrt(sigma ** 2 + 1))
    return dict(cx=0.0, cf=1.0)


def _euler_move(prediction_type, sigma_from, sigma_to):
    """x^ + (sigma_to - sigma_from) d with d = (x^ - D) / sigma_from, as (AX, AD, AF): for epsilon
    d = F exactly (D = x^ - sigma_from F), so x_i+1 = x^ + dt F, diffusers' own sum; otherwise
    x_i+1 = (sigma_to / sigma_from) x^ + (1 - sigma_to / sigma_from) D."""
    if prediction_type == "epsilon":
        return dict(ax=1.0, af=sigma_to - sigma_from)
    ratio = sigma_to / sigma_from
    return dict(ax=ratio, ad=1.0 - ratio)


@table_builder("EulerDiscreteScheduler")
def euler_table(scheduler, *, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, churn_at="step"):
    """The StepTable of diffusers' EulerDiscreteScheduler after ``set_timesteps`` (any sigma schedule:
    Karras, exponential, beta, log-linear, custom sigmas or timesteps; final sigma 0 or sigma_min),
    with step()'s churn settings. Derivation from ``euler_step``, per step i (sigma^ = sigma_i (1 + gamma_i)):

        CHURN = S_noise sqrt(sigma^^2 - sigma_i^2)         x^ = x + CHURN z            (l. 6; 0 if gamma_i = 0)
        CX, CF                                             D = CX x^ + CF F            (Table 1 at sigma^, F
                                                           the model's output at the pre-churn x, ``euler_step``)
        x_i+1 = x^ + (sigma_i+1 - sigma^)(x^ - D) / sigma^ = AX x^ + AD D + AF F       (l. 7-8, ``_euler_move``)

    diffusers' step draws from its generator where gamma_i > 0; its model input is scaled by
    1 / sqrt(sigma_i^2 + 1). That is diffusers' convention: the model output at x_i is reused at x^.

    churn_at="model": [Karras] Alg. 2 as written, the denoiser evaluated at the churned sample: the
    loop adds x^ = x + CHURN z before the model call (``pre_churn``), the model sees x^ / sqrt(sigma^^2 + 1)
    at the timestep of sigma^ (diffusers' sigma-to-timestep interpolation), and the step's row is the
    Euler step from x^ at sigma^ (CX, CF at sigma^ for every prediction type; no churn in the row)."""
    prediction_type = _checks.choice(scheduler.config.prediction_type, "prediction_type", EULER_PREDICTION_TYPES)
    s_churn = _checks.finite_float(s_churn, "s_churn")
    if s_churn < 0:
        raise ValueError(f"s_churn must be >= 0, got {s_churn}")
    s_noise = _checks.finite_float(s_noise, "s_noise")
    s_tmin, s_tmax = float(s_tmin), float(s_tmax)
    sigmas = _run_sigmas(scheduler)
    n = len(sigmas) - 1
    gammas = [churn_gamma(sigmas[i], n, s_churn, s_tmin, s_tmax) for i in range(n)]
    _checks.choice(churn_at, "churn_at", ("step", "model"))
    hats = [sigmas[i] * (1 + gammas[i]) for i in range(n)]
    churns = [s_noise * math.sqrt(hats[i] ** 2 - sigmas[i] ** 2) if gammas[i] > 0 else 0.0 for i in range(n)]
    draws = [g > 0 for g in gammas]
    if churn_at == "model":
        rows = [dict(**_x0_columns(prediction_type, hats[i], hats[i]),
                     **_euler_move(prediction_type, hats[i], sigmas[i + 1])) for i in range(n)]

        def model_reference(i, f, x, prev, z):  # x is x^: the loop added the churn before the model call
            return euler_step(f, x, hats[i], sigmas[i + 1], prediction_type=prediction_type)

        return scheduler_table(scheduler, "euler", rows, model_reference, generator_draws=draws,
                               model_input_scales=_input_scales(hats + sigmas[-1:]),
                               model_timesteps=_timesteps_of(scheduler, hats), pre_churn=churns,
                               init_noise_sigma=float(scheduler.init_noise_sigma))
    rows = [dict(churn=churns[i], **_x0_columns(prediction_type, sigmas[i], hats[i]),
                 **_euler_move(prediction_type, hats[i], sigmas[i + 1])) for i in range(n)]

    def reference(i, f, x, prev, z):
        return euler_step(f, x, sigmas[i], sigmas[i + 1], prediction_type=prediction_type, gamma=gammas[i],
                          s_noise=s_noise, noise=z)

    return scheduler_table(scheduler, "euler", rows, reference, generator_draws=draws,
                           model_input_scales=_input_scales(sigmas), init_noise_sigma=float(scheduler.init_noise_sigma))


def _timesteps_of(scheduler, sigmas):
    """The model timestep of each sigma: diffusers' own interpolation of the training sigmas in log space
    (``_sigma_to_t``), as its scheduler gives a Karras sigma its timestep."""
    import numpy as np

    abar = host_values(scheduler.alphas_cumprod).numpy()
    log_sigmas = np.log(((1 - abar) / abar) ** 0.5)
    return [float(scheduler._sigma_to_t(np.array(sigma), log_sigmas)) for sigma in sigmas]


@table_builder("EulerAncestralDiscreteScheduler")
def euler_ancestral_table(scheduler):
    """The StepTable of diffusers' EulerAncestralDiscreteScheduler after ``set_timesteps``. Derivation
    from ``euler_ancestral_step``, per step i:

        sigma_up = sigma_i+1 sqrt(sigma_i^2 - sigma_i+1^2) / sigma_i,   sigma_down = sigma_i+1^2 / sigma_i
            (sigma_i+1^2 - sigma_up^2 = sigma_i+1^4 / sigma_i^2: no cancellation)
        CX, CF                              D = CX x + CF F                  (Table 1 at sigma_i)
        x_i+1 = AX x + AD D + AF F + NOISE z,  ``_euler_move`` from sigma_i to sigma_down, NOISE = sigma_up

    diffusers' step draws from its generator at every step (the last one too, where sigma_up = 0)."""
    prediction_type = _checks.choice(scheduler.config.prediction_type, "prediction_type", ANCESTRAL_PREDICTION_TYPES)
    sigmas = _run_sigmas(scheduler)
    n = len(sigmas) - 1
    rows = []
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_up = sigma_next * math.sqrt(max(sigma ** 2 - sigma_next ** 2, 0.0)) / sigma
        sigma_down = sigma_next ** 2 / sigma
        rows.append(dict(noise=sigma_up, **_x0_columns(prediction_type, sigma, sigma),
                         **_euler_move(prediction_type, sigma, sigma_down)))

    def reference(i, f, x, prev, z):
        return euler_ancestral_step(f, x, sigmas[i], sigmas[i + 1], prediction_type=prediction_type, noise=z)

    return scheduler_table(scheduler, "euler_ancestral", rows, reference, generator_draws=[True] * n,
                           model_input_scales=_input_scales(sigmas), init_noise_sigma=float(scheduler.init_noise_sigma))


def heun_stage(model_output, x, prev_half, sigma, sigma_next, *, first, prediction_type, clip=None):
    """One stage of [Karras] Alg. 1 (Heun's method, lines 4-8) as diffusers runs it, each stage one call:

        first:   d = (x_i - D(x_i; sigma_i)) / sigma_i,   x_mid = x_i + dt d,   H = x_i + dt d / 2
        second:  d' = (x - D(x; sigma_i+1)) / sigma_i+1 at the sample x given (x_mid in a loop),
                 x_i+1 = H + dt d' / 2  =  x_i + dt (d + d') / 2

    dt = sigma_i+1 - sigma_i; H (``prev_half``, the first stage's half step) carries the step's start
    and its first derivative to the second stage. ``clip``: applied to D (diffusers' clip_sample).
    Returns (x_mid, H) from a first stage, (x_i+1, D(x; sigma_i+1)) from a second."""
    dt = sigma_next - sigma
    sigma_d = sigma if first else sigma_next
    d0 = denoised(model_output, x, sigma_d, prediction_type)
    d0 = d0 if clip is None else clip(d0)
    d = (x - d0) / sigma_d
    if first:
        return x + dt * d, x + (dt / 2) * d
    return prev_half + (dt / 2) * d, d0


def heun_stages(num_steps: int, start: int = 0) -> list:
    """True where step k of diffusers' HeunDiscreteScheduler run (its timesteps hold every sigma but the
    first twice) is a first stage: the run's first step from ``start`` and then every other one."""
    return [(k - start) % 2 == 0 for k in range(num_steps)]


@table_builder("HeunDiscreteScheduler")
def heun_table(scheduler, *, start=0):
    """The StepTable of diffusers' HeunDiscreteScheduler after ``set_timesteps`` (its sigmas s_0, s_1,
    s_1, s_2, s_2, ..., s_N; a run from step ``start``). Step k reads sigmas[k] (sigma) and sigmas[k + 1]
    (sigma_next) in a first stage and sigmas[k - 1] and sigmas[k] in a second. From ``heun_stage``, with
    x0 = CX x + CF F (Table 1 at sigma, resp. sigma_next), dt = sigma_next - sigma, a = dt / (2 sigma):

        first:   D = H = (1 + a) x - a x0  (DX, D0),   x_mid = 2 H - x  (AX = -1, AD = 2)
        second:  D = x0,   x_i+1 = H' + b x - b x0,  b = dt / (2 sigma_next)   (AP = 1, AX = b, AD = -b)

    The denoised output of a first stage is the half step H (what the second reads as D'), not x0.
    diffusers' step clips x0 with ``clip_sample``; it draws no noise."""
    prediction_type = _checks.choice(scheduler.config.prediction_type, "prediction_type", EULER_PREDICTION_TYPES[:3])
    start = _checks.nonneg_int(start, "start")
    sigmas = host_sigmas(scheduler).tolist()
    n = len(scheduler.timesteps)
    first = heun_stages(n, start)
    rows, pairs = [], []
    for k in range(n):
        sigma, sigma_next = (sigmas[k], sigmas[k + 1]) if first[k] else (sigmas[k - 1], sigmas[k])
        pairs.append((sigma, sigma_next))
        dt = sigma_next - sigma
        if first[k]:
            a = dt / (2 * sigma)
            rows.append(dict(**_x0_columns(prediction_type, sigma, sigma), dx=1.0 + a, d0=-a, ax=-1.0, ad=2.0))
        else:
            b = dt / (2 * sigma_next)
            rows.append(dict(**_x0_columns(prediction_type, sigma_next, sigma_next), ax=b, ad=-b, ap=1.0))
    clip_range = float(scheduler.config.clip_sample_range)
    clip = dict(clip="range", clip_range=clip_range) if scheduler.config.clip_sample else {}

    def reference(k, f, x, prev, z):
        return heun_stage(f, x, prev, *pairs[k], first=first[k], prediction_type=prediction_type,
                          clip=(lambda d0: d0.clamp(-clip_range, clip_range)) if clip else None)

    return scheduler_table(scheduler, "heun", rows, reference, generator_draws=[False] * n,
                           model_input_scales=[1.0 / math.sqrt(sigmas[k] ** 2 + 1) for k in range(n)],
                           init_noise_sigma=float(scheduler.init_noise_sigma), reads_previous=n > 1, **clip)


def kdpm2_stage(model_output, x, prev_start, sigma, sigma_mid, sigma_next, *, first, prediction_type):
    """One stage of DPM-Solver-2 in sigma space (k-diffusion's sample_dpm_2; [Karras] sec. 4's
    comparison sampler), each stage one call as diffusers runs it, sigma_mid the log-space midpoint
    sqrt(sigma_i sigma_i+1):

        first:   d = (x_i - D(x_i; sigma_i)) / sigma_i,     x_mid = x_i + (sigma_mid - sigma_i) d
        second:  d' = (x - D(x; sigma_mid)) / sigma_mid,    x_i+1 = x_i + (sigma_i+1 - sigma_i) d'

    The first stage hands the step's start x_i to the second (``prev_start``). Returns (x_mid, x_i)
    from a first stage, (x_i+1, D(x; sigma_mid)) from a second."""
    if first:
        d = (x - denoised(model_output, x, sigma, prediction_type)) / sigma
        return x + (sigma_mid - sigma) * d, x.clone()
    d0 = denoised(model_output, x, sigma_mid, prediction_type)
    return prev_start + (sigma_next - sigma) * (x - d0) / sigma_mid, d0


@table_builder("KDPM2DiscreteScheduler")
def kdpm2_table(scheduler, *, start=0):
    """The StepTable of diffusers' KDPM2DiscreteScheduler after ``set_timesteps`` (its sigmas s_0, s_1,
    s_1, ..., s_N and midpoints; a run from step ``start``). Step k reads sigmas[k], sigmas_interpol[k + 1]
    and sigmas[k + 1] in a first stage, sigmas[k - 1], sigmas_interpol[k] and sigmas[k] in a second.
    From ``kdpm2_stage``, x0 = CX x + CF F (Table 1 at sigma, resp. sigma_mid):

        first:   D = x (DX = 1, D0 = 0),  x_mid = r x + (1 - r) x0 with r = sigma_mid / sigma, as
                 AX = r + (1 - r) CX, AF = (1 - r) CF
        second:  D = x0,  x_i+1 = D' + b (x - x0),  b = (sigma_i+1 - sigma) / sigma_mid   (AP = 1, AX = b, AD = -b)

    The denoised output of a first stage is the step's start (what the second reads as D'), not x0.
    diffusers' step draws no noise; the model sees x / sqrt(sigma^2 + 1) at the stage's sigma."""
    prediction_type = _checks.choice(scheduler.config.prediction_type, "prediction_type", ANCESTRAL_PREDICTION_TYPES)
    start = _checks.nonneg_int(start, "start")
    sigmas, mids = host_sigmas(scheduler).tolist(), host_values(scheduler.sigmas_interpol).tolist()
    n = len(scheduler.timesteps)
    first = heun_stages(n, start)
    rows, levels = [], []
    for k in range(n):
        levels.append((sigmas[k], mids[k + 1], sigmas[k + 1]) if first[k] else (sigmas[k - 1], mids[k], sigmas[k]))
        sigma, sigma_mid, sigma_next = levels[-1]
        if first[k]:
            columns, r = _x0_columns(prediction_type, sigma, sigma), sigma_mid / sigma
            rows.append(dict(**columns, dx=1.0, d0=0.0, ax=r + (1 - r) * columns["cx"], af=(1 - r) * columns["cf"]))
        else:
            b = (sigma_next - sigma) / sigma_mid
            rows.append(dict(**_x0_columns(prediction_type, sigma_mid, sigma_mid), ax=b, ad=-b, ap=1.0))

    def reference(k, f, x, prev, z):
        return kdpm2_stage(f, x, prev, *levels[k], first=first[k], prediction_type=prediction_type)

    scales = [1.0 / math.sqrt((level[0] if first[k] else level[1]) ** 2 + 1) for k, level in enumerate(levels)]
    return scheduler_table(scheduler, "kdpm2", rows, reference, generator_draws=[False] * n, model_input_scales=scales,
                           init_noise_sigma=float(scheduler.init_noise_sigma), reads_previous=n > 1)


def kdpm2_ancestral_stage(model_output, x, prev_start, sigma, sigma_mid, sigma_down, sigma_up, *, first,
                          prediction_type, noise=None):
    """One stage of ancestral DPM-Solver-2 (k-diffusion's sample_dpm_2_ancestral) as diffusers runs it:
    the first stage as ``kdpm2_stage`` (to the midpoint sigma_mid of sigma_i and sigma_down), the second

        x_i+1 = x_i + (sigma_down - sigma_i) (x - D(x; sigma_mid)) / sigma_mid + sigma_up z

    with sigma_up, sigma_down the ancestral split of sigma_i+1 (``euler_ancestral_step``). Returns
    (x_mid, x_i) from a first stage, (x_i+1, D(x; sigma_mid)) from a second."""
    if first:
        d = (x - denoised(model_output, x, sigma, prediction_type)) / sigma
        return x + (sigma_mid - sigma) * d, x.clone()
    d0 = denoised(model_output, x, sigma_mid, prediction_type)
    return prev_start + (sigma_down - sigma) * (x - d0) / sigma_mid + sigma_up * noise, d0


@table_builder("KDPM2AncestralDiscreteScheduler")
def kdpm2_ancestral_table(scheduler, *, start=0):
    """The StepTable of diffusers' KDPM2AncestralDiscreteScheduler after ``set_timesteps`` (a run from step
    ``start``), its tables read as diffusers' step reads them: sigmas[k], sigmas_interpol[k] in a first
    stage; sigmas[k - 1], sigmas_interpol[k - 1], sigmas_down[k - 1], sigmas_up[k - 1] in a second. Rows
    as ``kdpm2_table``'s (D = x in a first stage, what the second reads as D'), the second with
    b = (sigma_down - sigma) / sigma_mid and NOISE = sigma_up; diffusers' step draws from its generator
    in every second stage."""
    prediction_type = _checks.choice(scheduler.config.prediction_type, "prediction_type", ANCESTRAL_PREDICTION_TYPES)
    start = _checks.nonneg_int(start, "start")
    sigmas, mids, ups, downs = (host_values(getattr(scheduler, name)).tolist()
                                for name in ("sigmas", "sigmas_interpol", "sigmas_up", "sigmas_down"))
    n = len(scheduler.timesteps)
    first = heun_stages(n, start)
    rows, levels = [], []
    for k in range(n):
        j = k if first[k] else k - 1
        levels.append((sigmas[j], mids[j], downs[k - 1], ups[j]))
        sigma, sigma_mid, sigma_down, sigma_up = levels[-1]
        if first[k]:
            columns, r = _x0_columns(prediction_type, sigma, sigma), sigma_mid / sigma
            rows.append(dict(**columns, dx=1.0, d0=0.0, ax=r + (1 - r) * columns["cx"], af=(1 - r) * columns["cf"]))
        else:
            b = (sigma_down - sigma) / sigma_mid
            rows.append(dict(**_x0_columns(prediction_type, sigma_mid, sigma_mid), ax=b, ad=-b, ap=1.0, noise=sigma_up))

    def reference(k, f, x, prev, z):
        return kdpm2_ancestral_stage(f, x, prev, *levels[k], first=first[k], prediction_type=prediction_type, noise=z)

    scales = [1.0 / math.sqrt((level[0] if first[k] else level[1]) ** 2 + 1) for k, level in enumerate(levels)]
    return scheduler_table(scheduler, "kdpm2_ancestral", rows, reference, generator_draws=[not f for f in first],
                           model_input_scales=scales, init_noise_sigma=float(scheduler.init_noise_sigma),
                           reads_previous=n > 1)


__all__ = ["denoised", "churn_gamma", "euler_step", "euler_ancestral_step", "euler_table", "euler_ancestral_table",
           "heun_stage", "heun_stages", "heun_table", "kdpm2_stage", "kdpm2_table",
           "kdpm2_ancestral_stage", "kdpm2_ancestral_table",
           "EULER_PREDICTION_TYPES", "ANCESTRAL_PREDICTION_TYPES"]

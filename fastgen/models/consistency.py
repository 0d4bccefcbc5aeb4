"""Consistency distillation (Song, Dhariwal, Chen, Sutskever 2023, "Consistency Models", Algorithm 2)
of a DDPM denoiser into a one- and few-step sampler for ``CMStochasticIterativeScheduler``.

Two descriptions of the same noisy sample. The teacher is a DDPM denoiser on ``alphas_cumprod``
(variance preserving: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps at integer t); the consistency
model lives in the variance-exploding (EDM) time sigma, x_sigma = x_0 + sigma eps. They are one
sample up to a scale:

    sigma(t) = sqrt((1 - abar_t) / abar_t),   x_sigma = x_t / sqrt(abar_t) = sqrt(1 + sigma^2) x_t

and a sigma between two training timesteps gets the teacher timestep interpolated linearly in
log sigma (what diffusers' Euler schedulers feed such models). The teacher's data prediction at
(x_sigma, sigma) is x0 = a(sigma) x_sigma + b(sigma) m, m = teacher(x_sigma / sqrt(1 + sigma^2), t(sigma)):
epsilon a = 1, b = -sigma; v_prediction a = 1 / (1 + sigma^2), b = -sigma / sqrt(1 + sigma^2);
sample a = 0, b = 1.

The student, in the parameterisation CMStochasticIterativeScheduler steps with (eq. 7, App. C;
fastgen/reference/consistency.py), epsilon = sigma_min, sigma_data = 0.5:

    f_theta(x, sigma) = c_skip(sigma) x + c_out(sigma) F_theta(c_in(sigma) x, 250 log sigma)

``ConsistencyModel`` is F_theta as the scheduler calls it: ``model(x_in, t)`` with x_in =
``scale_model_input(x, t)`` = c_in(sigma) x = x / sqrt(sigma^2 + sigma_data^2) and t exactly what
``scheduler.timesteps`` holds, 250 log sigma (``sigma_to_t``); it returns F. Its network is a copy of
the teacher's, read in EDM's parameterisation: F = (x0_net - c_skip^EDM x) / c_out^EDM with
c_skip^EDM = sigma_data^2 / (sigma^2 + sigma_data^2), c_out^EDM = sigma sigma_data / sqrt(sigma^2 +
sigma_data^2) (Karras et al. 2022, Table 1), formed as (a - c_skip^EDM) / c_out^EDM x + b / c_out^EDM m
in float64 coefficients (no division by a vanishing c_out). EDM's scalings are the consistency ones
with sigma for sigma - epsilon, so at initialisation f_theta is the teacher's x0 away from the
boundary, and f_theta(x, epsilon) = x exactly, as Song et al. initialise from an EDM teacher.

Two distillation objectives on the same N Karras sigmas sigma_0 > ... > sigma_{N-1} = epsilon of the
scheduler's ``num_train_timesteps`` = N, ``sigma_max``, ``rho`` = 7, both initialised from the teacher.

"trajectory" (the default; the consistency function by its definition, with the teacher's solution as
its target, as Luhman & Luhman 2021 distil the whole ODE map into one step): a consistency function
maps every point of a probability-flow ODE trajectory to the trajectory's origin, so solve the
teacher's ODE once for a pool of trajectories (``teacher_trajectories``: DDIM from sigma_0 z with a few
DDIM steps per grid interval, ending at the teacher's x0) and regress

    d(f_theta(x_j(sigma_k), sigma_k), x_j(0))           k ~ U{0..N-2} (sigma_0 more often), j a trajectory

The targets are fixed, so no error is bootstrapped from one sigma to the next. On the digits, after
20000 steps the 1-step sampler reaches a confidence of 0.955 and the 2-step one (searched midpoint)
the teacher's DDIM-50 confidence (docs/consistency.md); Algorithm 2 had not reached 0.85 after 14000 steps.
The regression leaves 1-step samples blurred where the noise-to-digit map changes class; a second
stage from the regressed student (``init``) adds a distribution-matching term for the 1-step samples
(``DistributionMatching``, Yin et al. 2024), which brings the 1-step sampler past the teacher's DDIM-10.

"consistency", Algorithm 2: per sample, k ~ U{0..N-2},
z ~ N(0, I) (counter-based), x = x_0 + sigma_k z, one step of the teacher's ODE solver to sigma_{k+1}
(DDIM, which on the VE ODE is Euler: x^ = x0 + sigma_{k+1} (x - x0) / sigma_k, x0 the teacher's,
clipped as its DDIM clips it), and the loss

    d(f_theta(x, sigma_k), f_theta-(x^, sigma_{k+1}))       d: pseudo-Huber sqrt(|a - b|^2 + c^2) - c,
                                                           c = 0.00054 sqrt(dim) (Song & Dhariwal 2023), or L2

with the target network theta- <- stopgrad(mu theta- + (1 - mu) theta) after each step (mu = 0.95 in
the paper's CD runs; ``target_decay`` defaults to mu = 0, the target being the student itself without
gradient, as Song & Dhariwal 2023 recommend: in 5000-step pilots on the digits it reached a 1-step
MMD^2 of 0.105 against 0.124 with mu = 0.95, the 2- and 4-step samplers alike), and a slower moving
average of theta (``ema_decay``) saved as the model.
A class-conditional teacher is distilled on the digits' labels, each replaced by the null label with
probability ``label_dropout``, so the student samples with and without labels as the teacher does.

    from fastgen.models.consistency import consistency_sampler
    model, scheduler = consistency_sampler()      # the shipped distilled model, if any, or a checkpoint
    x = fastgen.sample(model, (64, 1, 8, 8), scheduler, num_inference_steps=2, seed=0)
"""
import copy
import importlib.resources
import math
import time

import torch

import fastgen
from fastgen import _checks
from fastgen.models import _checkpoint, _training, denoisers
from fastgen.reference.consistency import SIGMA_DATA, boundary_scalings, karras_sigmas
from fastgen.schedules import NoiseSchedule

CHECKPOINT_FORMAT = "fastgen-consistency/1"
PRETRAINED = {"digits": "consistency_digits.pt"}
DISTANCES = ("pseudo-huber", "l2")
SIGMA_MAX = 80.0  # Karras et al.'s and the paper's; capped by the teacher's largest sigma
OBJECTIVES = ("trajectory", "consistency")
FIRST_SIGMA_SHARES = {"trajectory": 0.3, "consistency": 0.0}  # each objective's default first_sigma_share
TRAIN_SETTINGS = ("steps", "num_scales", "batch_size", "lr", "target_decay", "ema_decay", "distance", "seed",
                  "label_dropout", "objective", "trajectories", "substeps", "first_sigma_share",
                  "distribution_matching", "init")
DM_TIMES = (0.02, 0.98)     # the teacher times of the distribution-matching term, as shares of T (Yin et al.)
DM_ADAM_BETAS = (0.0, 0.99)  # Adam's betas for the student and the fake denoiser under distribution matching
FAKE_UPDATES = 2            # fake-denoiser steps per student step


# --- the two times ---------------------------------------------------------------------------------

class TeacherTime:
    """sigma <-> the teacher's timestep: the sigmas sqrt((1 - abar_t) / abar_t) of its training
    timesteps (float64, increasing) and the timestep of any sigma, interpolated in log sigma;
    ``schedule`` is the teacher's NoiseSchedule."""

    def __init__(self, scheduler_config: dict):
        keys = {k: scheduler_config[k] for k in denoisers.SCHEDULE_KEYS if k in scheduler_config}
        self.schedule = NoiseSchedule(**keys)
        abar = self.schedule.alphas_cumprod.double()
        self.log_sigmas = (0.5 * (torch.log1p(-abar) - torch.log(abar)))  # log sqrt((1 - abar) / abar)
        finite = torch.isfinite(self.log_sigmas)  # a zero-SNR schedule's last sigma is infinite
        self.sigma_min = float(self.log_sigmas[0].exp())
        self.sigma_max = float(self.log_sigmas[finite][-1].exp())

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The teacher's (fractional) timestep of each sigma, clamped to [0, T - 1]; float32 on sigma's device."""
        table = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.double().log().clamp(float(table[0]), float(table[torch.isfinite(table)][-1]))
        high = torch.searchsorted(table, log_sigma).clamp(1, len(table) - 1)
        low = high - 1
        w = (log_sigma - table[low]) / (table[high] - table[low])
        return (low + w.clamp(0, 1)).float()


def x0_coefficients(prediction_type: str, sigma: torch.Tensor):
    """(a, b) with the teacher's x0 = a x_sigma + b m (module docstring), float64 like sigma."""
    if prediction_type == "epsilon":
        return torch.ones_like(sigma), -sigma
    if prediction_type == "v_prediction":
        return 1.0 / (1.0 + sigma**2), -sigma / torch.sqrt(1.0 + sigma**2)
    if prediction_type == "sample":
        return torch.zeros_like(sigma), torch.ones_like(sigma)
    raise ValueError(f"prediction_type must be one of 'epsilon', 'v_prediction', 'sample', got {prediction_type!r}")


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.dtype).reshape(-1, *(1,) * (like.dim() - 1))


def teacher_x0(teacher, x, sigma, class_labels=None, *, time: TeacherTime, clip: bool):
    """The teacher's data prediction at the VE sample x [B, ...] and sigma [B] (float64)."""
    t = time.timestep(sigma)
    x_vp = x * _per_sample(1.0 / torch.sqrt(1.0 + sigma**2), x)
    m = teacher(x_vp, t) if class_labels is None else teacher(x_vp, t, class_labels)
    a, b = x0_coefficients(teacher.prediction_type, sigma)
    x0 = _per_sample(a, x) * x + _per_sample(b, x) * m
    return x0.clamp(-1.0, 1.0) if clip else x0


def ddim_step(teacher, x, sigma, sigma_next, class_labels=None, *, time: TeacherTime, clip: bool):
    """One DDIM step of the teacher from sigma to sigma_next (VE): x0 + sigma_next (x - x0) / sigma."""
    x0 = teacher_x0(teacher, x, sigma, class_labels, time=time, clip=clip)
    return x0 + _per_sample(sigma_next / sigma, x) * (x - x0)


# --- the student -----------------------------------------------------------------------------------

class ConsistencyModel(torch.nn.Module):
    """F_theta as CMStochasticIterativeScheduler calls it (module docstring): ``forward(x_in, t,
    class_labels=None)`` with x_in = c_in(sigma) x and t = 250 log sigma, both as the scheduler's
    ``scale_model_input`` and ``timesteps`` give them. ``net`` is a denoiser of the teacher's
    architecture; ``teacher_scheduler_config`` its noise schedule (diffusers' DDPMScheduler arguments)."""

    def __init__(self, net, teacher_scheduler_config: dict, sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.net = net
        self.teacher_scheduler_config = dict(teacher_scheduler_config)
        self.time = TeacherTime(self.teacher_scheduler_config)
        self.sigma_data = float(sigma_data)
        self.prediction_type = net.prediction_type
        self.num_classes, self.null_class_label = net.num_classes, net.null_class_label

    def forward(self, x_in, t, class_labels=None):
        if not isinstance(t, torch.Tensor):
            t = torch.tensor(t, dtype=torch.float64, device=x_in.device)
        sigma = torch.exp(t.to(x_in.device, torch.float64) / 250.0).reshape(-1).expand(x_in.shape[0])
        x = x_in * _per_sample(torch.sqrt(sigma**2 + self.sigma_data**2), x_in)
        x_vp = x * _per_sample(1.0 / torch.sqrt(1.0 + sigma**2), x)
        m = self.net(x_vp, self.time.timestep(sigma), class_labels)
        a, b = x0_coefficients(self.prediction_type, sigma)
        sd2 = self.sigma_data**2
        c_skip, c_out = sd2 / (sigma**2 + sd2), sigma * self.sigma_data / torch.sqrt(sigma**2 + sd2)
        return _per_sample((a - c_skip) / c_out, x) * x + _per_sample(b / c_out, x) * m

    def denoise(self, x, sigma, class_labels=None, *, sigma_min: float):
        """f_theta(x, sigma) = c_skip x + c_out F(c_in x, 250 log sigma): the consistency function (unclipped)."""
        c_skip, c_out = boundary_scalings(sigma, sigma_min, self.sigma_data)
        x_in = x * _per_sample(1.0 / torch.sqrt(sigma**2 + self.sigma_data**2), x)
        f = self(x_in, 250.0 * torch.log(sigma), class_labels)
        return _per_sample(c_skip, x) * x + _per_sample(c_out, x) * f


def scheduler_config(teacher_scheduler_config: dict, num_scales: int = 18, sigma_max: float = SIGMA_MAX) -> dict:
    """The CMStochasticIterativeScheduler arguments of a student of this teacher: N = ``num_scales``
    Karras sigmas from sigma_max (capped at the teacher's largest) to the teacher's smallest sigma
    (epsilon, the boundary), sigma_data 0.5, rho 7, denoised outputs clipped to [-1, 1]."""
    num_scales = _checks.as_int(num_scales, "num_scales")
    if num_scales < 2:
        raise ValueError(f"num_scales must be >= 2 (the boundary and one more sigma), got {num_scales}")
    time = TeacherTime(teacher_scheduler_config)
    return dict(num_train_timesteps=num_scales, sigma_min=time.sigma_min, sigma_max=min(sigma_max, time.sigma_max),
                sigma_data=SIGMA_DATA, s_noise=1.0, rho=7.0, clip_denoised=True)


def make_scheduler(config: dict, **kwargs):
    """fastgen's CMStochasticIterativeScheduler with ``config`` (``kwargs``: e.g. backend)."""
    from fastgen.schedulers import CMStochasticIterativeScheduler

    return CMStochasticIterativeScheduler(**config, **kwargs)


# --- distillation ----------------------------------------------------------------------------------

def draw_labels(teacher, n: int, label_dropout: float, generator: torch.Generator):
    """n class labels for a conditional teacher (None for an unconditional one): uniform classes, each
    replaced by the null label with probability ``label_dropout``."""
    if not teacher.num_classes:
        return None
    labels = torch.randint(0, teacher.num_classes, (n,), generator=generator)
    return torch.where(torch.rand(n, generator=generator) < label_dropout, teacher.null_class_label, labels)


def teacher_trajectories(teacher, n: int, sigmas: torch.Tensor, shape, *, substeps: int = 3, label_dropout: float,
                         seed: int, time: TeacherTime, clip: bool, batch_size: int = 4096, progress: bool = False):
    """``n`` probability-flow ODE trajectories of ``teacher``: (points, ends, labels) with points
    [n, N - 1, *shape] the samples at the grid ``sigmas`` sigma_0 .. sigma_{N-2} (decreasing, float64),
    ends [n, *shape] where each trajectory lands, clipped to [-1, 1], and labels [n] (None for an
    unconditional teacher).

    Trajectory j starts at sigma_0 z_j, z_j sample j of the counter-based stream 1 of ``seed``
    (batch-invariant), and runs the teacher's DDIM (``ddim_step``, clipped as its DDIM clips) through
    ``substeps`` Karras sigmas per grid interval (the grid is every ``substeps``-th of them, rho 7), then
    one last step to sigma = 0: its end is the teacher's x0 at the boundary sigma_{N-1}. Labels: a class
    drawn uniformly, replaced by the null label with probability ``label_dropout`` (generator seeded
    ``seed``)."""
    num_scales = len(sigmas)
    fine = karras_sigmas((num_scales - 1) * substeps + 1, float(sigmas[-1]), float(sigmas[0]))
    rng = torch.Generator().manual_seed(seed)
    points = torch.empty(n, num_scales - 1, *shape)
    ends = torch.empty(n, *shape)
    labels = draw_labels(teacher, n, label_dropout, rng)
    bar = _training.progress(n, progress, "teacher trajectories")
    with torch.no_grad():
        for first in range(0, n, batch_size):
            rows = slice(first, min(first + batch_size, n))
            count = rows.stop - first
            batch_labels = None if labels is None else labels[rows]
            x = fastgen.randn((count, *shape), seed=seed, stream=1, offset=first) * float(fine[0])
            for j in range(len(fine) - 1):
                if j % substeps == 0:
                    points[rows, j // substeps] = x
                x = ddim_step(teacher, x, fine[j].expand(count), fine[j + 1].expand(count), batch_labels,
                              time=time, clip=clip)
            ends[rows] = teacher_x0(teacher, x, fine[-1].expand(count), batch_labels, time=time, clip=clip).clamp(-1, 1)
            bar.update(count)
    bar.close()
    return points, ends, labels


# --- distribution matching -------------------------------------------------------------------------

class DistributionMatching:
    """The distribution-matching term of the 1-step sampler (Yin et al. 2024, "One-step Diffusion with
    Distribution Matching Distillation"), beside the trajectory regression.

    The 1-step sample x = f_theta(sigma_0 z, sigma_0) is noised to x_s = x + s eps at a teacher time
    t ~ U{0.02 T .. 0.98 T - 1}, s = sigma(t). The gradient of KL(p_student,s || p_teacher,s) with
    respect to x is the difference of the two scores, estimated in data space and normalised:

        g = (x0_fake(x_s, s) - x0_teacher(x_s, s)) / mean|x - x0_teacher(x_s, s)|

    with x0_fake the data prediction of a "fake" denoiser: a copy of the teacher trained online, with
    the teacher's own loss (``denoisers.training_target``), on the student's 1-step samples, so that it
    scores the student's distribution. The student's loss is 0.5 |x - stopgrad(x - g)|^2 per sample,
    whose gradient with respect to x is g."""

    def __init__(self, teacher, time: TeacherTime, lr: float):
        self.teacher, self.time = teacher, time
        self.fake = copy.deepcopy(teacher).requires_grad_(True).train()
        self.optimizer = torch.optim.Adam(self.fake.parameters(), lr=lr, betas=DM_ADAM_BETAS)

    def times(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n teacher timesteps t ~ U{0.02 T .. 0.98 T - 1}."""
        T = self.time.schedule.num_train_timesteps
        return torch.randint(round(DM_TIMES[0] * T), round(DM_TIMES[1] * T), (n,), generator=generator)

    def gradient(self, x, class_labels, t, eps) -> torch.Tensor:
        """g at the samples x [B, ...] (no gradient), noised with eps at the teacher timesteps t [B]."""
        sigma = self.time.log_sigmas[t].exp()
        x_s = x.detach() + _per_sample(sigma, x) * eps
        with torch.no_grad():
            real = teacher_x0(self.teacher, x_s, sigma, class_labels, time=self.time, clip=False)
            fake = teacher_x0(self.fake, x_s, sigma, class_labels, time=self.time, clip=False)
        scale = (x.detach() - real).abs().reshape(len(x), -1).mean(dim=1).clamp_min(1e-3)
        return (fake - real) / _per_sample(scale, x)

    def student_loss(self, x, class_labels, t, eps) -> torch.Tensor:
        """0.5 |x - stopgrad(x - g)|^2 per sample [B]: its gradient with respect to x is g."""
        target = x.detach() - self.gradient(x, class_labels, t, eps)
        return 0.5 * (x - target).square().reshape(len(x), -1).sum(dim=1)

    def update_fake(self, x0, class_labels, t, eps, lr: float) -> torch.Tensor:
        """One Adam step of the fake denoiser on the student's samples x0 (the teacher's loss at t, eps);
        returns that loss (detached, no host sync)."""
        schedule = self.time.schedule
        x_t = fastgen.q_sample(x0.detach(), t, schedule, noise=eps)
        target = denoisers.training_target(self.fake.prediction_type, x0.detach(), eps, t, schedule)
        loss = (self.fake(x_t, t, class_labels) - target).square().mean()
        _training.set_learning_rate(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def distance(a, b, kind: str):
    """Per-sample distance: pseudo-Huber sqrt(|a - b|^2 + c^2) - c with c = 0.00054 sqrt(dim), or the
    mean squared error."""
    diff = (a - b).reshape(a.shape[0], -1)
    if kind == "l2":
        return diff.square().mean(dim=1)
    c = 0.00054 * math.sqrt(diff.shape[1])
    return torch.sqrt(diff.square().sum(dim=1) + c * c) - c


def distill(teacher, out, *, objective: str = "trajectory", steps: int = 4000, num_scales: int = 18,
            batch_size: int = 128, lr: float = 4e-4, target_decay: float = 0.0, ema_decay: float = 0.999,
            distance_kind: str = "pseudo-huber", label_dropout: float = 0.15, trajectories: int = 122880,
            substeps: int = 3, first_sigma_share: float = None, seed: int = 0, resume: bool = False,
            distribution_matching: float = 0.0, init=None, checkpoint_every: int = 500, slim: bool = False,
            threads: int = None, progress: bool = True, quality_samples: int = 500,
            search_samples: int = 2000) -> dict:
    """Distillation of ``teacher`` (a fastgen denoiser with ``scheduler_config``) into a consistency
    model saved at ``out`` with ``objective`` (module docstring): "trajectory" regresses the student on
    ``trajectories`` teacher trajectories (``teacher_trajectories``, ``substeps`` DDIM steps per grid
    interval, made before the first step and again, identically, on resume), "consistency" is
    Algorithm 2 on the train digits. k ~ U{0..N-2}, but sigma_0 (where every sampler starts, and all
    a 1-step one sees) for a share ``first_sigma_share`` of the samples (default:
    ``FIRST_SIGMA_SHARES[objective]``). Adam at ``lr`` (warm-up, cosine decay). Batches from
    a permutation of the trajectories or digits seeded by ``seed``, k and label dropout from the same
    generator, z from the counter-based stream (``fastgen.randn(seed=seed)``, sample after sample).

    ``distribution_matching`` > 0 (trajectory objective only) adds that weight times the
    ``DistributionMatching`` term of batch_size // 2 1-step samples per step (z from stream 2, their
    noise from stream 3, labels as the trajectories'), and trains its fake denoiser ``FAKE_UPDATES``
    times per step on as many fresh 1-step samples (streams 4 and 5) at twice the student's learning
    rate; both use Adam with betas ``DM_ADAM_BETAS``. ``init``: a checkpoint of this function (a
    student of the same teacher and ``num_scales``) whose weights the student starts from instead of
    the teacher's, as the distribution-matching stage starts from a regressed student.

    Resumable (fastgen.models._training): every ``checkpoint_every`` steps the checkpoint at ``out`` is
    replaced atomically with the EMA student and the run's state (student, target and EMA weights,
    Adam, the fake denoiser and its Adam, data order and cursor, noise offset, generators, settings);
    ``resume=True`` continues it bit for bit with its own settings (and the teacher given). At the end, on the EMA student rounded to
    fp16 as saved, the 2-step timesteps are searched (``search_two_step``, ``search_samples`` samples,
    seed + 2), the 1-, 2-, searched 2- and 4-step samplers scored (``sample_quality``,
    ``quality_samples`` samples, seed + 1), and both go into the metadata; ``slim`` leaves the
    training state out.
    Returns dict(model, scheduler_config, quality, seconds, loss)."""
    out, state, resume_from = _training.start(out, resume, threads,
                                              lambda path: _checkpoint.load(path, CHECKPOINT_FORMAT))
    teacher_config = dict(teacher.scheduler_config)
    if resume:
        (steps, num_scales, batch_size, lr, target_decay, ema_decay, distance_kind, seed, label_dropout, objective,
         trajectories, substeps, first_sigma_share, distribution_matching,
         init) = (resume_from[k] for k in TRAIN_SETTINGS)
        if dict(state["teacher_scheduler_config"]) != teacher_config:
            raise ValueError("teacher must be the run's teacher: its scheduler_config differs from the checkpoint's")
    steps = _checks.nonneg_int(steps, "steps")
    batch_size = _checks.as_int(batch_size, "batch_size")
    checkpoint_every = _checks.as_int(checkpoint_every, "checkpoint_every")
    trajectories, substeps = _checks.as_int(trajectories, "trajectories"), _checks.as_int(substeps, "substeps")
    for name, value in (("batch_size", batch_size), ("checkpoint_every", checkpoint_every),
                        ("trajectories", trajectories), ("substeps", substeps)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    _checks.choice(distance_kind, "distance_kind", DISTANCES)
    _checks.choice(objective, "objective", OBJECTIVES)
    if first_sigma_share is None:
        first_sigma_share = FIRST_SIGMA_SHARES[objective]
    distribution_matching = float(distribution_matching)
    if not distribution_matching >= 0.0 or math.isinf(distribution_matching):
        raise ValueError(f"distribution_matching must be a finite weight >= 0, got {distribution_matching!r}")
    if distribution_matching and (objective != "trajectory" or batch_size < 2):
        raise ValueError("distribution_matching > 0 needs objective='trajectory' and batch_size >= 2, got "
                         f"objective={objective!r}, batch_size={batch_size}")
    for name, value in (("target_decay", target_decay), ("ema_decay", ema_decay), ("label_dropout", label_dropout),
                        ("first_sigma_share", first_sigma_share)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    settings = dict(steps=steps, num_scales=num_scales, batch_size=batch_size, lr=lr, target_decay=target_decay,
                    ema_decay=ema_decay, distance=distance_kind, seed=seed, label_dropout=label_dropout,
                    objective=objective, trajectories=trajectories, substeps=substeps,
                    first_sigma_share=first_sigma_share, distribution_matching=distribution_matching,
                    init=None if init is None else str(init))
    cm_config = scheduler_config(teacher_config, num_scales)
    sigma_min = cm_config["sigma_min"]
    sigmas = karras_sigmas(num_scales, sigma_min, cm_config["sigma_max"], cm_config["rho"])  # decreasing
    time_map = TeacherTime(teacher_config)
    clip = bool(teacher_config.get("clip_sample", True))
    teacher = teacher.eval().requires_grad_(False)
    architecture = next(name for name, cls in denoisers.ARCHITECTURES.items() if isinstance(teacher, cls))
    student = ConsistencyModel(copy.deepcopy(teacher).requires_grad_(True), teacher_config)
    if init is not None and resume_from is None:
        student.net.load_state_dict(_initial_student(init, teacher, cm_config).net.state_dict())
    target = copy.deepcopy(student).requires_grad_(False)
    ema = copy.deepcopy(student).requires_grad_(False)
    clock = _training.Stopwatch(0.0)
    data, labels = denoisers.digits_for_training(architecture, labels=True)
    sample_shape = data.shape[1:]
    if objective == "trajectory":  # rows are trajectories: their points at sigma_0..sigma_{N-2}, ends, labels
        data, ends, labels = teacher_trajectories(teacher, trajectories, sigmas, sample_shape, substeps=substeps,
                                                  label_dropout=label_dropout, seed=seed, time=time_map, clip=clip,
                                                  progress=progress)
    rng = torch.Generator().manual_seed(seed)
    matching = DistributionMatching(teacher, time_map, 2 * lr) if distribution_matching else None
    opt = torch.optim.Adam(student.parameters(), lr=lr, **({"betas": DM_ADAM_BETAS} if matching else {}))
    optimizers = {"optimizer": opt} if matching is None else {"optimizer": opt, "fake_optimizer": matching.optimizer}
    nets = dict(student=student.net, target=target.net, ema=ema.net, **({"fake": matching.fake} if matching else {}))
    start, seconds, cursor, drawn = 0, 0.0, 0, 0
    if resume_from is not None:
        for name, net in nets.items():
            net.load_state_dict(resume_from[name])
        start, seconds = _training.restore(resume_from, optimizers, rng)
        order, cursor, drawn = resume_from["order"], resume_from["cursor"], resume_from["drawn"]
    else:
        order = torch.randperm(len(data), generator=rng)
    warmup = min(200, max(steps // 10, 1))

    def state(step):
        weights = {name: {k: v.detach().clone() for k, v in net.state_dict().items()} for name, net in nets.items()}
        return _training.state(step, clock.seconds(), settings, optimizers, rng, order=order.clone(),
                               cursor=cursor, drawn=drawn, **weights)

    def one_step(n, stream, offset, class_labels):  # f_theta(sigma_0 z, sigma_0), z sample offset.. of stream
        z = fastgen.randn((n, *sample_shape), seed=seed, stream=stream, offset=offset)
        return student.denoise(float(sigmas[0]) * z, sigmas[:1].expand(n), class_labels, sigma_min=sigma_min)

    def save(model, training, **metadata):
        save_checkpoint(out, model, cm_config, training=training, **settings, **metadata)

    losses = []
    student.train()
    bar = _training.progress(steps - start, progress, "consistency distillation")
    clock = _training.Stopwatch(seconds + clock.seconds())  # the trajectories' time counts in every sitting
    for step in range(start, steps):
        if cursor + batch_size > len(data):
            order, cursor = torch.randperm(len(data), generator=rng), 0
        rows = order[cursor:cursor + batch_size]
        cursor += batch_size
        k = torch.randint(0, num_scales - 1, (batch_size,), generator=rng)
        k = torch.where(torch.rand(batch_size, generator=rng) < first_sigma_share, 0, k)
        sigma = sigmas[k]
        if objective == "trajectory":
            x, want = data[rows, k], ends[rows]
            class_labels = None if labels is None else labels[rows]
        else:
            x0 = data[rows]
            class_labels = None
            if teacher.num_classes:
                dropped = torch.rand(batch_size, generator=rng) < label_dropout
                class_labels = torch.where(dropped, teacher.null_class_label, labels[rows])
            z = fastgen.randn(x0.shape, seed=seed, offset=drawn)
            drawn += batch_size
            x = x0 + _per_sample(sigma, x0) * z                                    # x_{t_{n+1}}
            with torch.no_grad():
                x_hat = ddim_step(teacher, x, sigma, sigmas[k + 1], class_labels, time=time_map, clip=clip)
                want = target.denoise(x_hat, sigmas[k + 1], class_labels, sigma_min=sigma_min)
        got = student.denoise(x, sigma, class_labels, sigma_min=sigma_min)
        loss = distance(got, want, distance_kind).mean()
        if matching is not None:
            n = batch_size // 2
            matching_labels = draw_labels(teacher, n, label_dropout, rng)
            x1 = one_step(n, 2, step * n, matching_labels)
            eps = fastgen.randn(x1.shape, seed=seed, stream=3, offset=step * n)
            loss = loss + distribution_matching * matching.student_loss(x1, matching_labels, matching.times(n, rng),
                                                                        eps).mean()
        step_lr = _training.learning_rate(step, steps, lr, warmup)
        _training.set_learning_rate(opt, step_lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p_target, p_ema, p in zip(target.parameters(), ema.parameters(), student.parameters()):
                p_target.lerp_(p, 1.0 - target_decay)
                p_ema.lerp_(p, 1.0 - ema_decay)
        for update in range(FAKE_UPDATES if matching is not None else 0):
            offset = (step * FAKE_UPDATES + update) * n
            fake_labels = draw_labels(teacher, n, label_dropout, rng)
            with torch.no_grad():
                x1 = one_step(n, 4, offset, fake_labels)
            t = torch.randint(0, time_map.schedule.num_train_timesteps, (n,), generator=rng)
            matching.update_fake(x1, fake_labels, t, fastgen.randn(x1.shape, seed=seed, stream=5, offset=offset),
                                 2 * step_lr)
        _training.record_loss(losses, loss, step, bar, "consistency distillation")
        bar.update()
        if _training.checkpoint_due(step, steps, checkpoint_every):
            save(ema, state(step + 1), step=step + 1)
    bar.close()
    training = state(steps)
    model = ema.eval().requires_grad_(False)
    with torch.no_grad():  # score the weights as they are saved: rounded to fp16
        for p in model.parameters():
            p.copy_(p.half().float())
    model.scheduler_config = cm_config
    two_step, _ = search_two_step(model, n=search_samples, seed=seed + 2)
    model.metadata = dict(two_step_timesteps=list(two_step))
    scores = sample_quality(model, n=quality_samples, seed=seed + 1)
    save(model, None if slim else training, seconds=round(training["seconds"], 1), quality_samples=quality_samples,
         two_step_timesteps=list(two_step),
         **{schedule_name(k): dict(confidence=q.confidence, mmd=q.mmd) for k, (q, _) in scores.items()})
    return dict(model=model, scheduler_config=cm_config, quality=scores, seconds=training["seconds"], loss=losses)


def _initial_student(init, teacher, cm_config: dict) -> ConsistencyModel:
    """The student of checkpoint ``init``, checked to be one of ``teacher`` with the run's sigmas."""
    student = load_checkpoint(init)
    if (student.net.config() != teacher.config() or student.teacher_scheduler_config != dict(teacher.scheduler_config)
            or student.scheduler_config != cm_config):
        raise ValueError(f"init must be a consistency checkpoint distilled from this teacher (same network and "
                         f"schedule) with num_scales={cm_config['num_train_timesteps']}; {str(init)!r} is not")
    return student


# --- checkpoints -----------------------------------------------------------------------------------

def save_checkpoint(path, model: ConsistencyModel, cm_config: dict, *, training: dict = None, **metadata):
    """Write the student (network architecture, config, fp16 weights), the teacher's noise schedule,
    the CMStochasticIterativeScheduler config and ``metadata`` (and ``training`` when given), atomically."""
    net = model.net
    arch = next(name for name, cls in denoisers.ARCHITECTURES.items() if isinstance(net, cls))
    weights = {k: (v.half() if v.is_floating_point() else v) for k, v in net.state_dict().items()}
    state = {"format": CHECKPOINT_FORMAT, "architecture": arch, "config": net.config(), "state_dict": weights,
             "teacher_scheduler_config": dict(model.teacher_scheduler_config), "scheduler_config": dict(cm_config),
             "metadata": metadata}
    if training is not None:
        state["training"] = training
    _checkpoint.save(state, path)


def load_checkpoint(path, *, device=None) -> ConsistencyModel:
    """The student of a checkpoint (eval mode, fp32, no gradients) with ``scheduler_config`` (the
    CMStochasticIterativeScheduler arguments) and ``metadata`` attributes; read as plain tensors."""
    state = _checkpoint.load(path, CHECKPOINT_FORMAT)
    model = ConsistencyModel(denoisers.network(state, path), state["teacher_scheduler_config"])
    model.scheduler_config = dict(state["scheduler_config"])
    model.metadata = dict(state["metadata"])
    return model.to(device or "cpu").eval().requires_grad_(False)


def pretrained_path(name: str = "digits"):
    """Path of a checkpoint shipped in fastgen/checkpoints."""
    return _checkpoint.shipped_path(PRETRAINED, name)


def consistency_sampler(checkpoint=None, *, device=None, backend: str = "auto"):
    """(model, scheduler) ready for ``fastgen.sample(model, shape, scheduler, num_inference_steps=1|2|4)``
    or ``timesteps=model.metadata["two_step_timesteps"]``: the student of ``checkpoint`` (default: the
    shipped digits one, distilled from the shipped digits denoiser in two stages, ``python -m fastgen
    train consistency --steps 20000 --batch-size 256 --trajectories 245760 --label-dropout 0.5 --slim
    --out consistency_regressed.pt`` and ``... --init consistency_regressed.pt --distribution-matching 4
    --lr 5e-5 --ema-decay 0.99 --steps 4000 --batch-size 256 --label-dropout 0.5 --slim`` (docs/consistency.md);
    its ``metadata`` holds its searched 2-step timesteps and its scores) and fastgen's
    CMStochasticIterativeScheduler with its config. The model is called as the scheduler's pipelines
    call it: model(scale_model_input(x, t), t), t from ``scheduler.timesteps`` (250 log sigma)."""
    if checkpoint is None:
        path = pretrained_path("digits")
        if not path.is_file():
            raise FileNotFoundError(f"no distilled consistency model is shipped at {path}; pass checkpoint= (made by "
                                    "python -m fastgen train consistency)")
        with importlib.resources.as_file(path) as file:
            model = load_checkpoint(file, device=device)
    else:
        model = load_checkpoint(checkpoint, device=device)
    return model, make_scheduler(model.scheduler_config, backend=backend)


# --- quality ---------------------------------------------------------------------------------------

# A schedule of the multistep sampler: k (diffusers' k-step timesteps: sigma_0 and every (N // k)-th
# sigma after it) or a tuple of custom timesteps as set_timesteps(timesteps=...) takes them: decreasing
# indices of the N sigmas, run in reverse, (j, 0) being sigma_0 -> sigma_j -> epsilon.

def schedule_name(schedule) -> str:
    """"2-step" for 2 steps, "2-step [12, 0]" for the custom timesteps (12, 0)."""
    if isinstance(schedule, int):
        return f"{schedule}-step"
    return f"{len(schedule)}-step {list(schedule)}"


def sampling_arguments(schedule) -> dict:
    """``fastgen.sample``'s (and ``set_timesteps``') argument for a schedule."""
    return {"num_inference_steps": schedule} if isinstance(schedule, int) else {"timesteps": list(schedule)}


def default_schedules(model) -> tuple:
    """1, 2 and 4 steps, and the searched 2-step timesteps when the model records them."""
    two_step = getattr(model, "metadata", {}).get("two_step_timesteps")
    return (1, 2, 4) if two_step is None else (1, 2, tuple(two_step), 4)


def sample_loop(model, scheduler, schedule, shape, *, seed: int = 0, class_labels=None):
    """The multistep consistency sampler as diffusers' pipeline runs it, in a plain loop: x_N =
    sigma_max z, then per timestep F = model(scale_model_input(x, t), t) and ``scheduler.step`` with
    counter-based noise (``seed``; the noise of x_N from stream N, as ``fastgen.sample`` draws it).
    ``schedule``: a number of steps or custom timesteps (above)."""
    scheduler.set_timesteps(**sampling_arguments(schedule))
    n = len(scheduler.timesteps)
    device = next(model.parameters()).device
    x = fastgen.randn(shape, seed=seed, stream=n, device=device) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            f = model(scheduler.scale_model_input(x, t), t.to(device).expand(shape[0]), class_labels)
            x = scheduler.step(f, t, x, seed=seed).prev_sample
    return x


def sample_quality(model, *, schedules=None, n: int = 500, seed: int = 1, backend: str = "torch",
                   class_labels=None) -> dict:
    """``fastgen.quality.digits_quality`` of ``n`` samples with each schedule in ``schedules`` (default:
    ``default_schedules``; ``sample_loop`` through the model's CMStochasticIterativeScheduler on
    ``backend``): {schedule: (Quality, seconds of the sampling loop)}."""
    from fastgen import quality

    scores = {}
    sample_loop(model, make_scheduler(model.scheduler_config, backend=backend), 1, (2, 1, 8, 8), seed=seed)  # warm-up
    for schedule in default_schedules(model) if schedules is None else schedules:
        scheduler = make_scheduler(model.scheduler_config, backend=backend)
        began = time.perf_counter()
        x = sample_loop(model, scheduler, schedule, (n, 1, 8, 8), seed=seed, class_labels=class_labels)
        seconds = time.perf_counter() - began
        scores[schedule] = (quality.digits_quality(x, value_range=(-1, 1)), seconds)
    return scores


def search_two_step(model, *, n: int = 2000, seed: int = 2, backend: str = "torch"):
    """The 2-step sampler's intermediate sigma, found by search as Song et al. choose theirs: of the
    timesteps (j, 0), sigma_0 -> sigma_j -> epsilon for j = 1 .. N-2, the one whose ``n``
    samples (seed ``seed``, the null label) have the smallest digits MMD^2. Returns (timesteps,
    {timesteps: Quality})."""
    num_scales = model.scheduler_config["num_train_timesteps"]
    candidates = [(j, 0) for j in range(1, num_scales - 1)]
    scores = {k: q for k, (q, _) in sample_quality(model, schedules=candidates, n=n, seed=seed,
                                                   backend=backend).items()}
    return min(candidates, key=lambda k: scores[k].mmd), scores


TEACHER_SAMPLERS = (("ddim", 10), ("ddim", 50), ("ddpm", 1000))


def schedule_sigmas(model, schedule) -> list:
    """The sigmas a schedule evaluates the model at (its sigma_0 first; the boundary left out)."""
    scheduler = make_scheduler(model.scheduler_config)
    scheduler.set_timesteps(**sampling_arguments(schedule))
    return [float(v) for v in scheduler.sigmas[:-1]]


def quality_table(model, teacher, *, n: int = 1000, seed: int = 1, schedules=None,
                  teacher_samplers=TEACHER_SAMPLERS) -> list:
    """The student's samplers (``schedules``, default ``default_schedules``) against the teacher's
    (default DDIM-10, DDIM-50 and DDPM-1000; torch backend, ``n`` samples each, seed ``seed``): one dict
    per sampler with its confidence, MMD^2, class counts and seconds per 1000 samples on this machine.
    ``markdown_table`` prints it."""
    from fastgen import quality, sampling

    def name(schedule):
        path = " -> ".join(f"{v:.3g}" for v in schedule_sigmas(model, schedule))
        return f"consistency {schedule_name(schedule)} (sigma {path})"

    rows = [dict(sampler=name(k), quality=q, seconds=s * 1000 / n)
            for k, (q, s) in sample_quality(model, schedules=schedules, n=n, seed=seed).items()]
    for kind, k in teacher_samplers:
        scheduler = sampling.make_scheduler(kind, **teacher.scheduler_config)
        began = time.perf_counter()
        with torch.no_grad():
            x = fastgen.sample(teacher, (n, 1, 8, 8), scheduler, num_inference_steps=k, seed=seed, backend="torch")
        seconds = time.perf_counter() - began
        rows.append(dict(sampler=f"teacher {kind.upper()}-{k}", quality=quality.digits_quality(x, value_range=(-1, 1)),
                         seconds=seconds * 1000 / n))
    return rows


def markdown_table(rows) -> str:
    """``quality_table``'s rows as a markdown table."""
    lines = ["| sampler | confidence | MMD^2 | class counts 0-9 | s / 1000 samples |", "|---|---|---|---|---|"]
    for r in rows:
        q = r["quality"]
        lines.append(f"| {r['sampler']} | {q.confidence:.3f} | {q.mmd:.4f} | {' '.join(map(str, q.class_counts))} "
                     f"| {r['seconds']:.2f} |")
    return "\n".join(lines)

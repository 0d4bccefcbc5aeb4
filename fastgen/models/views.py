"""A diffusion denoiser seen in other parametrisations, so samplers written for them run on a model
trained as a DDPM: a flow-matching velocity model (``FlowMatchEulerDiscreteScheduler``) and an
EDM-preconditioned network (``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler``).

A VP diffusion (Ho et al. 2020) moves data to noise along x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.
Every other path of the same family holds the same distributions up to a scale at the same
signal-to-noise ratio SNR = abar / (1 - abar), so a view reads the denoiser at (x_t, t(SNR)), t(SNR)
the continuous timestep of that SNR (log-SNR interpolated over the denoiser's schedule, as diffusers'
Euler does), through its data prediction

    x0 = (x_t - sqrt(1 - abar) eps_hat) / sqrt(abar)     epsilon
       = sqrt(abar) x_t - sqrt(1 - abar) v_hat          v_prediction
       = the output                                     sample

(the conditional expectation of x0 given x_t, so exact for an exact denoiser). Where a path asks for
more noise than the schedule reaches, t is the last timestep; for less than the first, timestep 0.

**Flow matching** with the rectified-flow path (Lipman et al. 2023; Esser et al. 2024, sec. 2):

    x_s = (1 - s) x0 + s eps,   s in [0, 1],   SNR = (1 - s)^2 / s^2,   x_t = x_s / sqrt((1 - s)^2 + s^2),
    v   = dx/ds = eps - x0,     read as  v = (x_s - x0) / s.

**EDM** (Karras et al. 2022, Table 1): x = x0 + sigma eps, SNR = 1 / sigma^2, x_t = x / sqrt(1 + sigma^2).
The network F sees c_in x = x / sqrt(sigma^2 + sigma_data^2) at c_noise = log(sigma) / 4 (diffusers'
``precondition_inputs`` / ``precondition_noise``) and the scheduler forms D = c_skip x + c_out F, so

    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2),   c_out = +-sigma sigma_data / sqrt(sigma^2 + sigma_data^2),
    F      = (x0 - c_skip x) / c_out                    (c_out < 0 for diffusers' "v_prediction").

    velocity = VelocityModel(pretrained_denoiser())
    x = fastgen.sample(velocity, (64, 1, 8, 8), FlowMatchEulerDiscreteScheduler(), num_inference_steps=28)
    edm = EDMModel(pretrained_denoiser())
    x = fastgen.sample(edm, (64, 1, 8, 8), EDMEulerScheduler(), num_inference_steps=30)
"""
import torch
from torch import nn

from fastgen.schedules import NoiseSchedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # what the viewed denoiser may predict


class DenoiserView(nn.Module):
    """The shared part of a view of ``model`` (a denoiser with ``scheduler_config``: its prediction type
    and schedule): the continuous timestep of a log-SNR and the model's data prediction there.
    ``class_labels`` and other keyword arguments pass through to the model."""

    def __init__(self, model):
        super().__init__()
        config = dict(getattr(model, "scheduler_config", {}) or {})
        self.model = model
        self.prediction_type = config.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"the model's prediction_type must be one of {', '.join(map(repr, PREDICTION_TYPES))}, "
                             f"got {self.prediction_type!r}")
        schedule = NoiseSchedule(**{k: config[k] for k in ("beta_schedule", "num_train_timesteps", "beta_start",
                                                            "beta_end", "rescale_betas_zero_snr") if k in config})
        abar = schedule.alphas_cumprod.double()
        # decreasing in t; a zero-SNR last step (abar = 0) is held at a finite log-SNR
        self.register_buffer("log_snr", (abar / (1 - abar)).log().clamp(min=-40.0), persistent=False)
        for name in ("num_classes", "null_class_label"):
            if hasattr(model, name):
                setattr(self, name, getattr(model, name))

    def timestep(self, log_snr: torch.Tensor) -> torch.Tensor:
        """The continuous timestep whose log-SNR is ``log_snr`` (float64), clamped to [0, T - 1]."""
        table = self.log_snr.flip(0)  # increasing: index j is timestep T - 1 - j
        j = torch.searchsorted(table, log_snr.clamp(table[0], table[-1])).clamp(1, len(table) - 1)
        lo, hi = table[j - 1], table[j]
        frac = ((log_snr.clamp(table[0], table[-1]) - lo) / (hi - lo)).clamp(0, 1)
        return (len(table) - 1) - (j - 1 + frac)

    def log_snr_at(self, timestep: torch.Tensor) -> torch.Tensor:
        """The schedule's log-SNR at continuous timesteps (linear between the integer ones)."""
        lo = timestep.floor().long().clamp(0, len(self.log_snr) - 1)
        hi = (lo + 1).clamp(max=len(self.log_snr) - 1)
        frac = timestep - lo
        return torch.lerp(self.log_snr[lo], self.log_snr[hi], frac)

    def data_prediction(self, x_t: torch.Tensor, log_snr: torch.Tensor, dtype, **kwargs) -> torch.Tensor:
        """x0 (float64) of the model called in ``dtype`` at the VP sample ``x_t`` (float64) and per-sample
        ``log_snr`` ([B], float64): at the timestep of that log-SNR, read through the schedule's own
        abar there (module docstring)."""
        timestep = self.timestep(log_snr)
        snr = torch.exp(self.log_snr_at(timestep))
        abar = snr / (1 + snr)
        out = self.model(x_t.to(dtype), timestep.to(dtype), **kwargs)
        out = (out.sample if hasattr(out, "sample") else out).double()
        shape = (-1,) + (1,) * (x_t.dim() - 1)
        sqrt_abar, sqrt_bbar = abar.sqrt().reshape(shape), (1 - abar).sqrt().reshape(shape)
        if self.prediction_type == "epsilon":
            return (x_t - sqrt_bbar * out) / sqrt_abar
        if self.prediction_type == "v_prediction":
            return sqrt_abar * x_t - sqrt_bbar * out
        return out


def _per_sample(t, x: torch.Tensor) -> torch.Tensor:
    """A scalar or [B] time as a float64 [B] tensor on x's device."""
    return torch.as_tensor(t, device=x.device).double().reshape(-1).expand(x.shape[0])


class VelocityModel(DenoiserView):
    """``model`` as a flow velocity model: ``forward(x_s, t)`` with t = s * ``num_train_timesteps`` (what
    diffusers' FlowMatchEulerDiscreteScheduler passes; 1000 by default)."""

    def __init__(self, model, *, num_train_timesteps: int = 1000):
        super().__init__(model)
        self.num_train_timesteps = num_train_timesteps

    def forward(self, x, t, **kwargs):
        s = (_per_sample(t, x) / self.num_train_timesteps).clamp(1e-12, 1.0)
        log_snr = 2 * (torch.log1p(-s.clamp(max=1 - 1e-12)) - torch.log(s))  # log abar / (1 - abar) of the path
        shape = (-1,) + (1,) * (x.dim() - 1)
        x_t = x.double() / torch.sqrt((1 - s) ** 2 + s ** 2).reshape(shape)
        x0 = self.data_prediction(x_t, log_snr, x.dtype, **kwargs)
        return ((x.double() - x0) / s.reshape(shape)).to(x.dtype)


class EDMModel(DenoiserView):
    """``model`` as an EDM-preconditioned network F: ``forward(c_in x, c_noise)`` as diffusers' EDM
    schedulers call it (``scale_model_input``, timesteps c_noise = log(sigma) / 4), returning the F
    whose ``precondition_outputs`` is the denoiser's x0. ``sigma_data`` and ``prediction_type`` are
    the EDM scheduler's (its config's defaults: 0.5, "epsilon")."""

    def __init__(self, model, *, sigma_data: float = 0.5, prediction_type: str = "epsilon"):
        super().__init__(model)
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction' (the EDM scheduler's), "
                             f"got {prediction_type!r}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.sigma_data = float(sigma_data)
        self.output_sign = 1.0 if prediction_type == "epsilon" else -1.0

    def forward(self, scaled, c_noise, **kwargs):
        sigma = torch.exp(4 * _per_sample(c_noise, scaled))
        shape = (-1,) + (1,) * (scaled.dim() - 1)
        sigma_b, data2 = sigma.reshape(shape), self.sigma_data ** 2
        x = scaled.double() * torch.sqrt(sigma_b ** 2 + data2)  # undo c_in
        x0 = self.data_prediction(x / torch.sqrt(1 + sigma_b ** 2), -2 * torch.log(sigma), scaled.dtype, **kwargs)
        c_skip = data2 / (sigma_b ** 2 + data2)
        c_out = self.output_sign * sigma_b * self.sigma_data / torch.sqrt(sigma_b ** 2 + data2)
        return ((x0 - c_skip * x) / c_out).to(scaled.dtype)


def for_sampler(model, sampler: str):
    """(the model as ``sampler`` sees it, its scheduler): ``model`` a denoiser with ``scheduler_config``,
    ``sampler`` a ``fastgen.registry`` name. By the sampler's ``view``: the velocity view on diffusers'
    default flow schedule, the EDM view on the EDM scheduler's defaults, or the model itself on a
    scheduler of the model's own schedule."""
    from fastgen import registry, sampling

    if sampler not in registry.BY_NAME:
        raise ValueError(f"sampler must be one of {', '.join(map(repr, registry.BY_NAME))}, got {sampler!r}")
    view = registry.BY_NAME[sampler].view
    if view == "velocity":
        return VelocityModel(model), sampling.make_scheduler(sampler)
    if view == "edm":
        scheduler = sampling.make_scheduler(sampler)
        return EDMModel(model, sigma_data=scheduler.config.sigma_data,
                        prediction_type=scheduler.config.prediction_type), scheduler
    return model, sampling.make_scheduler(sampler, **model.scheduler_config)

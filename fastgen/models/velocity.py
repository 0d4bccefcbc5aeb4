"""A diffusion denoiser seen as a flow-matching velocity model, so flow-matching samplers
(``FlowMatchEulerDiscreteScheduler``) run on a model trained as a DDPM.

Flow matching with the rectified-flow path (Lipman et al. 2023; Esser et al. 2024, sec. 2) moves
data to noise along

    x_s = (1 - s) x0 + s eps,       s in [0, 1],       velocity  v = dx/ds = eps - x0,

and a VP diffusion (Ho et al. 2020) along x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. The two paths
hold the same distributions up to a scale: with sqrt(1 - abar) / sqrt(abar) = s / (1 - s) (the same
signal-to-noise ratio),

    x_t = x_s / sqrt((1 - s)^2 + s^2),      abar = (1 - s)^2 / ((1 - s)^2 + s^2).

So the velocity at (x_s, s) is read from the denoiser at (x_t, t(s)), t(s) the continuous timestep
of that abar (log-SNR interpolated over the denoiser's schedule, as diffusers' Euler does), through
its data prediction x0:

    x0 = (x_t - sqrt(1 - abar) eps_hat) / sqrt(abar)     epsilon
       = sqrt(abar) x_t - sqrt(1 - abar) v_hat          v_prediction
       = the output                                     sample
    v  = (x_s - x0) / s

(the conditional expectation of eps - x0 given x_s, since the flow's eps and x0 are the
diffusion's). Where s asks for more noise than the schedule reaches (s -> 1), t(s) is the last
timestep and x0 is read from it.

    velocity = VelocityModel(pretrained_denoiser())
    x = fastgen.sample(velocity, (64, 1, 8, 8), FlowMatchEulerDiscreteScheduler(), num_inference_steps=28)
"""
import torch
from torch import nn

from fastgen.schedules import NoiseSchedule


class VelocityModel(nn.Module):
    """``model`` (a denoiser with ``scheduler_config``: its prediction type and schedule) as a flow
    velocity model: ``forward(x_s, t)`` with t = s * ``num_train_timesteps`` (what diffusers'
    FlowMatchEulerDiscreteScheduler passes; 1000 by default). ``class_labels`` pass through."""

    def __init__(self, model, *, num_train_timesteps: int = 1000):
        super().__init__()
        config = dict(getattr(model, "scheduler_config", {}) or {})
        self.model = model
        self.prediction_type = config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"the model's prediction_type must be 'epsilon', 'v_prediction' or 'sample', got "
                             f"{self.prediction_type!r}")
        schedule = NoiseSchedule(**{k: config[k] for k in ("beta_schedule", "num_train_timesteps", "beta_start",
                                                            "beta_end", "rescale_betas_zero_snr") if k in config})
        abar = schedule.alphas_cumprod.double()
        # decreasing in t; a zero-SNR last step (abar = 0) is held at a finite log-SNR
        self.register_buffer("log_snr", (abar / (1 - abar)).log().clamp(min=-40.0), persistent=False)
        self.num_train_timesteps = num_train_timesteps
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

    def forward(self, x, t, **kwargs):
        s = torch.as_tensor(t, device=x.device).double().reshape(-1) / self.num_train_timesteps
        s = s.expand(x.shape[0]).clamp(1e-12, 1.0)
        log_snr = 2 * (torch.log1p(-s.clamp(max=1 - 1e-12)) - torch.log(s))  # log abar / (1 - abar) of the path
        timestep = self.timestep(log_snr)
        snr = torch.exp(self.log_snr_at(timestep))
        abar = snr / (1 + snr)
        shape = (-1,) + (1,) * (x.dim() - 1)
        x_t = x.double() / torch.sqrt((1 - s) ** 2 + s ** 2).reshape(shape)
        out = self.model(x_t.to(x.dtype), timestep.to(x.dtype), **kwargs)
        out = out.sample if hasattr(out, "sample") else out
        sqrt_abar, sqrt_bbar = abar.sqrt().reshape(shape), (1 - abar).sqrt().reshape(shape)
        if self.prediction_type == "epsilon":
            x0 = (x_t - sqrt_bbar * out.double()) / sqrt_abar
        elif self.prediction_type == "v_prediction":
            x0 = sqrt_abar * x_t - sqrt_bbar * out.double()
        else:
            x0 = out.double()
        return ((x.double() - x0) / s.reshape(shape)).to(x.dtype)

    def log_snr_at(self, timestep: torch.Tensor) -> torch.Tensor:
        """The schedule's log-SNR at continuous timesteps (linear between the integer ones)."""
        lo = timestep.floor().long().clamp(0, len(self.log_snr) - 1)
        hi = (lo + 1).clamp(max=len(self.log_snr) - 1)
        frac = timestep - lo
        return torch.lerp(self.log_snr[lo], self.log_snr[hi], frac)

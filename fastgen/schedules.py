"""Noise schedules: betas -> every coefficient a DDPM/DDIM step needs, in float64, stored per device.

The forward process (Ho et al. 2020, arXiv 2006.11239) adds Gaussian noise with variances beta_t:

    q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)                       eq. (2)
    alpha_t = 1 - beta_t,   alphabar_t = prod_{s <= t} alpha_s
    q(x_t | x_0)     = N(sqrt(alphabar_t) x_0, (1 - alphabar_t) I)                  eq. (4)
    q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I)                                     eq. (6)
    mu~_t   = sqrt(alphabar_{t-1}) beta_t / (1 - alphabar_t) x_0
            + sqrt(alpha_t) (1 - alphabar_{t-1}) / (1 - alphabar_t) x_t            eq. (7)
    beta~_t = (1 - alphabar_{t-1}) / (1 - alphabar_t) beta_t                        eq. (7)

Beta schedules (names and defaults as diffusers spells them):
    linear             beta_start .. beta_end evenly spaced (Ho et al.)
    scaled_linear      (sqrt(beta_start) .. sqrt(beta_end) evenly spaced)^2 (latent diffusion)
    squaredcos_cap_v2  beta_t = min(1 - abar(t+1)/abar(t), 0.999), abar(t) = cos^2((t/T + 0.008)/1.008 pi/2)
                       (Nichol & Dhariwal 2021, arXiv 2102.09672, eq. 17)
    laplace            the same discretisation of diffusers' Laplace alpha_bar
    sigmoid            sigmoid(linspace(-6, 6, T)) (beta_end - beta_start) + beta_start (GeoDiff)
    trained_betas      user values
``rescale_betas_zero_snr`` shifts and scales sqrt(alphabar) so the last step has zero SNR
(Lin et al. 2023, arXiv 2305.08891, Algorithm 1).

Everything is computed in float64 on the CPU; ``tables(device)`` hands out fp32 copies cached per
device, so a sampling step never copies host -> device or synchronises.
"""
import math

import torch

from fastgen import _checks

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "laplace", "sigmoid")

# Rows of ``NoiseSchedule.kernel_table``: what the fused kernels gather per timestep.
KERNEL_ROWS = ("alphas_cumprod", "one_minus_alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
               "betas")


def _betas_for_alpha_bar(num_steps: int, alpha_bar, max_beta: float = 0.999) -> torch.Tensor:
    """beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta) (Nichol & Dhariwal eq. 17)."""
    betas = [min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64)


def _cosine_alpha_bar(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _laplace_alpha_bar(t: float) -> float:
    lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
    snr = math.exp(lmb)
    return math.sqrt(snr / (1 + snr))


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose sqrt(alphabar) is shifted to end at 0 and scaled to keep its first value
    (Lin et al. 2023, Algorithm 1)."""
    sqrt_abar = torch.cumprod(1.0 - betas, 0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar ** 2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def make_betas(beta_schedule="linear", num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
               trained_betas=None) -> torch.Tensor:
    """The float64 betas of a named schedule (or ``trained_betas``)."""
    if trained_betas is not None:
        return torch.as_tensor(trained_betas, dtype=torch.float64).detach().cpu().clone()
    n = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return _betas_for_alpha_bar(n, _cosine_alpha_bar)
    if beta_schedule == "laplace":
        return _betas_for_alpha_bar(n, _laplace_alpha_bar)
    if beta_schedule == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, n, dtype=torch.float64)) * (beta_end - beta_start) + beta_start
    raise ValueError(f"beta_schedule must be one of {', '.join(map(repr, BETA_SCHEDULES))}, got {beta_schedule!r}")


def check_not_degenerate(betas: torch.Tensor, alphas_cumprod: torch.Tensor):
    """Raise ValueError for a schedule on which every step (or every step from some t on) is NaN:
    1 - alphabar_t must be > 0 at every t (the step divides by it) and alphabar_t > 0 before the
    last step, in the fp32 of the kernels' tables (x_0 = (x_t - sqrt(1 - alphabar_t) eps) / sqrt(alphabar_t)).
    A zero-terminal-SNR schedule has alphabar = 0, beta = 1, at the last step only: that is allowed."""
    if not (betas > 0).any():
        raise ValueError("betas must not all be 0: alphabar_t = 1 and 1 - alphabar_t = 0 at every t, so no step "
                         "can recover x_0 (degenerate schedule)")
    if betas[0] == 0:
        raise ValueError("betas[0] must be > 0: 1 - alphabar_0 = beta_0 = 0 makes the step from t = 0 divide by 0 "
                         "(degenerate schedule)")
    vanished = (alphas_cumprod[:-1].float() == 0).nonzero()
    if vanished.numel():
        t = vanished[0].item()
        if betas[t] == 1:
            raise ValueError(f"betas[{t}] = 1 before the last step (T = {betas.numel()}): alphabar_t = 0 from "
                             f"t = {t} on, so x_0 = x_t / sqrt(alphabar_t) is undefined there; only the last beta may "
                             "be 1 (zero terminal SNR) (degenerate schedule)")
        raise ValueError(f"alphabar_t underflows to 0 in float32 at t = {t} < T - 1 = {betas.numel() - 1}: "
                         "x_0 = x_t / sqrt(alphabar_t) is undefined from there on (degenerate schedule)")


class NoiseSchedule:
    """A DDPM noise schedule and its derived coefficient tables (float64 on the CPU as attributes;
    fp32 copies per device through ``tables`` / ``kernel_table``).

    Args (as diffusers' DDPMScheduler names them):
        beta_schedule: "linear", "scaled_linear", "squaredcos_cap_v2", "laplace" or "sigmoid".
        num_train_timesteps: T, the number of diffusion steps (ignored when trained_betas is given).
        beta_start, beta_end: the range of the linear / scaled_linear / sigmoid schedules.
        trained_betas: a 1-d sequence of betas in [0, 1] that replaces the named schedule (beta_0 > 0,
            and 1 at the last step only: see ``check_not_degenerate``).
        rescale_betas_zero_snr: rescale to zero terminal SNR (alphabar_{T-1} = 0).

    Attributes (float64 tensors of length T): betas, alphas, alphas_cumprod, alphas_cumprod_prev
    (alphabar_{t-1}, 1 at t = 0), one_minus_alphas_cumprod, sqrt_alphas_cumprod,
    sqrt_one_minus_alphas_cumprod, log_one_minus_alphas_cumprod, sqrt_recip_alphas_cumprod,
    sqrt_recipm1_alphas_cumprod (the x_0 <- (x_t, eps) conversion of eq. 15), posterior_variance
    (beta~_t), posterior_log_variance_clipped (log beta~_t with beta~_0 replaced by beta~_1, as in
    Improved DDPM), posterior_mean_coef1 (of x_0), posterior_mean_coef2 (of x_t).
    """

    def __init__(self, beta_schedule="linear", num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                 trained_betas=None, rescale_betas_zero_snr=False):
        if trained_betas is None:
            if not isinstance(beta_schedule, str) or beta_schedule not in BETA_SCHEDULES:
                raise ValueError(f"beta_schedule must be one of {', '.join(map(repr, BETA_SCHEDULES))}, "
                                 f"got {beta_schedule!r}")
            num_train_timesteps = _checks.as_int(num_train_timesteps, "num_train_timesteps")
            if num_train_timesteps < 1:
                raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
            for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                    raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
        betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end, trained_betas)
        if trained_betas is not None and (betas.dim() != 1 or betas.numel() < 1):
            raise ValueError(f"trained_betas must be a 1-d sequence of at least 1 beta, got shape {tuple(betas.shape)}")
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        if not torch.isfinite(betas).all() or (betas < 0).any() or (betas > 1).any():
            bad = (~torch.isfinite(betas) | (betas < 0) | (betas > 1)).nonzero()[0].item()
            raise ValueError(f"betas must be finite and in [0, 1], got betas[{bad}] = {betas[bad].item()} "
                             "(non-finite schedule)")
        self.config = dict(beta_schedule=beta_schedule, num_train_timesteps=betas.numel(), beta_start=beta_start,
                           beta_end=beta_end, trained_betas=None if trained_betas is None else betas.tolist(),
                           rescale_betas_zero_snr=bool(rescale_betas_zero_snr))
        log_alphas_cumprod = torch.cumsum(torch.log1p(-betas), 0)               # log alphabar_t, exact to f64
        one_minus_alphas_cumprod = -torch.expm1(log_alphas_cumprod)              # 1 - alphabar_t without cancellation
        if rescale_betas_zero_snr:  # beta_{T-1} = 1: log1p(-1) = -inf, exp gives the exact 0
            one_minus_alphas_cumprod[-1] = 1.0
        self._derive(betas, torch.exp(log_alphas_cumprod), one_minus_alphas_cumprod)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod, betas=None) -> "NoiseSchedule":
        """The schedule whose alphabar_t are exactly ``alphas_cumprod`` (e.g. a diffusers scheduler's
        float32 table, taken to float64 as it is) and whose one-step betas are ``betas`` (default
        1 - alphabar_t / alphabar_{t-1}); 1 - alphabar_t is formed from the same values, so the two agree
        to the last bit. What a scheduler's own tables give the fused ops."""
        abar = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64).clone()
        if betas is None:
            betas = 1.0 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
        schedule = cls(trained_betas=torch.as_tensor(betas).detach().to("cpu", torch.float64))
        schedule._derive(schedule.betas, abar, 1.0 - abar)
        return schedule

    def _derive(self, betas, alphas_cumprod, one_minus_alphas_cumprod):
        """Every table from the betas, alphabar_t and 1 - alphabar_t (float64)."""
        self.num_train_timesteps = betas.numel()
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = alphas_cumprod
        self.one_minus_alphas_cumprod = one_minus_alphas_cumprod
        # abar_0 and 1 - abar_0 as host floats, read once: DDIM's final step without set_alpha_to_one
        self.first_alpha_cumprod = float(alphas_cumprod[0])
        self.first_one_minus_alpha_cumprod = float(one_minus_alphas_cumprod[0])
        check_not_degenerate(betas, self.alphas_cumprod)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        one_minus_prev = torch.cat([torch.zeros(1, dtype=torch.float64), self.one_minus_alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = self.one_minus_alphas_cumprod.sqrt()
        self.log_one_minus_alphas_cumprod = torch.log(self.one_minus_alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = 1.0 / self.sqrt_alphas_cumprod
        self.sqrt_recipm1_alphas_cumprod = (self.one_minus_alphas_cumprod / self.alphas_cumprod).sqrt()
        self.posterior_variance = betas * one_minus_prev / self.one_minus_alphas_cumprod               # eq. (7)
        # Improved DDPM's clipped log: beta~_0 (= 0) replaced by beta~_1
        first = self.posterior_variance[1:2] if len(betas) > 1 else self.posterior_variance[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / self.one_minus_alphas_cumprod
        self.posterior_mean_coef2 = one_minus_prev * self.alphas.sqrt() / self.one_minus_alphas_cumprod
        self._cache = {}

    TABLE_NAMES = ("betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "one_minus_alphas_cumprod",
                   "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                   "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                   "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")

    def __len__(self):
        return self.num_train_timesteps

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if k != "trained_betas")
        return f"NoiseSchedule({args}{', trained_betas=[...]' if self.config['trained_betas'] else ''})"

    def tables(self, device, dtype=torch.float32) -> dict:
        """Every table by name as ``dtype`` tensors on ``device``, made once and cached."""
        key = ("tables", torch.device(device), dtype)
        if key not in self._cache:
            self._cache[key] = {name: getattr(self, name).to(device=device, dtype=dtype) for name in self.TABLE_NAMES}
        return self._cache[key]

    def kernel_table(self, device) -> torch.Tensor:
        """The contiguous fp32 [5, T] table the fused kernels gather from (rows: KERNEL_ROWS), cached."""
        key = ("kernel", torch.device(device))
        if key not in self._cache:
            rows = [getattr(self, name) for name in KERNEL_ROWS]
            self._cache[key] = torch.stack(rows).to(device=device, dtype=torch.float32).contiguous()
        return self._cache[key]

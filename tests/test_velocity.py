"""fastgen.models.velocity: a diffusion denoiser as a flow-matching velocity model. On Gaussian data the
exact eps-prediction is known in closed form, and so is the exact flow velocity: the adapter must
turn the one into the other."""
import pytest
import torch

from fastgen.models.velocity import VelocityModel
from fastgen.schedules import NoiseSchedule

DATA_STD = 0.7  # x0 ~ N(0, DATA_STD^2 I)


class ExactGaussianDenoiser(torch.nn.Module):
    """E[eps | x_t] (or v, x0) for x0 ~ N(0, s^2 I): eps_hat = sqrt(1 - abar) x_t / (abar s^2 + 1 - abar)."""

    def __init__(self, prediction_type="epsilon"):
        super().__init__()
        self.scheduler_config = dict(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction_type)
        self.abar = NoiseSchedule().alphas_cumprod.double()

    def forward(self, x, t):
        t = torch.as_tensor(t).double()
        lo = t.floor().long().clamp(0, 999)
        hi = (lo + 1).clamp(max=999)
        log_snr = torch.log(self.abar / (1 - self.abar))
        snr = torch.exp(torch.lerp(log_snr[lo], log_snr[hi], t - lo))
        abar = (snr / (1 + snr)).reshape(-1, *[1] * (x.dim() - 1))
        x = x.double()
        var = abar * DATA_STD ** 2 + 1 - abar
        eps = (1 - abar).sqrt() * x / var
        x0 = abar.sqrt() * DATA_STD ** 2 * x / var
        if self.scheduler_config["prediction_type"] == "epsilon":
            return eps
        if self.scheduler_config["prediction_type"] == "sample":
            return x0
        return abar.sqrt() * eps - (1 - abar).sqrt() * x0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_velocity_of_the_exact_denoiser_is_the_exact_flow_velocity(prediction_type):
    velocity = VelocityModel(ExactGaussianDenoiser(prediction_type))
    x = torch.randn(5, 3, dtype=torch.float64)
    for s in (0.05, 0.3, 0.5, 0.9, 0.99):
        got = velocity(x, torch.tensor(1000 * s))
        x0 = (1 - s) * DATA_STD ** 2 * x / ((1 - s) ** 2 * DATA_STD ** 2 + s ** 2)  # E[x0 | x_s]
        torch.testing.assert_close(got, (x - x0) / s, rtol=1e-9, atol=1e-9)


def test_beyond_the_schedule_the_last_timestep_is_used():
    velocity = VelocityModel(ExactGaussianDenoiser())
    assert float(velocity.timestep(torch.tensor([-100.0], dtype=torch.float64))) == 999.0
    assert float(velocity.timestep(torch.tensor([100.0], dtype=torch.float64))) == 0.0
    out = velocity(torch.randn(2, 3, dtype=torch.float64), torch.tensor(1000.0))
    assert torch.isfinite(out).all()


def test_unknown_prediction_type_is_named():
    model = ExactGaussianDenoiser()
    model.scheduler_config["prediction_type"] = "flow"
    with pytest.raises(ValueError, match="prediction_type must be 'epsilon', 'v_prediction' or 'sample'"):
        VelocityModel(model)

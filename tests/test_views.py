"""fastgen.models.views: a diffusion denoiser as a flow-matching velocity model and as an EDM-preconditioned
network. On Gaussian data the exact eps-prediction is known in closed form, and so are the exact flow
velocity and the exact EDM denoiser: each view must turn the one into the other."""
import pytest
import torch
from diffusers import EDMEulerScheduler

from fastgen import registry
from fastgen.models import pretrained_denoiser
from fastgen.models.views import EDMModel, VelocityModel, for_sampler
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
    with pytest.raises(ValueError, match="prediction_type must be one of 'epsilon', 'v_prediction', 'sample', "
                                         "got 'flow'"):
        VelocityModel(model)


@pytest.mark.parametrize("edm_prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_edm_view_of_the_exact_denoiser_is_the_exact_edm_denoiser(prediction_type, edm_prediction):
    """diffusers' own preconditioning of the view's output is E[x0 | x] for x = x0 + sigma eps, within the
    schedule's noise levels (the linear schedule's sigma runs from 0.01 to 157)."""
    scheduler = EDMEulerScheduler(prediction_type=edm_prediction, sigma_data=0.6)
    edm = EDMModel(ExactGaussianDenoiser(prediction_type), sigma_data=0.6, prediction_type=edm_prediction)
    x = torch.randn(5, 3, dtype=torch.float64)
    for sigma in (0.05, 0.3, 1.0, 7.0, 80.0):
        sigma = torch.tensor(sigma, dtype=torch.float64)
        out = edm(scheduler.precondition_inputs(x, sigma), scheduler.precondition_noise(sigma))
        torch.testing.assert_close(scheduler.precondition_outputs(x, out, sigma),
                                   DATA_STD ** 2 * x / (DATA_STD ** 2 + sigma ** 2), rtol=1e-9, atol=1e-9)


def test_edm_view_refuses_what_no_edm_scheduler_has():
    with pytest.raises(ValueError, match="prediction_type must be 'epsilon' or 'v_prediction'.*got 'sample'"):
        EDMModel(ExactGaussianDenoiser(), prediction_type="sample")
    with pytest.raises(ValueError, match="sigma_data must be positive, got 0"):
        EDMModel(ExactGaussianDenoiser(), sigma_data=0)


@pytest.mark.parametrize("name", registry.DIGITS_SAMPLERS)
def test_every_digits_sampler_gets_its_view(name):
    model = pretrained_denoiser()
    seen, scheduler = for_sampler(model, name)
    view = registry.BY_NAME[name].view
    assert type(seen) is {None: type(model), "velocity": VelocityModel, "edm": EDMModel}[view]
    assert type(scheduler).__name__ == registry.BY_NAME[name].scheduler
    if view is None and "beta_schedule" in scheduler.config:  # the model's own schedule
        assert scheduler.config.beta_schedule == model.scheduler_config["beta_schedule"]
    assert seen.num_classes == model.num_classes and seen.null_class_label == model.null_class_label


def test_for_sampler_names_an_unknown_sampler():
    with pytest.raises(ValueError, match="sampler must be one of 'ddpm', .*got 'nope'"):
        for_sampler(pretrained_denoiser(), "nope")

"""Noise schedules: hand-computed values, diffusers' DDPMScheduler, the derived tables, bad input."""
import math

import pytest
import torch

import fastgen
from fastgen.schedules import KERNEL_ROWS, NoiseSchedule
from tests.utils import assert_close

import diffusers  # a dependency of fastgen.schedulers: never skipped
from diffusers.schedulers import scheduling_ddpm  # noqa: E402

SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2", "laplace", "sigmoid"]


def test_linear_by_hand():
    s = NoiseSchedule("linear", num_train_timesteps=4, beta_start=0.1, beta_end=0.4)
    f64 = dict(dtype=torch.float64)
    assert_close(s.betas, torch.tensor([0.1, 0.2, 0.3, 0.4], **f64), dtype=torch.float64)
    assert_close(s.alphas_cumprod, torch.tensor([0.9, 0.72, 0.504, 0.3024], **f64), dtype=torch.float64)
    assert_close(s.alphas_cumprod_prev, torch.tensor([1.0, 0.9, 0.72, 0.504], **f64), dtype=torch.float64)
    assert_close(s.one_minus_alphas_cumprod, torch.tensor([0.1, 0.28, 0.496, 0.6976], **f64), dtype=torch.float64)
    # beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t  (Ho et al. eq. 7)
    posterior = torch.tensor([0.0, 0.1 / 0.28 * 0.2, 0.28 / 0.496 * 0.3, 0.496 / 0.6976 * 0.4], **f64)
    assert_close(s.posterior_variance, posterior, dtype=torch.float64)
    assert_close(s.posterior_log_variance_clipped, torch.log(torch.cat([posterior[1:2], posterior[1:]])),
                 dtype=torch.float64)
    coef1 = torch.tensor([1.0, math.sqrt(0.9) * 0.2 / 0.28, math.sqrt(0.72) * 0.3 / 0.496,
                          math.sqrt(0.504) * 0.4 / 0.6976], **f64)
    coef2 = torch.tensor([0.0, math.sqrt(0.8) * 0.1 / 0.28, math.sqrt(0.7) * 0.28 / 0.496,
                          math.sqrt(0.6) * 0.496 / 0.6976], **f64)
    assert_close(s.posterior_mean_coef1, coef1, dtype=torch.float64)
    assert_close(s.posterior_mean_coef2, coef2, dtype=torch.float64)
    assert_close(s.sqrt_recip_alphas_cumprod, 1 / torch.tensor([0.9, 0.72, 0.504, 0.3024], **f64).sqrt(),
                 dtype=torch.float64)
    assert_close(s.sqrt_recipm1_alphas_cumprod, (1 / torch.tensor([0.9, 0.72, 0.504, 0.3024], **f64) - 1).sqrt(),
                 dtype=torch.float64)


def test_named_schedules_by_formula():
    t = torch.arange(10, dtype=torch.float64)
    scaled = NoiseSchedule("scaled_linear", num_train_timesteps=10, beta_start=0.01, beta_end=0.09)
    assert_close(scaled.betas, (0.1 + t / 9 * 0.2) ** 2, dtype=torch.float64)
    sigmoid = NoiseSchedule("sigmoid", num_train_timesteps=10, beta_start=0.01, beta_end=0.09)
    assert_close(sigmoid.betas, torch.sigmoid(-6 + 12 * t / 9) * 0.08 + 0.01, dtype=torch.float64)
    cosine = NoiseSchedule("squaredcos_cap_v2", num_train_timesteps=10)
    abar = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # Nichol & Dhariwal eq. (17)
    expected = torch.tensor([min(1 - abar((i + 1) / 10) / abar(i / 10), 0.999) for i in range(10)], dtype=torch.float64)
    assert_close(cosine.betas, expected, dtype=torch.float64)
    assert cosine.betas[-1] == 0.999  # capped
    # alphabar_t of the cosine schedule follows abar(t+1)/abar(0) until the cap
    assert_close(cosine.alphas_cumprod[:-1], torch.tensor([abar((i + 1) / 10) / abar(0) for i in range(9)],
                                                          dtype=torch.float64), dtype=torch.float64)


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("name", SCHEDULES)
def test_matches_diffusers(name, zero_snr):
    ours = NoiseSchedule(name, rescale_betas_zero_snr=zero_snr)
    theirs = diffusers.DDPMScheduler(beta_schedule=name, rescale_betas_zero_snr=zero_snr)  # float32 arithmetic
    assert ours.num_train_timesteps == 1000
    assert_close(theirs.alphas_cumprod, ours.alphas_cumprod, dtype=torch.float32, rtol=2e-5, atol=2e-6)
    if not zero_snr:
        assert_close(theirs.betas, ours.betas, dtype=torch.float32)
    # the same formulas in float64 agree to float64 rounding (diffusers' fp32 rescale loses ~1e-3 in beta)
    betas64 = ours.betas if not zero_snr else scheduling_ddpm.rescale_zero_terminal_snr(
        NoiseSchedule(name).betas.clone())
    assert_close(ours.betas, betas64, dtype=torch.float64, rtol=1e-10, atol=1e-13)
    assert_close(ours.alphas_cumprod, torch.cumprod(1 - betas64, 0), dtype=torch.float64, rtol=1e-10, atol=1e-13)


def test_zero_terminal_snr():
    plain = NoiseSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
    s = NoiseSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)
    assert s.alphas_cumprod[-1] == 0 and s.one_minus_alphas_cumprod[-1] == 1 and s.betas[-1] == 1
    assert_close(s.alphas_cumprod[:1], plain.alphas_cumprod[:1], dtype=torch.float64)  # first value kept
    assert (s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all()


def test_trained_betas():
    betas = [0.01, 0.02, 0.05, 0.1, 0.3]
    s = NoiseSchedule(trained_betas=betas)
    assert s.num_train_timesteps == 5 and len(s) == 5
    assert_close(s.alphas_cumprod, torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), 0), dtype=torch.float64)


def test_one_minus_alphas_cumprod_without_cancellation():
    s = NoiseSchedule()  # 1 - abar_0 = beta_0 = 1e-4 exactly, which 1 - fp32(abar_0) would not give
    assert_close(s.one_minus_alphas_cumprod[:1], torch.tensor([1e-4], dtype=torch.float64), dtype=torch.float64)
    assert_close(s.one_minus_alphas_cumprod, 1 - s.alphas_cumprod, dtype=torch.float64, rtol=1e-10)


def test_device_tables_are_cached_fp32(device):
    s = NoiseSchedule(num_train_timesteps=20)
    tables = s.tables(device)
    assert tables is s.tables(device)
    for name in NoiseSchedule.TABLE_NAMES:
        assert tables[name].dtype == torch.float32 and tables[name].device.type == torch.device(device).type
        assert torch.equal(tables[name].cpu(), getattr(s, name).float())
    kernel = s.kernel_table(device)
    assert kernel is s.kernel_table(device) and kernel.shape == (5, 20) and kernel.is_contiguous()
    for row, name in enumerate(KERNEL_ROWS):
        assert torch.equal(kernel[row].cpu(), getattr(s, name).float())
    assert s.tables(device, torch.float64)["betas"].dtype == torch.float64


def test_exported_and_repr():
    assert fastgen.NoiseSchedule is NoiseSchedule
    assert "squaredcos_cap_v2" in repr(NoiseSchedule("squaredcos_cap_v2", num_train_timesteps=8))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(beta_schedule="cosine"), ValueError, "beta_schedule"),
    (dict(num_train_timesteps=0), ValueError, "num_train_timesteps"),
    (dict(num_train_timesteps=2.5), TypeError, "num_train_timesteps"),
    (dict(beta_start=0.0), ValueError, "beta_start"),
    (dict(beta_end=1.5), ValueError, "beta_end"),
    (dict(trained_betas=[0.1, float("nan")]), ValueError, "non-finite"),
    (dict(trained_betas=[0.1, 1.5]), ValueError, "betas"),
    (dict(trained_betas=[]), ValueError, "trained_betas"),
    (dict(trained_betas=[[0.1, 0.2]]), ValueError, "trained_betas"),
    (dict(trained_betas=[0, 0, 0, 0]), ValueError, "betas must not all be 0"),
    (dict(trained_betas=[0.0, 0.1, 0.2]), ValueError, r"betas\[0\] must be > 0"),
    (dict(trained_betas=[0.1, 1.0, 0.2, 0.3]), ValueError, r"betas\[1\] = 1 before the last step"),
    (dict(trained_betas=[1.0, 0.5]), ValueError, r"betas\[0\] = 1 before the last step"),
    (dict(trained_betas=[1 - 1e-6] * 10), ValueError, "underflows to 0 in float32 at t = 7"),
])
def test_bad_schedules(kwargs, error, match):
    with pytest.raises(error, match=match):
        NoiseSchedule(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(trained_betas=[0.1, 0.2, 1.0]),
                                    dict(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True),
                                    dict(trained_betas=[0.1, 0.0, 0.2])], ids=["last-beta-1", "zero-snr", "inner-0"])
def test_schedules_that_step_finitely_are_accepted(kwargs):
    """beta = 1 at the last step only (zero terminal SNR), or an inner beta of 0: every step stays finite
    (with v-prediction, which zero terminal SNR needs: eps says nothing about x_0 where abar = 0)."""
    s = NoiseSchedule(**kwargs)
    T = s.num_train_timesteps
    x = torch.randn(T, 3, dtype=torch.float32)
    t = torch.arange(T)
    for backend in ["torch", "triton"]:
        prev, x0 = fastgen.ddpm_step(x, t, x, s, prediction_type="v_prediction", seed=0, backend=backend)
        assert torch.isfinite(prev).all() and torch.isfinite(x0).all()

"""Denoisers: shapes, the time embedding, training (smoke, determinism), checkpoints, and the
shipped digits checkpoint's samples (classifier confidence, MMD against the noise baseline)."""
import math

import pytest
import torch

import fastgen
from fastgen import quality
from fastgen.models import MLPDenoiser, UNetDenoiser, denoisers, pretrained_denoiser
from fastgen.schedules import NoiseSchedule


def test_timestep_embedding_is_sin_then_cos_of_geometric_frequencies():
    t = torch.tensor([0, 1, 500])
    emb = denoisers.timestep_embedding(t, 8)
    assert emb.shape == (3, 8)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(4) / 4)
    torch.testing.assert_close(emb[:, :4], torch.sin(t[:, None] * freqs), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb[:, 4:], torch.cos(t[:, None] * freqs), rtol=1e-5, atol=1e-5)
    odd = denoisers.timestep_embedding(t, 7)
    assert odd.shape == (3, 7) and (odd[:, -1] == 0).all()


@pytest.mark.parametrize("make,shape", [
    (lambda: MLPDenoiser(dim=64, hidden=32, depth=2), (3, 64)),
    (lambda: MLPDenoiser(dim=64, hidden=32, depth=2), (3, 1, 8, 8)),
    (lambda: UNetDenoiser(channels=8), (3, 1, 8, 8)),
    (lambda: UNetDenoiser(in_channels=3, channels=8, channel_mults=(1, 2, 2), attention_resolutions=(4, 2),
                          image_size=8), (2, 3, 8, 8)),
])
def test_output_is_shaped_like_the_input_and_depends_on_t(make, shape):
    torch.manual_seed(0)
    model = make()
    for p in model.parameters():  # the UNet's output conv starts at zero: move it off
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randn(shape)
    out = model(x, 7)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # t as an int, a 0-d tensor and a [B] tensor mean the same; another t gives another output
    torch.testing.assert_close(model(x, torch.tensor(7)), out)
    torch.testing.assert_close(model(x, torch.full((shape[0],), 7)), out)
    assert (model(x, 900) - out).abs().max() > 1e-4
    per_sample = model(x, torch.tensor([7] + [900] * (shape[0] - 1)))
    torch.testing.assert_close(per_sample[0], out[0])


def test_unet_has_attention_at_the_low_resolution_and_starts_at_zero():
    model = UNetDenoiser(channels=8, channel_mults=(1, 2), attention_resolutions=(4,), image_size=8)
    attention = [m for m in model.modules() if isinstance(m, denoisers.Attention)]
    assert len(attention) == 1 + 1 + 2  # down at 4x4, middle, up at 4x4 (num_res_blocks + 1)
    assert (model(torch.randn(2, 1, 8, 8), 3) == 0).all()


@pytest.mark.parametrize("call,error,match", [
    (lambda: MLPDenoiser(dim=64)(torch.randn(2, 10), 1), ValueError, "64 elements per sample"),
    (lambda: MLPDenoiser(dim=64)(torch.randn(2, 64), torch.zeros(3)), ValueError, r"shape \[\] or \[batch=2\]"),
    (lambda: UNetDenoiser(channels=8)(torch.randn(2, 1, 7, 7), 1), ValueError, "divisible by 2"),
    (lambda: UNetDenoiser(channels=8)(torch.randn(2, 3, 8, 8), 1), ValueError, r"x must be \[B, 1, H, W\]"),
    (lambda: UNetDenoiser(image_size=6, channel_mults=(1, 2, 2)), ValueError, "image_size must be divisible"),
    (lambda: MLPDenoiser(depth=0), ValueError, "depth must be >= 1"),
    (lambda: MLPDenoiser(prediction_type="x0"), ValueError, "prediction_type must be one of"),
    (lambda: denoisers.pretrained_denoiser("faces"), ValueError, "name must be one of"),
])
def test_bad_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _tiny_training(seed):
    torch.manual_seed(seed)
    model = MLPDenoiser(dim=64, hidden=32, depth=1, time_dim=16)
    data = denoisers.digits_for_training("mlp")[:256]
    history = denoisers.train(model, data, NoiseSchedule(num_train_timesteps=100), steps=40, batch_size=32,
                              seed=seed, progress=False)
    return model, history


def test_training_smoke_lowers_the_loss_and_is_reproducible(tmp_path):
    model, history = _tiny_training(0)
    losses = history["loss"]
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    again, history_again = _tiny_training(0)
    assert history_again["loss"] == losses
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a checkpoint round trip (fp16 weights) gives the same model up to that rounding
    path = tmp_path / "tiny.pt"
    denoisers.save_checkpoint(path, model, {"num_train_timesteps": 100}, steps=40)
    loaded = denoisers.load_checkpoint(path)
    assert loaded.config() == model.config() and loaded.scheduler_config == {"num_train_timesteps": 100}
    assert loaded.metadata == {"steps": 40}
    x = torch.randn(4, 64)
    torch.testing.assert_close(loaded(x, 5), model(x, 5), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="fastgen-denoiser/1 checkpoint"):
        torch.save({"format": "other"}, tmp_path / "bad.pt")
        denoisers.load_checkpoint(tmp_path / "bad.pt")


def test_shipped_checkpoint_samples_look_like_digits():
    """300 samples, 50 DDIM steps (torch backend: the fast path on a CPU): confident classifier labels,
    most classes present, and an MMD to held-out digits far below that of noise."""
    from fastgen.sampling import make_scheduler

    model = pretrained_denoiser()
    assert model.scheduler_config["num_train_timesteps"] == 1000
    scheduler = make_scheduler("ddim", **model.scheduler_config)
    x = fastgen.sample(model, (300, 1, 8, 8), scheduler, num_inference_steps=50, seed=123, backend="torch")
    assert x.shape == (300, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    score = quality.digits_quality(x, value_range=(-1, 1))
    noise = quality.digits_quality(torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                                   value_range=(-1, 1))
    assert score.confidence > 0.8, score
    assert sum(c > 0 for c in score.class_counts) >= 8, score
    assert score.mmd < noise.mmd / 10, (score, noise)

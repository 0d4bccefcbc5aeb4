"""Denoisers: shapes, the time embedding, training (smoke, determinism), checkpoints, and the
shipped digits checkpoint's samples (classifier confidence, MMD against the noise baseline)."""
import math

import pytest
import torch

import fastgen
from fastgen import quality
from fastgen.models import MLPDenoiser, UNetDenoiser, denoisers, pretrained_denoiser
from fastgen.schedules import NoiseSchedule
from tests.utils import interrupted_at_adam_step


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


@pytest.mark.parametrize("make", [lambda: MLPDenoiser(dim=64, hidden=32, depth=1, time_dim=16, num_classes=10),
                                  lambda: UNetDenoiser(channels=8, num_classes=10)])
def test_class_conditioning_with_a_null_label(make):
    torch.manual_seed(0)
    model = make()
    for p in model.parameters():  # the UNet's output conv starts at zero: move it off
        p.data.add_(0.05 * torch.randn_like(p))
    assert model.num_classes == 10 and model.null_class_label == 10
    assert model.class_embedding.num_embeddings == 11 and model.config()["num_classes"] == 10
    x = torch.randn(3, 1, 8, 8)
    null = model(x, 7)  # None: the null label for every sample
    torch.testing.assert_close(model(x, 7, class_labels=10), null, rtol=0, atol=0)
    torch.testing.assert_close(model(x, 7, class_labels=torch.full((3,), 10)), null, rtol=0, atol=0)
    three = model(x, 7, class_labels=3)
    assert (three - null).abs().max() > 1e-4 and (model(x, 7, class_labels=4) - three).abs().max() > 1e-4
    mixed = model(x, 7, class_labels=torch.tensor([3, 10, 3]))  # per-sample labels, e.g. a guidance batch
    torch.testing.assert_close(mixed[[0, 2]], three[[0, 2]])
    torch.testing.assert_close(mixed[1], null[1])


@pytest.mark.parametrize("labels,error,match", [
    (11, ValueError, r"class_labels must be None, an int in \[0, 10\]"),
    (-1, ValueError, r"an int in \[0, 10\]"),
    (torch.tensor([0, 11]), ValueError, r"in \[0, 10\] \(10 = null_class_label\), got values from 0 to 11"),
    (torch.tensor([1.0, 2.0]), TypeError, "integer tensor"),
    (torch.tensor([1, 2, 3]), ValueError, r"shape \[\] or \[batch=2\]"),
    (2.0, ValueError, "class_labels must be None, an int"),
])
def test_bad_class_labels_are_named(labels, error, match):
    model = MLPDenoiser(dim=64, hidden=16, depth=1, time_dim=8, num_classes=10)
    with pytest.raises(error, match=match):
        model(torch.randn(2, 64), 3, class_labels=labels)


def test_an_unconditional_denoiser_refuses_labels():
    model = MLPDenoiser(dim=64, hidden=16, depth=1, time_dim=8)
    assert model.num_classes == 0 and model.null_class_label is None and model.class_embedding is None
    with pytest.raises(ValueError, match="class_labels must be None for an unconditional denoiser"):
        model(torch.randn(2, 64), 3, class_labels=1)
    with pytest.raises(ValueError, match="labels must be None for an unconditional model"):
        denoisers.train(model, torch.randn(8, 64), NoiseSchedule(num_train_timesteps=10), labels=torch.zeros(8),
                        steps=1, batch_size=4, progress=False)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_training_target_is_what_the_scheduler_reads(prediction_type):
    """The target of each prediction type turns back into x_0 and eps the way the DDIM step reads it
    (v: x_0 = sqrt(abar) x_t - sqrt(1 - abar) v, eps = sqrt(1 - abar) x_t + sqrt(abar) v)."""
    schedule = NoiseSchedule(beta_schedule="squaredcos_cap_v2")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64), torch.randn(5, 1, 8, 8, generator=g,
                                                                                    dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 900, 999])
    target = denoisers.training_target(prediction_type, x0, eps, t, schedule)
    a = schedule.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    s = schedule.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = a * x0 + s * eps
    if prediction_type == "v_prediction":
        torch.testing.assert_close(a * x_t - s * target, x0)
        torch.testing.assert_close(s * x_t + a * target, eps)
    else:
        torch.testing.assert_close(target, eps if prediction_type == "epsilon" else x0)


TINY_RUN = dict(architecture="mlp", model_config=dict(hidden=16, depth=1, time_dim=8), batch_size=16,
                progress=False, quality_samples=8, threads=1,
                scheduler_config=dict(denoisers.DIGITS_SCHEDULER_CONFIG, num_train_timesteps=50,
                                      beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"))


def test_resume_continues_exactly(tmp_path, monkeypatch):
    """A conditional run stopped after its checkpoint at step 3 and resumed ends with the weights (raw
    and EMA), Adam state, data order, noise offset and RNG of the uninterrupted run, bit for bit (one
    CPU thread: the same reduction order in both)."""
    threads = torch.get_num_threads()
    straight = denoisers.train_ddpm(tmp_path / "straight.pt", steps=7, checkpoint_every=3, **TINY_RUN)
    interrupted = tmp_path / "interrupted.pt"
    interrupted_at_adam_step(monkeypatch, 5, lambda: denoisers.train_ddpm(interrupted, steps=7, checkpoint_every=3,
                                                                          **TINY_RUN))
    saved = torch.load(interrupted, weights_only=True)
    assert saved["training"]["step"] == 3 and saved["metadata"]["step"] == 3
    assert denoisers.load_checkpoint(interrupted).num_classes == 10  # a periodic checkpoint samples too
    resumed = denoisers.train_ddpm(interrupted, resume=True, progress=False, quality_samples=8)
    assert resumed["loss"] == straight["loss"][3:]
    final = [torch.load(p, weights_only=True) for p in (tmp_path / "straight.pt", interrupted)]
    for a, b in zip(final[0]["state_dict"].values(), final[1]["state_dict"].values()):
        assert torch.equal(a, b)
    for name in ("model", "ema"):
        for a, b in zip(final[0]["training"][name].values(), final[1]["training"][name].values()):
            assert torch.equal(a, b)
    for key in ("rng", "order"):
        assert torch.equal(final[0]["training"][key], final[1]["training"][key])
    assert final[0]["training"]["drawn"] == final[1]["training"]["drawn"] == 7 * 16
    assert final[1]["metadata"]["confidence"] == final[0]["metadata"]["confidence"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["interrupted.pt", "straight.pt"]
    torch.set_num_threads(threads)


def test_record_loss_stops_a_diverged_run_and_shows_the_running_mean():
    """Every trainer's loss rule (fastgen.models._training.record_loss): NaN or inf stops the run
    naming it and the step; the bar shows the mean of the last 50 losses every 50 steps."""
    from fastgen.models import _training

    class Bar:
        def set_postfix(self, shown, refresh):
            self.shown = shown

    bar, losses = Bar(), []
    for step, value in enumerate([1.0, 3.0]):
        _training.record_loss(losses, torch.tensor(value), step, bar, "toy training", label="nats", digits=2)
    assert losses == [1.0, 3.0] and bar.shown == {"nats": "1.00"}  # shown at step 0 only
    for value in (float("nan"), float("inf")):
        with pytest.raises(FloatingPointError, match=f"toy training diverged at step 3: loss {value}"):
            _training.record_loss(losses, torch.tensor(value), 2, bar, "toy training")


def test_slim_checkpoint_and_bad_training_arguments(tmp_path):
    threads = torch.get_num_threads()
    out = tmp_path / "slim.pt"
    result = denoisers.train_ddpm(out, steps=2, slim=True, conditional=False, **TINY_RUN)
    state = torch.load(out, weights_only=True)
    assert "training" not in state and all(v.dtype == torch.float16 for v in state["state_dict"].values()
                                           if v.is_floating_point())
    loaded = denoisers.load_checkpoint(out)
    assert loaded.config() == result["model"].config() and loaded.num_classes == 0
    assert loaded.prediction_type == "v_prediction" == loaded.scheduler_config["prediction_type"]
    with pytest.raises(ValueError, match="no training state"):
        denoisers.train_ddpm(out, resume=True)
    with pytest.raises(FileNotFoundError, match="resume=True needs"):
        denoisers.train_ddpm(tmp_path / "missing.pt", resume=True)
    with pytest.raises(IsADirectoryError, match="must be a file path"):  # checked before any training
        denoisers.train_ddpm(tmp_path, steps=1)
    with pytest.raises(ValueError, match="architecture must be one of"):
        denoisers.train_ddpm(tmp_path / "d.pt", architecture="vit")
    with pytest.raises(ValueError, match="checkpoint_every must be >= 1"):
        denoisers.train_ddpm(tmp_path / "d.pt", steps=1, checkpoint_every=0, **TINY_RUN)
    with pytest.raises(ValueError, match="label_dropout must be in"):
        denoisers.train_ddpm(tmp_path / "d.pt", steps=1, label_dropout=1.5, **TINY_RUN)
    torch.set_num_threads(threads)


def test_shipped_checkpoint_samples_look_like_digits():
    """300 samples, 50 DDIM steps (torch backend: the fast path on a CPU) with the null label: confident
    classifier labels, every class present, and an MMD to held-out digits far below that of noise."""
    from fastgen.sampling import make_scheduler

    model = pretrained_denoiser()
    assert model.scheduler_config["num_train_timesteps"] == 1000
    assert model.prediction_type == model.scheduler_config["prediction_type"]
    scheduler = make_scheduler("ddim", **model.scheduler_config)
    x = fastgen.sample(model, (300, 1, 8, 8), scheduler, num_inference_steps=50, seed=123, backend="torch")
    assert x.shape == (300, 1, 8, 8) and torch.isfinite(x).all()
    score = quality.digits_quality(x, value_range=(-1, 1))
    noise = quality.digits_quality(torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                                   value_range=(-1, 1))
    assert score.confidence > 0.9, score
    assert all(c > 0 for c in score.class_counts), score
    assert score.mmd < noise.mmd / 50, (score, noise)


def test_shipped_checkpoint_is_class_conditional():
    """The shipped denoiser is conditional with a null label: samples given class K (no guidance) are
    labelled K by the digit classifier."""
    model = pretrained_denoiser()
    assert model.num_classes == 10 and model.null_class_label == 10
    for k in (0, 4, 9):
        score = denoisers.sample_quality(model, n=50, seed=7, class_labels=k)
        assert score.class_counts[k] >= 45, (k, score)


def test_a_checkpoint_of_an_unknown_architecture_names_the_file_and_the_choices(tmp_path):
    path = tmp_path / "evil.pt"
    denoisers.save_checkpoint(path, MLPDenoiser(dim=64, hidden=16, depth=1), dict(num_train_timesteps=10))
    state = torch.load(path, weights_only=True)
    torch.save(dict(state, architecture="evil"), path)
    with pytest.raises(ValueError, match=r"got '.*evil.pt': its architecture is 'evil', not one of \['mlp', 'unet'\]"):
        denoisers.load_checkpoint(path)


def test_a_checkpoint_whose_weights_do_not_fit_names_the_file_on_a_short_first_line(tmp_path, capsys):
    from fastgen.cli import main

    path = tmp_path / "misshaped.pt"
    denoisers.save_checkpoint(path, MLPDenoiser(dim=64, hidden=16, depth=1), dict(num_train_timesteps=10))
    state = torch.load(path, weights_only=True)
    torch.save(dict(state, config=dict(state["config"], hidden=32)), path)
    with pytest.raises(ValueError) as info:
        denoisers.load_checkpoint(path)
    first, *details = str(info.value).splitlines()
    assert first == (f"path must be a {denoisers.CHECKPOINT_FORMAT} checkpoint, got {str(path)!r}: its weights do "
                     f"not fit the MLPDenoiser its config describes")
    assert "size mismatch" in "\n".join(details)  # torch's details follow
    out = tmp_path / "x.png"
    assert main(["sample", "--checkpoint", str(path), "--n", "1", "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "its weights do not fit the MLPDenoiser" in err
    torch.save(dict(state, config=dict(state["config"], widht=32)), path)
    with pytest.raises(ValueError, match="misshaped.pt'.*: its config does not fit MLPDenoiser"):
        denoisers.load_checkpoint(path)

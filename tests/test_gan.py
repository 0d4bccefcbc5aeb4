"""GAN reference: losses against hand-computed values, the gradient penalty against autograd, models,
sampling through fastgen.latents, a training smoke test, checkpoints, and the shipped generator's
samples judged by fastgen.quality against an untrained generator and noise."""
import math

import pytest
import torch

import fastgen
from fastgen import cli, quality
from fastgen.models import gan
from fastgen.reference import gan as L
from tests.utils import interrupted_at_adam_step

@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These models are tiny: one thread is faster, and on a busy CPU torch's thread pool is many
    times slower (it waits for every thread at every op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


REAL = torch.tensor([2.0, -1.0, 0.25], dtype=torch.float64)
FAKE = torch.tensor([0.5, -3.0, 40.0], dtype=torch.float64)


def log_sigmoid(s):
    return -math.log1p(math.exp(-s))


def mean(values):
    values = list(values)
    return sum(values) / len(values)


# --- losses ----------------------------------------------------------------------------------------

def test_minimax_losses_by_hand():
    d = -mean(log_sigmoid(s) for s in REAL.tolist()) - mean(math.log(1 - 1 / (1 + math.exp(-s))) for s in FAKE[:2].tolist())
    # log(1 - sigmoid(40)) underflows in the naive form; log_sigmoid(-40) is the same number
    d_all = -mean(log_sigmoid(s) for s in REAL.tolist()) - mean(log_sigmoid(-s) for s in FAKE.tolist())
    assert L.minimax_d_loss(REAL, FAKE[:2]).item() == pytest.approx(d, rel=1e-12)
    assert L.minimax_d_loss(REAL, FAKE).item() == pytest.approx(d_all, rel=1e-12)
    assert L.minimax_g_loss(FAKE).item() == pytest.approx(mean(log_sigmoid(-s) for s in FAKE.tolist()), rel=1e-12)
    assert L.minimax_g_loss(torch.tensor([0.0])).item() == pytest.approx(math.log(0.5))


def test_nonsaturating_losses_by_hand():
    assert L.nonsaturating_d_loss(REAL, FAKE).item() == pytest.approx(L.minimax_d_loss(REAL, FAKE).item())
    assert L.nonsaturating_g_loss(FAKE).item() == pytest.approx(-mean(log_sigmoid(s) for s in FAKE.tolist()), rel=1e-12)
    # D(G(z)) = sigmoid(0) = 1/2: -log(1/2)
    assert L.nonsaturating_g_loss(torch.zeros(4)).item() == pytest.approx(math.log(2.0))


def test_hinge_losses_by_hand():
    # real: max(0, 1-2) + max(0, 1+1) + max(0, 1-0.25) = 0 + 2 + 0.75;  fake: 1.5 + 0 + 41
    assert L.hinge_d_loss(REAL, FAKE).item() == pytest.approx(2.75 / 3 + 42.5 / 3)
    assert L.hinge_g_loss(FAKE).item() == pytest.approx(-37.5 / 3)


def test_wasserstein_losses_by_hand():
    assert L.wasserstein_d_loss(REAL, FAKE).item() == pytest.approx(37.5 / 3 - 1.25 / 3)
    assert L.wasserstein_g_loss(FAKE).item() == pytest.approx(-37.5 / 3)


def test_losses_stay_finite_for_extreme_scores():
    big = torch.tensor([1e4, -1e4])
    for name, game in L.LOSSES.items():
        assert torch.isfinite(game.d_loss(big, -big)) and torch.isfinite(game.g_loss(big)), name


def test_non_saturating_generator_gradient_does_not_vanish():
    """Goodfellow Sec. 3: when D confidently rejects G(z), log(1 - D) saturates, -log D does not."""
    fake = torch.tensor([-10.0], requires_grad=True)
    (g_minimax,) = torch.autograd.grad(L.minimax_g_loss(fake), fake)
    (g_ns,) = torch.autograd.grad(L.nonsaturating_g_loss(fake), fake)
    assert abs(g_minimax.item()) < 1e-4 < 0.99 < abs(g_ns.item())


def test_interpolates():
    x, y = torch.ones(3, 1, 2, 2), torch.zeros(3, 1, 2, 2)
    xhat = L.interpolates(x, y, torch.tensor([1.0, 0.0, 0.25]))
    assert torch.equal(xhat[0], x[0]) and torch.equal(xhat[1], y[1]) and torch.allclose(xhat[2], 0.25 * x[2])


def test_gradient_penalty_by_hand():
    """Critic D(x) = |x|^2 / 2 has grad D(xhat) = xhat, so the penalty is mean((|xhat| - 1)^2)."""
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    eps = torch.rand(5, generator=g, dtype=torch.float64)
    penalty = L.gradient_penalty(lambda x: 0.5 * x.square().sum(1), real, fake, eps)
    xhat = [e * r + (1 - e) * f for e, r, f in zip(eps.tolist(), real, fake)]
    expected = mean((v.norm().item() - 1) ** 2 for v in xhat)
    assert penalty.item() == pytest.approx(expected, rel=1e-12)


def test_gradient_penalty_matches_per_sample_autograd():
    """On a real critic, against the gradient taken one sample at a time (no cross-sample terms),
    and it trains the critic: its gradient reaches the critic's parameters."""
    torch.manual_seed(0)
    _, critic = gan.build("dcgan")
    critic.double()
    real, fake = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randn(4, 1, 8, 8, dtype=torch.float64)
    eps = torch.rand(4, dtype=torch.float64)
    penalty = L.gradient_penalty(critic, real, fake, eps)
    norms = []
    for i in range(4):
        xhat = (eps[i] * real[i:i + 1] + (1 - eps[i]) * fake[i:i + 1]).requires_grad_(True)
        (grad,) = torch.autograd.grad(critic(xhat).sum(), xhat)
        norms.append(grad.norm().item())
    assert penalty.item() == pytest.approx(mean((n - 1) ** 2 for n in norms), rel=1e-10)
    penalty.backward()
    # every weight gets a gradient; the biases cannot: the input gradient of a piecewise-linear
    # (LeakyReLU) network is piecewise constant in them
    for name, p in critic.named_parameters():
        if name.endswith("weight"):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None or not p.grad.any(), name


def test_wgan_gp_d_loss_is_wasserstein_plus_weighted_penalty():
    torch.manual_seed(1)
    _, critic = gan.build("mlp")
    real, fake = torch.randn(6, 64), torch.randn(6, 64)
    eps = torch.rand(6)
    loss = L.wgan_gp_d_loss(critic, real, fake, weight=10.0, eps=eps)
    expected = critic(fake).mean() - critic(real).mean() + 10.0 * L.gradient_penalty(critic, real, fake, eps)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# --- models and sampling -------------------------------------------------------------------------

@pytest.mark.parametrize("architecture, shape", [("dcgan", (5, 1, 8, 8)), ("mlp", (5, 64))])
def test_model_shapes(architecture, shape):
    torch.manual_seed(0)
    G, D = gan.build(architecture, latent_dim=16)
    x = G(torch.randn(5, 16))
    assert x.shape == shape and x.abs().max() <= 1.0
    assert D(x).shape == (5,)


def test_sample_uses_fastgen_latents_and_is_split_invariant():
    torch.manual_seed(0)
    G, _ = gan.build("dcgan")
    G.train()  # sample() must switch to eval itself and restore the mode
    x = G.sample(8, seed=3, truncation=0.8)
    assert G.training
    G.eval()
    expected = G(fastgen.latents(8, G.latent_dim, seed=3, truncation=0.8))
    assert torch.allclose(x, expected, atol=1e-6)
    assert torch.allclose(G.sample(5, seed=3, offset=3, truncation=0.8), x[3:], atol=1e-6)
    assert not torch.allclose(G.sample(8, seed=3), x, atol=1e-3)  # truncation changes the latents


def test_build_rejects_unknown_architecture():
    with pytest.raises(ValueError, match="architecture"):
        gan.build("stylegan")


# --- training ------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", sorted(L.LOSSES))
@pytest.mark.parametrize("architecture", ["dcgan", "mlp"])
def test_training_smoke(architecture, loss):
    torch.manual_seed(0)
    G, D = gan.build(architecture)
    weights = [p for name, p in [*G.named_parameters(), *D.named_parameters()] if name.endswith("weight")]
    before = [p.detach().clone() for p in weights]
    history = gan.train(G, D, gan.digits_for_training(architecture)[:256], loss=loss, steps=3, batch_size=16,
                        d_steps=2, progress=False)
    assert len(history["d_loss"]) == len(history["g_loss"]) == 3
    assert all(math.isfinite(v) for v in history["d_loss"] + history["g_loss"])
    # every weight moves (a bias may not: e.g. the hinge loss's gradient for D's last bias is
    # #real in the margin - #fake in the margin, exactly 0 while all scores are in (-1, 1))
    assert all(not torch.equal(a, b) for a, b in zip(before, weights))


def test_training_is_reproducible():
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        G, D = gan.build("mlp", hidden=32)
        runs.append(gan.train(G, D, gan.digits_for_training("mlp")[:128], steps=4, batch_size=16, seed=5,
                              progress=False)["g_loss"])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(loss="wasserstein"), ValueError, "loss"), (dict(d_steps=0), ValueError, "d_steps"),
    (dict(steps=-1), ValueError, "steps"), (dict(batch_size=10_000), ValueError, "batch_size"),
])
def test_training_rejects_bad_arguments(kwargs, error, name):
    G, D = gan.build("mlp", hidden=8)
    with pytest.raises(error, match=name):
        gan.train(G, D, gan.digits_for_training("mlp"), progress=False, **kwargs)


# --- checkpoints and the shipped generator -------------------------------------------------------

def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    G, D = gan.build("dcgan", width=8)
    gan.train(G, D, gan.digits_for_training()[:64], steps=2, batch_size=16, progress=False)
    gan.save_checkpoint(tmp_path / "g.pt", G, D, steps=2)
    G2, D2 = gan.load_checkpoint(tmp_path / "g.pt", discriminator=True)
    assert torch.equal(G2.sample(4, seed=1), G.sample(4, seed=1))
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(D2(x), D.eval()(x))
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="path"):
        gan.load_checkpoint(tmp_path / "other.pt")


class _RunsCode:
    def __reduce__(self):
        return print, ("this checkpoint ran code",)


def test_load_checkpoint_refuses_pickled_code_and_other_formats(tmp_path, capsys):
    from fastgen.models import denoisers

    torch.save({"format": gan.CHECKPOINT_FORMAT, "generator": _RunsCode()}, tmp_path / "code.pt")
    with pytest.raises(ValueError, match=r"refused: contains pickled code, loading only plain tensors "
                                         r"\(weights_only=True\); it names .*print"):
        gan.load_checkpoint(tmp_path / "code.pt")
    assert "ran code" not in capsys.readouterr().out
    denoisers.save_checkpoint(tmp_path / "ddpm.pt", denoisers.MLPDenoiser(hidden=8, depth=1), {})
    with pytest.raises(ValueError, match="must be a fastgen-gan/1 checkpoint.*its format is 'fastgen-denoiser/1'"):
        gan.load_checkpoint(tmp_path / "ddpm.pt")
    with pytest.raises(IsADirectoryError, match="got the directory"):
        gan.load_checkpoint(tmp_path)


def test_train_command_writes_a_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "gan.pt"
    assert cli.main(["train", "gan", "--steps", "3", "--batch-size", "16", "--out", str(out), "--no-progress",
                     "--loss", "hinge", "--architecture", "mlp"]) == 0
    assert "saved" in capsys.readouterr().out
    assert gan.load_checkpoint(out).sample(2, seed=0).shape == (2, 64)


@pytest.fixture(scope="module")
def shipped_scores():
    """Quality of 1000 samples: the shipped generator, an untrained one of its shape, and noise."""
    trained = gan.pretrained_generator()
    torch.manual_seed(0)
    untrained = gan.DCGANGenerator(**trained.config())
    noise = torch.rand(1000, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return {name: quality.digits_quality(x, value_range=(-1, 1)) for name, x in
            [("trained", trained.sample(1000, seed=123)), ("untrained", untrained.sample(1000, seed=123)),
             ("noise", noise)]}


def test_shipped_generator_samples_are_digits(shipped_scores):
    trained, untrained, noise = (shipped_scores[k] for k in ("trained", "untrained", "noise"))
    print({k: str(v) for k, v in shipped_scores.items()})
    assert trained.confidence > 0.85
    assert trained.confidence > max(untrained.confidence, noise.confidence) + 0.1
    assert trained.mmd < 0.03
    assert trained.mmd < 0.2 * min(untrained.mmd, noise.mmd)
    assert min(trained.class_counts) >= 30  # every digit shows up: no mode collapse


def test_shipped_generator_truncation_trick():
    """Truncated latents keep the samples digits; smaller psi, less diverse samples."""
    G = gan.pretrained_generator()
    spread = {}
    for psi in (0.5, 2.0):
        x = G.sample(500, seed=7, truncation=psi)
        assert quality.digits_quality(x, value_range=(-1, 1)).confidence > 0.75
        spread[psi] = x.flatten(1).std(dim=0).mean().item()
    assert spread[0.5] < spread[2.0]


# --- the quality measures themselves -------------------------------------------------------------

def test_quality_of_real_digits():
    from fastgen import data

    x, _ = data.digits("train")
    score = quality.digits_quality(x[:800])
    assert score.confidence > 0.95 and abs(score.mmd) < 0.005 and min(score.class_counts) > 40


def test_classifier_accuracy_on_held_out_digits():
    from fastgen import data

    x, y = data.digits("test")
    assert (quality.class_probabilities(x).argmax(1) == y).double().mean() > 0.95


def test_mmd_by_hand():
    x, y = torch.tensor([[0.0], [1.0]], dtype=torch.float64), torch.tensor([[0.0], [2.0], [3.0]], dtype=torch.float64)
    k = lambda a, b: math.exp(-(a - b) ** 2 / 2.0)  # noqa: E731  sigma = 1
    xs, ys = [0.0, 1.0], [0.0, 2.0, 3.0]
    within_x = mean(k(a, b) for i, a in enumerate(xs) for j, b in enumerate(xs) if i != j)
    within_y = mean(k(a, b) for i, a in enumerate(ys) for j, b in enumerate(ys) if i != j)
    across = mean(k(a, b) for a in xs for b in ys)
    assert quality.mmd2(x, y, 1.0) == pytest.approx(within_x + within_y - 2 * across, rel=1e-12)


@pytest.mark.parametrize("samples, kwargs, error, name", [
    (torch.zeros(4, 1, 7, 7), {}, ValueError, "samples"), (torch.zeros(4, 64, dtype=torch.int64), {}, TypeError, "samples"),
    (torch.zeros(1, 64), {}, ValueError, "samples"), (torch.zeros(4, 64), dict(value_range=(1, 1)), ValueError, "value_range"),
])
def test_quality_rejects_bad_samples(samples, kwargs, error, name):
    with pytest.raises(error, match=name):
        quality.digits_quality(samples, **kwargs)


def test_resume_continues_exactly(tmp_path, monkeypatch):
    """A run stopped after its checkpoint at step 2 and resumed ends with the weights, both Adam states,
    data order, latent offset and RNG of the uninterrupted run, bit for bit (one CPU thread)."""
    threads = torch.get_num_threads()
    tiny = dict(architecture="mlp", steps=5, batch_size=16, d_steps=2, loss="wgan-gp", checkpoint_every=2,
                threads=1, progress=False, quality_samples=8)
    straight = gan.train_gan(tmp_path / "straight.pt", **tiny)
    interrupted = tmp_path / "interrupted.pt"
    # the 8th Adam step: during the third generator step (two D updates and one G update per step)
    interrupted_at_adam_step(monkeypatch, 8, lambda: gan.train_gan(interrupted, **tiny))
    assert torch.load(interrupted, weights_only=True)["training"]["step"] == 2
    resumed = gan.train_gan(interrupted, resume=True, progress=False, quality_samples=8)
    assert resumed["history"]["g_loss"] == straight["history"]["g_loss"][2:]
    final = [torch.load(p, weights_only=True) for p in (tmp_path / "straight.pt", interrupted)]
    for net in ("generator", "discriminator"):
        for a, b in zip(final[0][net]["state_dict"].values(), final[1][net]["state_dict"].values()):
            assert torch.equal(a, b)
    assert torch.equal(final[0]["training"]["rng"], final[1]["training"]["rng"])
    assert final[0]["training"]["drawn"] == final[1]["training"]["drawn"]
    assert final[1]["metadata"]["mmd"] == final[0]["metadata"]["mmd"]
    gan.train_gan(tmp_path / "slim.pt", slim=True, **dict(tiny, steps=1))
    assert "training" not in torch.load(tmp_path / "slim.pt", weights_only=True)
    with pytest.raises(ValueError, match="no training state"):
        gan.train_gan(tmp_path / "slim.pt", resume=True)
    torch.set_num_threads(threads)


def test_a_checkpoint_of_an_unknown_architecture_or_misfit_weights_names_the_file(tmp_path):
    path = tmp_path / "g.pt"
    gan.save_checkpoint(path, *gan.build("mlp", hidden=8))
    state = torch.load(path, weights_only=True)
    torch.save(dict(state, architecture="evil"), path)
    with pytest.raises(ValueError, match=r"g.pt': its architecture is 'evil', not one of \['dcgan', 'mlp'\]"):
        gan.load_checkpoint(path)
    state["generator"]["state_dict"] = {k: v.reshape(-1)[:1] for k, v in state["generator"]["state_dict"].items()}
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"g.pt': its weights do not fit the MLPGenerator its config describes"):
        gan.load_checkpoint(path)

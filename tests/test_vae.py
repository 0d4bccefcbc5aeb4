"""The VAE: it trains on the built-in digits (held-out negative ELBO falls), fused and reference agree
step for step from one seed, and its pieces have the shapes and errors users expect."""
import re

import pytest
import torch

from fastgen.data import digits
from fastgen.models import VAE
from fastgen.reference import gaussian as ref


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread is fastest, and spares a shared CPU from oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return digits("train")[0], digits("test")[0]


def train(model, x_train, steps, *, batch=128, lr=3e-3):
    """Adam on random minibatches (fixed order); returns the training losses."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = x_train[torch.randint(0, len(x_train), (batch,), generator=order)]
        loss = model.loss(x).loss  # eps seeds drawn from torch's generator: the same for both paths
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def held_out(model, x_test):
    with torch.no_grad():
        return model.loss(x_test, seed=123).loss.item()


@pytest.mark.parametrize("arch, likelihood", [("mlp", "bernoulli"), ("conv", "bernoulli"), ("mlp", "gaussian")])
def test_elbo_trains_on_digits(data, arch, likelihood):
    """200 reference steps (a second or so on a CPU) cut the held-out negative ELBO by a clear margin."""
    x_train, x_test = data
    torch.manual_seed(0)
    model = VAE((1, 8, 8), latent_dim=8, hidden=64 if arch == "mlp" else 16, arch=arch, likelihood=likelihood)
    before = held_out(model, x_test)
    train(model, x_train, 200)
    after = held_out(model, x_test)
    assert after < before - 0.3 * abs(before), (before, after)


def test_fused_vae_trains_like_the_reference(data, device):
    """The fused path (Triton kernels; the interpreter on CPU) from the same seed gives the same
    losses as the reference at every step, and improves the held-out ELBO just as well."""
    x_train, x_test = (x.to(device) for x in data)
    runs = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = VAE((1, 8, 8), latent_dim=8, hidden=64, fused=fused, backend="triton" if fused else "torch")
        model.to(device)
        before = held_out(model, x_test)
        losses = train(model, x_train, 40)
        runs[fused] = (before, losses, held_out(model, x_test))
    (before, fused_losses, fused_after), (_, ref_losses, ref_after) = runs[True], runs[False]
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(ref_losses), rtol=1e-4, atol=0)
    assert fused_after == pytest.approx(ref_after, rel=1e-4)
    assert fused_after < before - 0.15 * before


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_fused_and_reference_losses_and_gradients_agree(data, device, arch, likelihood):
    x = data[1][:32].to(device)
    torch.manual_seed(0)
    fused = VAE((1, 8, 8), latent_dim=6, hidden=8, arch=arch, likelihood=likelihood, fused=True, backend="triton")
    reference = VAE((1, 8, 8), latent_dim=6, hidden=8, arch=arch, likelihood=likelihood, fused=False)
    fused.to(device), reference.to(device)
    reference.load_state_dict(fused.state_dict())
    parts = []
    for model in (fused, reference):
        elbo = model.loss(x, seed=7)
        elbo.loss.backward()
        parts.append((elbo, [p.grad for p in model.parameters()]))
    (elbo_f, grads_f), (elbo_r, grads_r) = parts
    for a, b in zip(elbo_f, elbo_r):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.isclose(elbo_f.loss, elbo_f.recon + elbo_f.kl)
    for a, b in zip(grads_f, grads_r):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_shapes_and_determinism(data):
    torch.manual_seed(0)
    model = VAE((1, 8, 8), latent_dim=5, hidden=16, arch="conv")
    x = data[1][:10]
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (10, 5)
    decoded, mu2, logvar2, z, kl = model(x, seed=3)
    assert decoded.shape == x.shape and z.shape == (10, 5) and kl.shape == (10,)
    assert torch.equal(model(x, seed=3)[3], z) and not torch.equal(model(x, seed=4)[3], z)
    torch.testing.assert_close(kl, ref.reduce(ref.gaussian_kl(mu, logvar), "per_sample"))
    samples = model.sample(7, seed=1)
    assert samples.shape == (7, 1, 8, 8) and ((samples >= 0) & (samples <= 1)).all()
    assert torch.equal(samples, model.sample(7, seed=1)) and not torch.equal(samples, model.sample(7, seed=2))
    flat = VAE(64, latent_dim=3, hidden=16)
    assert flat(digits("test", flat=True)[0][:4])[0].shape == (4, 64)
    elbo = flat.loss(digits("test", flat=True)[0][:4], seed=0)
    assert elbo.loss.shape == elbo.recon.shape == elbo.kl.shape == () and elbo.kl > 0


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(arch="transformer"), ValueError, "arch"),
    (dict(likelihood="poisson"), ValueError, "likelihood"),
    (dict(arch="conv", input_shape=(1, 6, 6)), ValueError, "divisible by 4"),
    (dict(arch="conv", input_shape=(64,)), ValueError, "input_shape"),
    (dict(latent_dim=0), ValueError, "latent_dim"),
    (dict(latent_dim=2.5), TypeError, "latent_dim"),
    (dict(input_shape=(1, -8, 8)), ValueError, "input_shape"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        VAE(**kwargs)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("shape", [(4, 1, 8, 9), (4, 64), (4, 2, 8, 8), (1, 8, 8)], ids=str)
def test_an_input_of_the_wrong_shape_is_named_before_any_work(arch, shape):
    model = VAE((1, 8, 8), latent_dim=4, hidden=8, arch=arch)
    for call in (model.loss, model, model.encode):
        with pytest.raises(ValueError, match=rf"x must be a \[N, 1, 8, 8\] tensor \(input_shape \(1, 8, 8\)\), "
                                             rf"got shape {re.escape(str(shape))}"):
            call(torch.zeros(shape))
    with pytest.raises(TypeError, match=r"x must be a \[N, 1, 8, 8\] tensor"):
        model.loss([[0.0] * 64])

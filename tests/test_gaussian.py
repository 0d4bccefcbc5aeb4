"""Fused Gaussian ops (reparameterize, gaussian_kl, reparameterize_with_kl): forward and gradients
against the float64 reference, the noise against fastgen.randn, independent peers
(torch.distributions), tilings of every size, and bad input."""
import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch.distributions import Normal, kl_divergence

import fastgen
import fastgen.kernels
from fastgen.kernels import gaussian as k_gaussian
from fastgen.reference import gaussian as ref
from fastgen.reference import random as ref_random
from tests.utils import FLOAT_DTYPES, ODD_SHAPES, SMALL_SHAPES, assert_close, rand_like_shape, with_nonfinite
from tests.utils import noncontiguous as _noncontiguous

SEED = 0xC0FFEE1234567890  # >= 2^63: the high key word matters
REDUCTIONS = ["none", "per_sample", "sum", "batchmean"]


def inputs(shape, dtype, device, *, seed=0, n=2):
    """mu ~ N(0, 1) and logvar ~ N(0, 1/4) (std in ~[0.5, 2]), fresh and never zero."""
    g = torch.Generator().manual_seed(seed)
    mu = rand_like_shape(shape, dtype, device, generator=g)
    logvar = rand_like_shape(shape, dtype, device, scale=0.5, generator=g)
    extra = [rand_like_shape(shape, dtype, device, generator=g) for _ in range(n - 2)]
    return [mu, logvar, *extra]


def noncontiguous(t):
    """tests.utils.noncontiguous, except for one element, where every view is contiguous."""
    return t.clone() if t.numel() == 1 else _noncontiguous(t)


def grads(fn, tensors, grad_outputs):
    """Outputs of fn(*tensors) and the gradients of sum(out * g) w.r.t. every tensor."""
    leaves = [t.detach().requires_grad_(True) for t in tensors]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return outs, torch.autograd.grad(outs, leaves, grad_outputs)


def f64(tensors):
    return [t.detach().cpu().double() for t in tensors]


def eps64(shape, offset=0, stream=0):
    """The reference eps of the ops' draw at ``offset`` (in rows of mu: the reference counts elements)."""
    return ref_random.randn(shape, seed=SEED, stream=stream, offset=offset * math.prod(shape[1:]),
                            dtype=torch.float64)


def check_all(actual, expected, dtype):
    for a, e in zip(actual, expected):
        assert a.dtype == dtype and a.shape == e.shape
        assert_close(a, e, dtype=dtype)


# --- reparameterize --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
def test_reparameterize_seeded_matches_reference(device, shape, dtype):
    mu, logvar, g = inputs(shape, dtype, device, n=3)
    offset = 4 * len(shape) + 3  # in rows of odd length: element offsets k * row = 3 mod 4 (tiles start early)
    outs, gr = grads(lambda m, lv: fastgen.reparameterize(m, lv, seed=SEED, offset=offset, backend="triton"),
                     [noncontiguous(mu), noncontiguous(logvar)], [g])
    eps = eps64(shape, offset)
    outs64, gr64 = grads(lambda m, lv: ref.reparameterize(m, lv, eps), f64([mu, logvar]), f64([g]))
    check_all(outs + gr, outs64 + gr64, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
def test_reparameterize_noise_tensor_matches_reference(device, shape, dtype):
    mu, logvar, noise, g = inputs(shape, dtype, device, seed=1, n=4)
    outs, gr = grads(lambda m, lv, e: fastgen.reparameterize(m, lv, noise=e, backend="triton"),
                     [mu, noncontiguous(logvar), noise], [g])
    outs64, gr64 = grads(ref.reparameterize, f64([mu, logvar, noise]), f64([g]))
    check_all(outs + gr, outs64 + gr64, dtype)


@pytest.mark.parametrize("op", ["reparameterize", "reparameterize_with_kl"])
@pytest.mark.parametrize("shape, offset", [((1,), 0), ((5, 123), 1), ((6, 3, 4), 2), ((64, 5, 7), 3), ((7, 129), 6)])
def test_noise_from_seed_is_fastgen_randn(device, op, shape, offset):
    """With mu = 0 and logvar = 0, z is eps itself: exactly fastgen.randn's draw at (seed, stream, offset)."""
    zeros = torch.zeros(shape, device=device)
    z = getattr(fastgen, op)(zeros, zeros, seed=SEED, stream=3, offset=offset, backend="triton")
    z = z[0] if isinstance(z, tuple) else z
    assert torch.equal(z, fastgen.randn(shape, seed=SEED, stream=3, offset=offset, device=device, backend="triton"))


def test_no_seed_follows_torch_manual_seed(device):
    mu, logvar = inputs((4, 33), torch.float32, device)
    draws = []
    for s in (0, 0, 1):
        torch.manual_seed(s)
        draws.append(fastgen.reparameterize(mu, logvar, backend="triton"))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    torch.manual_seed(0)
    assert torch.equal(draws[0], fastgen.reparameterize_with_kl(mu, logvar, backend="triton")[0])


def test_torch_backend_draws_the_same_noise(device):
    mu, logvar = inputs((6, 50), torch.float32, device)
    fused = fastgen.reparameterize(mu, logvar, seed=SEED, offset=9, backend="triton")
    reference = fastgen.reparameterize(mu.cpu(), logvar.cpu(), seed=SEED, offset=9, backend="torch")
    assert_close(fused, reference.double())


# --- gaussian_kl -----------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
def test_gaussian_kl_standard_prior_matches_reference(device, shape, dtype, reduction):
    mu, logvar = inputs(shape, dtype, device, seed=2)
    kl = lambda m, lv: fastgen.gaussian_kl(m, lv, reduction=reduction, backend="triton")  # noqa: E731
    out_shape = ref.reduce(torch.empty(shape), reduction).shape
    g = rand_like_shape(out_shape, dtype, device)
    outs, gr = grads(kl, [noncontiguous(mu), logvar], [g])
    outs64, gr64 = grads(lambda m, lv: ref.reduce(ref.gaussian_kl(m, lv), reduction), f64([mu, logvar]), f64([g]))
    check_all(outs + gr, outs64 + gr64, dtype)


def prior_of(shape, kind, dtype, device):
    """A prior (mu2, logvar2) shaped as ``kind`` says; every broadcast the op accepts."""
    g = torch.Generator().manual_seed(3)
    pshape = {"full": shape, "shared": shape[1:], "leading-ones": (1, *shape[1:]),
              "scalar": (), "per-sample": (shape[0],) + (1,) * (len(shape) - 1),
              "last-dim": shape[-1:]}[kind]
    return (rand_like_shape(pshape, dtype, device, generator=g),
            rand_like_shape(pshape, dtype, device, scale=0.5, generator=g))


@pytest.mark.parametrize("reduction", ["none", "per_sample", "batchmean"])
@pytest.mark.parametrize("kind", ["full", "shared", "leading-ones", "scalar", "per-sample", "last-dim"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_gaussian_kl_general_prior_all_four_gradients(device, dtype, kind, reduction):
    shape = (6, 5, 12)
    mu, logvar = inputs(shape, dtype, device, seed=4)
    mu2, logvar2 = prior_of(shape, kind, dtype, device)
    out_shape = ref.reduce(torch.empty(shape), reduction).shape
    g = rand_like_shape(out_shape, dtype, device)

    def fused(m, lv, m2, lv2):
        return fastgen.gaussian_kl(m, lv, m2, lv2, reduction=reduction, backend="triton")

    outs, gr = grads(fused, [mu, logvar, mu2, logvar2], [g])
    outs64, gr64 = grads(lambda *t: ref.reduce(ref.gaussian_kl(*t), reduction), f64([mu, logvar, mu2, logvar2]),
                         f64([g]))
    check_all(outs + gr[:2], outs64 + gr64[:2], dtype)
    for a, e in zip(gr[2:], gr64[2:]):  # prior gradients: summed over the broadcast dims (fp32, rounded once)
        assert a.dtype == dtype and a.shape == e.shape
        assert_close(a, e, dtype=dtype)


@pytest.mark.parametrize("given", ["mu2", "logvar2"])
def test_gaussian_kl_one_prior_parameter(device, given):
    """An absent mu2 or logvar2 is the standard normal's 0."""
    mu, logvar, other = inputs((7, 9), torch.float32, device, n=3)
    outs, gr = grads(lambda m, lv, o: fastgen.gaussian_kl(m, lv, **{given: o}, backend="triton"), [mu, logvar, other],
                     [torch.ones(7, device=device)])
    zero = torch.zeros(7, 9, dtype=torch.float64)
    full = dict(mu2=zero, logvar2=zero)
    outs64, gr64 = grads(lambda m, lv, o: ref.reduce(ref.gaussian_kl(m, lv, **{**full, given: o}), "per_sample"),
                         f64([mu, logvar, other]), [torch.ones(7, dtype=torch.float64)])
    check_all(outs + gr, outs64 + gr64, torch.float32)


def test_gaussian_kl_matches_torch_distributions(device):
    """Independent peer: torch.distributions.kl_divergence(Normal, Normal), summed per sample."""
    mu, logvar, mu2, logvar2 = inputs((8, 37), torch.float32, device, seed=5, n=4)
    fused = fastgen.gaussian_kl(mu, logvar, mu2, logvar2, backend="triton")
    m, lv, m2, lv2 = f64([mu, logvar, mu2, logvar2])
    peer = kl_divergence(Normal(m, (0.5 * lv).exp()), Normal(m2, (0.5 * lv2).exp())).sum(1)
    assert_close(fused, peer)
    standard = fastgen.gaussian_kl(mu, logvar, reduction="none", backend="triton")
    assert_close(standard, kl_divergence(Normal(m, (0.5 * lv).exp()), Normal(0.0, 1.0)))


def test_gaussian_kl_on_the_largest_shape(device):
    """5.9M elements in rows of 370k: many chunks per row, partial sums (fp32 only, for time)."""
    shape = ODD_SHAPES[-1]
    mu, logvar = inputs(shape, torch.float32, device, seed=6)
    out = fastgen.gaussian_kl(mu, logvar, reduction="per_sample", backend="triton")
    assert_close(out, ref.reduce(ref.gaussian_kl(*f64([mu, logvar])), "per_sample"))
    z, kl = fastgen.reparameterize_with_kl(mu, logvar, seed=SEED, offset=5, backend="triton")
    assert_close(kl, out.double(), rtol=1e-6)
    assert_close(z, ref.reparameterize(*f64([mu, logvar]), eps64(shape, 5)))


# --- reparameterize_with_kl ------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["seed", "noise"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SMALL_SHAPES + [(6, 4, 5)], ids=str)
def test_reparameterize_with_kl_matches_reference(device, shape, dtype, source):
    mu, logvar, noise, gz = inputs(shape, dtype, device, seed=7, n=4)
    gk = rand_like_shape(shape[:1], dtype, device)
    offset = 2
    if source == "seed":
        fused = lambda m, lv: fastgen.reparameterize_with_kl(m, lv, seed=SEED, offset=offset, backend="triton")  # noqa
        eps = eps64(shape, offset)
    else:
        fused = lambda m, lv: fastgen.reparameterize_with_kl(m, lv, noise=noise, backend="triton")  # noqa
        eps = noise.cpu().double()
    outs, gr = grads(fused, [noncontiguous(mu), logvar], [gz, gk])
    outs64, gr64 = grads(lambda m, lv: ref.reparameterize_with_kl(m, lv, eps), f64([mu, logvar]), f64([gz, gk]))
    check_all(outs + gr, outs64 + gr64, dtype)


@pytest.mark.parametrize("used", ["z", "kl"])
def test_reparameterize_with_kl_gradient_through_one_output(device, used):
    mu, logvar, noise = inputs((5, 6), torch.float32, device, seed=8, n=3)
    leaves = [t.clone().requires_grad_(True) for t in (mu, logvar, noise)]
    z, kl = fastgen.reparameterize_with_kl(*leaves[:2], noise=leaves[2], backend="triton")
    (z.sum() if used == "z" else kl.sum()).backward()
    leaves64 = [t.double().requires_grad_(True) for t in f64([mu, logvar, noise])]
    z64, kl64 = ref.reparameterize_with_kl(*leaves64)
    (z64.sum() if used == "z" else kl64.sum()).backward()
    for a, e in zip(leaves, leaves64):
        assert (a.grad is None) == (e.grad is None)  # noise has no gradient through the KL alone
        if e.grad is not None:
            assert_close(a.grad, e.grad)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("shape", [(8, 3, 7), (8, 4, 2), (8,)], ids=str)
@pytest.mark.parametrize("op", ["reparameterize", "reparameterize_with_kl"])
def test_offset_counts_rows_of_mu(device, op, shape, backend):
    """offset counts samples (rows of mu): rows k.. drawn at offset=k are rows k.. of the whole batch,
    bit for bit, with their gradients (rows of 21 start mid-Philox-block, rows of 8 on a block
    boundary; a 1-d mu has rows of one element)."""
    fn = getattr(fastgen, op)
    mu, logvar, gz = inputs(shape, torch.float32, device, n=3)
    gk = rand_like_shape(shape[:1], torch.float32, device)
    if backend == "torch":
        mu, logvar, gz, gk = (t.cpu() for t in (mu, logvar, gz, gk))

    def run(m, lv, g_z, g_k, offset):
        return grads(lambda a, b: fn(a, b, seed=SEED, offset=offset, backend=backend), [m, lv],
                     [g_z] if op == "reparameterize" else [g_z, g_k])

    outs, gr = run(mu, logvar, gz, gk, 0)
    for k in (1, 3):
        part, g_part = run(mu[k:], logvar[k:], gz[k:], gk[k:], k)
        for a, b in zip(part + g_part, outs + gr):
            assert torch.equal(a, b[k:])


# --- NaN and inf go where the reference puts them, forward and backward --------------------------

def nonfinite_inputs(shape, n, seed):
    """n float32 tensors with NaN/+-inf at random positions of every row but the first."""
    g = torch.Generator().manual_seed(seed)
    tensors = [rand_like_shape(shape, generator=g) for _ in range(n)]
    for t in tensors:
        t[1:] = with_nonfinite(t[1:], g)
    return tensors


def check_nonfinite(actual, expected):
    for a, e in zip(actual, expected):
        assert_close(a, e, equal_nan=True)
    assert any(not torch.isfinite(e).all() for e in expected)


@pytest.mark.parametrize("source", ["seed", "noise"])
def test_reparameterize_propagates_nan_and_inf_as_the_reference(device, source):
    shape = (4, 5, 6)
    mu, logvar, noise, gz = (t.to(device) for t in nonfinite_inputs(shape, 4, seed=30))
    gz = gz.nan_to_num(0.5, 2.0, -2.0)  # a NaN upstream gradient would hide what the kernel does
    kwargs = dict(seed=SEED) if source == "seed" else dict(noise=noise)
    eps = eps64(shape) if source == "seed" else noise.cpu().double()
    outs, gr = grads(lambda m, lv: fastgen.reparameterize(m, lv, backend="triton", **kwargs), [mu, logvar], [gz])
    outs64, gr64 = grads(lambda m, lv: ref.reparameterize(m, lv, eps), f64([mu, logvar]), f64([gz]))
    check_nonfinite(outs + gr, outs64 + gr64)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("prior", [False, True])
def test_gaussian_kl_propagates_nan_and_inf_as_the_reference(device, prior, reduction):
    shape = (4, 5, 6)
    tensors = [t.to(device) for t in nonfinite_inputs(shape, 4 if prior else 2, seed=31)]
    out_shape = ref.reduce(torch.empty(shape), reduction).shape
    g = rand_like_shape(out_shape, torch.float32, device)
    outs, gr = grads(lambda *t: fastgen.gaussian_kl(*t, reduction=reduction, backend="triton"), tensors, [g])
    outs64, gr64 = grads(lambda *t: ref.reduce(ref.gaussian_kl(*t), reduction), f64(tensors), f64([g]))
    check_nonfinite(outs + gr, outs64 + gr64)


def test_reparameterize_with_kl_propagates_nan_and_inf_as_the_reference(device):
    shape = (4, 5, 6)
    mu, logvar, noise, gz = (t.to(device) for t in nonfinite_inputs(shape, 4, seed=32))
    gz, gk = gz.nan_to_num(0.5, 2.0, -2.0), rand_like_shape(shape[:1], torch.float32, device)
    outs, gr = grads(lambda m, lv: fastgen.reparameterize_with_kl(m, lv, noise=noise, backend="triton"), [mu, logvar],
                     [gz, gk])
    outs64, gr64 = grads(lambda m, lv: ref.reparameterize_with_kl(m, lv, noise.cpu().double()), f64([mu, logvar]),
                         f64([gz, gk]))
    check_nonfinite(outs + gr, outs64 + gr64)


# --- tilings: results never depend on the block, rows split in chunks sum correctly --------------

@pytest.mark.parametrize("shape, offset, block", [
    ((7, 129), 1, 64), ((7, 129), 1, 256), ((5, 40), 3, 16), ((5, 40), 3, 256), ((3, 5), 0, 16),
    ((9, 2, 8), 6, 16), ((9, 2, 8), 6, 64),
    ((1, 129), 3, 16), ((1, 129), 3, 64)], ids=str)  # one row, element offset 387: tiles shifted by 3
def test_results_do_not_depend_on_the_block(device, monkeypatch, shape, offset, block):
    """Small blocks split rows into many chunks (partial sums) and pack short rows into tiles."""
    mu, logvar, mu2, gz = inputs(shape, torch.float32, device, seed=9, n=4)
    gk = rand_like_shape(shape[:1], torch.float32, device)
    g_red = {red: rand_like_shape(ref.reduce(mu, red).shape, torch.float32, device) for red in REDUCTIONS}

    def run():
        out = []
        for red in REDUCTIONS:
            o, gr = grads(lambda m, lv, m2: fastgen.gaussian_kl(m, lv, m2, reduction=red, backend="triton"),
                          [mu, logvar, mu2[0]], [g_red[red]])
            out += [*o, *gr]
        out += grads(lambda m, lv: fastgen.reparameterize(m, lv, seed=SEED, offset=offset, backend="triton"),
                     [mu, logvar], [gz])[1]
        o, gr = grads(lambda m, lv: fastgen.reparameterize_with_kl(m, lv, seed=SEED, offset=offset, backend="triton"),
                      [mu, logvar], [gz, gk])
        return [*o, *gr]

    expected = run()  # default tiling (in the interpreter: one program covers everything)
    default_tiling = k_gaussian.tiling
    monkeypatch.setattr(k_gaussian, "tiling", lambda *a, **kw: default_tiling(*a, **{**kw, "block": block}))
    assert k_gaussian.tiling(1, 1000).n_chunks > 1  # rows really are split
    actual = run()
    for a, e in zip(actual, expected):
        assert_close(a, e.double(), rtol=2e-6)


# --- statistics: the sample is N(mu, exp(logvar)) --------------------------------------------------

N_STATS = 1 << 16


@pytest.mark.parametrize("offset", [0, 3])
def test_sample_statistics_match_normal_rsample(device, offset):
    mu0, std0 = 1.5, 0.7
    mu = torch.full((N_STATS // 64, 64), mu0, device=device)
    logvar = torch.full_like(mu, 2 * np.log(std0))
    z = fastgen.reparameterize(mu, logvar, seed=SEED, offset=offset, backend="triton").double().cpu().numpy().ravel()
    z_kl, _ = fastgen.reparameterize_with_kl(mu, logvar, seed=SEED, offset=offset, backend="triton")
    assert np.array_equal(z, z_kl.double().cpu().numpy().ravel())
    n = len(z)
    assert abs(z.mean() - mu0) < 5 * std0 / np.sqrt(n)
    assert abs(z.std() / std0 - 1) < 5 / np.sqrt(2 * n)
    assert scipy.stats.kstest(z, "norm", args=(mu0, std0)).pvalue > 1e-3
    torch.manual_seed(0)  # the peer: torch's own reparameterized sampler, same distribution
    peer = Normal(torch.tensor(mu0, dtype=torch.float64), torch.tensor(std0, dtype=torch.float64)).rsample((n,))
    assert scipy.stats.ks_2samp(z, peer.numpy()).pvalue > 1e-3
    assert abs(z.std() - peer.std().item()) < 10 * std0 / np.sqrt(2 * n)


# --- the reference itself --------------------------------------------------------------------------

def test_reference_gradcheck_float64():
    g = torch.Generator().manual_seed(10)
    t = [torch.randn(3, 4, dtype=torch.float64, generator=g).requires_grad_() for _ in range(4)]
    assert torch.autograd.gradcheck(ref.reparameterize, (t[0], t[1], t[2]))
    for red in REDUCTIONS:
        assert torch.autograd.gradcheck(lambda *a: ref.reduce(ref.gaussian_kl(*a), red), tuple(t))
        assert torch.autograd.gradcheck(lambda *a: ref.reduce(ref.gaussian_kl(*a), red), (t[0], t[1]))
    shared = [torch.randn(4, dtype=torch.float64, generator=g).requires_grad_() for _ in range(2)]
    assert torch.autograd.gradcheck(lambda *a: ref.gaussian_kl(*a).sum(), (t[0], t[1], *shared))
    x = torch.rand(3, 4, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda lo: ref.bernoulli_nll(x, lo), (t[3],))
    assert torch.autograd.gradcheck(lambda m, lv: ref.gaussian_nll(x, m, lv), (t[2], t[3]))


def test_reference_likelihoods_match_torch():
    g = torch.Generator().manual_seed(11)
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64, generator=g)
    logits, mean, logvar = (torch.randn(5, 1, 8, 8, dtype=torch.float64, generator=g) for _ in range(3))
    bce = torch.nn.functional.binary_cross_entropy(torch.sigmoid(logits), x, reduction="none").sum((1, 2, 3))
    torch.testing.assert_close(ref.bernoulli_nll(x, logits), bce)
    nll = -Normal(mean, (0.5 * logvar).exp()).log_prob(x).sum((1, 2, 3))
    torch.testing.assert_close(ref.gaussian_nll(x, mean, logvar), nll)
    elbo = ref.negative_elbo(x, logits, mean[:, 0, 0], logvar[:, 0, 0])
    kl = kl_divergence(Normal(mean[:, 0, 0], (0.5 * logvar[:, 0, 0]).exp()), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(elbo.kl, kl.mean())
    torch.testing.assert_close(elbo.loss, (bce + kl).mean())


# --- empty tensors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4)], ids=str)
def test_empty_inputs(device, shape):
    mu = torch.zeros(shape, device=device, requires_grad=True)
    logvar = torch.zeros(shape, device=device, requires_grad=True)
    z = fastgen.reparameterize(mu, logvar, seed=1, backend="triton")
    z2, kl = fastgen.reparameterize_with_kl(mu, logvar, seed=1, backend="triton")
    assert z.shape == z2.shape == shape and kl.shape == shape[:1]
    assert torch.equal(kl, torch.zeros(shape[:1], device=device))
    for red in REDUCTIONS:
        out = fastgen.gaussian_kl(mu, logvar, reduction=red, backend="triton")
        expected = ref.reduce(ref.gaussian_kl(mu.detach(), logvar.detach()), red)
        assert out.shape == expected.shape
        assert torch.equal(out.isnan(), expected.isnan()) and torch.equal(out.nan_to_num(), expected.nan_to_num())
    (z.sum() + z2.sum() + kl.sum()).backward()
    assert mu.grad.shape == shape


@pytest.mark.parametrize("prior_shape", [(), (1,), "full"], ids=str)
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4)], ids=str)
def test_empty_inputs_with_a_prior(device, shape, prior_shape):
    """A prior broadcast against an empty mu (it used to index the empty expansion: IndexError)."""
    prior_shape = shape if prior_shape == "full" else prior_shape
    mu, logvar = (torch.zeros(shape, device=device, requires_grad=True) for _ in range(2))
    # a prior's gradient over no elements is 0, even where the prior is infinite (the reference's
    # autograd once made it 0 * exp(inf) = NaN)
    mu2, logvar2 = (torch.full(prior_shape, -math.inf, device=device, requires_grad=True) for _ in range(2))
    for red in REDUCTIONS:
        out = fastgen.gaussian_kl(mu, logvar, mu2, logvar2, reduction=red, backend="triton")
        expected = ref.reduce(ref.gaussian_kl(mu, logvar, mu2, logvar2), red)
        assert out.shape == expected.shape and torch.equal(out.nan_to_num(), expected.nan_to_num().detach())
        for result in (out, expected):
            grads = torch.autograd.grad(result.sum(), [mu, logvar, mu2, logvar2])
            assert [g.shape for g in grads] == [shape, shape, prior_shape, prior_shape]
            assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("shape", [(1, 0), (3, 0, 2)], ids=str)
def test_per_sample_kl_of_empty_samples_is_zero(device, shape, offset):
    """Rows of no elements have zero KL. The public offset of empty rows is always counter element 0,
    so the kernel's own entry (the custom op, in element offsets) also runs them with Philox tiles
    starting mid-block (offset % 4 != 0): no chunk is left unwritten (it used to come back NaN)."""
    mu = torch.zeros(shape, device=device)
    z, kl = fastgen.reparameterize_with_kl(mu, mu, seed=1, offset=offset, backend="triton")
    assert z.shape == shape and torch.equal(kl, torch.zeros(shape[0], device=device))
    z, kl = torch.ops.fastgen.reparameterize_with_kl(mu, mu, None, 1, None, 0, offset, "triton")
    assert z.shape == shape and torch.equal(kl, torch.zeros(shape[0], device=device))


# --- bad input -------------------------------------------------------------------------------------

def _ops(mu, logvar, **kw):
    return [lambda: fastgen.reparameterize(mu, logvar, seed=1, **kw),
            lambda: fastgen.gaussian_kl(mu, logvar, **kw),
            lambda: fastgen.reparameterize_with_kl(mu, logvar, seed=1, **kw)]


@pytest.mark.parametrize("case, error, match", [
    ("logvar-shape", ValueError, "logvar must have mu's shape"),
    ("logvar-dtype", TypeError, "logvar must have mu's dtype"),
    ("logvar-device", ValueError, "logvar must be on mu's device"),
    ("int-mu", TypeError, "mu must be a float32"),
    ("int-logvar", TypeError, "logvar must be a float32"),
    ("float64-mu", TypeError, "mu must be a float32"),
    ("list-mu", TypeError, "mu must be a torch.Tensor"),
    ("bad-backend", ValueError, "backend"),
])
def test_bad_inputs_name_the_argument(case, error, match):
    mu, logvar = torch.randn(4, 3), torch.randn(4, 3)
    kw = {}
    if case == "logvar-shape":
        logvar = torch.randn(3, 4)
    elif case == "logvar-dtype":
        logvar = logvar.half()
    elif case == "logvar-device":
        logvar = logvar.to("meta")
    elif case == "int-mu":
        mu = torch.ones(4, 3, dtype=torch.int64)
    elif case == "int-logvar":
        logvar = torch.ones(4, 3, dtype=torch.int32)
    elif case == "float64-mu":
        mu = mu.double()
    elif case == "list-mu":
        mu = [[0.0] * 3] * 4
    else:
        kw = dict(backend="cuda")
    for call in _ops(mu, logvar, **kw):
        with pytest.raises(error, match=match):
            call()


@pytest.mark.parametrize("op", ["reparameterize", "reparameterize_with_kl"])
def test_noise_arguments(op):
    fn = getattr(fastgen, op)
    mu, logvar = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="seed and noise are exclusive"):
        fn(mu, logvar, seed=1, noise=torch.randn(4, 3))
    with pytest.raises(ValueError, match="offset"):
        fn(mu, logvar, noise=torch.randn(4, 3), offset=4)
    with pytest.raises(ValueError, match="noise must have mu's shape"):
        fn(mu, logvar, noise=torch.randn(4, 4))
    with pytest.raises(TypeError, match="noise must have mu's dtype"):
        fn(mu, logvar, noise=torch.randn(4, 3).bfloat16())
    with pytest.raises(TypeError, match="noise must be a float32"):
        fn(mu, logvar, noise=torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="offset"):
        fn(mu, logvar, seed=1, offset=-1)
    largest = ((1 << 63) - 1 - 12) // 3  # in rows of 3: offset * 3 + numel <= INT64_MAX
    fn(mu, logvar, seed=1, offset=largest)
    with pytest.raises(ValueError, match="offset"):
        fn(mu, logvar, seed=1, offset=largest + 1)
    with pytest.raises(TypeError, match="seed"):
        fn(mu, logvar, seed=1.5)
    with pytest.raises(ValueError, match="stream"):
        fn(mu, logvar, seed=1, stream=-1)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(reduction="mean"), ValueError, "reduction must be one of"),
    (dict(reduction=None), ValueError, "reduction must be one of"),
    (dict(mu2=torch.randn(5, 3)), ValueError, "mu2 must broadcast to mu's shape"),
    (dict(logvar2=torch.randn(2, 4, 3)), ValueError, "logvar2 must broadcast to mu's shape"),
    (dict(mu2=torch.randn(4, 1, 3)), ValueError, "mu2 must broadcast to mu's shape"),
    (dict(mu2=torch.randn(3).half()), TypeError, "mu2 must have mu's dtype"),
    (dict(logvar2=torch.ones(3, dtype=torch.int64)), TypeError, "logvar2 must be a float32"),
    (dict(mu2=torch.randn(3, device="meta")), ValueError, "mu2 must be on mu's device"),
])
def test_gaussian_kl_bad_arguments(kwargs, error, match):
    for backend in ("triton", "torch"):
        with pytest.raises(error, match=match):
            fastgen.gaussian_kl(torch.randn(4, 3), torch.randn(4, 3), backend=backend, **kwargs)


def test_batch_reductions_need_a_batch_dimension(device):
    mu = torch.tensor(0.5, device=device)
    for red in ("per_sample", "batchmean"):
        with pytest.raises(ValueError, match="batch dimension"):
            fastgen.gaussian_kl(mu, mu, reduction=red)
    with pytest.raises(ValueError, match="batch dimension"):
        fastgen.reparameterize_with_kl(mu, mu, seed=1)
    assert fastgen.gaussian_kl(mu, mu, reduction="sum", backend="triton").shape == ()

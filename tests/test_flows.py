"""Normalizing flows: the fused affine coupling (forward, reverse, gradients) against the float64
reference, NaN/inf placement, tilings, empty and bad input; the flow model (invertibility, the
log-det against the autograd Jacobian, sampling by offset, checkpoints and resume) and the shipped
checkpoint's bits/dim against the per-pixel categorical baseline."""
import copy
import math
import os
import stat
import sys

import pytest
import torch

import fastgen
from fastgen.ops import flows
from fastgen.models import flows as flow_models
from fastgen.kernels import flows as k_flows
from fastgen.reference import flows as ref
from tests.utils import FLOAT_DTYPES, assert_close, interrupted_at_adam_step, rand_like_shape
from tests.utils import noncontiguous as _noncontiguous

# Odd sizes: one element, one sample of one element, rows that are no multiple of any block, 4-d.
COUPLING_SHAPES = [(1,), (1, 1), (3, 5), (5, 3, 7), (7, 129), (16, 7, 5, 3)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One CPU thread: the machine is shared, and these small tensors gain nothing from more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def noncontiguous(t):
    """tests.utils.noncontiguous, except for one element, where every view is contiguous."""
    return t.clone() if t.numel() == 1 else _noncontiguous(t)


def inputs(shape, dtype, device, *, seed=0):
    """x ~ N(0, 1), log_scale ~ N(0, 1/4), shift ~ N(0, 1): fresh, never zero."""
    g = torch.Generator().manual_seed(seed)
    return (rand_like_shape(shape, dtype, device, generator=g),
            rand_like_shape(shape, dtype, device, scale=0.5, generator=g),
            rand_like_shape(shape, dtype, device, generator=g))


def reference(reverse):
    return ref.affine_coupling_inverse if reverse else ref.affine_coupling


def grads(fn, tensors, grad_outputs):
    """Outputs of fn(*tensors) and the gradients of sum(out * g) w.r.t. every tensor."""
    leaves = [t.detach().requires_grad_(True) for t in tensors]
    outs = fn(*leaves)
    return outs, torch.autograd.grad(outs, leaves, grad_outputs)


def f64(tensors):
    return [t.detach().cpu().double() for t in tensors]


# --- the fused op against the float64 reference ----------------------------------------------------

@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", COUPLING_SHAPES, ids=str)
def test_affine_coupling_matches_reference(device, shape, dtype, reverse):
    x, s, t = inputs(shape, dtype, device)
    g = torch.Generator().manual_seed(1)
    g_y, g_logdet = rand_like_shape(shape, dtype, device, generator=g), rand_like_shape(shape[:1], dtype, device, generator=g)
    outs, gr = grads(lambda *a: fastgen.affine_coupling(*a, reverse=reverse, backend="triton"),
                     [noncontiguous(x), s, noncontiguous(t)], [g_y, g_logdet])
    outs64, gr64 = grads(reference(reverse), f64([x, s, t]), f64([g_y, g_logdet]))
    for actual, expected in zip(outs + gr, outs64 + gr64):
        assert actual.dtype == dtype and actual.shape == expected.shape
        assert_close(actual, expected, dtype=dtype)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN sums
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_nan_and_inf_land_where_the_reference_puts_them(device, dtype, reverse):
    """NaN, +inf and -inf at random positions of x, log_scale and shift: the outputs and the
    gradients hold NaN exactly where the float64 reference's do (compare's equal_nan counts any other
    NaN/inf as a mismatch), and the finite rest agrees."""
    shape = (9, 4, 11)
    x, s, t = inputs(shape, dtype, device, seed=2)
    g = torch.Generator().manual_seed(3)
    for tensor in (x, s, t):
        flat = tensor.view(-1)
        where = torch.randperm(flat.numel(), generator=g)[:12].to(device)
        flat[where] = torch.tensor([float("nan"), float("inf"), -float("inf")] * 4, dtype=dtype, device=device)
    g_y, g_logdet = rand_like_shape(shape, dtype, device, generator=g), rand_like_shape(shape[:1], dtype, device, generator=g)
    outs, gr = grads(lambda *a: fastgen.affine_coupling(*a, reverse=reverse, backend="triton"), [x, s, t],
                     [g_y, g_logdet])
    outs64, gr64 = grads(reference(reverse), f64([x, s, t]), f64([g_y, g_logdet]))
    assert outs[0].isnan().any() and outs[1].isnan().any()  # the test does put NaN in the results
    for actual, expected in zip(outs + gr, outs64 + gr64):
        assert torch.equal(actual.isnan().cpu(), expected.isnan())
        assert_close(actual, expected, dtype=dtype, equal_nan=True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_reverse_undoes_forward(device, dtype):
    x, s, t = inputs((6, 2, 8, 8), dtype, device, seed=4)
    y, logdet = fastgen.affine_coupling(x, s, t, backend="triton")
    x_back, logdet_back = fastgen.affine_coupling(y, s, t, reverse=True, backend="triton")
    rtol = {torch.float32: 1e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    assert_close(x_back, x.double(), rtol=rtol, atol=rtol)
    assert torch.equal(logdet_back, -logdet)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_backends_agree_and_auto_is_the_reference_off_cuda(reverse):
    x, s, t = inputs((5, 3, 7), torch.float32, "cpu", seed=5)
    fused = fastgen.affine_coupling(x, s, t, reverse=reverse, backend="triton")
    for backend in ("torch", "auto"):
        out = fastgen.affine_coupling(x, s, t, reverse=reverse, backend=backend)
        for a, e in zip(fused, out):
            assert_close(a, e.double())
    expected = reference(reverse)(x, s, t)
    auto = fastgen.affine_coupling(x, s, t, reverse=reverse)
    assert all(torch.equal(a, e) for a, e in zip(auto, expected))


@pytest.mark.parametrize("used", ["y", "logdet"])
def test_gradient_through_one_output(device, used):
    x, s, t = inputs((5, 6), torch.float32, device, seed=6)
    leaves = [a.clone().requires_grad_(True) for a in (x, s, t)]
    y, logdet = fastgen.affine_coupling(*leaves, backend="triton")
    (y.sum() if used == "y" else logdet.sum()).backward()
    leaves64 = [a.requires_grad_(True) for a in f64([x, s, t])]
    y64, logdet64 = ref.affine_coupling(*leaves64)
    (y64.sum() if used == "y" else logdet64.sum()).backward()
    for a, e in zip(leaves, leaves64):
        assert_close(a.grad if a.grad is not None else torch.zeros_like(a),
                     e.grad if e.grad is not None else torch.zeros_like(e))


@pytest.mark.parametrize("shape, block", [((7, 129), 16), ((5, 40), 256), ((33, 5), 16), ((3, 1000), 64)], ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_results_do_not_depend_on_the_block(device, monkeypatch, shape, block, reverse):
    """Small blocks split rows into many chunks (partial sums) or pack short rows many to a tile."""
    x, s, t = inputs(shape, torch.float32, device, seed=7)
    g = torch.Generator().manual_seed(8)
    g_y, g_logdet = rand_like_shape(shape, generator=g).to(device), rand_like_shape(shape[:1], generator=g).to(device)

    def run():
        outs, gr = grads(lambda *a: fastgen.affine_coupling(*a, reverse=reverse, backend="triton"), [x, s, t],
                         [g_y, g_logdet])
        return [*outs, *gr]

    expected = run()
    default_tiling = k_flows.tiling
    monkeypatch.setattr(k_flows, "tiling", lambda *a, **kw: default_tiling(*a, **{**kw, "block": block}))
    assert k_flows.tiling(*shape).n_chunks > 1 or k_flows.tiling(*shape).rows > 1
    for a, e in zip(run(), expected):
        assert_close(a, e.double(), rtol=2e-6)


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4), (2, 0, 5)], ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_empty_inputs(device, shape, reverse):
    leaves = [torch.zeros(shape, device=device, requires_grad=True) for _ in range(3)]
    y, logdet = fastgen.affine_coupling(*leaves, reverse=reverse, backend="triton")
    assert y.shape == shape and torch.equal(logdet, torch.zeros(shape[:1], device=device))
    (y.sum() + logdet.sum()).backward()
    assert all(torch.equal(a.grad, torch.zeros(shape, device=device)) for a in leaves)


@pytest.mark.parametrize("case, error, match", [
    ("shape", ValueError, "log_scale must have x's shape"),
    ("broadcast", ValueError, "shift must have x's shape"),
    ("dtype", TypeError, "shift must have x's dtype"),
    ("device", ValueError, "log_scale must be on x's device"),
    ("int-x", TypeError, "x must be a float32"),
    ("float64-x", TypeError, "x must be a float32"),
    ("list-x", TypeError, "x must be a torch.Tensor"),
    ("0-d", ValueError, "x must have a batch dimension"),
    ("reverse", TypeError, "reverse must be a bool"),
    ("backend", ValueError, "backend"),
])
def test_bad_inputs_name_the_argument(case, error, match):
    x, s, t = inputs((4, 3), torch.float32, "cpu")
    kw = {}
    if case == "shape":
        s = s.t()
    elif case == "broadcast":
        t = t[:1]
    elif case == "dtype":
        t = t.half()
    elif case == "device":
        s = s.to("meta")
    elif case == "int-x":
        x = x.long()
    elif case == "float64-x":
        x = x.double()
    elif case == "list-x":
        x = x.tolist()
    elif case == "0-d":
        x, s, t = x[0, 0], s[0, 0], t[0, 0]
    elif case == "reverse":
        kw = dict(reverse=1)
    else:
        kw = dict(backend="cuda")
    for backend in ("triton", "torch"):
        with pytest.raises(error, match=match):
            fastgen.affine_coupling(x, s, t, **{"backend": backend, **kw})


def test_public_name():
    assert fastgen.affine_coupling is flows.affine_coupling


# --- the reference's layers ---------------------------------------------------------------------------

def test_reference_layers_invert_and_their_logdets_match_the_jacobian():
    """Every layer of fastgen/reference/flows.py: reverse(forward(x)) == x, the reverse log-det is
    minus the forward one, and the forward log-det is log|det| of the autograd Jacobian (float64)."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, 4, 2, 2, dtype=torch.float64, generator=g)
    s, t = 0.5 * torch.randn(1, 4, 2, 2, dtype=torch.float64, generator=g), torch.randn(1, 4, 2, 2, dtype=torch.float64)
    p, lower, upper, sign_s, log_s = ref.lu_init(4, g)
    weight = ref.lu_weight(p, lower + 0.1, upper - 0.2, sign_s, log_s + 0.3)
    mixture = [torch.randn(4, 2, 2, 3, dtype=torch.float64, generator=g) for _ in range(3)]
    net = lambda masked: (torch.tanh(masked.roll(1, 1)), masked.roll(2, 3))  # noqa: E731
    layers = {
        "coupling": lambda a, reverse=False: (ref.affine_coupling_inverse if reverse else ref.affine_coupling)(a, s, t),
        "checkerboard": lambda a, reverse=False: ref.masked_affine_coupling(a, ref.checkerboard_mask(2, 2, 1), net,
                                                                              reverse=reverse),
        "channel": lambda a, reverse=False: ref.masked_affine_coupling(a, ref.channel_mask(4), net, reverse=reverse),
        "actnorm": lambda a, reverse=False: ref.actnorm(a, s[0, :, 0, 0], t[0, :, 0, 0], reverse=reverse),
        "conv1x1": lambda a, reverse=False: ref.invertible_conv1x1(a, weight, log_s + 0.3, reverse=reverse),
        "permute": lambda a, reverse=False: ref.permute_channels(a, torch.tensor([2, 0, 3, 1]), reverse=reverse),
        "mixture": lambda a, reverse=False: ref.mixture_logistic_cdf(a, *mixture, reverse=reverse),
        "logit": lambda a, reverse=False: ref.logit_transform(torch.sigmoid(a) if not reverse else a,
                                                              reverse=reverse),
    }
    for name, layer in layers.items():
        y, logdet = layer(x)
        x_back, logdet_back = layer(y, reverse=True)
        expected_x = torch.sigmoid(x) if name == "logit" else x
        torch.testing.assert_close(x_back, expected_x, rtol=1e-9, atol=1e-9, msg=name)
        torch.testing.assert_close(logdet_back, -logdet, msg=name)
        if name == "logit":  # a map of y = sigmoid(x): its own Jacobian in y
            jac = torch.autograd.functional.jacobian(lambda a: ref.logit_transform(a)[0].flatten(), torch.sigmoid(x))
        else:
            jac = torch.autograd.functional.jacobian(lambda a: layer(a)[0].flatten(), x)
        torch.testing.assert_close(logdet[0], torch.linalg.slogdet(jac.reshape(16, 16))[1], msg=name)


def test_reference_squeeze_actnorm_init_and_baseline():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float64).reshape(2, 3, 4, 6)
    assert torch.equal(ref.unsqueeze(ref.squeeze(x)), x)
    assert torch.equal(ref.squeeze(x)[0, :4, 0, 0], torch.tensor([0.0, 1, 6, 7], dtype=torch.float64))
    data = 3 + 2 * torch.randn(64, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    y, _ = ref.actnorm(data, *ref.actnorm_init(data))
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(y.std((0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64), rtol=1e-6, atol=0)  # eps
    levels = torch.tensor([[0, 16], [0, 3], [1, 3]])
    bits = ref.categorical_bits_per_dim(levels, torch.tensor([[0, 3]]))  # P = (2+1)/20, (2+1)/20
    torch.testing.assert_close(bits, torch.tensor([-math.log2(3 / 20)], dtype=torch.float64))
    assert torch.equal(ref.quantize(ref.dequantize(torch.arange(17), torch.rand(17, dtype=torch.float64))),
                       torch.arange(17))


# --- the flow model ----------------------------------------------------------------------------------

def small_flow(**kw):
    """A small Flow with every layer kind, its zero-initialised nets and ActNorms perturbed so that
    each coupling does something."""
    torch.manual_seed(11)
    model = flow_models.Flow(hidden=8, checkerboard_steps=2, glow_steps=(2, 2), mixture_components=3, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def dequantized_digits(n, seed=0, dtype=torch.float32):
    levels = flow_models.digit_levels("test")[:n]
    u = torch.rand(levels.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return ref.dequantize(levels, u).to(dtype)


@pytest.fixture(scope="module")
def shipped():
    return flow_models.pretrained_flow()


@pytest.mark.parametrize("which", ["small", "shipped"])
def test_inverse_of_forward_is_the_identity(which, request):
    model = small_flow() if which == "small" else request.getfixturevalue("shipped")
    y = dequantized_digits(32)
    z, logdet = model(y)
    assert z.shape == (32, 64) and logdet.shape == (32,) and torch.isfinite(z).all() and torch.isfinite(logdet).all()
    assert (model.inverse(z) - y).abs().max().item() < 1e-4


@pytest.mark.parametrize("which", ["small", "shipped"])
def test_logdet_is_the_log_determinant_of_the_jacobian(which, request):
    """float64: the model's log-det equals log|det dz/dy| of the autograd Jacobian, sample by sample."""
    model = copy.deepcopy(small_flow() if which == "small" else request.getfixturevalue("shipped")).double()
    y = dequantized_digits(3, seed=1, dtype=torch.float64)
    _, logdet = model(y)
    for k in range(3):
        jac = torch.autograd.functional.jacobian(lambda a: model(a.reshape(1, 1, 8, 8))[0][0], y[k].flatten(),
                                                 vectorize=True)
        torch.testing.assert_close(logdet[k], torch.linalg.slogdet(jac)[1], rtol=1e-9, atol=1e-8)


def test_fused_flow_matches_the_reference_flow(device):
    """fused=True (the Triton coupling, interpreted on CPU) gives the reference's log_prob and gradients."""
    reference_model = small_flow().to(device)
    fused_model = small_flow(fused=True, backend="triton").to(device)
    y = dequantized_digits(16).to(device)
    log_p = [m.log_prob(y) for m in (reference_model, fused_model)]
    assert_close(log_p[1], log_p[0].double(), rtol=1e-5, atol=1e-4)
    grads = [torch.autograd.grad(lp.sum(), list(m.parameters())) for lp, m in zip(log_p, (reference_model, fused_model))]
    for g_ref, g_fused in zip(*grads):
        assert_close(g_fused, g_ref.double(), rtol=1e-4, atol=1e-4)
    z = fused_model(y)[0]
    assert (fused_model.inverse(z) - y).abs().max().item() < 1e-4


def test_samples_are_counter_based_and_offset_counts_samples(shipped):
    x = shipped.sample(6, seed=3)
    assert x.shape == (6, 1, 8, 8) and torch.equal(x, shipped.sample(6, seed=3))
    assert torch.equal(shipped.sample(2, seed=3, offset=4), x[4:])
    assert torch.equal(x * 16, (x * 16).round()) and x.min() >= 0 and x.max() <= 1  # levels / 16
    y = shipped.sample(6, seed=3, quantize=False)
    assert torch.equal(ref.quantize(y).float() / 16, x)
    z = fastgen.randn((6, 64), seed=3) * 0.5
    torch.testing.assert_close(shipped.sample(6, seed=3, temperature=0.5, quantize=False), shipped.inverse(z))
    with pytest.raises(ValueError, match="temperature"):
        shipped.sample(2, seed=0, temperature=-1.0)


def test_shipped_checkpoint_beats_the_categorical_baseline_by_0_4_bits(shipped):
    """Held-out bits/dim of the discrete test digits (4 dequantizations, seed 0) against independent
    per-pixel categoricals fitted to the train split: at least 0.4 bits/dim better."""
    flow_bits = flow_models.bits_per_dim(shipped, flow_models.digit_levels("test")).mean().item()
    baseline = flow_models.categorical_bits_per_dim("test").mean().item()
    assert flow_bits <= baseline - 0.4, (flow_bits, baseline)
    assert abs(flow_bits - shipped.metadata["test_bits_per_dim"]) < 1e-3


def test_checkpoint_round_trip_is_atomic(tmp_path):
    model = small_flow()
    path = tmp_path / "flow.pt"
    flow_models.save_checkpoint(path, model, note="x")
    loaded = flow_models.load_checkpoint(path)
    y = dequantized_digits(8)
    assert torch.equal(loaded.log_prob(y), model.log_prob(y)) and loaded.metadata == {"note": "x"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flow.pt"]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # as open() would create it
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="fastgen-flow"):
        flow_models.load_checkpoint(tmp_path / "other.pt")


TINY = dict(hidden=4, checkerboard_steps=1, glow_steps=(1, 1), mixture_components=2, dropout=0.1, batch_size=8,
            progress=False)


def test_resume_continues_exactly(tmp_path, monkeypatch):
    """A run stopped after its checkpoint at step 3 and resumed ends with the weights, Adam state and
    RNG of the uninterrupted run, bit for bit."""
    straight = flow_models.train_flow(tmp_path / "straight.pt", steps=6, checkpoint_every=3, **TINY)
    interrupted = tmp_path / "interrupted.pt"
    interrupted_at_adam_step(monkeypatch, 5, lambda: flow_models.train_flow(interrupted, steps=6, checkpoint_every=3,
                                                                             **TINY))
    assert torch.load(interrupted, weights_only=True)["training"]["step"] == 3
    resumed = flow_models.train_flow(interrupted, resume=True, progress=False)
    assert len(resumed["loss"]) == 3 and resumed["loss"] == straight["loss"][3:]
    final = [torch.load(p, weights_only=True) for p in (tmp_path / "straight.pt", interrupted)]
    for a, b in zip(final[0]["state_dict"].values(), final[1]["state_dict"].values()):
        assert torch.equal(a, b)
    assert torch.equal(final[0]["training"]["rng"], final[1]["training"]["rng"])
    assert final[1]["metadata"]["test_bits_per_dim"] == final[0]["metadata"]["test_bits_per_dim"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["interrupted.pt", "straight.pt"]


def test_slim_checkpoint_and_bad_training_arguments(tmp_path):
    out = tmp_path / "slim.pt"
    flow_models.train_flow(out, steps=2, slim=True, **TINY)
    assert "training" not in torch.load(out, weights_only=True)
    with pytest.raises(ValueError, match="no training state"):
        flow_models.train_flow(out, resume=True)
    with pytest.raises(FileNotFoundError, match="resume=True needs"):
        flow_models.train_flow(tmp_path / "missing.pt", resume=True)
    with pytest.raises(IsADirectoryError, match="must be a file path"):  # checked before any training
        flow_models.train_flow(tmp_path, steps=1)
    with pytest.raises(ValueError, match="batch_size"):
        flow_models.train_flow(tmp_path / "flow.pt", steps=1, batch_size=0)


def test_sample_flow_writes_a_png_and_scores_it(tmp_path):
    result = flow_models.sample_flow(tmp_path / "grid.png", n=16, seed=0)
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["samples"].shape == (16, 1, 8, 8) and 0.0 <= result["quality"].confidence <= 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]


class _RunsCode:
    """Pickles as a call of print: a checkpoint holding it would run code if loaded without weights_only."""

    def __reduce__(self):
        return print, ("this flow checkpoint ran code",)


def test_a_truncated_or_malicious_flow_checkpoint_is_a_one_line_error(tmp_path, capsys):
    """load_checkpoint reads through the shared loader: plain tensors only, a ValueError naming the file."""
    from fastgen.cli import main

    good = tmp_path / "flow.pt"
    flow_models.save_checkpoint(good, small_flow())
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[:1000])
    torch.save({"format": flow_models.CHECKPOINT_FORMAT, "code": _RunsCode()}, tmp_path / "code.pt")
    state = torch.load(good, weights_only=True)
    state["state_dict"]["layers.0.logits"] = torch.zeros(3)
    torch.save(state, tmp_path / "misshaped.pt")
    for name, reason in (("truncated.pt", "not a fastgen checkpoint"), ("code.pt", "refused: contains pickled code"),
                         ("misshaped.pt", "its weights do not fit the Flow its config describes")):
        with pytest.raises(ValueError, match=reason) as info:
            flow_models.load_checkpoint(tmp_path / name)
        assert name in str(info.value).splitlines()[0]
        assert main(["sample", "--model", "flow", "--n", "2", "--checkpoint", str(tmp_path / name),
                     "--out", str(tmp_path / "grid.png")]) == 2
        err = capsys.readouterr()
        assert len(err.err.splitlines()) == 1 and reason in err.err and name in err.err, err.err
        assert "ran code" not in err.out and not (tmp_path / "grid.png").exists()


def test_log_prob_outside_the_unit_cube_is_minus_infinity():
    """The density lives on [0, 1)^64: a sample with a value outside gets log p = -inf (never NaN), the
    others keep their values and gradients; a NaN value stays NaN."""
    model = small_flow()
    y = dequantized_digits(6).requires_grad_(True)
    inside = model.log_prob(y).detach()
    bad = y.detach().clone()
    bad[1, 0, 3, 3], bad[2, 0, 0, 0], bad[3, 0, 7, 7], bad[4, 0, 2, 5] = -0.5, 1.0, 40.0, float("nan")
    bad.requires_grad_(True)
    log_p = model.log_prob(bad)
    assert log_p[1] == log_p[2] == log_p[3] == float("-inf") and torch.isnan(log_p[4])
    torch.testing.assert_close(log_p[[0, 5]], inside[[0, 5]])
    log_p[[0, 5]].sum().backward()
    assert torch.isfinite(bad.grad[:4]).all() and (bad.grad[1:4] == 0).all()  # the NaN row's gradient: NaN


def test_sampling_the_flow_without_scikit_learn_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if scikit-learn were not installed
    monkeypatch.setattr(flow_models, "pretrained_flow", lambda **kw: pytest.fail("the work started"))
    with pytest.raises(ImportError, match=r"pip install scikit-learn \(or pip install 'fastgen\[train\]'\)"):
        flow_models.sample_flow(tmp_path / "grid.png", n=4)
    assert not list(tmp_path.iterdir())

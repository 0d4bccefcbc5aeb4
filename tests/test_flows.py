"""Normalizing flows: the fused affine coupling (forward, reverse, gradients) against the float64
reference, NaN/inf placement, tilings, empty and bad input; the reference's layers."""
import math

import pytest
import torch

import fastgen
from fastgen import flows
from fastgen.kernels import flows as k_flows
from fastgen.reference import flows as ref
from tests.utils import FLOAT_DTYPES, assert_close, rand_like_shape
from tests.utils import noncontiguous as _noncontiguous

# Odd sizes: one element, one sample of one element, rows that are no multiple of any block, 4-d.
COUPLING_SHAPES = [(1,), (1, 1), (3, 5), (5, 3, 7), (7, 129), (16, 7, 5, 3)]


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


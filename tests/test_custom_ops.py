"""fastgen's ops as torch custom ops: torch.compile(fullgraph=True) traces each with no graph break,
the op stays in the graph as ``torch.ops.fastgen.<name>``, compiled results and gradients equal the
eager ones, inductor compiles the op's body itself (no call back into the op), and
torch.library.opcheck accepts every registration.

All on the CPU with backend "auto" (the torch path). Compiles are slow, so every function compiles
once per session, with aot_eager (the traced graph, run by eager torch); inductor compiles one.
"""
import functools

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import fastgen
from fastgen.reference import flows as ref_flows
from fastgen.reference import gaussian as ref_gaussian
from fastgen.reference import random as ref_random
from tests.utils import rand_like_shape

SEED = 0xC0FFEE1234567890  # >= 2^63: the ops carry its bits as a negative int64
SHAPE = (3, 5)
FP32 = dict(rtol=1e-6, atol=1e-6)  # compiled vs eager: fp32 rounding (Philox integers are bit-identical)


def _random(shape, seed, scale=1.0):
    return rand_like_shape(shape, scale=scale, generator=torch.Generator().manual_seed(seed))


# mu, logvar (std in ~[0.5, 2]) and a third tensor (a prior mean, a shift): random, never zero
MU, LOGVAR, OTHER = _random(SHAPE, 1), _random(SHAPE, 2, scale=0.5), _random(SHAPE, 3)


def randn():
    return fastgen.randn(SHAPE, seed=SEED, stream=2, offset=1)


def latents():
    return fastgen.latents(*SHAPE, seed=SEED, offset=1, truncation=1.5)


def reparameterize(mu, logvar):
    return fastgen.reparameterize(mu, logvar, seed=SEED, offset=1)


def gaussian_kl(mu, logvar, mu2):
    return fastgen.gaussian_kl(mu, logvar, mu2[0], reduction="batchmean")  # a prior shared over the batch


def reparameterize_with_kl(mu, logvar):
    return fastgen.reparameterize_with_kl(mu, logvar, seed=SEED, offset=2)


def affine_coupling(x, log_scale, shift):
    return fastgen.affine_coupling(x, log_scale, shift, reverse=True)


# op name -> (a function calling it, its tensor arguments)
CASES = {
    "randn": (randn, ()),
    "latents": (latents, ()),
    "reparameterize": (reparameterize, (MU, LOGVAR)),
    "gaussian_kl": (gaussian_kl, (MU, LOGVAR, OTHER)),
    "reparameterize_with_kl": (reparameterize_with_kl, (MU, LOGVAR)),
    "affine_coupling": (affine_coupling, (MU, LOGVAR, OTHER)),
}


@functools.cache
def compiled(name):
    return torch.compile(CASES[name][0], fullgraph=True, backend="aot_eager")


def outputs_and_grads(fn, args):
    """fn's outputs (a tuple) and the gradients of sum(out * g) for fixed random g w.r.t. ``args``
    (fresh leaves that require grad)."""
    leaves = [a.clone().requires_grad_() for a in args]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if not leaves:
        return outs, ()
    upstream = [_random(o.shape, 10 + i) for i, o in enumerate(outs)]
    return tuple(o.detach() for o in outs), torch.autograd.grad(outs, leaves, upstream)


def assert_all_close(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **FP32)


@pytest.mark.parametrize("name", CASES)
def test_traced_whole_with_the_op_in_the_graph(name):
    fn, args = CASES[name]
    explained = torch._dynamo.explain(fn)(*args)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    assert _calls(explained, getattr(torch.ops.fastgen, name))


@pytest.mark.parametrize("name", CASES)
def test_compiled_outputs_and_gradients_equal_eager(name):
    fn, args = CASES[name]
    actual = outputs_and_grads(compiled(name), args)
    expected = outputs_and_grads(fn, args)
    for a, e in zip(actual, expected):
        assert_all_close(a, e)


def randn_unseeded():
    return fastgen.randn(SHAPE)


def reparameterize_unseeded(mu, logvar):
    return fastgen.reparameterize(mu, logvar)


@pytest.mark.parametrize("fn, args", [(randn_unseeded, ()), (reparameterize_unseeded, (MU, LOGVAR))])
def test_compiled_missing_seed_follows_torch_manual_seed(fn, args):
    """Without a seed the compiled graph draws it from torch's generator, as eager does (kept as a
    tensor: nothing is read back to the host, so fullgraph holds)."""
    compiled_fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    draws = []
    for run, seed in ((compiled_fn, 0), (fn, 0), (compiled_fn, 1)):
        torch.manual_seed(seed)
        draws.append(run(*args))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


class _SeenOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_eager_calls_run_the_op_body_and_a_dispatch_mode_sees_the_op(backend):
    """The ops without autograd (randn, latents, q_sample, the steps) run their body directly when only
    eager torch sees the call: the same numbers as the registered op, and under a dispatch mode (here a
    recording one; fake tensors, functionalisation) the call is the op itself."""
    from fastgen.ops import random as random_ops

    direct = fastgen.randn(SHAPE, seed=SEED, stream=2, offset=1, backend=backend)
    through_op = random_ops._randn_op.op(list(SHAPE), random_ops._int64_bits(SEED), None, 2, SHAPE[1],
                                         torch.float32, torch.device("cpu"), backend)
    assert torch.equal(direct, through_op)
    with _SeenOps() as mode:
        seen = fastgen.randn(SHAPE, seed=SEED, stream=2, offset=1, backend=backend)
    assert torch.ops.fastgen.randn.default in mode.seen and torch.equal(seen, direct)


def test_inductor_compiles_the_op_body():
    """With compiled kernels the ops are triton_ops: inductor decomposes the op (counter noise, the
    reparameterization, the KL and their backward) into its own code, with no call back into
    torch.ops.fastgen. Under the Triton interpreter they are opaque custom ops (fastgen/ops/_library.py):
    the generated forward calls the op once (the backward of the torch path is torch ops, decomposed
    either way). The compiled outputs and gradients match eager to fp32 rounding."""
    from fastgen.ops import _library

    compiled_fn = torch.compile(reparameterize_with_kl, fullgraph=True)
    actual, codes = run_and_get_code(outputs_and_grads, compiled_fn, (MU, LOGVAR))
    assert len(codes) == 2  # forward, backward
    calls = ["torch.ops.fastgen" in code for code in codes]
    assert calls == [_library._interpreting(), False]
    for a, e in zip(actual, outputs_and_grads(reparameterize_with_kl, (MU, LOGVAR))):
        assert_all_close(a, e)


REFERENCES = {
    "reparameterize": lambda mu, logvar: ref_gaussian.reparameterize(
        mu, logvar, ref_random.randn(SHAPE, seed=SEED, offset=SHAPE[1])),
    "gaussian_kl": lambda mu, logvar, mu2: ref_gaussian.reduce(ref_gaussian.gaussian_kl(mu, logvar, mu2[0]),
                                                               "batchmean"),
    "reparameterize_with_kl": lambda mu, logvar: ref_gaussian.reparameterize_with_kl(
        mu, logvar, ref_random.randn(SHAPE, seed=SEED, offset=2 * SHAPE[1])),
    "affine_coupling": ref_flows.affine_coupling_inverse,
}


@pytest.mark.parametrize("name", REFERENCES)
def test_torch_path_gradients_are_the_references(name):
    """Eagerly the torch path's outputs and gradients are the reference's under autograd, bit for bit."""
    actual = outputs_and_grads(CASES[name][0], CASES[name][1])
    expected = outputs_and_grads(REFERENCES[name], CASES[name][1])
    for a, e in zip(actual, expected):
        assert all(torch.equal(x, y) for x, y in zip(a, e))


def test_torch_path_input_passed_twice_and_double_backward():
    """One tensor as mu and logvar gets the sum of both places' gradients (once, added in another
    order than the reference's autograd adds them: fp32 rounding), and the gradient is itself
    differentiable, as the reference's is."""
    mu = MU.clone().requires_grad_()
    grads = [torch.autograd.grad(kl(mu, mu).sum(), mu, create_graph=True)[0] for kl in (
        lambda m, lv: fastgen.gaussian_kl(m, lv),
        lambda m, lv: ref_gaussian.reduce(ref_gaussian.gaussian_kl(m, lv), "per_sample"))]
    second = [torch.autograd.grad(g.sum(), mu)[0] for g in grads]
    assert_all_close(grads[:1] + second[:1], grads[1:] + second[1:])


def _leaves(*tensors):
    return [t.clone().requires_grad_() for t in tensors]


CPU = torch.device("cpu")
# Each op with the arguments its public function passes on the torch path (offsets in elements).
OPCHECKS = {
    "randn": [(list(SHAPE), -5, None, 2, 7, torch.float32, CPU, "torch"),
              (list(SHAPE), 0, torch.tensor([SEED - (1 << 64)]), 0, 3, torch.float16, CPU, "torch")],
    "latents": [(3, 5, -5, None, 1, 1.5, torch.float32, CPU, "torch"),
                (3, 5, 0, torch.tensor([7]), 2, None, torch.bfloat16, CPU, "torch")],
    "reparameterize": [(*_leaves(MU, LOGVAR), None, -5, None, 0, 5, "torch"),
                       (*_leaves(MU, LOGVAR, OTHER), 0, None, 0, 0, "torch")],
    "gaussian_kl": [(*_leaves(MU, LOGVAR, OTHER[0], LOGVAR[1]), reduction, "torch")
                    for reduction in ("none", "per_sample", "batchmean")],
    "reparameterize_with_kl": [(*_leaves(MU, LOGVAR), None, 7, torch.tensor([-3]), 1, 10, "torch"),
                               (*_leaves(MU, LOGVAR, OTHER), 0, None, 0, 0, "torch")],
    "affine_coupling": [(*_leaves(MU, LOGVAR, OTHER), reverse, "torch") for reverse in (False, True)]
    + [(*_leaves(MU[0], LOGVAR[0], OTHER[0]), False, "torch")],  # 1-d: log_scale is its own sum
}


@pytest.mark.parametrize("name, args", [(name, args) for name, cases in OPCHECKS.items() for args in cases],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.fastgen, name).default, args)


# --- the Triton path -------------------------------------------------------------------------------
# Under the Triton interpreter (this suite) an op is an opaque custom op whose fake implementation
# skips the launches (fastgen/ops/_library.py): torch.compile keeps one call to the interpreted
# kernel, so the compiled Triton path is checked here against the eager one. On a GPU the same ops are
# triton_ops, whose kernels inductor places in its graph.

SCHEDULE = fastgen.NoiseSchedule()
X, F = _random((2, 3, 4, 4), 4), _random((2, 3, 4, 4), 5)
T = torch.tensor([700, 20])


def _sampler_table():
    from fastgen.step_table import step_table

    scheduler = fastgen.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", thresholding=True)
    scheduler.set_timesteps(6)
    return step_table(scheduler)


TABLE = _sampler_table()
TRITON = dict(backend="triton")
TRITON_CASES = {
    "randn": (lambda: fastgen.randn(SHAPE, seed=SEED, stream=2, offset=1, **TRITON), (), "randn"),
    "latents": (lambda: fastgen.latents(*SHAPE, seed=SEED, offset=1, truncation=1.5, **TRITON), (), "latents"),
    "reparameterize_with_kl": (lambda mu, logvar: fastgen.reparameterize_with_kl(mu, logvar, seed=SEED, **TRITON),
                               (MU, LOGVAR), "reparameterize_with_kl"),
    "gaussian_kl": (lambda mu, logvar: fastgen.gaussian_kl(mu, logvar, **TRITON), (MU, LOGVAR), "gaussian_kl"),
    "affine_coupling": (lambda x, s, b: fastgen.affine_coupling(x, s, b, **TRITON), (MU, LOGVAR, OTHER),
                        "affine_coupling"),
    "q_sample": (lambda x0, t: fastgen.q_sample(x0, t, SCHEDULE, seed=SEED, return_noise=True, **TRITON), (X, T),
                 "q_sample"),
    "ddpm_step": (lambda f, x, t: fastgen.ddpm_step(f, t, x, SCHEDULE, seed=SEED, offset=3, **TRITON), (F, X, T),
                  "diffusion_step"),
    "ddim_step": (lambda f, x: fastgen.ddim_step(torch.cat([f, 0.5 * f]), 500, 480, x, SCHEDULE, eta=0.5, seed=1,
                                                 thresholding=True, guidance_scale=2.0, **TRITON), (F, X),
                  "diffusion_step"),
    "sampler_step": (lambda f, x, p: fastgen.ops.samplers.sampler_step(TABLE, 3, f, x, prev_denoised=p, seed=SEED,
                                                                       offset=2, **TRITON), (F, X, 0.5 * X),
                     "sampler_step"),
}

DIFFERENTIABLE = ("reparameterize_with_kl", "gaussian_kl", "affine_coupling")  # the steps are not


@pytest.mark.parametrize("name", TRITON_CASES)
def test_triton_path_traced_whole_and_compiled_equals_eager(name):
    fn, args, op = TRITON_CASES[name]
    explained = torch._dynamo.explain(fn)(*args)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    assert _calls(explained, getattr(torch.ops.fastgen, op))
    compiled_fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    if name in DIFFERENTIABLE:
        actual, expected = outputs_and_grads(compiled_fn, args), outputs_and_grads(fn, args)
    else:
        actual, expected = (compiled_fn(*args),), (fn(*args),)
    for a, e in zip(actual, expected):
        assert_all_close([t for t in a if t is not None], [t for t in e if t is not None])


def _calls(explained, op) -> bool:
    """Whether a traced graph calls ``op`` (its packet or its default overload)."""
    targets = {node.target for graph in explained.graphs for node in graph.graph.nodes}
    return op in targets or op.default in targets


@pytest.mark.parametrize("class_name, step_kwargs, op", [
    ("EulerAncestralDiscreteScheduler", {"seed": 3}, "sampler_step"),
    ("DPMSolverMultistepScheduler", {}, "sampler_step"),
    ("DDIMScheduler", {"eta": 0.5, "seed": 3}, "diffusion_step"),
])
def test_compiled_scheduler_step_with_the_triton_op(class_name, step_kwargs, op):
    """A drop-in scheduler's step compiled on backend "triton" calls fastgen's custom op (on a GPU
    inductor launches fastgen's kernel from its graph) and gives the eager fused trajectory."""
    import copy

    scheduler = getattr(fastgen, class_name)()
    scheduler.set_timesteps(4)
    twin = copy.deepcopy(scheduler)

    def step(scheduler, f, t, x):
        return scheduler.step(f, t, x, backend="triton", **step_kwargs).prev_sample

    explained_scheduler = copy.deepcopy(scheduler)
    explained_scheduler.scale_model_input(X, scheduler.timesteps[0])
    explained = torch._dynamo.explain(step)(explained_scheduler, F, scheduler.timesteps[0], X)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert _calls(explained, getattr(torch.ops.fastgen, op))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x_compiled = x_eager = X
    for i, t in enumerate(scheduler.timesteps):
        scheduler.scale_model_input(x_compiled, t), twin.scale_model_input(x_eager, t)  # as a pipeline does, eagerly
        f = F * (1 + 0.1 * i)
        x_compiled, x_eager = compiled(scheduler, f, t, x_compiled), step(twin, f, t, x_eager)
        torch.testing.assert_close(x_compiled, x_eager, **FP32)


def _kernel_table_args(t):
    return (X, t, 0, SCHEDULE.kernel_table("cpu"))


TRITON_OPCHECKS = {
    "q_sample": [(*_kernel_table_args(T), -5, 7, None, True), (X, None, 300, SCHEDULE.kernel_table("cpu"), 0, 0, F,
                                                                  False)],
    "diffusion_step": [(F, T, 0, None, None, X, SCHEDULE.kernel_table("cpu"), "ddpm", "epsilon", "fixed_small", True,
                        1.0, False, 0.995, 1.0, 0.0, False, True, 1.0, 0.0, None, True, -5, 4, None, True),
                       (F, None, 500, None, 480, X, SCHEDULE.kernel_table("cpu"), "ddim", "v_prediction", "fixed_small",
                        False, 1.0, True, 0.9, 1.5, 0.5, True, False, 0.99, 0.01, X.flip(0), False, 0, 0, None,
                        False)],
    "sampler_step": [(F, X, 0.5 * X, None, *TABLE.on("cpu")[:2], torch.tensor(3), True, -5, 2, None,
                      *TABLE.clip_settings, 1, False, True),
                     (F, X, None, X.flip(0), *TABLE.on("cpu")[:2], torch.tensor(0), False, 0, 0, None,
                      *TABLE.clip_settings, 1, False, False)],
}


@pytest.mark.parametrize("name, args", [(name, args) for name, cases in TRITON_OPCHECKS.items() for args in cases],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck_triton_path(name, args):
    torch.library.opcheck(getattr(torch.ops.fastgen, name).default, args)

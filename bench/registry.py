"""How an op family declares its benchmark: one ``Op`` per op, registered from ``bench/bench_<family>.py``.

The same declaration drives the pytest-benchmark tests in that file (``pytest_benchmarks``) and the
report runner (``python -m fastgen bench``). See bench/README.md for a worked example.
"""
import dataclasses
import importlib
import math
import os
import pkgutil
import sys
from typing import Callable, Optional, Sequence

import torch

ROLES = ("fastgen", "reference", "compiled", "peer")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass
class Provider:
    """One implementation of an op: ``fn(**inputs)`` returns a tensor or a tuple of tensors.

    role: "fastgen" (the kernel being judged; speedups are over every other provider),
    "reference" (fastgen's eager torch reference), "compiled" (``torch.compile`` of ``fn``, compiled
    lazily, once per case; its compile time is excluded from the timing and reported as the first
    call), "peer" (anything else people compare against: torch's own op, diffusers).
    cpu: whether it runs on CPU tensors: "always", "quick" (only in --quick smoke runs and only under
    the Triton interpreter; for fastgen's Triton kernels, whose interpreted times mean nothing) or "never".
    """
    name: str
    fn: Callable
    role: str = "peer"
    cpu: str = "always"
    note: str = ""
    compile_options: dict = dataclasses.field(default_factory=dict)  # role "compiled": torch.compile kwargs

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Provider name must be a non-empty string, got {self.name!r}")
        if not callable(self.fn):
            raise TypeError(f"Provider {self.name!r}: fn must be callable, got {type(self.fn).__name__}")
        if self.role not in ROLES:
            raise ValueError(f"Provider {self.name!r}: role must be one of {ROLES}, got {self.role!r}")
        if self.cpu not in ("always", "quick", "never"):
            raise ValueError(f"Provider {self.name!r}: cpu must be 'always', 'quick' or 'never', got {self.cpu!r}")

    def runs_on(self, device: torch.device, quick: bool) -> bool:
        if device.type != "cpu" or self.cpu == "always":
            return True
        return self.cpu == "quick" and quick and _interpreting()


def _interpreting() -> bool:
    """Whether Triton kernels can run on CPU tensors here (the interpreter was chosen at import)."""
    from fastgen.backend import triton_available, triton_interpreting

    return triton_available() and triton_interpreting()


def fastgen(fn, name="fastgen", **kw) -> Provider:
    """fastgen's Triton kernel (call the op with backend="triton"); on CPU only in --quick (interpreter),
    unless ``cpu="always"`` says the provider has a CPU path of its own worth timing."""
    kw.setdefault("cpu", "quick")
    return Provider(name, fn, role="fastgen", note=kw.pop("note", "on CPU: Triton interpreter, a smoke test, not a timing"),
                    **kw)


def reference(fn, name="reference", **kw) -> Provider:
    """fastgen's eager torch reference (call the op with backend="torch")."""
    return Provider(name, fn, role="reference", **kw)


def compiled(fn, name="torch.compile(reference)", **kw) -> Provider:
    """``torch.compile`` of ``fn`` (usually the reference): compiled on first call, per case."""
    return Provider(name, fn, role="compiled", **kw)


def peer(name, fn, **kw) -> Provider:
    """Another implementation to compare with: torch's own op, diffusers, ..."""
    return Provider(name, fn, role="peer", **kw)


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in ``obj`` (a tensor, or a dict/list/tuple holding tensors and other values)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def default_bytes_moved(inputs: dict, outputs) -> int:
    """Each tensor input read once + each output written once."""
    return tensor_bytes(inputs) + tensor_bytes(outputs)


def default_bytes_moved_backward(inputs: dict, outputs, grad_inputs: Sequence[str]) -> int:
    """Forward traffic + the backward pass reading grad_outputs and the differentiated inputs once
    more and writing one gradient per differentiated input. Ops whose backward reads more (saved
    activations) or less declare ``bytes_moved_backward`` themselves."""
    differentiated = tensor_bytes([inputs[name] for name in grad_inputs])
    return default_bytes_moved(inputs, outputs) + tensor_bytes(outputs) + 2 * differentiated


def random_tensor(shape, dtype, device, generator=None, *, scale=1.0, shift=0.0) -> torch.Tensor:
    """Fresh normal data (never zeros) of ``shape``: drawn in fp32 on ``device``, rounded to ``dtype``."""
    x = torch.randn(shape, dtype=torch.float32, device=device, generator=generator)
    return (x.mul_(scale).add_(shift)).to(dtype)


@dataclasses.dataclass
class Op:
    """One benchmarked op.

    make_inputs(size, dtype, device, generator) -> dict of keyword arguments for every provider's
    ``fn``: tensors drawn fresh with ``generator`` (see ``random_tensor``; never zeros) and plain
    values. ``size`` is the element count of the op's main tensor; put the shape you build in the
    dict or let ``shape_of`` tell the report what it was.
    sizes: the full sweep (GPU runs); quick_sizes / quick_dtypes: the CPU smoke run.
    bytes_moved(inputs, outputs) -> int: the op's minimal memory traffic; default: tensor inputs
    read once + outputs written once.
    grad_inputs: names of inputs to differentiate; when set, a "fwd+bwd" variant is timed too
    (forward then backward with random grad_outputs), its traffic from bytes_moved_backward.
    """
    name: str
    providers: Sequence[Provider]
    make_inputs: Callable
    sizes: Sequence[int]
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES
    quick_sizes: Sequence[int] = (1 << 10, 1 << 14)
    quick_dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16)
    shape_of: Optional[Callable] = None
    bytes_moved: Callable = default_bytes_moved
    grad_inputs: Sequence[str] = ()
    bytes_moved_backward: Optional[Callable] = None
    family: str = ""
    description: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Op name must be a non-empty string, got {self.name!r}")
        self.providers = list(self.providers)
        if not self.providers or not all(isinstance(p, Provider) for p in self.providers):
            raise TypeError(f"Op {self.name!r}: providers must be a non-empty list of Provider")
        names = [p.name for p in self.providers]
        if len(set(names)) != len(names):
            raise ValueError(f"Op {self.name!r}: provider names must be unique, got {names}")
        if sum(p.role == "fastgen" for p in self.providers) != 1:
            raise ValueError(f"Op {self.name!r}: providers must hold exactly one with role 'fastgen'")
        if not callable(self.make_inputs):
            raise TypeError(f"Op {self.name!r}: make_inputs must be callable")
        for what in ("sizes", "quick_sizes"):
            sizes = list(getattr(self, what))
            if not sizes or not all(isinstance(s, int) and s > 0 for s in sizes):
                raise ValueError(f"Op {self.name!r}: {what} must be a non-empty list of positive ints, got {sizes}")
            setattr(self, what, sizes)
        for what in ("dtypes", "quick_dtypes"):
            dtypes = list(getattr(self, what))
            if not dtypes or not all(isinstance(d, torch.dtype) for d in dtypes):
                raise TypeError(f"Op {self.name!r}: {what} must be a non-empty list of torch.dtype, got {dtypes}")
            setattr(self, what, dtypes)
        self.grad_inputs = tuple(self.grad_inputs)

    @property
    def variants(self):
        return ("fwd", "fwd+bwd") if self.grad_inputs else ("fwd",)

    @property
    def fastgen_provider(self) -> Provider:
        return next(p for p in self.providers if p.role == "fastgen")


OPS = {}


def register(op: Op) -> Op:
    """Add ``op`` to the registry (re-registering a name replaces it: a bench file imported under
    two module names registers once). The family defaults to the file's name after ``bench_``."""
    if not isinstance(op, Op):
        raise TypeError(f"register expects an Op, got {type(op).__name__}")
    if not op.family:
        module = sys._getframe(1).f_globals.get("__name__", "")
        op.family = module.rsplit(".", 1)[-1].removeprefix("bench_")
    OPS[op.name] = op
    return op


def bench_modules():
    """Names of the bench_<family> modules of this package."""
    from fastgen import bench

    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if m.name.startswith("bench_"))


def load_all() -> dict:
    """Import every ``bench_<family>.py`` so its ops register; the registry by op name."""
    for module in bench_modules():
        importlib.import_module(f"fastgen.bench.{module}")
    return OPS


def pytest_benchmarks(op: Op):
    """A parametrized pytest-benchmark test over ``op``'s cases on this machine's device, for the
    bench file to bind as ``test_<op> = pytest_benchmarks(OP)``. On CUDA: the full sweep; on CPU the
    quick sizes, dtypes and providers, without torch.compile (compiling takes minutes on CPU)."""
    import pytest

    from fastgen.bench import harness

    device = harness.default_device()
    quick = device.type == "cpu" or os.environ.get("FASTGEN_BENCH_QUICK", "") not in ("", "0")
    sizes, dtypes = (op.quick_sizes, op.quick_dtypes) if quick else (op.sizes, op.dtypes)
    providers = [p for p in op.providers if p.runs_on(device, quick) and not (quick and p.role == "compiled")]
    params = [pytest.param(variant, provider.name, size, dtype,
                           id=f"{variant}-{provider.name}-{size}-{str(dtype).removeprefix('torch.')}")
              for variant in op.variants for dtype in dtypes for size in sizes for provider in providers]

    @pytest.mark.parametrize("variant,provider_name,size,dtype", params)
    def test(benchmark, variant, provider_name, size, dtype):
        provider = next(p for p in op.providers if p.name == provider_name)
        case = harness.Case(op, variant, size, dtype, device)
        call = case.callable(provider, case.n_sets())
        outputs = call()  # compiles, autotunes; checks the inputs are not all zeros
        assert harness.all_finite(outputs), f"{provider_name} returned non-finite values"
        benchmark.extra_info.update(op=op.name, variant=variant, shape=list(case.shape), dtype=str(dtype),
                                    bytes=case.bytes_moved(outputs), device=str(device))
        benchmark(harness.synchronized(call, device))

    test.__name__ = f"test_{op.name}"
    return test


def batched_shape(size: int, per_sample: tuple, what: str) -> tuple:
    """[B, *per_sample] holding ``size`` elements (B = size / prod(per_sample)); ValueError naming
    ``what`` (e.g. "Gaussian ops", "a latent") when size is no multiple of one sample."""
    sample_size = math.prod(per_sample)
    if size % sample_size:
        raise ValueError(f"sizes of the {what} must be multiples of {sample_size} "
                         f"(a [B, {', '.join(map(str, per_sample))}] batch), got {size}")
    return (size // sample_size, *per_sample)

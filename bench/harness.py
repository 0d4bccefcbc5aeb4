"""Timing and traffic: how one (op, variant, size, dtype) case is built, called and timed.

CUDA: ``triton.testing.do_bench`` (CUDA events around each call, L2 flushed before each call,
warm-up excluded), every per-call time kept; on top of the flush, inputs rotate over several buffer
sets (enough to exceed twice the L2 cache, at most 32), so consecutive calls never reuse the same
addresses. CPU: ``time.perf_counter`` around each call after a warm-up, inputs rotated the same
way, the providers of a case timed in rounds (``time_calls``), so a CPU whose speed drifts slows
them alike. Either way the statistics are the median and the 20th/80th percentiles (Triton's
perf_report and Liger-Kernel report the same three).

Bytes moved: the op's minimal traffic (inputs read once + outputs written once unless the op says
otherwise). GB/s = bytes / median time. The achievable limit is a device-to-device ``copy_`` moving
the same number of bytes (half read, half written), timed the same way in the same run.
"""
import dataclasses
import itertools
import math
import time

import numpy as np
import torch

from fastgen.bench.registry import Op, Provider, random_tensor, tensor_bytes

CPU_CACHE_BYTES = 32 << 20  # rotate CPU inputs over at least this much memory (a large last-level cache)
MAX_SETS = 32


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronized(call, device: torch.device):
    """``call`` followed by a device synchronization, for wall-clock timers such as pytest-benchmark."""
    if device.type != "cuda":
        return call

    def run():
        out = call()
        torch.cuda.synchronize(device)
        return out
    return run


def _tensors(outputs) -> list:
    """A provider's outputs (a tensor or a tuple holding tensors) as a list of tensors."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    return [t for t in outputs if isinstance(t, torch.Tensor)]


def all_finite(outputs) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _tensors(outputs) if t.is_floating_point())


def rotation_sets(set_bytes: int, device: torch.device) -> int:
    """How many input sets to rotate over so that together they exceed twice the cache (2 to MAX_SETS;
    1 when the op reads no tensor)."""
    if set_bytes <= 0:
        return 1  # nothing to rotate: the op reads no tensors
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        cache = getattr(props, "L2_cache_size", 0) or (64 << 20)
        free, _ = torch.cuda.mem_get_info(device)
        cap = max(1, min(MAX_SETS, free // 4 // set_bytes))
    else:
        cache, cap = CPU_CACHE_BYTES, 8
    return max(2, min(cap, math.ceil(2 * cache / set_bytes)))


@dataclasses.dataclass
class Timing:
    """Per-call times in milliseconds (warm-up excluded) and the first call's time (compilation,
    autotuning and allocation included)."""
    times_ms: list
    first_call_ms: float
    method: str
    input_sets: int

    def quantile(self, q: float) -> float:
        return float(np.quantile(np.asarray(self.times_ms, dtype=np.float64), q))

    def summary(self) -> dict:
        t = np.asarray(self.times_ms, dtype=np.float64)
        return {"median_ms": float(np.median(t)), "p20_ms": self.quantile(0.2), "p80_ms": self.quantile(0.8),
                "min_ms": float(t.min()), "mean_ms": float(t.mean()), "std_ms": float(t.std()),
                "reps": int(t.size), "first_call_ms": self.first_call_ms, "method": self.method,
                "input_sets": self.input_sets}


@dataclasses.dataclass
class TimerConfig:
    """CUDA: do_bench's warm-up and repetition budgets (ms). CPU: warm-up seconds, minimum reps and
    the minimum total measured time per case. max_input_sets caps the rotation (``rotation_sets``):
    the quick smoke run rotates over 2 sets, since every set is called once more before timing and
    an interpreted kernel call costs tens of milliseconds."""
    cuda_warmup_ms: int = 25
    cuda_rep_ms: int = 100
    cpu_warmup_s: float = 0.05
    cpu_min_reps: int = 10
    cpu_min_time_s: float = 0.25
    cpu_max_reps: int = 10_000
    max_input_sets: int = MAX_SETS

    @classmethod
    def quick(cls):
        return cls(cuda_warmup_ms=5, cuda_rep_ms=20, cpu_warmup_s=0.0, cpu_min_reps=3, cpu_min_time_s=0.02,
                   cpu_max_reps=200, max_input_sets=2)


def time_call(call, device: torch.device, config: TimerConfig, *, input_sets: int = 1, grad_to_none=None) -> Timing:
    """Time a zero-argument ``call`` (which rotates its own inputs) on ``device``."""
    return time_calls({None: call}, device, config, input_sets=input_sets, grad_to_none=grad_to_none)[None]


def time_calls(calls: dict, device: torch.device, config: TimerConfig, *, input_sets: int = 1, grad_to_none=None,
               warmup_calls=None, wall_clock=False) -> dict:
    """Time the zero-argument calls of one case ({name: call}, each rotating its own inputs):
    {name: Timing}. Each is called once (timed as its first call), then ``warmup_calls`` more times
    (default: every input set once more, so recompiles on a new value happen here).

    CUDA: then ``do_bench``, one call after another. CPU (or ``wall_clock``: calls long enough that
    do_bench's own estimate and warm-up calls would cost more than the timing; the device is then
    synchronised after each call): then the warm-up seconds and the timed calls in rounds, a round
    running each call back to back for about cpu_min_time_s / cpu_min_reps (at least once, at most
    cpu_max_reps / cpu_min_reps times), until every call has cpu_min_reps rounds behind it and
    cpu_min_time_s or cpu_max_reps in all. A machine whose speed drifts (a shared CPU) then slows
    every call alike instead of whichever ran during the slow spell."""
    warmup_calls = input_sets + 1 if warmup_calls is None else warmup_calls
    first_ms, estimate_ms = {}, {}
    for name, call in calls.items():
        timed = []
        for _ in range(1 + warmup_calls):
            start = time.perf_counter()
            call()
            synchronize(device)
            timed.append((time.perf_counter() - start) * 1e3)
        first_ms[name], estimate_ms[name] = timed[0], min(timed[1:] or timed)
    if device.type == "cuda" and not wall_clock:
        import triton.testing

        return {name: Timing([float(t) for t in triton.testing.do_bench(
                    call, warmup=config.cuda_warmup_ms, rep=config.cuda_rep_ms, grad_to_none=grad_to_none,
                    return_mode="all")], first_ms[name], "triton.testing.do_bench (CUDA events, L2 flushed)",
                    input_sets) for name, call in calls.items()}
    deadline = time.perf_counter() + config.cpu_warmup_s
    while time.perf_counter() < deadline:
        for call in calls.values():
            call()
        synchronize(device)
    round_ms = 1e3 * config.cpu_min_time_s / config.cpu_min_reps
    per_round = {name: min(max(1, math.ceil(round_ms / max(estimate_ms[name], 1e-6))),
                           max(1, config.cpu_max_reps // config.cpu_min_reps)) for name in calls}
    times = {name: [] for name in calls}
    rounds = 0
    while rounds < config.cpu_min_reps or not all(sum(t) >= config.cpu_min_time_s * 1e3 or len(t) >= config.cpu_max_reps
                                                  for t in times.values()):
        for name, call in calls.items():
            for _ in range(per_round[name]):
                t0 = time.perf_counter()
                call()
                synchronize(device)
                times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    method = "time.perf_counter (wall clock)" + (", calls interleaved in rounds" if len(calls) > 1 else "")
    return {name: Timing(times[name], first_ms[name], method, input_sets) for name in calls}


def _check_not_zero(op_name: str, inputs: dict):
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() and not bool(value.any()):
            raise ValueError(f"op {op_name!r}: make_inputs returned an all-zero tensor {name!r}; "
                             "benchmark inputs must be random (zeros flatter some kernels)")


class Case:
    """One (op, variant, size, dtype, device) point: its input sets, the callables that rotate over
    them, and its traffic. Input sets are built once and shared by every provider."""

    def __init__(self, op: Op, variant: str, size: int, dtype: torch.dtype, device, seed: int = 20261124):
        if variant not in op.variants:
            raise ValueError(f"variant must be one of {op.variants} for op {op.name!r}, got {variant!r}")
        self.op, self.variant, self.size, self.dtype = op, variant, size, dtype
        self.device = torch.device(device)
        self.seed = seed
        self._sets = []

    def inputs(self, i: int) -> dict:
        while len(self._sets) <= i:
            j = len(self._sets)
            generator = torch.Generator(device=self.device).manual_seed(self.seed + 7919 * j)
            inputs = self.op.make_inputs(self.size, self.dtype, self.device, generator)
            if not isinstance(inputs, dict):
                raise TypeError(f"op {self.op.name!r}: make_inputs must return a dict, got {type(inputs).__name__}")
            _check_not_zero(self.op.name, inputs)
            if self.variant == "fwd+bwd":
                for name in self.op.grad_inputs:
                    inputs[name].requires_grad_(True)
            self._sets.append(inputs)
        return self._sets[i]

    @property
    def shape(self) -> tuple:
        if self.op.shape_of is not None:
            return tuple(self.op.shape_of(self.size))
        inputs = self.inputs(0)
        if "shape" in inputs:
            return tuple(inputs["shape"])
        tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
        return tuple(max(tensors, key=torch.Tensor.numel).shape) if tensors else (self.size,)

    def set_bytes(self) -> int:
        return tensor_bytes(self.inputs(0))

    def n_sets(self) -> int:
        return rotation_sets(self.set_bytes(), self.device)

    def bytes_moved(self, outputs) -> int:
        inputs = self.inputs(0)
        if self.variant == "fwd":
            return int(self.op.bytes_moved(inputs, outputs))
        if self.op.bytes_moved_backward is not None:
            return int(self.op.bytes_moved_backward(inputs, outputs))
        from fastgen.bench.registry import default_bytes_moved_backward

        return int(default_bytes_moved_backward(inputs, outputs, self.op.grad_inputs))

    def grad_tensors(self):
        return [self.inputs(i)[name] for i in range(len(self._sets)) for name in self.op.grad_inputs]

    def callable(self, provider: Provider, n_sets: int):
        """A zero-argument function running ``provider`` on the next input set (forward, or forward
        then backward with fixed random grad_outputs); returns the forward outputs."""
        fn = provider.fn
        if provider.role == "compiled":
            # Static shapes, compiled afresh for this case: dynamo caches per code object and, past
            # its recompile limit, would silently run the function eagerly.
            torch._dynamo.reset()
            fn = torch.compile(provider.fn, **{"dynamic": False, **provider.compile_options})
        sets = [self.inputs(i) for i in range(n_sets)]
        if self.variant == "fwd":
            calls = itertools.cycle([lambda inputs=inputs: fn(**inputs) for inputs in sets])
            return lambda: next(calls)()
        grads = {}

        def forward_backward(i, inputs):
            for name in self.op.grad_inputs:
                inputs[name].grad = None  # no accumulation: every call writes fresh gradients
            outputs = fn(**inputs)
            tensors = [t for t in _tensors(outputs) if t.requires_grad]
            if i not in grads:
                g = torch.Generator(device=self.device).manual_seed(self.seed + 104729 + i)
                grads[i] = [random_tensor(t.shape, t.dtype, t.device, g) for t in tensors]
            torch.autograd.backward(tensors, grads[i])
            return outputs

        calls = itertools.cycle([lambda i=i, inputs=inputs: forward_backward(i, inputs)
                                 for i, inputs in enumerate(sets)])
        return lambda: next(calls)()


def copy_callable(nbytes: int, device: torch.device, seed: int = 1):
    """(call, bytes, sets): a device-to-device ``copy_`` moving ``nbytes`` (read + write), rotated like
    the op's inputs. Uses fp32 elements, so the traffic is rounded to a multiple of 8 bytes."""
    numel = max(1, nbytes // 8)
    src_bytes = numel * 4
    n_sets = rotation_sets(2 * src_bytes, device)
    g = torch.Generator(device=device).manual_seed(seed)
    pairs = [(random_tensor((numel,), torch.float32, device, g), torch.empty(numel, device=device))
             for _ in range(n_sets)]
    calls = itertools.cycle([lambda src=src, dst=dst: dst.copy_(src) for src, dst in pairs])
    return (lambda: next(calls)()), 2 * src_bytes, n_sets


# --- a family's own timing command line ------------------------------------------------------------------

def add_timing_arguments(parser, *, min_time: float):
    """--device, --min-time and --threads, as every bench_<family>.py command line takes them."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--min-time", type=float, default=min_time, help="seconds of timed calls per provider and case")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a steady timing)")


def timing_device(args) -> torch.device:
    """The device of ``add_timing_arguments``' options, with torch's CPU threads set for a CPU."""
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    return device

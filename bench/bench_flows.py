"""Benchmarks of the normalizing-flow op of kernels/flows.py: ``fastgen.affine_coupling``.

    affine_coupling           y = x exp(s) + t,        logdet[n] = sum s[n]     (RealNVP Eq. 7, 8)
    affine_coupling_reverse   x = (y - t) exp(-s),     logdet[n] = -sum s[n]    (RealNVP Eq. 9)

Each is timed forward ("fwd") and forward + backward ("fwd+bwd": gradients of x, log_scale, shift
from random gradients of both outputs).

Inputs: x, log_scale, shift of shape [B, 4, 16, 16] (a Glow activation after a squeeze; 1024
elements per sample, B = size / 1024), fresh normal data, log_scale scaled by 0.5.

Bytes moved (the op's minimal traffic). E = bytes of one [B, 4, 16, 16] tensor, R = bytes of the
per-sample [B] log-det.

    op                         fwd                       fwd+bwd = fwd + backward
    affine_coupling            4E + R (x, s, t read;     + 5E + R: grad_y, grad_logdet, x, s read, grad_x,
                               y, logdet written)          grad_s written (grad_t is grad_y itself)
    affine_coupling_reverse    4E + R                    + 7E + R: grad_x, grad_logdet, y, s, t read,
                                                           grad_y, grad_s, grad_t written

Providers: fastgen (backend="triton"), the eager reference (backend="torch": autograd through
x * exp(s) + t and a sum), torch.compile of that reference.

A training step of the digits flow (``fastgen.models.flows.Flow``: loss -log p(y) of a batch and its
backward) with ``fused=True`` (couplings through the kernel) against ``fused=False`` (the reference),
timed in interleaved rounds on one device: ``python bench/bench_flows.py --train-step``. On a CPU the
fused model runs the Triton interpreter, so its time there says nothing about the kernel.
"""
import argparse
import os
import sys

import torch

if __name__ == "__main__" and not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as the CLI does: the interpreter runs CPU tensors

import fastgen
from fastgen.bench import (batched_shape, compiled, fastgen as fastgen_provider, harness, pytest_benchmarks,
                           random_tensor, reference, register)
from fastgen.bench.registry import Op, default_bytes_moved, tensor_bytes

PER_SAMPLE = (4, 16, 16)
SAMPLE_SIZE = 4 * 16 * 16
SIZES = [1 << k for k in range(16, 29, 2)]  # 64K .. 256M elements of x
QUICK_SIZES = [1 << 12]  # [4, 4, 16, 16]


def activation_shape(size):
    return batched_shape(size, PER_SAMPLE, "flow ops")


def make_inputs(size, dtype, device, generator):
    """x ~ N(0, 1), log_scale ~ N(0, 1/4), shift ~ N(0, 1)."""
    shape = activation_shape(size)
    return {"x": random_tensor(shape, dtype, device, generator),
            "log_scale": random_tensor(shape, dtype, device, generator, scale=0.5),
            "shift": random_tensor(shape, dtype, device, generator)}


def backward_bytes(reverse):
    """Forward traffic + the gradients of (y, logdet) read, the inputs the backward needs read again
    (x and s; reversing, y, s and t) and one gradient written per input it computes (forward: x, s)."""
    def count(inputs, outputs):
        reread = [inputs["x"], inputs["log_scale"]] + ([inputs["shift"]] if reverse else [])
        return default_bytes_moved(inputs, outputs) + tensor_bytes(outputs) + 2 * tensor_bytes(reread)
    return count


def coupling_with(backend, reverse):
    return lambda x, log_scale, shift: fastgen.affine_coupling(x, log_scale, shift, reverse=reverse, backend=backend)


def flow_op(name, description, reverse):
    return register(Op(
        name=name, description=description,
        providers=[fastgen_provider(coupling_with("triton", reverse)), reference(coupling_with("torch", reverse)),
                   compiled(coupling_with("torch", reverse))],
        make_inputs=make_inputs, sizes=SIZES, dtypes=[torch.float32, torch.bfloat16], quick_sizes=QUICK_SIZES,
        shape_of=activation_shape, grad_inputs=("x", "log_scale", "shift"),
        bytes_moved_backward=backward_bytes(reverse)))


AFFINE_COUPLING = flow_op("affine_coupling", "y = x exp(s) + t and logdet = sum s per sample, one pass", False)
AFFINE_COUPLING_REVERSE = flow_op("affine_coupling_reverse", "x = (y - t) exp(-s) and logdet = -sum s, one pass",
                                  True)

test_affine_coupling = pytest_benchmarks(AFFINE_COUPLING)
test_affine_coupling_reverse = pytest_benchmarks(AFFINE_COUPLING_REVERSE)


# --- a training step of the digits flow, fused against the reference ---------------------------------

def train_step_calls(batch: int, device: torch.device) -> dict:
    """{"fused": step, "reference": step}: each a loss -log p(y) / 64 and its backward on one fixed batch
    of dequantized digits, for a Flow of the shipped configuration (same initial weights)."""
    from fastgen import data
    from fastgen.models import flows

    digits, _ = data.digits("train")
    levels = (digits[:batch] * 16).round()
    y = (levels + torch.rand(levels.shape, generator=torch.Generator().manual_seed(0))) / 17  # dequantized
    y = y.to(device)
    calls = {}
    for name, fused in (("fused", True), ("reference", False)):
        torch.manual_seed(0)
        model = flows.Flow(fused=fused, backend="triton" if fused else "torch").to(device)
        model.log_prob(y)  # actnorm's data-dependent initialisation

        def step(model=model):
            model.zero_grad(set_to_none=True)
            (-model.log_prob(y).mean() / 64).backward()
        calls[name] = step
    return calls


def main(argv=None):
    parser = argparse.ArgumentParser(description="a training step of the digits flow: fused couplings vs reference")
    parser.add_argument("--train-step", action="store_true", help="time the training step (the only mode)")
    parser.add_argument("--batch", type=int, default=64, help="digits per step (default 64)")
    harness.add_timing_arguments(parser, min_time=2.0)
    args = parser.parse_args(argv)
    device = harness.timing_device(args)
    config = harness.TimerConfig(cpu_min_time_s=args.min_time, cpu_min_reps=3)
    timings = {name: t.summary() for name, t in
               harness.time_calls(train_step_calls(args.batch, device), device, config).items()}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (fused: Triton interpreter)"
    print(f"device: {where}; batch {args.batch}")
    print("| provider | median ms | p20-p80 ms | this / reference |")
    print("|---|---|---|---|")
    for name, s in timings.items():
        print(f"| {name} | {s['median_ms']:.2f} | {s['p20_ms']:.2f}-{s['p80_ms']:.2f} | "
              f"{s['median_ms'] / timings['reference']['median_ms']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())

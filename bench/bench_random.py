"""Benchmark of counter-based noise: ``fastgen.randn`` (Philox-4x32-10 + Box-Muller, kernels/random.py).

Traffic: the output written once (n x element size); nothing is read. Providers: fastgen's Triton
kernel, its eager torch reference (the same Philox stream in torch integer ops), ``torch.compile``
of that reference, and ``torch.randn`` (torch's own Philox generator; a different stream, the peer
everyone knows). Run with ``pytest bench/bench_random.py`` or ``python -m fastgen bench --ops randn``.
"""
import torch

import fastgen
from fastgen.bench import compiled, fastgen as fastgen_provider, peer, pytest_benchmarks, reference, register
from fastgen.bench.registry import Op
from fastgen.reference import random as ref_random


SEED = 0x9E3779B97F4A7C15  # above 2^63: the full 64-bit key


def make_inputs(size, dtype, device, generator):
    """A 1-d draw of ``size`` normals. The seed is fixed: a Python int is a constant to torch.compile,
    so a new seed per input set would recompile the compiled provider until it falls back to eager;
    the kernel's speed does not depend on the seed's value."""
    return {"shape": (size,), "seed": SEED, "dtype": dtype, "device": device}


RANDN = register(Op(
    name="randn",
    description="standard normals from the counter-based Philox stream",
    make_inputs=make_inputs,
    sizes=[1 << k for k in range(12, 27, 2)],       # 4K .. 64M elements
    quick_sizes=[1 << 10, 1 << 14],
    providers=[
        fastgen_provider(lambda shape, seed, dtype, device:
                         fastgen.randn(shape, seed=seed, dtype=dtype, device=device, backend="triton")),
        reference(lambda shape, seed, dtype, device:
                  fastgen.randn(shape, seed=seed, dtype=dtype, device=device, backend="torch")),
        compiled(lambda shape, seed, dtype, device:
                 ref_random.randn(shape, seed=seed, dtype=dtype, device=device)),
        peer("torch.randn", lambda shape, seed, dtype, device: torch.randn(shape, dtype=dtype, device=device)),
    ],
))

test_randn = pytest_benchmarks(RANDN)

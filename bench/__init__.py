"""fastgen's benchmarks, installed as ``fastgen.bench``: one ``bench_<family>.py`` per op family
declares its ops (``register(Op(...))``) and binds pytest-benchmark tests from the same declaration;
``python -m fastgen bench`` runs every registered op and writes the report (see bench/README.md)."""
from fastgen.bench.registry import (  # noqa: F401
    OPS, Op, Provider, batched_shape, compiled, fastgen, load_all, peer, pytest_benchmarks, random_tensor, reference, register,
    tensor_bytes)

"""Backend dispatch: the one place that decides whether an op runs its Triton kernel or torch reference.

    backend="auto"   -> FASTGEN_BACKEND if set, else Triton for CUDA tensors and torch elsewhere
    backend="triton" -> the kernel; on CPU tensors only under the Triton interpreter
                        (TRITON_INTERPRET=1 set before triton is imported)
    backend="torch"  -> plain torch ops on any device: the fast fp32 path where an op has one (the
                        diffusion steps: the fused update as whole-tensor ops), else its reference
    backend="reference" -> the float64 reference (fastgen/reference), on any device
The names mean the same in every API (the ops, the schedulers, fastgen.sample).
"""
import functools
import importlib
import os

import torch

BACKENDS = ("auto", "triton", "torch", "reference")
ENV_VAR = "FASTGEN_BACKEND"


@functools.lru_cache(maxsize=None)
def _import_triton() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


@torch.compiler.assume_constant_result  # torch.compile reads it as a constant (an import is not traceable)
def triton_available() -> bool:
    """Whether the triton package can be imported (it ships for Linux only)."""
    return _import_triton()


def triton_interpreting() -> bool:
    """Whether fastgen's kernels run under the Triton interpreter (decided when they were imported)."""
    from fastgen.kernels import interpreted
    from fastgen.kernels.random import _randn_kernel

    return interpreted(_randn_kernel)


def _check_name(value, what: str) -> str:
    if not isinstance(value, str) or value not in BACKENDS:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, BACKENDS))}, got {value!r}")
    return value


def default_backend() -> str:
    """The backend "auto" stands for: FASTGEN_BACKEND when set, else "auto"."""
    return _check_name(os.environ.get(ENV_VAR, "auto"), f"environment variable {ENV_VAR}")


def resolve_backend(backend, device) -> str:
    """"triton", "torch" or "reference" for an op whose tensors live on ``device``; raises if ``backend``
    cannot run there."""
    backend = _check_name(backend, "backend")
    if backend == "auto":
        backend = default_backend()
    device = torch.device(device)
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (Linux); use backend='torch'")
        if device.type != "cuda" and not triton_interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors, got device {device}; to run kernels on the CPU set "
                "TRITON_INTERPRET=1 before triton is imported, or use backend='torch'")
    return backend

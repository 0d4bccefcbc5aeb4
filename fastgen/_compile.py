"""The compiled CPU path: torch.compile (inductor, C++) of fastgen's torch implementations.

On a CPU, fastgen's step is a few whole-tensor ops and its counter noise a few dozen integer ops per
element (Philox-4x32-10); run eagerly, each op is a pass over memory. Compiled by inductor, the step
and its noise become one fused loop: the Philox integers stay bit-identical (int64 arithmetic
wrapping mod 2^64, as in eager torch and the kernels), the normals agree to fp32 rounding.

    step = compiled(affine_step, key=("euler", shape, dtype))    # one compiled function per key

Each key gets its own copy of the function's code, so its graphs are cached apart from other keys'
(torch.compile caches a bounded number of graphs per code object): a function is compiled once per
sampler, dtype and shape, and inductor's on-disk cache keeps the generated code across processes.
``available()`` says whether the path can run: a C++ compiler is needed (else eager torch runs, with
a one-line notice), and FASTGEN_COMPILE=0 turns it off.
"""
import functools
import os
import shutil
import types
import warnings

ENV_VAR = "FASTGEN_COMPILE"


@functools.lru_cache(maxsize=None)
def _compiler() -> str:
    """The C++ compiler inductor would use, or "" when none is on the PATH."""
    candidates = [os.environ.get("CXX"), "g++", "c++", "clang++"]
    return next((found for found in map(lambda c: c and shutil.which(c), candidates) if found), "")


def available() -> bool:
    """Whether the CPU loop runs compiled: FASTGEN_COMPILE is not "0" and a C++ compiler exists."""
    if os.environ.get(ENV_VAR, "1") == "0":
        return False
    if not _compiler():
        _notice_once()
        return False
    return True


@functools.lru_cache(maxsize=None)
def _notice_once():
    warnings.warn("fastgen: no C++ compiler found (set CXX or install g++); the CPU loop runs eager torch ops, "
                  "slower than the compiled path", RuntimeWarning, stacklevel=3)


_COMPILED = {}


def runs_compiled(backend_arg, backend: str, device) -> bool:
    """Whether an op or loop asked for with ``backend_arg`` (resolved to ``backend``) runs compiled
    here: "auto" (FASTGEN_BACKEND unset) resolved to the torch path on a CPU, where ``available()``,
    and not inside code torch.compile is already tracing (that is compiled whole)."""
    import torch

    from fastgen.backend import default_backend

    return (backend_arg == "auto" and default_backend() == "auto" and backend == "torch"
            and torch.device(device).type == "cpu" and not torch.compiler.is_compiling() and available())


def compiled(fn, key, *, dynamic=False):
    """torch.compile(fn, fullgraph=True, dynamic=dynamic) on a private copy of fn's code for ``key``."""
    cache_key = (fn, key, dynamic)
    if cache_key not in _COMPILED:
        import torch

        code = fn.__code__.replace()  # a new code object: its own graph cache
        copy = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        copy.__kwdefaults__ = fn.__kwdefaults__
        _COMPILED[cache_key] = torch.compile(copy, fullgraph=True, dynamic=dynamic)
    return _COMPILED[cache_key]

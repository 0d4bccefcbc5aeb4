"""Triton kernels of fastgen, installed as the subpackage ``fastgen.kernels``.

Only ``@triton.jit`` functions and their launchers live here; nothing imports from ``fastgen``.
Launchers take preallocated outputs and trusted arguments: validation happens in ``fastgen.ops``.
Every launcher starts its kernel through ``launch``.
"""
import threading


def interpreted(kernel) -> bool:
    """True when ``kernel`` runs under the Triton interpreter (TRITON_INTERPRET=1 at import time)."""
    return type(kernel).__name__ == "InterpretedFunction"


# The interpreter's cost is per program, not per element: under it, launches use blocks this large.
INTERPRETER_BLOCK = 1 << 16


def launch_block(kernel, block, default: int) -> int:
    """The BLOCK to launch ``kernel`` with: ``block`` when the caller chose one (tests do, to check
    that results never depend on it), else ``default`` (tuned for GPUs) when compiled and a large
    block when interpreted: only the speed depends on BLOCK."""
    if block is not None:
        return block
    return max(default, INTERPRETER_BLOCK) if interpreted(kernel) else default


# The Triton interpreter keeps the running program's state (program ids, grid) in process-wide
# globals, so two launches from different threads corrupt each other ("x >= grid_dim[0]").
_INTERPRETER_LOCK = threading.Lock()


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, the one place a kernel is started; under the interpreter
    one launch at a time (compiled launches need no lock: they only enqueue work on a stream).
    Compiled launches go through ``torch.library.wrap_triton`` unless only eager torch sees them
    (``eager_only``): while torch.compile traces or fake tensors run an op (fastgen's ops are
    ``torch.library.triton_op``s), inductor sees the kernel itself and can place it in its graph (and
    in a CUDA graph); eagerly, the kernel starts at once (wrap_triton's dispatch costs microseconds)."""
    if interpreted(kernel):
        if _fake(args, kwargs):  # an interpreted op's fake run (fastgen/ops/_library.py): shapes only
            return None
        with _INTERPRETER_LOCK:
            return kernel[grid](*args, **kwargs)
    if eager_only((*args, *kwargs.values())):
        return kernel[grid](*args, **kwargs)
    import torch

    return torch.library.wrap_triton(kernel)[grid](*args, **kwargs)


def eager_only(args) -> bool:
    """Whether a call with ``args`` is seen by eager torch alone: not traced by torch.compile, no
    dispatch mode active (fake tensors, functionalisation, a user's mode), every tensor a plain
    ``torch.Tensor`` (no fake or other subclass)."""
    import torch

    return (not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
            and all(type(arg) is torch.Tensor for arg in args if isinstance(arg, torch.Tensor)))


def _fake(args, kwargs) -> bool:
    """Whether a launch's tensors are fake (torch.compile's shape propagation): nothing to run."""
    from torch._subclasses.fake_tensor import is_fake

    return any(is_fake(value) for value in (*args, *kwargs.values()) if type(value).__module__ != "builtins"
               and hasattr(value, "untyped_storage"))

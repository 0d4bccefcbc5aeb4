"""Triton kernels of fastgen, installed as the subpackage ``fastgen.kernels``.

Only ``@triton.jit`` functions and their launchers live here; nothing imports from ``fastgen``.
Launchers take preallocated outputs and trusted arguments: validation happens in ``fastgen.ops``.
"""


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

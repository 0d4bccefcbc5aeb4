"""How fastgen's ops that launch kernels are registered with torch.library: ``kernel_op``.

With compiled kernels an op is a ``torch.library.triton_op``: torch.compile traces into its body, so
inductor sees the kernel itself (launched through ``torch.library.wrap_triton``, kernels/__init__.py)
and places it in its graph and in a CUDA graph. Under the Triton interpreter (a CPU-only machine)
the kernels are Python that reads tensor memory, which a traced body cannot do: there the op is an
opaque ``torch.library.custom_op`` whose fake implementation is the same body on fake tensors (the
launches skip them, kernels/__init__.py), so torch.compile on a CPU keeps the op as one call to the
interpreted kernel and a compiled step can be checked against the eager one there too.
"""
import functools

import torch


@functools.lru_cache(maxsize=None)
def _interpreting() -> bool:
    from fastgen.backend import triton_available, triton_interpreting

    return triton_available() and triton_interpreting()


def kernel_op(name: str, *, mutates_args=()):
    """Registers ``fn`` (type-annotated, as torch.library requires) as the custom op ``name``
    ("fastgen::<op>"); returns the op (call it, or ``torch.ops.fastgen.<op>``)."""
    def register(fn):
        if not _interpreting():
            return torch.library.triton_op(name, mutates_args=mutates_args)(fn)
        op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        op.register_fake(fn)
        return op
    return register

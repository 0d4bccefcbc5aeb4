"""How fastgen's ops that launch kernels are registered with torch.library: ``kernel_op``.

With compiled kernels an op is a ``torch.library.triton_op``: torch.compile traces into its body, so
inductor sees the kernel itself (launched through ``torch.library.wrap_triton``, kernels/__init__.py)
and places it in its graph and in a CUDA graph. Under the Triton interpreter (a CPU-only machine)
the kernels are Python that reads tensor memory, which a traced body cannot do: there the op is an
opaque ``torch.library.custom_op`` whose fake implementation is the same body on fake tensors (the
launches skip them, kernels/__init__.py), so torch.compile on a CPU keeps the op as one call to the
interpreted kernel and a compiled step can be checked against the eager one there too.

An op registered with ``direct=True`` (one with no autograd: the sampling steps and the noise) is
called as its body itself where nothing but eager torch would see the call: not while torch.compile
traces, under no dispatch mode (fake tensors, functionalisation, a user's mode) and on plain tensors
only. The dispatcher's path (the custom op's autograd wrapper, redispatch, torch.compile's disable
wrapper: tens of microseconds a call) is then skipped; what runs is the same body either way.
"""
import functools

import torch

from fastgen.kernels import eager_only


@functools.lru_cache(maxsize=None)
def _interpreting() -> bool:
    from fastgen.backend import triton_available, triton_interpreting

    return triton_available() and triton_interpreting()


def kernel_op(name: str, *, mutates_args=(), direct: bool = False):
    """Registers ``fn`` (type-annotated, as torch.library requires) as the custom op ``name``
    ("fastgen::<op>"); returns the op (call it, or ``torch.ops.fastgen.<op>``), or with ``direct`` a
    function that calls ``fn`` itself where only eager torch sees the call and the op elsewhere (module
    docstring; the op is its ``op`` attribute)."""
    def register(fn):
        if not _interpreting():
            op = torch.library.triton_op(name, mutates_args=mutates_args)(fn)
        else:
            op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
            op.register_fake(fn)
        if not direct:
            return op

        @functools.wraps(fn)
        def call(*args):
            if eager_only(args):
                return fn(*args)
            return op(*args)
        call.op = op
        return call
    return register

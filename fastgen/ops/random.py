"""Counter-based noise: ``randn`` (kernels/random.py; fastgen/reference/random.py)."""
import torch

from fastgen import _checks
from fastgen._alloc import empty
from fastgen.backend import resolve_backend
from fastgen.reference import random as ref_random


def randn(shape, *, seed=None, stream=0, offset=0, device=None, dtype=torch.float32, backend="auto"):
    """Standard normals from the counter-based stream: element i (row-major) is counter element
    offset * row + i, row = prod(shape[1:]), a pure function of (seed, stream, counter element),
    identical across backends, devices, block sizes and batch splits.

    Args:
        shape: int or sequence of non-negative ints.
        seed: 64-bit int; None draws one from torch's default generator (torch.manual_seed governs it).
        stream: non-negative int separating independent uses of one seed (e.g. the sampling step).
        offset: non-negative int, counted in samples (rows of dim 0): ``randn(shape, offset=k)`` is
            rows k .. k + shape[0] - 1 of a larger draw ``randn((k + shape[0], *shape[1:]))``. For a
            0-d or 1-d shape a row is one element, so 1-d draws keep offsets per element.
        dtype: torch.float32, torch.float16 or torch.bfloat16 (computed in fp32, rounded once).
        backend: "auto", "triton", "torch" or "reference" (the last two: the reference; see fastgen.backend).
    """
    shape = _checks.shape(shape)
    stream = _checks.nonneg_int(stream, "stream")
    element_offset = _checks.sample_offset(offset, shape)
    dtype = _checks.float_dtype(dtype)
    device = _checks.compute_device(device)
    backend = resolve_backend(backend, device)
    seed = _checks.seed64(seed)
    if backend != "triton":  # "torch" and "reference": the reference is this op's torch path
        return ref_random.randn(shape, seed=seed, stream=stream, offset=element_offset, device=device, dtype=dtype)
    from fastgen.kernels import random as k_random

    out = empty(shape, dtype=dtype, device=device)
    if out.numel():
        k_random.randn(out, seed, stream, element_offset)
    return out

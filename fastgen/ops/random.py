"""Counter-based noise: ``randn`` (kernels/random.py; fastgen/reference/random.py).

Also what every op that draws noise shares: how a seed reaches a custom op, eagerly and under
torch.compile (``seed_operands``).
"""
from typing import Optional

import torch

from fastgen import _checks, _compile
from fastgen._alloc import empty
from fastgen.ops._library import kernel_op
from fastgen.backend import resolve_backend
from fastgen.reference import random as ref_random


def _int64_bits(seed: int) -> int:
    """A 64-bit seed in [0, 2^64) as the int64 with its bits (what an op's ``int`` argument holds)."""
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def _drawn_seed_bits() -> torch.Tensor:
    """A seed from torch's default generator as an int64 tensor of one element: the draw of
    ``_checks.seed64(None)`` (lo, hi = two 32-bit words; seed = hi 2^32 + lo, wrapped to int64),
    without reading it back to the host."""
    lo, hi = torch.randint(0, 1 << 32, (2,), dtype=torch.int64)
    return ((hi << 32) | lo).reshape(1)


def seed_operands(seed, backend: str):
    """(seed, seed_bits): how ``seed`` reaches an op's custom op, after every other check.

    An int seed (or None, drawn by ``_checks.seed64``) becomes ``seed`` (its 64 bits as an int64),
    ``seed_bits`` None. While torch.compile traces a torch-path op, None is drawn as the tensor
    ``seed_bits`` instead (the same draw from torch's generator, kept in a tensor), so the graph
    never reads it back to the host. Inductor draws random ints with its own generator: seeded by
    torch.manual_seed too, but another seed than eager draws (unless
    torch._inductor.config.fallback_random). The Triton kernels take the seed as a scalar argument:
    there a missing seed is drawn on the host, which under torch.compile is a graph break."""
    if seed is None and backend != "triton" and torch.compiler.is_compiling():
        return 0, _drawn_seed_bits()
    return _int64_bits(_checks.seed64(seed)), None


def seed_of(seed: int, seed_bits: Optional[torch.Tensor]):
    """The seed the torch path draws with: ``seed_bits`` when given, else the int ``seed``."""
    return seed if seed_bits is None else seed_bits


@kernel_op("fastgen::randn", direct=True)
def _randn_op(shape: list[int], seed: int, seed_bits: Optional[torch.Tensor], stream: int, offset: int,
              dtype: torch.dtype, device: torch.device, backend: str) -> torch.Tensor:
    """Normals of counter elements offset .. offset + numel - 1 (``offset`` in elements) in ``shape``.
    ``seed``: the 64-bit seed's bits as an int64, or ``seed_bits`` (torch path only) holding them."""
    if backend != "triton":  # "torch" and "reference": the reference is this op's torch path
        return ref_random.randn(shape, seed=seed_of(seed, seed_bits), stream=stream, offset=offset, device=device,
                                dtype=dtype)
    from fastgen.kernels import random as k_random

    out = empty(shape, dtype=dtype, device=device)
    if out.numel():
        k_random.randn(out, seed, stream, offset)
    return out


def randn(shape, *, seed=None, stream=0, offset=0, device=None, dtype=torch.float32, backend="auto"):
    """Standard normals from the counter-based stream: element i (row-major) is counter element
    offset * row + i, row = prod(shape[1:]), a pure function of (seed, stream, counter element),
    identical across backends, devices, block sizes and batch splits.

    The custom op ``torch.ops.fastgen.randn``: torch.compile traces it without a graph break and
    inductor fuses the torch path (Philox + Box-Muller) into one loop. On a CPU with backend "auto",
    a draw of at least COMPILED_NUMEL normals runs that fused loop compiled (fastgen._compile: once
    per dtype and process, seconds; FASTGEN_COMPILE=0 keeps it eager). Under torch.compile a missing
    seed on the Triton path is drawn on the host (a graph break): pass an int seed there.

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
    backend_arg, backend = backend, resolve_backend(backend, device)
    seed, seed_bits = seed_operands(seed, backend)
    if shape.numel() >= COMPILED_NUMEL and _compile.runs_compiled(backend_arg, backend, device):
        seed_bits = torch.tensor(seed, dtype=torch.int64) if seed_bits is None else seed_bits
        return _compile.compiled(_torch_randn, dtype, dynamic=True)(list(shape), seed_bits, stream, element_offset,
                                                                    dtype)
    return _randn_op(list(shape), seed, seed_bits, stream, element_offset, dtype, device, backend)


COMPILED_NUMEL = 1 << 20  # a draw this large runs compiled on a CPU ("auto"; below, eager: the compile costs seconds)


def compiled_normals(shape, seed: int, stream: int, offset: int) -> torch.Tensor:
    """fp32 counter normals of ``shape`` (``randn``'s stream; ``offset`` in elements) drawn by the compiled
    Philox loop (fastgen._compile): one graph per shape, the seed and the stream tensor inputs, so every
    step of a run reuses it. What a CPU step drawing ``seed=`` noise uses where ``runs_compiled`` holds."""
    draw = _compile.compiled(_torch_randn, ("draw", tuple(shape)))
    return draw(list(shape), torch.tensor(_int64_bits(seed)), torch.tensor([stream]), offset, torch.float32)


def _torch_randn(shape, seed_bits, stream, offset: int, dtype):
    """The torch path of ``randn`` on a CPU, what fastgen._compile compiles (once per dtype, any shape;
    ``stream`` an int or an int64 tensor of one element):
    Philox-4x32-10 and Box-Muller fused by inductor into one loop, the integers bit-identical and the
    normals computed in fp32, as the kernel computes them."""
    numel = 1
    for size in shape:
        numel *= size
    z = ref_random.normals(numel, seed=seed_bits, stream=stream, offset=offset, dtype=torch.float32)
    return z.to(dtype).reshape(shape)

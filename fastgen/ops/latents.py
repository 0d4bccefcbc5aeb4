"""GAN latents, plain or truncated: ``latents`` (kernels/latents.py; fastgen/reference/latents.py)."""
import math
import numbers
from typing import Optional

import torch

from fastgen import _checks
from fastgen._alloc import empty
from fastgen.ops._library import kernel_op
from fastgen.backend import resolve_backend
from fastgen.ops.random import seed_of, seed_operands
from fastgen.reference import latents as ref_latents


def _truncation(psi):
    """None, or the truncation threshold as a finite positive float."""
    if psi is None:
        return None
    if isinstance(psi, bool) or not isinstance(psi, numbers.Real):
        raise TypeError(f"truncation must be None or a real number, got {type(psi).__name__} {psi!r}")
    psi = float(psi)
    if not math.isfinite(psi) or psi <= 0.0:
        raise ValueError(f"truncation must be a finite number > 0 (the threshold psi of |z| <= psi), got {psi}")
    return psi


@kernel_op("fastgen::latents", direct=True)
def _latents_op(n: int, dim: int, seed: int, seed_bits: Optional[torch.Tensor], offset: int,
                truncation: Optional[float], dtype: torch.dtype, device: torch.device, backend: str) -> torch.Tensor:
    """[n, dim] latents from sample ``offset`` on (in samples), truncated to [-psi, psi] when
    ``truncation`` is psi; ``seed``/``seed_bits`` as in ``torch.ops.fastgen.randn``."""
    if backend != "triton":  # "torch" and "reference": the reference is this op's torch path
        return ref_latents.latents(n, dim, seed=seed_of(seed, seed_bits), offset=offset, truncation=truncation,
                                   dtype=dtype, device=device)
    from fastgen.kernels import latents as k_latents, random as k_random

    out = empty((n, dim), dtype=dtype, device=device)
    element_offset = offset * dim
    if out.numel() == 0:
        return out
    if truncation is None:
        return k_random.randn(out, seed, 0, element_offset)
    erf_psi, erfc_psi = math.erf(truncation / math.sqrt(2.0)), math.erfc(truncation / math.sqrt(2.0))
    bound = ref_latents.largest_at_most(truncation, dtype)
    return k_latents.truncated_latents(out, seed, ref_latents.TRUNCATED_STREAM, element_offset, erf_psi, erfc_psi,
                                       bound)


def latents(n, dim, *, seed=None, offset=0, truncation=None, dtype=torch.float32, device=None, backend="auto"):
    """An [n, dim] batch of GAN latents from the counter-based noise; sample k is identical however
    the batch is split (element (r, c) is counter element (offset + r) * dim + c).

    Without truncation this is ``randn((n, dim), seed=seed, offset=offset)`` exactly. With
    ``truncation=psi`` (BigGAN's truncation trick) every coordinate is a standard normal truncated to
    [-psi, psi], sampled exactly by the inverse CDF (never by clamping); see fastgen/reference/latents.py.

    Args:
        n: number of samples; dim: latent size (non-negative ints).
        seed: 64-bit int; None draws one from torch's default generator.
        offset: non-negative int, counted in samples: ``offset=k`` gives samples k .. k + n - 1.
        truncation: None, or psi > 0 (finite).
        dtype: torch.float32, torch.float16 or torch.bfloat16 (computed in fp32, rounded once).
        backend: "auto", "triton", "torch" or "reference" (the last two: the reference; see fastgen.backend).
    """
    n = _checks.nonneg_int(n, "n")
    dim = _checks.nonneg_int(dim, "dim")
    if n * dim > _checks.INT64_MAX:
        raise ValueError(f"n * dim must be at most {_checks.INT64_MAX}, got {n} * {dim}")
    _checks.sample_offset(offset, (n, dim))
    offset = _checks.as_int(offset, "offset")  # in samples, as the op takes it
    psi = _truncation(truncation)
    dtype = _checks.float_dtype(dtype)
    device = _checks.compute_device(device)
    backend = resolve_backend(backend, device)
    seed, seed_bits = seed_operands(seed, backend)
    return _latents_op(n, dim, seed, seed_bits, offset, psi, dtype, device, backend)

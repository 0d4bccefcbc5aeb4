"""GAN latents: the Triton kernel against the torch reference (same Philox words, to float rounding),
the truncated distribution against scipy's truncnorm, the bound, shard/offset invariance, errors."""
import math

import numpy as np
import pytest
import scipy.stats
import torch
import triton
import triton.language as tl

import fastgen
from fastgen.kernels import launch_block, latents as k_latents
from fastgen.reference import latents as ref
from fastgen.reference import random as ref_random
from tests.utils import FLOAT_DTYPES, assert_close, poison

BIG_SEED = 0xFEDCBA9876543210
SIZES = [(1, 1), (3, 5), (37, 19), (129, 7)]  # (n, dim): odd sizes, rows not a multiple of 4 elements


def kernel_latents(n, dim, device, **kwargs):
    return fastgen.latents(n, dim, device=device, backend="triton", **kwargs)


# --- kernel vs reference -------------------------------------------------------------------------

@pytest.mark.parametrize("truncation", [None, 0.5, 2.0, 7.5])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("n, dim", SIZES)
def test_kernel_matches_reference(device, n, dim, dtype, truncation):
    offset = n + 2  # offset * dim is rarely a multiple of 4: the tiles start mid Philox block
    z = kernel_latents(n, dim, device, seed=BIG_SEED, offset=offset, truncation=truncation, dtype=dtype)
    assert z.shape == (n, dim) and z.dtype == dtype and z.device.type == torch.device(device).type
    expected = ref.latents(n, dim, seed=BIG_SEED, offset=offset, truncation=truncation, dtype=torch.float64)
    assert_close(z, expected)


@pytest.mark.parametrize("psi", [1e-3, 0.3, 1.0, 3.0, 6.0, 40.0])
def test_kernel_matches_reference_over_psi(device, psi):
    """Small psi (the central branch of erfinv) to large psi (the tail branch, y close to 1)."""
    z = kernel_latents(64, 128, device, seed=3, truncation=psi)
    assert_close(z, ref.latents(64, 128, seed=3, truncation=psi, dtype=torch.float64))


@pytest.mark.parametrize("truncation", [None, 1.5])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_torch_backend_is_the_reference(dtype, truncation):
    z = fastgen.latents(9, 13, seed=5, offset=2, truncation=truncation, dtype=dtype, backend="torch")
    assert z.dtype == dtype and z.shape == (9, 13)
    assert torch.equal(z, ref.latents(9, 13, seed=5, offset=2, truncation=truncation, dtype=dtype))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_untruncated_latents_are_randn(device, backend):
    """latents(n, dim, seed=s, offset=k) is randn((n, dim), seed=s, offset=k), bit for bit: both count
    samples (rows), from counter element k * dim."""
    z = fastgen.latents(11, 17, seed=BIG_SEED, offset=5, device=device, backend=backend)
    assert torch.equal(z, fastgen.randn((11, 17), seed=BIG_SEED, offset=5, device=device, backend=backend))


def test_reference_words_are_the_philox_stream():
    """Word g of the reference is word g % 4 of Philox block g // 4."""
    x = ref.philox_words(10, seed=7, stream=3, offset=6)
    blocks = torch.stack(ref_random.philox_blocks(7, 3, torch.arange(1, 5)), dim=1).reshape(-1)
    assert torch.equal(x, blocks[2:12])


@pytest.mark.parametrize("block", [16, 256, 4096])
def test_block_size_invariance(device, block):
    expected = kernel_latents(33, 21, device, seed=4, offset=3, truncation=1.0)
    out = poison(torch.empty(33, 21, device=device))
    k_latents.truncated_latents(out, 4, ref.TRUNCATED_STREAM, 3 * 21, math.erf(1 / math.sqrt(2)),
                                math.erfc(1 / math.sqrt(2)), 1.0, block=block)
    assert torch.equal(out, expected)


# --- invariances ---------------------------------------------------------------------------------

@pytest.mark.parametrize("truncation", [None, 0.7])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_shard_with_offset_reproduces_samples(device, k, truncation):
    whole = kernel_latents(8, 37, device, seed=11, truncation=truncation)
    shard = kernel_latents(8 - k, 37, device, seed=11, offset=k, truncation=truncation)
    assert torch.equal(shard, whole[k:])


@pytest.mark.parametrize("truncation", [None, 0.7])
def test_batch_invariance(device, truncation):
    small = kernel_latents(4, 33, device, seed=7, truncation=truncation)
    large = kernel_latents(64, 33, device, seed=7, truncation=truncation)
    assert torch.equal(small, large[:4])


def test_smaller_psi_pulls_each_sample_inward(device):
    """Inverse-CDF sampling: for one seed, |z| grows monotonically with psi, sign unchanged."""
    zs = [kernel_latents(16, 64, device, seed=2, truncation=psi).double() for psi in (0.25, 0.5, 1.0, 2.0)]
    for inner, outer in zip(zs, zs[1:]):
        assert torch.equal(torch.sign(inner), torch.sign(outer))
        assert (inner.abs() <= outer.abs() * (1 + 1e-6)).all()


# --- distribution --------------------------------------------------------------------------------

@pytest.mark.parametrize("psi", [0.5, 1.0, 2.0])
def test_truncated_distribution_is_truncnorm(device, psi):
    z = kernel_latents(256, 128, device, seed=BIG_SEED, truncation=psi).double().cpu().numpy().ravel()
    assert np.isfinite(z).all()
    assert np.abs(z).max() <= psi
    dist = scipy.stats.truncnorm(-psi, psi)
    assert scipy.stats.kstest(z, dist.cdf).pvalue > 1e-3  # fixed seed: deterministic, not flaky
    n = len(z)
    assert abs(z.mean()) < 5 * dist.std() / np.sqrt(n)
    assert abs(z.var() / dist.var() - 1) < 5 * np.sqrt(2 / n) * 2
    assert abs((z > 0).mean() - 0.5) < 5 * 0.5 / np.sqrt(n)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("psi", [0.1, 0.7, 1.3])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_value_outside_psi(device, backend, dtype, psi):
    """Even after rounding to the output dtype (0.7 and 1.3 round up in fp16/bf16/fp32)."""
    z = fastgen.latents(512, 64, seed=1, truncation=psi, dtype=dtype, device=device, backend=backend)
    assert z.abs().max().item() <= psi
    assert z.abs().max().item() >= 0.99 * psi  # the tails are reached, not cut off early


# --- arguments -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty(device, backend):
    for n, dim in [(0, 5), (4, 0)]:
        for truncation in (None, 1.0):
            z = fastgen.latents(n, dim, seed=1, truncation=truncation, device=device, backend=backend)
            assert z.shape == (n, dim)


def test_seed_none_follows_torch_manual_seed():
    torch.manual_seed(0)
    a = fastgen.latents(3, 4, truncation=1.0, backend="torch")
    torch.manual_seed(0)
    b = fastgen.latents(3, 4, truncation=1.0, backend="torch")
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), -float("inf")])
def test_bad_truncation_value(bad):
    with pytest.raises(ValueError, match="truncation"):
        fastgen.latents(2, 3, seed=0, truncation=bad)


@pytest.mark.parametrize("bad", [True, "1.0", [1.0], 1j])
def test_bad_truncation_type(bad):
    with pytest.raises(TypeError, match="truncation"):
        fastgen.latents(2, 3, seed=0, truncation=bad)


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(n=-1), ValueError, "n"), (dict(n=2.0), TypeError, "n"), (dict(dim=-3), ValueError, "dim"),
    (dict(dim="4"), TypeError, "dim"), (dict(offset=-1), ValueError, "offset"), (dict(offset=1.5), TypeError, "offset"),
    (dict(offset=1 << 62), ValueError, "offset"), (dict(dtype=torch.int32), ValueError, "dtype"),
    (dict(dtype="float32"), TypeError, "dtype"), (dict(seed=1.5), TypeError, "seed"), (dict(seed=1 << 64), ValueError, "seed"),
    (dict(backend="cuda"), ValueError, "backend"),
])
def test_bad_arguments(kwargs, error, name):
    args = dict(n=2, dim=3, seed=0) | kwargs
    with pytest.raises(error, match=name):
        fastgen.latents(args.pop("n"), args.pop("dim"), **args)


# --- the per-word transform over the whole range of words ------------------------------------------

@triton.jit
def _transform_words_kernel(x_ptr, out_ptr, n, erf_psi, erfc_psi, bound, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n).to(tl.uint32, bitcast=True)
    tl.store(out_ptr + i, k_latents.truncated_normal(x, erf_psi, erfc_psi, bound), mask=i < n)


@pytest.mark.parametrize("psi", [1e-3, 0.5, 1.0, 2.0, 4.0, 9.0, 1e6])
def test_word_transform_over_all_uniforms(device, psi):
    """Every 24-bit uniform w in steps of 255, plus the extremes w = 0 and w = 1 - 2^-24, with both
    signs: the kernel's fp32 inverse CDF against the float64 reference, and |z| <= psi."""
    w24 = torch.cat([torch.arange(0, 1 << 24, 255), torch.tensor([1, (1 << 24) - 2, (1 << 24) - 1])])
    words = torch.cat([w24 << 8, (w24 << 8) | 1 | 0xA4])  # sign bit 0 and 1, other low bits set too
    x = (words - ((words >> 31) << 32)).to(torch.int32).to(device)  # the uint32 bit patterns as int32
    out = poison(torch.empty(len(words), device=device))
    bound = ref.largest_at_most(psi, torch.float32)
    block = launch_block(_transform_words_kernel, None, 1024)
    _transform_words_kernel[(triton.cdiv(len(words), block),)](
        x, out, len(words), math.erf(psi / math.sqrt(2)), math.erfc(psi / math.sqrt(2)), bound, BLOCK=block)
    expected = ref.truncated_normal(words, psi)
    assert_close(out, expected)
    assert out.abs().max().item() <= psi
    assert (torch.sign(out.cpu())[w24.numel() + 1:] <= 0).all() and (out.cpu()[:w24.numel()] >= 0).all()

"""Counter-based noise: the Triton kernel against the torch Philox reference (exactly), against the
normal distribution (statistically), and the invariances the design promises."""
import inspect
import math

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings, strategies as st

import fastgen
from fastgen.kernels import interpreted, random as k_random
from fastgen.reference import random as ref
from tests.utils import FLOAT_DTYPES, ODD_SHAPES, assert_close, compare_exact, poison

BIG_SEED = 0xFEDCBA9876543210  # >= 2^63: the high key word matters


def kernel_randn(shape, device, **kwargs):
    return fastgen.randn(shape, device=device, backend="triton", **kwargs)


def row(shape) -> int:
    """Elements per row (sample) of a draw: fastgen.randn's offset k starts at counter element k * row;
    the reference (and the kernels' launchers) take that element offset."""
    return math.prod(shape[1:])


# --- the Philox words ------------------------------------------------------------------------------

@pytest.mark.parametrize("counter, seed, expected", [
    # Known-answer vectors of Philox4x32-10 from Random123 (kat_vectors): counter words, key, output.
    ((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, 0xFFFFFFFFFFFFFFFF, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0x299F31D0 << 32) | 0xA4093822,
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_reference_philox_known_answers(counter, seed, expected):
    words = ref.philox4x32(*(torch.tensor([c], dtype=torch.int64) for c in counter), seed)
    assert tuple(int(w) for w in words) == expected


@pytest.mark.parametrize("seed, stream, counter", [
    (0, 0, 0), (BIG_SEED, 3, (1 << 32) - 100), (12345, (1 << 40) + 7, (1 << 60) + 5),
])
def test_kernel_philox_words_bit_exact(device, seed, stream, counter):
    out = poison(torch.empty(1001, 4, dtype=torch.int32, device=device))
    k_random.philox_bits(out, seed, stream, counter)
    expected = torch.stack(ref.philox_blocks(seed, stream, torch.arange(counter, counter + 1001)), dim=1)
    result = compare_exact(out.long() & ref.MASK32, expected)
    assert result.ok, result.describe()


# --- the normals: kernel vs reference ------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
def test_randn_kernel_matches_reference(device, shape, dtype):
    # offsets in rows; rows of odd length give element offsets not a multiple of 4, which shift the tiles
    offset, stream = 3 * len(shape) + 1, len(shape) + 2
    z = kernel_randn(shape, device, seed=BIG_SEED, stream=stream, offset=offset, dtype=dtype)
    assert z.shape == shape and z.dtype == dtype and z.device.type == torch.device(device).type
    expected = ref.randn(shape, seed=BIG_SEED, stream=stream, offset=offset * row(shape), dtype=torch.float64)
    assert_close(z, expected)


@pytest.mark.parametrize("offset", [0, 1, 2, 3, 4, 5, (1 << 34) + 3])
def test_randn_kernel_matches_reference_at_offsets(device, offset):
    """Rows of 67: offsets 0..3 start at every lane of a Philox block (element offsets 0, 67, 134, 201)."""
    z = kernel_randn((3, 67), device, seed=99, offset=offset)
    assert_close(z, ref.randn((3, 67), seed=99, offset=offset * 67, dtype=torch.float64))


# Seeds, streams and element offsets in [2^31, 2^32): the Triton interpreter carries such Python ints as
# uint32 data under an int64 type, and a kernel that only casts them with .to(tl.int64) reads -2^31 for
# 2^31. The draws below are [3, 5], so offsets are in rows of 5: counter elements 5 * offset =
# 2^31 + 2, 2^32 - 6 and 2^31 - 3 (the last just below 2^31, with a seed past 2^63).
PAST_INT32 = [(2**31 + 5, 2**31 + 1, 2**31 // 5 + 1), (2**32 - 1, 2**32 - 1, (2**32 - 3) // 5),
              (BIG_SEED, 7, (2**31 - 1) // 5)]


@pytest.mark.parametrize("seed, stream, offset", PAST_INT32)
def test_every_kernel_reads_64_bit_arguments(device, seed, stream, offset):
    """randn, the Gaussian ops, q_sample and latents agree with the torch backend for arguments past 2^31."""
    expected = ref.randn((3, 5), seed=seed, stream=stream, offset=offset * 5, dtype=torch.float64)
    assert_close(kernel_randn((3, 5), device, seed=seed, stream=stream, offset=offset), expected)
    zeros = torch.zeros(3, 5, device=device)  # z = eps with mu = 0, logvar = 0
    z = fastgen.reparameterize(zeros, zeros, seed=seed, stream=stream, offset=offset, backend="triton")
    assert_close(z, expected)
    z, _ = fastgen.reparameterize_with_kl(zeros, zeros, seed=seed, stream=stream, offset=offset, backend="triton")
    assert_close(z, expected)
    schedule = fastgen.NoiseSchedule(num_train_timesteps=10)
    x0 = torch.randn(3, 5, device=device)
    for call in (lambda backend: fastgen.q_sample(x0, 4, schedule, seed=seed, offset=offset, backend=backend),
                 lambda backend: fastgen.latents(3, 5, seed=seed, offset=offset, truncation=0.8, device=device,
                                                 backend=backend)):
        assert_close(call("triton"), call("torch").double())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_torch_backend_is_the_reference(dtype):
    z = fastgen.randn((7, 129), seed=5, stream=1, offset=2, dtype=dtype, backend="torch")
    expected = ref.randn((7, 129), seed=5, stream=1, offset=2 * 129, dtype=torch.float64)
    assert z.dtype == dtype
    assert torch.equal(z, expected.to(dtype))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_shapes(device, backend):
    for shape in [(0,), (3, 0, 5)]:
        z = fastgen.randn(shape, seed=1, device=device, backend=backend)
        assert z.shape == shape


def test_scalar_shape(device):
    """A 0-d draw is one row of one element: its offset counts elements."""
    z = kernel_randn((), device, seed=4, offset=6)
    assert z.shape == () and torch.equal(z.cpu(), ref.randn((), seed=4, offset=6))


# --- invariances -----------------------------------------------------------------------------------

@pytest.mark.parametrize("block", [16, 64, 1024, 4096])
def test_block_size_invariance(device, block):
    expected = kernel_randn((5, 123, 7), device, seed=BIG_SEED, offset=6)
    out = poison(torch.empty(5, 123, 7, device=device))
    k_random.randn(out, BIG_SEED, 0, 6 * 123 * 7, block=block)  # the launcher takes the element offset
    assert torch.equal(out, expected)


def test_batch_invariance(device):
    """Sample k is the same whether drawn in a batch of 4 or of 64."""
    small = kernel_randn((4, 3, 11), device, seed=7)
    large = kernel_randn((64, 3, 11), device, seed=7)
    assert torch.equal(small, large[:4])


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("shape", [(8, 37), (8, 3, 7), (8, 2, 2, 2)], ids=str)
@pytest.mark.parametrize("k", [1, 3, 5])
def test_shard_with_offset_reproduces_rows(device, backend, shape, k):
    """offset counts rows: randn(shape, offset=k) on rows k.. is rows k.. of the whole draw, bit for
    bit (rows of 37 and 21 elements start mid-Philox-block, rows of 8 on a block boundary)."""
    whole = fastgen.randn(shape, seed=11, stream=2, device=device, backend=backend)
    shard = fastgen.randn((8 - k, *shape[1:]), seed=11, stream=2, offset=k, device=device, backend=backend)
    assert torch.equal(shard, whole[k:])


def test_one_dimensional_offsets_count_elements(device):
    """A 1-d draw's rows are single elements, so its offset counts elements, as before."""
    whole = kernel_randn((10,), device, seed=3)
    assert torch.equal(kernel_randn((7,), device, seed=3, offset=3), whole[3:])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, (1 << 64) - 1), stream=st.integers(0, (1 << 40)), offset=st.integers(0, 1 << 40),
       n=st.integers(1, 300), start=st.integers(0, 299))
def test_any_slice_is_a_draw_at_its_offset(seed, stream, offset, n, start):
    """Property: elements [start, n) of a draw at ``offset`` are the draw of n - start at offset + start."""
    start = min(start, n - 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    whole = kernel_randn((n,), device, seed=seed, stream=stream, offset=offset)
    part = kernel_randn((n - start,), device, seed=seed, stream=stream, offset=offset + start)
    assert torch.equal(part, whole[start:])


def test_same_numbers_across_backends_and_devices(device):
    """The kernel on this device and the torch backend on the CPU draw the same numbers."""
    z = kernel_randn((9, 33), device, seed=BIG_SEED, stream=5, offset=1)
    expected = fastgen.randn((9, 33), seed=BIG_SEED, stream=5, offset=1, device="cpu", backend="torch")
    assert_close(z, expected.double())


# --- statistics ------------------------------------------------------------------------------------

N_STATS = 1 << 16


@pytest.mark.parametrize("seed, stream, offset", [(0, 0, 0), (BIG_SEED, 17, 3), (2024, 1 << 33, 1 << 36)])
def test_normal_distribution(device, seed, stream, offset):
    z = kernel_randn((N_STATS,), device, seed=seed, stream=stream, offset=offset).double().cpu().numpy()
    assert np.isfinite(z).all()
    # Kolmogorov-Smirnov against N(0, 1). Seeds are fixed, so this is deterministic, not flaky.
    assert scipy.stats.kstest(z, "norm").pvalue > 1e-3
    n = len(z)
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / n)
    assert abs(scipy.stats.skew(z)) < 5 * np.sqrt(6 / n)
    assert abs(scipy.stats.kurtosis(z)) < 5 * np.sqrt(24 / n)
    # Every lane of a Philox block (cos/sin of both Box-Muller pairs) is N(0, 1) on its own too.
    for lane in range(4):
        assert scipy.stats.kstest(z[lane::4], "norm").pvalue > 1e-3


@pytest.mark.parametrize("other", [dict(seed=2), dict(stream=1), dict(offset=N_STATS), dict(offset=1)],
                         ids=["seed", "stream", "offset", "offset-by-one"])
def test_different_seeds_streams_offsets_are_uncorrelated(device, other):
    base = dict(seed=1, stream=0, offset=0)
    a = kernel_randn((N_STATS,), device, **base).double().cpu()
    b = kernel_randn((N_STATS,), device, **{**base, **other}).double().cpu()
    assert not torch.equal(a, b)
    r = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(r) < 5 / np.sqrt(N_STATS)
    # and not merely uncorrelated in value: the magnitudes and signs are unrelated as well
    assert abs(torch.corrcoef(torch.stack([a.abs(), b.abs()]))[0, 1].item()) < 5 / np.sqrt(N_STATS)
    assert abs((a.sign() == b.sign()).double().mean().item() - 0.5) < 5 * 0.5 / np.sqrt(N_STATS)


# --- seeds ---------------------------------------------------------------------------------------

def test_no_seed_follows_torch_manual_seed(device):
    torch.manual_seed(0)
    a = kernel_randn((100,), device)
    torch.manual_seed(0)
    b = kernel_randn((100,), device)
    torch.manual_seed(1)
    c = kernel_randn((100,), device)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_seeds_are_64_bit(device):
    """Seeds that differ only in the high 32 bits draw different numbers; negative seeds wrap like
    torch.manual_seed's."""
    lo = kernel_randn((64,), device, seed=5)
    hi = kernel_randn((64,), device, seed=5 + (1 << 32))
    assert not torch.equal(lo, hi)
    assert torch.equal(kernel_randn((64,), device, seed=-1), kernel_randn((64,), device, seed=(1 << 64) - 1))
    assert torch.equal(kernel_randn((8,), device, seed=np.int64(3)), kernel_randn((8,), device, seed=3))


def test_seed_stream_offset_are_not_specialised():
    """seed, stream and offset are int64 kernel arguments excluded from specialisation, so new
    values never compile a new kernel (checked by compile count on CUDA, below). The kernel calls
    the stream noise_stream: a launch option is named stream."""
    kernel = k_random._randn_kernel
    fn = getattr(kernel, "fn", kernel)
    params = inspect.signature(fn).parameters
    for name in ("seed", "noise_stream", "offset"):
        assert params[name].annotation in (k_random.tl.int64, "tl.int64"), name
    if not interpreted(kernel):
        assert {p.name for p in kernel.params if p.do_not_specialize} >= {"seed", "noise_stream", "offset"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compile caches exist only for compiled kernels; "
                    "the interpreter never compiles")
def test_new_seed_stream_offset_do_not_recompile():
    kernel = k_random._randn_kernel
    fastgen.randn((4096,), seed=1, device="cuda", backend="triton")
    count = lambda: sum(len(c[0]) for c in kernel.device_caches.values())  # noqa: E731
    before = count()
    for seed, stream, offset in [(2, 0, 0), (1 << 40, 5, 16), ((1 << 64) - 1, 1 << 35, (1 << 33) + 1), (-7, 1, 1)]:
        fastgen.randn((4096,), seed=seed, stream=stream, offset=offset, device="cuda", backend="triton")
    assert count() == before


# --- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(shape=(-1, 3)), ValueError, "shape"),
    (dict(shape=(2.5,)), TypeError, r"shape\[0\]"),
    (dict(shape="abc"), TypeError, r"shape\[0\]"),
    (dict(shape=None), TypeError, "shape"),
    (dict(offset=-1), ValueError, "offset"),
    (dict(offset=1.0), TypeError, "offset"),
    (dict(offset=(1 << 63)), ValueError, "offset"),
    (dict(shape=(4, 8), offset=(1 << 63) // 8), ValueError, "offset"),  # offset * row past int64
    (dict(stream=-2), ValueError, "stream"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(seed="7"), TypeError, "seed"),
    (dict(seed=True), TypeError, "seed"),
    (dict(seed=1 << 64), ValueError, "seed"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(backend=None), ValueError, "backend"),
    (dict(dtype=torch.int32), ValueError, "dtype"),
    (dict(dtype=torch.float64), ValueError, "dtype"),
    (dict(dtype="float32"), TypeError, "dtype"),
    (dict(device="not-a-device"), ValueError, "device"),
])
def test_bad_arguments_name_the_argument(kwargs, error, match):
    kwargs = {"shape": (4,), "seed": 0, **kwargs}
    with pytest.raises(error, match=match):
        fastgen.randn(kwargs.pop("shape"), **kwargs)


def test_offset_bound_is_in_rows(device):
    """The last counter element offset * row + numel - 1 must fit int64: the largest offset passes."""
    shape = (4, 8)
    largest = ((1 << 63) - 1 - 32) // 8
    z = fastgen.randn(shape, seed=0, offset=largest, device=device, backend="torch")
    assert torch.equal(z, ref.randn(shape, seed=0, offset=largest * 8))
    with pytest.raises(ValueError, match=rf"offset must be an integer in \[0, {largest}\]"):
        fastgen.randn(shape, seed=0, offset=largest + 1, device=device)

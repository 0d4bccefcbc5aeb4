"""The sigma-space samplers' fused step (kernels/samplers.py) on arbitrary coefficient rows: kernel vs
the documented affine map in float64, every constexpr variant, noise sources, guidance, clipping,
NaN and dropped terms, offsets in samples. Each sampler's own equations are tested in its file."""
import pytest
import torch

from fastgen.ops import guidance
from fastgen.ops.samplers import COLUMNS, HISTORY_COLUMNS, affine_table, sampler_step
from tests.utils import FLOAT_DTYPES, assert_close, poison, rand_like_shape


def _table(coefficients, *, clip="none", **clip_settings):
    return affine_table(coefficients, clip=clip, **clip_settings)


def _random_rows(n, generator, *, zero_columns=(), history=1, noise_prev=False):
    """n random rows reading the last ``history`` denoised outputs (none that a step has not got yet),
    and with ``noise_prev`` the previous step's counter noise again (from the second step on)."""
    rows = torch.randn(n, len(COLUMNS), generator=generator, dtype=torch.float64)
    rows[:1 if noise_prev else n, COLUMNS.index("noise_prev")] = 0.0
    for k, name in enumerate(HISTORY_COLUMNS, start=1):
        rows[:k, COLUMNS.index(name)] = 0.0  # step i has i previous denoised outputs
        if k > history:
            rows[:, COLUMNS.index(name)] = 0.0
    for name in zero_columns:
        rows[:, COLUMNS.index(name)] = 0.0
    return rows


def _inputs(shape, dtype, device, generator, guided=False):
    batch = shape[0]
    x = rand_like_shape(shape, dtype, device, generator=generator)
    out_shape = (2 * batch, *shape[1:]) if guided else shape
    m = rand_like_shape(out_shape, dtype, device, generator=generator)
    prev = rand_like_shape(shape, dtype, device, generator=generator)
    return x, m, prev


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 3), (3, 5, 7), (4, 1, 8, 8)])
@pytest.mark.parametrize("noise", ["philox", "tensor", "none"])
@pytest.mark.parametrize("guided", [False, True])
def test_kernel_matches_the_affine_map(dtype, shape, noise, guided, device):
    g = torch.Generator().manual_seed(hash((shape, noise, guided)) % (1 << 31))
    zero = ("churn", "noise") if noise == "none" else ()
    table = _table(_random_rows(3, g, zero_columns=zero))
    x, m, prev = _inputs(shape, dtype, device, g, guided)
    z = rand_like_shape(shape, dtype, device, generator=g) if noise == "tensor" else None
    w = 3.5 if guided else None
    for i in range(3):
        got, got_d = sampler_step(table, i, m, x, prev_denoised=prev, seed=11, noise=z, offset=2, guidance_scale=w,
                                  backend="triton")
        want, want_d = sampler_step(table, i, m, x, prev_denoised=prev, seed=11, noise=z, offset=2, guidance_scale=w,
                                    backend="reference")
        assert_close(got, want.to(dtype), dtype=dtype, rtol=_rtol(dtype), atol=_atol(dtype))
        assert_close(got_d, want_d.to(dtype), dtype=dtype, rtol=_rtol(dtype), atol=_atol(dtype))


def _rtol(dtype):  # the map sums ~6 fp32 products of O(1) values, then rounds once to dtype
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


def _atol(dtype):
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


@pytest.mark.parametrize("clip", ["range", "threshold"])
def test_clipping(clip, device):
    g = torch.Generator().manual_seed(3)
    settings = dict(clip_range=0.7) if clip == "range" else dict(dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
    table = _table(_random_rows(2, g, zero_columns=("churn",)) * 3, clip=clip, **settings)
    x, m, prev = _inputs((3, 2, 5, 5), torch.float32, device, g)
    for i in range(2):
        got = sampler_step(table, i, m, x, prev_denoised=prev, seed=5, backend="triton")
        want = sampler_step(table, i, m, x, prev_denoised=prev, seed=5, backend="reference")
        for a, e in zip(got, want):
            assert_close(a, e.float(), rtol=1e-5, atol=1e-5)


def test_torch_backend_matches_the_kernel(device):
    g = torch.Generator().manual_seed(4)
    table = _table(_random_rows(2, g))
    x, m, prev = _inputs((5, 3, 4), torch.float32, device, g, guided=True)
    for i in range(2):
        got = sampler_step(table, i, m, x, prev_denoised=prev, seed=9, offset=1, guidance_scale=2.0, backend="torch")
        want = sampler_step(table, i, m, x, prev_denoised=prev, seed=9, offset=1, guidance_scale=2.0,
                            backend="triton")
        for a, e in zip(got, want):
            assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_step_index_on_the_device_and_in_place_denoised(device):
    """A captured loop passes the step as a device int64 and keeps D' in one buffer the kernel
    overwrites: the same results as host indices and separate buffers."""
    g = torch.Generator().manual_seed(5)
    table = _table(_random_rows(3, g))
    x, m, prev = _inputs((2, 33), torch.float32, device, g)
    from fastgen.kernels import samplers as k_samplers
    from fastgen.kernels.random import NOISE_PHILOX

    coefficients, streams, steps = table.on(device)
    buffer = prev.clone()
    out = poison(torch.empty_like(x))
    k_samplers.sampler_step(out, buffer, m, x, buffer, coefficients, streams, steps[1], noise_mode=NOISE_PHILOX,
                            seed=3, offset=0)
    want, want_d = sampler_step(table, 1, m, x, prev_denoised=prev, seed=3, backend="reference")
    assert_close(out, want.float(), rtol=1e-5, atol=1e-5)
    assert_close(buffer, want_d.float(), rtol=1e-5, atol=1e-5)


def test_zero_coefficients_drop_their_terms(device):
    """D' and z with a zero coefficient are not read into the result: NaN there changes nothing."""
    g = torch.Generator().manual_seed(6)
    rows = _random_rows(1, g, zero_columns=("ap", "churn", "noise"))
    table = _table(rows)
    x, m, _ = _inputs((2, 17), torch.float32, device, g)
    nan = torch.full_like(x, float("nan"))
    got, _ = sampler_step(table, 0, m, x, prev_denoised=nan, noise=nan, backend="triton")
    want, _ = sampler_step(table, 0, m, x, prev_denoised=nan, noise=nan, backend="reference")
    assert torch.isfinite(got).all()
    assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


def test_nan_in_the_model_output_or_sample_propagates(device):
    g = torch.Generator().manual_seed(7)
    table = _table(_random_rows(1, g), clip="range")
    x, m, prev = _inputs((2, 16), torch.float32, device, g)
    m[0, 3] = float("nan")
    x[1, 5] = float("inf")
    got, got_d = sampler_step(table, 0, m, x, prev_denoised=prev, seed=1, backend="triton")
    want, want_d = sampler_step(table, 0, m, x, prev_denoised=prev, seed=1, backend="reference")
    assert torch.isnan(got[0, 3]) and torch.isnan(got_d[0, 3])
    assert_close(got, want.float(), rtol=1e-5, atol=1e-5, equal_nan=True)
    assert_close(got_d, want_d.float(), rtol=1e-5, atol=1e-5, equal_nan=True)


def test_offset_counts_samples(device):
    """Sample k stepped alone with offset=k equals sample k of the batch: batch-invariant noise."""
    g = torch.Generator().manual_seed(8)
    table = _table(_random_rows(1, g))
    x, m, prev = _inputs((4, 3, 5), torch.float32, device, g, guided=True)
    whole, _ = sampler_step(table, 0, m, x, prev_denoised=prev, seed=21, guidance_scale=1.5, backend="triton")
    for k in range(4):
        alone, _ = sampler_step(table, 0, torch.stack([m[k], m[4 + k]]), x[k:k + 1], prev_denoised=prev[k:k + 1],
                                seed=21, offset=k, guidance_scale=1.5, backend="triton")
        torch.testing.assert_close(alone[0], whole[k], rtol=0, atol=0)


def test_bad_arguments_are_named(device):
    g = torch.Generator().manual_seed(9)
    table = _table(_random_rows(2, g))
    x, m, prev = _inputs((2, 4), torch.float32, device, g)
    with pytest.raises(TypeError, match="table must be"):
        sampler_step("euler", 0, m, x)
    with pytest.raises(ValueError, match=r"i must be a step index in \[0, 2\)"):
        sampler_step(table, 2, m, x, prev_denoised=prev)
    with pytest.raises(ValueError, match=r"model_output must be \[2B, \.\.\.\]"):
        sampler_step(table, 0, m, x, guidance_scale=2.0)
    with pytest.raises(ValueError, match="guidance_scale must be finite"):
        sampler_step(table, 0, torch.cat([m, m]), x, guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="prev_denoised is required"):
        sampler_step(table, 1, m, x)
    with pytest.raises(ValueError, match="offset must be"):
        sampler_step(table, 0, m, x, offset=-1)
    with pytest.raises(ValueError, match="clip must be one of"):
        _table(_random_rows(1, g), clip="sometimes")
    with pytest.raises(ValueError, match="backend 'torch' steps on the host"):
        sampler_step(table, torch.zeros((), dtype=torch.int64, device=device), m, x, prev_denoised=prev,
                     backend="torch")


def test_guided_is_the_cfg_combination():
    m = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(guidance.guided(m, 2.5), m[:2] + 2.5 * (m[2:] - m[:2]))
    assert guidance.guided(m, None) is m


@pytest.mark.parametrize("history", [2, 3, 4])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_history_ring(history, backend, device):
    """A step reading the last H denoised outputs keeps them in a ring [H, B, ...] that the step
    overwrites in place (slot i mod H): a run of steps equals the reference run, which is handed the
    previous outputs themselves, most recent first (the kernel reads every slot before it writes)."""
    g = torch.Generator().manual_seed(10 + history)
    steps = 5
    table = _table(_random_rows(steps, g, history=history) * 0.5)
    assert table.history == history
    x, m, _ = _inputs((3, 2, 9), torch.float32, device, g)
    ring = poison(torch.empty((history, *x.shape), device=device))  # unread before each slot is written
    previous, want_x, got_x = [], x, x
    for i in range(steps):
        m_i = m * (1 + 0.1 * i)
        got_x, got_d = sampler_step(table, i, m_i, got_x, prev_denoised=ring, denoised_out=ring, seed=3,
                                    backend=backend)
        want_x, want_d = table.reference(i, m_i.double(), want_x.double(), tuple(previous), None
                                         if not table.draws(i) else _noise(table, i, x, device))
        previous = [want_d, *previous][:history]
        assert_close(got_x, want_x.float(), rtol=1e-5, atol=1e-5)
        assert_close(got_d, want_d.float(), rtol=1e-5, atol=1e-5)
        assert_close(ring[i % history], want_d.float(), rtol=1e-5, atol=1e-5)


def _noise(table, i, x, device):
    from fastgen.ops.samplers import step_noise

    return step_noise(table, i, x.shape, seed=3, offset=0, device=device)


def test_history_ring_shape_is_checked(device):
    table = _table(_random_rows(3, torch.Generator().manual_seed(1), history=2))
    x = torch.randn(2, 5, device=device)
    with pytest.raises(ValueError, match=r"prev_denoised must be the ring of the last 2 denoised outputs"):
        sampler_step(table, 2, x, x, prev_denoised=x, backend="torch")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_previous_steps_noise_drawn_again(backend, device):
    """NOISE_PREV adds step i - 1's counter normals (stream i - 1, the same counter elements) again:
    the kernel and the torch path equal the affine map on the two draws, and a noise tensor is refused."""
    g = torch.Generator().manual_seed(21)
    table = _table(_random_rows(3, g, noise_prev=True))
    assert table.reads_previous_noise
    x, m, prev = _inputs((3, 2, 7), torch.float32, device, g)
    for i in (1, 2):
        got = sampler_step(table, i, m, x, prev_denoised=prev, seed=5, offset=1, backend=backend)
        want = sampler_step(table, i, m, x, prev_denoised=prev, seed=5, offset=1, backend="reference")
        for a, e in zip(got, want):
            assert_close(a, e.float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pass seed=, not a noise tensor"):
        sampler_step(table, 1, m, x, prev_denoised=prev, noise=x, backend=backend)

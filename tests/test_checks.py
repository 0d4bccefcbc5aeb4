"""The argument checks every public op shares (fastgen/_checks.py), exercised through the ops."""
import pytest
import torch

import fastgen
from fastgen import _checks

SCHEDULE = fastgen.NoiseSchedule(num_train_timesteps=10)


def _meta_calls():
    meta, cpu = torch.empty(2, 3, device="meta"), torch.zeros(2, 3)
    return [
        ("randn", lambda: fastgen.randn((2, 3), seed=0, device="meta"), "device"),
        ("latents", lambda: fastgen.latents(2, 3, seed=0, device="meta"), "device"),
        ("latents truncated", lambda: fastgen.latents(2, 3, seed=0, truncation=0.5, device=torch.device("meta")),
         "device"),
        ("reparameterize", lambda: fastgen.reparameterize(meta, meta, seed=0), "mu"),
        ("reparameterize noise", lambda: fastgen.reparameterize(cpu, cpu, noise=meta), "noise"),
        ("gaussian_kl", lambda: fastgen.gaussian_kl(meta, meta), "mu"),
        ("gaussian_kl prior", lambda: fastgen.gaussian_kl(cpu, cpu, meta), "mu2"),
        ("reparameterize_with_kl", lambda: fastgen.reparameterize_with_kl(meta, meta, seed=0), "mu"),
        ("q_sample", lambda: fastgen.q_sample(meta, 5, SCHEDULE, seed=0), "x0"),
        ("ddpm_step", lambda: fastgen.ddpm_step(meta, 5, meta, SCHEDULE, seed=0), "sample"),
        ("ddpm_step model_output", lambda: fastgen.ddpm_step(meta, 5, cpu, SCHEDULE, seed=0), "model_output"),
        ("ddim_step", lambda: fastgen.ddim_step(meta, 5, 4, meta, SCHEDULE), "sample"),
        ("ddim_step noise", lambda: fastgen.ddim_step(cpu, 5, 4, cpu, SCHEDULE, eta=1.0, noise=meta), "noise"),
    ]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("call, name", [pytest.param(*c[1:], id=c[0]) for c in _meta_calls()])
def test_meta_tensors_are_rejected_by_name(call, name, backend, monkeypatch):
    monkeypatch.setenv("FASTGEN_BACKEND", backend)
    with pytest.raises(ValueError, match=rf"^{name} .*meta tensors are not supported"):
        call()


INT64_MAX = (1 << 63) - 1


@pytest.mark.parametrize("offset, shape, expected", [
    (0, (4, 3, 5), 0), (3, (4, 3, 5), 45), (3, (4,), 3), (6, (), 6), (7, (4, 0), 0), (7, (0, 5), 35),
])
def test_sample_offset_counts_rows(offset, shape, expected):
    """offset in samples (rows of dim 0) -> the counter element of the first element: offset * row,
    row = prod(shape[1:]); a 0-d or 1-d shape has rows of one element."""
    from fastgen import _checks

    assert _checks.sample_offset(offset, shape) == expected


@pytest.mark.parametrize("shape", [(4, 3, 5), (2,), (), (3, 0)], ids=str)
def test_sample_offset_bound(shape):
    """The largest offset keeps offset * row + numel <= INT64_MAX; one more is refused, naming the argument."""
    from fastgen import _checks

    shape = torch.Size(shape)
    row, numel = shape[1:].numel(), shape.numel()
    largest = (INT64_MAX - numel) // row if row else INT64_MAX
    assert _checks.sample_offset(largest, shape) + numel <= INT64_MAX
    with pytest.raises(ValueError, match=r"^start must be an integer in \[0, "):
        _checks.sample_offset(largest + 1, shape, "start")


@pytest.mark.parametrize("offset, error", [(-1, ValueError), (1.0, TypeError), (True, TypeError), ("2", TypeError)])
def test_sample_offset_rejects_non_integers_by_name(offset, error):
    from fastgen import _checks

    with pytest.raises(error, match="^offset"):
        _checks.sample_offset(offset, (2, 3))


def test_cuda_without_an_index_is_the_current_device(monkeypatch):
    """device="cuda" compares equal to the tensors made there ("cuda:0"): fastgen.sample(device="cuda")
    checked its model's output against an index-less device and refused every output."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert _checks.compute_device("cuda") == torch.device("cuda", 1)
    assert _checks.compute_device("cuda:0") == torch.device("cuda", 0)
    assert _checks.compute_device("cpu") == torch.device("cpu")

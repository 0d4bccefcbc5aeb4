"""Backend dispatch: one rule for every op (fastgen.backend)."""
import pytest
import torch

import fastgen
from fastgen import backend as fb


def test_auto_picks_torch_on_cpu_and_triton_on_cuda(monkeypatch):
    monkeypatch.delenv(fb.ENV_VAR, raising=False)
    assert fb.resolve_backend("auto", "cpu") == "torch"
    assert fb.resolve_backend("auto", "cuda") == "triton"
    assert fb.resolve_backend("torch", "cuda") == "torch"


def test_env_var_sets_what_auto_means(monkeypatch):
    monkeypatch.setenv(fb.ENV_VAR, "torch")
    assert fb.resolve_backend("auto", "cuda") == "torch"
    monkeypatch.setenv(fb.ENV_VAR, "triton")
    assert fb.resolve_backend("auto", "cpu") == "triton"  # the interpreter is on in this test session
    assert fb.resolve_backend("torch", "cpu") == "torch"  # an explicit backend wins over the env


def test_env_var_selects_the_kernel_for_ops(monkeypatch, device):
    """With FASTGEN_BACKEND=triton a default call runs the kernel: poisoned outputs prove it wrote them."""
    monkeypatch.setenv(fb.ENV_VAR, "triton")
    z = fastgen.randn((10,), seed=3, device=device)
    assert torch.isfinite(z).all()
    assert torch.allclose(z.cpu(), fastgen.randn((10,), seed=3, backend="torch"), atol=1e-5)


def test_bad_env_var_is_named(monkeypatch):
    monkeypatch.setenv(fb.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=fb.ENV_VAR):
        fb.resolve_backend("auto", "cpu")


@pytest.mark.parametrize("bad", ["TRITON", "gpu", 1, None])
def test_unknown_backend(bad):
    with pytest.raises(ValueError, match="backend"):
        fb.resolve_backend(bad, "cpu")


def test_triton_on_cpu_without_interpreter_explains(monkeypatch):
    monkeypatch.setattr(fb, "triton_interpreting", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        fb.resolve_backend("triton", "cpu")


def test_without_triton_auto_falls_back_and_triton_explains(monkeypatch):
    monkeypatch.setattr(fb, "triton_available", lambda: False)
    assert fb.resolve_backend("auto", "cuda") == "torch"
    with pytest.raises(RuntimeError, match="triton"):
        fb.resolve_backend("triton", "cuda")


def test_triton_backend_from_several_threads_matches_one_thread(device):
    """Concurrent calls (the interpreter's launches are serialised by kernels.launch) give the
    single-threaded results."""
    import threading

    schedule = fastgen.NoiseSchedule()
    g = torch.Generator().manual_seed(7)
    sample, out = (torch.randn(4, 3, 50, generator=g).to(device) for _ in range(2))

    def work(i):
        return (fastgen.ddpm_step(out, 500 + i, sample, schedule, seed=i, backend="triton")[0],
                fastgen.randn((3, 70), seed=i, backend="triton", device=device))

    expected = [work(i) for i in range(4)]
    results, errors = {}, []

    def run(i):
        try:
            results[i] = [work(i) for _ in range(3)]
        except Exception as err:  # noqa: BLE001 - reported below with the thread's index
            errors.append(f"thread {i}: {err!r}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for i in range(4):
        for got in results[i]:
            assert all(torch.equal(a, e) for a, e in zip(got, expected[i]))

"""Test harness: without a GPU every Triton kernel runs in the interpreter on CPU tensors; with CUDA
the same tests run compiled on the GPU. TRITON_INTERPRET must be set before triton is imported,
which is why it happens here, at conftest import, before any test module loads fastgen.kernels."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The compiled CPU loop (fastgen._compile) costs seconds of inductor compile per sampler, shape and dtype:
# the suite's hundreds of loops run the eager torch strategy, whose update the compiled one shares,
# and tests/test_torch_compile.py runs the compiled loop itself for every sampler.
os.environ.setdefault("FASTGEN_COMPILE", "0")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    """FASTGEN_TEST_IDS=<file>: run only the test ids listed there, one per line (a GPU run's rerun of
    what failed or did not get to run, within a short GPU session)."""
    listed = os.environ.get("FASTGEN_TEST_IDS")
    if listed:
        keep = set(open(listed, encoding="utf-8").read().splitlines())
        items[:] = [item for item in items if item.nodeid in keep]


@pytest.fixture
def device():
    """The device kernels run on in this session: cuda when present, else cpu (interpreter)."""
    return DEVICE


@pytest.fixture(autouse=True)
def _poison_kernel_outputs():
    """Every output fastgen allocates for a kernel starts as NaN, so an unwritten element fails."""
    from fastgen._alloc import poisoned_outputs

    with poisoned_outputs():
        yield


@pytest.fixture(scope="session")
def static_report(tmp_path_factory):
    """(recorded launches, static report) of `validate --quick`, run and recorded under the interpreter,
    every variant compiled for sm_90 (fastgen.bench.static): shared by test_compile and test_static."""
    import json
    import pathlib
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("static")
    root = pathlib.Path(__file__).resolve().parents[1]
    from fastgen.bench.static import step_environment

    for args in (["record", str(folder / "launches.json"), "--quick", "--execute"],
                 ["build", str(folder / "launches.json"), str(folder / "static.json")]):
        proc = subprocess.run([sys.executable, "-m", "fastgen.bench.static", *args], cwd=root,
                              env=step_environment(args[0]),
                              capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((folder / "launches.json").read_text()), json.loads((folder / "static.json").read_text())

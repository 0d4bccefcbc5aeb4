"""Test harness: without a GPU every Triton kernel runs in the interpreter on CPU tensors; with CUDA
the same tests run compiled on the GPU. TRITON_INTERPRET must be set before triton is imported,
which is why it happens here, at conftest import, before any test module loads fastgen.kernels."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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

"""``pytest bench/``: without a GPU the Triton kernels run in the interpreter, which must be chosen
before triton is imported (as in tests/conftest.py)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

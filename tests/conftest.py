"""Shared pytest setup.

Triton fixes, when it is first imported, whether its kernels are compiled for a GPU or run by its
CPU interpreter (TRITON_INTERPRET). Without a CUDA device the tests want the interpreter, so that
backend="triton" runs on CPU tensors; this file sets TRITON_INTERPRET=1 before anything imports
triton, unless the caller chose a value or a GPU is present. The markers (`slow`, `gpu`) and the
default `-m "not slow"` live in pyproject.toml.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _seed_and_full_precision():
    """Every test starts from the same random state, with full-precision (no TF32) fp32 matmuls."""
    torch.manual_seed(0)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = tf32

"""Shared pytest setup.

Triton fixes, when it is first imported, whether its kernels are compiled for a GPU or run by its
CPU interpreter (TRITON_INTERPRET). Without a CUDA device the tests want the interpreter, so that
backend="triton" runs on CPU tensors; this file sets TRITON_INTERPRET=1 before anything imports
triton, unless the caller chose a value or a GPU is present.

Tests marked `slow` (long sweeps) are skipped unless the run passes --runslow or a -m expression
that names them (`pytest -m slow`). The markers are declared in pyproject.toml.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `slow` tests unless asked for; with FASTATTN_TEST_SHARD=i/n keep the i-th of n
    contiguous slices of the selected tests (fastattn.gpu_check runs the GPU suite in parallel
    shards, so their kernel compiles use several cores)."""
    if not (config.getoption("--runslow") or "slow" in (config.getoption("-m") or "")):
        skip_slow = pytest.mark.skip(reason="slow sweep: run with --runslow or -m slow")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip_slow)
    shard = os.environ.get("FASTATTN_TEST_SHARD")
    if not shard:
        return
    i, n = (int(x) for x in shard.split("/"))
    if not 0 <= i < n:
        raise pytest.UsageError(f"FASTATTN_TEST_SHARD={shard}: want i/n with 0 <= i < n")
    start, stop = len(items) * i // n, len(items) * (i + 1) // n
    config.hook.pytest_deselected(items=items[:start] + items[stop:])
    items[:] = items[start:stop]


@pytest.fixture(autouse=True)
def _seed_and_full_precision():
    """Every test starts from the same random state, with full-precision (no TF32) fp32 matmuls."""
    torch.manual_seed(0)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.fixture(autouse=True)
def _triton_on_cpu_tensors(request):
    """In modules whose tensors stay on the CPU (CPU_TENSORS = True), a case with backend="triton"
    runs through Triton's interpreter: skipped where it is off (a GPU machine's run)."""
    callspec = getattr(request.node, "callspec", None)
    if getattr(request.module, "CPU_TENSORS", False) and callspec and callspec.params.get("backend") == "triton":
        from helpers import skip_without_cpu_triton

        skip_without_cpu_triton()

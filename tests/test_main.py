"""`python -m fastattn`: the environment lines and the backend table, and that a failing backend
becomes a cell of the table instead of a crash."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastattn import __main__ as info
from fastattn import dispatch


def _rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("  ")]


def _backend(row: str) -> str:
    """The backend column of a table row (rows are "  {backend:<11} {out err} ...")."""
    return row[2:13].strip()


def test_quick_run_prints_environment_and_every_backend(capsys):
    assert info.main(["--quick"]) == 0
    text = capsys.readouterr().out
    print(text)

    for tool in ("fastattn", "python", "torch", "triton", "numpy", "cpu", "cuda"):
        assert any(line.startswith(tool) for line in text.splitlines()), f"no environment line for {tool}"
    assert f"fastattn  {info.fastattn.__version__}" in text
    assert f"torch     {torch.__version__}" in text

    rows = _rows(text)
    for name in (*dispatch.REGISTRY, info.SDPA):
        assert any(_backend(row) == name for row in rows), f"no row for backend {name!r}"
    # The PyTorch paths serve every CPU problem of the table, so their rows carry numbers.
    for row in rows:
        if _backend(row) in ("cpu", "reference", info.SDPA):
            assert "error:" not in row and "cannot serve" not in row, row
            assert row[13:].split()[0] != "-", f"no error measured: {row}"


def test_failing_backend_is_a_table_cell_not_a_crash(monkeypatch):
    def boom(p):
        raise RuntimeError("boom")

    monkeypatch.setitem(dispatch.REGISTRY, "cpu", dataclasses.replace(dispatch.REGISTRY["cpu"], run=boom))
    case = info.case("cpu", torch.float32, 1, 2, 2, 8, 8, 16, causal=True)
    lines = info.run_case(case, "quick")
    cpu_row = next(line for line in lines if _backend(line) == "cpu")
    assert "error: RuntimeError: boom" in cpu_row
    assert any(_backend(line) == "reference" and "error" not in line for line in lines)


def test_quick_problems_stay_small():
    for case in info.cases(quick=True):
        assert case.scores <= info.MAX_ORACLE_SCORES[case.device], case.name


@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["--no-such-option"], 2)])
def test_argparse_exits_cleanly(argv, code, capsys):
    with pytest.raises(SystemExit) as exit_info:
        info.main(argv)
    assert exit_info.value.code == code

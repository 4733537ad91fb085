"""fastattn.gpu_check: stages in their own processes and time boxes, and the summary.

The stages' real commands need a GPU; here they run small stand-ins, and the CUDA stages are
checked to skip cleanly without a device."""

from __future__ import annotations

import sys
import time

import pytest
import torch

from fastattn import gpu_check
from fastattn.gpu_check import Stage, run_stage

PY = sys.executable


def test_a_passing_stage_reports_pytests_count_line(tmp_path):
    r = run_stage(
        Stage("ok", [PY, "-c", "print('noise'); print('3 passed, 1 skipped in 0.5s')"], 60, needs_cuda=False), tmp_path
    )
    assert (r.status, r.detail) == ("passed", "3 passed, 1 skipped in 0.5s")
    assert "noise" in (tmp_path / "ok.log").read_text()


def test_a_failing_stage_reports_its_exit_status(tmp_path):
    r = run_stage(Stage("bad", [PY, "-c", "import sys; print('boom'); sys.exit(3)"], 60, needs_cuda=False), tmp_path)
    assert r.status == "failed" and r.detail == "exit 3: boom"


def test_a_stage_past_its_box_is_stopped_and_its_log_kept(tmp_path):
    code = "import time; print('started', flush=True); time.sleep(120)"
    start = time.monotonic()
    r = run_stage(Stage("slow", [PY, "-c", code], 2, needs_cuda=False), tmp_path)
    assert r.status == "timeout" and "2 s box" in r.detail
    assert time.monotonic() - start < 20
    assert "started" in (tmp_path / "slow.log").read_text()


def test_kernels_compiled_are_new_triton_cache_entries(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "old").mkdir(parents=True)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    code = f"import os; [os.makedirs(os.path.join({str(cache)!r}, n)) for n in ('a', 'b')]"
    r = run_stage(Stage("compile", [PY, "-c", code], 60, needs_cuda=False), tmp_path)
    assert r.compiled == 2 and gpu_check.cache_entries(cache) == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")
def test_without_cuda_the_gpu_stages_skip_and_the_summary_is_written(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path), "--stages", "tests,bench"]) == 0
    text = (tmp_path / "summary.md").read_text()
    assert text.count("| skipped |") == 2 and "no CUDA device" in text
    assert capsys.readouterr().out.rstrip().endswith(text.rstrip().splitlines()[-1])  # the summary is printed last


def test_unknown_stage_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(tmp_path), "--stages", "tests,nope"])


def test_the_commands_name_the_gpu_suite_and_a_cuda_benchmark(tmp_path):
    plan = gpu_check.stages(tmp_path, gpu_check.DEFAULT_BOXES)
    assert plan["tests"].command[plan["tests"].command.index("-m", 3) + 1] == "gpu"
    bench = plan["bench"].command
    assert bench[bench.index("--device") + 1] == "cuda" and "bf16,fp16" in bench and "64,128" in bench
    assert sum(gpu_check.DEFAULT_BOXES.values()) <= 7 * 60

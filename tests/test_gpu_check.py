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


def test_kernels_compiled_and_cached_come_from_the_compile_log(tmp_path):
    # A stand-in for a process whose launches triton compiled twice and found cached once.
    code = (
        "import json, os; f = open(os.environ['FASTATTN_COMPILE_LOG'], 'a'); "
        "[f.write(json.dumps({'kernel': 'k', 'cache_hit': h}) + '\\n') for h in (False, True, False)]"
    )
    r = run_stage(Stage("compile", [PY, "-c", code], 60, needs_cuda=False), tmp_path)
    assert (r.status, r.compiled, r.cached) == ("passed", 2, 1)
    r = run_stage(Stage("quiet", [PY, "-c", "pass"], 60, needs_cuda=False), tmp_path)
    assert (r.compiled, r.cached) == (0, 0)


def test_a_sharded_stage_runs_its_copies_at_once_and_adds_their_counts(tmp_path):
    code = (
        "import os, sys, time; i, n = os.environ['FASTATTN_TEST_SHARD'].split('/'); time.sleep(1.5); "
        "print(f'{int(i) + 1} passed, 1 skipped in 1.5s'); print('{shard}', file=sys.stderr)"
    )
    start = time.monotonic()
    r = run_stage(Stage("tests", [PY, "-c", code, "{shard}"], 60, needs_cuda=False, shards=3), tmp_path)
    assert time.monotonic() - start < 4.4  # 3 x 1.5 s one after another would take 4.5 s
    assert r.status == "passed" and r.detail == "6 passed, 3 skipped (3 shards)"
    assert [(tmp_path / f"tests-{i}.log").is_file() for i in range(3)] == [True] * 3


def test_a_failing_shard_fails_the_stage(tmp_path):
    code = "import os, sys; sys.exit(int(os.environ['FASTATTN_TEST_SHARD'][0]))"
    r = run_stage(Stage("tests", [PY, "-c", code], 60, needs_cuda=False, shards=2), tmp_path)
    assert r.status == "failed" and r.detail.startswith("exit 1")


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
    plan = gpu_check.stages(tmp_path, gpu_check.DEFAULT_BOXES, shards=8)
    assert plan["tests"].command[plan["tests"].command.index("-m", 3) + 1] == "gpu"
    assert plan["tests"].shards == 8 and any("tests-{shard}.xml" in c for c in plan["tests"].command)
    bench = plan["bench"].command
    assert bench[bench.index("--device") + 1] == "cuda" and "bf16,fp16" in bench and "64,128" in bench
    assert sum(gpu_check.DEFAULT_BOXES.values()) <= 7 * 60

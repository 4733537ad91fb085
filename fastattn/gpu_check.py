"""`python -m fastattn.gpu_check --out DIR`: prove the kernels on a GPU in a few minutes.

For a short GPU lease and for users: runs, each stage in its own process with its own time box
(a stage past its box is stopped and reported, its log so far kept), so partial results always
come back:

1. ``info``: ``python -m fastattn --quick`` (versions, devices, every backend against the float64
   reference on a few problems);
2. ``tests``: ``pytest -m gpu`` over the checkout's tests/ (the whole GPU suite: forward, backward,
   launchers, varlen, dropout, modifiers, distributed), with a JUnit XML report;
3. ``bench``: ``python -m fastattn.bench`` on CUDA, bf16 and fp16, head dims 64 and 128, two
   lengths, causal and not, fastattn against each SDPA backend, forward and backward.

Logs go to DIR/<stage>.log, the benchmark's tables to DIR/bench/, and a summary to DIR/summary.md,
printed last: per stage its status (passed, failed, timeout, skipped), seconds, the line that says
the most (pytest's count, the last line otherwise) and how many Triton kernels it compiled (new
entries in the Triton cache directory, TRITON_CACHE_DIR or ~/.triton/cache; a cache carried from
another machine shows as few compiles). Stages that need CUDA are skipped without a CUDA device.
The exit status is 0 when no stage failed or timed out.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

# Time boxes (s), about 7 minutes in all on an H200 (GPU lease: 15 minutes including the start).
DEFAULT_BOXES = {"info": 60, "tests": 240, "bench": 120}
STAGES = tuple(DEFAULT_BOXES)


@dataclass(frozen=True)
class Stage:
    name: str
    command: list[str]
    box_s: float
    needs_cuda: bool = True
    cwd: str | None = None


@dataclass(frozen=True)
class StageResult:
    name: str
    status: str  # passed, failed, timeout, skipped
    seconds: float
    detail: str  # the summarising line, or why it was skipped
    compiled: int | None = None  # new Triton cache entries (None when not counted)


def triton_cache_dir() -> Path:
    return Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")


def cache_entries(cache: Path) -> int:
    """Kernels in a Triton cache directory: its entries (one per compiled kernel and its metadata)."""
    return sum(1 for p in cache.iterdir() if p.is_dir()) if cache.is_dir() else 0


def _summary_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):  # pytest's count line: "N passed, M skipped in 12.3s"
        if (" passed" in ln or " failed" in ln or " error" in ln) and " in " in ln:
            return ln.strip("= ")
    return lines[-1][:200] if lines else "(no output)"


def run_stage(stage: Stage, out: Path, env: dict | None = None) -> StageResult:
    """Run one stage in its own process group with its time box; the log goes to out/<name>.log."""
    if stage.needs_cuda and not torch.cuda.is_available():
        return StageResult(stage.name, "skipped", 0.0, "no CUDA device")
    log = out / f"{stage.name}.log"
    cache = triton_cache_dir()
    before = cache_entries(cache)
    start = time.monotonic()
    with open(log, "w") as f:
        f.write("$ " + " ".join(stage.command) + "\n")
        f.flush()
        proc = subprocess.Popen(
            stage.command, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=stage.cwd, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=stage.box_s)
            status = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            _stop(proc)
            status = "timeout"
    seconds = time.monotonic() - start
    detail = _summary_line(log.read_text(errors="replace"))
    if status == "timeout":
        detail = f"stopped after its {stage.box_s:.0f} s box; last line: {detail}"
    elif status == "failed":
        detail = f"exit {rc}: {detail}"
    return StageResult(stage.name, status, seconds, detail, cache_entries(cache) - before)


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT first (pytest then writes its summary and report), SIGKILL if it lingers."""
    for sig, grace in ((signal.SIGINT, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def stages(out: Path, boxes: dict[str, float]) -> dict[str, Stage]:
    """The stages, with commands for this interpreter and checkout."""
    py = sys.executable
    tests = Path(__file__).resolve().parents[1] / "tests"
    pytest_cmd = [
        py,
        "-m",
        "pytest",
        "-q",
        "-m",
        "gpu",
        "-p",
        "no:cacheprovider",
        f"--junitxml={out / 'tests.xml'}",
        str(tests),
    ]
    bench_cmd = [
        py, "-m", "fastattn.bench", "--device", "cuda", "--dtype", "bf16,fp16", "--head-dims", "64,128",
        "--seqlens", "4096,16384", "--families", "mha", "--causal", "both", "--modes", "fwd,bwd",
        "--out", str(out / "bench"),
    ]  # fmt: skip
    return {
        "info": Stage("info", [py, "-m", "fastattn", "--quick"], boxes["info"], needs_cuda=False),
        "tests": Stage("tests", pytest_cmd, boxes["tests"], cwd=str(tests.parent)),
        "bench": Stage("bench", bench_cmd, boxes["bench"]),
    }


def summary(results: list[StageResult], cache: Path, before: int) -> str:
    lines = [
        "# fastattn GPU check",
        "",
        f"Triton cache {cache}: {before} entries before, {cache_entries(cache)} after.",
        "",
        "| stage | status | seconds | kernels compiled | detail |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for r in results:
        compiled = "" if r.compiled is None else str(r.compiled)
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.0f} | {compiled} | {r.detail.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastattn.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for the logs and the summary")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    for name, box in DEFAULT_BOXES.items():
        parser.add_argument(f"--{name}-box", type=float, default=box, help=f"seconds for {name} (default {box})")
    args = parser.parse_args(argv)
    chosen = [s for s in args.stages.split(",") if s]
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        parser.error(f"--stages: unknown {unknown}; choose from {list(STAGES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    boxes = {name: getattr(args, f"{name}_box") for name in STAGES}
    plan = stages(args.out, boxes)
    cache = triton_cache_dir()
    before = cache_entries(cache)
    results = []
    for name in chosen:
        print(f"[gpu_check] {name} (box {boxes[name]:.0f} s) ...", flush=True)
        results.append(run_stage(plan[name], args.out))
        print(f"[gpu_check] {name}: {results[-1].status} in {results[-1].seconds:.0f} s", flush=True)
    text = summary(results, cache, before)
    (args.out / "summary.md").write_text(text)
    print(text)
    return 0 if all(r.status in ("passed", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""`python -m fastattn.gpu_check --out DIR`: prove the kernels on a GPU in a few minutes.

For a short GPU lease and for users: runs, each stage in its own process with its own time box
(a stage past its box is stopped and reported, its log so far kept), so partial results always
come back:

1. ``info``: ``python -m fastattn --quick`` (versions, devices, every backend against the float64
   reference on a few problems);
2. ``tests``: ``pytest -m gpu`` over the checkout's tests/ (the whole GPU suite: forward, backward,
   launchers, varlen, dropout, modifiers, distributed), in ``--test-shards`` pytest processes at
   once (default: half the cores, at most 8), each with a JUnit XML report: kernel compiles, most
   of a first run's time, then use several cores;
3. ``bench``: ``python -m fastattn.bench`` on CUDA, bf16 and fp16, head dims 64 and 128, two
   lengths, causal and not, fastattn against each SDPA backend, forward and backward.

Logs go to DIR/<stage>.log (DIR/tests-<i>.log per shard), the benchmark's tables to DIR/bench/,
and a summary to DIR/summary.md, printed last: per stage its status (passed, failed, timeout,
skipped), seconds, the line that says the most (pytest's counts, added up over the shards; the
last line otherwise), and how many Triton kernels it compiled and how many it found in the Triton
cache directory (TRITON_CACHE_DIR or ~/.triton/cache), counted by triton's compilation listener
(FASTATTN_COMPILE_LOG, fused.plumbing). A cache built without a GPU by ``python -m
fastattn.fused.precompile`` and carried here shows as cached kernels. Stages that need CUDA are
skipped without a CUDA device. The exit status is 0 when no stage failed or timed out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .fused.plumbing import COMPILE_LOG

# Time boxes (s), about 7 minutes in all on an H200 (GPU lease: 15 minutes including the start).
DEFAULT_BOXES = {"info": 60, "tests": 240, "bench": 120}
STAGES = tuple(DEFAULT_BOXES)
# The bench stage's sweep (python -m fastattn.bench arguments; fused.precompile plans the same).
BENCH_ARGS = (
    "--device", "cuda", "--dtype", "bf16,fp16", "--head-dims", "64,128", "--seqlens", "4096,16384",
    "--families", "mha", "--causal", "both", "--modes", "fwd,bwd",
)  # fmt: skip


@dataclass(frozen=True)
class Stage:
    """A stage: `command` run in `cwd` within box_s seconds; with shards > 1, that many copies at
    once, copy i with FASTATTN_TEST_SHARD=i/shards (tests/conftest.py keeps its slice of the
    tests) and "{shard}" in the command replaced by i."""

    name: str
    command: list[str]
    box_s: float
    needs_cuda: bool = True
    cwd: str | None = None
    shards: int = 1


@dataclass(frozen=True)
class StageResult:
    name: str
    status: str  # passed, failed, timeout, skipped
    seconds: float
    detail: str  # the summarising line, or why it was skipped
    compiled: int | None = None  # kernels triton compiled (its compilation listener; None: not run)
    cached: int | None = None  # kernels triton found in its cache directory


def triton_cache_dir() -> Path:
    return Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")


def cache_entries(cache: Path) -> int:
    """Kernels in a Triton cache directory: its entries (one per compiled kernel and its metadata)."""
    return sum(1 for p in cache.iterdir() if p.is_dir()) if cache.is_dir() else 0


_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)\b")


def _summary_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):  # pytest's count line: "N passed, M skipped in 12.3s"
        if (" passed" in ln or " failed" in ln or " error" in ln) and " in " in ln:
            return ln.strip("= ")
    return lines[-1][:200] if lines else "(no output)"


def _merged_counts(lines: list[str]) -> str | None:
    """pytest's count lines of several shards added up ("410 passed, 2 skipped"), or None."""
    totals: dict[str, int] = {}
    for ln in lines:
        for n, word in _COUNT.findall(ln):
            word = "error" if word.startswith("error") else word
            totals[word] = totals.get(word, 0) + int(n)
    return ", ".join(f"{n} {w}" for w, n in totals.items()) if totals else None


def compile_counts(log: Path) -> tuple[int, int]:
    """(compiled, found cached) from a FASTATTN_COMPILE_LOG file (fused.plumbing._log_compiles)."""
    compiled = cached = 0
    if log.is_file():
        for line in log.read_text().splitlines():
            if line.strip():
                hit = json.loads(line)["cache_hit"]
                cached += hit
                compiled += not hit
    return compiled, cached


def run_stage(stage: Stage, out: Path, env: dict | None = None) -> StageResult:
    """Run one stage (each copy in its own process group) within its time box; logs go to
    out/<name>.log (shards: out/<name>-<i>.log), triton's compiles to out/<name>.compiles.jsonl."""
    if stage.needs_cuda and not torch.cuda.is_available():
        return StageResult(stage.name, "skipped", 0.0, "no CUDA device")
    compile_log = out / f"{stage.name}.compiles.jsonl"
    compile_log.unlink(missing_ok=True)
    base = dict(os.environ if env is None else env, **{COMPILE_LOG: str(compile_log)})
    procs, logs = [], []
    start = time.monotonic()
    for i in range(stage.shards):
        sharded = stage.shards > 1
        log = out / (f"{stage.name}-{i}.log" if sharded else f"{stage.name}.log")
        command = [c.replace("{shard}", str(i)) for c in stage.command]
        proc_env = dict(base, FASTATTN_TEST_SHARD=f"{i}/{stage.shards}") if sharded else base
        f = open(log, "w")
        f.write("$ " + " ".join(command) + "\n")
        f.flush()
        procs.append(
            (subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=proc_env, cwd=stage.cwd,
                              start_new_session=True), f)
        )  # fmt: skip
        logs.append(log)
    codes, timed_out = [], False
    for proc, f in procs:
        try:
            codes.append(proc.wait(timeout=max(0.0, stage.box_s - (time.monotonic() - start))))
        except subprocess.TimeoutExpired:
            _stop(proc)
            timed_out = True
        f.close()
    seconds = time.monotonic() - start
    lines = [_summary_line(log.read_text(errors="replace")) for log in logs]
    detail = lines[0] if len(lines) == 1 else (_merged_counts(lines) or lines[-1]) + f" ({len(lines)} shards)"
    bad = [rc for rc in codes if rc != 0]
    status = "timeout" if timed_out else ("failed" if bad else "passed")
    if status == "timeout":
        detail = f"stopped after its {stage.box_s:.0f} s box; last line: {detail}"
    elif status == "failed":
        detail = f"exit {bad[0]}: {detail}"
    compiled, cached = compile_counts(compile_log)
    return StageResult(stage.name, status, seconds, detail, compiled, cached)


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


def default_shards() -> int:
    """Test shards: half the cores (8 on the lent H200 machine's 16), at most 8, at least 1."""
    return max(1, min(8, (os.cpu_count() or 1) // 2))


def stages(out: Path, boxes: dict[str, float], shards: int = 1) -> dict[str, Stage]:
    """The stages, with commands for this interpreter and checkout; the tests in `shards` copies."""
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
        f"--junitxml={out / ('tests-{shard}.xml' if shards > 1 else 'tests.xml')}",
        str(tests),
    ]
    bench_cmd = [py, "-m", "fastattn.bench", *BENCH_ARGS, "--out", str(out / "bench")]
    return {
        "info": Stage("info", [py, "-m", "fastattn", "--quick"], boxes["info"], needs_cuda=False),
        "tests": Stage("tests", pytest_cmd, boxes["tests"], cwd=str(tests.parent), shards=shards),
        "bench": Stage("bench", bench_cmd, boxes["bench"]),
    }


def summary(results: list[StageResult], cache: Path, before: int) -> str:
    lines = [
        "# fastattn GPU check",
        "",
        f"Triton cache {cache}: {before} entries before, {cache_entries(cache)} after.",
        "",
        "| stage | status | seconds | kernels compiled | kernels cached | detail |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        compiled, cached = ("" if n is None else str(n) for n in (r.compiled, r.cached))
        lines.append(
            f"| {r.name} | {r.status} | {r.seconds:.0f} | {compiled} | {cached} | {r.detail.replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastattn.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for the logs and the summary")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    for name, box in DEFAULT_BOXES.items():
        parser.add_argument(f"--{name}-box", type=float, default=box, help=f"seconds for {name} (default {box})")
    parser.add_argument(
        "--test-shards", type=int, default=default_shards(),
        help=f"pytest processes the tests stage runs at once (default here {default_shards()}: half the cores, at most 8)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.test_shards < 1:
        parser.error("--test-shards must be at least 1")
    chosen = [s for s in args.stages.split(",") if s]
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        parser.error(f"--stages: unknown {unknown}; choose from {list(STAGES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    boxes = {name: getattr(args, f"{name}_box") for name in STAGES}
    plan = stages(args.out, boxes, args.test_shards)
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

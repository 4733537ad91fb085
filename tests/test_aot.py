"""Ahead-of-time compilation of every forward configuration the dispatcher can pick, for sm_80 and
sm_90, with no GPU: what the interpreter cannot see (shared memory, registers, spills, tensor-core
instructions).

Compilation needs triton's compiled flavour, so it runs in a subprocess with TRITON_INTERPRET=0
(this process may have the interpreter on). The default run covers every padded head dim with
E == Ev for float16 and float32 in every kernel variant (causal, ragged lengths, padded head dims,
bool and float masks); `--runslow` adds bfloat16 and every (E, Ev) pair.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _compile(*args: str) -> list[dict]:
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "fastattn.fused.aot", "--json", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=3000,
    )
    if proc.returncode not in (0, 1):
        pytest.fail(f"fastattn.aot failed:\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, proc.stderr[-2000:]
    return rows


def _report(rows: list[dict]) -> None:
    for r in rows:
        print(
            f"sm_{r['arch']} {r['dtype']} E={r['head_dim']} Ev={r['head_dim_v']} {r['variant']}: "
            f"{r['block_m']}x{r['block_n']} w{r['num_warps']} s{r['num_stages']} regs={r['registers']} "
            f"spills={r['spill_stores']}/{r['spill_loads']} stack={r['stack_bytes']} "
            f"shared={r['shared_bytes']}/{r['shared_limit']} hgmma={r['hgmma']}"
        )


def _check(rows: list[dict]) -> None:
    _report(rows)
    over = [r for r in rows if r["shared_bytes"] > r["shared_limit"]]
    assert not over, f"{len(over)} configurations need more shared memory than the GPU has: {over[:3]}"
    spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, f"{len(spilling)} configurations spill registers to local memory: {spilling[:3]}"
    # On sm_90 the 16-bit configurations must use Hopper's warpgroup MMA (HGMMA), not the sm_80 path.
    no_wgmma = [r for r in rows if r["arch"] == 90 and r["dtype"] != "fp32" and not r["hgmma"]]
    assert not no_wgmma, f"sm_90 16-bit kernels without HGMMA: {no_wgmma[:3]}"


def test_every_dispatched_config_compiles():
    _check(_compile("--dtypes", "fp16,fp32", "--variants", "all"))


@pytest.mark.slow
def test_every_dispatched_config_compiles_all_pairs_and_variants():
    _check(_compile("--all-pairs", "--variants", "all"))

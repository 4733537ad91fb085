"""Before/after for fastattn's CPU tiled path: a git revision's tiled forward and backward against the
working tree's, both against SDPA, interleaved in one process.

The revision's fastattn/eager/forward.py and backward.py are loaded beside the working tree's
(their relative imports pointed at the working tree's package: the rest of fastattn is today's).
For each shape (benchmarks/cpu_training.py's quick shapes, with decode at S = 32768) three calls
are timed in interleaved rounds (cpu_fallback_ratio.time_interleaved): SDPA, the revision's
tiled_attention (+ tiled_attention_backward from its row statistics with --backward) and the
working tree's. Ratios are median time / SDPA's median time (< 1: faster than SDPA).

    python benchmarks/cpu_tiled_ab.py --before 5061e7e             # forward and forward+backward
    python benchmarks/cpu_tiled_ab.py --before 5061e7e --quick     # shorter timings
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from cpu_fallback_ratio import environment, save_results, time_interleaved

from fastattn.eager import backward as backward_now
from fastattn.eager import forward as forward_now
from fastattn.problem import canonicalize

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [  # (B, Hq, Hkv, L, S, E, causal)
    (2, 8, 8, 256, 256, 64, False),
    (2, 8, 8, 256, 256, 64, True),
    (2, 8, 8, 1024, 1024, 64, False),
    (2, 8, 8, 1024, 1024, 64, True),
    (2, 16, 4, 1024, 1024, 64, True),
    (1, 8, 8, 1, 32768, 64, False),
    (8, 8, 8, 256, 256, 128, True),
    (2, 8, 8, 1024, 1024, 128, False),
]


def load_revision(rev: str, where: Path):
    """The revision's (forward, backward) modules, importing the rest of fastattn from today's."""
    modules = []
    for name in ("forward", "backward"):
        text = subprocess.run(
            ["git", "show", f"{rev}:fastattn/eager/{name}.py"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout
        text = re.sub(r"^from \.\. import", "from fastattn import", text, flags=re.M)
        text = re.sub(r"^from \.\.(\w+) import", r"from fastattn.\1 import", text, flags=re.M)
        text = re.sub(r"^from \.forward import", "from fastattn_before_forward import", text, flags=re.M)
        text = re.sub(r"^from \.(\w+) import", r"from fastattn.eager.\1 import", text, flags=re.M)
        path = where / f"fastattn_before_{name}.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location(f"fastattn_before_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        modules.append(module)
    return modules


def measure(shape, dtype, both: bool, before, rounds: int, min_run_time: float) -> dict:
    B, Hq, Hkv, L, S, E, causal = shape
    gqa = Hq != Hkv
    q = torch.randn(B, Hq, L, E, dtype=dtype, requires_grad=both)
    k, v = (torch.randn(B, Hkv, S, E, dtype=dtype, requires_grad=both) for _ in range(2))
    dout = torch.randn(B, Hq, L, E, dtype=dtype)
    p = canonicalize(q.detach(), k.detach(), v.detach(), is_causal=causal, enable_gqa=gqa)

    def sdpa():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        if both:
            torch.autograd.grad(out, (q, k, v), dout)

    def tiled(forward, backward):
        def run():
            out, lse, stats = forward.tiled_attention(p, return_stats=True)
            if both:
                backward.tiled_attention_backward(p, out, lse, dout, stats=stats)

        return run

    fns = {"sdpa": sdpa, "before": tiled(*before), "after": tiled(forward_now, backward_now)}
    times = time_interleaved(fns, rounds, min_run_time)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "mode": "fwd+bwd" if both else "fwd",
        "shape": shape,
        "sdpa_ms": med["sdpa"] * 1e3,
        "before": med["before"] / med["sdpa"],
        "after": med["after"] / med["sdpa"],
    }


def markdown(rows: list[dict], env: dict, command: str, rev: str) -> str:
    lines = [
        "# CPU tiled path: before and after",
        "",
        f"`{command}`: {env['date']}, {env['cpu']}, {env['cores']} cores, {env['threads']} threads, "
        f"load average {env['load_average']} at the end, torch {env['torch']}.",
        "",
        f"Ratios are time / SDPA's time on the same shape; before: the tiled path of {rev}, after: the "
        "working tree's, interleaved with SDPA in one process.",
        "",
        "| dtype | mode | B | Hq/Hkv | L | S | E | causal | before | after | SDPA ms |",
        "|---|---|---:|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        B, Hq, Hkv, L, S, E, causal = r["shape"]
        lines.append(
            f"| {r['dtype']} | {r['mode']} | {B} | {Hq}/{Hkv} | {L} | {S} | {E} | {causal} | "
            f"{r['before']:.2f} | {r['after']:.2f} | {r['sdpa_ms']:.1f} |"
        )
    for dtype in sorted({r["dtype"] for r in rows}):
        for mode in ("fwd", "fwd+bwd"):
            sel = [r for r in rows if r["dtype"] == dtype and r["mode"] == mode]
            if sel:
                gm = {c: statistics.geometric_mean(r[c] for r in sel) for c in ("before", "after")}
                lines.append(f"| {dtype} | {mode} geomean | | | | | | | {gm['before']:.2f} | {gm['after']:.2f} | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the git revision to compare with (e.g. 5061e7e)")
    parser.add_argument("--quick", action="store_true", help="shorter timings")
    parser.add_argument("--name", default="cpu_tiled_ab", help="results file name")
    args = parser.parse_args()
    rounds, min_run_time = (3, 0.1) if args.quick else (5, 0.2)
    with tempfile.TemporaryDirectory() as where:
        before = load_revision(args.before, Path(where))
        rows = []
        for dtype in (torch.float32, torch.bfloat16):
            for both in (False, True):
                for shape in SHAPES:
                    rows.append(measure(shape, dtype, both, before, rounds, min_run_time))
                    r = rows[-1]
                    print(r["dtype"], r["mode"], shape, f"before {r['before']:.2f} after {r['after']:.2f}", flush=True)
    env = environment()
    command = " ".join(["python benchmarks/cpu_tiled_ab.py", *sys.argv[1:]])
    text = markdown(rows, env, command, args.before)
    print(text)
    save_results(args.name, text, env, rows)


if __name__ == "__main__":
    main()

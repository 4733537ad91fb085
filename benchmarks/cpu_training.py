"""CPU training: fastattn's "cpu" backend against SDPA, forward, backward and forward+backward.

For each shape SDPA's CPU kernel expresses (fp32 and bf16, B*H in {16, 64}, L = S in {256, 1024}
(and 4096 with --long), head dim 64/128, causal and not, GQA 4:1, decode L = 1 against S = 32768),
three calls are timed in interleaved rounds (benchmarks/cpu_fallback_ratio.py's time_interleaved):
SDPA, fastattn.attention(backend="cpu") (SDPA's CPU kernel forward, SDPA's CPU backward op:
fastattn.eager.backward.sdpa_backward_reasons), and fastattn's own tiled path on the same shape
(fastattn.eager.forward.tiled_attention with its row statistics, then
fastattn.eager.backward.tiled_attention_backward: what serves the calls SDPA cannot express, E !=
Ev, bottom-right causal with L != S, mask and causal together, windows, softcaps, ALiBi, dropout;
called directly, so it is timed on exactly SDPA's shape). The backward is timed alone by
backward(retain_graph=True) on one forward's graph. Gradients are checked against SDPA's first.
Ratios are time / SDPA's time (< 1: faster than SDPA); the load average is printed with the table.

--load runs every case with another process keeping all cores busy (a float32 matmul loop on
as many threads as cores), the way a CI machine or a laptop shares them.

    python benchmarks/cpu_training.py           # ~20 minutes on 2 cores
    python benchmarks/cpu_training.py --quick   # a few shapes, short timings
    python benchmarks/cpu_training.py --long    # also L = S = 4096 (B*H = 16)
    python benchmarks/cpu_training.py --quick --load
    OMP_WAIT_POLICY=PASSIVE python benchmarks/cpu_training.py --quick [--load] --name cpu_training_quick[_load]_passive
    python benchmarks/cpu_training.py --readme README.md   # the README's table, from the saved results
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from cpu_fallback_ratio import RESULTS, environment, save_results, time_interleaved

import fastattn
from fastattn.bench.readme import replace_section
from fastattn.eager.backward import sdpa_backward_reasons, tiled_attention_backward
from fastattn.eager.forward import tiled_attention
from fastattn.problem import canonicalize


def measure(B, Hq, Hkv, L, S, E, dtype, causal, rounds, min_run_time) -> dict:
    gqa = Hq != Hkv
    q = torch.randn(B, Hq, L, E, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, Hkv, S, E, dtype=dtype, requires_grad=True) for _ in range(2))
    dout = torch.randn(B, Hq, L, E, dtype=dtype)
    inputs = (q, k, v)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    def ours():
        return fastattn.attention(q, k, v, is_causal=causal, enable_gqa=gqa, backend="cpu")

    p = canonicalize(q.detach(), k.detach(), v.detach(), is_causal=causal, enable_gqa=gqa)
    assert not sdpa_backward_reasons(p, None, False), sdpa_backward_reasons(p, None, False)

    def tiled_forward():
        return tiled_attention(p, return_stats=True)

    out, lse, stats = tiled_forward()

    def tiled_backward():
        return tiled_attention_backward(p, out, lse, dout, stats=stats)

    def tiled_both():
        o, m, st = tiled_forward()
        return tiled_attention_backward(p, o, m, dout, stats=st)

    # correctness first: fastattn's gradients (both backwards) against SDPA's
    expected = torch.autograd.grad(sdpa(), inputs, dout)
    got = torch.autograd.grad(ours(), inputs, dout)
    tiled = tiled_both()[:3]
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    for name, grads in (("cpu", got), ("tiled", tiled)):
        for g, e in zip(grads, expected):
            err = (g.float() - e.float()).abs().max().item()
            assert err <= tol * max(1.0, e.float().abs().max().item()), (name, err)

    def backward_of(fn):
        graph = fn()

        def run():
            for t in inputs:
                t.grad = None
            graph.backward(dout, retain_graph=True)

        return run

    def fwd_bwd(fn):
        def run():
            for t in inputs:
                t.grad = None
            fn().backward(dout)

        return run

    with torch.no_grad():
        fwd = time_interleaved({"sdpa": sdpa, "cpu": ours, "tiled": tiled_forward}, rounds, min_run_time)
    bwd = time_interleaved(
        {"sdpa": backward_of(sdpa), "cpu": backward_of(ours), "tiled": tiled_backward}, rounds, min_run_time
    )
    both = time_interleaved({"sdpa": fwd_bwd(sdpa), "cpu": fwd_bwd(ours), "tiled": tiled_both}, rounds, min_run_time)
    med = lambda times: {n: statistics.median(ts) * 1e3 for n, ts in times.items()}  # noqa: E731
    fwd, bwd, both = med(fwd), med(bwd), med(both)
    return dict(
        B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=E, dtype=str(dtype).replace("torch.", ""), causal=causal,
        fwd_ms=fwd, bwd_ms=bwd, fwd_bwd_ms=both,
        fwd_ratio=fwd["cpu"] / fwd["sdpa"], bwd_ratio=bwd["cpu"] / bwd["sdpa"],
        fwd_bwd_ratio=both["cpu"] / both["sdpa"],
        tiled_fwd_ratio=fwd["tiled"] / fwd["sdpa"], tiled_bwd_ratio=bwd["tiled"] / bwd["sdpa"],
        tiled_fwd_bwd_ratio=both["tiled"] / both["sdpa"],
    )  # fmt: skip


COLUMNS = [  # (row key, column title); each a ratio to SDPA's time
    ("fwd_ratio", "fwd"), ("bwd_ratio", "bwd"), ("fwd_bwd_ratio", "fwd+bwd"),
    ("tiled_fwd_ratio", "tiled fwd"), ("tiled_bwd_ratio", "tiled bwd"), ("tiled_fwd_bwd_ratio", "tiled fwd+bwd"),
]  # fmt: skip


def markdown(rows: list[dict], env: dict, command: str) -> str:
    gm = lambda key: statistics.geometric_mean(r[key] for r in rows)  # noqa: E731
    lines = [
        '# CPU training: fastattn\'s "cpu" backend and its tiled path against SDPA',
        "",
        f"`{command}`: {env['date']}, {env['cpu']}, {env['cores']} cores, "
        f"{env['threads']} threads, load average {env['load_average']} at the end"
        + (" (another process kept every core busy)" if env.get("loaded") else "")
        + (f", OMP_WAIT_POLICY={env['omp_wait_policy']}" if env.get("omp_wait_policy") else "")
        + f", torch {env['torch']}, fastattn {env['fastattn']}.",
        "",
        "Ratios are time / SDPA's time on the same shape (< 1: faster). fwd, bwd, fwd+bwd: "
        "`fastattn.attention(backend=\"cpu\")` (SDPA's CPU kernel and SDPA's CPU backward op here); "
        "tiled: fastattn's own path (`tiled_attention` with its row statistics, `tiled_attention_backward`), "
        "what serves the calls SDPA cannot express, timed on the same shapes.",
        "",
        "| dtype | B | Hq/Hkv | L | S | E | causal | " + " | ".join(t for _, t in COLUMNS) + " | SDPA fwd+bwd ms |",
        "|---|---:|---|---:|---:|---:|---|" + "---:|" * (len(COLUMNS) + 1),
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['B']} | {r['Hq']}/{r['Hkv']} | {r['L']} | {r['S']} | {r['E']} | {r['causal']} | "
            + " | ".join(f"{r[key]:.2f}" for key, _ in COLUMNS)
            + f" | {r['fwd_bwd_ms']['sdpa']:.1f} |"
        )
    lines += ["", "Geometric means: " + ", ".join(f"{t} {gm(key):.2f}" for key, t in COLUMNS) + "."]
    return "\n".join(lines) + "\n"


README_BEGIN, README_END = "<!-- cpu-ratios -->", "<!-- /cpu-ratios -->"


def _geomean_row(label: str, rows: list[dict]) -> str:
    means = [statistics.geometric_mean(r[key] for r in rows) for key, _ in COLUMNS]
    return f"| {label} | {len(rows)} | " + " | ".join(f"{m:.2f}" for m in means) + " |"


def _shared_over_quiet(quiet: dict, loaded: dict) -> str:
    shared = [
        statistics.geometric_mean(r[k] for r in loaded["rows"]) / statistics.geometric_mean(r[k] for r in quiet["rows"])
        for k, _ in COLUMNS
    ]
    return "| shared / quiet | | " + " | ".join(f"{x:.2f}" for x in shared) + " |"


def readme_section(
    full: dict, quiet: dict | None, loaded: dict | None, passive: tuple[dict, dict] | None = None
) -> str:
    """The README's CPU table from saved results (the .json files save_results wrote): geometric
    means of each ratio per dtype and length over the full run's shapes, and the quick run's means
    quiet and with the cores shared (passive: the same two runs with OMP_WAIT_POLICY=PASSIVE)."""
    env, rows = full["environment"], full["rows"]
    head = "| shapes | n | " + " | ".join(t for _, t in COLUMNS) + " |"
    rule = "|---|---:|" + "---:|" * len(COLUMNS)
    lines = [
        f"Measured {env['date']} on {env['cpu']} ({env['threads']} threads, load average "
        f"{env['load_average'][0]:.1f} at the end), torch {env['torch']}, fastattn {env['fastattn']}, by "
        "`python benchmarks/cpu_training.py --long` (every row: "
        "`benchmarks/results/cpu/cpu_training.md`). Ratio = time / SDPA's time on the same shape, geometric "
        "means over B·H 16 and 64, head dims 64 and 128, causal and not (L = 4096: B·H 16); fwd, bwd, fwd+bwd: "
        '`fastattn.attention(backend="cpu")`, which hands these shapes to SDPA\'s CPU kernel and backward op; '
        "tiled: fastattn's own path on the same shapes, the one that serves what SDPA cannot express "
        "(E != Ev, a causal mask together with a tensor mask, windows, softcaps, ALiBi, dropout).",
        "",
        head,
        rule,
    ]
    for dtype in ("float32", "bfloat16"):
        for L in sorted({r["L"] for r in rows if r["L"] == r["S"]}):
            group = [r for r in rows if r["dtype"] == dtype and r["L"] == L and r["S"] == L and r["Hq"] == r["Hkv"]]
            if group:
                lines.append(_geomean_row(f"{dtype} L = S = {L}", group))
        for label, pick in (
            ("GQA 16/4", lambda r: r["Hq"] != r["Hkv"]),
            ("decode L 1, S 32768", lambda r: r["L"] == 1),
        ):
            group = [r for r in rows if r["dtype"] == dtype and pick(r)]
            if group:
                lines.append(_geomean_row(f"{dtype} {label}", group))
    lines.append(_geomean_row("all", rows))
    if quiet and loaded:
        lines += [
            "",
            "With the cores shared (`--quick --load`: another process runs a matmul loop on every core; load "
            f"average {loaded['environment']['load_average'][0]:.1f} against {quiet['environment']['load_average'][0]:.1f} "
            f"quiet), the same quick shapes, measured {quiet['environment']['date']} on {quiet['environment']['cpu']}:",
            "",
            head,
            rule,
            _geomean_row("quiet", quiet["rows"]),
            _geomean_row("cores shared", loaded["rows"]),
        ]
        lines.append(_shared_over_quiet(quiet, loaded))
    if quiet and loaded and passive:
        quiet_p, loaded_p = passive
        lines += [
            "",
            "The same two runs with `OMP_WAIT_POLICY=PASSIVE` in the environment (OpenMP's idle threads sleep "
            "instead of spinning; load average "
            f"{loaded_p['environment']['load_average'][0]:.1f} against {quiet_p['environment']['load_average'][0]:.1f}, "
            f"measured {quiet_p['environment']['date']}):",
            "",
            head,
            rule,
            _geomean_row("quiet, passive", quiet_p["rows"]),
            _geomean_row("cores shared, passive", loaded_p["rows"]),
            _shared_over_quiet(quiet_p, loaded_p),
        ]
    return "\n".join(lines) + "\n"


LOAD = """
import torch
torch.set_num_threads({threads})
a = torch.randn(1024, 1024)
while True:
    a = torch.tanh(a @ a)
"""


@contextlib.contextmanager
def cores_shared(enabled: bool):
    """With `enabled`, another process keeps every core busy (a matmul loop) while the block runs."""
    if not enabled:
        yield
        return
    busy = subprocess.Popen([sys.executable, "-c", LOAD.format(threads=os.cpu_count())])
    try:
        yield
    finally:
        busy.kill()
        busy.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few shapes, short timings")
    parser.add_argument("--long", action="store_true", help="also L = S = 4096 (B*H = 16)")
    parser.add_argument("--load", action="store_true", help="with another process keeping every core busy")
    parser.add_argument("--name", help="results file name (default: cpu_training[_quick][_load])")
    parser.add_argument("--readme", type=Path, help="measure nothing: rewrite this file's cpu-ratios block from "
                        "the saved cpu_training, cpu_training_quick and cpu_training_quick_load results (and the "
                        "_passive quick pair where saved)")  # fmt: skip
    args = parser.parse_args()
    if args.readme:
        names = ("cpu_training", "cpu_training_quick", "cpu_training_quick_load")
        names += ("cpu_training_quick_passive", "cpu_training_quick_load_passive")
        saved = {n: RESULTS / f"{n}.json" for n in names}
        data = {n: json.loads(p.read_text()) if p.exists() else None for n, p in saved.items()}
        passive = data["cpu_training_quick_passive"], data["cpu_training_quick_load_passive"]
        section = readme_section(
            data["cpu_training"], data["cpu_training_quick"], data["cpu_training_quick_load"],
            passive if all(passive) else None,
        )  # fmt: skip
        args.readme.write_text(replace_section(args.readme.read_text(), section, README_BEGIN, README_END))
        return
    rounds, min_run_time = (3, 0.1) if args.quick else (4, 0.15)
    shapes = []
    lengths = (256, 1024)
    for dtype in (torch.float32, torch.bfloat16):
        for BH in (16,) if args.quick else (16, 64):
            for L in lengths:
                for E in (64,) if args.quick else (64, 128):
                    for causal in (False, True):
                        shapes.append((BH // 8, 8, 8, L, L, E, dtype, causal))
        if args.long:
            shapes += [(2, 8, 8, 4096, 4096, E, dtype, c) for E in (64, 128) for c in (False, True)]
        shapes.append((2, 16, 4, 1024, 1024, 64, dtype, True))  # GQA
        shapes.append((1, 8, 8, 1, 4096 if args.quick else 32768, 64, dtype, False))  # decode
    with cores_shared(args.load):
        rows = []
        for shape in shapes:
            rows.append(measure(*shape, rounds, 0.3 if shape[3] >= 4096 else min_run_time))
            print(rows[-1]["dtype"], shape[:6], " ".join(f"{t} {rows[-1][k]:.2f}" for k, t in COLUMNS), flush=True)
        env = dict(environment(), loaded=args.load)
    command = " ".join(["python benchmarks/cpu_training.py", *sys.argv[1:]])
    text = markdown(rows, env, command)
    print(text)
    name = args.name or "cpu_training" + "".join(f"_{f}" for f in ("quick", "load") if getattr(args, f))
    save_results(name, text, env, rows)


if __name__ == "__main__":
    main()

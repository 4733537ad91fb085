"""A sliding window's cost on the CPU path grows with L * window, not L * S.

Times ``fastattn.attention(..., window_size=(511, 0), backend="cpu")`` (the tiled path: SDPA's CPU
kernel cannot express a window) at L = S = 4096 and 16384, and full causal attention at 16384 for
comparison, forward and forward+backward. The calls are checked first (the window against the
reference on the last 256 query rows, which is all a float64 (L, S) matrix can afford here) and
then timed in interleaved rounds with ``torch.utils.benchmark`` (median over every run of every
round, so load drifting during the script hits all cases alike).

Full attention would take 16x longer at 4x the length; a window should take about 4x. The table
goes to stdout and to benchmarks/results/cpu/window_scaling.md, the raw numbers to a .json beside it.

    python benchmarks/window_scaling.py            # the table (a few minutes on 2 cores)
    python benchmarks/window_scaling.py --quick    # L = 1024 and 4096, short timings
"""

from __future__ import annotations

import argparse
import statistics

import torch
from cpu_fallback_ratio import environment, save_results, time_interleaved

import fastattn
from fastattn import reference

WINDOW = 512  # keys per query: window_size=(511, 0)


def _check(q, k, v) -> float:
    """Max error of the windowed call on the last 256 rows against the float64 reference."""
    rows = slice(q.shape[2] - 256, None)
    out = fastattn.attention(q, k, v, window_size=(WINDOW - 1, 0), backend="cpu")[:, :, rows]
    # The last rows of a bottom-right window only need the last keys: a small float64 problem.
    keys = slice(k.shape[2] - 256 - WINDOW, None)
    want = reference.attention(q[:, :, rows], k[:, :, keys], v[:, :, keys], window_size=(WINDOW - 1, 0), upcast=True)
    return (out.double() - want).abs().max().item()


def run(lengths: tuple[int, int], H: int, E: int, rounds: int, min_run_time: float) -> list[dict]:
    short, long = lengths
    inputs = {L: [torch.randn(1, H, L, E, requires_grad=True) for _ in range(3)] for L in lengths}
    dout = {L: torch.randn(1, H, L, E) for L in lengths}
    for L in lengths:
        err = _check(*(t.detach() for t in inputs[L]))
        assert err < 1e-4, f"window at L={L} differs from the reference by {err:.2e}"

    def forward(L, **kw):
        return lambda: fastattn.attention(*inputs[L], backend="cpu", **kw)

    def training(L, **kw):
        return lambda: torch.autograd.grad(fastattn.attention(*inputs[L], backend="cpu", **kw), inputs[L], dout[L])

    window = {"window_size": (WINDOW - 1, 0)}
    fns = {
        ("fwd", f"window L{short}"): forward(short, **window),
        ("fwd", f"window L{long}"): forward(long, **window),
        ("fwd", f"causal L{long}"): forward(long, is_causal=True),
        ("fwd+bwd", f"window L{short}"): training(short, **window),
        ("fwd+bwd", f"window L{long}"): training(long, **window),
        ("fwd+bwd", f"causal L{long}"): training(long, is_causal=True),
    }
    times = time_interleaved(fns, rounds, min_run_time)
    med = {key: statistics.median(ts) for key, ts in times.items()}
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        w_short, w_long, causal = (
            med[(mode, f"{n}")] for n in (f"window L{short}", f"window L{long}", f"causal L{long}")
        )
        rows.append(
            {
                "mode": mode, "H": H, "E": E, "window": WINDOW, "short_L": short, "long_L": long,
                "window_short_ms": w_short * 1e3, "window_long_ms": w_long * 1e3, "causal_long_ms": causal * 1e3,
                "window_ratio": w_long / w_short, "length_ratio": long / short,
                "causal_over_window": causal / w_long,
            }
        )  # fmt: skip
    return rows


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [
        f"# Sliding window on the CPU path: cost against length ({env['date']})",
        "",
        f"{env['cpu']}, {env['cores']} cores, {env['threads']} threads, load {env['load_average']}, "
        f"torch {env['torch']}, fastattn {env['fastattn']}. float32, B=1, window_size=({WINDOW - 1}, 0).",
        "",
        "| mode | H | E | window L1 ms | window L2 ms | L2/L1 time (L2/L1 length) | causal L2 ms | causal / window at L2 |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['H']} | {r['E']} | {r['window_short_ms']:.1f} (L={r['short_L']}) | "
            f"{r['window_long_ms']:.1f} (L={r['long_L']}) | {r['window_ratio']:.2f} ({r['length_ratio']:.0f}) | "
            f"{r['causal_long_ms']:.1f} | {r['causal_over_window']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="L = 1024 and 4096, one short round")
    args = parser.parse_args()
    lengths = (1024, 4096) if args.quick else (4096, 16384)
    rows = run(lengths, H=4, E=64, rounds=1 if args.quick else 3, min_run_time=0.2 if args.quick else 1.0)
    env = environment()
    text = markdown(env, rows)
    print(text)
    if not args.quick:
        save_results("window_scaling", text, env, rows)


if __name__ == "__main__":
    main()

"""The cost of dropout: fastattn.attention with dropout_p = 0.1 against dropout_p = 0, forward and
forward+backward, on the "cpu" backend (or "triton" with --device cuda).

Two baselines, because dropout changes which code runs: "p=0" is the call a user makes without
dropout (on CPU, SDPA's own kernel where it expresses the call), "p=0 tiled" is the same tiled
path the dropout call takes, with no dropout (the cost of the keep mask alone). SDPA's own dropout
(its CPU math path, which materialises the (L, S) weights and draws different masks) is timed
beside for reference. Times are medians over interleaved rounds (benchmarks/cpu_fallback_ratio.py's
time_interleaved); every call is checked first against the reference with the same draw.

    python benchmarks/dropout.py            # CPU: a few minutes on 2 cores
    python benchmarks/dropout.py --quick    # small shapes, short timings
    python benchmarks/dropout.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from cpu_fallback_ratio import environment, save_results, time_interleaved

import fastattn
from fastattn import reference
from fastattn.eager.forward import tiled_attention
from fastattn.problem import canonicalize

P = 0.1


def _fwd_bwd(fn, inputs, dout):
    def run():
        for t in inputs:
            t.grad = None
        fn().backward(dout)

    return run


def measure(B, H, L, E, dtype, causal, device, backend, rounds, min_run_time) -> list[dict]:
    q, k, v = (torch.randn(B, H, L, E, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, H, L, E, dtype=dtype, device=device)
    kw = dict(is_causal=causal, backend=backend)
    g = torch.Generator().manual_seed(0)

    # correctness first: the dropout call against the reference with the same draw
    with torch.no_grad():
        got = fastattn.attention(q, k, v, dropout_p=P, generator=torch.Generator().manual_seed(1), **kw)
        want = reference.attention(q, k, v, dropout_p=P, is_causal=causal, generator=torch.Generator().manual_seed(1))
        err = (got.float() - want.float()).abs().max().item()
        assert err < (1e-4 if dtype == torch.float32 else 2e-2), err

    fns = {
        "p=0": lambda: fastattn.attention(q, k, v, **kw),
        f"p={P}": lambda: fastattn.attention(q, k, v, dropout_p=P, generator=g, **kw),
        "sdpa p=0.1": lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=P, is_causal=causal),
    }
    if device == "cpu":
        p0 = canonicalize(q.detach(), k.detach(), v.detach(), is_causal=causal)
        fns["p=0 tiled"] = lambda: tiled_attention(p0)
    rows = []
    with torch.no_grad():
        fwd = time_interleaved(fns, rounds, min_run_time)
    grad_fns = {name: _fwd_bwd(fn, (q, k, v), dout) for name, fn in fns.items() if name != "p=0 tiled"}
    bwd = time_interleaved(grad_fns, rounds, min_run_time)
    for mode, times in (("fwd", fwd), ("fwd+bwd", bwd)):
        med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
        rows.append(
            dict(
                mode=mode, B=B, H=H, L=L, E=E, dtype=str(dtype).replace("torch.", ""), causal=causal,
                ms=med, overhead=med[f"p={P}"] / med["p=0"],
                overhead_tiled=med[f"p={P}"] / med["p=0 tiled"] if "p=0 tiled" in med else None,
            )
        )  # fmt: skip
    return rows


def markdown(env: dict, rows: list[dict], device: str) -> str:
    lines = [
        f"# The cost of dropout (p = {P}) on {'CPU' if device == 'cpu' else torch.cuda.get_device_name()}",
        "",
        "`python benchmarks/dropout.py`"
        + ("" if device == "cpu" else " --device cuda")
        + f": {env['date']}, {env['cpu']}, {env['cores']} cores, {env['threads']} threads, load average "
        f"{env['load_average']}, torch {env['torch']}, fastattn {env['fastattn']}.",
        "",
        "overhead: time with dropout / time without (p=0: the call without dropout, SDPA's kernel where it "
        "applies; p=0 tiled: the tiled path the dropout call runs, without the mask). SDPA p=0.1: "
        "torch's own dropout (different masks; its CPU math path).",
        "",
        "| mode | B | H | L | E | dtype | causal | p=0 ms | p=0 tiled ms | p=0.1 ms | SDPA p=0.1 ms | "
        "overhead vs p=0 | overhead vs tiled |",
        "|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ms = r["ms"]
        tiled = f"{ms['p=0 tiled']:.1f}" if "p=0 tiled" in ms else "-"
        ot = f"{r['overhead_tiled']:.2f}x" if r["overhead_tiled"] else "-"
        lines.append(
            f"| {r['mode']} | {r['B']} | {r['H']} | {r['L']} | {r['E']} | {r['dtype']} | {r['causal']} | "
            f"{ms['p=0']:.1f} | {tiled} | {ms[f'p={P}']:.1f} | {ms['sdpa p=0.1']:.1f} | {r['overhead']:.2f}x | {ot} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, one short round")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = args.device
    backend = "cpu" if device == "cpu" else "triton"
    rounds, min_run_time = (1, 0.2) if args.quick else (3, 1.0)
    if device == "cpu":
        shapes = [(2, 8, 512, 64, torch.float32, False), (2, 8, 512, 64, torch.float32, True)]
        if not args.quick:
            shapes += [(1, 8, 2048, 64, torch.float32, True), (2, 8, 1024, 64, torch.bfloat16, True)]
    else:
        shapes = [(4, 16, n, d, torch.bfloat16, c) for n in (1024, 4096) for d in (64, 128) for c in (False, True)]
    rows = []
    for B, H, L, E, dtype, causal in shapes:
        rows += measure(B, H, L, E, dtype, causal, device, backend, rounds, min_run_time)
    env = environment()
    text = markdown(env, rows, device)
    print(text)
    if not args.quick:
        save_results("dropout", text, env, rows, device)


if __name__ == "__main__":
    main()

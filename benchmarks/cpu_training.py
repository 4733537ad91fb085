"""CPU training: fastattn's "cpu" backend against SDPA, forward, backward and forward+backward.

For each shape SDPA's CPU kernel expresses (fp32 and bf16, B*H in {16, 64}, L = S in {256, 1024}
(and 4096 with --long), head dim 64/128, causal and not, GQA 4:1, decode L = 1 against S = 32768),
three calls are timed in interleaved rounds (benchmarks/cpu_fallback_ratio.py's time_interleaved):
SDPA, fastattn.attention(backend="cpu") (its backward is SDPA's CPU backward op where SDPA's kernel
served the forward: fastattn.eager.backward.sdpa_backward_reasons), and fastattn's own tiled
backward (fastattn.eager.backward.tiled_attention_backward, what the "cpu" backward ran before).
The backward is timed alone by backward(retain_graph=True) on one forward's graph. Gradients are
checked against SDPA's first. Ratios are time / SDPA's time (< 1: faster than SDPA); the load
average is printed with the table.

    python benchmarks/cpu_training.py           # ~10 minutes on 2 cores
    python benchmarks/cpu_training.py --quick   # a few shapes, short timings
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from cpu_fallback_ratio import environment, save_results, time_interleaved

import fastattn
from fastattn.eager.backward import sdpa_backward_reasons, tiled_attention_backward
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
    with torch.no_grad():
        out, lse = fastattn.attention(q, k, v, is_causal=causal, enable_gqa=gqa, backend="cpu", return_lse=True)

    def tiled_backward():
        return tiled_attention_backward(p, out, lse, dout)

    # correctness first: fastattn's gradients (both backwards) against SDPA's
    expected = torch.autograd.grad(sdpa(), inputs, dout)
    got = torch.autograd.grad(ours(), inputs, dout)
    tiled = tiled_backward()[:3]
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
        fwd = time_interleaved({"sdpa": sdpa, "cpu": ours}, rounds, min_run_time)
    bwd = time_interleaved(
        {"sdpa": backward_of(sdpa), "cpu": backward_of(ours), "tiled": tiled_backward}, rounds, min_run_time
    )
    both = time_interleaved({"sdpa": fwd_bwd(sdpa), "cpu": fwd_bwd(ours)}, rounds, min_run_time)
    med = lambda times: {n: statistics.median(ts) * 1e3 for n, ts in times.items()}  # noqa: E731
    fwd, bwd, both = med(fwd), med(bwd), med(both)
    return dict(
        B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=E, dtype=str(dtype).replace("torch.", ""), causal=causal,
        fwd_ms=fwd, bwd_ms=bwd, fwd_bwd_ms=both,
        fwd_ratio=fwd["cpu"] / fwd["sdpa"], bwd_ratio=bwd["cpu"] / bwd["sdpa"],
        tiled_bwd_ratio=bwd["tiled"] / bwd["sdpa"],
        fwd_bwd_ratio=both["cpu"] / both["sdpa"],
        # before: the forward as now (SDPA's kernel) plus the tiled backward
        fwd_bwd_before_ratio=(fwd["cpu"] + bwd["tiled"]) / both["sdpa"],
    )  # fmt: skip


def markdown(rows: list[dict], env: dict) -> str:
    gm = lambda key: statistics.geometric_mean(r[key] for r in rows)  # noqa: E731
    lines = [
        '# CPU training: fastattn\'s "cpu" backend against SDPA',
        "",
        f"`python benchmarks/cpu_training.py`: {env['date']}, {env['cpu']}, {env['cores']} cores, "
        f"{env['threads']} threads, load average {env['load_average']}, torch {env['torch']}, "
        f"fastattn {env['fastattn']}.",
        "",
        "Ratios are fastattn's time / SDPA's (< 1: faster). bwd: the backward alone (SDPA's CPU backward op, "
        "which fastattn now calls); tiled bwd: fastattn's own tiled backward (what it ran before); fwd+bwd "
        "before: today's forward plus the tiled backward, against SDPA's forward+backward.",
        "",
        "| dtype | B | Hq/Hkv | L | S | E | causal | fwd | bwd | tiled bwd | fwd+bwd | fwd+bwd before | "
        "SDPA fwd+bwd ms |",
        "|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['B']} | {r['Hq']}/{r['Hkv']} | {r['L']} | {r['S']} | {r['E']} | {r['causal']} | "
            f"{r['fwd_ratio']:.2f} | {r['bwd_ratio']:.2f} | {r['tiled_bwd_ratio']:.2f} | {r['fwd_bwd_ratio']:.2f} | "
            f"{r['fwd_bwd_before_ratio']:.2f} | {r['fwd_bwd_ms']['sdpa']:.1f} |"
        )
    lines += [
        "",
        f"Geometric means: fwd {gm('fwd_ratio'):.2f}, bwd {gm('bwd_ratio'):.2f} (tiled {gm('tiled_bwd_ratio'):.2f}), "
        f"fwd+bwd {gm('fwd_bwd_ratio'):.2f} (before {gm('fwd_bwd_before_ratio'):.2f}).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few shapes, short timings")
    parser.add_argument("--long", action="store_true", help="also L = S = 4096")
    args = parser.parse_args()
    rounds, min_run_time = (1, 0.1) if args.quick else (2, 0.3)
    shapes = []
    lengths = (256,) if args.quick else (256, 1024) + ((4096,) if args.long else ())
    for dtype in (torch.float32, torch.bfloat16):
        for BH in (16,) if args.quick else (16, 64):
            for L in lengths:
                for E in (64,) if args.quick else (64, 128):
                    for causal in (False, True):
                        shapes.append((BH // 8, 8, 8, L, L, E, dtype, causal))
        shapes.append((2, 16, 4, 256 if args.quick else 1024, 256 if args.quick else 1024, 64, dtype, True))  # GQA
        shapes.append((1, 8, 8, 1, 4096 if args.quick else 32768, 64, dtype, False))  # decode
    rows = [measure(*s, rounds, min_run_time) for s in shapes]
    env = environment()
    text = markdown(rows, env)
    print(text)
    if not args.quick:
        save_results("cpu_training", text, env, rows)


if __name__ == "__main__":
    main()

"""Per-call host overhead: fastattn.attention against SDPA on a problem too small to cost anything.

A decode loop calls attention thousands of times, so what Python does around the kernel matters.
Times, interleaved over rounds (median of every run), one CPU call of (1, 1, 1, 8) queries against
4 keys: SDPA, fastattn.attention (auto and "cpu") with inputs that need no gradient and with inputs
that require grad (the custom op and autograd), and the host side of the CUDA path without a GPU:
checks, dispatch and the Triton forward's launch plan for sm_90 (everything before the launch).

    python benchmarks/call_overhead.py
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from cpu_fallback_ratio import environment, time_interleaved

import fastattn
from fastattn import dispatch
from fastattn.fused import plumbing as pl
from fastattn.fused.forward import plan_forward
from fastattn.problem import canonicalize


def main() -> None:
    torch.set_num_threads(1)
    q, k, v = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

    def cuda_host_side():
        p = canonicalize(q, k, v)
        dispatch.unsupported_reasons("cpu", p)
        out = torch.empty(1, 1, 1, 8)
        lse = torch.empty(1, 1, 1)
        return plan_forward(p, out, lse, target=pl.Target((9, 0)))

    fns = {
        "SDPA": lambda: F.scaled_dot_product_attention(q, k, v),
        "fastattn auto": lambda: fastattn.attention(q, k, v),
        'fastattn "cpu"': lambda: fastattn.attention(q, k, v, backend="cpu"),
        "SDPA, inputs require grad": lambda: F.scaled_dot_product_attention(qg, kg, vg),
        "fastattn auto, inputs require grad": lambda: fastattn.attention(qg, kg, vg),
        "CUDA path host side (checks, dispatch, sm_90 launch plan)": cuda_host_side,
    }
    times = time_interleaved(fns, rounds=5, min_run_time=0.3)
    sdpa = statistics.median(times["SDPA"])
    sdpa_grad = statistics.median(times["SDPA, inputs require grad"])
    env = environment()
    print(f"{env['cpu']}, 1 thread, load {env['load_average']}, torch {env['torch']}, fastattn {env['fastattn']}")
    print("| call | median µs | x SDPA |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        base = sdpa_grad if "require grad" in name else sdpa
        print(f"| {name} | {statistics.median(ts) * 1e6:.1f} | {statistics.median(ts) / base:.1f} |")


if __name__ == "__main__":
    main()

"""Packed prefill and KV-cache decoding: fastattn.varlen_attention against SDPA on padded batches.

Prefill: a packed batch of causal sequences with lengths drawn from a realistic mix, against SDPA
on the same batch padded to the longest length with a (causal & key padding) bool mask, forward and
forward+backward. Decode: one query per sequence against a KV cache (Llama-style GQA heads), the
cache contiguous (seqused_k) and paged (block_table, pages in a random order), against SDPA on the
(N, Hq, 1, S) padded batch; the K/V bytes each call must read, divided by its time, against this
machine's copy bandwidth (torch's clone of a 1 GiB tensor, read + write counted).

Every call is checked against the per-sequence oracle first. Times are medians over interleaved
rounds (so load drifting during the script hits all cases alike). The table goes to stdout and,
without --quick, to benchmarks/results/<device>/varlen.md with the raw numbers in a .json beside it.

    python benchmarks/varlen.py                 # CPU: a few minutes on 2 cores
    python benchmarks/varlen.py --quick         # smaller shapes, short timings
    python benchmarks/varlen.py --device cuda   # on a GPU (CUDA-event timing)
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
import torch.nn.functional as F
from cpu_fallback_ratio import environment, save_results, time_interleaved

import fastattn


def _cu(lengths, device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _padded(x: torch.Tensor, cu: torch.Tensor, longest: int) -> torch.Tensor:
    """(N, H, longest, D) zero-padded batch of the packed (T, H, D) rows."""
    N = cu.numel() - 1
    out = x.new_zeros(N, x.shape[1], longest, x.shape[2])
    for n in range(N):
        a, b = int(cu[n]), int(cu[n + 1])
        out[n, :, : b - a] = x[a:b].transpose(0, 1)
    return out


def copy_bandwidth(device: str) -> float:
    """Bytes per second torch moves cloning a 1 GiB tensor (read + write), best of 5."""
    x = torch.empty(1 << 28, dtype=torch.float32, device=device)
    best = math.inf
    for _ in range(5):
        times = time_interleaved({"clone": lambda: x.clone()}, 1, 0.2)
        best = min(best, statistics.median(times["clone"]))
    return 2 * x.numel() * 4 / best


def prefill(lengths: list[int], H: int, E: int, dtype, device, rounds: int, min_run_time: float) -> list[dict]:
    cu = _cu(lengths, device)
    T, longest = sum(lengths), max(lengths)
    q, k, v = (torch.randn(T, H, E, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
    dout = torch.randn(T, H, E, dtype=dtype, device=device)
    qp, kp, vp = (_padded(t.detach(), cu, longest).requires_grad_() for t in (q, k, v))
    lens = torch.tensor(lengths, device=device)
    pos = torch.arange(longest, device=device)
    keep = (pos[None, :] < lens[:, None])[:, None, None, :] & (pos[None, :, None] >= pos[None, None, :])[:, None]
    doutp = _padded(dout, cu, longest)

    def ours():
        return fastattn.varlen_attention(q, k, v, cu, cu, longest, longest, window_size=(-1, 0))

    def sdpa():
        return F.scaled_dot_product_attention(qp, kp, vp, attn_mask=keep)

    # correctness first: every sequence's rows against SDPA's on the padded batch
    with torch.no_grad():
        got, want = ours(), sdpa()
        for n, L in enumerate(lengths):
            err = (got[int(cu[n]) : int(cu[n + 1])].transpose(0, 1).float() - want[n, :, :L].float()).abs().max()
            assert err < (1e-4 if dtype == torch.float32 else 3e-2), f"prefill sequence {n} differs by {err:.2e}"
    fns = {
        ("fwd", "fastattn varlen"): ours,
        ("fwd", "SDPA padded+mask"): sdpa,
        ("fwd+bwd", "fastattn varlen"): lambda: torch.autograd.grad(ours(), (q, k, v), dout),
        ("fwd+bwd", "SDPA padded+mask"): lambda: torch.autograd.grad(sdpa(), (qp, kp, vp), doutp),
    }
    times = time_interleaved(fns, rounds, min_run_time)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        a, b = (statistics.median(times[(mode, n)]) for n in ("fastattn varlen", "SDPA padded+mask"))
        rows.append(
            {"kind": "prefill", "mode": mode, "N": len(lengths), "T": T, "max_len": longest, "H": H, "E": E,
             "dtype": str(dtype)[6:], "fastattn_ms": a * 1e3, "sdpa_ms": b * 1e3, "speedup": b / a}
        )  # fmt: skip
    return rows


def decode(N: int, S: int, Hq: int, Hkv: int, E: int, page: int, dtype, device, rounds: int, min_run_time: float,
           bandwidth: float) -> list[dict]:  # fmt: skip
    q = torch.randn(N, Hq, E, dtype=dtype, device=device)
    k = torch.randn(N * S, Hkv, E, dtype=dtype, device=device)
    v = torch.randn(N * S, Hkv, E, dtype=dtype, device=device)
    cu_q = _cu([1] * N, device)
    cu_k = _cu([S] * N, device)
    used = torch.full((N,), S, dtype=torch.int32, device=device)
    pages = S // page
    table = torch.randperm(N * pages, device=device).reshape(N, pages).int()
    pool_k = torch.empty(N * pages, page, Hkv, E, dtype=dtype, device=device)
    pool_v = torch.empty_like(pool_k)
    pool_k[table.reshape(-1).long()] = k.view(N * pages, page, Hkv, E)
    pool_v[table.reshape(-1).long()] = v.view(N * pages, page, Hkv, E)
    qd = q[:, :, None]  # (N, Hq, 1, E)
    kd, vd = (t.view(N, S, Hkv, E).transpose(1, 2) for t in (k, v))

    def contiguous():
        return fastattn.varlen_attention(q, k, v, cu_q, cu_k, 1, S, enable_gqa=True, seqused_k=used)

    def paged():
        return fastattn.varlen_attention(q, pool_k, pool_v, cu_q, None, 1, S, enable_gqa=True, seqused_k=used,
                                         block_table=table)  # fmt: skip

    def sdpa():
        return F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True)

    want = sdpa()[:, :, 0].float()
    for fn in (contiguous, paged):
        err = (fn().float() - want).abs().max().item()
        assert err < 1e-2, f"decode ({fn.__name__}) differs from SDPA by {err:.2e}"
    times = time_interleaved({"contiguous": contiguous, "paged": paged, "sdpa": sdpa}, rounds, min_run_time)
    med = {n: statistics.median(t) for n, t in times.items()}
    kv_bytes = 2 * N * S * Hkv * E * k.element_size()
    return [
        {"kind": "decode", "N": N, "S": S, "Hq": Hq, "Hkv": Hkv, "E": E, "page": page, "dtype": str(dtype)[6:],
         "contiguous_ms": med["contiguous"] * 1e3, "paged_ms": med["paged"] * 1e3, "sdpa_ms": med["sdpa"] * 1e3,
         "ratio_contiguous": med["sdpa"] / med["contiguous"], "ratio_paged": med["sdpa"] / med["paged"],
         "gbs_contiguous": kv_bytes / med["contiguous"] / 1e9, "gbs_paged": kv_bytes / med["paged"] / 1e9,
         "gbs_sdpa": kv_bytes / med["sdpa"] / 1e9, "copy_gbs": bandwidth / 1e9}
    ]  # fmt: skip


def markdown(env: dict, rows: list[dict], device: str) -> str:
    pre = [r for r in rows if r["kind"] == "prefill"]
    dec = [r for r in rows if r["kind"] == "decode"]
    lines = [
        f"# varlen_attention against SDPA on padded batches, {device} ({env['date']})",
        "",
        f"{env['cpu']}, {env['cores']} cores, {env['threads']} threads, load {env['load_average']}, "
        f"torch {env['torch']}, fastattn {env['fastattn']}. Ratios are SDPA's time / fastattn's (> 1: fastattn faster).",
        "",
        "## Packed prefill (causal), against SDPA on the padded batch with a causal & padding mask",
        "",
        "| mode | N | T (packed rows) | max len | H | E | dtype | fastattn ms | SDPA ms | ratio |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in pre:
        lines.append(
            f"| {r['mode']} | {r['N']} | {r['T']} | {r['max_len']} | {r['H']} | {r['E']} | {r['dtype']} | "
            f"{r['fastattn_ms']:.1f} | {r['sdpa_ms']:.1f} | {r['speedup']:.2f} |"
        )
    lines += [
        "",
        "## Decode (one query per sequence), against SDPA on (N, Hq, 1, S)",
        "",
        f"K/V GB/s: bytes of K and V read / time; this machine's copy bandwidth: {dec[0]['copy_gbs']:.1f} GB/s."
        if dec
        else "",
        "",
        "| N | S | Hq/Hkv | E | page | contiguous ms | paged ms | SDPA ms | ratio contiguous | ratio paged | "
        "GB/s contiguous | GB/s paged | GB/s SDPA |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in dec:
        lines.append(
            f"| {r['N']} | {r['S']} | {r['Hq']}/{r['Hkv']} | {r['E']} | {r['page']} | {r['contiguous_ms']:.2f} | "
            f"{r['paged_ms']:.2f} | {r['sdpa_ms']:.2f} | {r['ratio_contiguous']:.2f} | {r['ratio_paged']:.2f} | "
            f"{r['gbs_contiguous']:.1f} | {r['gbs_paged']:.1f} | {r['gbs_sdpa']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes, one short round")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device, dtype = args.device, torch.float32 if args.device == "cpu" else torch.bfloat16
    rounds, min_run_time = (1, 0.2) if args.quick else (3, 1.0)
    gen = torch.Generator().manual_seed(0)
    if device == "cpu":
        mixes = [torch.randint(64, 1025, (8,), generator=gen).tolist()]
        if not args.quick:
            mixes.append(torch.randint(64, 2049, (8,), generator=gen).tolist())
        decodes = [(1, 4096), (8, 4096), (8, 16384)] if not args.quick else [(1, 2048), (4, 4096)]
    else:
        mixes = [torch.randint(64, 4097, (32,), generator=gen).tolist()]
        decodes = [(n, s) for n in (1, 16, 64) for s in (1024, 16384, 131072) if n * s <= 64 * 32768]
    rows = []
    for lengths in mixes:
        rows += prefill(lengths, H=8, E=64, dtype=dtype, device=device, rounds=rounds, min_run_time=min_run_time)
    bandwidth = copy_bandwidth(device)
    for N, S in decodes:
        rows += decode(N, S, 32, 8, 128, 64, dtype, device, rounds, min_run_time, bandwidth)
    env = environment()
    text = markdown(env, rows, device)
    print(text)
    if not args.quick:
        save_results("varlen", text, env, rows, device)


if __name__ == "__main__":
    main()

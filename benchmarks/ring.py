"""Ring attention over gloo (fastattn.distributed.ring_attention) against the single-process call.

W processes (torch.multiprocessing.spawn, gloo on 127.0.0.1, torch.set_num_threads(max(1,
cpu_count // W)) in each) run fastattn.distributed.ring_attention on their shards of one causal
(B, H, N, D) problem in the zigzag layout, for W in --world, N in --lengths and each dtype; the
baseline is fastattn.attention on the full tensors, run in the parent process before the workers
start, with the same total thread count (W * the workers' threads). Both are timed forward and
forward+backward with time.perf_counter: one warm-up forward+backward, then the median of --repeats
calls (each worker times its own calls, after a dist.barrier(); the ring's time is the slowest
rank's median).

From fastattn.distributed.trace() (the repeats' medians): the seconds each rank spent in attention
and waiting for transfers, and the bytes it sent and received. "comm alone" is the same sequence
of point-to-point exchanges (batch_isend_irecv of tensors of the same shapes and dtypes: W - 1 K/V
shards forward; backward W - 1 K/V shards and W float32 dK/dV accumulators, in the ring's order)
run with no attention, after the ring runs; overlap = 1 - wait / comm alone (per rank, averaged;
wait also counts waiting for a slower neighbour, so overlap can be negative). The bytes each rank
received are set against the least any ring can move, (W - 1) / W of the full K and V, plus, in
the backward, the W float32 dK/dV shard accumulators every rank receives. Every rank's output and
gradients are checked against an oracle, the single-process call in float32 on the same inputs:
a float32 ring within FP32_TOLERANCE of it, a bfloat16 one by the error-ratio rule against the
bfloat16 single-process call's error.

    python benchmarks/ring.py           # N = 16384, 32768, H = 2: 6-11 minutes on 2 cores (estimated)
    python benchmarks/ring.py --quick   # N = 4096, 8192, H = 4: 1-2 minutes on 2 cores

The table goes to stdout and to benchmarks/results/cpu/ring.md (ring_quick.md with --quick; the
raw numbers to ring.json beside ring.md without --quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from cpu_fallback_ratio import DTYPES, environment

import fastattn

RESULTS = Path(__file__).resolve().parent / "results" / "cpu"
# The errors are relative, max|x - oracle| / max|oracle|, against the oracle: the single-process
# call in float32 on the same (rounded) inputs. A float32 ring may differ from it by FP32_TOLERANCE;
# a 16-bit ring must pass the error-ratio rule, ring error <= RATIO * the 16-bit single-process
# call's + FLOOR (half a bfloat16 ulp at 1).
FP32_TOLERANCE = 1e-4
RATIO, FLOOR = 3.0, 2.0**-9
MODES = ("fwd", "fwd+bwd")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _threads(world: int) -> int:
    return max(1, (os.cpu_count() or 1) // world)


def _full_tensors(cfg: dict, N: int, dtype: torch.dtype):
    """The full q, k, v, dout of one problem: the same on every process (seeded)."""
    gen = torch.Generator().manual_seed(N)
    B, Hq, Hkv, D = cfg["B"], cfg["Hq"], cfg["Hkv"], cfg["D"]
    shapes = [(B, Hq, N, D), (B, Hkv, N, D), (B, Hkv, N, D), (B, Hq, N, D)]
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


def _kwargs(cfg: dict) -> dict:
    return dict(is_causal=cfg["causal"], enable_gqa=cfg["Hq"] != cfg["Hkv"])


def _time_calls(fns: dict, repeats: int, barrier=None, tracing=None) -> dict:
    """Per call: the list of times (s) and, with `tracing`, the list of each call's step traces."""
    out = {}
    for name, fn in fns.items():
        times, traces = [], []
        for _ in range(repeats):
            if barrier is not None:
                barrier()
            if tracing is None:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            else:
                with tracing() as steps:
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
                traces.append([dataclasses.asdict(s) for s in steps])
        out[name] = {"times": times, "traces": traces}
    return out


# The single-process baseline (in the parent).


def _results(out, q, k, v) -> dict:
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def baseline(cfg: dict, N: int, dtype: torch.dtype, threads: int, repeats: int, reference: Path) -> tuple[dict, dict]:
    """({mode: median seconds}, {result: relative error against the oracle}) of the single-process
    call; the oracle (float32) is written to `reference` the first time."""
    torch.set_num_threads(threads)
    q, k, v, dout = _full_tensors(cfg, N, dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    kw = _kwargs(cfg)

    def fwd():
        with torch.no_grad():
            return fastattn.attention(q, k, v, **kw)

    def fwd_bwd():
        for t in (q, k, v):
            t.grad = None
        out = fastattn.attention(q, k, v, **kw)
        out.backward(dout)
        return out

    single = _results(fwd_bwd(), q, k, v)  # also the warm-up
    if not reference.exists():
        if dtype == torch.float32:
            oracle = single
        else:
            q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
            out32 = fastattn.attention(q32, k32, v32, **kw)
            out32.backward(dout.float())
            oracle = _results(out32, q32, k32, v32)
        torch.save(oracle, reference)
    oracle = torch.load(reference)
    errors = {name: _rel_err(single[name], oracle[name]) for name in single}
    timed = _time_calls({"fwd": fwd, "fwd+bwd": fwd_bwd}, repeats)
    return {mode: statistics.median(timed[mode]["times"]) for mode in MODES}, errors


# One worker of the ring.


def _exchange(dist, send, recv, nxt, prv, tag):
    ops = [dist.P2POp(dist.isend, t, nxt, tag=tag + i) for i, t in enumerate(send)]
    ops += [dist.P2POp(dist.irecv, t, prv, tag=tag + i) for i, t in enumerate(recv)]
    return dist.batch_isend_irecv(ops)


def _comm_alone(dist, rank: int, world: int, k, v, repeats: int) -> dict:
    """Seconds (medians) of the ring's exchanges with no attention between them: the forward's
    W - 1 K/V exchanges, and the backward's W - 1 K/V and W float32 dK/dV exchanges, in the order
    ring_backward starts and waits for them."""
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    kv = [k.detach().contiguous(), v.detach().contiguous()]
    grads = [torch.zeros(t.shape, dtype=torch.float32) for t in kv]

    def forward():
        tag = 0
        for _ in range(world - 1):
            recv = [torch.empty_like(t) for t in kv]
            for r in _exchange(dist, kv, recv, nxt, prv, tag):
                r.wait()
            tag += 2

    def backward():
        tag, pending = 0, None
        for step in range(world):
            kv_reqs = None
            if step < world - 1:
                kv_reqs = _exchange(dist, kv, [torch.empty_like(t) for t in kv], nxt, prv, tag)
                tag += 2
            send = grads
            if pending is not None:
                for r in pending[0]:
                    r.wait()
                send = pending[1]
            recv = [torch.empty_like(t) for t in grads]
            pending = (_exchange(dist, send, recv, nxt, prv, tag), recv)
            tag += 2
            if kv_reqs is not None:
                for r in kv_reqs:
                    r.wait()
        for r in pending[0]:
            r.wait()

    timed = _time_calls({"forward": forward, "backward": backward}, repeats, barrier=dist.barrier)
    return {name: statistics.median(t["times"]) for name, t in timed.items()}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def _ring_case(rank: int, world: int, cfg: dict, N: int, dtype_name: str, tmp: str) -> dict:
    import torch.distributed as dist

    from fastattn import distributed as fd

    layout, kw, repeats = cfg["layout"], _kwargs(cfg), cfg["repeats"]
    full = _full_tensors(cfg, N, DTYPES[dtype_name])
    q, k, v, dout = (fd.shard(t, 2, layout).contiguous() for t in full)
    del full
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def fwd():
        with torch.no_grad():
            return fd.ring_attention(q, k, v, layout=layout, **kw)

    def fwd_bwd():
        for t in (q, k, v):
            t.grad = None
        out = fd.ring_attention(q, k, v, layout=layout, **kw)
        out.backward(dout)
        return out

    out = fwd_bwd()  # warm-up
    ref = torch.load(Path(tmp) / f"ref_{N}_{dtype_name}.pt", mmap=True)
    errors = {
        name: _rel_err(got, fd.shard(ref[name], 2, layout))
        for name, got in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad))
    }
    del ref
    timed = _time_calls({"fwd": fwd, "fwd+bwd": fwd_bwd}, repeats, dist.barrier, fd.trace)
    comm = _comm_alone(dist, rank, world, k, v, repeats)
    return {"N": N, "dtype": dtype_name, "rank": rank, "errors": errors, "timed": timed, "comm_alone": comm,
            "kv_shard_bytes": sum(t.numel() * t.element_size() for t in (k, v)),
            "grad_shard_bytes": sum(t.numel() * 4 for t in (k, v))}  # fmt: skip


def worker(rank: int, world: int, port: int, cfg: dict, tmp: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(_threads(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = []
    try:
        for N in cfg["lengths"]:
            for dtype_name in cfg["dtypes"]:
                results.append(_ring_case(rank, world, cfg, N, dtype_name, tmp))
    finally:
        (Path(tmp) / f"W{world}_rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


# Summary.


def _per_rank(traces: list[list[dict]], direction: str | None, key: str) -> float:
    """Median over repeats of a trace field summed over one call's steps (of `direction`, or all)."""
    sums = [sum(s[key] for s in steps if direction in (None, s["direction"])) for steps in traces]
    return statistics.median(sums)


def summarize(world: int, ranks: list[dict], baseline: tuple[dict, dict], cfg: dict) -> tuple[list[dict], list[dict]]:
    single, single_errors = baseline
    N, dtype = ranks[0]["N"], ranks[0]["dtype"]
    B, Hkv, D = cfg["B"], cfg["Hkv"], cfg["D"]
    elem = DTYPES[dtype].itemsize
    kv_full = 2 * B * Hkv * N * D * elem  # |K| + |V|
    timing, traffic = [], []
    for mode in MODES:
        times = [statistics.median(r["timed"][mode]["times"]) for r in ranks]
        compute = [_per_rank(r["timed"][mode]["traces"], None, "compute_s") for r in ranks]
        wait = [_per_rank(r["timed"][mode]["traces"], None, "wait_s") for r in ranks]
        comm = [r["comm_alone"]["forward"] + (r["comm_alone"]["backward"] if mode == "fwd+bwd" else 0.0) for r in ranks]
        ring = max(times)
        timing.append(
            {"W": world, "N": N, "dtype": dtype, "mode": mode, "ring_s": ring, "single_s": single[mode],
             "ratio": ring / single[mode],
             "compute_share": statistics.mean(c / t for c, t in zip(compute, times)),
             "compute_s": compute, "wait_s": wait, "comm_alone_s": comm,
             "overlap": statistics.mean(1 - w / c for w, c in zip(wait, comm)),
             "errors": {name: max(r["errors"][name] for r in ranks) for name in ranks[0]["errors"]},
             "single_errors": single_errors}
        )  # fmt: skip
    for direction in ("forward", "backward"):
        traces = [r["timed"]["fwd+bwd"]["traces"] for r in ranks]
        received = [_per_rank(t, direction, "bytes_received") for t in traces]
        sent = [_per_rank(t, direction, "bytes_sent") for t in traces]
        kv_bound = (world - 1) / world * kv_full
        grads = world * ranks[0]["grad_shard_bytes"] if direction == "backward" else 0
        traffic.append(
            {"W": world, "N": N, "dtype": dtype, "direction": direction, "received": received, "sent": sent,
             "kv_bound": kv_bound, "grads_expected": grads, "expected": kv_bound + grads}
        )  # fmt: skip
    return timing, traffic


def _mb(x: float) -> str:
    return f"{x / 2**20:.1f}"


def _span(xs, fmt) -> str:
    lo, hi = min(xs), max(xs)
    return fmt(lo) if fmt(lo) == fmt(hi) else f"{fmt(lo)}–{fmt(hi)}"


def markdown(env: dict, cfg: dict, timing: list[dict], traffic: list[dict], wall_s: float, load_end) -> str:
    worlds = sorted({r["W"] for r in timing})
    threads = ", ".join(f"W={w}: {_threads(w)} per worker, {w * _threads(w)} in all" for w in worlds)
    over = [w for w in worlds if w * _threads(w) > (env["cores"] or 1)]
    command = "python benchmarks/ring.py" + (" --quick" if cfg["quick"] else "")
    lines = [
        "# Ring attention over gloo against the single-process call, cpu",
        "",
        f"`{command}`: {env['date']}, {env['cpu']}, {env['cores']} cores, torch {env['torch']}, "
        f"fastattn {env['fastattn']}, load average {tuple(round(x, 2) for x in env['load_average'])} at the "
        f"start, {tuple(round(x, 2) for x in load_end)} at the end; this run took {wall_s:.0f} s.",
        "",
        *(
            [
                "The 1-minute load average exceeded the core count during this run: other processes shared the "
                "cores, so the times and waits below are noisy (compare rows with care).",
                "",
            ]
            if max(env["load_average"][0], load_end[0]) > (env["cores"] or 1)
            else []
        ),
        f"Problem: B={cfg['B']}, Hq={cfg['Hq']}, Hkv={cfg['Hkv']}, D={cfg['D']}, causal={cfg['causal']}, "
        f"layout={cfg['layout']!r}, backend 'auto' (the CPU path). {cfg['note']}",
        "",
        f"Threads: {threads}."
        + (
            f" W={', '.join(map(str, over))} OVERSUBSCRIBES this machine's {env['cores']} cores (more threads than "
            "cores, in the workers and in the baseline alike)."
            if over
            else ""
        ),  # fmt: skip
        "",
        "The ring: W processes spawned by torch.multiprocessing.spawn, gloo over 127.0.0.1, each timing its "
        "own calls after a dist.barrier() (one warm-up forward+backward, then the median of "
        f"{cfg['repeats']}); ring = the slowest rank's median. Single: fastattn.attention on the full "
        "tensors in the parent process, before the workers start, with torch.set_num_threads(the workers' "
        "threads in all); the same warm-up and repeats. ratio = ring / single (< 1: the ring is faster).",
        "",
        "compute share: the rank's attention seconds (trace compute_s) / its time, averaged over ranks; wait: "
        "the seconds it waited for transfers after its attention (trace wait_s, min–max over ranks); comm "
        "alone: the same exchanges with no attention; overlap = 1 - wait / comm alone, averaged over ranks "
        "(wait includes waiting for a slower neighbour, so it can go below 0). err: the ring's largest "
        "max|x - oracle| / max|oracle| over ranks (fwd: out; fwd+bwd: out, dQ, dK, dV), the oracle being the "
        "single-process call in float32 on the same inputs; single err: the same for the single-process call "
        "in the row's dtype (0 for float32, which is the oracle).",
        "",
        "| W | N | dtype | call | ring ms | single ms | ratio | compute share | wait ms | comm alone ms | "
        "overlap | err | single err |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ms = lambda x: f"{x * 1e3:.1f}"  # noqa: E731
    for r in timing:
        names = list(r["errors"]) if r["mode"] == "fwd+bwd" else ["out"]
        err = max(r["errors"][n] for n in names)
        single_err = max(r["single_errors"][n] for n in names)
        lines.append(
            f"| {r['W']} | {r['N']} | {r['dtype']} | {r['mode']} | {ms(r['ring_s'])} | {ms(r['single_s'])} | "
            f"{r['ratio']:.2f} | {r['compute_share']:.2f} | {_span(r['wait_s'], ms)} | "
            f"{_span(r['comm_alone_s'], ms)} | {r['overlap']:.2f} | {err:.1e} | {single_err:.1e} |"
        )
    lines += [
        "",
        "## Bytes per rank per call (from trace(), in a forward+backward call)",
        "",
        "K/V bound: (W - 1) / W * (|K| + |V|) of the full K and V, in the input dtype, the least a ring "
        "moves to each rank; dK/dV: the float32 accumulators of a K/V shard, W of which reach every rank in "
        "the backward (W * |dK_shard + dV_shard|, the last one being its own, home). expected = the two "
        "summed; received / expected = 1 when the trace counts exactly that.",
        "",
        "| W | N | dtype | direction | received MiB | sent MiB | K/V bound MiB | dK/dV fp32 MiB | expected MiB | "
        "received / expected |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in traffic:
        ratio = [x / r["expected"] for x in r["received"]]
        lines.append(
            f"| {r['W']} | {r['N']} | {r['dtype']} | {r['direction']} | {_span(r['received'], _mb)} | "
            f"{_span(r['sent'], _mb)} | {_mb(r['kv_bound'])} | {_mb(r['grads_expected'])} | {_mb(r['expected'])} | "
            f"{_span(ratio, lambda x: f'{x:.3f}')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 4096, 8192 (unless --lengths is given)")
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4], help="ring sizes W (default 2 4)")
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=None,
        help="sequence lengths N, multiples of 2W (default 16384 32768; 65536 is left out: ~2 minutes a "
             "forward+backward on 2 cores at H=4)",
    )  # fmt: skip
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=None, help="query heads (default 4, 2 without --quick)")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up (median)")
    args = parser.parse_args()

    default_heads = 4 if args.quick else 2
    heads = args.heads or default_heads
    lengths = args.lengths or ([4096, 8192] if args.quick else [16384, 32768])
    notes = []
    if args.lengths is None and not args.quick:
        notes.append("N = 65536 is left out by default (about 4x the N = 32768 time, past a 15-minute run).")
    if args.heads is None and not args.quick:
        notes.append("H = 2 by default (not 4), to keep the default run under ~11 minutes on 2 cores.")
    if args.quick:
        notes.append("--quick: N = 4096, 8192 and H = 4 unless given.")
    cfg = {
        "quick": args.quick, "lengths": lengths, "dtypes": args.dtypes, "B": args.batch, "Hq": heads,
        "Hkv": args.kv_heads or heads, "D": args.head_dim, "causal": args.causal, "layout": args.layout,
        "repeats": args.repeats, "note": " ".join(notes),
    }  # fmt: skip
    for W in args.world:
        for N in lengths:
            if args.layout == "zigzag" and N % (2 * W):
                parser.error(f"--lengths: zigzag needs N to be a multiple of 2W = {2 * W}, got {N}")

    start = time.perf_counter()
    env = environment()
    timing, traffic = [], []
    with tempfile.TemporaryDirectory(prefix="fastattn_ring_") as tmp:
        singles = {}  # (threads, N, dtype) -> {mode: s}
        # The first timed config of a process runs ~1.4x slow even after its own warm-up call
        # (measured: fp32 N=16384 fwd+bwd 2.24 s first, 1.61-1.77 s after): warm the process up.
        baseline(cfg, lengths[0], DTYPES[args.dtypes[0]], args.world[0] * _threads(args.world[0]), 1,
                 Path(tmp) / f"ref_{lengths[0]}_{args.dtypes[0]}.pt")  # fmt: skip
        for W in args.world:
            threads = W * _threads(W)
            for N in lengths:
                for dtype in args.dtypes:
                    if (threads, N, dtype) not in singles:
                        ref = Path(tmp) / f"ref_{N}_{dtype}.pt"
                        singles[threads, N, dtype] = baseline(cfg, N, DTYPES[dtype], threads, args.repeats, ref)
                        print(f"single, {threads} threads, N={N}, {dtype}: {singles[threads, N, dtype]}", flush=True)
        for W in args.world:
            mp.spawn(worker, args=(W, _free_port(), cfg, tmp), nprocs=W, join=True)
            ranks = [json.loads((Path(tmp) / f"W{W}_rank{r}.json").read_text()) for r in range(W)]
            for case in range(len(ranks[0])):
                per_rank = [r[case] for r in ranks]
                N, dtype = per_rank[0]["N"], per_rank[0]["dtype"]
                t, b = summarize(W, per_rank, singles[W * _threads(W), N, dtype], cfg)
                for row in t:
                    for name, err in row["errors"].items():
                        bound = FP32_TOLERANCE if dtype == "float32" else RATIO * row["single_errors"][name] + FLOOR
                        if not err <= bound:
                            raise AssertionError(f"ring {name} error {err:.2e} > {bound:.2e}: {row}")
                timing += t
                traffic += b
                print(f"ring W={W}, N={N}, {dtype}: " + ", ".join(f"{r['mode']} {r['ring_s']:.3f} s" for r in t),
                      flush=True)  # fmt: skip
    text = markdown(env, cfg, timing, traffic, time.perf_counter() - start, os.getloadavg())
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "ring_quick" if args.quick else "ring"
    (RESULTS / f"{name}.md").write_text(text)
    if not args.quick:
        (RESULTS / f"{name}.json").write_text(
            json.dumps({"environment": env, "config": cfg, "timing": timing, "traffic": traffic}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()

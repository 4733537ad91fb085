"""Timing, peak memory and this machine's own ceilings.

GPU (CUDA events): a few calls estimate the time per call; then about 25 ms of warm-up and about
100 ms of timed calls (at least 10, at most 1000), each between its own pair of events, cycling
through several input sets whose total size is several times the L2 cache, so no call finds its
inputs left in L2 by the one before. CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` with
this process's thread count, and at least ``MIN_CPU_SAMPLES`` blocks. Both report
the median with the 20th and 80th percentiles of the per-call times.

Peak memory is what one call allocates at its peak beyond what was allocated before it (outputs
included): on CUDA from ``torch.cuda.max_memory_allocated``; on CPU from the allocation events of
PyTorch's CPU allocator recorded by ``torch.profiler`` (memory that other allocators take, such as
NumPy's inside Triton's interpreter, is not seen).
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils.benchmark import Timer

from .sweep import DTYPE_NAMES

MIN_CPU_SAMPLES = 3
CUDA_WARMUP_S, CUDA_TIMED_S = 0.025, 0.100
CUDA_MIN_REPS, CUDA_MAX_REPS = 10, 1000
L2_MULTIPLE = 4  # rotated input sets add up to at least this many L2 caches
MAX_INPUT_SETS = 16
# (matmul n, copy bytes) of the ceiling measurements per (device, quick).
CEILING_SIZES = {
    ("cuda", False): (8192, 2**30),
    ("cuda", True): (4096, 2**28),
    ("cpu", False): (2048, 2**28),
    ("cpu", True): (512, 2**24),
}


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median, 20th and 80th percentiles over `samples` measurements."""

    median_s: float
    p20_s: float
    p80_s: float
    samples: int


def summarize(times: Sequence[float]) -> Timing:
    """Median and p20/p80 of two or more samples (inclusive quantiles: within the samples)."""
    ordered = sorted(times)
    deciles = statistics.quantiles(ordered, n=10, method="inclusive")
    return Timing(statistics.median(ordered), deciles[1], deciles[7], len(ordered))


def time_cpu(fn: Callable[[], object], min_run_time: float) -> Timing:
    """Per-call time of `fn` on CPU: blocked_autorange (its block-size estimate is the warm-up)
    for min_run_time seconds, then more blocks until there are MIN_CPU_SAMPLES."""
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(m.times)
    while len(times) < MIN_CPU_SAMPLES:
        times += timer.timeit(m.number_per_run).times
    return summarize(times)


def time_cuda(calls: Sequence[Callable[[], object]]) -> Timing:
    """Per-call time on the current CUDA device, call i running calls[i % len(calls)]."""
    n = len(calls)
    for call in calls:  # first touch: compilation, autotuning, workspace allocation
        call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(5):
        calls[i % n]()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5 / 1e3, 1e-6)
    for i in range(max(1, round(CUDA_WARMUP_S / estimate))):
        calls[i % n]()
    reps = min(CUDA_MAX_REPS, max(CUDA_MIN_REPS, round(CUDA_TIMED_S / estimate)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for i, (s, e) in enumerate(events):
        s.record()
        calls[i % n]()
        e.record()
    torch.cuda.synchronize()
    return summarize([s.elapsed_time(e) / 1e3 for s, e in events])


def input_sets(set_bytes: int, device: str) -> int:
    """How many input sets to rotate through: enough to add up to L2_MULTIPLE L2 caches (CUDA),
    one on CPU (torch.utils.benchmark repeats one call; attention is bound by arithmetic there)."""
    if device != "cuda":
        return 1
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(1, min(MAX_INPUT_SETS, math.ceil(L2_MULTIPLE * l2 / max(set_bytes, 1))))


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2: the profiler (kineto) logs its start and stop there unless
    KINETO_LOG_LEVEL was set before torch was imported, which would break the progress bar."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Bytes that one call of `fn` allocates at its peak beyond what was allocated before it
    (None where this torch's profiler does not expose its CPU allocation events)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        return None
    events = sorted((e for e in results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:  # nbytes > 0 for an allocation, < 0 for a free
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def time_call(fn: Callable[[], object], device: str, min_run_time: float) -> Timing:
    """One call timed the device's way (a single input set)."""
    return time_cuda([fn]) if device == "cuda" else time_cpu(fn, min_run_time)


def measure_ceilings(device: str, dtypes: Sequence[torch.dtype], quick: bool) -> dict:
    """This machine's reach, measured now: matmul TFLOP/s per dtype (an n x n product, 2*n^3
    FLOPs) and device-to-device copy GB/s (bytes read plus bytes written), each from the
    20th-percentile time: what the machine reaches, less the noise of whatever else runs on it."""
    n, copy_bytes = CEILING_SIZES[(device, quick)]
    budget = 0.05 if quick else 0.5
    matmul = {}
    for dtype in dict.fromkeys(dtypes):
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        t = time_call(lambda a=a, b=b: torch.mm(a, b), device, budget)
        matmul[DTYPE_NAMES[dtype]] = 2 * n**3 / t.p20_s / 1e12
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    t = time_call(lambda: dst.copy_(src), device, budget)
    return {
        "matmul_tflops": matmul,
        "matmul_n": n,
        "copy_gbps": 2 * copy_bytes / t.p20_s / 1e9,
        "copy_bytes": copy_bytes,
    }

"""`pytest benchmarks/`: a CPU-sized timing suite of fastattn against SDPA, with pytest-benchmark.

Not part of the test command (pyproject's testpaths is tests/). Each case and mode is one
pytest-benchmark group, so the report sets fastattn beside SDPA's own choice and its pinned CPU
backends (flash, math) on the same shape; ``extra_info`` carries GFLOP and TFLOP/s. Before a
provider is timed its answer is checked against the float64 reference by the harness's own gate
(:mod:`fastattn.bench.gate`); a wrong answer fails the test instead of producing a time. A provider
that cannot run a mode (fastattn 0.1 has no backward) is skipped with its own message, so those
rows appear once it can.

    pytest benchmarks/                                    # the suite (a few minutes on 2 cores)
    pytest benchmarks/ -k "fwd and L1024"                 # a slice
    pytest benchmarks/ --benchmark-json=out.json          # keep the numbers
"""

from __future__ import annotations

import pytest
import torch

from fastattn.bench.gate import check
from fastattn.bench.providers import PROVIDERS
from fastattn.bench.sweep import Case

F32, BF16 = torch.float32, torch.bfloat16
FORWARD_CASES = [
    *(Case("mha", F32, 4096 // L, 8, 8, L, L, 64, causal) for L in (512, 1024, 2048) for causal in (False, True)),
    Case("mha", F32, 4, 4, 4, 1024, 1024, 128, True),
    Case("gqa", F32, 4, 8, 2, 1024, 1024, 64, True),
    Case("mha", BF16, 4, 8, 8, 1024, 1024, 64, True),
]
BACKWARD_CASES = [Case("mha", F32, 4, 8, 8, 1024, 1024, 64, causal) for causal in (False, True)]
CONTESTANTS = ("fastattn", "sdpa", "sdpa-flash", "sdpa-math")


def _ids(case: Case) -> str:
    return f"{case.family}-{case.label.replace(' ', '-')}"


def _timed(benchmark, provider: str, case: Case, mode: str) -> None:
    p = PROVIDERS[provider]
    benchmark.group = f"{mode} {case.family} {case.label}"
    with p.context():
        try:
            result = check(lambda c: p.make(c, "cpu"), case, mode, "cpu")
        except NotImplementedError as e:
            pytest.skip(f"{provider} {mode}: {e}")
        assert result.passed, f"{provider}: {result.failure}"
        call = p.make(case, "cpu")
        q, k, v = case.inputs("cpu", seed=0, requires_grad=mode != "fwd")
        if mode == "fwd":
            fn = lambda: call(q, k, v)
        else:
            out, do = call(q, k, v), torch.randn_like(q)
            fn = lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
        benchmark(fn)
    gflop = case.flops(mode) / 1e9
    benchmark.extra_info["gflop"] = gflop
    if benchmark.stats is not None:  # None under --benchmark-disable (each call runs once, untimed)
        benchmark.extra_info["tflops"] = gflop / benchmark.stats.stats.median / 1e3


@pytest.mark.parametrize("provider", CONTESTANTS)
@pytest.mark.parametrize("case", FORWARD_CASES, ids=_ids)
def test_forward(benchmark, case: Case, provider: str) -> None:
    _timed(benchmark, provider, case, "fwd")


@pytest.mark.parametrize("provider", CONTESTANTS)
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=_ids)
def test_backward(benchmark, case: Case, provider: str) -> None:
    _timed(benchmark, provider, case, "bwd")

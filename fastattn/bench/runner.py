"""The sweep: every case, mode and provider becomes one row, and no row is a crash.

For each (case, mode, provider) the runner
1. skips with a reason what a default sweep lists but does not time (the Triton interpreter and
   compiled FlexAttention on CPU) and, on CPU, what would materialise more score matrices than
   :func:`host_memory_budget` (running out of host memory kills the process instead of raising);
2. checks the provider's answer against the float64 reference (:mod:`.gate`): "wrong" rows carry
   the error and its bound, never a time;
3. times it (:mod:`.timing`) and measures its peak memory.
Any exception becomes the row's status: "OOM" (``torch.OutOfMemoryError`` or an allocator's out
of memory message), "unsupported" (NotImplementedError, fastattn's BackendUnavailable, or SDPA's
pinned backend refusing the case, with the warnings that say why), else "error".

Modes: "fwd" times ``call(q, k, v)``; "bwd" times ``torch.autograd.grad(out, (q, k, v), do)`` on a
retained graph; "fwd+bwd" times both together. A provider whose forward cannot take inputs that
require grad gets "unsupported" backward rows with its own message, and real ones once it can.

Within each (case, mode) the fastattn rows get their speed-up over SDPA's own choice ("sdpa") and
over the fastest SDPA row (its own choice or a pinned backend): time(SDPA) / time(fastattn).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from fastattn.dispatch import BackendUnavailable

from .gate import GateResult, check
from .providers import Call, Provider
from .sweep import Case
from .timing import Timing, input_sets, peak_memory_bytes, time_cpu, time_cuda

STATUSES = ("ok", "wrong", "unsupported", "OOM", "error", "skipped")
# What SDPA raises when the backends it may use (here: the one pinned) cannot run a case.
_NO_KERNEL = ("No available kernel", "No viable backend")
_OOM_MESSAGES = ("out of memory", "can't allocate memory")
# Score matrices a materialising path holds at once: scores and probabilities, more with grads.
_MATERIALISED_COPIES = {"fwd": 3, "bwd": 6, "fwd+bwd": 6}


def host_memory_budget() -> int:
    """A 16th of this machine's physical memory: far from what would kill the process, and
    materialising paths are the slowest too, so past it they would dominate a CPU sweep's time."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 16


@dataclass(frozen=True)
class Settings:
    """How a sweep runs.

    providers: in table order. explicit_providers: named by the user, so default_skip does not
    apply. min_run_time: CPU seconds of timed calls per row. host_memory_bytes: what a
    materialising provider may use on CPU.
    """

    device: str
    modes: tuple[str, ...]
    providers: tuple[Provider, ...]
    explicit_providers: bool = False
    min_run_time: float = 0.3
    host_memory_bytes: int = field(default_factory=host_memory_budget)


@dataclass(frozen=True)
class Row:
    """One (case, mode, provider): a time only when status is "ok"."""

    case: Case
    mode: str
    provider: str
    status: str
    reason: str = ""
    note: str = ""
    timing: Timing | None = None
    peak_bytes: int | None = None
    gate: GateResult | None = None
    speedup_vs_sdpa: float | None = None
    speedup_vs_best_sdpa: float | None = None
    best_sdpa: str | None = None
    loadavg: float | None = None  # the 1-minute load average when the row was measured

    @property
    def flops(self) -> float:
        return self.case.flops(self.mode)

    @property
    def tflops(self) -> float | None:
        return None if self.timing is None else self.flops / self.timing.median_s / 1e12


def materialised_bytes(case: Case, mode: str) -> int:
    """About what a path that materialises the score matrix allocates (at least 4 bytes a score)."""
    return case.scores * max(case.dtype.itemsize, 4) * _MATERIALISED_COPIES[mode]


def one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def classify(e: BaseException, caught: Sequence[warnings.WarningMessage] = ()) -> tuple[str, str]:
    """(status, reason) of a provider that raised `e`; `caught`: the warnings it gave meanwhile."""
    text = one_line(e)
    if isinstance(e, torch.OutOfMemoryError) or any(m in str(e).lower() for m in _OOM_MESSAGES):
        return "OOM", text
    if isinstance(e, (NotImplementedError, BackendUnavailable)):
        return "unsupported", text
    if isinstance(e, RuntimeError) and any(m in str(e) for m in _NO_KERNEL):
        why = dict.fromkeys(" ".join(str(w.message).split()) for w in caught)
        return "unsupported", "; ".join([text, *why])
    return "error", text


def _timed_call(call: Call, mode: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], object]:
    if mode == "fwd":
        return lambda: call(q, k, v)
    do = torch.randn_like(q)
    if mode == "bwd":
        out = call(q, k, v)
        return lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
    return lambda: torch.autograd.grad(call(q, k, v), (q, k, v), do)


def _check_and_time(provider: Provider, case: Case, mode: str, settings: Settings) -> Row:
    device = settings.device
    gate = check(lambda c: provider.make(c, device), case, mode, device)
    if not gate.passed:
        return Row(case, mode, provider.name, "wrong", gate.failure, gate=gate, loadavg=os.getloadavg()[0])
    call = provider.make(case, device)
    grad = mode != "fwd"
    set_bytes = (2 * case.B * case.Hq * case.L + 2 * case.B * case.Hkv * case.S) * case.D * case.dtype.itemsize
    sets = [case.inputs(device, seed, requires_grad=grad) for seed in range(input_sets(set_bytes, device))]
    note = ""
    if provider.choice is not None:
        try:
            note = provider.choice(case, *sets[0])
        except Exception as e:  # the note is a courtesy: a private API may be missing
            note = f"choice unknown ({type(e).__name__})"
    calls = [_timed_call(call, mode, *s) for s in sets]
    timing = time_cuda(calls) if device == "cuda" else time_cpu(calls[0], settings.min_run_time)
    peak = peak_memory_bytes(calls[0], device)
    return Row(
        case,
        mode,
        provider.name,
        "ok",
        note=note,
        timing=timing,
        peak_bytes=peak,
        gate=gate,
        loadavg=os.getloadavg()[0],
    )


def measure(provider: Provider, case: Case, mode: str, settings: Settings) -> Row:
    """The row of one provider on one case and mode (see the module docstring)."""
    device = settings.device
    if case.inference and mode != "fwd":
        return Row(case, mode, provider.name, "skipped", "a decode step is inference only: its forward is timed")
    if not settings.explicit_providers and device in provider.default_skip:
        return Row(case, mode, provider.name, "skipped", provider.default_skip[device])
    if provider.materializes_scores and device == "cpu":
        need = materialised_bytes(case, mode)
        if need > settings.host_memory_bytes:
            reason = f"needs ~{need / 2**30:.1f} GiB of score matrices, over the {settings.host_memory_bytes / 2**30:.1f} GiB host budget"
            return Row(case, mode, provider.name, "skipped", reason)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with provider.context():
                return _check_and_time(provider, case, mode, settings)
        except Exception as e:
            status, reason = classify(e, caught)
            return Row(case, mode, provider.name, status, reason, loadavg=os.getloadavg()[0])
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()


def is_sdpa(provider: str) -> bool:
    return provider == "sdpa" or provider.startswith("sdpa-")


def with_speedups(rows: Sequence[Row]) -> list[Row]:
    """`rows` (one case and mode) with the fastattn rows' speed-ups over SDPA filled in."""
    times = {r.provider: r.timing.median_s for r in rows if r.status == "ok"}
    sdpa = {name: t for name, t in times.items() if is_sdpa(name)}
    if not sdpa:
        return list(rows)
    best = min(sdpa, key=sdpa.get)
    out = []
    for r in rows:
        if r.provider.startswith("fastattn") and r.status == "ok":
            t = times[r.provider]
            r = replace(
                r,
                speedup_vs_sdpa=sdpa["sdpa"] / t if "sdpa" in sdpa else None,
                speedup_vs_best_sdpa=sdpa[best] / t,
                best_sdpa=best,
            )
        out.append(r)
    return out


def run_sweep(
    cases: Sequence[Case],
    settings: Settings,
    step: Callable[[str], None] = lambda label: None,
    case_done: Callable[[list[Row]], None] = lambda rows: None,
) -> list[Row]:
    """Every row of the sweep, case by case. step(label) is called before each row is measured
    (the progress bar), case_done(rows) after each case (the streamed table)."""
    rows: list[Row] = []
    for case in cases:
        case_rows: list[Row] = []
        for mode in settings.modes:
            mode_rows = []
            for provider in settings.providers:
                step(f"{mode} {case.label} {provider.name}")
                mode_rows.append(measure(provider, case, mode, settings))
            case_rows += with_speedups(mode_rows)
        case_done(case_rows)
        rows += case_rows
    return rows

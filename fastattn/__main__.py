"""`python -m fastattn`: the environment, and every backend against the reference on this machine.

Like `python -m xformers.info`: prints the versions and device, then for a few representative
problems whether each backend can serve it (or every reason it cannot), its largest error against
the float64 reference, and its median time. A backend that fails shows "error: ..." in its row;
the command itself does not fail.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import fastattn
from fastattn import dispatch, reference
from fastattn.problem import canonicalize

# The float64 oracle materialises B*Hq*L*S scores (several copies): skip it beyond this many.
MAX_ORACLE_SCORES = {"cpu": 2**25, "cuda": 2**28}
# Triton's interpreter runs each program in NumPy: on CPU it serves only problems up to this size.
MAX_INTERPRETER_SCORES = 2**15
TIME_BUDGET_S = {"quick": 0.05, "full": 0.25}  # torch.utils.benchmark min_run_time per row
CUDA_REPS = {"quick": 5, "full": 20}

SDPA = "torch sdpa"  # the row for PyTorch's own call, the baseline every backend replaces
_SHORT = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32", torch.float64: "f64"}


@dataclass(frozen=True)
class Case:
    """One problem: shapes (B, Hq, L, E) for the query, (B, Hkv, S, E) for key and value."""

    device: str
    dtype: torch.dtype
    B: int
    Hq: int
    Hkv: int
    L: int
    S: int
    E: int
    causal: bool = False
    padding_mask: bool = False  # a (B, 1, 1, S) bool mask hiding the tail of every other sequence

    @property
    def scores(self) -> int:
        return self.B * self.Hq * self.L * self.S

    @property
    def name(self) -> str:
        heads = f"H{self.Hq}" if self.Hq == self.Hkv else f"H{self.Hq}/{self.Hkv}kv"
        parts = [self.device, _SHORT[self.dtype], f"B{self.B}", heads, f"L{self.L}", f"S{self.S}", f"E{self.E}"]
        if self.causal:
            parts.append("causal")
        if self.padding_mask:
            parts.append("padding-mask")
        return " ".join(parts)

    def inputs(self) -> dict:
        g = torch.Generator(device="cpu").manual_seed(0)

        def randn(*shape):
            return torch.randn(*shape, generator=g).to(device=self.device, dtype=self.dtype)

        kwargs = {
            "query": randn(self.B, self.Hq, self.L, self.E),
            "key": randn(self.B, self.Hkv, self.S, self.E),
            "value": randn(self.B, self.Hkv, self.S, self.E),
            "is_causal": self.causal,
            "enable_gqa": self.Hq != self.Hkv,
        }
        if self.padding_mask:
            lengths = torch.tensor([self.S if b % 2 == 0 else self.S - self.S // 4 for b in range(self.B)])
            keep = torch.arange(self.S)[None, :] < lengths[:, None]
            kwargs["attn_mask"] = keep[:, None, None, :].to(self.device)
        return kwargs


def cases(quick: bool) -> list[Case]:
    """The representative problems for this machine: CPU ones always, fp16/bf16 ones with CUDA."""
    n = 256 if quick else 1024
    B, H = (1, 4) if quick else (2, 8)
    f32 = torch.float32
    out = [
        Case("cpu", f32, B, H, H, n, n, 64),
        Case("cpu", f32, B, H, H, n, n, 64, causal=True),
        Case("cpu", f32, B, H, H // 4, n, n, 64, causal=True),
        Case("cpu", f32, 2, 2, 2, 64, 64, 64, padding_mask=True)
        if quick
        else Case("cpu", f32, 4, H, H, n // 4, n // 4, 64, padding_mask=True),
        # Small enough for Triton's interpreter: L != S, GQA, E != 2^k, bf16 (which it refuses).
        Case("cpu", f32, 1, 2, 2, 128, 128, 64, causal=True),
        Case("cpu", f32, 1, 2, 1, 64, 96, 80),
        Case("cpu", torch.bfloat16, 1, 2, 2, 128, 128, 64),
    ]
    if torch.cuda.is_available():
        n = 512 if quick else 2048
        f16, bf16 = torch.float16, torch.bfloat16
        out += [
            Case("cuda", f16, 2, 16, 16, n, n, 64),
            Case("cuda", f16, 2, 16, 16, n, n, 64, causal=True),
            Case("cuda", bf16, 2, 16, 16, n, n, 128, causal=True),
            Case("cuda", f16, 2, 32, 8, n, n, 128, causal=True),
            Case("cuda", bf16, 4, 16, 16, n // 2, n // 2, 64, padding_mask=True),
            Case("cuda", f32, 2, 16, 16, n // 2, n // 2, 64),
        ]
    return out


def environment_lines() -> list[str]:
    """One line each: fastattn, python, torch, triton, numpy, device."""
    lines = [
        f"fastattn  {fastattn.__version__} ({fastattn.__file__.rsplit('/', 1)[0]})",
        f"python    {platform.python_version()} ({platform.python_implementation()}, {platform.platform()})",
        f"torch     {torch.__version__} (CUDA runtime: {torch.version.cuda or 'none'}, "
        f"{torch.get_num_threads()} CPU threads)",
    ]
    err = dispatch.triton_import_error()
    if err is None:
        import triton

        lines.append(f"triton    {triton.__version__} (fastattn kernels: {_kernel_flavour()})")
    else:
        lines.append(f"triton    not importable: {err}")
    try:
        import numpy

        lines.append(f"numpy     {numpy.__version__}")
    except ImportError as e:
        lines.append(f"numpy     not importable: {e}")
    lines.append(f"cpu       {cpu_name()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            lines.append(f"cuda:{i}    {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    else:
        lines.append("cuda      no CUDA device")
    return lines


def use_interpreter_without_gpu() -> None:
    """Without a CUDA device, turn on Triton's interpreter (unless the caller chose a setting).

    Triton fixes whether kernels are compiled or interpreted when it is first imported;
    ``import fastattn`` does not import it, so this works when called before any triton use.
    """
    if torch.cuda.is_available() or "TRITON_INTERPRET" in os.environ or "triton" in sys.modules:
        return
    os.environ["TRITON_INTERPRET"] = "1"


def _kernel_flavour() -> str:
    try:
        from fastattn.fused.kernels import interpreted

        if interpreted():
            return "Triton's CPU interpreter (TRITON_INTERPRET=1)"
        return "compiled for the GPU"
    except Exception as e:
        return f"cannot be loaded: {_one_line(e)}"


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    same = got == want  # equal infinities (lse = -inf of a fully masked row) count as no error
    return (got - want).abs().masked_fill(same, 0.0).max().item() if got.numel() else 0.0


def _median_time(fn: Callable[[], object], device: str, mode: str) -> float:
    """Median seconds per call: torch.utils.benchmark on CPU, CUDA events on a GPU."""
    if device == "cuda":
        fn()
        pairs = []
        for _ in range(CUDA_REPS[mode]):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in pairs) / 1e3
    from torch.utils.benchmark import Timer

    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=TIME_BUDGET_S[mode]).median


def _fmt_err(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def _fmt_time(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _join(*notes) -> str:
    return "; ".join(n for n in notes if n)


def _row(backend: str, out_err=None, lse_err=None, t=None, note: str = "") -> str:
    return f"  {backend:<11} {_fmt_err(out_err):>9} {_fmt_err(lse_err):>9} {_fmt_time(t):>10}  {note}".rstrip()


def run_case(case: Case, mode: str) -> list[str]:
    """The header line and one row per backend (plus torch's SDPA as the baseline) for `case`."""
    kwargs = case.inputs()
    try:
        problem = canonicalize(**kwargs)
        auto = dispatch.choose_backend("auto", problem).name
    except Exception as e:
        return [case.name, _row("-", note=f"error: {_one_line(e)}")]
    lines = [f"{case.name}   (auto -> {auto})"]
    oracle, no_oracle = None, "no float64 oracle (B*H*L*S too large)"
    if case.scores <= MAX_ORACLE_SCORES[case.device]:
        try:
            oracle = reference.attention(**kwargs, return_lse=True, upcast=True)
        except Exception as e:
            lines.append(_row("oracle", note=f"error: {_one_line(e)}"))
            no_oracle = "no float64 oracle (it failed)"

    for name in dispatch.REGISTRY:
        try:
            reasons = dispatch.unsupported_reasons(name, problem, explicit=True)
        except Exception as e:
            lines.append(_row(name, note=f"error: {_one_line(e)}"))
            continue
        if reasons:
            lines.append(_row(name, note="cannot serve: " + "; ".join(reasons)))
            continue
        note = ""
        if name == "triton" and case.device == "cpu":
            if case.scores > MAX_INTERPRETER_SCORES:
                lines.append(
                    _row(name, note="not run: too large for Triton's interpreter (slow); see the small CPU problems")
                )
                continue
            note = "Triton interpreter (slow; small problems only)"
        lines.append(_measure(name, kwargs, oracle, case.device, mode, _join(note, oracle is None and no_oracle)))

    note = _join("baseline: F.scaled_dot_product_attention", oracle is None and no_oracle)
    lines.append(_measure(SDPA, kwargs, oracle, case.device, mode, note))
    return lines


def _measure(name: str, kwargs: dict, oracle, device: str, mode: str, note: str) -> str:
    if name == SDPA:

        def call():
            return torch.nn.functional.scaled_dot_product_attention(**kwargs), None
    else:

        def call():
            return fastattn.attention(**kwargs, return_lse=True, backend=name)

    try:
        out, lse = call()
        out_err = lse_err = None
        if oracle is not None:
            out_err = _max_err(out, oracle[0])
            lse_err = None if lse is None else _max_err(lse, oracle[1])
        elapsed = _median_time(call, device, mode)
    except Exception as e:
        return _row(name, note=f"error: {_one_line(e)}")
    return _row(name, out_err, lse_err, elapsed, note)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastattn",
        description="Print the environment and check every fastattn backend against the float64 reference.",
    )
    parser.add_argument("--quick", action="store_true", help="smaller problems and shorter timings (a few seconds)")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"

    print("== environment ==")
    for line in environment_lines():
        print(line)
    print()
    print("== backends vs the float64 reference (fastattn.reference.attention(..., upcast=True)) ==")
    print("errors are max |x - oracle| of the output and of lse; times are medians per call")
    print()
    print(f"  {'backend':<11} {'out err':>9} {'lse err':>9} {'median':>10}  note")
    for case in cases(args.quick):
        for line in run_case(case, mode):
            print(line, flush=True)
        print()
    return 0


if __name__ == "__main__":
    use_interpreter_without_gpu()
    sys.exit(main())

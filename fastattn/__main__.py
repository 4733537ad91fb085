"""`python -m fastattn`: the environment, and every backend against the reference on this machine.

Like `python -m xformers.info`: prints the versions and device, then for a few representative
problems whether each backend can serve it (or every reason it cannot), its largest error against
the float64 reference, and its median time. A backend that fails shows "error: ..." in its row;
the command itself does not fail.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

import fastattn
from fastattn import dispatch, reference
from fastattn.bench import sweep
from fastattn.bench.timing import time_call
from fastattn.env import environment_lines, use_interpreter_without_gpu
from fastattn.problem import canonicalize
from fastattn.testing import max_abs_error

# The float64 oracle materialises B*Hq*L*S scores (several copies): skip it beyond this many.
MAX_ORACLE_SCORES = {"cpu": 2**25, "cuda": 2**28}
# Triton's interpreter runs each program in NumPy: on CPU it serves only problems up to this size.
MAX_INTERPRETER_SCORES = 2**15
TIME_BUDGET_S = {"quick": 0.05, "full": 0.25}  # CPU: torch.utils.benchmark min_run_time per row

SDPA = "torch sdpa"  # the row for PyTorch's own call, the baseline every backend replaces


@dataclass(frozen=True)
class Case(sweep.Case):
    """A benchmark case (query (B, Hq, L, D), key and value (B, Hkv, S, D)) bound to a device,
    optionally with a (B, 1, 1, S) bool padding mask hiding the tail of every other sequence."""

    device: str = "cpu"
    padding_mask: bool = False

    @property
    def name(self) -> str:
        return " ".join([self.device, self.label] + (["padding-mask"] if self.padding_mask else []))

    def arguments(self) -> dict:
        """SDPA-style keyword arguments of the case, on its device."""
        q, k, v = self.inputs(self.device, seed=0)
        kwargs = {"query": q, "key": k, "value": v, "is_causal": self.causal, "enable_gqa": self.gqa}
        if self.padding_mask:
            lengths = torch.tensor([self.S if b % 2 == 0 else self.S - self.S // 4 for b in range(self.B)])
            keep = torch.arange(self.S)[None, :] < lengths[:, None]
            kwargs["attn_mask"] = keep[:, None, None, :].to(self.device)
        return kwargs


def case(
    device: str, dtype: torch.dtype, B: int, Hq: int, Hkv: int, L: int, S: int, E: int, causal=False, padding_mask=False
) -> Case:
    """A :class:`Case` of the table (family "info")."""
    return Case("info", dtype, B, Hq, Hkv, L, S, E, causal, device=device, padding_mask=padding_mask)


def cases(quick: bool) -> list[Case]:
    """The representative problems for this machine: CPU ones always, fp16/bf16 ones with CUDA."""
    n = 256 if quick else 1024
    B, H = (1, 4) if quick else (2, 8)
    f32 = torch.float32
    out = [
        case("cpu", f32, B, H, H, n, n, 64),
        case("cpu", f32, B, H, H, n, n, 64, causal=True),
        case("cpu", f32, B, H, H // 4, n, n, 64, causal=True),
        case("cpu", f32, 2, 2, 2, 64, 64, 64, padding_mask=True)
        if quick
        else case("cpu", f32, 4, H, H, n // 4, n // 4, 64, padding_mask=True),
        # Small enough for Triton's interpreter: L != S, GQA, E != 2^k, bf16 (which it refuses).
        case("cpu", f32, 1, 2, 2, 128, 128, 64, causal=True),
        case("cpu", f32, 1, 2, 1, 64, 96, 80),
        case("cpu", torch.bfloat16, 1, 2, 2, 128, 128, 64),
    ]
    if torch.cuda.is_available():
        n = 512 if quick else 2048
        f16, bf16 = torch.float16, torch.bfloat16
        out += [
            case("cuda", f16, 2, 16, 16, n, n, 64),
            case("cuda", f16, 2, 16, 16, n, n, 64, causal=True),
            case("cuda", bf16, 2, 16, 16, n, n, 128, causal=True),
            case("cuda", f16, 2, 32, 8, n, n, 128, causal=True),
            case("cuda", bf16, 4, 16, 16, n // 2, n // 2, 64, padding_mask=True),
            case("cuda", f32, 2, 16, 16, n // 2, n // 2, 64),
        ]
    return out


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
    kwargs = case.arguments()
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
            out_err = max_abs_error(out, oracle[0])
            lse_err = None if lse is None else max_abs_error(lse, oracle[1])
        elapsed = time_call(call, device, TIME_BUDGET_S[mode]).median_s
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

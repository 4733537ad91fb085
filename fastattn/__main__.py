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
    return out + (cuda_cases(quick) if torch.cuda.is_available() else [])


def cuda_cases(quick: bool) -> list[Case]:
    """The fp16/bf16/fp32 problems of a CUDA machine (fused.precompile plans them without one)."""
    n = 512 if quick else 2048
    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    return [
        case("cuda", f16, 2, 16, 16, n, n, 64),
        case("cuda", f16, 2, 16, 16, n, n, 64, causal=True),
        case("cuda", bf16, 2, 16, 16, n, n, 128, causal=True),
        case("cuda", f16, 2, 32, 8, n, n, 128, causal=True),
        case("cuda", bf16, 4, 16, 16, n // 2, n // 2, 64, padding_mask=True),
        case("cuda", f32, 2, 16, 16, n // 2, n // 2, 64),
    ]


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


@dataclass(frozen=True)
class VarlenCase:
    """A packed varlen_attention problem: query lengths against key lengths per sequence, causal
    (window_size=(-1, 0)); paged: the keys in a pool of pages of `page` rows in a random order
    (seqused_k and block_table)."""

    device: str
    dtype: torch.dtype
    lens_q: tuple[int, ...]
    lens_k: tuple[int, ...]
    Hq: int
    Hkv: int
    E: int
    page: int = 0

    @property
    def name(self) -> str:
        kind = f"paged decode (pages of {self.page})" if self.page else "packed prefill"
        return (
            f"{self.device} varlen {sweep.DTYPE_NAMES[self.dtype]} {kind}: N={len(self.lens_q)} "
            f"T_q={sum(self.lens_q)} keys {min(self.lens_k)}..{max(self.lens_k)} H{self.Hq}/{self.Hkv}kv D{self.E} causal"
        )

    @property
    def size(self) -> int:
        return sum(a * b for a, b in zip(self.lens_q, self.lens_k)) * self.Hq

    def arguments(self) -> dict:
        g = torch.Generator().manual_seed(0)
        dev, dt, N = self.device, self.dtype, len(self.lens_q)

        def cu(lengths):
            return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)

        def randn(*shape):
            return torch.randn(*shape, generator=g).to(device=dev, dtype=dt)

        kw = dict(query=randn(sum(self.lens_q), self.Hq, self.E), cu_seq_q=cu(self.lens_q), max_q=max(self.lens_q))
        kw.update(max_k=max(self.lens_k), window_size=(-1, 0), enable_gqa=True)
        if self.page:
            per_seq = -(-max(self.lens_k) // self.page)
            pages = N * per_seq
            kw.update(key=randn(pages, self.page, self.Hkv, self.E), value=randn(pages, self.page, self.Hkv, self.E))
            table = torch.randperm(pages, generator=g).reshape(N, per_seq).to(device=dev, dtype=torch.int32)
            used = torch.tensor(self.lens_k, dtype=torch.int32, device=dev)
            kw.update(cu_seq_k=None, block_table=table, seqused_k=used)
        else:
            kw.update(key=randn(sum(self.lens_k), self.Hkv, self.E), value=randn(sum(self.lens_k), self.Hkv, self.E))
            kw.update(cu_seq_k=cu(self.lens_k))
        return kw


def varlen_cases(quick: bool) -> list[VarlenCase]:
    """Packed prefill and paged decoding: small CPU ones always, bf16 ones with CUDA."""
    f32 = torch.float32
    out = [
        VarlenCase("cpu", f32, (37, 0, 64, 5), (37, 3, 64, 20), 4, 2, 64),
        VarlenCase("cpu", f32, (1, 1, 1), (100, 37, 64), 4, 2, 64, page=16),
    ]
    if torch.cuda.is_available():
        bf16 = torch.bfloat16
        g = torch.Generator().manual_seed(0)
        lens = tuple(torch.randint(64, 2049 if not quick else 513, (8,), generator=g).tolist())
        out += [
            VarlenCase("cuda", bf16, lens, lens, 16, 4, 128),
            VarlenCase("cuda", bf16, (1,) * 16, (4096 if not quick else 1024,) * 16, 32, 8, 128, page=64),
        ]
    return out


def run_varlen_case(case: VarlenCase, mode: str) -> list[str]:
    """The header line and one row per backend for a varlen case, against the float64 per-sequence oracle."""
    from fastattn.packed import canonicalize_varlen

    kwargs = case.arguments()
    try:
        problem = canonicalize_varlen(*(kwargs[n] for n in _VARLEN_POSITIONAL), **_keywords(kwargs))
        auto = dispatch.choose_backend("auto", problem).name
        oracle = reference.varlen_attention(**kwargs, return_aux=_AUX, upcast=True)
    except Exception as e:
        return [case.name, _row("-", note=f"error: {_one_line(e)}")]
    lines = [f"{case.name}   (auto -> {auto})"]
    for name in dispatch.REGISTRY:
        reasons = dispatch.unsupported_reasons(name, problem, explicit=True)
        if reasons:
            lines.append(_row(name, note="cannot serve: " + "; ".join(reasons)))
            continue
        note = "Triton interpreter (slow; small problems only)" if name == "triton" and case.device == "cpu" else ""
        if note and case.size > 64 * MAX_INTERPRETER_SCORES:
            lines.append(_row(name, note="not run: too large for Triton's interpreter"))
            continue

        def call(name=name):
            return fastattn.varlen_attention(**kwargs, return_aux=_AUX, backend=name)

        try:
            out, lse = call()
            elapsed = time_call(call, case.device, TIME_BUDGET_S[mode]).median_s
            lines.append(_row(name, max_abs_error(out, oracle[0]), max_abs_error(lse, oracle[1]), elapsed, note))
        except Exception as e:
            lines.append(_row(name, note=f"error: {_one_line(e)}"))
    return lines


_VARLEN_POSITIONAL = ("query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k")


def _keywords(kwargs: dict) -> dict:
    return {n: v for n, v in kwargs.items() if n not in _VARLEN_POSITIONAL}


class _Aux:
    """torch's AuxRequest(lse=True) without importing torch.nn.attention.varlen (absent in older torch)."""

    lse = True


_AUX = _Aux()


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
    print("== varlen_attention vs the per-sequence float64 reference (fastattn.reference.varlen_attention) ==")
    print()
    for case in varlen_cases(args.quick):
        for line in run_varlen_case(case, mode):
            print(line, flush=True)
        print()
    return 0


if __name__ == "__main__":
    use_interpreter_without_gpu()
    sys.exit(main())

"""`python -m fastattn.bench` (or `fastattn-bench`): fastattn against SDPA and FlexAttention.

With no arguments it runs the default sweep of the device it finds (see
:mod:`fastattn.bench.sweep`): about 3 minutes on 2 CPU cores; on an NVIDIA GPU the
FlashAttention papers' shapes plus grouped-query and long-context cases. Every provider's answer is
checked against the float64 reference before it is timed. A markdown table per case goes to
stdout as the sweep runs, a progress bar to stderr; ``--out DIR`` also writes results.csv,
results.json, results.md and PNG plots there. Failures, wrong answers and OOM are rows, not
crashes: the exit status is 0 unless the arguments are bad.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from fastattn.env import use_interpreter_without_gpu

from .progress import Progress
from .providers import PROVIDERS, available_providers, default_providers
from .report import case_markdown, header_markdown, metadata, record, summary_markdown, write_outputs
from .runner import Settings, run_sweep
from .sweep import DTYPES, MODES, sweep_cases
from .timing import measure_ceilings

DTYPE_ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32"}
CAUSAL = {"yes": (True,), "no": (False,), "both": (False, True)}
MIN_RUN_TIME = {False: 0.1, True: 0.02}  # CPU seconds of timed calls per row: full, --quick


def _list(kind: type, choices: Sequence[str] | None = None, aliases: dict[str, str] | None = None):
    def parse(text: str) -> tuple:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if aliases:
            items = [aliases.get(x, x) for x in items]
        if choices is not None:
            bad = [x for x in items if x not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"{', '.join(bad)} not among {', '.join(choices)}")
        try:
            return tuple(kind(x) for x in items)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastattn.bench",
        description="Time fastattn against SDPA (each backend and its own choice), FlexAttention and the "
        "reference, each checked against the float64 reference first.",
    )
    parser.add_argument("--quick", action="store_true", help="a small sweep with short timings (seconds on CPU)")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), help="default: cuda when a CUDA device is present, else cpu"
    )
    parser.add_argument(
        "--modes",
        type=_list(str, MODES),
        default=("fwd", "bwd"),
        help="comma list of fwd, bwd, fwd+bwd (default fwd,bwd)",
    )
    parser.add_argument(
        "--dtype",
        type=_list(str, tuple(DTYPES), DTYPE_ALIASES),
        help="comma list of fp16, bf16, fp32 (default: the sweep's)",
    )
    parser.add_argument(
        "--seqlens", type=_list(int), help="comma list of L = S (replaces the sweep's; drops long context)"
    )
    parser.add_argument("--head-dims", type=_list(int), help="comma list of head dims D (default: the sweep's)")
    parser.add_argument(
        "--families",
        type=_list(str),
        help="comma list of the sweep's families to run (mha, gqa, long, window, softcap, alibi; default: all)",
    )
    parser.add_argument("--causal", choices=tuple(CAUSAL), help="causal cases: yes, no or both (default: the sweep's)")
    parser.add_argument(
        "--providers",
        help="comma list of providers, or 'all' (default: the device's set; names given here are timed even "
        f"where a default sweep skips them). Known: {', '.join(PROVIDERS)}",
    )
    parser.add_argument("--out", type=Path, help="write results.csv, results.json, results.md and PNG plots here")
    return parser


def _command(argv: Sequence[str]) -> str:
    prog = "fastattn-bench" if os.path.basename(sys.argv[0]) == "fastattn-bench" else "python -m fastattn.bench"
    return " ".join([prog, shlex.join(argv)]).strip()


def main(argv: Sequence[str] | None = None) -> int:
    use_interpreter_without_gpu()  # before anything imports triton (see fastattn.env)
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    available = available_providers(device)
    if args.providers is None:
        names = default_providers(device)
    elif args.providers == "all":
        names = available
    else:
        names = list(_list(str)(args.providers))
        unknown = [n for n in names if n not in available]
        if unknown:
            parser.error(
                f"--providers: {', '.join(unknown)} not available on {device} (available: {', '.join(available)})"
            )
    dtypes = None if args.dtype is None else tuple(DTYPES[d] for d in args.dtype)
    try:
        cases = sweep_cases(
            device,
            args.quick,
            dtypes=dtypes,
            seqlens=args.seqlens,
            head_dims=args.head_dims,
            causal=None if args.causal is None else CAUSAL[args.causal],
            families=args.families,
        )
    except ValueError as e:
        parser.error(f"--families: {e}")
    if not cases:
        parser.error("the options leave no case to run")
    settings = Settings(
        device=device,
        modes=args.modes,
        providers=tuple(PROVIDERS[n] for n in names),
        explicit_providers=args.providers is not None,
        min_run_time=MIN_RUN_TIME[args.quick],
    )

    started = time.monotonic()
    print("measuring this machine's ceilings (matmul, copy)...", file=sys.stderr, flush=True)
    ceilings = measure_ceilings(device, sorted({c.dtype for c in cases}, key=str), args.quick)
    meta = metadata(settings, _command(argv), ceilings)
    print(header_markdown(meta), flush=True)

    progress = Progress(len(cases) * len(settings.modes) * len(settings.providers))

    def case_done(rows):
        progress.clear()
        print(case_markdown([record(r, meta) for r in rows]), flush=True)

    rows = run_sweep(cases, settings, step=progress.step, case_done=case_done)
    progress.clear()
    meta["loadavg_end"] = list(os.getloadavg())
    meta["duration_s"] = round(time.monotonic() - started, 1)
    records = [record(r, meta) for r in rows]
    print("## Summary: fastattn vs SDPA\n\n" + summary_markdown(records), flush=True)
    if args.out is not None:
        for path in write_outputs(args.out, meta, records):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m fastattn.fused.precompile --cache DIR`: a GPU check's Triton kernels, compiled without a GPU.

A short GPU lease spends minutes JIT-compiling kernels. This command plans, on a machine without
a GPU, the launches a workload makes on an sm_<arch> GPU and compiles them into a Triton cache
directory that can be packed and carried to the GPU machine (``TRITON_CACHE_DIR`` there):

1. **plan** (needs torch): each workload call runs the Triton backend's own entry points (the
   forward, and the backward with the forward's out and lse) on meta tensors of the call's shapes
   inside :func:`fused.plumbing.recording`, which answers the target and collects the launches
   instead of running them. The launches go to a manifest (JSON: kernel, grid, arguments, with
   each tensor as its dtype and pointer alignment, constexprs, warps, stages).
2. **compile** (triton only): ``fastattn/fused/replay.py`` compiles every distinct launch through
   triton's own launch path (``JITFunction.warmup``) for the target, so the cache keys are the
   ones the GPU's launches look up. Triton's key includes its own build (libtriton's hash, which
   differs between Python versions): the cache serves a machine with the same triton wheel, so
   ``--python`` names an interpreter that has it (a Python 3.12 venv with triton 3.6.0 for the
   lent H200 machine's Python 3.12 / triton 3.6); torch is not needed there.

Workloads (:data:`WORKLOADS`): ``bench``, the GPU check's benchmark stage (gpu_check.BENCH_ARGS:
fastattn's forward and backward on each case and on the reduced copy its gate checks); ``info``,
the CUDA problems of ``python -m fastattn --quick`` (forward; the padding-mask problem is left
out: its block lists are built from the mask's values, which meta tensors do not have). The GPU
check's test stage is not planned here: its launches come from test bodies that need CUDA
tensors (gpu_check runs it in parallel shards instead, so its compiles use every core).

Prints the compile half's counts (launches, distinct kernels, compiled, found cached) and writes
them with the manifest into DIR/precompile-<arch>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from ..problem import Problem, canonicalize
from . import plumbing as pl

WORKLOADS = ("bench", "info")


def _meta(shape, dtype, requires_grad=False) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype, requires_grad=requires_grad)


def bench_problems() -> Iterator[tuple[str, Problem, bool]]:
    """(label, problem, backward too) of the GPU check's bench stage: every case and its gate's
    reduced copy, as the fastattn provider calls them."""
    from ..bench.__main__ import CAUSAL, build_parser
    from ..bench.gate import GATE_MAX_SCORES
    from ..bench.sweep import DTYPES, sweep_cases
    from ..gpu_check import BENCH_ARGS

    args = build_parser().parse_args(list(BENCH_ARGS))
    cases = sweep_cases(
        "cuda", args.quick, dtypes=tuple(DTYPES[d] for d in args.dtype), seqlens=args.seqlens,
        head_dims=args.head_dims, causal=CAUSAL[args.causal], families=args.families,
    )  # fmt: skip
    backward = any(m != "fwd" for m in args.modes)
    for case in cases:
        for c in dict.fromkeys((case, case.reduced(GATE_MAX_SCORES["cuda"]))):
            q = _meta((c.B, c.Hq, c.L, c.D), c.dtype)
            k, v = (_meta((c.B, c.Hkv, c.S, c.D), c.dtype) for _ in range(2))
            kwargs = c.attention_kwargs("meta")
            p = canonicalize(q, k, v, is_causal=c.causal, enable_gqa=c.gqa, **kwargs)
            yield f"bench {c.label}", p, backward


def info_problems() -> Iterator[tuple[str, Problem, bool]]:
    """The CUDA problems of ``python -m fastattn --quick`` (forward only), but the padding-mask one."""
    from ..__main__ import cuda_cases

    for c in cuda_cases(quick=True):
        if c.padding_mask:
            continue
        q = _meta((c.B, c.Hq, c.L, c.D), c.dtype)
        k, v = (_meta((c.B, c.Hkv, c.S, c.D), c.dtype) for _ in range(2))
        yield f"info {c.label}", canonicalize(q, k, v, is_causal=c.causal, enable_gqa=c.gqa), False


PROBLEMS = {"bench": bench_problems, "info": info_problems}


def plan_launches(p: Problem, backward: bool, target: pl.Target) -> list[pl.Launch]:
    """The launches the Triton backend makes for `p` (meta tensors) on `target`: its forward, and
    with `backward` its backward given the forward's out and lse and a gradient of out alone (a
    loss that does not use lse, as the benchmark's)."""
    from ..dispatch import REGISTRY

    backend = REGISTRY["triton"]
    with pl.recording(target) as launches:
        out, lse, *stats = backend.run(p)
        if backward:
            stats = stats[0] if stats else None
            backend.run_backward(p, out, lse, torch.empty_like(out), None, False, stats=stats)
    return launches


def _argument(value):
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype), "offset": value.data_ptr() % 16}
    if isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot put an argument of type {type(value).__name__} in a manifest")


def manifest_entry(launch: pl.Launch, label: str) -> dict:
    return {
        "what": label,
        "module": launch.module,
        "kernel": launch.kernel,
        "grid": list(launch.grid),
        "args": {name: _argument(v) for name, v in launch.args.items()},
        "constexprs": {name: _argument(v) for name, v in launch.constexprs.items()},
        "num_warps": launch.num_warps,
        "num_stages": launch.num_stages,
    }


def build_manifest(workloads: list[str], arch: int, allow_tf32: bool = False) -> dict:
    """The launches of `workloads` on sm_<arch> (fp32 with TF32 as allowed), as JSON data."""
    target = pl.Target((arch // 10, arch % 10), allow_tf32=allow_tf32)
    entries = []
    for name in workloads:
        for label, p, backward in PROBLEMS[name]():
            entries += [manifest_entry(launch, label) for launch in plan_launches(p, backward, target)]
    return {"arch": arch, "allow_tf32": allow_tf32, "workloads": workloads, "launches": entries}


def compile_manifest(path: Path, cache: Path, python: str, jobs: int) -> dict:
    """Run the compile half (replay.py) on the manifest at `path` with `python`, caching in `cache`."""
    import os

    # Nothing else set: triton's key includes the cache-invalidating TRITON_* variables that are set.
    env = dict(os.environ, TRITON_CACHE_DIR=str(cache), TRITON_INTERPRET="0")
    script = Path(__file__).with_name("replay.py")
    proc = subprocess.run(
        [python, str(script), str(path), "--jobs", str(jobs)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{python} {script} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastattn.fused.precompile", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, type=Path, help="the Triton cache directory to fill")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    parser.add_argument("--archs", default="90", help="comma list of sm_ numbers (the H200: 90)")
    parser.add_argument(
        "--python", default=sys.executable,
        help="the interpreter that compiles: one with the GPU machine's triton (same version and Python)",
    )  # fmt: skip
    parser.add_argument("--jobs", type=int, default=2, help="compiling processes")
    args = parser.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        parser.error(f"--workloads: unknown {unknown}; choose from {list(WORKLOADS)}")
    args.cache.mkdir(parents=True, exist_ok=True)
    for arch in (int(a) for a in args.archs.split(",")):
        manifest = build_manifest(workloads, arch)
        path = args.cache / f"precompile-{arch}.manifest.json"
        path.write_text(json.dumps(manifest))
        counts = compile_manifest(path, args.cache, args.python, max(1, args.jobs))
        (args.cache / f"precompile-{arch}.json").write_text(json.dumps(counts, indent=1) + "\n")
        print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

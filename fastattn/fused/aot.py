"""Ahead-of-time compilation of the kernels for NVIDIA targets, without a GPU.

``python -m fastattn.aot`` compiles every forward configuration the dispatcher can pick for sm_80
and sm_90 and prints, per configuration, registers per thread, spill stores/loads and stack
(read from the cubin by the ``cuobjdump`` that ships inside triton), shared memory against the
GPU's limit, and whether the SASS uses Hopper's warpgroup tensor-core instructions (HGMMA).

Compilation needs the compiled kernel flavour: run it with TRITON_INTERPRET unset or 0.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .configs import FORWARD_CONFIG_SPACE, ForwardConfig, forward_config

# Opt-in shared memory per block (bytes): A100 (sm_80) 163 KB, H100 (sm_90) 227 KB.
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass
class CompileReport:
    arch: int
    dtype: str
    head_dim: int
    head_dim_v: int
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    variant: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int
    shared_limit: int
    hgmma: bool

    @property
    def fits(self) -> bool:
        return self.shared_bytes <= self.shared_limit


VARIANTS = {
    # name: (IS_CAUSAL, MASK_KIND, CHECK_M, CHECK_N, CHECK_E, CHECK_EV)
    "plain": (False, 0, False, False, False, False),
    "causal": (True, 0, False, False, False, False),
    "ragged": (False, 0, True, True, False, False),
    "causal-ragged": (True, 0, True, True, False, False),
    "bool-mask": (False, 1, False, False, False, False),
    "padded-dims": (False, 0, False, False, True, True),
    "bool-mask-ragged": (False, 1, True, True, True, True),
    "float-mask-causal": (True, 2, False, False, False, False),
}


def forward_source(dtype: torch.dtype, head_dim: int, head_dim_v: int, config: ForwardConfig, variant: str):
    """An ASTSource of the forward kernel, specialised as a launch with contiguous inputs would be."""
    from triton.compiler import ASTSource

    from .kernels import interpreted
    from .kernels.forward import attention_forward_kernel as kernel

    if interpreted():
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset or 0")
    is_causal, mask_kind, check_m, check_n, check_e, check_ev = VARIANTS[variant]
    t = _TRITON_DTYPE[dtype]
    mask_t = {0: "i32", 1: "u8", 2: t}[mask_kind]
    pointers = {
        "Out": t,
        "Lse": "fp32",
        "Q": t,
        "K": t,
        "V": t,
        "Mask": mask_t,
        "BlockCount": "i32",
        "BlockIndex": "i32",
    }
    constexprs = {
        "HEAD_DIM": head_dim,
        "HEAD_DIM_V": head_dim_v,
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
        "IS_CAUSAL": is_causal,
        "MASK_KIND": mask_kind,
        "CHECK_M": check_m,
        "CHECK_N": check_n,
        "CHECK_E": check_e,
        "CHECK_EV": check_ev,
        "LARGE_OFFSETS": False,
        "INPUT_PRECISION": "tf32",
    }
    # Unit strides of the last dims are specialised to 1, as triton does at launch.
    for name in ("stride_qk", "stride_kk", "stride_vk", "stride_ok"):
        constexprs[name] = 1
    if mask_kind:
        constexprs["stride_mn"] = 1
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        elif name in ("qk_scale", "qk_scale_lo"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    # Pointers and row strides are 16-byte aligned in the common case (what triton would specialise).
    aligned = [
        n for n in kernel.arg_names if n in pointers or n in ("stride_qm", "stride_kn", "stride_vn", "stride_om")
    ]
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _resource_usage(cubin: bytes) -> tuple[int, int, int, int, bool]:
    """(registers, spill stores, spill loads, stack bytes, uses HGMMA) read from a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        res = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    stack = int(re.search(r"STACK:(\d+)", res).group(1))
    # cuobjdump reports local memory as LOCAL:<bytes>; spills show as STL/LDL instructions.
    spill_stores = len(re.findall(r"\bSTL\b", sass))
    spill_loads = len(re.findall(r"\bLDL\b", sass))
    return regs, spill_stores, spill_loads, stack, "HGMMA" in sass


def compile_forward(
    dtype: torch.dtype,
    head_dim: int,
    head_dim_v: int,
    arch: int,
    variant: str = "plain",
    config: ForwardConfig | None = None,
) -> CompileReport:
    """Compile one forward specialisation for sm_<arch> and report its resource use."""
    masked = VARIANTS[variant][1] != 0
    config = config or forward_config(head_dim, head_dim_v, dtype, (arch // 10, arch % 10), masked=masked)
    src = forward_source(dtype, head_dim, head_dim_v, config, variant)
    return compile_report(src, dtype, head_dim, head_dim_v, arch, config, variant)


def compile_report(src, dtype: torch.dtype, head_dim: int, head_dim_v: int, arch: int, config, variant: str):
    """Compile `src` for sm_<arch> with `config` (block sizes, warps, stages) and report its resource use."""
    import triton
    from triton.backends.compiler import GPUTarget

    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    regs, st, ld, stack, hgmma = _resource_usage(compiled.asm["cubin"])
    return CompileReport(
        arch=arch,
        dtype=_TRITON_DTYPE[dtype],
        head_dim=head_dim,
        head_dim_v=head_dim_v,
        block_m=config.block_m,
        block_n=config.block_n,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        variant=variant,
        registers=regs,
        spill_stores=st,
        spill_loads=ld,
        stack_bytes=stack,
        shared_bytes=compiled.metadata.shared,
        shared_limit=SHARED_MEMORY_LIMIT[arch],
        hgmma=hgmma,
    )


def dispatch_space(dtypes=None, head_dims=None, all_pairs: bool = False):
    """(dtype, head_dim, head_dim_v, arch) the dispatcher can meet on sm_80 and sm_90 (padded dims)."""
    for hd, hdv, dtype, cap in FORWARD_CONFIG_SPACE:
        if not all_pairs and hd != hdv:
            continue
        if dtypes and _TRITON_DTYPE[dtype] not in dtypes:
            continue
        if head_dims and (hd not in head_dims or hdv not in head_dims):
            continue
        yield dtype, hd, hdv, cap[0] * 10 + cap[1]


def _compile_job(job) -> dict:
    dtype, hd, hdv, arch, variant = job
    return asdict(compile_forward(dtype, hd, hdv, arch, variant))


def format_row(r: dict) -> str:
    fits = r["shared_bytes"] <= r["shared_limit"]
    return (
        f"| sm_{r['arch']} | {r['dtype']} | {r['head_dim']} | {r['head_dim_v']} | {r['block_m']} | {r['block_n']} | "
        f"{r['num_warps']} | {r['num_stages']} | {r['variant']} | {r['registers']} | "
        f"{r['spill_stores']}/{r['spill_loads']} | {r['stack_bytes']} | "
        f"{r['shared_bytes'] / 1024:.1f}{'' if fits else ' (over!)'} | {'yes' if r['hgmma'] else 'no'} |"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastattn.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--all-pairs", action="store_true", help="every (E, Ev) pair, not only E == Ev (slow)")
    parser.add_argument("--variants", default="plain", help=f"comma list of {','.join(VARIANTS)}, or 'all'")
    parser.add_argument("--dtypes", default="fp16,bf16,fp32", help="comma list of fp16,bf16,fp32")
    parser.add_argument("--head-dims", default="", help="comma list of padded head dims (default: all)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = parser.parse_args(argv)
    variants = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    head_dims = [int(d) for d in args.head_dims.split(",") if d]
    jobs = [
        (dtype, hd, hdv, arch, v)
        for dtype, hd, hdv, arch in dispatch_space(args.dtypes.split(","), head_dims, args.all_pairs)
        for v in variants
    ]
    if not args.json:
        print(
            "| arch | dtype | E | Ev | BM | BN | warps | stages | variant | regs | spill st/ld | stack | shared KB | HGMMA |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    bad = 0
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for r in pool.map(_compile_job, jobs):
            bad += r["shared_bytes"] > r["shared_limit"]
            print(json.dumps(r) if args.json else format_row(r), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

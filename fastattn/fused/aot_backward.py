"""Ahead-of-time compilation of the backward kernels for NVIDIA targets, without a GPU.

``python -m fastattn.aot_backward`` compiles the dK/dV and dQ kernels (and the preprocess kernel)
for sm_80 and sm_90 with the configs :func:`fastattn.launcher_backward.backward_config` picks and
prints registers, spills, stack, shared memory and HGMMA use, as ``python -m fastattn.aot`` does
for the forward. Needs the compiled kernel flavour: run it with TRITON_INTERPRET unset or 0.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
from dataclasses import asdict, replace

import torch

from .aot import _TRITON_DTYPE, VARIANTS, CompileReport, compile_report, format_row
from .backward import TileConfig, backward_config, preprocess_block_m

KERNELS = ("dkdv", "dq", "preprocess")
_UNIT_STRIDES = ("stride_qk", "stride_kk", "stride_vk", "stride_ok", "stride_dok", "stride_dkk", "stride_dvk")
_ROW_STRIDES = ("stride_qm", "stride_kn", "stride_vn", "stride_om", "stride_dom", "stride_dkn", "stride_dvn")


def _kernel(name: str):
    from .kernels import backward, interpreted

    if interpreted():
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset or 0")
    return {
        "dkdv": backward.attention_backward_dkdv_kernel,
        "dq": backward.attention_backward_dq_kernel,
        "preprocess": backward.attention_backward_preprocess_kernel,
    }[name]


def backward_source(
    kernel_name: str, dtype: torch.dtype, head_dim: int, head_dim_v: int, tile: TileConfig, variant: str
):
    """An ASTSource of one backward kernel, specialised as a launch with contiguous inputs would be."""
    from triton.compiler import ASTSource

    kernel = _kernel(kernel_name)
    is_causal, mask_kind, check_m, check_n, check_e, check_ev = VARIANTS[variant]
    t = _TRITON_DTYPE[dtype]
    pointers = dict.fromkeys(("DK", "DV", "DQ", "Q", "K", "V", "DO", "Out", "DOut"), t)
    pointers.update(dict.fromkeys(("Lse", "Delta", "DLse"), "fp32"))
    pointers.update(Mask={0: "i32", 1: "u8", 2: t}[mask_kind], BlockCount="i32", BlockIndex="i32")
    if kernel_name == "preprocess":
        constexprs = {
            "HEAD_DIM_V": head_dim_v,
            "BLOCK_M": preprocess_block_m(head_dim_v),
            "CHECK_M": check_m,
            "CHECK_EV": check_ev,
            "HAS_DLSE": True,
        }
    else:
        constexprs = {
            "HEAD_DIM": head_dim,
            "HEAD_DIM_V": head_dim_v,
            "BLOCK_M": tile.block_m,
            "BLOCK_N": tile.block_n,
            "IS_CAUSAL": is_causal,
            "MASK_KIND": mask_kind,
            "CHECK_M": check_m,
            "CHECK_N": check_n,
            "CHECK_E": check_e,
            "CHECK_EV": check_ev,
            "LARGE_OFFSETS": False,
            "INPUT_PRECISION": "tf32",
        }
        if kernel_name == "dkdv":
            constexprs["KEY_MAJOR"] = tile.key_major
    # Unit strides of the last dims are specialised to 1, as triton does at launch.
    names = kernel.arg_names
    for name in (*_UNIT_STRIDES, "stride_dqk"):
        if name in names:
            constexprs[name] = 1
    if mask_kind and "stride_mn" in names:
        constexprs["stride_mn"] = 1
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        elif name in ("qk_scale", "qk_scale_lo", "scale", "scale_lo"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    # Pointers and row strides are 16-byte aligned in the common case (what triton would specialise).
    aligned = [n for n in names if n in pointers or n in (*_ROW_STRIDES, "stride_dqm")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)


def compile_backward(
    kernel_name: str,
    dtype: torch.dtype,
    head_dim: int,
    head_dim_v: int,
    arch: int,
    variant: str = "plain",
    tile: TileConfig | None = None,
) -> CompileReport:
    """Compile one backward kernel specialisation for sm_<arch> and report its resource use.

    The report's variant reads "<kernel>:<variant>" (kernel one of dkdv, dq, preprocess), with
    ":key-major" appended for a key-major dK/dV tile.
    """
    if tile is None:
        masked = VARIANTS[variant][1] != 0
        config = backward_config(head_dim, head_dim_v, dtype, (arch // 10, arch % 10), masked=masked)
        tile = config.dq if kernel_name == "dq" else config.dkdv
        if kernel_name == "preprocess":
            tile = replace(tile, block_m=preprocess_block_m(head_dim_v), block_n=0, num_warps=4, num_stages=1)
    src = backward_source(kernel_name, dtype, head_dim, head_dim_v, tile, variant)
    orientation = ":key-major" if kernel_name == "dkdv" and tile.key_major else ""
    return compile_report(src, dtype, head_dim, head_dim_v, arch, tile, f"{kernel_name}:{variant}{orientation}")


def _compile_job(job) -> dict:
    kernel_name, dtype, hd, hdv, arch, variant, tile = job
    return asdict(compile_backward(kernel_name, dtype, hd, hdv, arch, variant, tile))


_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# Tile candidates of --search, best first: (BLOCK_M, BLOCK_N, warps). For dK/dV a wider key block
# (BLOCK_N) means fewer passes over Q and dO (each program reads all of them once), so BLOCK_N leads;
# for dQ the query block (BLOCK_M) leads, for the same reason with K and V.
SEARCH_CANDIDATES = {
    "dkdv": [
        (32, 128, 8),
        (16, 128, 8),
        (64, 64, 8),
        (32, 64, 8),
        (16, 64, 8),
        (32, 64, 4),
        (16, 64, 4),
        (32, 32, 8),
        (32, 32, 4),
        (16, 32, 4),
        (16, 16, 4),
    ],
    "dq": [(128, 64, 8), (128, 32, 8), (64, 64, 8), (64, 32, 8), (64, 32, 4), (32, 32, 4), (32, 16, 4), (16, 16, 4)],
}
# A tile is chosen only if every kernel variant compiles spill-free (ptxas sometimes caps a cheaper
# variant at 128 registers and spills where a costlier one does not).
SEARCH_VARIANTS = tuple(VARIANTS)


# The padded head dims that share a config bucket (the table is keyed by the largest): a tile must
# compile spill-free for each (ptxas spilled at E=32 where the same tile was clean at E=64).
BUCKET_HEAD_DIMS = {64: (64, 32, 16), 128: (128,), 256: (256,)}


def search_tiles(
    kernel_name: str, dtype: torch.dtype, head_dim: int, arch: int, stages: int, pool
) -> list[tuple[TileConfig, list[dict]]]:
    """Compile SEARCH_CANDIDATES[kernel_name] in order (dK/dV: each tile query-major, then
    key-major); stop at the first whose SEARCH_VARIANTS all compile without spills and fit in
    shared memory for every head dim of head_dim's bucket (BUCKET_HEAD_DIMS; a candidate is dropped
    at its first failing head dim). Returns every (tile, reports of one head dim) tried, the chosen
    one last (unless none fit)."""
    tried = []
    orientations = (False, True) if kernel_name == "dkdv" else (False,)
    for bm, bn, warps in SEARCH_CANDIDATES[kernel_name]:
        for key_major in orientations:
            tile = TileConfig(bm, bn, warps, stages, key_major)
            for hd in BUCKET_HEAD_DIMS.get(head_dim, (head_dim,)):
                jobs = [(kernel_name, dtype, hd, hd, arch, v, tile) for v in SEARCH_VARIANTS]
                rows = list(pool.map(_compile_job, jobs))
                tried.append((tile, rows))
                fits = all(
                    r["spill_stores"] == r["spill_loads"] == 0 and r["shared_bytes"] <= r["shared_limit"] for r in rows
                )
                if not fits:
                    break
            else:
                return tried
    return tried


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastattn.aot_backward", description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default="dkdv,dq", help=f"comma list of {','.join(KERNELS)}")
    parser.add_argument("--variants", default="plain", help=f"comma list of {','.join(VARIANTS)}, or 'all'")
    parser.add_argument("--dtypes", default="fp16,bf16,fp32", help="comma list of fp16,bf16,fp32")
    parser.add_argument("--head-dims", default="64,128,256", help="comma list of padded head dims (E == Ev)")
    parser.add_argument("--archs", default="80,90", help="comma list of sm_ numbers")
    parser.add_argument("--tile", default="", help="BLOCK_M,BLOCK_N,warps,stages to try instead of the config")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    parser.add_argument(
        "--search",
        action="store_true",
        help="for each kernel, arch, dtype and head-dim bucket, find the first tile of SEARCH_CANDIDATES that is "
        "spill-free in every variant and head dim of the bucket (sm_90: 3 stages, sm_80: 2); print every compile "
        "tried (the chosen tile's rows come last)",
    )
    args = parser.parse_args(argv)
    variants = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    tile = TileConfig(*(int(x) for x in args.tile.split(","))) if args.tile else None
    jobs = [
        (kernel, _DTYPES[dt], int(hd), int(hd), int(arch), variant, tile)
        for kernel in args.kernels.split(",")
        for arch in args.archs.split(",")
        for dt in args.dtypes.split(",")
        for hd in args.head_dims.split(",")
        for variant in variants
    ]
    if args.search:
        return _search_main(args)
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


def _search_main(args) -> int:
    variants = " | ".join(SEARCH_VARIANTS)
    print(f"| kernel | arch | dtype | E | BM | BN | warps | stages | key-major | {variants} | spill-free |")
    print(f"|---|---|---|---|---|---|---|---|---|{'---|' * len(SEARCH_VARIANTS)}---|")
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for kernel in args.kernels.split(","):
            for arch in (int(a) for a in args.archs.split(",")):
                for dt in args.dtypes.split(","):
                    for hd in (int(h) for h in args.head_dims.split(",")):
                        for t, rows in search_tiles(kernel, _DTYPES[dt], hd, arch, 3 if arch >= 90 else 2, pool):
                            cells = " | ".join(
                                f"{g['registers']} regs, {g['spill_stores']}/{g['spill_loads']} spills"
                                + ("" if g["shared_bytes"] <= g["shared_limit"] else ", over shared")
                                for g in rows
                            )
                            ok = all(g["spill_stores"] == g["spill_loads"] == 0 for g in rows)
                            print(
                                f"| {kernel} | sm_{arch} | {dt} | {rows[0]['head_dim']} | {t.block_m} | {t.block_n} | {t.num_warps} | "
                                f"{t.num_stages} | {'yes' if t.key_major else 'no'} | {cells} | {'yes' if ok else ''} |",
                                flush=True,
                            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ahead-of-time compilation of the launchers' own plans for NVIDIA targets, without a GPU.

``python -m fastattn.fused.aot`` builds, for each kernel variant (causal, ragged lengths, padded
head dims, masks, 64-bit offsets: :data:`VARIANTS`), a problem of meta tensors, asks the
launchers for their launch plans (``plan_forward`` / ``plan_backward``) with the config the
dispatcher would pick for sm_80 or sm_90 in each precision (:data:`PRECISIONS`: fp16, bf16, fp32
with TF32 off, so IEEE matmuls, and with TF32 on), and compiles each planned kernel through
triton's own launch path (:func:`compile_launch`: ``JITFunction.warmup`` with a compile-only
driver for the target). So the constexprs and arguments compiled are the ones a launch passes, and
the specialisation (alignment, integers divisible by 16, integers equal to 1) and the options are
the ones triton derives from them at a launch; nothing here lists them again. The compiled kernels
land in the Triton cache under the keys those launches look up.

It prints, per compiled kernel, registers per thread, spill stores/loads and stack (read from the
cubin by the ``cuobjdump`` inside triton), shared memory against the GPU's limit, and whether the
SASS uses Hopper's warpgroup MMA (HGMMA). ``--search`` finds backward tiles (see
:func:`search_tiles`). Compilation needs the compiled kernel flavour: TRITON_INTERPRET unset or 0.
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

from ..configs import BackwardConfig, TileConfig, padded_head_dim
from ..problem import canonicalize
from . import plumbing as pl
from . import replay

# Opt-in shared memory per block (bytes): A100 (sm_80) 163 KB, H100 (sm_90) 227 KB.
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}
KERNELS = {
    "forward": "attention_forward_kernel",
    "preprocess": "attention_backward_preprocess_kernel",
    "dkdv": "attention_backward_dkdv_kernel",
    "dq": "attention_backward_dq_kernel",
    "combine": "split_kv_combine_kernel",
}
# What a launch computes in: the input dtype and whether fp32 matmuls may use TF32. "fp32" is
# torch's default (torch.backends.cuda.matmul.allow_tf32 False: tl.dot's input_precision "ieee"),
# "tf32" the same fp32 inputs with TF32 allowed.
PRECISIONS = {
    "fp16": (torch.float16, False),
    "bf16": (torch.bfloat16, False),
    "fp32": (torch.float32, False),
    "tf32": (torch.float32, True),
}


@dataclass(frozen=True)
class Variant:
    """A kind of problem the kernels specialise for: causal (top-left), ragged (L, S not block
    multiples), padded (E, Ev not powers of two), mask ("bool" / "float", shape (1, 1, L, S)),
    large (a key stride so large that offsets need 64 bits: LARGE_OFFSETS), window (a sliding
    window's (left, right)), softcap (Gemma 2's 50.0), alibi ((Hq,) slopes), dropout (dropout_p)."""

    causal: bool = False
    ragged: bool = False
    padded: bool = False
    mask: str | None = None
    large: bool = False
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: bool = False
    packed: bool = False
    paged: bool = False
    splits: int = 1
    decode: bool = False
    dropout: float = 0.0


VARIANTS = {
    "plain": Variant(),
    "causal": Variant(causal=True),
    "ragged": Variant(ragged=True),
    "causal-ragged": Variant(causal=True, ragged=True),
    "bool-mask": Variant(mask="bool"),
    "padded-dims": Variant(padded=True),
    "bool-mask-ragged": Variant(mask="bool", ragged=True, padded=True),
    "float-mask-causal": Variant(causal=True, mask="float"),
    "large-offsets": Variant(causal=True, large=True),
    "window": Variant(window=(255, 0)),
    "window-ragged": Variant(window=(200, 0), ragged=True),
    "window-bool-mask": Variant(window=(255, 0), mask="bool", ragged=True),
    "softcap-causal": Variant(causal=True, softcap=50.0),
    "alibi-causal": Variant(causal=True, alibi=True),
    "softcap-alibi-window": Variant(window=(255, 0), softcap=50.0, alibi=True, ragged=True),
    "varlen-causal": Variant(packed=True, window=(-1, 0)),
    "varlen-softcap-alibi-window": Variant(packed=True, window=(255, 0), softcap=50.0, alibi=True),
    "split-decode": Variant(packed=True, window=(-1, 0), splits=4),
    "dense-split-decode": Variant(decode=True, window=(-1, 0), splits=4),
    "paged-split-decode": Variant(packed=True, paged=True, window=(-1, 0), splits=4),
    "dropout": Variant(dropout=0.1),
    "dropout-causal-ragged": Variant(causal=True, ragged=True, dropout=0.1),
    "dropout-bool-mask": Variant(mask="bool", dropout=0.1),
    "dropout-softcap-alibi-window": Variant(window=(255, 0), softcap=50.0, alibi=True, dropout=0.1),
    "varlen-dropout": Variant(packed=True, window=(-1, 0), dropout=0.1),
    "dropout-split-decode": Variant(decode=True, window=(-1, 0), splits=4, dropout=0.1),
}
# Variants of forward-only calls (KV caches are inference only); the combine kernel runs after split ones.
FORWARD_ONLY_VARIANTS = frozenset(name for name, v in VARIANTS.items() if v.paged or v.splits > 1)
# The variants every config must compile spill-free (large-offsets is the rare path: reported).
SPILL_FREE_VARIANTS = tuple(v for v in VARIANTS if v != "large-offsets")


def variant_problem(variant: str, dtype: torch.dtype, head_dim: int, head_dim_v: int):
    """A problem of meta tensors (no memory) with the variant's properties; head dims are padded
    ones (a padded variant takes one less)."""
    v = VARIANTS[variant]
    if v.packed:
        return _packed_variant_problem(v, dtype, head_dim, head_dim_v)
    L = S = 1000 if v.ragged else 1024
    if v.decode:  # one new query against a cache: fastattn.attention's split-KV shape
        L, S = 1, 4096
    E, Ev = (head_dim - 1, head_dim_v - 1) if v.padded else (head_dim, head_dim_v)
    meta = dict(device="meta", dtype=dtype)
    q = torch.empty(2, 2, L, E, **meta)
    if v.large:  # a KV cache view whose rows lie 2**21 elements apart: S * stride reaches 2**31
        k = torch.empty(0, **meta).as_strided((2, 2, S, E), (2 * S * 2**21, S * 2**21, 2**21, 1))
        v_ = torch.empty(0, **meta).as_strided((2, 2, S, Ev), (2 * S * 2**21, S * 2**21, 2**21, 1))
    else:
        k, v_ = torch.empty(2, 2, S, E, **meta), torch.empty(2, 2, S, Ev, **meta)
    mask = None
    if v.mask:
        mask = torch.empty(1, 1, L, S, device="meta", dtype=torch.bool if v.mask == "bool" else dtype)
    alibi = torch.empty(2, device="meta", dtype=torch.float32) if v.alibi else None
    return canonicalize(
        q, k, v_, attn_mask=mask, is_causal=v.causal, window_size=v.window, softcap=v.softcap, alibi_slopes=alibi,
        dropout_p=v.dropout,
    )  # fmt: skip


def _packed_variant_problem(v: Variant, dtype: torch.dtype, head_dim: int, head_dim_v: int):
    """A packed problem of meta tensors: 4 sequences, 1000 query rows each (one each for a
    decode variant, split or paged) against 1000 keys (paged: 16 pages of 64 per sequence)."""
    from ..packed import canonicalize_varlen

    N, Hq, Hkv = 4, 4, 2
    decode = v.splits > 1 or v.paged
    L, S = (1 if decode else 1000), 1024 if v.paged else 1000
    meta = dict(device="meta", dtype=dtype)
    index = dict(device="meta", dtype=torch.int32)
    q = torch.empty(N * L, Hq, head_dim, **meta)
    extra = {}
    if v.paged:
        k = torch.empty(N * S // 64, 64, Hkv, head_dim, **meta)
        v_ = torch.empty(N * S // 64, 64, Hkv, head_dim_v, **meta)
        extra = dict(seqused_k=torch.empty(N, **index), block_table=torch.empty(N, S // 64, **index))
        cu_k = None
    else:
        k, v_ = torch.empty(N * S, Hkv, head_dim, **meta), torch.empty(N * S, Hkv, head_dim_v, **meta)
        cu_k = torch.empty(N + 1, **index)
    alibi = torch.empty(Hq, device="meta", dtype=torch.float32) if v.alibi else None
    return canonicalize_varlen(
        q, k, v_, torch.empty(N + 1, **index), cu_k, L, S, window_size=v.window, enable_gqa=True,
        softcap=v.softcap, alibi_slopes=alibi, num_splits=v.splits, dropout_p=v.dropout, **extra,
    )  # fmt: skip


def plan(
    kernel: str, variant: str, precision: str, head_dim: int, head_dim_v: int, arch: int, tile: TileConfig | None = None
) -> pl.Launch:
    """The launch the launchers plan for `kernel` on this variant's problem in `precision`
    (:data:`PRECISIONS`), for sm_<arch>, with the dispatcher's config (or `tile` for this kernel)."""
    from .backward import choose_config, plan_backward
    from .forward import plan_forward

    dtype, allow_tf32 = PRECISIONS[precision]
    p = variant_problem(variant, dtype, head_dim, head_dim_v)
    target = pl.Target((arch // 10, arch % 10), allow_tf32=allow_tf32)
    out = torch.empty(*p.q.shape[:-1], p.head_dim_v, device="meta", dtype=dtype)
    lse = torch.empty(p.q.shape[:-1], device="meta", dtype=torch.float32)
    if kernel in ("forward", "combine"):
        splits = VARIANTS[variant].splits
        launches = plan_forward(p, out, lse, tile if kernel == "forward" else None, target, num_splits=splits)
        return next(launch for launch in launches if launch.kernel == KERNELS[kernel])
    config = None
    if tile is not None:
        config = choose_config(p, target)
        config = BackwardConfig(tile, config.dq) if kernel == "dkdv" else BackwardConfig(config.dkdv, tile)
    grads = tuple(torch.empty_like(t) for t in (p.q, p.k, p.v))
    launches = plan_backward(p, out, lse, torch.empty_like(out), torch.empty_like(lse), grads, config, target)
    return next(launch for launch in launches if launch.kernel == KERNELS[kernel])


def compile_launch(launch: pl.Launch, arch: int):
    """Compile `launch` for sm_<arch> through triton's own launch path (``JITFunction.warmup``:
    ``run`` without the launch), so the kernel is specialised exactly as a launch with these
    arguments specialises it on such a GPU: pointers by 16-byte alignment (meta tensors count as
    aligned, as the caching allocator's are), every integer by divisibility by 16 and equality to 1
    (then a constant), floats as fp32, with the options a launch parses. The compiled kernel goes
    to the Triton cache under the key that launch would look up. Returns triton's CompiledKernel."""
    from .kernels import interpreted

    if interpreted():
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset or 0")
    fn = launch.jit_function()
    names = {param.name for param in fn.params}
    unknown = (set(launch.args) | set(launch.constexprs)) - names
    if unknown:
        raise TypeError(f"{launch.kernel}: the launch passes arguments the kernel does not take: {sorted(unknown)}")
    missing = names - set(launch.args) - set(launch.constexprs)
    if missing:
        raise TypeError(f"{launch.kernel}: the launch does not pass {sorted(missing)}")
    with replay.compile_only(arch):
        return fn.warmup(
            **launch.args, **launch.constexprs, grid=launch.grid, num_warps=launch.num_warps,
            num_stages=launch.num_stages,
        )  # fmt: skip


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


def compile_kernel(
    kernel: str,
    precision: str,
    head_dim: int,
    head_dim_v: int,
    arch: int,
    variant: str = "plain",
    tile: TileConfig | None = None,
) -> CompileReport:
    """Compile one planned kernel for sm_<arch> and report its resource use. The report's variant
    is the variant's name for the forward, "<kernel>:<variant>" for the backward kernels, with
    ":key-major" appended for a key-major dK/dV tile."""
    launch = plan(kernel, variant, precision, head_dim, head_dim_v, arch, tile)
    compiled = compile_launch(launch, arch)
    regs, st, ld, stack, hgmma = _resource_usage(compiled.asm["cubin"])
    name = variant if kernel == "forward" else f"{kernel}:{variant}"
    if kernel == "dkdv" and launch.tile.key_major:
        name += ":key-major"
    return CompileReport(
        arch=arch,
        dtype=precision,
        head_dim=head_dim,
        head_dim_v=head_dim_v,
        block_m=launch.tile.block_m,
        block_n=launch.tile.block_n,
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
        variant=name,
        registers=regs,
        spill_stores=st,
        spill_loads=ld,
        stack_bytes=stack,
        shared_bytes=compiled.metadata.shared,
        shared_limit=SHARED_MEMORY_LIMIT[arch],
        hgmma=hgmma,
    )


def _compile_job(job) -> dict:
    return asdict(compile_kernel(*job))


def format_row(r: dict) -> str:
    fits = r["shared_bytes"] <= r["shared_limit"]
    return (
        f"| sm_{r['arch']} | {r['dtype']} | {r['head_dim']} | {r['head_dim_v']} | {r['block_m']} | {r['block_n']} | "
        f"{r['num_warps']} | {r['num_stages']} | {r['variant']} | {r['registers']} | "
        f"{r['spill_stores']}/{r['spill_loads']} | {r['stack_bytes']} | "
        f"{r['shared_bytes'] / 1024:.1f}{'' if fits else ' (over!)'} | {'yes' if r['hgmma'] else 'no'} |"
    )


TABLE_HEADER = (
    "| arch | dtype | E | Ev | BM | BN | warps | stages | variant | regs | spill st/ld | stack | shared KB | HGMMA |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)

# Tile candidates of --search, best first: (BLOCK_M, BLOCK_N, warps). For dK/dV a wider key block
# (BLOCK_N) means fewer passes over Q and dO (each program reads all of them once), so BLOCK_N leads;
# for dQ the query block (BLOCK_M) leads, for the same reason with K and V. IEEE fp32 ("fp32":
# tl.dot on the FMA units, operands in registers) has its own, smaller lists; decode tiles keep
# 16 query rows (configs.decode_tile).
SEARCH_CANDIDATES = {
    "dkdv": [(32, 128, 8), (16, 128, 8), (64, 64, 8), (32, 64, 8), (16, 64, 8), (32, 64, 4), (16, 64, 4),
             (32, 32, 8), (32, 32, 4), (16, 32, 4), (16, 16, 4)],
    "dq": [(128, 64, 8), (128, 32, 8), (64, 64, 8), (64, 32, 8), (64, 32, 4), (32, 32, 4), (32, 16, 4), (16, 16, 4)],
    "forward": [(128, 64, 8), (128, 32, 8), (64, 64, 8), (64, 32, 8), (64, 32, 4), (32, 32, 4), (32, 16, 4),
                (16, 16, 4)],
    "decode": [(16, 64, 4), (16, 32, 4), (16, 16, 4)],
}  # fmt: skip
IEEE_SEARCH_CANDIDATES = {
    "dkdv": [(32, 32, 8), (16, 32, 8), (32, 32, 4), (16, 32, 4), (16, 16, 8), (16, 16, 4)],
    "dq": [(32, 32, 8), (32, 16, 8), (32, 32, 4), (16, 32, 8), (16, 16, 8), (16, 16, 4)],
    "forward": [(64, 32, 8), (32, 32, 8), (64, 32, 4), (32, 32, 4), (16, 32, 8), (32, 16, 4), (16, 32, 4),
                (16, 16, 8), (16, 16, 4)],
    "decode": [(16, 32, 4), (16, 32, 8), (16, 16, 4), (16, 16, 8)],
}  # fmt: skip
# The padded head dims that share a config bucket (the table is keyed by the largest): a tile must
# compile spill-free for each (ptxas spilled at E=32 where the same tile was clean at E=64).
BUCKET_HEAD_DIMS = {64: (64, 32, 16), 128: (128,), 256: (256,)}


def search_variants(kernel: str) -> list[str]:
    """The SPILL_FREE_VARIANTS a search of `kernel` compiles, those that most often spill first (a
    failing candidate is dropped at its first failing chunk): "decode" the split-KV decode
    variants, "forward" the others, the backward kernels those a backward runs."""
    decode = [v for v in SPILL_FREE_VARIANTS if VARIANTS[v].splits > 1 or VARIANTS[v].paged]
    if kernel == "decode":
        names = decode
    elif kernel == "forward":
        names = [v for v in SPILL_FREE_VARIANTS if v not in decode]
    else:
        names = [v for v in SPILL_FREE_VARIANTS if v not in FORWARD_ONLY_VARIANTS]
    return sorted(names, key=lambda v: ("varlen" not in v, "ragged" not in v, v))


def _spill_free(rows: list[dict]) -> bool:
    return all(r["spill_stores"] == r["spill_loads"] == 0 and r["shared_bytes"] <= r["shared_limit"] for r in rows)


def search_tiles(
    kernel: str,
    precision: str,
    head_dim: int,
    arch: int,
    stages: int,
    pool,
    jobs: int = 2,
    variants: list[str] | None = None,
    candidates: list[tuple[int, int, int]] | None = None,
) -> list[tuple[TileConfig, list[dict]]]:
    """Compile the candidates (SEARCH_CANDIDATES[kernel], IEEE_SEARCH_CANDIDATES for "fp32") in
    order (dK/dV: each tile query-major, then key-major); stop at the first that compiles without
    spills (ptxas sometimes caps a cheaper variant at 128 registers and spills where a costlier
    one does not) and fits in shared memory in every :func:`search_variants` variant and every
    head dim of head_dim's bucket (BUCKET_HEAD_DIMS). Variants compile `jobs` at a time; a
    candidate is dropped at its first failing chunk. Returns every (tile, reports of one head dim)
    tried, the chosen one last (unless none fit). "decode" searches the forward kernel's decode tile;
    `variants` replaces search_variants' (e.g. the dropout variants, for a dropout-only tile) and
    `candidates` the candidate list."""
    tried = []
    table = IEEE_SEARCH_CANDIDATES if precision == "fp32" else SEARCH_CANDIDATES
    compiled_kernel = "forward" if kernel == "decode" else kernel
    orientations = (False, True) if kernel == "dkdv" else (False,)
    variants = variants or search_variants(kernel)
    for bm, bn, warps in candidates or table[kernel]:
        for key_major in orientations:
            tile = TileConfig(bm, bn, warps, stages, key_major)
            for hd in BUCKET_HEAD_DIMS.get(head_dim, (head_dim,)):
                rows = []
                for i in range(0, len(variants), jobs):
                    chunk = [(compiled_kernel, precision, hd, hd, arch, v, tile) for v in variants[i : i + jobs]]
                    rows += pool.map(_compile_job, chunk)
                    if not _spill_free(rows):
                        break
                tried.append((tile, rows))
                if not _spill_free(rows):
                    break
            else:
                return tried
    return tried


def _search_main(args, pool) -> int:
    variants = None if not args.variants else (list(VARIANTS) if args.variants == "all" else args.variants.split(","))
    candidates = [tuple(int(x) for x in c.split(",")) for c in args.candidates.split(";") if c] or None
    print(
        "| kernel | arch | dtype | E | BM | BN | warps | stages | key-major | compiles | worst variant | spill-free |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kernel in args.kernels.split(","):
        for arch in (int(a) for a in args.archs.split(",")):
            for dt in args.dtypes.split(","):
                stages = args.stages or (3 if arch >= 90 else 2)
                for hd in (int(h) for h in args.head_dims.split(",")):
                    found = search_tiles(kernel, dt, hd, arch, stages, pool, max(1, args.jobs), variants, candidates)
                    for t, rows in found:
                        worst = max(rows, key=lambda g: (g["spill_stores"] + g["spill_loads"], g["registers"]))
                        note = (
                            f"{worst['variant']}: {worst['registers']} regs, "
                            f"{worst['spill_stores']}/{worst['spill_loads']} spills"
                            + ("" if worst["shared_bytes"] <= worst["shared_limit"] else ", over shared")
                        )
                        print(
                            f"| {kernel} | sm_{arch} | {dt} | {rows[0]['head_dim']} | {t.block_m} | {t.block_n} | "
                            f"{t.num_warps} | {t.num_stages} | {'yes' if t.key_major else 'no'} | {len(rows)} | "
                            f"{note} | {'yes' if _spill_free(rows) else ''} |",
                            flush=True,
                        )
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastattn.fused.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"comma list of {','.join(KERNELS)}")
    parser.add_argument(
        "--variants", default="",
        help=f"comma list of {','.join(VARIANTS)}, or 'all' (default: plain; --search: each kernel's search_variants)",
    )  # fmt: skip
    parser.add_argument(
        "--dtypes",
        default="fp16,bf16,fp32,tf32",
        help="comma list of fp16,bf16,fp32 (TF32 off: IEEE fp32 matmuls),tf32",
    )
    parser.add_argument("--head-dims", default="16,32,64,128,256", help="comma list of padded head dims")
    parser.add_argument("--all-pairs", action="store_true", help="every (E, Ev) pair of --head-dims, not only E == Ev")
    parser.add_argument("--archs", default="80,90", help="comma list of sm_ numbers")
    parser.add_argument("--tile", default="", help="BLOCK_M,BLOCK_N,warps,stages[,key_major] instead of the config")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    parser.add_argument(
        "--search",
        action="store_true",
        help="for each kernel (forward, decode, dkdv, dq), arch, dtype and head-dim bucket, find the first tile "
        "of SEARCH_CANDIDATES (fp32: IEEE_SEARCH_CANDIDATES) that is spill-free in every variant and head dim "
        "of the bucket (stages: --stages, else sm_90 3, sm_80 2); print each candidate tried (the chosen last)",
    )
    parser.add_argument("--stages", type=int, default=0, help="pipeline stages of --search's candidates")
    parser.add_argument("--candidates", default="", help="--search's candidates instead: BLOCK_M,BLOCK_N,warps;...")
    args = parser.parse_args(argv)
    for h in args.head_dims.split(","):
        if padded_head_dim(int(h)) != int(h):
            parser.error(f"--head-dims takes padded head dims (powers of two from 16), got {h}")
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        if args.search:
            return _search_main(args, pool)
        variants = list(VARIANTS) if args.variants == "all" else (args.variants or "plain").split(",")
        tile = TileConfig(*(int(x) for x in args.tile.split(","))) if args.tile else None
        dims = [int(d) for d in args.head_dims.split(",")]
        pairs = [(a, b) for a in dims for b in dims] if args.all_pairs else [(d, d) for d in dims]
        jobs = [
            (kernel, dt, hd, hdv, int(arch), variant, tile)
            for kernel in args.kernels.split(",")
            for arch in args.archs.split(",")
            for dt in args.dtypes.split(",")
            for hd, hdv in pairs
            for variant in variants
            if (kernel in ("forward", "combine") or variant not in FORWARD_ONLY_VARIANTS)
            and (kernel != "combine" or VARIANTS[variant].splits > 1)
        ]
        if not args.json:
            print(TABLE_HEADER)
        bad = 0
        for r in pool.map(_compile_job, jobs):
            bad += r["shared_bytes"] > r["shared_limit"]
            print(json.dumps(r) if args.json else format_row(r), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

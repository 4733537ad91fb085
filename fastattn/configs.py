"""Every tunable of fastattn in one place, kept apart from the code that uses it.

- The Triton kernels: ``forward_config`` and ``backward_config`` map (padded head dims, dtype,
  GPU capability, tensor mask or not) to block sizes, warps and pipeline stages (a
  :class:`TileConfig` per kernel). ``set_forward_config(fn)`` / ``set_backward_config(fn)``
  replace either choice with a function of the same signature (None restores the built-in one).
  Every config a built-in function can return is compiled ahead of time for sm_80 and sm_90 by
  the tests (``CONFIG_SPACE`` lists the keys). ``preprocess_config`` sizes the backward's
  preprocess kernel.
- The PyTorch paths: ``CPU_FORWARD_TILES`` and ``CPU_BACKWARD_TILES``, read at each call;
  ``CPU_SDPA_BACKWARD``, whether the "cpu" backend differentiates what SDPA's CPU kernel computed
  with SDPA's own backward op (read at each backward).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TileConfig:
    """Tiles of one Triton kernel: BLOCK_M query rows by BLOCK_N keys, warps, pipeline stages.

    key_major (the dK/dV kernel only): compute its score tiles as K Q^T (keys along rows, K and V
    in registers) instead of Q K^T (K and V read by the MMA from shared memory, P and dS
    transposed); see fused.kernels.backward."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    key_major: bool = False


ForwardConfig = TileConfig  # the forward kernel's tiles (key_major does not apply)


@dataclass(frozen=True)
class BackwardConfig:
    """Tiles of the two backward kernels: dkdv (BLOCK_N keys per program, BLOCK_M query rows per
    step) and dq (BLOCK_M query rows per program, BLOCK_N keys per step)."""

    dkdv: TileConfig
    dq: TileConfig


@dataclass(frozen=True)
class CpuTiles:
    """Tiles of the PyTorch tiled paths: query rows and keys per score tile, and (forward) how
    many score elements a (batch, head) chunk's tile may hold (it should stay in cache)."""

    block_m: int
    block_n: int
    tile_elements: int = 0


CPU_FORWARD_TILES = CpuTiles(256, 512, 1 << 20)  # a 4 MiB fp32 score tile: fewer, larger ops; it stays in L3
CPU_BACKWARD_TILES = CpuTiles(128, 256)
# SDPA's CPU backward op gives SDPA's own gradients, at SDPA's speed; on some CPUs they are several
# times less accurate than the float32 reference (AMD EPYC, AVX2: up to ~5x at ordinary logits, up to
# ~30x for dV with logits ~1e3 at head dim 128, measured). False: fastattn's tiled backward there
# too (the reference's accuracy; it recomputes the row statistics with one tiled forward first).
CPU_SDPA_BACKWARD = True


def padded_head_dim(d: int) -> int:
    """Head dims are padded to a power of two (and at least 16, tl.dot's minimum)."""
    return max(16, 1 << (d - 1).bit_length())


def _bucket(head_dim: int, head_dim_v: int) -> int:
    return next(b for b in (64, 128, 256) if max(head_dim, head_dim_v) <= b)


# (Hopper or newer, precision, head-dim bucket, tensor mask) -> (BLOCK_M, BLOCK_N, warps, stages);
# precision "16-bit" (fp16 and bf16) or "tf32" (fp32 with TF32 allowed; IEEE fp32 has _IEEE_FORWARD).
# Chosen as the largest tiles that compile without register spills, compiled as launched
# (python -m fastattn.fused.aot: triton's own specialisation; triton 3.6 and 3.9, the tests
# re-check every entry; benchmarks/results/aot/as_launched_triton-3.9.md). Masked kernels load a (BLOCK_M, BLOCK_N) mask tile and
# convert its layout, which costs registers: they get narrower key blocks, and so do the score
# modifiers' kernels (sliding window, softcap, ALiBi: fused.plumbing.masked_tiles), whose wider
# tiles spilled. Not yet tuned by timing on a GPU.
_FORWARD_TABLE = {
    (True, "16-bit", 64, False): (128, 128, 8, 3),
    (True, "16-bit", 64, True): (128, 32, 8, 3),
    (True, "16-bit", 128, False): (128, 64, 8, 3),
    (True, "16-bit", 128, True): (64, 32, 8, 3),
    (True, "16-bit", 256, False): (64, 16, 8, 3),
    (True, "16-bit", 256, True): (64, 16, 8, 3),
    (True, "tf32", 64, False): (128, 32, 8, 3),
    (True, "tf32", 64, True): (128, 32, 8, 3),
    (True, "tf32", 128, False): (32, 32, 4, 3),
    (True, "tf32", 128, True): (32, 32, 4, 3),  # as launched, 3 stages are spill-free (once they spilled)
    (True, "tf32", 256, False): (32, 32, 4, 3),
    (True, "tf32", 256, True): (32, 16, 4, 3),
    (False, "16-bit", 64, False): (128, 64, 8, 2),  # 128x128 spilled 5 in causal once kernels took Stats
    (False, "16-bit", 64, True): (128, 16, 8, 2),  # 128x32 spilled 2 in window-bool-mask once kernels took Stats
    (False, "16-bit", 128, False): (64, 32, 4, 2),
    (False, "16-bit", 128, True): (64, 32, 8, 2),
    (False, "16-bit", 256, False): (64, 32, 8, 2),
    (False, "16-bit", 256, True): (64, 16, 8, 2),
    (False, "tf32", 64, False): (128, 32, 8, 2),
    (False, "tf32", 64, True): (128, 32, 8, 2),
    (False, "tf32", 128, False): (32, 32, 4, 2),
    (False, "tf32", 128, True): (32, 32, 8, 2),  # as launched, 64x32 spilled with modifiers and in varlen
    (False, "tf32", 256, False): (32, 32, 4, 2),
    (False, "tf32", 256, True): (16, 16, 4, 2),
}


# (Hopper or newer, precision as above, head-dim bucket) -> ((dK/dV tiles), (dQ tiles)): dK/dV
# (BLOCK_M, BLOCK_N, warps, stages, key_major), dQ (BLOCK_M, BLOCK_N, warps, stages). dK/dV: the
# first tile of fused.aot.SEARCH_CANDIDATES (widest key block first) that compiles without register
# spills in every kernel variant (causal, ragged L/S, padded head dims, bool/float masks) and every
# padded head dim of the bucket (16, 32, 64 share the 64 entry), query-major
# tried before key-major, found with triton 3.9 by `python -m fastattn.fused.aot --search`
# (benchmarks/results/aot/backward_search_triton-3.9.md), and re-searched where a tile spilled
# once compiled as launched (the entries marked so; benchmarks/results/aot/as_launched_*.md).
# float16 stands for both 16-bit dtypes. dQ: the largest spill-free tiles of the same variants.
# Not yet tuned by timing on a GPU.
_BACKWARD_TABLE = {
    (True, "16-bit", 64): ((16, 128, 8, 3, False), (128, 32, 8, 3)),  # dK/dV 32x128 spilled in varlen on 3.6
    (True, "16-bit", 128): ((16, 64, 8, 3, False), (64, 32, 4, 3)),  # 32x64 and dQ 8 warps spilled on 3.6
    (True, "16-bit", 256): ((32, 32, 8, 3, False), (32, 16, 4, 3)),
    (True, "tf32", 64): ((32, 128, 8, 3, True), (128, 32, 8, 3)),
    (True, "tf32", 128): ((16, 16, 4, 3, True), (32, 32, 4, 3)),  # as launched, dK/dV 32x32, dQ 16x16 spilled
    (True, "tf32", 256): ((32, 32, 8, 3, False), (16, 16, 4, 3)),
    (False, "16-bit", 64): ((16, 64, 8, 2, False), (128, 32, 8, 2)),
    (False, "16-bit", 128): ((32, 64, 8, 2, False), (64, 32, 8, 2)),
    (False, "16-bit", 256): ((16, 16, 4, 2, False), (32, 16, 4, 2)),
    (False, "tf32", 64): ((32, 32, 4, 2, False), (128, 32, 8, 2)),
    (False, "tf32", 128): ((16, 64, 8, 2, False), (32, 16, 4, 2)),
    (False, "tf32", 256): ((16, 16, 4, 2, True), (16, 16, 4, 2)),
}

# Where the table's dK/dV tile spills once a score modifier (sliding window, softcap, ALiBi:
# fused.plumbing.modified_scores) is on, the tile such calls take instead: the first tried that
# compiles spill-free in every modifier variant, and in the mask variants a modifier can come with,
# at each padded head dim of the bucket (python -m fastattn.fused.aot --tile ...). Calls with a mask
# alone keep the table's tile, searched spill-free for them. sm_90 float32 up to E = 64 takes 4
# warps, not 8: with 8 the packed calls' variant (varlen-softcap-alibi-window) spilled 5 registers.
_BACKWARD_MODIFIED_DKDV = {
    (True, "tf32", 64): (16, 64, 4, 3, True),
    (False, "16-bit", 64): (16, 64, 8, 2, True),
    (False, "tf32", 64): (16, 16, 4, 2, True),
}

# Where the dK/dV tile (the table's, or the modified one) spills once dropout is on (a Philox
# call per score, in both the dV and the dP products), the tile dropout calls take instead: the
# first spill-free in the dropout variants of fused.aot (alone, causal ragged, bool mask, with
# softcap + ALiBi + window, packed) at E = 64 and 128 with triton 3.9
# (python -m fastattn.fused.aot --kernels dkdv --variants dropout,... --tile ...;
# benchmarks/results/aot/dropout_triton-3.9.md).
_BACKWARD_DROPOUT_DKDV = {
    (True, "tf32", 64): (16, 16, 4, 3, False),
    (False, "16-bit", 64): (16, 32, 4, 2, False),
    (False, "16-bit", 128): (16, 64, 8, 2, False),
    (False, "tf32", 64): (16, 32, 2, 2, False),
}

# IEEE fp32 (fp32 inputs with TF32 off, torch's default): tl.dot then runs on the FMA units and
# keeps its operands in registers, so the 16-bit/TF32 tiles spill, compiled as launched (up to
# thousands of spill stores). These came from `python -m fastattn.fused.aot --search --dtypes fp32
# --stages 2` (fused.aot.IEEE_SEARCH_CANDIDATES; benchmarks/results/aot/ieee_search_triton-3.9.md),
# the first spill-free tile in every variant and padded head dim of the bucket where there is
# one: the forward and decode everywhere; the backward at E = 128 (dK/dV key-major). At E <= 64
# and E = 256 no candidate compiled spill-free in every variant (a few spill stores remain, up to
# 16 in dK/dV at 256: the AOT tests report these, they do not require 0); the E = 128 tiles are used
# there (dK/dV at 256: the fewest spills found). Eight warps: each thread holds less of the FMA
# operands than with four. sm_80 searched apart where the sm_90 tile spilled there.
_IEEE_FORWARD = {
    (hopper, bucket, masked): (32, 32, 8, 2) if (not hopper and bucket == 64) else (16, 32, 8, 2)
    for hopper in (True, False) for bucket in (64, 128, 256) for masked in (True, False)
}  # fmt: skip
_IEEE_DECODE = {
    (True, 64): (16, 32, 4, 2), (True, 128): (16, 32, 8, 2), (True, 256): (16, 32, 8, 2),
    (False, 64): (16, 32, 4, 2), (False, 128): (16, 32, 4, 2), (False, 256): (16, 32, 8, 2),
}  # fmt: skip
_IEEE_BACKWARD = {  # ((dK/dV), (dQ))
    (True, 64): ((16, 32, 8, 2, True), (32, 16, 8, 2)),
    (True, 128): ((16, 32, 8, 2, True), (32, 16, 8, 2)),
    (True, 256): ((16, 16, 8, 2, True), (32, 16, 8, 2)),
    (False, 64): ((32, 32, 8, 2, True), (16, 16, 8, 2)),
    (False, 128): ((32, 32, 8, 2, True), (16, 16, 8, 2)),
    (False, 256): ((16, 16, 8, 2, True), (16, 16, 8, 2)),
}

# The interpreter runs each program in numpy: small tiles exercise the multi-block logic on the
# tests' short sequences, and cost little.
_INTERPRETER_TILE = TileConfig(32, 32, 4, 1)


def _kind(dtype: torch.dtype, allow_tf32: bool) -> str:
    """The tables' precision key: "16-bit" (fp16/bf16 MMAs), "tf32" (fp32 inputs, TF32 allowed:
    tensor-core MMAs) or "ieee" (fp32 with TF32 off, torch's default: tl.dot in IEEE fp32, which
    Triton runs on the FMA units, with registers for operands the MMAs would read from shared
    memory)."""
    if dtype != torch.float32:
        return "16-bit"
    return "tf32" if allow_tf32 else "ieee"


def decode_tile(
    head_dim: int, head_dim_v: int, dtype: torch.dtype, capability: tuple[int, int], allow_tf32: bool = False
) -> TileConfig:
    """The forward tile of decode shapes (at most 16 query rows per program, no mask): 16 rows, the
    fewest tl.dot takes (Hopper's warpgroup MMA needs 64, so these use the sm_80 instructions:
    decoding is bound by reading K and V, not by the MMAs), 4 warps, and key blocks as wide as
    compile spill-free on sm_80 and sm_90 for the packed, split and paged variants (fused.aot): 16-bit
    64 keys up to E = 64, 32 at 128, 16 at 256; float32 32. Not yet timed on a GPU."""
    wide = max(head_dim, head_dim_v)
    hopper = capability[0] >= 9
    kind = _kind(dtype, allow_tf32)
    if kind == "ieee":
        return TileConfig(*_IEEE_DECODE[(hopper, _bucket(head_dim, head_dim_v))])
    if kind == "tf32":
        return TileConfig(16, 32, 4, 2 if wide > 128 or not hopper else 3)
    if wide <= 64:
        return TileConfig(16, 64, 4, 3 if hopper else 2)
    if wide <= 128:
        return TileConfig(16, 32, 4, 2)
    return TileConfig(16, 16, 4, 3)


def default_forward_config(
    head_dim: int,
    head_dim_v: int,
    dtype: torch.dtype,
    capability: tuple[int, int] | None,
    masked: bool = False,
    decode: bool = False,
    allow_tf32: bool = False,
) -> TileConfig:
    """The built-in forward choice. head_dim/head_dim_v are padded; capability None = Triton's
    interpreter; decode: at most 16 query rows per program and no mask (:func:`decode_tile`);
    allow_tf32: fp32 matmuls may use TF32 (else IEEE fp32: :data:`_IEEE_FORWARD`)."""
    if capability is None:
        return _INTERPRETER_TILE
    if decode:
        return decode_tile(head_dim, head_dim_v, dtype, capability, allow_tf32)
    kind, bucket = _kind(dtype, allow_tf32), _bucket(head_dim, head_dim_v)
    if kind == "ieee":
        return TileConfig(*_IEEE_FORWARD[(capability[0] >= 9, bucket, masked)])
    return TileConfig(*_FORWARD_TABLE[(capability[0] >= 9, kind, bucket, masked)])


def default_backward_config(
    head_dim: int,
    head_dim_v: int,
    dtype: torch.dtype,
    capability: tuple[int, int] | None,
    masked: bool = False,
    modified: bool = False,
    dropout: bool = False,
    allow_tf32: bool = False,
) -> BackwardConfig:
    """The built-in backward choice (the forward's arguments, plus modified: a score modifier or
    dropout is on; dropout: dropout is). Each table entry was searched spill-free in every variant
    of the mask-and-causal kernels, masked ones included (masked changes nothing); modified takes
    _BACKWARD_MODIFIED_DKDV's dK/dV tile where there is one, dropout _BACKWARD_DROPOUT_DKDV's.
    IEEE fp32 (allow_tf32 False) takes :data:`_IEEE_BACKWARD`."""
    if capability is None:
        return BackwardConfig(_INTERPRETER_TILE, _INTERPRETER_TILE)
    kind, bucket = _kind(dtype, allow_tf32), _bucket(head_dim, head_dim_v)
    if kind == "ieee":
        dkdv, dq = _IEEE_BACKWARD[(capability[0] >= 9, bucket)]
        return BackwardConfig(TileConfig(*dkdv), TileConfig(*dq))
    key = (capability[0] >= 9, kind, bucket)
    dkdv, dq = _BACKWARD_TABLE[key]
    if modified:
        dkdv = _BACKWARD_MODIFIED_DKDV.get(key, dkdv)
    if dropout:
        dkdv = _BACKWARD_DROPOUT_DKDV.get(key, dkdv)
    return BackwardConfig(TileConfig(*dkdv), TileConfig(*dq))


def preprocess_config(head_dim_v: int) -> TileConfig:
    """The backward's preprocess kernel (delta = rowsum(dO * O)): rows per program so that each holds
    2048 elements of O and dO (no spills), 4 warps, no pipelining (it streams each row once)."""
    return TileConfig(max(16, 2048 // head_dim_v), 0, 4, 1)


# (padded head_dim, padded head_dim_v, dtype, capability) the dispatcher can meet on sm_80 and sm_90
# (fp32 twice over: with TF32 and without, the allow_tf32 keyword).
CONFIG_SPACE = [
    (hd, hdv, dtype, cap)
    for cap in ((8, 0), (9, 0))
    for dtype in (torch.float16, torch.bfloat16, torch.float32)
    for hd in (16, 32, 64, 128, 256)
    for hdv in (16, 32, 64, 128, 256)
]
FORWARD_CONFIG_SPACE = CONFIG_SPACE

_DEFAULTS: dict[str, Callable] = {"forward": default_forward_config, "backward": default_backward_config}
_chosen: dict[str, Callable] = dict(_DEFAULTS)


def _config(kind: str, head_dim, head_dim_v, dtype, capability, masked, **more):
    fn = _chosen[kind]
    if more and fn is not _DEFAULTS[kind]:  # a user's function gets the keywords it declares
        params = inspect.signature(fn).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            more = {k: v for k, v in more.items() if k in params}
    return fn(head_dim, head_dim_v, dtype, capability, masked=masked, **more)


def _replace(kind: str, fn: Callable | None) -> None:
    if fn is not None and not callable(fn):
        raise TypeError(f"set_{kind}_config takes a function or None, got {type(fn).__name__}")
    _chosen[kind] = fn or _DEFAULTS[kind]


def forward_config(
    head_dim: int,
    head_dim_v: int,
    dtype: torch.dtype,
    capability: tuple[int, int] | None,
    masked: bool = False,
    decode: bool = False,
    allow_tf32: bool = False,
) -> TileConfig:
    """The forward tiles the launcher uses (the built-in choice unless replaced); masked: the scores
    get element-wise work beyond causality (a tensor attn_mask or a score modifier); decode: at
    most 16 query rows per program, no mask; allow_tf32: fp32 matmuls may use TF32 (torch's flag;
    a replacement function gets decode and allow_tf32 if it declares them)."""
    return _config("forward", head_dim, head_dim_v, dtype, capability, masked, decode=decode, allow_tf32=allow_tf32)


def backward_config(
    head_dim: int,
    head_dim_v: int,
    dtype: torch.dtype,
    capability: tuple[int, int] | None,
    masked: bool = False,
    modified: bool = False,
    dropout: bool = False,
    allow_tf32: bool = False,
) -> BackwardConfig:
    """The backward tiles the launcher uses (the built-in choice unless replaced); masked: a tensor
    attn_mask, modified: a score modifier or dropout, dropout: dropout, allow_tf32: fp32 matmuls
    may use TF32 (a replacement function gets `modified`, `dropout` and `allow_tf32` if it
    declares them)."""
    return _config(
        "backward", head_dim, head_dim_v, dtype, capability, masked, modified=modified, dropout=dropout,
        allow_tf32=allow_tf32,
    )  # fmt: skip


def set_forward_config(fn: Callable[..., TileConfig] | None) -> None:
    """Replace the forward config function (forward_config's signature); None restores the built-in one."""
    _replace("forward", fn)


def set_backward_config(fn: Callable[..., BackwardConfig] | None) -> None:
    """Replace the backward config function (backward_config's signature); None restores the built-in one."""
    _replace("backward", fn)


MAX_KV_SPLITS = 64


def kv_splits(programs: int, max_k: int, block_n: int, sm_count: int | None) -> int:
    """The split-KV factor the forward launcher picks when the caller does not: 1 when the
    programs already fill the GPU (or off a GPU: sm_count None), else enough splits for about two
    waves of programs, each split keeping at least 4 key blocks, at most MAX_KV_SPLITS."""
    if sm_count is None or programs <= 0 or programs >= sm_count:
        return 1
    by_work = max(1, max_k // (4 * block_n))
    return max(1, min(MAX_KV_SPLITS, math.ceil(2 * sm_count / programs), by_work))

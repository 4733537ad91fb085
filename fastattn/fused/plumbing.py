"""Host code every Triton launcher shares: a launch as data, and what goes into one.

A launcher turns a problem into a list of :class:`Launch` plans (one per batch chunk) and runs
them; the AOT tool compiles the same plans for sm_80 / sm_90 (``fused/aot.py``), so what it
reports is what the launchers would launch. Here: the target (compiled GPU or interpreter), the
input precision, the split float64 scale, 64-bit offsets, batch chunks, named strides, the mask
operand, and :func:`feature_launch_args`, the one place where a call's features become kernel
constexprs and scalars.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .. import dropout
from ..configs import TileConfig, padded_head_dim
from ..features import FEATURES, SCORE_MODIFIERS
from ..problem import Problem

LOG2E = 1.4426950408889634  # exp2 is one instruction: the kernels fold log2(e) into the scale
# CUDA limits grid dims y and z to 65535; the batch axis is launched in chunks of at most this.
MAX_GRID_YZ = 65535
# Kernel integer offsets start * stride are 32-bit unless one can reach this (then LARGE_OFFSETS).
OFFSET_LIMIT = 2**31


@dataclass(frozen=True)
class Target:
    """Where kernels run: capability (major, minor) of the GPU they compile for, or None for
    Triton's interpreter; allow_tf32: fp32 matmuls may use TF32 (torch's flag at launch)."""

    capability: tuple[int, int] | None
    allow_tf32: bool = False

    @classmethod
    def of(cls, p: Problem) -> Target:
        """The target of a launch for `p` in this process (inside :func:`recording`, its target)."""
        from .kernels import interpreted

        if _recorder is not None:
            return _recorder[0]
        if interpreted() or p.device.type != "cuda":
            return cls(None)
        return cls(torch.cuda.get_device_capability(p.device), torch.backends.cuda.matmul.allow_tf32)

    def input_precision(self, dtype: torch.dtype) -> str:
        """tl.dot's input_precision: IEEE in the interpreter and for fp32 unless TF32 is allowed."""
        if self.capability is None:
            return "ieee"
        if dtype == torch.float32:
            return "tf32" if self.allow_tf32 else "ieee"
        return "tf32"  # ignored for 16-bit operands (float64 runs only interpreted)


@dataclass
class Launch:
    """One kernel launch: `kernel` (a name in fused.kernels.<module>), its grid, every runtime
    argument by name (tensors, ints, floats) and every constexpr, and the tile it was planned with."""

    module: str
    kernel: str
    grid: tuple[int, int, int]
    args: dict[str, object]
    constexprs: dict[str, object]
    tile: TileConfig
    num_warps: int = field(init=False)
    num_stages: int = field(init=False)

    def __post_init__(self):
        self.num_warps, self.num_stages = self.tile.num_warps, self.tile.num_stages

    def jit_function(self):
        import importlib

        return getattr(importlib.import_module(f"{__package__}.kernels.{self.module}"), self.kernel)

    def __call__(self) -> None:
        self.jit_function()[self.grid](
            **self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages
        )


# (target, launches) while recording(): run() appends instead of launching.
_recorder: tuple[Target, list[Launch]] | None = None


@contextlib.contextmanager
def recording(target: Target) -> Iterator[list[Launch]]:
    """Plan without running: inside, :meth:`Target.of` answers `target` and :func:`run` appends
    each launch to the yielded list instead of launching it. With meta tensors, the launchers'
    own entry points then give the launches a call would make on such a GPU, allocating nothing
    (fused.precompile's workloads)."""
    global _recorder
    previous, launches = _recorder, []
    _recorder = (target, launches)
    try:
        yield launches
    finally:
        _recorder = previous


COMPILE_LOG = "FASTATTN_COMPILE_LOG"


@functools.cache
def _log_compiles() -> None:
    """With FASTATTN_COMPILE_LOG=PATH set, append a JSON line to PATH for each kernel triton
    compiles or finds in its cache directory ({"kernel": name, "cache_hit": bool}; kernels a
    process has already loaded are not looked up again). Installed at the first launch, so it
    never imports triton early; an existing compilation listener is still called."""
    path = os.environ.get(COMPILE_LOG)
    if not path:
        return
    from triton import knobs

    previous = knobs.compilation.listener

    def listener(**event):  # src, metadata, metadata_group, times, cache_hit
        with open(path, "a") as f:
            f.write(json.dumps({"kernel": getattr(event["src"], "name", "?"), "cache_hit": event["cache_hit"]}) + "\n")
        if previous is not None:
            previous(**event)

    knobs.compilation.listener = listener


def run(launches: list[Launch], device: torch.device) -> None:
    if _recorder is not None:
        _recorder[1].extend(launches)
        return
    _log_compiles()
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for launch in launches:
            launch()


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a copy when its last dim is strided: the kernels assume unit stride there."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def strides(letter: str, t: torch.Tensor, dims: str, broadcast: bool = False) -> dict[str, int]:
    """{"stride_<letter><d>": stride} for the leading len(dims) dims of `t` (CONVENTIONS' names);
    broadcast: size-1 dims get stride 0, so one index formula serves broadcast and full dims."""
    return {
        f"stride_{letter}{d}": 0 if broadcast and size == 1 else stride
        for d, size, stride in zip(dims, t.shape, t.stride())
    }


def split_scale(x: float) -> tuple[float, float]:
    """(hi, lo) float32 values with hi + lo = x to ~48 bits: kernel float arguments are float32, and
    the float64 kernels multiply by both halves (narrower ones use hi)."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    lo = struct.unpack("f", struct.pack("f", x - hi))[0]
    return hi, lo


def large_offsets(p: Problem, mask: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Can a block offset (start * row stride, start over L or S) pass OFFSET_LIMIT in one of
    `tensors` (B, H, rows, dim) or the mask? Then the kernels compute offsets in 64 bits."""
    L, S = p.seqlen_q, p.seqlen_k
    spans = [max(L, S) * abs(t.stride(2)) for t in tensors]
    spans += [L * abs(mask.stride(2)), S * abs(mask.stride(3))]
    return max(spans) >= OFFSET_LIMIT


def mask_operand(p: Problem) -> tuple[int, torch.Tensor]:
    """(MASK_KIND, the Mask pointer's tensor): 0 and a dummy without a mask, 1 and a uint8 view
    for a bool mask, 2 and the mask itself for a float one."""
    if p.mask is None:
        return 0, dummy(p)
    if p.mask.dtype == torch.bool:
        return 1, p.mask.view(torch.uint8)
    return 2, p.mask


def dummy(p: Problem) -> torch.Tensor:
    """A (1, 1, 1, 1) int32 tensor for pointer arguments a kernel variant never reads."""
    return torch.empty(1, 1, 1, 1, dtype=torch.int32, device=p.device)


def alibi_operand(p: Problem) -> torch.Tensor:
    """The Alibi pointer's tensor: the float32 (1 or B, Hq) slopes, or a dummy without them."""
    return dummy(p) if p.alibi is None else p.alibi


def rng_operand(p: Problem) -> torch.Tensor:
    """The Rng pointer's tensor: dropout's int64 (seed, offset) draw, or a dummy without dropout."""
    return dummy(p) if p.rng is None else p.rng


def batch0(p: Problem, batch: slice) -> int:
    """The dropout counter's index of the first batch of a launch over `batch` (common._mods)."""
    return p.batch0 + (batch.start or 0)


def feature_launch_args(p: Problem) -> tuple[dict[str, object], dict[str, object]]:
    """(scalars, constexprs) of the call's features for every kernel with a score step.

    Each kernel names them in its signature and gathers the step's scalars into one tuple
    (kernels/common._mods) that the per-block helpers pass on: Triton kernels take no structs, so
    this is the one place a feature's launch arguments are spelled out on the host. With a
    softcap c, qk_scale is scale / c (natural units: tanh's argument) and softcap_scale c * log2(e)
    (the capped score in log2 units); without, qk_scale is scale * log2(e). With a float mask the
    kernels keep natural units: no log2(e) in either. Dropout: the keep threshold minus 2**31 (an
    int32: the kernels compare signed) and 1 / (1 - p); its draw is the Rng operand
    (:func:`rng_operand`) and its batch index the launch's (:func:`batch0`)."""
    f = p.features
    capped = f.softcap > 0.0
    mask_kind, _ = mask_operand(p)
    units = LOG2E if mask_kind != 2 else 1.0  # float masks: natural units (kernels/common.py)
    qk_scale, qk_scale_lo = split_scale(f.scale / f.softcap if capped else f.scale * units)
    softcap_scale, softcap_scale_lo = split_scale(f.softcap * units)
    scalars = {
        "qk_scale": qk_scale,
        "qk_scale_lo": qk_scale_lo,
        "causal_offset": f.causal_offset or 0,
        "window_lo": f.window_lo or 0,
        "softcap_scale": softcap_scale,
        "softcap_scale_lo": softcap_scale_lo,
        "dropout_threshold": dropout.threshold(f.dropout_p) - 2**31,
    }
    scalars["dropout_scale"], scalars["dropout_scale_lo"] = split_scale(dropout.rescale(f.dropout_p))
    constexprs = {
        "IS_CAUSAL": f.causal_offset is not None,
        "IS_LOCAL": f.window_lo is not None,
        "MASK_KIND": mask_kind,
        "HAS_SOFTCAP": capped,
        "HAS_ALIBI": p.alibi is not None,
        "HAS_DROPOUT": p.rng is not None,
    }
    return scalars, constexprs


def packing_launch_args(p: Problem) -> tuple[dict[str, object], dict[str, object]]:
    """(arguments, constexprs) of a packed call's index tensors for the kernels that read them
    (common._sequence, common._kv_rows); dummies and False flags for a dense call."""
    pk = p.packing
    d = dummy(p)
    if pk is None:
        args = dict(CuSeqQ=d, CuSeqK=d, SeqUsedK=d, BlockTable=d, stride_tn=0, page_size=0)
        return args, dict(VARLEN=False, HAS_CU_K=False, HAS_SEQUSED=False, PAGED=False)
    paged = pk.block_table is not None
    args = dict(
        CuSeqQ=pk.cu_seq_q,
        CuSeqK=d if pk.cu_seq_k is None else pk.cu_seq_k,
        SeqUsedK=d if pk.seqused_k is None else pk.seqused_k,
        BlockTable=pk.block_table if paged else d,
        stride_tn=pk.block_table.stride(0) if paged else 0,
        page_size=pk.page_size,
    )
    flags = dict(VARLEN=True, HAS_CU_K=pk.cu_seq_k is not None, HAS_SEQUSED=pk.seqused_k is not None, PAGED=paged)
    return args, flags


def program_rows(p: Problem) -> int:
    """The query rows one grid column of programs covers: L, or a packed call's max_q."""
    return p.seqlen_q if p.packing is None else p.packing.max_q


def program_batches(p: Problem) -> int:
    """The grid's batch axis: B, or a packed call's number of sequences."""
    return p.batch if p.packing is None else p.packing.num_seqs


def modified_scores(p: Problem) -> bool:
    """Does `p` do work on every score beyond the causal check: a score modifier
    (features.SCORE_MODIFIERS: a window's lower edge, a softcap, ALiBi) or dropout (a Philox call
    per score, whose registers the wide tiles do not have: they spilled in fused.aot's dropout
    variants)? Such calls take the configs' narrower tiles."""
    return p.rng is not None or any(FEATURES[name].used(p) for name in SCORE_MODIFIERS)


def masked_tiles(p: Problem) -> bool:
    """Do the forward configs' `masked` tiles serve `p`? Their narrower key blocks leave registers
    for work on every score beyond the causal check: a mask tile or a score modifier (the wider
    tiles compile at the register limit without them; fused.aot's reports), and for packed calls
    the per-sequence bounds and checked loads (the wider tiles spill in the varlen variants).
    Decode shapes take configs.decode_tile instead."""
    return p.mask is not None or modified_scores(p) or p.packing is not None


def head_dim_constexprs(p: Problem) -> dict[str, object]:
    """The padded head dims and whether the real ones need checking."""
    head_dim, head_dim_v = padded_head_dim(p.head_dim), padded_head_dim(p.head_dim_v)
    return dict(
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, CHECK_E=p.head_dim != head_dim, CHECK_EV=p.head_dim_v != head_dim_v
    )


def tile_constexprs(p: Problem, tile: TileConfig) -> dict[str, object]:
    """The tile's block sizes and whether L and S need checking against them (always, for the
    lengths of a packed call's sequences)."""
    packed = p.packing is not None
    return dict(
        BLOCK_M=tile.block_m,
        BLOCK_N=tile.block_n,
        CHECK_M=packed or p.seqlen_q % tile.block_m != 0,
        CHECK_N=packed or p.seqlen_k % tile.block_n != 0,
    )


def batch_chunks(p: Problem, per_batch: int = 1) -> Iterator[slice]:
    """Slices of the batch axis whose grid axis z (per_batch programs per batch) stays within
    MAX_GRID_YZ, one launch each. A packed call is one batch whose sequences run along axis z: its
    slice is the whole of every tensor (per-sequence ALiBi slopes included)."""
    if p.packing is not None:
        if p.packing.num_seqs * per_batch > MAX_GRID_YZ:
            raise ValueError(
                f"the Triton kernels take up to {MAX_GRID_YZ // per_batch} packed sequences here, "
                f"got {p.packing.num_seqs}"
            )
        yield slice(None)
        return
    step = MAX_GRID_YZ // per_batch
    for b0 in range(0, p.batch, step):
        yield slice(b0, min(p.batch, b0 + step))


def chunk(t: torch.Tensor, batch: slice) -> torch.Tensor:
    """The batch chunk of a per-batch tensor; broadcast ones (batch dim 1) stay whole."""
    return t[batch] if t.shape[0] > 1 else t


def cdiv(a: int, b: int) -> int:
    return math.ceil(a / b)

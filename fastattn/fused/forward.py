"""Host side of the Triton forward: outputs, config, mask block lists, then one launch per batch chunk
(and with split-KV, the combine launch after each)."""

from __future__ import annotations

import dataclasses
import math

import torch

from ..configs import TileConfig, forward_config, kv_splits, preprocess_config
from ..problem import Problem, lse_dtype
from . import plumbing as pl
from .block_lists import mask_block_lists

DECODE_ROWS = 16  # at most this many query rows (per sequence): a decode shape (configs.decode_tile)


def _sm_count(p: Problem, target: pl.Target) -> int | None:
    if target.capability is None or p.device.type != "cuda":
        return None  # the interpreter, or the AOT tool planning for a GPU from CPU tensors
    return torch.cuda.get_device_properties(p.device).multi_processor_count


def split_count(p: Problem, config: TileConfig, target: pl.Target, num_splits: int | None = None) -> int:
    """The split-KV factor of `p`'s forward: `num_splits` (or a packed call's own), else
    configs.kv_splits for decode shapes (at most DECODE_ROWS query rows, no mask) on a GPU; 1
    otherwise. Capped so
    that grid axis z and the splits' key slices stay meaningful."""
    asked = num_splits or (p.packing.num_splits if p.packing is not None else 0)
    max_k = p.seqlen_k if p.packing is None else p.packing.max_k
    if p.mask is not None:
        return 1  # masked calls visit host-built block lists, which do not split
    if not asked and pl.program_rows(p) > DECODE_ROWS:
        return 1  # longer queries fill the GPU by themselves, with the tiles the AOT reports check
    if not asked:
        programs = pl.cdiv(pl.program_rows(p), config.block_m) * p.heads_q * pl.program_batches(p)
        asked = kv_splits(programs, max_k, config.block_n, _sm_count(p, target))
    return max(1, min(asked, pl.cdiv(max(max_k, 1), config.block_n), pl.MAX_GRID_YZ // max(pl.program_batches(p), 1)))


def plan_forward(
    p: Problem,
    out: torch.Tensor,
    lse: torch.Tensor,
    config: TileConfig | None = None,
    target: pl.Target | None = None,
    num_splits: int | None = None,
    stats: torch.Tensor | None = None,
) -> list[pl.Launch]:
    """The launches that compute out (B, Hq, L, Ev) and lse (B, Hq, L) for `p` on `target`
    (default: this process's, :meth:`plumbing.Target.of`) with `config` (default: configs.forward_config)
    and `num_splits` (default: :func:`split_count`'s choice); with a float mask also stats
    (:func:`new_stats`, allocated here when not given) for the backward."""
    target = target or pl.Target.of(p)
    B, Hq, L, E = p.q.shape
    S, Ev = p.seqlen_k, p.head_dim_v
    dims = pl.head_dim_constexprs(p)
    if config is None:
        config = forward_config(
            dims["HEAD_DIM"], dims["HEAD_DIM_V"], p.dtype, target.capability, masked=pl.masked_tiles(p),
            decode=p.mask is None and pl.program_rows(p) <= DECODE_ROWS, allow_tf32=target.allow_tf32,
        )  # fmt: skip
    packing_args, packing_flags = pl.packing_launch_args(p)
    if packing_flags["PAGED"]:  # a key block must lie in one page
        config = dataclasses.replace(config, block_n=math.gcd(config.block_n, p.packing.page_size))
    splits = split_count(p, config, target, num_splits)
    q, k, v = (pl.last_dim_contiguous(t) for t in (p.q, p.k, p.v))
    mask_kind, mask = pl.mask_operand(p)
    alibi, rng = pl.alibi_operand(p), pl.rng_operand(p)
    if mask_kind == 2 and stats is None:
        stats = new_stats(p)
    stats = pl.dummy(p) if mask_kind != 2 else stats
    if p.mask is None:
        counts = index = mask
    else:
        counts, index = mask_block_lists(p.mask, L, S, config.block_m, config.block_n, p.features)
    scalars, feature_flags = pl.feature_launch_args(p)
    constexprs = dict(
        **dims,
        **pl.tile_constexprs(p, config),
        **feature_flags,
        LARGE_OFFSETS=pl.large_offsets(p, mask, k, v),
        INPUT_PRECISION=target.input_precision(p.dtype),
        **packing_flags,
        SPLIT_KV=splits > 1,
    )
    if splits > 1:  # partial results, merged by the combine kernel
        part_out = torch.empty(splits, B, Hq, L, Ev, dtype=lse_dtype(p.dtype), device=p.device)
        part_lse = torch.empty(splits, B, Hq, L, dtype=lse_dtype(p.dtype), device=p.device)
        combine_tile = preprocess_config(dims["HEAD_DIM_V"])
    launches = []
    rows = pl.program_rows(p)
    if rows == 0:
        return launches
    for bs in pl.batch_chunks(p, splits):
        nb = pl.program_batches(p) if p.packing is not None else q[bs].shape[0]
        mk, ct, ix, al = (pl.chunk(t, bs) for t in (mask, counts, index, alibi))
        o, lse_out = (out[bs], lse[bs]) if splits == 1 else (part_out[:, bs], part_lse[:, bs])
        o_first = o if splits == 1 else o[0]
        args = dict(
            Out=o, Lse=lse_out, Stats=stats[:, bs] if mask_kind == 2 else stats, Q=q[bs], K=k[bs], V=v[bs], Mask=mk, BlockCount=ct, BlockIndex=ix, Alibi=al, Rng=rng,
            **{n: a for n, a in packing_args.items() if n not in ("stride_tn", "page_size")},
            **pl.strides("q", q, "bhmk"), **pl.strides("k", k, "bhnk"), **pl.strides("v", v, "bhnk"),
            **pl.strides("o", o_first, "bhmk"), **pl.strides("m", mk, "bhmn", broadcast=True),
            **pl.strides("c", ct, "bhm", broadcast=True), **pl.strides("i", ix, "bhm", broadcast=True),
            **pl.strides("a", al, "bh", broadcast=True), stride_tn=packing_args["stride_tn"],
            stride_os=o.stride(0) if splits > 1 else 0, stride_ls=lse_out.stride(0) if splits > 1 else 0,
            stride_sp=stats.stride(0) if mask_kind == 2 else 0,
            H=Hq, GROUP=p.group, L=L, S=S, E=E, EV=Ev, page_size=packing_args["page_size"], num_splits=splits,
            batch0=pl.batch0(p, bs), **scalars,
        )  # fmt: skip
        grid = (pl.cdiv(rows, config.block_m), Hq, nb * splits)
        launches.append(pl.Launch("forward", "attention_forward_kernel", grid, args, constexprs, config))
        if splits > 1:
            comb_args = dict(
                Out=out[bs], Lse=lse[bs], PartOut=o, PartLse=lse_out,
                **pl.strides("o", out[bs], "bhmk"), **pl.strides("p", o_first, "bhmk"),
                stride_ps=o.stride(0), stride_ls=lse_out.stride(0), H=Hq, L=L, EV=Ev, num_splits=splits,
            )  # fmt: skip
            comb_flags = dict(
                HEAD_DIM_V=dims["HEAD_DIM_V"],
                BLOCK_M=combine_tile.block_m,
                CHECK_M=L % combine_tile.block_m != 0,
                CHECK_EV=dims["CHECK_EV"],
            )
            grid = (pl.cdiv(L, combine_tile.block_m), Hq, q[bs].shape[0])
            launches.append(pl.Launch("decode", "split_kv_combine_kernel", grid, comb_args, comb_flags, combine_tile))
    return launches


def new_stats(p: Problem) -> torch.Tensor:
    """The float-mask forward's row statistics for the backward: (2, B, Hq, L), each row's max score
    and the log of its sum of exponentials, in natural units (kernels/common._row_shift)."""
    return torch.empty(2, p.batch, p.heads_q, p.seqlen_q, dtype=lse_dtype(p.dtype), device=p.device)


def triton_attention_forward(
    p: Problem, config: TileConfig | None = None, num_splits: int | None = None
) -> tuple[torch.Tensor, ...]:
    """Run the fused forward kernel: (out (B, Hq, L, Ev) in the input dtype, lse (B, Hq, L) float32,
    float64 for float64 inputs, stats): stats, with a float mask, the row statistics of
    :func:`new_stats` that the backward needs, else None. num_splits: the split-KV factor (default: :func:`split_count`).

    The kernel is compiled for the GPU, or run by Triton's interpreter when the process has it on
    (TRITON_INTERPRET=1; the only way CPU tensors can run it).
    """
    out = p.new_out()
    lse = torch.empty(p.batch, p.heads_q, p.seqlen_q, dtype=lse_dtype(p.dtype), device=p.device)
    float_mask = p.mask is not None and p.mask.dtype != torch.bool
    stats = new_stats(p) if float_mask else None
    pl.run(plan_forward(p, out, lse, config, num_splits=num_splits, stats=stats), p.device)
    return out, lse, stats

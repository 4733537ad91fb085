"""Host side of the Triton forward: outputs, config, mask block lists, then one launch per batch chunk."""

from __future__ import annotations

import torch

from ..configs import TileConfig, forward_config
from ..problem import Problem, lse_dtype
from . import plumbing as pl
from .block_lists import mask_block_lists


def plan_forward(
    p: Problem,
    out: torch.Tensor,
    lse: torch.Tensor,
    config: TileConfig | None = None,
    target: pl.Target | None = None,
) -> list[pl.Launch]:
    """The launches that compute out (B, Hq, L, Ev) and lse (B, Hq, L) for `p` on `target`
    (default: this process's, :meth:`plumbing.Target.of`) with `config` (default: configs.forward_config)."""
    target = target or pl.Target.of(p)
    B, Hq, L, E = p.q.shape
    S, Ev = p.seqlen_k, p.head_dim_v
    dims = pl.head_dim_constexprs(p)
    if config is None:
        config = forward_config(
            dims["HEAD_DIM"], dims["HEAD_DIM_V"], p.dtype, target.capability, masked=pl.masked_tiles(p)
        )
    q, k, v = (pl.last_dim_contiguous(t) for t in (p.q, p.k, p.v))
    _, mask = pl.mask_operand(p)
    alibi = pl.alibi_operand(p)
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
    )
    launches = []
    for bs in pl.batch_chunks(B):
        mk, ct, ix, al = (pl.chunk(t, bs) for t in (mask, counts, index, alibi))
        args = dict(
            Out=out[bs], Lse=lse[bs], Q=q[bs], K=k[bs], V=v[bs], Mask=mk, BlockCount=ct, BlockIndex=ix, Alibi=al,
            **pl.strides("q", q, "bhmk"), **pl.strides("k", k, "bhnk"), **pl.strides("v", v, "bhnk"),
            **pl.strides("o", out, "bhmk"), **pl.strides("m", mk, "bhmn", broadcast=True),
            **pl.strides("c", ct, "bhm", broadcast=True), **pl.strides("i", ix, "bhm", broadcast=True),
            **pl.strides("a", al, "bh", broadcast=True), H=Hq, GROUP=p.group, L=L, S=S, E=E, EV=Ev, **scalars,
        )  # fmt: skip
        grid = (pl.cdiv(L, config.block_m), Hq, bs.stop - bs.start)
        launches.append(pl.Launch("forward", "attention_forward_kernel", grid, args, constexprs, config))
    return launches


def triton_attention_forward(p: Problem, config: TileConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the fused forward kernel: (out (B, Hq, L, Ev) in the input dtype, lse (B, Hq, L) float32,
    float64 for float64 inputs).

    The kernel is compiled for the GPU, or run by Triton's interpreter when the process has it on
    (TRITON_INTERPRET=1; the only way CPU tensors can run it).
    """
    out = torch.empty(p.batch, p.heads_q, p.seqlen_q, p.head_dim_v, dtype=p.dtype, device=p.device)
    lse = torch.empty(p.batch, p.heads_q, p.seqlen_q, dtype=lse_dtype(p.dtype), device=p.device)
    pl.run(plan_forward(p, out, lse, config), p.device)
    return out, lse

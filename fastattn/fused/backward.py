"""Host side of the Triton backward: gradients, configs, block lists, then three launches per batch chunk.

The preprocess kernel (delta = rowsum(dO * O) - dlse), the dK/dV kernel (one program per key block
and KV head, summing over the query heads of its group) and the dQ kernel (one program per query
block and query head). Every gradient element is written by exactly one program in a fixed order
(no atomics): two runs give bitwise identical results.
"""

from __future__ import annotations

import torch

from ..configs import BackwardConfig, backward_config, preprocess_config
from ..problem import Problem, lse_dtype
from . import plumbing as pl
from .block_lists import key_block_lists, mask_block_lists


def choose_config(p: Problem, target: pl.Target) -> BackwardConfig:
    """The backward tiles of `p` on `target`: configs.backward_config with the call's properties."""
    dims = pl.head_dim_constexprs(p)
    return backward_config(
        dims["HEAD_DIM"], dims["HEAD_DIM_V"], p.dtype, target.capability, masked=p.mask is not None,
        modified=pl.modified_scores(p), dropout=p.rng is not None, allow_tf32=target.allow_tf32,
    )  # fmt: skip


def plan_backward(
    p: Problem,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    config: BackwardConfig | None = None,
    target: pl.Target | None = None,
    stats: torch.Tensor | None = None,
) -> list[pl.Launch]:
    """The launches that write grads = (dq, dk, dv) for `p` on `target` (default: this process's)
    with `config` (default: configs.backward_config): per batch chunk preprocess, dK/dV, dQ."""
    target = target or pl.Target.of(p)
    B, Hq, L, E = p.q.shape
    Hkv, S, Ev = p.heads_kv, p.seqlen_k, p.head_dim_v
    dims = pl.head_dim_constexprs(p)
    config = config or choose_config(p, target)
    dq, dk, dv = grads
    q, k, v, out, dout = (pl.last_dim_contiguous(t) for t in (p.q, p.k, p.v, out, dout))
    acc_dtype = lse_dtype(p.dtype)
    lse = lse.to(acc_dtype).contiguous()
    delta = torch.empty(B, Hq, L, dtype=acc_dtype, device=p.device)
    has_dlse = dlse is not None
    dlse = dlse.to(acc_dtype).contiguous() if has_dlse else delta
    mask_kind, mask = pl.mask_operand(p)
    alibi, rng = pl.alibi_operand(p), pl.rng_operand(p)
    if mask_kind == 2 and stats is None:  # the AOT tool plans without a forward
        from .forward import new_stats

        stats = new_stats(p)
    stats = stats if mask_kind == 2 else pl.dummy(p)
    if p.mask is None:
        kv_lists = q_lists = (mask, mask)
    else:
        c = config.dkdv
        kv_lists = key_block_lists(p.mask, L, S, c.block_m, c.block_n, p.features)
        c = config.dq
        q_lists = mask_block_lists(p.mask, L, S, c.block_m, c.block_n, p.features)
    scalars, feature_flags = pl.feature_launch_args(p)
    packing_args, packing_flags = pl.packing_launch_args(p)
    seq_args = dict(CuSeqQ=packing_args["CuSeqQ"], CuSeqK=packing_args["CuSeqK"])
    scale, scale_lo = pl.split_scale(p.features.scale)
    flags = dict(
        **dims,
        **feature_flags,
        LARGE_OFFSETS=pl.large_offsets(p, mask, q, k, v, dout),
        INPUT_PRECISION=target.input_precision(p.dtype),
        VARLEN=packing_flags["VARLEN"],
    )
    rows_q = pl.program_rows(p)
    rows_k = S if p.packing is None else p.packing.max_k
    sizes = dict(H=Hq, GROUP=p.group, L=L, S=S, E=E, EV=Ev, **scalars, scale=scale, scale_lo=scale_lo)
    pre_tile = preprocess_config(dims["HEAD_DIM_V"])
    pre_flags = dict(
        HEAD_DIM_V=dims["HEAD_DIM_V"],
        BLOCK_M=pre_tile.block_m,
        CHECK_M=L % pre_tile.block_m != 0,
        CHECK_EV=dims["CHECK_EV"],
        HAS_DLSE=has_dlse,
    )
    launches = []
    for bs in pl.batch_chunks(p):
        nb = pl.program_batches(p) if p.packing is not None else q[bs].shape[0]
        mk, al = pl.chunk(mask, bs), pl.chunk(alibi, bs)
        kv_ct, kv_ix = (pl.chunk(t, bs) for t in kv_lists)
        q_ct, q_ix = (pl.chunk(t, bs) for t in q_lists)
        st = stats[:, bs] if mask_kind == 2 else stats
        inputs = dict(
            Q=q[bs], K=k[bs], V=v[bs], DO=dout[bs], Lse=lse[bs], Stats=st, Delta=delta[bs], Mask=mk, Alibi=al, Rng=rng
        )
        input_strides = {
            **pl.strides("q", q, "bhmk"), **pl.strides("k", k, "bhnk"), **pl.strides("v", v, "bhnk"),
            **pl.strides("do", dout, "bhmk"), **pl.strides("m", mk, "bhmn", broadcast=True),
            **pl.strides("a", al, "bh", broadcast=True), "stride_sp": st.stride(0) if mask_kind == 2 else 0,
            "batch0": pl.batch0(p, bs),
        }  # fmt: skip
        pre_args = dict(
            Delta=delta[bs], Out=out[bs], DOut=dout[bs], DLse=dlse[bs],
            **pl.strides("o", out, "bhmk"), **pl.strides("do", dout, "bhmk"), H=Hq, L=L, EV=Ev,
        )  # fmt: skip
        launches.append(
            pl.Launch(
                "backward",
                "attention_backward_preprocess_kernel",
                (pl.cdiv(L, pre_tile.block_m), Hq, q[bs].shape[0]),
                pre_args,
                pre_flags,
                pre_tile,
            )
        )
        c = config.dkdv
        dkdv_args = dict(
            DK=dk[bs], DV=dv[bs], **inputs, BlockCount=kv_ct, BlockIndex=kv_ix, **seq_args, **input_strides,
            **pl.strides("dk", dk, "bhnk"), **pl.strides("dv", dv, "bhnk"),
            **pl.strides("c", kv_ct, "bhn", broadcast=True), **pl.strides("i", kv_ix, "bhn", broadcast=True), **sizes,
        )  # fmt: skip
        dkdv_flags = dict(**flags, **pl.tile_constexprs(p, c), KEY_MAJOR=c.key_major)
        launches.append(
            pl.Launch(
                "backward",
                "attention_backward_dkdv_kernel",
                (pl.cdiv(rows_k, c.block_n), Hkv, nb),
                dkdv_args,
                dkdv_flags,
                c,
            )
        )
        c = config.dq
        dq_args = dict(
            DQ=dq[bs], **inputs, BlockCount=q_ct, BlockIndex=q_ix, **seq_args, **input_strides,
            **pl.strides("dq", dq, "bhmk"),
            **pl.strides("c", q_ct, "bhm", broadcast=True), **pl.strides("i", q_ix, "bhm", broadcast=True), **sizes,
        )  # fmt: skip
        dq_flags = dict(**flags, **pl.tile_constexprs(p, c))
        launches.append(
            pl.Launch(
                "backward", "attention_backward_dq_kernel", (pl.cdiv(rows_q, c.block_m), Hq, nb), dq_args, dq_flags, c
            )
        )
    return launches


def triton_attention_backward(
    p: Problem,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None = None,
    config: BackwardConfig | None = None,
    stats: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of the attention of `p`, shaped like p.q, p.k, p.v (contiguous, input dtype).

    out (B, Hq, L, Ev) and lse (B, Hq, L) are the forward's results; dout the gradient of out;
    dlse (B, Hq, L) or None the gradient of lse (when the loss uses it); stats: the forward's
    row statistics of a float-mask call (forward.new_stats; required then). Deterministic (no atomics):
    two calls give bitwise identical gradients. Rows that see no key (lse = -inf) contribute 0.
    Runs compiled on CUDA, or through Triton's interpreter on CPU tensors (TRITON_INTERPRET=1).
    """
    if p.q.numel() == 0 or p.seqlen_k == 0:
        return tuple(torch.zeros(t.shape, dtype=p.dtype, device=p.device) for t in (p.q, p.k, p.v))
    # Every element is written by one program: no memset needed. Packed calls keep their layout.
    new = torch.empty_like if p.packing is not None else lambda t: torch.empty(t.shape, dtype=p.dtype, device=p.device)
    grads = tuple(new(t) for t in (p.q, p.k, p.v))
    if p.mask is not None and p.mask.dtype != torch.bool and stats is None:
        raise ValueError("a float-mask backward needs the forward's stats (fused.forward.new_stats)")
    pl.run(plan_backward(p, out, lse, dout, dlse, grads, config, stats=stats), p.device)
    return grads

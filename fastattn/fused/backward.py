"""Host side of the Triton backward: gradients, configs, key-block lists, strides, grids, launches.

Three launches: the preprocess kernel (delta = rowsum(dO * O) - dlse), the dK/dV kernel (one
program per key block and KV head, summing over the query heads of its group) and the dQ kernel
(one program per query block and query head). Every gradient element is written by exactly one
program in a fixed order (no atomics): two runs give bitwise identical results.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .configs import padded_head_dim
from ..problem import Problem, lse_dtype
from .kernels import backward as backward_kernels
from .kernels import interpreted
from .forward import (
    BLOCK_CUT,
    BLOCK_FULL,
    MAX_GRID_YZ,
    _broadcast_strides,
    _input_precision,
    _last_dim_contiguous,
    mask_block_lists,
    split_scale,
)


@dataclass(frozen=True)
class TileConfig:
    """Tiles of one backward kernel. key_major (dK/dV kernel only): compute its score tiles as
    K Q^T (keys along rows, K and V in registers) instead of Q K^T (K and V read by the MMA from
    shared memory, P and dS transposed); see kernels.backward._dkdv_query_block."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    key_major: bool = False


@dataclass(frozen=True)
class BackwardConfig:
    """Tiles of the two backward kernels: dkdv (BLOCK_N keys per program, BLOCK_M query rows per
    step) and dq (BLOCK_M query rows per program, BLOCK_N keys per step)."""

    dkdv: TileConfig
    dq: TileConfig


# (Hopper or newer, 16-bit inputs, head-dim bucket) -> ((dK/dV tiles), (dQ tiles)): dK/dV
# (BLOCK_M, BLOCK_N, warps, stages, key_major), dQ (BLOCK_M, BLOCK_N, warps, stages). dK/dV: the
# first tile of aot_backward.SEARCH_CANDIDATES (widest key block first) that compiles without register
# spills in every kernel variant (causal, ragged L/S, padded head dims, bool/float masks) and every
# padded head dim of the bucket (16, 32, 64 share the 64 entry), query-major
# tried before key-major, found with triton 3.9 by `python -m fastattn.aot_backward --search`
# (benchmarks/results/aot/backward_search_triton-3.9.md).
# float16 stands for both 16-bit dtypes. dQ: the largest spill-free tiles of the same variants.
# Not yet tuned by timing on a GPU.
_BACKWARD_TABLE = {
    (True, True, 64): ((32, 128, 8, 3, False), (128, 32, 8, 3)),
    (True, True, 128): ((32, 64, 8, 3, False), (64, 32, 8, 3)),
    (True, True, 256): ((32, 32, 8, 3, False), (32, 16, 4, 3)),
    (True, False, 64): ((32, 128, 8, 3, True), (128, 32, 8, 3)),
    (True, False, 128): ((32, 32, 4, 3, False), (32, 16, 4, 3)),
    (True, False, 256): ((32, 32, 8, 3, False), (16, 16, 4, 3)),
    (False, True, 64): ((16, 64, 8, 2, False), (128, 32, 8, 2)),
    (False, True, 128): ((32, 64, 8, 2, False), (64, 32, 8, 2)),
    (False, True, 256): ((16, 16, 4, 2, False), (32, 16, 4, 2)),
    (False, False, 64): ((32, 32, 4, 2, False), (128, 32, 8, 2)),
    (False, False, 128): ((16, 64, 8, 2, False), (32, 16, 4, 2)),
    (False, False, 256): ((16, 16, 4, 2, True), (16, 16, 4, 2)),
}


def preprocess_block_m(head_dim_v: int) -> int:
    """Rows per program of the preprocess kernel: 2048 elements of O and dO each (no spills)."""
    return max(16, 2048 // head_dim_v)


def default_backward_config(
    head_dim: int, head_dim_v: int, dtype: torch.dtype, capability: tuple[int, int] | None, masked: bool = False
) -> BackwardConfig:
    """The built-in choice. head_dim/head_dim_v are padded; capability None = Triton's interpreter."""
    if capability is None:
        # The interpreter runs each program in numpy: small tiles exercise the multi-block logic
        # on the tests' short sequences, and cost little.
        return BackwardConfig(TileConfig(32, 32, 4, 1), TileConfig(32, 32, 4, 1))
    bucket = next(b for b in (64, 128, 256) if max(head_dim, head_dim_v) <= b)
    dkdv, dq = _BACKWARD_TABLE[(capability[0] >= 9, dtype != torch.float32, bucket)]
    return BackwardConfig(TileConfig(*dkdv), TileConfig(*dq))


_backward_config: Callable[..., BackwardConfig] = default_backward_config


def backward_config(
    head_dim: int, head_dim_v: int, dtype: torch.dtype, capability: tuple[int, int] | None, masked: bool = False
) -> BackwardConfig:
    """The config the backward launcher uses (the built-in one unless replaced)."""
    return _backward_config(head_dim, head_dim_v, dtype, capability, masked=masked)


def set_backward_config(fn: Callable[..., BackwardConfig] | None) -> None:
    """Replace the backward config function (same signature); None restores the built-in one."""
    global _backward_config
    _backward_config = fn or default_backward_config


def key_block_lists(
    mask: torch.Tensor, L: int, S: int, block_m: int, block_n: int, causal_offset: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (b, h, key block) lists of the query blocks the dK/dV kernel must visit.

    The transpose of :func:`fastattn.launcher.mask_block_lists`: counts (Bc, Hc, Nc, 2) int32
    (query blocks needing no masking, blocks needing it) and index (Bc, Hc, Nc, cdiv(L, block_m))
    int32 holding the first kind, then the second; tiles the mask and causality remove are left out.
    Nc = cdiv(S, block_n); (Bc, Hc) are the mask's own (broadcast) batch and head sizes.
    """
    counts, index = mask_block_lists(mask, L, S, block_m, block_n, causal_offset)
    n_blocks = index.shape[-1]
    rank = torch.arange(n_blocks, device=mask.device)
    n_full, n_cut = counts[..., :1], counts[..., 1:]
    # The i-th listed block has class FULL for i < n_full, CUT for i < n_full + n_cut, else DEAD.
    by_rank = (rank < n_full).to(torch.int8) + (rank < n_full + n_cut).to(torch.int8)
    cls = torch.empty_like(by_rank).scatter_(-1, index.long(), by_rank)
    m_blocks = math.ceil(L / block_m)
    cls = cls.expand(*cls.shape[:2], m_blocks, n_blocks).transpose(-1, -2)
    order = torch.argsort(-cls.to(torch.int16), dim=-1, stable=True).to(torch.int32)
    counts = torch.stack(((cls == BLOCK_FULL).sum(-1), (cls == BLOCK_CUT).sum(-1)), dim=-1).to(torch.int32)
    return counts.contiguous(), order.contiguous()


def _large_offsets(p: Problem, tensors: tuple[torch.Tensor, ...], mask: torch.Tensor) -> bool:
    """Can a block offset (start * row stride, over L or S) pass 2**31? Then the kernels use 64 bits."""
    L, S = p.seqlen_q, p.seqlen_k
    spans = [max(L, S) * abs(t.stride(2)) for t in tensors]
    spans += [L * abs(mask.stride(2)), S * abs(mask.stride(3))]
    return max(spans) >= 2**31


def triton_attention_backward(
    p: Problem,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None = None,
    config: BackwardConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of the attention of `p`, shaped like p.q, p.k, p.v (contiguous, input dtype).

    out (B, Hq, L, Ev) and lse (B, Hq, L) are the forward's results; dout the gradient of out;
    dlse (B, Hq, L) or None the gradient of lse (when the loss uses it). Deterministic (no atomics):
    two calls give bitwise identical gradients. Rows that see no key (lse = -inf) contribute 0.
    Runs compiled on CUDA, or through Triton's interpreter on CPU tensors (TRITON_INTERPRET=1).
    """
    interpret = interpreted()
    B, Hq, L, E = p.q.shape
    Hkv, S, Ev = p.heads_kv, p.seqlen_k, p.head_dim_v
    if B == 0 or Hq == 0 or L == 0 or S == 0:
        return tuple(torch.zeros(t.shape, dtype=p.dtype, device=p.device) for t in (p.q, p.k, p.v))
    # Every element is written by one program: no memset needed.
    dq = torch.empty(B, Hq, L, E, dtype=p.dtype, device=p.device)
    dk = torch.empty(B, Hkv, S, E, dtype=p.dtype, device=p.device)
    dv = torch.empty(B, Hkv, S, Ev, dtype=p.dtype, device=p.device)
    head_dim, head_dim_v = padded_head_dim(E), padded_head_dim(Ev)
    if config is None:
        capability = None if p.device.type != "cuda" else torch.cuda.get_device_capability(p.device)
        config = backward_config(head_dim, head_dim_v, p.dtype, capability, masked=p.mask is not None)
    q, k, v, out, dout = (_last_dim_contiguous(t) for t in (p.q, p.k, p.v, out, dout))
    acc_dtype = lse_dtype(p.dtype)
    lse = lse.to(acc_dtype).contiguous()
    delta = torch.empty(B, Hq, L, dtype=acc_dtype, device=p.device)
    has_dlse = dlse is not None
    dlse = dlse.to(acc_dtype).contiguous() if has_dlse else delta

    if p.mask is None:
        mask_kind = 0
        mask = torch.empty(1, 1, 1, 1, dtype=torch.int32, device=p.device)
        kv_lists = q_lists = (mask, mask)
    else:
        mask_kind = 1 if p.mask.dtype == torch.bool else 2
        mask = p.mask.view(torch.uint8) if mask_kind == 1 else p.mask
        c = config.dkdv
        kv_lists = key_block_lists(p.mask, L, S, c.block_m, c.block_n, p.causal_offset)
        c = config.dq
        q_lists = mask_block_lists(p.mask, L, S, c.block_m, c.block_n, p.causal_offset)

    flags = dict(
        HEAD_DIM=head_dim,
        HEAD_DIM_V=head_dim_v,
        IS_CAUSAL=p.causal_offset is not None,
        MASK_KIND=mask_kind,
        CHECK_E=E != head_dim,
        CHECK_EV=Ev != head_dim_v,
        LARGE_OFFSETS=_large_offsets(p, (q, k, v, dout), mask),
        INPUT_PRECISION=_input_precision(p, interpret),
    )

    def tiles(c: TileConfig) -> dict:
        return dict(
            BLOCK_M=c.block_m,
            BLOCK_N=c.block_n,
            CHECK_M=L % c.block_m != 0,
            CHECK_N=S % c.block_n != 0,
            num_warps=c.num_warps,
            num_stages=c.num_stages,
        )

    qk_scale = split_scale(p.scale * 1.4426950408889634)  # exp2 is one instruction: fold in log2(e)
    pre_block_m = preprocess_block_m(head_dim_v)
    scalars = (Hq, p.group, L, S, E, Ev, *qk_scale, *split_scale(p.scale), p.causal_offset or 0)
    with torch.cuda.device(p.device) if p.device.type == "cuda" else contextlib.nullcontext():
        for b0 in range(0, B, MAX_GRID_YZ):
            b1 = min(B, b0 + MAX_GRID_YZ)
            nb = b1 - b0
            chunk = slice(b0, b1)
            # Per-batch masks and block lists follow the chunk; broadcast ones (batch dim 1) stay.
            mk = mask[chunk] if mask.shape[0] > 1 else mask
            kv_ct, kv_ix = (t[chunk] if t.shape[0] > 1 else t for t in kv_lists)
            q_ct, q_ix = (t[chunk] if t.shape[0] > 1 else t for t in q_lists)
            qc, kc, vc, doc = q[chunk], k[chunk], v[chunk], dout[chunk]
            lse_c, delta_c = lse[chunk], delta[chunk]

            backward_kernels.attention_backward_preprocess_kernel[(math.ceil(L / pre_block_m), Hq, nb)](
                delta_c,
                out[chunk],
                doc,
                dlse[chunk],
                *out.stride(),
                *dout.stride(),
                Hq,
                L,
                Ev,
                HEAD_DIM_V=head_dim_v,
                BLOCK_M=pre_block_m,
                CHECK_M=L % pre_block_m != 0,
                CHECK_EV=Ev != head_dim_v,
                HAS_DLSE=has_dlse,
                num_warps=4,
                num_stages=1,
            )
            backward_kernels.attention_backward_dkdv_kernel[(math.ceil(S / config.dkdv.block_n), Hkv, nb)](
                dk[chunk],
                dv[chunk],
                qc,
                kc,
                vc,
                doc,
                lse_c,
                delta_c,
                mk,
                kv_ct,
                kv_ix,
                *q.stride(),
                *k.stride(),
                *v.stride(),
                *dout.stride(),
                *dk.stride(),
                *dv.stride(),
                *_broadcast_strides(mk),
                *_broadcast_strides(kv_ct)[:3],
                *_broadcast_strides(kv_ix)[:3],
                *scalars,
                **flags,
                **tiles(config.dkdv),
                KEY_MAJOR=config.dkdv.key_major,
            )
            backward_kernels.attention_backward_dq_kernel[(math.ceil(L / config.dq.block_m), Hq, nb)](
                dq[chunk],
                qc,
                kc,
                vc,
                doc,
                lse_c,
                delta_c,
                mk,
                q_ct,
                q_ix,
                *q.stride(),
                *k.stride(),
                *v.stride(),
                *dout.stride(),
                *dq.stride(),
                *_broadcast_strides(mk),
                *_broadcast_strides(q_ct)[:3],
                *_broadcast_strides(q_ix)[:3],
                *scalars,
                **flags,
                **tiles(config.dq),
            )
    return dq, dk, dv

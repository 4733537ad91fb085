"""Split-KV decoding's second step, Triton code only: merging partial results exactly.

The forward kernel with SPLIT_KV reduces each of num_splits slices of the keys to a partial
(out_s, lse_s) per query row (forward.py); this kernel merges them by their logsumexp:

    lse = log sum_s exp(lse_s),   out = sum_s exp(lse_s - lse) out_s

which is the attention over all keys, whatever the split. Slices with no visible key have
lse_s = -inf and weigh 0; a row with none at all gets out = 0 and lse = -inf.
"""

import triton
import triton.language as tl

from .common import LN2, LOG2E, _load_rows, _load_tile, _store_tile


@triton.jit
def split_kv_combine_kernel(
    Out, Lse, PartOut, PartLse,
    stride_ob, stride_oh, stride_om, stride_ok,
    stride_pb, stride_ph, stride_pm, stride_pk, stride_ps, stride_ls,
    H, L, EV, num_splits,
    HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, CHECK_M: tl.constexpr, CHECK_EV: tl.constexpr,
):
    """Out (B, H, L, EV) and Lse (B, H, L) from PartOut (num_splits, B, H, L, EV) and PartLse
    (num_splits, B, H, L) (accumulator dtype; split strides stride_ps / stride_ls; PartLse contiguous
per split). grid: (cdiv(L, BLOCK_M), H, B)."""
    start_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    local_m = tl.arange(0, BLOCK_M)
    offs_m = start_m * BLOCK_M + local_m
    offs_dv = tl.arange(0, HEAD_DIM_V)
    m0_64 = (start_m * BLOCK_M).to(tl.int64)
    lse_rows = PartLse + (b * H + h) * L + offs_m
    acc_ty: tl.constexpr = PartLse.dtype.element_ty
    m = tl.full([BLOCK_M], float("-inf"), dtype=acc_ty)
    for s in range(0, num_splits):
        m = tl.maximum(m, _load_rows(lse_rows + s * stride_ls, offs_m, L, float("-inf"), CHECK_M))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_M], dtype=acc_ty)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=acc_ty)
    part = PartOut + b * stride_pb + h * stride_ph + m0_64 * stride_pm
    part = part + local_m[:, None] * stride_pm + offs_dv[None, :] * stride_pk
    for s in range(0, num_splits):
        w = tl.math.exp2((_load_rows(lse_rows + s * stride_ls, offs_m, L, float("-inf"), CHECK_M) - m_safe) * LOG2E)
        total += w
        acc += w[:, None] * _load_tile(part + s * stride_ps, offs_m, L, offs_dv, EV, CHECK_M, CHECK_EV)
    dead = total == 0.0
    out = acc / tl.where(dead, 1.0, total)[:, None]
    lse = tl.where(dead, float("-inf"), m_safe + tl.math.log2(tl.where(dead, 1.0, total)) * LN2)
    o_ptrs = Out + b * stride_ob + h * stride_oh + m0_64 * stride_om
    o_ptrs = o_ptrs + local_m[:, None] * stride_om + offs_dv[None, :] * stride_ok
    _store_tile(o_ptrs, out.to(Out.dtype.element_ty), offs_m, L, offs_dv, EV, CHECK_M, CHECK_EV)
    if CHECK_M:
        tl.store(Lse + (b * H + h) * L + offs_m, lse, mask=offs_m < L)
    else:
        tl.store(Lse + (b * H + h) * L + offs_m, lse)

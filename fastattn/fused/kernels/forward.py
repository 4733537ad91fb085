"""Fused attention forward: tiled online softmax (FlashAttention-2 style), Triton code only.

    out[i] = sum_j softmax_j(scale * q_i . k_j + mask_ij) v_j,   lse[i] = log sum_j exp(...)

One program owns BLOCK_M query rows of one (batch, query head); K/V blocks of BLOCK_N positions
stream past while a running max (m_i) and sum (l_i) rescale the accumulator (float32; float64 for
float64 inputs). Scores are in log2 units and come from the score step of common.py, so each
exponential is one exp2 and a score modifier added there reaches this kernel too.

Key blocks are of two kinds, each visited by one call of the step (_attend_kv_block): full blocks,
which need no element masking (no mask tile, no causal or window check, no key past S: the range
arithmetic or the host's block list guarantees it), then cut blocks, which get the kernel's
MASK_KIND, IS_CAUSAL, IS_LOCAL and CHECK_N. Softcap and ALiBi apply to both kinds. The constexpr
flags are described in common.py.
"""

import triton
import triton.language as tl

from .common import (
    LN2,
    _block_start,
    _dropout_keep,
    _dropout_scaled,
    _exp_diff,
    _key_block_bounds,
    _key_block_scores,
    _kv_rows,
    _load_tile,
    _mods,
    _sequence,
    _split_bounds,
    _store_tile,
)


@triton.jit
def _attend_kv_block(
    acc, l_i, m_i, q, offs_m, start_n, offs_n,
    K_head, stride_kn, stride_kk, V_head, stride_vn, stride_vk, M_rows, stride_mm, stride_mn,
    L, S, E, EV, qk_scale, qk_scale_lo, mods, Pages, page_size,
    MASK_KIND: tl.constexpr, APPLY_CAUSAL: tl.constexpr, APPLY_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, CHECK_E: tl.constexpr, CHECK_EV: tl.constexpr,
    LARGE_OFFSETS: tl.constexpr, INPUT_PRECISION: tl.constexpr, PAGED: tl.constexpr, LOG2_UNITS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    """One step of the online softmax: fold key/value positions start_n + offs_n into the
    accumulator acc and the running sum l_i and max m_i of query rows offs_m (q: their tile).
    K_head / V_head: the KV head at position 0; M_rows: the mask at query row offs_m[0], key 0.
    offs_n comes from the caller while the head-dim ranges are rebuilt here: those merge with the
    kernel's own, but a range of BLOCK_N built inside the loop stays there and changed the
    register allocation of the compiled kernels. PAGED: K_head / V_head are the page pool's head
    and Pages the sequence's block-table row (common._kv_rows). HAS_DROPOUT: the dropped
    probabilities leave P V after they joined the row sum (lse is that of the undropped scores)."""
    offs_dk = tl.arange(0, q.shape[1])
    offs_dv = tl.arange(0, acc.shape[1])
    cols = start_n + offs_n
    rows_kv = _kv_rows(cols, start_n, offs_n, Pages, page_size, LARGE_OFFSETS=LARGE_OFFSETS, PAGED=PAGED)
    k = _load_tile(K_head + rows_kv * stride_kn + offs_dk[None, :] * stride_kk, cols, S, offs_dk, E, CHECK_N, CHECK_E)
    qk, _ = _key_block_scores(q, k, M_rows, stride_mm, stride_mn, offs_m, cols, rows_kv, L, S,
                              qk_scale, qk_scale_lo, mods,
                              MASK_KIND=MASK_KIND, APPLY_CAUSAL=APPLY_CAUSAL, APPLY_WINDOW=APPLY_WINDOW,
                              HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, CHECK_M=CHECK_M, CHECK_N=CHECK_N,
                              INPUT_PRECISION=INPUT_PRECISION, LOG2_UNITS=LOG2_UNITS)
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # A row that has seen no key yet has m = -inf; subtracting it would give (-inf) - (-inf) = NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = _exp_diff(m_i, m_safe, LOG2_UNITS=LOG2_UNITS)
    p = _exp_diff(qk, m_safe[:, None], LOG2_UNITS=LOG2_UNITS)
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_DROPOUT:
        p = tl.where(_dropout_keep(offs_m, cols, mods, KEY_MAJOR=False), p, 0.0)
    v = _load_tile(V_head + rows_kv * stride_vn + offs_dv[None, :] * stride_vk, cols, S, offs_dv, EV, CHECK_N, CHECK_EV)
    acc = acc * alpha[:, None]
    # out_dtype: triton 3.6 defaults it to float32 and refuses a float64 accumulator; 3.9 takes acc's.
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
    return acc, l_i, m_new


@triton.jit
def attention_forward_kernel(
    Out, Lse, Stats, Q, K, V, Mask, BlockCount, BlockIndex, Alibi, Rng, CuSeqQ, CuSeqK, SeqUsedK, BlockTable,
    stride_qb, stride_qh, stride_qm, stride_qk,
    stride_kb, stride_kh, stride_kn, stride_kk,
    stride_vb, stride_vh, stride_vn, stride_vk,
    stride_ob, stride_oh, stride_om, stride_ok,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im,
    stride_ab, stride_ah,
    stride_tn, stride_os, stride_ls, stride_sp,
    H, GROUP, L, S, E, EV, page_size, num_splits,
    qk_scale: tl.float32, qk_scale_lo: tl.float32, causal_offset, window_lo,
    softcap_scale: tl.float32, softcap_scale_lo: tl.float32, batch0, dropout_threshold,
    dropout_scale: tl.float32, dropout_scale_lo: tl.float32,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IS_LOCAL: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, CHECK_E: tl.constexpr, CHECK_EV: tl.constexpr,
    LARGE_OFFSETS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    VARLEN: tl.constexpr, HAS_CU_K: tl.constexpr, HAS_SEQUSED: tl.constexpr, PAGED: tl.constexpr,
    SPLIT_KV: tl.constexpr,
):
    """Out (B, H, L, EV) and Lse (B, H, L) of softmax(qk_scale * Q K^T [+ mask]) V in log2 units.

    grid: (cdiv(L, BLOCK_M), H, B). Query head h reads KV head h // GROUP.
    Lse and the accumulators are float32, float64 for float64 inputs. qk_scale = scale * log2(e)
    (+ qk_scale_lo, its float32 remainder, used by float64 inputs only; with HAS_SOFTCAP it is
    scale / softcap and softcap_scale = softcap * log2(e)). Causal: key j is visible to query i
    when j <= i + causal_offset; local (a sliding window): when j >= i + window_lo. ALiBi: Alibi
    holds float32 slopes (B or 1, H), stride 0 on a broadcast dim. Dropout (HAS_DROPOUT): Rng
    holds the call's int64 (seed, offset), batch0 is the launch's first batch (common._mods), and
    out is the kept weights' sum times dropout_scale = 1 / (1 - p).
    Without a mask, key blocks are visited as ranges: full blocks first, then the blocks that the
    diagonal or the end of S cut. With a mask (MASK_KIND 1 bool, 2 float; broadcast dims have
    stride 0), the host lists per (b, h, query block) the key blocks to visit: BlockCount[..., 0]
    blocks that need no masking, then BlockCount[..., 1] that do, their indices in BlockIndex;
    blocks the mask and causality remove entirely are never loaded.
    A row with no visible key gets out = 0 and lse = -inf. With a float mask (natural units) Stats
    (2, B, H, L) also gets each row's max and the log of its sum, apart (plane stride stride_sp),
    for the backward (common._row_shift).
    Packed calls (VARLEN; B = 1, L = T_q and S = T_k the packed row counts): program axis 2 is the
    sequence n, whose rows, lengths and band come from CuSeqQ / CuSeqK / SeqUsedK (common._sequence);
    with PAGED its keys are read through BlockTable (row stride stride_tn; pages of page_size rows).
    SPLIT_KV: axis 2 is (sequence or batch) * num_splits + split, the program reduces its split's
    slice of the keys, and Out / Lse are the partial results (split strides stride_os / stride_ls).
    Flags (common.py): CHECK_M / CHECK_N (L / S not a multiple of the block: masked loads, keys
    past S hidden), CHECK_E / CHECK_EV (padded head dims), LARGE_OFFSETS (64-bit offsets),
    INPUT_PRECISION (tl.dot's). Float arguments are float32 (a float64 scale comes split).
    """
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and HEAD_DIM >= 16 and HEAD_DIM_V >= 16)
    # Ranges and lists share one loop form, range(lo, hi, STEP) with the block start from
    # _block_start: one step call per kind of block, and the range loops still step through key
    # positions as they always did, so the kernel compiles as before (same registers and spills).
    FROM_LIST: tl.constexpr = MASK_KIND != 0
    STEP: tl.constexpr = 1 if FROM_LIST else BLOCK_N
    # Without a mask, causality, a window or a ragged S, every block is full.
    HAS_CUT_BLOCKS: tl.constexpr = FROM_LIST or IS_CAUSAL or IS_LOCAL or CHECK_N
    HAS_GAP: tl.constexpr = (IS_LOCAL or SPLIT_KV) and not FROM_LIST
    LOG2_UNITS: tl.constexpr = MASK_KIND != 2  # float masks keep natural units (common.py)
    start_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    if SPLIT_KV:
        seq = (tl.program_id(2) // num_splits).to(tl.int64)
        split = tl.program_id(2) % num_splits
    else:
        seq = tl.program_id(2).to(tl.int64)
        split = 0
    rows_total = L  # the row stride of Lse, before L becomes the sequence's length
    b, q0, k0, L, S, causal_offset, window_lo = _sequence(
        CuSeqQ, CuSeqK, SeqUsedK, seq, L, S, causal_offset, window_lo,
        VARLEN=VARLEN, HAS_CU_K=HAS_CU_K, HAS_SEQUSED=HAS_SEQUSED)
    kvh = h // GROUP
    m0 = start_m * BLOCK_M
    if VARLEN:
        if m0 >= L:  # the grid is sized by max_q: this sequence is shorter
            return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    local_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    m0_64 = m0.to(tl.int64)
    q0_64 = q0.to(tl.int64)
    k0_64 = k0.to(tl.int64)

    q_ptrs = Q + b * stride_qb + h * stride_qh + (q0_64 + m0_64) * stride_qm
    q = _load_tile(q_ptrs + local_m[:, None] * stride_qm + offs_dk[None, :] * stride_qk,
                   offs_m, L, offs_dk, E, CHECK_M, CHECK_E)
    K_head = K + b * stride_kb + kvh * stride_kh + k0_64 * stride_kn
    V_head = V + b * stride_vb + kvh * stride_vh + k0_64 * stride_vn
    Pages = BlockTable + seq * stride_tn
    M_rows = Mask + b * stride_mb + h * stride_mh + m0_64 * stride_mm
    Counts = BlockCount + b * stride_cb + h * stride_ch + start_m * stride_cm
    Index = BlockIndex + b * stride_ib + h * stride_ih + start_m * stride_im
    full_lo, full_end, cut_lo, cut_span, gap_at, gap = _key_block_bounds(
        Counts, m0, L, S, causal_offset, window_lo,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, IS_CAUSAL=IS_CAUSAL, IS_LOCAL=IS_LOCAL, FROM_LIST=FROM_LIST)
    if SPLIT_KV:
        full_lo, full_end, cut_lo, cut_span, gap_at, gap = _split_bounds(
            full_lo, full_end, cut_lo, cut_span, gap_at, gap, split, num_splits, S,
            BLOCK_N=BLOCK_N, HAS_GAP=IS_LOCAL)
    mods = _mods(Alibi, Rng, seq, h, H, batch0, stride_ab, stride_ah, causal_offset, window_lo, softcap_scale,
                 softcap_scale_lo, dropout_threshold, dropout_scale, dropout_scale_lo, HAS_ALIBI=HAS_ALIBI,
                 HAS_DROPOUT=HAS_DROPOUT)

    acc_ty: tl.constexpr = tl.float64 if Q.dtype.element_ty == tl.float64 else tl.float32
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=acc_ty)
    l_i = tl.zeros([BLOCK_M], dtype=acc_ty)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=acc_ty)

    for j in range(full_lo, full_end, STEP):
        acc, l_i, m_i = _attend_kv_block(
            acc, l_i, m_i, q, offs_m, _block_start(j, Index, 0, 0, BLOCK=BLOCK_N, FROM_LIST=FROM_LIST, HAS_GAP=False),
            offs_n, K_head, stride_kn, stride_kk, V_head, stride_vn, stride_vk, M_rows, stride_mm, stride_mn,
            L, S, E, EV, qk_scale, qk_scale_lo, mods, Pages, page_size,
            MASK_KIND=0, APPLY_CAUSAL=False, APPLY_WINDOW=False, HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI,
            CHECK_M=CHECK_M, CHECK_N=False,
            CHECK_E=CHECK_E, CHECK_EV=CHECK_EV, LARGE_OFFSETS=LARGE_OFFSETS, INPUT_PRECISION=INPUT_PRECISION,
            PAGED=PAGED, LOG2_UNITS=LOG2_UNITS, HAS_DROPOUT=HAS_DROPOUT)
    if HAS_CUT_BLOCKS:
        for j in range(cut_lo, cut_lo + cut_span, STEP):
            acc, l_i, m_i = _attend_kv_block(
                acc, l_i, m_i, q, offs_m,
                _block_start(j, Index, gap_at, gap, BLOCK=BLOCK_N, FROM_LIST=FROM_LIST, HAS_GAP=HAS_GAP),
                offs_n, K_head, stride_kn, stride_kk, V_head, stride_vn, stride_vk, M_rows, stride_mm, stride_mn,
                L, S, E, EV, qk_scale, qk_scale_lo, mods, Pages, page_size,
                MASK_KIND=MASK_KIND, APPLY_CAUSAL=IS_CAUSAL, APPLY_WINDOW=IS_LOCAL,
                HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, CHECK_M=CHECK_M, CHECK_N=CHECK_N,
                CHECK_E=CHECK_E, CHECK_EV=CHECK_EV, LARGE_OFFSETS=LARGE_OFFSETS, INPUT_PRECISION=INPUT_PRECISION,
                PAGED=PAGED, LOG2_UNITS=LOG2_UNITS, HAS_DROPOUT=HAS_DROPOUT)

    dead = l_i == 0.0
    l_safe = tl.where(dead, 1.0, l_i)
    out = acc / l_safe[:, None]
    if HAS_DROPOUT:
        out = _dropout_scaled(out, mods)
    if LOG2_UNITS:
        lse = tl.where(dead, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    else:
        logl = tl.math.log2(l_safe) * LN2
        lse = tl.where(dead, float("-inf"), m_i + logl)
        stats_ptrs = Stats + (b * H + h) * rows_total + q0_64 + offs_m
        if CHECK_M:
            tl.store(stats_ptrs, m_i, mask=offs_m < L)
            tl.store(stats_ptrs + stride_sp, logl, mask=offs_m < L)
        else:
            tl.store(stats_ptrs, m_i)
            tl.store(stats_ptrs + stride_sp, logl)
    o_ptrs = Out + split * stride_os + b * stride_ob + h * stride_oh + (q0_64 + m0_64) * stride_om
    o_ptrs = o_ptrs + local_m[:, None] * stride_om + offs_dv[None, :] * stride_ok
    _store_tile(o_ptrs, out.to(Out.dtype.element_ty), offs_m, L, offs_dv, EV, CHECK_M, CHECK_EV)
    lse_ptrs = Lse + split * stride_ls + (b * H + h) * rows_total + q0_64 + offs_m
    if CHECK_M:
        tl.store(lse_ptrs, lse, mask=offs_m < L)
    else:
        tl.store(lse_ptrs, lse)

"""Fused attention backward (FlashAttention-2 style, deterministic), Triton code only.

With s = scale * q k^T [+ mask] (masked entries -inf), P = exp(s - lse) recomputed from the
forward's saved lse, and dO the incoming gradient of the output:

    delta_i = sum_d dO[i, d] O[i, d] - dlse_i                      (preprocess kernel)
    dV = P^T dO,   dS = P * (dO V^T - delta),   dK = scale * dS^T Q  (dK/dV kernel)
    dQ = scale * dS K                                              (dQ kernel)

dlse is the incoming gradient of lse when the loss uses it (d lse_i / d s_ij = P_ij, which folds
into delta). Each output element is written by exactly one program, which sums its terms in a
fixed order: no atomics, so results are bitwise identical from run to run. Grouped-query heads
are summed inside the dK/dV program that owns the shared KV head (no repeated K/V).

Scores are in log2 units (log2(e) folded into qk_scale) so each exponential is one exp2, and come
from the score step the forward uses (common._score_step). lse, delta and the accumulators are
float32, float64 for float64 inputs; a float64 scale arrives split in two float32 halves
(qk_scale + qk_scale_lo, scale + scale_lo; see common._scaled). Rows with lse = -inf (no key to
attend to) get P = 0: their lse is read as +inf, so every exp2 underflows to 0 and no
(-inf) - (-inf) is ever formed. Edge handling uses the forward's constexpr flags (common.py:
CHECK_M / CHECK_N / CHECK_E / CHECK_EV / IS_CAUSAL / IS_LOCAL / MASK_KIND / HAS_SOFTCAP / HAS_ALIBI /
LARGE_OFFSETS). As in the forward, each kernel visits its blocks through one step call for full
blocks (no mask tile, no causal or window check) and one for cut blocks (the kernel's MASK_KIND,
IS_CAUSAL and IS_LOCAL); blocks outside a window's band are never visited. With a softcap c the
scores are s = c * tanh(scale * q.k / c), so dS is multiplied by 1 - tanh^2 (the score step
recomputes it) before the dK and dQ products, whose final factor stays `scale`. With dropout the
keep mask Z / (1 - p) is regenerated from the saved draw (common._dropout_keep, never stored):
dV = (P * Z)^T dO and dS = P * (Z * dO V^T - delta), delta still rowsum(dO * O) - dlse. Packed calls
(VARLEN) run the dK/dV and dQ kernels per sequence, as the forward does (common._sequence: grid
axis 2 is the sequence, sized by max_k / max_q); the preprocess kernel is row-wise and runs on the
packed rows as they are.
"""

import triton
import triton.language as tl

from .common import (
    _block_start,
    _dropout_keep,
    _dropout_scaled,
    _key_block_bounds,
    _key_block_scores,
    _load_rows,
    _load_tile,
    _mods,
    _probs,
    _row_offsets,
    _row_shift,
    _scaled,
    _score_step,
    _sequence,
    _store_tile,
)


@triton.jit
def attention_backward_preprocess_kernel(
    Delta, Out, DOut, DLse,
    stride_ob, stride_oh, stride_om, stride_ok,
    stride_dob, stride_doh, stride_dom, stride_dok,
    H, L, EV,
    HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
    CHECK_M: tl.constexpr, CHECK_EV: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """Delta (B, H, L) = rowsum(dO * O) [- dLse], float32 (float64 for float64 inputs).

    grid: (cdiv(L, BLOCK_M), H, B). HAS_DLSE: the loss uses lse (DLse is read)."""
    start_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    m0_64 = (start_m * BLOCK_M).to(tl.int64)
    local_m = tl.arange(0, BLOCK_M)
    offs_m = start_m * BLOCK_M + local_m
    offs_dv = tl.arange(0, HEAD_DIM_V)
    o_ptrs = Out + b * stride_ob + h * stride_oh + m0_64 * stride_om
    o = _load_tile(o_ptrs + local_m[:, None] * stride_om + offs_dv[None, :] * stride_ok,
                   offs_m, L, offs_dv, EV, CHECK_M, CHECK_EV)
    do_ptrs = DOut + b * stride_dob + h * stride_doh + m0_64 * stride_dom
    do = _load_tile(do_ptrs + local_m[:, None] * stride_dom + offs_dv[None, :] * stride_dok,
                    offs_m, L, offs_dv, EV, CHECK_M, CHECK_EV)
    acc_ty: tl.constexpr = tl.float64 if Out.dtype.element_ty == tl.float64 else tl.float32
    delta = tl.sum(o.to(acc_ty) * do.to(acc_ty), 1)
    row_ptrs = (b * H + h) * L + offs_m
    if HAS_DLSE:
        if CHECK_M:
            delta -= tl.load(DLse + row_ptrs, mask=offs_m < L, other=0.0)
        else:
            delta -= tl.load(DLse + row_ptrs)
    if CHECK_M:
        tl.store(Delta + row_ptrs, delta, mask=offs_m < L)
    else:
        tl.store(Delta + row_ptrs, delta)


@triton.jit
def _dkdv_query_block(
    dk, dv, k, v, offs_n, start_m, offs_mb,
    Q_head, stride_qm, stride_qk, DO_head, stride_dom, stride_dok, Lse_row, Stats_row, stride_sp, Delta_row,
    M_cols, stride_mm, stride_mn,
    L, S, E, EV, qk_scale, qk_scale_lo, mods,
    MASK_KIND: tl.constexpr, APPLY_CAUSAL: tl.constexpr, APPLY_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, CHECK_E: tl.constexpr, CHECK_EV: tl.constexpr,
    LARGE_OFFSETS: tl.constexpr, INPUT_PRECISION: tl.constexpr, KEY_MAJOR: tl.constexpr,
    LOG2_UNITS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    """Fold query rows start_m + offs_mb of one query head into dK, dV of the key block at
    positions offs_n (k, v: its tiles; M_cols: the mask at key offs_n[0]).

    Two orientations of the same products, chosen per config by what compiles without spills:
    - query-major (KEY_MAJOR False), as in the forward: qk = q k^T, then P and dS are transposed
      into the dV and dK products. K and V enter only as second operands, which Hopper's warpgroup
      MMA reads from shared memory, so they take no registers: the 16-bit configs' choice.
    - key-major: qk^T = k q^T, keys along rows, so nothing is transposed but K and V are first
      operands, held in registers (some float32 configs compile smaller this way).
    Query rows past L have P = 0 (lse read as +inf); key rows past S are never stored.
    HAS_DROPOUT: with Z = keep / (1 - p) (common._dropout_keep), dV takes (P * Z)^T dO and dS
    = P * (Z * dO V^T - delta).
    offs_n and offs_mb come from the caller: ranges built inside the loop stay there and changed the
    register allocation (forward._attend_kv_block).
    """
    local_n = tl.arange(0, k.shape[0])
    offs_dk = tl.arange(0, k.shape[1])
    offs_dv = tl.arange(0, v.shape[1])
    rows = start_m + offs_mb
    rows_q = _row_offsets(rows, LARGE_OFFSETS)
    q = _load_tile(Q_head + rows_q[:, None] * stride_qm + offs_dk[None, :] * stride_qk,
                   rows, L, offs_dk, E, CHECK_M, CHECK_E)
    m_row, logl = _row_shift(Lse_row, Stats_row, stride_sp, rows, L, CHECK_M, LOG2_UNITS=LOG2_UNITS)
    do = _load_tile(DO_head + rows_q[:, None] * stride_dom + offs_dv[None, :] * stride_dok,
                    rows, L, offs_dv, EV, CHECK_M, CHECK_EV)
    delta = _load_rows(Delta_row + rows, rows, L, 0.0, CHECK_M)
    if KEY_MAJOR:
        qkT = _scaled(tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION), qk_scale, qk_scale_lo)
        qkT, cap_gradT = _score_step(qkT, M_cols + local_n[:, None] * stride_mn + rows_q[None, :] * stride_mm,
                                     rows, offs_n, L, S, mods,
                                     MASK_KIND=MASK_KIND, APPLY_CAUSAL=APPLY_CAUSAL, APPLY_WINDOW=APPLY_WINDOW,
                                     HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, CHECK_M=CHECK_M, CHECK_N=CHECK_N,
                                     KEY_MAJOR=True, LOG2_UNITS=LOG2_UNITS)
        pT = _probs(qkT, m_row[None, :], logl[None, :], LOG2_UNITS=LOG2_UNITS)
        if HAS_DROPOUT:
            keepT = _dropout_keep(rows, offs_n, mods, KEY_MAJOR=True)
            dv = tl.dot(tl.where(keepT, _dropout_scaled(pT, mods), 0.0).to(do.dtype), do, dv,
                        input_precision=INPUT_PRECISION, out_dtype=dv.dtype)
        else:
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=INPUT_PRECISION, out_dtype=dv.dtype)
        dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        if HAS_DROPOUT:
            dpT = tl.where(keepT, _dropout_scaled(dpT, mods), 0.0)
        dsT = pT * (dpT - delta[None, :])
        if HAS_SOFTCAP:
            dsT = dsT * cap_gradT
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=INPUT_PRECISION, out_dtype=dk.dtype)
    else:
        qk = _scaled(tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION), qk_scale, qk_scale_lo)
        qk, cap_grad = _score_step(qk, M_cols + rows_q[:, None] * stride_mm + local_n[None, :] * stride_mn,
                                   rows, offs_n, L, S, mods,
                                   MASK_KIND=MASK_KIND, APPLY_CAUSAL=APPLY_CAUSAL, APPLY_WINDOW=APPLY_WINDOW,
                                   HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, CHECK_M=CHECK_M, CHECK_N=CHECK_N,
                                   KEY_MAJOR=False, LOG2_UNITS=LOG2_UNITS)
        p = _probs(qk, m_row[:, None], logl[:, None], LOG2_UNITS=LOG2_UNITS)
        if HAS_DROPOUT:
            keep = _dropout_keep(rows, offs_n, mods, KEY_MAJOR=False)
            dv = tl.dot(tl.trans(tl.where(keep, _dropout_scaled(p, mods), 0.0).to(do.dtype)), do, dv,
                        input_precision=INPUT_PRECISION, out_dtype=dv.dtype)
        else:
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=INPUT_PRECISION, out_dtype=dv.dtype)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        if HAS_DROPOUT:
            dp = tl.where(keep, _dropout_scaled(dp, mods), 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * cap_grad
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=INPUT_PRECISION, out_dtype=dk.dtype)
    return dk, dv


@triton.jit
def _query_block_bounds(
    Counts, n0, L, causal_offset, window_lo,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, IS_LOCAL: tl.constexpr,
    FROM_LIST: tl.constexpr,
):
    """Loop bounds over the query blocks that see keys [n0, n0 + BLOCK_N): (full_lo, full_end,
    cut_lo, cut_span, gap_at, gap), [full_lo, full_end) the blocks that need no masking and cut_span
    positions from cut_lo that do, skipping `gap` positions at gap_at (common._block_start).

    Ranges (no mask): query positions, a block every BLOCK_M; the cut blocks are the ones the
    diagonal crosses, from the first row that sees key n0 to the first that sees the whole block,
    and with a window (IS_LOCAL) the ones its lower edge crosses, from the last row that sees the
    whole block to the last that sees key n0 + BLOCK_N - 1; rows below those are not visited.
    Lists (FROM_LIST): positions in the host's list, a block every 1 (Counts[0] full, Counts[1] cut).
    A span rather than an end for the cut blocks, as in common._key_block_bounds."""
    gap_at = 0
    gap = 0
    if FROM_LIST:
        full_lo = 0
        full_end = tl.load(Counts)
        cut_lo = full_end
        cut_span = tl.load(Counts + 1)
    else:
        if IS_CAUSAL:
            cut_lo = tl.maximum(n0 - causal_offset, 0)
            # Rounded down as x - x % BLOCK_M, the form common._key_block_bounds explains.
            cut_lo = cut_lo - cut_lo % BLOCK_M
            full_lo = tl.minimum(tl.maximum(n0 + BLOCK_N - 1 - causal_offset, 0), L)
            full_lo = full_lo + (BLOCK_M - full_lo % BLOCK_M) % BLOCK_M
        else:
            cut_lo = 0
            full_lo = 0
        full_end = L
        cut_span = full_lo - cut_lo
        if IS_LOCAL:
            # Row i sees every key of the block while i <= n0 - window_lo, some while
            # i <= n0 + BLOCK_N - 1 - window_lo. A last block past L is full when its real rows are.
            full_end = tl.minimum(tl.maximum(n0 - window_lo + 1, 0), L)
            full_end = tl.where(full_end >= L, L, full_end - full_end % BLOCK_M)
            full_end = tl.maximum(full_end, full_lo)
            row_end = tl.maximum(tl.minimum(tl.maximum(n0 + BLOCK_N - window_lo, 0), L), full_end)
            gap_at = full_lo
            gap = full_end - full_lo
            cut_span = cut_span + (row_end - full_end)
    return full_lo, full_end, cut_lo, cut_span, gap_at, gap


@triton.jit
def attention_backward_dkdv_kernel(
    DK, DV, Q, K, V, DO, Lse, Stats, Delta, Mask, BlockCount, BlockIndex, Alibi, Rng, CuSeqQ, CuSeqK,
    stride_qb, stride_qh, stride_qm, stride_qk,
    stride_kb, stride_kh, stride_kn, stride_kk,
    stride_vb, stride_vh, stride_vn, stride_vk,
    stride_dob, stride_doh, stride_dom, stride_dok,
    stride_dkb, stride_dkh, stride_dkn, stride_dkk,
    stride_dvb, stride_dvh, stride_dvn, stride_dvk,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_cb, stride_ch, stride_cn,
    stride_ib, stride_ih, stride_in,
    stride_ab, stride_ah, stride_sp,
    H, GROUP, L, S, E, EV,
    qk_scale: tl.float32, qk_scale_lo: tl.float32, scale: tl.float32, scale_lo: tl.float32, causal_offset, window_lo,
    softcap_scale: tl.float32, softcap_scale_lo: tl.float32, batch0, dropout_threshold,
    dropout_scale: tl.float32, dropout_scale_lo: tl.float32,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IS_LOCAL: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, CHECK_E: tl.constexpr, CHECK_EV: tl.constexpr,
    LARGE_OFFSETS: tl.constexpr, INPUT_PRECISION: tl.constexpr, KEY_MAJOR: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """DK (B, Hkv, S, E), DV (B, Hkv, S, EV) of one block of BLOCK_N keys of one KV head.

    grid: (cdiv(S, BLOCK_N), Hkv, B). The program loops over the GROUP query heads
    kvh * GROUP + g that read its KV head and, for each, over the query blocks that can see its keys,
    summing in registers. H is the number of query heads; Lse and Delta are (B, H, L) float32
    (float64 for float64 inputs). KEY_MAJOR picks the orientation of the score tiles (_dkdv_query_block).
    Without a mask: causal starts at the diagonal (query i sees key j when j <= i + causal_offset),
    blocks the diagonal cuts first (and a window's lower edge, j >= i + window_lo), then the blocks
    inside the band with no causal or window check. With a mask the
    host lists per (b, query head, key block) the query blocks to visit: BlockCount[..., 0] that
    need no masking, then BlockCount[..., 1] that do, their indices in BlockIndex. Full blocks drop
    the mask tile and the causal check; every block keeps CHECK_M and CHECK_N (query rows past L get
    P = 0, this program's key rows past S are never stored). Flags: common.py.
    """
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and HEAD_DIM >= 16 and HEAD_DIM_V >= 16)
    # One loop form for ranges and lists, as in the forward kernel (common._block_start).
    FROM_LIST: tl.constexpr = MASK_KIND != 0
    STEP: tl.constexpr = 1 if FROM_LIST else BLOCK_M
    # Without a mask, causality or a window, every query block is full.
    HAS_CUT_BLOCKS: tl.constexpr = FROM_LIST or IS_CAUSAL or IS_LOCAL
    HAS_GAP: tl.constexpr = IS_LOCAL and not FROM_LIST
    # Ranges walk the query blocks upwards, so the diagonal's (cut) blocks come before the full ones;
    # the host's lists put the full blocks first. Both orders are kept, since the order of the sums
    # fixes the bits of dK and dV: a static_range over two phases picks it at compile time and
    # leaves one step call per kind of block.
    FULL_PHASE: tl.constexpr = 0 if FROM_LIST else 1
    LOG2_UNITS: tl.constexpr = MASK_KIND != 2  # float masks keep natural units (common.py)
    start_n = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)
    seq = tl.program_id(2).to(tl.int64)  # with VARLEN, the sequence
    rows_total = L  # the row stride of Lse and Delta, before L becomes the sequence's length
    b, q0, k0, L, S, causal_offset, window_lo = _sequence(
        CuSeqQ, CuSeqK, CuSeqK, seq, L, S, causal_offset, window_lo,
        VARLEN=VARLEN, HAS_CU_K=True, HAS_SEQUSED=False)
    n0 = start_n * BLOCK_N
    if VARLEN:
        if n0 >= S:  # the grid is sized by max_k: this sequence is shorter
            return
    n0_64 = n0.to(tl.int64)
    q0_64 = q0.to(tl.int64)
    k0_64 = k0.to(tl.int64)
    local_n = tl.arange(0, BLOCK_N)
    offs_n = n0 + local_n
    offs_mb = tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)

    K = K + k0_64 * stride_kn
    V = V + k0_64 * stride_vn
    DK = DK + k0_64 * stride_dkn
    DV = DV + k0_64 * stride_dvn
    k_ptrs = K + b * stride_kb + kvh * stride_kh + n0_64 * stride_kn
    k = _load_tile(k_ptrs + local_n[:, None] * stride_kn + offs_dk[None, :] * stride_kk,
                   offs_n, S, offs_dk, E, CHECK_N, CHECK_E)
    v_ptrs = V + b * stride_vb + kvh * stride_vh + n0_64 * stride_vn
    v = _load_tile(v_ptrs + local_n[:, None] * stride_vn + offs_dv[None, :] * stride_vk,
                   offs_n, S, offs_dv, EV, CHECK_N, CHECK_EV)
    acc_ty: tl.constexpr = tl.float64 if Q.dtype.element_ty == tl.float64 else tl.float32
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=acc_ty)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_V], dtype=acc_ty)

    for g in range(0, GROUP):
        h = kvh * GROUP + g
        Q_head = Q + b * stride_qb + h * stride_qh + q0_64 * stride_qm
        DO_head = DO + b * stride_dob + h * stride_doh + q0_64 * stride_dom
        Lse_row = Lse + (b * H + h) * rows_total + q0_64
        Stats_row = Stats + (b * H + h) * rows_total + q0_64
        Delta_row = Delta + (b * H + h) * rows_total + q0_64
        M_cols = Mask + b * stride_mb + h * stride_mh + n0_64 * stride_mn
        Counts = BlockCount + b * stride_cb + h * stride_ch + start_n * stride_cn
        Index = BlockIndex + b * stride_ib + h * stride_ih + start_n * stride_in
        full_lo, full_end, cut_lo, cut_span, gap_at, gap = _query_block_bounds(
            Counts, n0, L, causal_offset, window_lo,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, IS_CAUSAL=IS_CAUSAL, IS_LOCAL=IS_LOCAL, FROM_LIST=FROM_LIST)
        mods = _mods(Alibi, Rng, seq, h, H, batch0, stride_ab, stride_ah, causal_offset, window_lo, softcap_scale,
                     softcap_scale_lo, dropout_threshold, dropout_scale, dropout_scale_lo, HAS_ALIBI=HAS_ALIBI,
                 HAS_DROPOUT=HAS_DROPOUT)
        for phase in tl.static_range(2):
            if phase == FULL_PHASE:
                for j in range(full_lo, full_end, STEP):
                    dk, dv = _dkdv_query_block(
                        dk, dv, k, v, offs_n,
                        _block_start(j, Index, 0, 0, BLOCK=BLOCK_M, FROM_LIST=FROM_LIST, HAS_GAP=False), offs_mb,
                        Q_head, stride_qm, stride_qk, DO_head, stride_dom, stride_dok,
                        Lse_row, Stats_row, stride_sp, Delta_row,
                        M_cols, stride_mm, stride_mn,
                        L, S, E, EV, qk_scale, qk_scale_lo, mods,
                        MASK_KIND=0, APPLY_CAUSAL=False, APPLY_WINDOW=False, HAS_SOFTCAP=HAS_SOFTCAP,
                        HAS_ALIBI=HAS_ALIBI, CHECK_M=CHECK_M, CHECK_N=CHECK_N, CHECK_E=CHECK_E, CHECK_EV=CHECK_EV,
                        LARGE_OFFSETS=LARGE_OFFSETS, INPUT_PRECISION=INPUT_PRECISION, KEY_MAJOR=KEY_MAJOR,
                        LOG2_UNITS=LOG2_UNITS, HAS_DROPOUT=HAS_DROPOUT)
            elif HAS_CUT_BLOCKS:
                for j in range(cut_lo, cut_lo + cut_span, STEP):
                    dk, dv = _dkdv_query_block(
                        dk, dv, k, v, offs_n,
                        _block_start(j, Index, gap_at, gap, BLOCK=BLOCK_M, FROM_LIST=FROM_LIST, HAS_GAP=HAS_GAP),
                        offs_mb, Q_head, stride_qm, stride_qk, DO_head, stride_dom, stride_dok,
                        Lse_row, Stats_row, stride_sp, Delta_row,
                        M_cols, stride_mm, stride_mn,
                        L, S, E, EV, qk_scale, qk_scale_lo, mods,
                        MASK_KIND=MASK_KIND, APPLY_CAUSAL=IS_CAUSAL, APPLY_WINDOW=IS_LOCAL, HAS_SOFTCAP=HAS_SOFTCAP,
                        HAS_ALIBI=HAS_ALIBI, CHECK_M=CHECK_M, CHECK_N=CHECK_N, CHECK_E=CHECK_E, CHECK_EV=CHECK_EV,
                        LARGE_OFFSETS=LARGE_OFFSETS, INPUT_PRECISION=INPUT_PRECISION, KEY_MAJOR=KEY_MAJOR,
                        LOG2_UNITS=LOG2_UNITS, HAS_DROPOUT=HAS_DROPOUT)

    dk = _scaled(dk, scale, scale_lo)
    dk_ptrs = DK + b * stride_dkb + kvh * stride_dkh + n0_64 * stride_dkn
    dk_ptrs = dk_ptrs + local_n[:, None] * stride_dkn + offs_dk[None, :] * stride_dkk
    dv_ptrs = DV + b * stride_dvb + kvh * stride_dvh + n0_64 * stride_dvn
    dv_ptrs = dv_ptrs + local_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvk
    _store_tile(dk_ptrs, dk.to(DK.dtype.element_ty), offs_n, S, offs_dk, E, CHECK_N, CHECK_E)
    _store_tile(dv_ptrs, dv.to(DV.dtype.element_ty), offs_n, S, offs_dv, EV, CHECK_N, CHECK_EV)


@triton.jit
def _dq_key_block(
    dq, q, do, m_row, logl, delta, offs_m, start_n, offs_n,
    K_head, stride_kn, stride_kk, V_head, stride_vn, stride_vk, M_rows, stride_mm, stride_mn,
    L, S, E, EV, qk_scale, qk_scale_lo, mods,
    MASK_KIND: tl.constexpr, APPLY_CAUSAL: tl.constexpr, APPLY_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, CHECK_E: tl.constexpr, CHECK_EV: tl.constexpr,
    LARGE_OFFSETS: tl.constexpr, INPUT_PRECISION: tl.constexpr, LOG2_UNITS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    """Fold key positions start_n + offs_n into dQ of query rows offs_m (q, do, m_row, logl, delta: their
    tiles and rows). K_head / V_head: the KV head at position 0; M_rows: the mask at query row
    offs_m[0], key 0. offs_n comes from the caller, as in forward._attend_kv_block."""
    offs_dk = tl.arange(0, q.shape[1])
    offs_dv = tl.arange(0, do.shape[1])
    cols = start_n + offs_n
    rows_kv = _row_offsets(cols, LARGE_OFFSETS)[:, None]
    k = _load_tile(K_head + rows_kv * stride_kn + offs_dk[None, :] * stride_kk, cols, S, offs_dk, E, CHECK_N, CHECK_E)
    # CHECK_N: keys past S would add to every row of dQ; _key_block_scores sets them to -inf.
    qk, cap_grad = _key_block_scores(q, k, M_rows, stride_mm, stride_mn, offs_m, cols, rows_kv, L, S,
                                     qk_scale, qk_scale_lo, mods,
                                     MASK_KIND=MASK_KIND, APPLY_CAUSAL=APPLY_CAUSAL, APPLY_WINDOW=APPLY_WINDOW,
                                     HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, CHECK_M=CHECK_M, CHECK_N=CHECK_N,
                                     INPUT_PRECISION=INPUT_PRECISION, LOG2_UNITS=LOG2_UNITS)
    p = _probs(qk, m_row[:, None], logl[:, None], LOG2_UNITS=LOG2_UNITS)
    v = _load_tile(V_head + rows_kv * stride_vn + offs_dv[None, :] * stride_vk, cols, S, offs_dv, EV, CHECK_N, CHECK_EV)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    if HAS_DROPOUT:  # dP = Z * dO V^T (_dkdv_query_block)
        dp = tl.where(_dropout_keep(offs_m, cols, mods, KEY_MAJOR=False), _dropout_scaled(dp, mods), 0.0)
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        ds = ds * cap_grad
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION, out_dtype=dq.dtype)
    return dq


@triton.jit
def attention_backward_dq_kernel(
    DQ, Q, K, V, DO, Lse, Stats, Delta, Mask, BlockCount, BlockIndex, Alibi, Rng, CuSeqQ, CuSeqK,
    stride_qb, stride_qh, stride_qm, stride_qk,
    stride_kb, stride_kh, stride_kn, stride_kk,
    stride_vb, stride_vh, stride_vn, stride_vk,
    stride_dob, stride_doh, stride_dom, stride_dok,
    stride_dqb, stride_dqh, stride_dqm, stride_dqk,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im,
    stride_ab, stride_ah, stride_sp,
    H, GROUP, L, S, E, EV,
    qk_scale: tl.float32, qk_scale_lo: tl.float32, scale: tl.float32, scale_lo: tl.float32, causal_offset, window_lo,
    softcap_scale: tl.float32, softcap_scale_lo: tl.float32, batch0, dropout_threshold,
    dropout_scale: tl.float32, dropout_scale_lo: tl.float32,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IS_LOCAL: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, CHECK_E: tl.constexpr, CHECK_EV: tl.constexpr,
    LARGE_OFFSETS: tl.constexpr, INPUT_PRECISION: tl.constexpr, VARLEN: tl.constexpr,
):
    """DQ (B, H, L, E) of one block of BLOCK_M query rows of one query head.

    grid: (cdiv(L, BLOCK_M), H, B). Key blocks are visited as in the forward kernel
    (common._key_block_bounds): ranges without a mask (blocks wholly left of the diagonal, then the
    ones it or the end of S cuts), host-built lists (BlockCount, BlockIndex per (b, h, query block))
    with one; full blocks by one step call without mask tile, causal or window check or CHECK_N, cut
    blocks by one with the kernel's flags (common.py).
    """
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and HEAD_DIM >= 16 and HEAD_DIM_V >= 16)
    # One loop form for ranges and lists, as in the forward kernel (common._block_start).
    FROM_LIST: tl.constexpr = MASK_KIND != 0
    STEP: tl.constexpr = 1 if FROM_LIST else BLOCK_N
    # Without a mask, causality, a window or a ragged S, every block is full.
    HAS_CUT_BLOCKS: tl.constexpr = FROM_LIST or IS_CAUSAL or IS_LOCAL or CHECK_N
    HAS_GAP: tl.constexpr = IS_LOCAL and not FROM_LIST
    LOG2_UNITS: tl.constexpr = MASK_KIND != 2  # float masks keep natural units (common.py)
    start_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    seq = tl.program_id(2).to(tl.int64)  # with VARLEN, the sequence
    rows_total = L  # the row stride of Lse and Delta, before L becomes the sequence's length
    b, q0, k0, L, S, causal_offset, window_lo = _sequence(
        CuSeqQ, CuSeqK, CuSeqK, seq, L, S, causal_offset, window_lo,
        VARLEN=VARLEN, HAS_CU_K=True, HAS_SEQUSED=False)
    kvh = h // GROUP
    m0 = start_m * BLOCK_M
    if VARLEN:
        if m0 >= L:  # the grid is sized by max_q: this sequence is shorter
            return
    m0_64 = m0.to(tl.int64)
    q0_64 = q0.to(tl.int64)
    k0_64 = k0.to(tl.int64)
    local_m = tl.arange(0, BLOCK_M)
    offs_m = m0 + local_m
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)

    Q = Q + q0_64 * stride_qm
    DO = DO + q0_64 * stride_dom
    DQ = DQ + q0_64 * stride_dqm
    q_ptrs = Q + b * stride_qb + h * stride_qh + m0_64 * stride_qm
    q = _load_tile(q_ptrs + local_m[:, None] * stride_qm + offs_dk[None, :] * stride_qk,
                   offs_m, L, offs_dk, E, CHECK_M, CHECK_E)
    do_ptrs = DO + b * stride_dob + h * stride_doh + m0_64 * stride_dom
    do = _load_tile(do_ptrs + local_m[:, None] * stride_dom + offs_dv[None, :] * stride_dok,
                    offs_m, L, offs_dv, EV, CHECK_M, CHECK_EV)
    row0 = (b * H + h) * rows_total + q0_64
    m_row, logl = _row_shift(Lse + row0, Stats + row0, stride_sp, offs_m, L, CHECK_M, LOG2_UNITS=LOG2_UNITS)
    delta = _load_rows(Delta + (b * H + h) * rows_total + q0_64 + offs_m, offs_m, L, 0.0, CHECK_M)
    K_head = K + b * stride_kb + kvh * stride_kh + k0_64 * stride_kn
    V_head = V + b * stride_vb + kvh * stride_vh + k0_64 * stride_vn
    M_rows = Mask + b * stride_mb + h * stride_mh + m0_64 * stride_mm
    Counts = BlockCount + b * stride_cb + h * stride_ch + start_m * stride_cm
    Index = BlockIndex + b * stride_ib + h * stride_ih + start_m * stride_im
    full_lo, full_end, cut_lo, cut_span, gap_at, gap = _key_block_bounds(
        Counts, m0, L, S, causal_offset, window_lo,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, IS_CAUSAL=IS_CAUSAL, IS_LOCAL=IS_LOCAL, FROM_LIST=FROM_LIST)
    mods = _mods(Alibi, Rng, seq, h, H, batch0, stride_ab, stride_ah, causal_offset, window_lo, softcap_scale,
                 softcap_scale_lo, dropout_threshold, dropout_scale, dropout_scale_lo, HAS_ALIBI=HAS_ALIBI,
                 HAS_DROPOUT=HAS_DROPOUT)
    acc_ty: tl.constexpr = tl.float64 if Q.dtype.element_ty == tl.float64 else tl.float32
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=acc_ty)

    for j in range(full_lo, full_end, STEP):
        dq = _dq_key_block(
            dq, q, do, m_row, logl, delta, offs_m,
            _block_start(j, Index, 0, 0, BLOCK=BLOCK_N, FROM_LIST=FROM_LIST, HAS_GAP=False), offs_n,
            K_head, stride_kn, stride_kk, V_head, stride_vn, stride_vk, M_rows, stride_mm, stride_mn,
            L, S, E, EV, qk_scale, qk_scale_lo, mods,
            MASK_KIND=0, APPLY_CAUSAL=False, APPLY_WINDOW=False, HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI,
            CHECK_M=CHECK_M, CHECK_N=False,
            CHECK_E=CHECK_E, CHECK_EV=CHECK_EV, LARGE_OFFSETS=LARGE_OFFSETS, INPUT_PRECISION=INPUT_PRECISION,
            LOG2_UNITS=LOG2_UNITS, HAS_DROPOUT=HAS_DROPOUT)
    if HAS_CUT_BLOCKS:
        for j in range(cut_lo, cut_lo + cut_span, STEP):
            dq = _dq_key_block(
                dq, q, do, m_row, logl, delta, offs_m,
                _block_start(j, Index, gap_at, gap, BLOCK=BLOCK_N, FROM_LIST=FROM_LIST, HAS_GAP=HAS_GAP), offs_n,
                K_head, stride_kn, stride_kk, V_head, stride_vn, stride_vk, M_rows, stride_mm, stride_mn,
                L, S, E, EV, qk_scale, qk_scale_lo, mods,
                MASK_KIND=MASK_KIND, APPLY_CAUSAL=IS_CAUSAL, APPLY_WINDOW=IS_LOCAL,
                HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, CHECK_M=CHECK_M, CHECK_N=CHECK_N,
                CHECK_E=CHECK_E, CHECK_EV=CHECK_EV, LARGE_OFFSETS=LARGE_OFFSETS, INPUT_PRECISION=INPUT_PRECISION,
                LOG2_UNITS=LOG2_UNITS, HAS_DROPOUT=HAS_DROPOUT)

    dq = _scaled(dq, scale, scale_lo)
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + m0_64 * stride_dqm
    dq_ptrs = dq_ptrs + local_m[:, None] * stride_dqm + offs_dk[None, :] * stride_dqk
    _store_tile(dq_ptrs, dq.to(DQ.dtype.element_ty), offs_m, L, offs_dk, E, CHECK_M, CHECK_E)

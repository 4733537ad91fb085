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

Scores are in log2 units (log2(e) folded into qk_scale) so each exponential is one exp2. lse,
delta and the accumulators are float32, float64 for float64 inputs; a float64 scale arrives split in
two float32 halves (qk_scale + qk_scale_lo, scale + scale_lo; see forward._scaled). Rows with
lse = -inf (no key to attend to) get P = 0: their lse is read as +inf, so every exp2 underflows to
0 and no (-inf) - (-inf) is ever formed. Edge handling uses the forward's constexpr flags
(CHECK_M / CHECK_N / CHECK_E / CHECK_EV / IS_CAUSAL / MASK_KIND / LARGE_OFFSETS).
"""

import triton
import triton.language as tl

from .forward import LOG2E, _load_tile, _scaled, mask_scores, scores_tile


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

    grid: (cdiv(L, BLOCK_M), H, B)."""
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
def _load_rows(ptrs, rows, n_rows, other, CHECK_ROWS: tl.constexpr):
    if CHECK_ROWS:
        x = tl.load(ptrs, mask=rows < n_rows, other=other)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _lse_log2(Lse_row, rows, L, CHECK_M: tl.constexpr):
    """lse in log2 units, with -inf (a row with no key) and rows past L read as +inf: P = 0 there."""
    lse = _load_rows(Lse_row + rows, rows, L, float("inf"), CHECK_M)
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _dkdv_query_block(
    dk, dv, k, v, Q_head, DO_head, Lse_row, Delta_row, M_cols,
    start_m, offs_n, local_n, offs_mb, offs_dk, offs_dv,
    stride_qm, stride_qk, stride_dom, stride_dok, stride_mm, stride_mn,
    L, S, E, EV, qk_scale, qk_scale_lo, causal_offset,
    MASK_KIND: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, APPLY_CAUSAL: tl.constexpr,
    CHECK_E: tl.constexpr, CHECK_EV: tl.constexpr, LARGE_OFFSETS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    KEY_MAJOR: tl.constexpr,
):
    """Fold query rows [start_m, start_m + BLOCK_M) of one query head into dK, dV of a key block.

    Two orientations of the same products, chosen per config by what compiles without spills:
    - query-major (KEY_MAJOR False), as in the forward: qk = q k^T, then P and dS are transposed
      into the dV and dK products. K and V enter only as second operands, which Hopper's warpgroup
      MMA reads from shared memory, so they take no registers: the 16-bit configs' choice.
    - key-major: qk^T = k q^T, keys along rows, so nothing is transposed but K and V are first
      operands, held in registers (some float32 configs compile smaller this way).
    Query rows past L have P = 0 (lse read as +inf); key rows past S are never stored.
    """
    rows = start_m + offs_mb
    # 32-bit offsets unless the host says start_m * stride can pass 2**31 (as in the forward).
    if LARGE_OFFSETS:
        rows_q = rows.to(tl.int64)
    else:
        rows_q = rows
    q = _load_tile(Q_head + rows_q[:, None] * stride_qm + offs_dk[None, :] * stride_qk,
                   rows, L, offs_dk, E, CHECK_M, CHECK_E)
    lse2 = _lse_log2(Lse_row, rows, L, CHECK_M)
    do = _load_tile(DO_head + rows_q[:, None] * stride_dom + offs_dv[None, :] * stride_dok,
                    rows, L, offs_dv, EV, CHECK_M, CHECK_EV)
    delta = _load_rows(Delta_row + rows, rows, L, 0.0, CHECK_M)
    if KEY_MAJOR:
        qkT = _scaled(tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION), qk_scale, qk_scale_lo)
        m_tile = M_cols + local_n[:, None] * stride_mn + rows_q[None, :] * stride_mm
        qkT = mask_scores(qkT, m_tile, offs_n, S, rows, L, offs_n[:, None], rows[None, :], causal_offset,
                          MASK_KIND, CHECK_N, CHECK_M, APPLY_CAUSAL)
        pT = tl.math.exp2(qkT - lse2[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
    else:
        qk = _scaled(tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION), qk_scale, qk_scale_lo)
        m_tile = M_cols + rows_q[:, None] * stride_mm + local_n[None, :] * stride_mn
        qk = mask_scores(qk, m_tile, rows, L, offs_n, S, offs_n[None, :], rows[:, None], causal_offset,
                         MASK_KIND, CHECK_M, CHECK_N, APPLY_CAUSAL)
        p = tl.math.exp2(qk - lse2[:, None])
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=INPUT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit
def attention_backward_dkdv_kernel(
    DK, DV, Q, K, V, DO, Lse, Delta, Mask, BlockCount, BlockIndex,
    stride_qb, stride_qh, stride_qm, stride_qk,
    stride_kb, stride_kh, stride_kn, stride_kk,
    stride_vb, stride_vh, stride_vn, stride_vk,
    stride_dob, stride_doh, stride_dom, stride_dok,
    stride_dkb, stride_dkh, stride_dkn, stride_dkk,
    stride_dvb, stride_dvh, stride_dvn, stride_dvk,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_cb, stride_ch, stride_cn,
    stride_ib, stride_ih, stride_in,
    H, GROUP, L, S, E, EV,
    qk_scale: tl.float32, qk_scale_lo: tl.float32, scale: tl.float32, scale_lo: tl.float32, causal_offset,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
    CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, CHECK_E: tl.constexpr, CHECK_EV: tl.constexpr,
    LARGE_OFFSETS: tl.constexpr, INPUT_PRECISION: tl.constexpr, KEY_MAJOR: tl.constexpr,
):
    """DK (B, Hkv, S, E), DV (B, Hkv, S, EV) of one block of BLOCK_N keys of one KV head.

    grid: (cdiv(S, BLOCK_N), Hkv, B). The program loops over the GROUP query heads
    kvh * GROUP + g that read its KV head and, for each, over the query blocks that can see its keys,
    summing in registers. H is the number of query heads; Lse and Delta are (B, H, L) float32
    (float64 for float64 inputs). KEY_MAJOR picks the orientation of the score tiles (_dkdv_query_block).
    Without a mask: causal starts at the diagonal (query i sees key j when j <= i + causal_offset),
    blocks the diagonal cuts first, then the blocks below it with no causal check. With a mask the
    host lists per (b, query head, key block) the query blocks to visit: BlockCount[..., 0] that
    need no masking, then BlockCount[..., 1] that do, their indices in BlockIndex.
    """
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and HEAD_DIM >= 16 and HEAD_DIM_V >= 16)
    start_n = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    n0 = start_n * BLOCK_N
    n0_64 = n0.to(tl.int64)
    local_n = tl.arange(0, BLOCK_N)
    offs_n = n0 + local_n
    offs_mb = tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)

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
        Q_head = Q + b * stride_qb + h * stride_qh
        DO_head = DO + b * stride_dob + h * stride_doh
        Lse_row = Lse + (b * H + h) * L
        Delta_row = Delta + (b * H + h) * L
        M_cols = Mask + b * stride_mb + h * stride_mh + n0_64 * stride_mn
        if MASK_KIND == 0:
            if IS_CAUSAL:
                # First query row that sees key n0, and first row that sees the whole key block.
                lo = tl.maximum(n0 - causal_offset, 0)
                lo = lo - lo % BLOCK_M
                full_start = tl.minimum(tl.maximum(n0 + BLOCK_N - 1 - causal_offset, 0), L)
                full_start = full_start + (BLOCK_M - full_start % BLOCK_M) % BLOCK_M
                for start_m in range(lo, full_start, BLOCK_M):
                    dk, dv = _dkdv_query_block(
                        dk, dv, k, v, Q_head, DO_head, Lse_row, Delta_row, M_cols,
                        start_m, offs_n, local_n, offs_mb, offs_dk, offs_dv,
                        stride_qm, stride_qk, stride_dom, stride_dok, stride_mm, stride_mn,
                        L, S, E, EV, qk_scale, qk_scale_lo, causal_offset,
                        0, CHECK_M, CHECK_N, True, CHECK_E, CHECK_EV, LARGE_OFFSETS, INPUT_PRECISION, KEY_MAJOR)
            else:
                full_start = 0
            for start_m in range(full_start, L, BLOCK_M):
                dk, dv = _dkdv_query_block(
                    dk, dv, k, v, Q_head, DO_head, Lse_row, Delta_row, M_cols,
                    start_m, offs_n, local_n, offs_mb, offs_dk, offs_dv,
                    stride_qm, stride_qk, stride_dom, stride_dok, stride_mm, stride_mn,
                    L, S, E, EV, qk_scale, qk_scale_lo, causal_offset,
                    0, CHECK_M, CHECK_N, False, CHECK_E, CHECK_EV, LARGE_OFFSETS, INPUT_PRECISION, KEY_MAJOR)
        else:
            count_ptr = BlockCount + b * stride_cb + h * stride_ch + start_n * stride_cn
            index_ptr = BlockIndex + b * stride_ib + h * stride_ih + start_n * stride_in
            n_full = tl.load(count_ptr)
            n_cut = tl.load(count_ptr + 1)
            for i in range(0, n_full):
                start_m = tl.load(index_ptr + i) * BLOCK_M
                dk, dv = _dkdv_query_block(
                    dk, dv, k, v, Q_head, DO_head, Lse_row, Delta_row, M_cols,
                    start_m, offs_n, local_n, offs_mb, offs_dk, offs_dv,
                    stride_qm, stride_qk, stride_dom, stride_dok, stride_mm, stride_mn,
                    L, S, E, EV, qk_scale, qk_scale_lo, causal_offset,
                    0, CHECK_M, CHECK_N, False, CHECK_E, CHECK_EV, LARGE_OFFSETS, INPUT_PRECISION, KEY_MAJOR)
            for i in range(n_full, n_full + n_cut):
                start_m = tl.load(index_ptr + i) * BLOCK_M
                dk, dv = _dkdv_query_block(
                    dk, dv, k, v, Q_head, DO_head, Lse_row, Delta_row, M_cols,
                    start_m, offs_n, local_n, offs_mb, offs_dk, offs_dv,
                    stride_qm, stride_qk, stride_dom, stride_dok, stride_mm, stride_mn,
                    L, S, E, EV, qk_scale, qk_scale_lo, causal_offset,
                    MASK_KIND, CHECK_M, CHECK_N, IS_CAUSAL, CHECK_E, CHECK_EV, LARGE_OFFSETS, INPUT_PRECISION, KEY_MAJOR)

    dk = _scaled(dk, scale, scale_lo)
    dk_ptrs = DK + b * stride_dkb + kvh * stride_dkh + n0_64 * stride_dkn
    dk_ptrs = dk_ptrs + local_n[:, None] * stride_dkn + offs_dk[None, :] * stride_dkk
    dv_ptrs = DV + b * stride_dvb + kvh * stride_dvh + n0_64 * stride_dvn
    dv_ptrs = dv_ptrs + local_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvk
    _store_tile(dk_ptrs, dk.to(DK.dtype.element_ty), offs_n, S, offs_dk, E, CHECK_N, CHECK_E)
    _store_tile(dv_ptrs, dv.to(DV.dtype.element_ty), offs_n, S, offs_dv, EV, CHECK_N, CHECK_EV)


@triton.jit
def _store_tile(ptrs, x, rows, n_rows, cols, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    if CHECK_ROWS:
        if CHECK_COLS:
            tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))
        else:
            tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    else:
        if CHECK_COLS:
            tl.store(ptrs, x, mask=cols[None, :] < n_cols)
        else:
            tl.store(ptrs, x)


@triton.jit
def _dq_key_block(
    dq, q, do, lse2, delta, K_head, V_head, M_rows,
    start_n, offs_m, local_m, offs_nb, offs_dk, offs_dv,
    stride_kn, stride_kk, stride_vn, stride_vk, stride_mm, stride_mn,
    L, S, E, EV, qk_scale, qk_scale_lo, causal_offset,
    MASK_KIND: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, APPLY_CAUSAL: tl.constexpr,
    CHECK_E: tl.constexpr, CHECK_EV: tl.constexpr, LARGE_OFFSETS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Fold key positions [start_n, start_n + BLOCK_N) into dQ of a query block."""
    cols = start_n + offs_nb
    if LARGE_OFFSETS:
        rows_kv = cols.to(tl.int64)[:, None]
    else:
        rows_kv = cols[:, None]
    k = _load_tile(K_head + rows_kv * stride_kn + offs_dk[None, :] * stride_kk, cols, S, offs_dk, E, CHECK_N, CHECK_E)
    # CHECK_N: keys past S would add to every row of dQ; scores_tile sets them to -inf.
    qk = scores_tile(q, k, M_rows, offs_m, local_m, cols, rows_kv, stride_mm, stride_mn, L, S,
                     qk_scale, qk_scale_lo, causal_offset, MASK_KIND, CHECK_M, CHECK_N, APPLY_CAUSAL, INPUT_PRECISION)
    p = tl.math.exp2(qk - lse2[:, None])
    v = _load_tile(V_head + rows_kv * stride_vn + offs_dv[None, :] * stride_vk, cols, S, offs_dv, EV, CHECK_N, CHECK_EV)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def attention_backward_dq_kernel(
    DQ, Q, K, V, DO, Lse, Delta, Mask, BlockCount, BlockIndex,
    stride_qb, stride_qh, stride_qm, stride_qk,
    stride_kb, stride_kh, stride_kn, stride_kk,
    stride_vb, stride_vh, stride_vn, stride_vk,
    stride_dob, stride_doh, stride_dom, stride_dok,
    stride_dqb, stride_dqh, stride_dqm, stride_dqk,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im,
    H, GROUP, L, S, E, EV,
    qk_scale: tl.float32, qk_scale_lo: tl.float32, scale: tl.float32, scale_lo: tl.float32, causal_offset,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
    CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, CHECK_E: tl.constexpr, CHECK_EV: tl.constexpr,
    LARGE_OFFSETS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """DQ (B, H, L, E) of one block of BLOCK_M query rows of one query head.

    grid: (cdiv(L, BLOCK_M), H, B). Key blocks are visited as in the forward kernel: ranges
    without a mask (blocks wholly left of the diagonal, then the ones it or the end of S cuts),
    host-built lists (BlockCount, BlockIndex per (b, h, query block)) with one.
    """
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and HEAD_DIM >= 16 and HEAD_DIM_V >= 16)
    start_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    kvh = h // GROUP
    m0 = start_m * BLOCK_M
    m0_64 = m0.to(tl.int64)
    local_m = tl.arange(0, BLOCK_M)
    offs_m = m0 + local_m
    offs_nb = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)

    q_ptrs = Q + b * stride_qb + h * stride_qh + m0_64 * stride_qm
    q = _load_tile(q_ptrs + local_m[:, None] * stride_qm + offs_dk[None, :] * stride_qk,
                   offs_m, L, offs_dk, E, CHECK_M, CHECK_E)
    do_ptrs = DO + b * stride_dob + h * stride_doh + m0_64 * stride_dom
    do = _load_tile(do_ptrs + local_m[:, None] * stride_dom + offs_dv[None, :] * stride_dok,
                    offs_m, L, offs_dv, EV, CHECK_M, CHECK_EV)
    lse2 = _lse_log2(Lse + (b * H + h) * L, offs_m, L, CHECK_M)
    delta = _load_rows(Delta + (b * H + h) * L + offs_m, offs_m, L, 0.0, CHECK_M)
    K_head = K + b * stride_kb + kvh * stride_kh
    V_head = V + b * stride_vb + kvh * stride_vh
    M_rows = Mask + b * stride_mb + h * stride_mh + m0_64 * stride_mm
    acc_ty: tl.constexpr = tl.float64 if Q.dtype.element_ty == tl.float64 else tl.float32
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=acc_ty)

    if MASK_KIND == 0:
        if IS_CAUSAL:
            last_row = tl.minimum(m0 + BLOCK_M, L) - 1
            hi = tl.minimum(S, last_row + causal_offset + 1)
            full_end = tl.maximum(tl.minimum(S, m0 + causal_offset + 1), 0)
        else:
            hi = S
            full_end = S
        full_end = full_end - full_end % BLOCK_N
        for start_n in range(0, full_end, BLOCK_N):
            dq = _dq_key_block(
                dq, q, do, lse2, delta, K_head, V_head, M_rows,
                start_n, offs_m, local_m, offs_nb, offs_dk, offs_dv,
                stride_kn, stride_kk, stride_vn, stride_vk, stride_mm, stride_mn,
                L, S, E, EV, qk_scale, qk_scale_lo, causal_offset,
                0, CHECK_M, False, False, CHECK_E, CHECK_EV, LARGE_OFFSETS, INPUT_PRECISION)
        if IS_CAUSAL or CHECK_N:
            for start_n in range(full_end, hi, BLOCK_N):
                dq = _dq_key_block(
                    dq, q, do, lse2, delta, K_head, V_head, M_rows,
                    start_n, offs_m, local_m, offs_nb, offs_dk, offs_dv,
                    stride_kn, stride_kk, stride_vn, stride_vk, stride_mm, stride_mn,
                    L, S, E, EV, qk_scale, qk_scale_lo, causal_offset,
                    0, CHECK_M, CHECK_N, IS_CAUSAL, CHECK_E, CHECK_EV, LARGE_OFFSETS, INPUT_PRECISION)
    else:
        count_ptr = BlockCount + b * stride_cb + h * stride_ch + start_m * stride_cm
        index_ptr = BlockIndex + b * stride_ib + h * stride_ih + start_m * stride_im
        n_full = tl.load(count_ptr)
        n_cut = tl.load(count_ptr + 1)
        for i in range(0, n_full):
            start_n = tl.load(index_ptr + i) * BLOCK_N
            dq = _dq_key_block(
                dq, q, do, lse2, delta, K_head, V_head, M_rows,
                start_n, offs_m, local_m, offs_nb, offs_dk, offs_dv,
                stride_kn, stride_kk, stride_vn, stride_vk, stride_mm, stride_mn,
                L, S, E, EV, qk_scale, qk_scale_lo, causal_offset,
                0, CHECK_M, False, False, CHECK_E, CHECK_EV, LARGE_OFFSETS, INPUT_PRECISION)
        for i in range(n_full, n_full + n_cut):
            start_n = tl.load(index_ptr + i) * BLOCK_N
            dq = _dq_key_block(
                dq, q, do, lse2, delta, K_head, V_head, M_rows,
                start_n, offs_m, local_m, offs_nb, offs_dk, offs_dv,
                stride_kn, stride_kk, stride_vn, stride_vk, stride_mm, stride_mn,
                L, S, E, EV, qk_scale, qk_scale_lo, causal_offset,
                MASK_KIND, CHECK_M, CHECK_N, IS_CAUSAL, CHECK_E, CHECK_EV, LARGE_OFFSETS, INPUT_PRECISION)

    dq = _scaled(dq, scale, scale_lo)
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + m0_64 * stride_dqm
    dq_ptrs = dq_ptrs + local_m[:, None] * stride_dqm + offs_dk[None, :] * stride_dqk
    _store_tile(dq_ptrs, dq.to(DQ.dtype.element_ty), offs_m, L, offs_dk, E, CHECK_M, CHECK_E)

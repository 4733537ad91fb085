"""Fused attention forward: tiled online softmax (FlashAttention-2 style), Triton code only.

    out[i] = sum_j softmax_j(scale * q_i . k_j + mask_ij) v_j,   lse[i] = log sum_j exp(...)

One program owns BLOCK_M query rows of one (batch, query head); K/V blocks of BLOCK_N positions
stream past while a running max (m_i) and sum (l_i) rescale the accumulator (float32;
float64 for float64 inputs). Scores are kept in log2 units (log2(e) folded into the scale) so each
exponential is one exp2.

Edge handling is specialised with constexpr flags so that full tiles run without any masking:
CHECK_M / CHECK_N (L or S not a multiple of the block), CHECK_E / CHECK_EV (head dims padded to a
power of two), IS_CAUSAL (diagonal at j <= i + causal_offset), MASK_KIND (0 none, 1 bool, 2 float).
"""

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a 2-D tile; rows >= n_rows and cols >= n_cols read as 0 when checked."""
    if CHECK_ROWS:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
        else:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _scaled(x, hi, lo):
    """x * (hi + lo). Kernel float arguments arrive as float32, so a float64 scale comes split in two
    float32 halves (hi = fp32(scale), lo = fp32(scale - hi), ~48 bits together); narrower x uses hi."""
    if x.dtype == tl.float64:
        y = x * hi + x * lo
    else:
        y = x * hi
    return y


@triton.jit
def mask_scores(
    s, M_tile, rows, n_rows, cols, n_cols, key_idx, query_idx, causal_offset,
    MASK_KIND: tl.constexpr, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr, APPLY_CAUSAL: tl.constexpr,
):
    """A score tile s (log2 units) with its mask applied: the mask tile at pointers M_tile added
    (float, converted to log2 units) or -inf where False (bool); -inf where key_idx > query_idx +
    causal_offset (both broadcast to the tile, so keys may lie along either axis: the key-major dK/dV
    tiles put them along rows). rows/cols bound the mask load. Keys past S are left alone: the dK/dV
    kernel never stores their rows, the others hide them (scores_tile)."""
    if MASK_KIND != 0:
        mask = _load_tile(M_tile, rows, n_rows, cols, n_cols, CHECK_ROWS, CHECK_COLS)
        if MASK_KIND == 1:
            s = tl.where(mask != 0, s, float("-inf"))
        else:
            s = s + mask.to(s.dtype) * LOG2E
    if APPLY_CAUSAL:
        s = tl.where(key_idx <= query_idx + causal_offset, s, float("-inf"))
    return s


@triton.jit
def scores_tile(
    q, k, M_rows, offs_m, local_m, cols, rows_kv, stride_mm, stride_mn, L, S,
    qk_scale: tl.float32, qk_scale_lo: tl.float32, causal_offset,
    MASK_KIND: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, APPLY_CAUSAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Scores (BLOCK_M, BLOCK_N) in log2 units of query rows offs_m against key positions cols:
    qk_scale * q k^T plus the mask tile (M_rows: the mask at row offs_m[0]; -inf where a bool mask is
    False), -inf where causality or the end of S (CHECK_N) hides the key."""
    qk = _scaled(tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION), qk_scale, qk_scale_lo)
    m_tile = M_rows + local_m[:, None] * stride_mm + tl.trans(rows_kv) * stride_mn
    qk = mask_scores(qk, m_tile, offs_m, L, cols, S, cols[None, :], offs_m[:, None], causal_offset,
                     MASK_KIND, CHECK_M, CHECK_N, APPLY_CAUSAL)
    if CHECK_N:
        qk = tl.where(cols[None, :] < S, qk, float("-inf"))
    return qk


@triton.jit
def _attend_kv_block(
    acc, l_i, m_i, q, K_head, V_head, M_rows,
    start_n, offs_m, local_m, offs_n, offs_dk, offs_dv,
    stride_kn, stride_kk, stride_vn, stride_vk, stride_mm, stride_mn,
    L, S, E, EV, qk_scale, qk_scale_lo, causal_offset,
    MASK_KIND: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, APPLY_CAUSAL: tl.constexpr,
    CHECK_E: tl.constexpr, CHECK_EV: tl.constexpr, LARGE_OFFSETS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One step of the online softmax: fold key/value positions [start_n, start_n + BLOCK_N) in."""
    cols = start_n + offs_n
    # 32-bit offsets unless the host says start_n * stride can pass 2**31: 64-bit offset tensors
    # cost registers that the tiles need (measured: spills on sm_80 and sm_90).
    if LARGE_OFFSETS:
        rows_kv = cols.to(tl.int64)[:, None]
    else:
        rows_kv = cols[:, None]
    k = _load_tile(K_head + rows_kv * stride_kn + offs_dk[None, :] * stride_kk, cols, S, offs_dk, E, CHECK_N, CHECK_E)
    qk = scores_tile(q, k, M_rows, offs_m, local_m, cols, rows_kv, stride_mm, stride_mn, L, S,
                     qk_scale, qk_scale_lo, causal_offset, MASK_KIND, CHECK_M, CHECK_N, APPLY_CAUSAL, INPUT_PRECISION)
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # A row that has seen no key yet has m = -inf; subtracting it would give (-inf) - (-inf) = NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_tile(V_head + rows_kv * stride_vn + offs_dv[None, :] * stride_vk, cols, S, offs_dv, EV, CHECK_N, CHECK_EV)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def attention_forward_kernel(
    Out, Lse, Q, K, V, Mask, BlockCount, BlockIndex,
    stride_qb, stride_qh, stride_qm, stride_qk,
    stride_kb, stride_kh, stride_kn, stride_kk,
    stride_vb, stride_vh, stride_vn, stride_vk,
    stride_ob, stride_oh, stride_om, stride_ok,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im,
    H, GROUP, L, S, E, EV,
    qk_scale: tl.float32, qk_scale_lo: tl.float32, causal_offset,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
    CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, CHECK_E: tl.constexpr, CHECK_EV: tl.constexpr,
    LARGE_OFFSETS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Out (B, H, L, EV) and Lse (B, H, L) of softmax(qk_scale * Q K^T [+ mask]) V in log2 units.

    grid: (cdiv(L, BLOCK_M), H, B). Query head h reads KV head h // GROUP.
    Lse and the accumulators are float32, float64 for float64 inputs. qk_scale = scale * log2(e)
    (+ qk_scale_lo, its float32 remainder, used by float64 inputs only). Causal: key j is visible
    to query i when j <= i + causal_offset.
    Without a mask, key blocks are visited as ranges: full blocks first, then the blocks that the
    diagonal or the end of S cut. With a mask (MASK_KIND 1 bool, 2 float; broadcast dims have
    stride 0), the host lists per (b, h, query block) the key blocks to visit: BlockCount[..., 0]
    blocks that need no masking, then BlockCount[..., 1] that do, their indices in BlockIndex;
    blocks the mask and causality remove entirely are never loaded.
    A row with no visible key gets out = 0 and lse = -inf.
    """
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and HEAD_DIM >= 16 and HEAD_DIM_V >= 16)
    start_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    kvh = h // GROUP
    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    local_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    m0_64 = m0.to(tl.int64)

    q_ptrs = Q + b * stride_qb + h * stride_qh + m0_64 * stride_qm
    q = _load_tile(q_ptrs + local_m[:, None] * stride_qm + offs_dk[None, :] * stride_qk,
                   offs_m, L, offs_dk, E, CHECK_M, CHECK_E)
    K_head = K + b * stride_kb + kvh * stride_kh
    V_head = V + b * stride_vb + kvh * stride_vh
    M_rows = Mask + b * stride_mb + h * stride_mh + m0_64 * stride_mm

    acc_ty: tl.constexpr = tl.float64 if Q.dtype.element_ty == tl.float64 else tl.float32
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=acc_ty)
    l_i = tl.zeros([BLOCK_M], dtype=acc_ty)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=acc_ty)

    if MASK_KIND == 0:
        if IS_CAUSAL:
            last_row = tl.minimum(m0 + BLOCK_M, L) - 1
            hi = tl.minimum(S, last_row + causal_offset + 1)
            # Blocks wholly left of the block's first-row diagonal need no causal check.
            full_end = tl.maximum(tl.minimum(S, m0 + causal_offset + 1), 0)
        else:
            hi = S
            full_end = S
        # Written as x - x % BLOCK_N: `x // BLOCK_N * BLOCK_N` made ptxas spill on sm_80.
        full_end = full_end - full_end % BLOCK_N
        for start_n in range(0, full_end, BLOCK_N):
            acc, l_i, m_i = _attend_kv_block(
                acc, l_i, m_i, q, K_head, V_head, M_rows, start_n, offs_m, local_m, offs_n, offs_dk, offs_dv,
                stride_kn, stride_kk, stride_vn, stride_vk, stride_mm, stride_mn,
                L, S, E, EV, qk_scale, qk_scale_lo, causal_offset,
                0, CHECK_M, False, False, CHECK_E, CHECK_EV, LARGE_OFFSETS, INPUT_PRECISION)
        if IS_CAUSAL or CHECK_N:  # the blocks the diagonal or the end of S cut
            for start_n in range(full_end, hi, BLOCK_N):
                acc, l_i, m_i = _attend_kv_block(
                    acc, l_i, m_i, q, K_head, V_head, M_rows, start_n, offs_m, local_m, offs_n, offs_dk, offs_dv,
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
            acc, l_i, m_i = _attend_kv_block(
                acc, l_i, m_i, q, K_head, V_head, M_rows, start_n, offs_m, local_m, offs_n, offs_dk, offs_dv,
                stride_kn, stride_kk, stride_vn, stride_vk, stride_mm, stride_mn,
                L, S, E, EV, qk_scale, qk_scale_lo, causal_offset,
                0, CHECK_M, False, False, CHECK_E, CHECK_EV, LARGE_OFFSETS, INPUT_PRECISION)
        for i in range(n_full, n_full + n_cut):
            start_n = tl.load(index_ptr + i) * BLOCK_N
            acc, l_i, m_i = _attend_kv_block(
                acc, l_i, m_i, q, K_head, V_head, M_rows, start_n, offs_m, local_m, offs_n, offs_dk, offs_dv,
                stride_kn, stride_kk, stride_vn, stride_vk, stride_mm, stride_mn,
                L, S, E, EV, qk_scale, qk_scale_lo, causal_offset,
                MASK_KIND, CHECK_M, CHECK_N, IS_CAUSAL, CHECK_E, CHECK_EV, LARGE_OFFSETS, INPUT_PRECISION)

    dead = l_i == 0.0
    l_safe = tl.where(dead, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(dead, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    o_ptrs = Out + b * stride_ob + h * stride_oh + m0_64 * stride_om
    o_ptrs = o_ptrs + local_m[:, None] * stride_om + offs_dv[None, :] * stride_ok
    out = out.to(Out.dtype.element_ty)
    if CHECK_M:
        if CHECK_EV:
            tl.store(o_ptrs, out, mask=(offs_m[:, None] < L) & (offs_dv[None, :] < EV))
        else:
            tl.store(o_ptrs, out, mask=offs_m[:, None] < L)
    else:
        if CHECK_EV:
            tl.store(o_ptrs, out, mask=offs_dv[None, :] < EV)
        else:
            tl.store(o_ptrs, out)
    lse_ptrs = Lse + (b * H + h) * L + offs_m
    if CHECK_M:
        tl.store(lse_ptrs, lse, mask=offs_m < L)
    else:
        tl.store(lse_ptrs, lse)

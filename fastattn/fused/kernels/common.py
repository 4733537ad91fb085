"""Triton code the forward and backward kernels share: tile loads and stores, the score step and the
loop bounds over key blocks.

Scores are kept in log2 units: log2(e) is folded into the scale (qk_scale = scale * log2(e), applied
by _scaled) and into additive masks (* LOG2E on load), so each exponential is one exp2.

_score_step is the one place where scaled products become the scores the softmax sees (mask tile,
causality). Every kernel computes its scores through it, in either orientation (queries along rows,
or keys along rows as in the key-major dK/dV tiles), so a new score modifier (a sliding window, a
soft cap, ALiBi) is one constexpr-guarded block there, which the forward, dK/dV and dQ kernels all
pick up. Full-block calls may pass such a flag off only where the block bounds guarantee the
modifier changes nothing there, as they do for the causal check.

Constexpr flags are named for what they guarantee; each one that is False removes code:
  CHECK_M / CHECK_N    query rows past L / key positions past S may occur in a tile: loads are masked
                       (and the forward and dQ hide keys past S). False: unmasked loads.
  CHECK_E / CHECK_EV   the head dims are padded to a power of two: the loads mask the padding.
  MASK_KIND            0 no mask tile, 1 bool mask (-inf where False), 2 float mask (added). 0: no load.
  IS_CAUSAL            (kernels) key j is visible to query i only when j <= i + causal_offset.
  APPLY_CAUSAL         (steps) the tile may hold keys hidden by causality: they are set to -inf.
                       False: the caller guarantees every key of the tile is visible to all its rows.
  FROM_LIST            the blocks to visit come from a host-built list (masked kernels), not ranges.
  KEY_MAJOR            (dK/dV) score tiles are k q^T, keys along rows, instead of q k^T.
  LARGE_OFFSETS        a block offset times a row stride may pass 2**31: offsets are 64-bit.
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
def _store_tile(ptrs, x, rows, n_rows, cols, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Store a 2-D tile; rows >= n_rows and cols >= n_cols are left alone when checked."""
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
def _load_rows(ptrs, rows, n_rows, other, CHECK_ROWS: tl.constexpr):
    """Load a 1-D block; rows >= n_rows read as `other` when checked."""
    if CHECK_ROWS:
        x = tl.load(ptrs, mask=rows < n_rows, other=other)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _row_offsets(rows, LARGE_OFFSETS: tl.constexpr):
    """Positions to multiply by a row stride. 32-bit unless the host says the product can pass 2**31:
    64-bit offset tensors cost registers that the tiles need (measured: spills on sm_80 and sm_90)."""
    if LARGE_OFFSETS:
        r = rows.to(tl.int64)
    else:
        r = rows
    return r


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
def _lse_log2(Lse_row, rows, L, CHECK_M: tl.constexpr):
    """lse in log2 units, with -inf (a row with no key) and rows past L read as +inf: P = 0 there."""
    lse = _load_rows(Lse_row + rows, rows, L, float("inf"), CHECK_M)
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _score_step(
    s, M_tile, q_idx, k_idx, L, S, causal_offset,
    MASK_KIND: tl.constexpr, APPLY_CAUSAL: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr,
    KEY_MAJOR: tl.constexpr,
):
    """The scores the softmax sees, from a tile s of scaled products (log2 units, _scaled): plus the
    mask tile at pointers M_tile (float: converted to log2 units; bool: -inf where False), -inf where
    causality hides the key (key j > query i + causal_offset).

    q_idx, k_idx: the tile's query and key positions (1-D); KEY_MAJOR: keys run along the rows (s
    comes from k q^T), else queries do. CHECK_M / CHECK_N bound the mask load by L / S. Keys past S
    keep their score: the forward and dQ hide them (_key_block_scores), the dK/dV kernel never
    stores their rows. The callers scale (_scaled) before they compute M_tile: that keeps the
    compiled kernels instruction for instruction as they were measured, and register allocation
    proved sensitive to such order (see _key_block_bounds).
    """
    if KEY_MAJOR:
        k_pos = k_idx[:, None]
        q_pos = q_idx[None, :]
    else:
        k_pos = k_idx[None, :]
        q_pos = q_idx[:, None]
    if MASK_KIND != 0:
        if KEY_MAJOR:
            mask = _load_tile(M_tile, k_idx, S, q_idx, L, CHECK_N, CHECK_M)
        else:
            mask = _load_tile(M_tile, q_idx, L, k_idx, S, CHECK_M, CHECK_N)
        if MASK_KIND == 1:
            s = tl.where(mask != 0, s, float("-inf"))
        else:
            s = s + mask.to(s.dtype) * LOG2E
    if APPLY_CAUSAL:
        s = tl.where(k_pos <= q_pos + causal_offset, s, float("-inf"))
    return s


@triton.jit
def _key_block_scores(
    q, k, M_rows, stride_mm, stride_mn, offs_m, cols, rows_kv, L, S, qk_scale, qk_scale_lo, causal_offset,
    MASK_KIND: tl.constexpr, APPLY_CAUSAL: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Scores (BLOCK_M, BLOCK_N) of query rows offs_m against the key tile k at positions cols
    (rows_kv: cols as row offsets, (BLOCK_N, 1)), query-major, for the forward and dQ kernels: the
    score step with M_rows the mask at row offs_m[0], then -inf where a key lies past S (CHECK_N),
    since there every key of the tile adds to every row."""
    local_m = tl.arange(0, q.shape[0])
    qk = _scaled(tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION), qk_scale, qk_scale_lo)
    qk = _score_step(qk, M_rows + local_m[:, None] * stride_mm + tl.trans(rows_kv) * stride_mn,
                     offs_m, cols, L, S, causal_offset,
                     MASK_KIND=MASK_KIND, APPLY_CAUSAL=APPLY_CAUSAL, CHECK_M=CHECK_M, CHECK_N=CHECK_N,
                     KEY_MAJOR=False)
    if CHECK_N:
        qk = tl.where(cols[None, :] < S, qk, float("-inf"))
    return qk


@triton.jit
def _key_block_bounds(
    Counts, m0, L, S, causal_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, FROM_LIST: tl.constexpr,
):
    """Loop bounds over the key blocks that query rows [m0, m0 + BLOCK_M) visit, for the forward and
    dQ kernels: (full_end, cut_span), [0, full_end) the blocks that need no masking and
    [full_end, full_end + cut_span) the ones that do.

    Ranges (FROM_LIST False, no mask): key positions, a block every BLOCK_N; full blocks lie wholly
    left of the diagonal and inside S. Lists (FROM_LIST): positions in the host's block list, a block
    every 1; Counts[0] blocks need no masking, Counts[1] more do (see _block_start).
    A span rather than an end: the caller's full_end + cut_span then sits at the cut loop, where the
    list bound was always computed (ranges fold it back to their end); computed before the full loop
    instead, it made the sm_90 float32 dQ kernel spill (E=128, float mask)."""
    if FROM_LIST:
        full_end = tl.load(Counts)
        cut_span = tl.load(Counts + 1)
    else:
        if IS_CAUSAL:
            last_row = tl.minimum(m0 + BLOCK_M, L) - 1
            end = tl.minimum(S, last_row + causal_offset + 1)
            # Blocks wholly left of the block's first-row diagonal need no causal check.
            full_end = tl.maximum(tl.minimum(S, m0 + causal_offset + 1), 0)
        else:
            end = S
            full_end = S
        # Written as x - x % BLOCK_N: `x // BLOCK_N * BLOCK_N` made ptxas spill on sm_80.
        full_end = full_end - full_end % BLOCK_N
        cut_span = end - full_end
    return full_end, cut_span


@triton.jit
def _block_start(j, Index, BLOCK: tl.constexpr, FROM_LIST: tl.constexpr):
    """First position of the block at loop position j: j itself for ranges (they step by BLOCK),
    BLOCK * Index[j] for a host-built list of block indices."""
    if FROM_LIST:
        start = tl.load(Index + j) * BLOCK
    else:
        start = j
    return start

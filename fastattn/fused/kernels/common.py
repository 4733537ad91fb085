"""Triton code the forward and backward kernels share: tile loads and stores, the score step and the
loop bounds over key blocks.

Scores are kept in log2 units: log2(e) is folded into the scale (qk_scale = scale * log2(e), applied
by _scaled) and into additive masks (* LOG2E on load), so each exponential is one exp2. Kernels
with a float mask (MASK_KIND 2) keep natural units instead (LOG2_UNITS False): a mask value near
-finfo.max (transformers' padding masks use finfo.min) times log2(e) would overflow to -inf and
turn a finite score into a hidden one; there each exponential takes the difference first and
multiplies it by log2(e) (_exp_diff), which cannot overflow where the scores themselves do not.

_score_step is the one place where scaled products become the scores the softmax sees (softcap,
ALiBi, mask tile, causality, sliding window, in that order). Every kernel computes its scores
through it, in either orientation (queries along rows,
or keys along rows as in the key-major dK/dV tiles), so a new score modifier (a sliding window, a
soft cap, ALiBi) is one constexpr-guarded block there, which the forward, dK/dV and dQ kernels all
pick up. Full-block calls may pass such a flag off only where the block bounds guarantee the
modifier changes nothing there, as they do for the causal and window checks; value modifiers
(softcap, ALiBi) stay on in every block.

The step's run-time scalars travel as one tuple, `mods` = (causal_offset, window_lo,
softcap_scale, softcap_scale_lo, alibi_slope, and dropout's seed, counter words, threshold and
scale), built once per (batch, head) by :func:`_mods`, so the per-block helpers pass one name
through instead of one argument per feature.

Dropout is not a score modifier: it acts on the probabilities, after the row sums (lse stays that
of the undropped scores). :func:`_dropout_keep` is its one definition in Triton, called by the
forward (on P before P V), the dK/dV kernel (on P before P^T dO, and on dO V^T) and the dQ kernel
(on dO V^T), in both orientations.

Constexpr flags are named for what they guarantee; each one that is False removes code:
  CHECK_M / CHECK_N    query rows past L / key positions past S may occur in a tile: loads are masked
                       (and the forward and dQ hide keys past S). False: unmasked loads.
  CHECK_E / CHECK_EV   the head dims are padded to a power of two: the loads mask the padding.
  MASK_KIND            0 no mask tile, 1 bool mask (-inf where False), 2 float mask (added). 0: no load.
  IS_CAUSAL            (kernels) key j is visible to query i only when j <= i + causal_offset.
  APPLY_CAUSAL         (steps) the tile may hold keys hidden by causality: they are set to -inf.
                       False: the caller guarantees every key of the tile is visible to all its rows.
  IS_LOCAL             (kernels) a sliding window: key j is visible only when j >= i + window_lo;
                       the block loops skip the blocks outside the band.
  APPLY_WINDOW         (steps) the tile may hold keys below the window: they are set to -inf.
  HAS_SOFTCAP          scores become c * tanh(s / c): the launcher passes qk_scale = scale / c and
                       softcap_scale = c * log2(e) (split), and the step returns 1 - tanh^2 too.
                       Costs an exp2, a division and 8 FMAs per score (_tanh). False: no code.
  HAS_ALIBI            adds -slope * |i + S - L - j| (slope loaded once per head). False: no code.
  HAS_DROPOUT          weights are dropped by _dropout_keep's mask and the rest scaled by 1 / (1 - p):
                       one Philox4x32-10 (10 rounds of 2 wide multiplies and 4 xors) per score,
                       and in the backward the same again. False: no code.
  FROM_LIST            the blocks to visit come from a host-built list (masked kernels), not ranges.
  HAS_GAP              (block starts) the cut blocks of a window skip its full ones (ranges only).
  KEY_MAJOR            (dK/dV) score tiles are k q^T, keys along rows, instead of q k^T.
  VARLEN               a packed call: program axis 2 is a sequence, whose rows, lengths and band
                       come from the cu_seq arrays (_sequence); programs past its end exit at once.
  HAS_CU_K / HAS_SEQUSED  (VARLEN) keys start at cu_seq_k[n] / only seqused_k[n] keys take part.
  PAGED                key position j lives at row j % page_size of page block_table[n, j // page_size]
                       of a page pool; BLOCK_N divides page_size, so a key block is one page's rows.
  SPLIT_KV             (forward) the program reduces one of num_splits slices of the keys to a partial
                       (out, lse), merged by decode.split_kv_combine_kernel.
  LARGE_OFFSETS        a block offset times a row stride may pass 2**31: offsets are 64-bit.
  LOG2_UNITS           (MASK_KIND != 2) scores, lse and the row maxima are in log2 units; False:
                       natural units, one more multiply per exponential (float masks only).
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
def _row_shift(Lse_row, Stats_row, stride_sp, rows, L, CHECK_M: tl.constexpr, LOG2_UNITS: tl.constexpr):
    """(m, logl): what the backward subtracts from a row's scores to get P (_probs). In log2 units
    m = lse * log2(e) and logl is unused; in natural units (float masks) the forward's row max m and
    log of its sum, kept apart in Stats (plane stride stride_sp): near -finfo.max, lse = m + logl
    rounds logl away (ties of finfo.min scores would each get P = 1). Rows with no key (lse or m =
    -inf) and rows past L read m = +inf: P = 0 there."""
    if LOG2_UNITS:
        lse = _load_rows(Lse_row + rows, rows, L, float("inf"), CHECK_M) * LOG2E
        m = tl.where(lse == float("-inf"), float("inf"), lse)
        logl = m
    else:
        m = _load_rows(Stats_row + rows, rows, L, float("inf"), CHECK_M)
        m = tl.where(m == float("-inf"), float("inf"), m)
        logl = _load_rows(Stats_row + stride_sp + rows, rows, L, 0.0, CHECK_M)
    return m, logl


@triton.jit
def _probs(s, m, logl, LOG2_UNITS: tl.constexpr):
    """P = exp(s - lse) from the scores and _row_shift's (m, logl), broadcast against s."""
    if LOG2_UNITS:
        p = tl.math.exp2(s - m)
    else:
        p = tl.math.exp2(((s - m) - logl) * LOG2E)
    return p


@triton.jit
def _exp_diff(x, y, LOG2_UNITS: tl.constexpr):
    """exp of x - y in the kernel's units: 2^(x - y) in log2 units, e^(x - y) = 2^((x - y) log2 e)
    in natural ones (the difference first: it cannot overflow where x and y do not)."""
    if LOG2_UNITS:
        r = tl.math.exp2(x - y)
    else:
        r = tl.math.exp2((x - y) * LOG2E)
    return r


# Odd Taylor coefficients of tanh (x^3, x^5, ...), for |x| below _tanh's switch point.
T3: tl.constexpr = tl.constexpr(-0.3333333333333333)
T5: tl.constexpr = tl.constexpr(0.13333333333333333)
T7: tl.constexpr = tl.constexpr(-0.05396825396825397)
T9: tl.constexpr = tl.constexpr(0.021869488536155203)
T11: tl.constexpr = tl.constexpr(-0.008863235529902197)
T13: tl.constexpr = tl.constexpr(0.003592128036572481)
T15: tl.constexpr = tl.constexpr(-0.0014558343870513183)
T17: tl.constexpr = tl.constexpr(0.000590027440945586)
T19: tl.constexpr = tl.constexpr(-0.00023912911424355248)
T21: tl.constexpr = tl.constexpr(9.691537956929451e-05)


@triton.jit
def _tanh(x):
    """tanh to a few ulps in float32 and float64, with exp2 only (Triton has no tanh that also runs
    in its interpreter): 1 - 2 / (exp(2|x|) + 1) where tanh >= ~0.25 (no cancellation there), the
    Taylor series below (float32: |x| < 0.5, to x^15; float64: |x| < 0.25, to x^21). Measured
    against mpmath: 1.5 ulp (float32), 2.8 ulp (float64). Overflow gives +-1, NaN stays NaN."""
    a = tl.abs(x)
    e = tl.math.exp2(a * (2 * LOG2E))
    big = 1.0 - 2.0 / (e + 1.0)
    big = tl.where(x < 0, -big, big)
    x2 = x * x
    if x.dtype == tl.float64:
        poly = ((((((((T21 * x2 + T19) * x2 + T17) * x2 + T15) * x2 + T13) * x2 + T11) * x2 + T9) * x2 + T7) * x2
                + T5) * x2 + T3
        t = tl.where(a < 0.25, x + x * x2 * poly, big)
    else:
        poly = (((((T15 * x2 + T13) * x2 + T11) * x2 + T9) * x2 + T7) * x2 + T5) * x2 + T3
        t = tl.where(a < 0.5, x + x * x2 * poly, big)
    return t


@triton.jit
def _mods(Alibi, Rng, b, h, H, batch0, stride_ab, stride_ah, causal_offset, window_lo, softcap_scale,
          softcap_scale_lo, dropout_threshold, dropout_scale, dropout_scale_lo,
          HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """The per-(batch b, query head h) scalars of the score step and of dropout: (causal_offset,
    window_lo, softcap_scale, softcap_scale_lo, alibi_slope, seed, head_word, offset_word,
    dropout_threshold, dropout_scale, dropout_scale_lo). The slope is read from Alibi (float32 (B or 1, H), broadcast
    dims with stride 0) only with HAS_ALIBI; with HAS_DROPOUT the call's draw from Rng (int64
    (seed, offset)) and the Philox counter word of the head, (batch0 + b) * H + h (batch0: the
    launch's first batch), as fastattn.dropout defines them. dropout_threshold is the keep
    threshold minus 2**31 (_dropout_keep compares signed), dropout_scale + dropout_scale_lo is
    1 / (1 - p), split as the float64 scale is (_scaled, _dropout_scaled)."""
    if HAS_ALIBI:
        slope = tl.load(Alibi + b * stride_ab + h * stride_ah)
    else:
        slope = 0.0
    if HAS_DROPOUT:
        seed = tl.load(Rng)
        offset_word = tl.load(Rng + 1).to(tl.int32)  # the low 32 bits
        head_word = ((b + batch0) * H + h).to(tl.int32)
    else:
        seed = 0
        offset_word = 0
        head_word = 0
    return (causal_offset, window_lo, softcap_scale, softcap_scale_lo, slope,
            seed, head_word, offset_word, dropout_threshold, dropout_scale, dropout_scale_lo)


@triton.jit
def _dropout_scaled(x, mods):
    """x * 1 / (1 - p), from mods' split dropout scale (full precision for float64 x)."""
    return _scaled(x, mods[9], mods[10])


@triton.jit
def _tile_positions(q_idx, k_idx, KEY_MAJOR: tl.constexpr):
    """(q_pos, k_pos): a tile's 1-D query and key positions as its column and row broadcasts, keys
    along rows with KEY_MAJOR (the dK/dV kernel's k q^T tiles), else queries."""
    if KEY_MAJOR:
        k_pos = k_idx[:, None]
        q_pos = q_idx[None, :]
    else:
        k_pos = k_idx[None, :]
        q_pos = q_idx[:, None]
    return q_pos, k_pos


@triton.jit
def _dropout_keep(q_idx, k_idx, mods, KEY_MAJOR: tl.constexpr):
    """Which weights of the tile of query positions q_idx and key positions k_idx (1-D; KEY_MAJOR:
    keys along rows) survive dropout: fastattn.dropout's function, bit for bit. Philox4x32-10 of
    the counter (j >> 2, i, head_word, offset_word) under the seed, word j & 3, kept when at or
    above the threshold (compared as signed: the sign bit flipped on both sides). Each element
    runs the Philox call its group of four keys shares and picks its word: no data moves between
    lanes, and the early rounds run on the broadcast row and column vectors."""
    q_pos, k_pos = _tile_positions(q_idx, k_idx, KEY_MAJOR=KEY_MAJOR)
    _, _, _, _, _, seed, head_word, offset_word, dropout_threshold, _, _ = mods
    r0, r1, r2, r3 = tl.philox(seed, k_pos >> 2, q_pos, head_word, offset_word)
    word = k_pos & 3
    r = tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3)))
    return (r.to(tl.int32, bitcast=True) ^ -2147483648) >= dropout_threshold


@triton.jit
def _score_step(
    s, M_tile, q_idx, k_idx, L, S, mods,
    MASK_KIND: tl.constexpr, APPLY_CAUSAL: tl.constexpr, APPLY_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr,
    KEY_MAJOR: tl.constexpr, LOG2_UNITS: tl.constexpr,
):
    """(scores, cap_grad): the scores the softmax sees, from a tile s of scaled products (log2
    units, _scaled), in this order: capped (HAS_SOFTCAP: s = softcap_scale * tanh(s), the launcher
    having divided qk_scale by the cap), plus the ALiBi bias -slope * |i + S - L - j| (in log2
    units), plus the mask tile at pointers M_tile (float: converted to log2 units; bool: -inf where
    False), -inf where causality hides the key (key j > query i + causal_offset) or the window does
    (j < i + window_lo). mods: the tuple of _mods. cap_grad: 1 - tanh^2 of the tile with
    HAS_SOFTCAP (the backward's chain rule), else s itself (a placeholder the callers never read).

    q_idx, k_idx: the tile's query and key positions (1-D); KEY_MAJOR: keys run along the rows (s
    comes from k q^T), else queries do. CHECK_M / CHECK_N bound the mask load by L / S. Keys past S
    keep their score: the forward and dQ hide them (_key_block_scores), the dK/dV kernel never
    stores their rows. The callers scale (_scaled) before they compute M_tile: that keeps the
    compiled kernels instruction for instruction as they were measured, and register allocation
    proved sensitive to such order (see _key_block_bounds).
    """
    q_pos, k_pos = _tile_positions(q_idx, k_idx, KEY_MAJOR=KEY_MAJOR)
    causal_offset, window_lo, softcap_scale, softcap_scale_lo, slope, _, _, _, _, _, _ = mods
    if HAS_SOFTCAP:
        t = _tanh(s)
        cap_grad = 1.0 - t * t
        s = _scaled(t, softcap_scale, softcap_scale_lo)
    else:
        cap_grad = s
    if HAS_ALIBI:
        distance = tl.abs(q_pos + (S - L) - k_pos).to(s.dtype)
        if LOG2_UNITS:
            s = s - (slope.to(s.dtype) * LOG2E) * distance
        else:
            s = s - slope.to(s.dtype) * distance
    if MASK_KIND != 0:
        if KEY_MAJOR:
            mask = _load_tile(M_tile, k_idx, S, q_idx, L, CHECK_N, CHECK_M)
        else:
            mask = _load_tile(M_tile, q_idx, L, k_idx, S, CHECK_M, CHECK_N)
        if MASK_KIND == 1:
            s = tl.where(mask != 0, s, float("-inf"))
        else:  # a float mask: natural units (LOG2_UNITS is False)
            s = s + mask.to(s.dtype)
    if APPLY_WINDOW:
        # One select for the whole band, on the key's offset from the query's diagonal: two selects
        # made ptxas spill (sm_90 float32 E=256).
        offset = k_pos - q_pos
        if APPLY_CAUSAL:
            s = tl.where((offset <= causal_offset) & (offset >= window_lo), s, float("-inf"))
        else:
            s = tl.where(offset >= window_lo, s, float("-inf"))
    elif APPLY_CAUSAL:
        s = tl.where(k_pos <= q_pos + causal_offset, s, float("-inf"))
    return s, cap_grad


@triton.jit
def _key_block_scores(
    q, k, M_rows, stride_mm, stride_mn, offs_m, cols, rows_kv, L, S, qk_scale, qk_scale_lo, mods,
    MASK_KIND: tl.constexpr, APPLY_CAUSAL: tl.constexpr, APPLY_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, LOG2_UNITS: tl.constexpr,
):
    """(scores, cap_grad) (BLOCK_M, BLOCK_N) of query rows offs_m against the key tile k at positions
    cols (rows_kv: cols as row offsets, (BLOCK_N, 1)), query-major, for the forward and dQ kernels:
    the score step with M_rows the mask at row offs_m[0], then -inf where a key lies past S
    (CHECK_N), since there every key of the tile adds to every row."""
    local_m = tl.arange(0, q.shape[0])
    qk = _scaled(tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION), qk_scale, qk_scale_lo)
    qk, cap_grad = _score_step(qk, M_rows + local_m[:, None] * stride_mm + tl.trans(rows_kv) * stride_mn,
                               offs_m, cols, L, S, mods,
                               MASK_KIND=MASK_KIND, APPLY_CAUSAL=APPLY_CAUSAL, APPLY_WINDOW=APPLY_WINDOW,
                               HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, CHECK_M=CHECK_M, CHECK_N=CHECK_N,
                               KEY_MAJOR=False, LOG2_UNITS=LOG2_UNITS)
    if CHECK_N:
        qk = tl.where(cols[None, :] < S, qk, float("-inf"))
    return qk, cap_grad


@triton.jit
def _key_block_bounds(
    Counts, m0, L, S, causal_offset, window_lo,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, IS_LOCAL: tl.constexpr,
    FROM_LIST: tl.constexpr,
):
    """Loop bounds over the key blocks that query rows [m0, m0 + BLOCK_M) visit, for the forward and
    dQ kernels: (full_lo, full_end, cut_lo, cut_span, gap_at, gap), [full_lo, full_end) the blocks
    that need no masking and cut_span more positions from cut_lo that do, which skip `gap` positions
    once they reach gap_at (_block_start with HAS_GAP): a window's cut blocks lie on both sides of
    its full ones.

    Ranges (FROM_LIST False, no mask): key positions, a block every BLOCK_N; full blocks lie wholly
    inside the band (left of the causal diagonal, right of the window's lower one) and inside S;
    blocks outside the band are not visited. Lists (FROM_LIST): positions in the host's block list,
    a block every 1; Counts[0] blocks need no masking, Counts[1] more do (no gap).
    A span rather than an end: the caller's cut_lo + cut_span then sits at the cut loop, where the
    list bound was always computed (ranges fold it back to their end); computed before the full loop
    instead, it made the sm_90 float32 dQ kernel spill (E=128, float mask)."""
    full_lo = 0
    gap_at = 0
    gap = 0
    if FROM_LIST:
        full_end = tl.load(Counts)
        cut_lo = full_end
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
        if IS_LOCAL:
            # Keys from m0 + window_lo are seen by the first row; from last_row + window_lo by all.
            lo = tl.minimum(tl.maximum(m0 + window_lo, 0), S)
            lo = lo - lo % BLOCK_N
            full_lo = tl.minimum(tl.maximum(tl.minimum(m0 + BLOCK_M, L) - 1 + window_lo, 0), S)
            full_lo = tl.maximum(full_lo + (BLOCK_N - full_lo % BLOCK_N) % BLOCK_N, lo)
            full_end = tl.maximum(full_end, full_lo)
            end = tl.maximum(end, full_end)
            cut_lo = lo
            gap_at = full_lo
            gap = full_end - full_lo
            cut_span = (full_lo - lo) + (end - full_end)
        else:
            cut_lo = full_end
            cut_span = end - full_end
    return full_lo, full_end, cut_lo, cut_span, gap_at, gap


@triton.jit
def _block_start(j, Index, gap_at, gap, BLOCK: tl.constexpr, FROM_LIST: tl.constexpr, HAS_GAP: tl.constexpr):
    """First position of the block at loop position j: j itself for ranges (they step by BLOCK),
    past the gap (j + gap once j >= gap_at) for the cut blocks of a window (HAS_GAP), BLOCK *
    Index[j] for a host-built list of block indices."""
    if FROM_LIST:
        start = tl.load(Index + j) * BLOCK
    elif HAS_GAP:
        start = tl.where(j >= gap_at, j + gap, j)
    else:
        start = j
    return start


@triton.jit
def _sequence(CuSeqQ, CuSeqK, SeqUsedK, n, L, S, causal_offset, window_lo,
              VARLEN: tl.constexpr, HAS_CU_K: tl.constexpr, HAS_SEQUSED: tl.constexpr):
    """(b, q0, k0, L, S, causal_offset, window_lo) of program batch n: the batch index of the
    strides (0 for a packed call, one batch of packed rows), the first query and key rows, the
    lengths and the band. VARLEN: read from the int32 cu_seq_q / cu_seq_k (HAS_CU_K; else keys start
    at 0, in a page pool) and seqused_k (HAS_SEQUSED: the number of keys that take part), the band's
    diagonals given relative to the bottom-right corner and shifted by S - L here. Else the
    problem's own (q0 = k0 = 0)."""
    if VARLEN:
        q0 = tl.load(CuSeqQ + n)
        L = tl.load(CuSeqQ + n + 1) - q0
        if HAS_CU_K:
            k0 = tl.load(CuSeqK + n)
            S = tl.load(CuSeqK + n + 1) - k0
        else:
            k0 = q0 * 0
        if HAS_SEQUSED:
            S = tl.load(SeqUsedK + n)
        causal_offset = causal_offset + (S - L)
        window_lo = window_lo + (S - L)
        b = n * 0
    else:
        q0 = n * 0
        k0 = n * 0
        b = n
    return b, q0, k0, L, S, causal_offset, window_lo


@triton.jit
def _kv_rows(cols, start_n, offs_n, Pages, page_size, LARGE_OFFSETS: tl.constexpr, PAGED: tl.constexpr):
    """(BLOCK_N, 1) row offsets of the key block at positions cols = start_n + offs_n: the
    positions themselves, or with PAGED their rows in the page pool (Pages: the sequence's row of the
    block table; the block lies in one page)."""
    if PAGED:
        page = tl.load(Pages + start_n // page_size)
        rows = _row_offsets(page * page_size + start_n % page_size + offs_n, LARGE_OFFSETS)
    else:
        rows = _row_offsets(cols, LARGE_OFFSETS)
    return rows[:, None]


@triton.jit
def _split_bounds(full_lo, full_end, cut_lo, cut_span, gap_at, gap, split, num_splits, S,
                  BLOCK_N: tl.constexpr, HAS_GAP: tl.constexpr):
    """The loop bounds of _key_block_bounds (ranges) narrowed to split `split` of num_splits: keys
    [split * chunk, (split + 1) * chunk), chunk = cdiv(S, num_splits) rounded up to BLOCK_N, so block
    starts stay where they were. The cut blocks, [cut_lo, gap_at) and [gap_at + gap, ...) with a
    gap, are intersected piece by piece and returned in the same (cut_lo, cut_span, gap_at, gap)
    form, to be read with _block_start(HAS_GAP=True)."""
    per = (S + num_splits - 1) // num_splits
    chunk = (per + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    s_lo = split * chunk
    s_hi = tl.minimum(s_lo + chunk, S)
    f_lo = tl.maximum(full_lo, s_lo)
    f_end = tl.maximum(tl.minimum(full_end, s_hi), f_lo)
    if HAS_GAP:
        a_hi = gap_at
        b_lo = gap_at + gap
        b_hi = cut_lo + cut_span + gap
    else:
        a_hi = cut_lo + cut_span
        b_lo = a_hi
        b_hi = a_hi
    a_lo = tl.maximum(cut_lo, s_lo)
    a_hi = tl.maximum(tl.minimum(a_hi, s_hi), a_lo)
    b_lo = tl.maximum(b_lo, s_lo)
    b_hi = tl.maximum(tl.minimum(b_hi, s_hi), b_lo)
    return f_lo, f_end, a_lo, (a_hi - a_lo) + (b_hi - b_lo), a_hi, b_lo - a_hi

"""The PyTorch fallback: the same semantics as the kernel, with O(L) extra memory.

Where SDPA's own CPU kernel can express the call (E == Ev, not causal and masked at once, no
sliding window, softcap, ALiBi or dropout) it is used directly, through the aten op that also
returns the logsumexp; a causal diagonal other than top-left (bottom-right with L != S) takes two
of its calls at most, merged exactly (:func:`sdpa_parts`). Every other call takes
:func:`tiled_attention`, the FlashAttention algorithm written with PyTorch ops: query blocks of
`block_m` rows meet key/value blocks of `block_n` positions, with a running max and sum, so no
(L, S) matrix is ever allocated. On 2 CPU cores the tiled path runs at 1.2-2x the time of SDPA's
kernel on the same shapes (benchmarks/cpu_training.py).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .. import configs, dropout
from ..problem import Problem, lse_dtype
from .merge import merge_
from .scores import exp_diff_, grouped_alibi, grouped_mask, scaled_queries, score_mods_, visible_keys

MASK_BLOCK_BYTES = 1 << 24  # bool masks become additive ones for SDPA's op in pieces of this size


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mask_keep(mask: torch.Tensor) -> torch.Tensor:
    """Bool view of which mask entries let a key take part."""
    return mask if mask.dtype == torch.bool else ~torch.isneginf(mask)


def sdpa_cpu_reasons(p: Problem) -> list[str]:
    """Why SDPA's CPU kernel cannot compute `p` exactly as fastattn defines it (empty if it can)."""
    reasons = []
    if p.device.type != "cpu":
        reasons.append("not a CPU tensor")
    if not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        reasons.append("this torch has no CPU flash-attention op")
    if p.head_dim != p.head_dim_v:
        reasons.append("E != Ev")
    f = p.features
    if f.causal_offset is not None and p.mask is not None:
        reasons.append("causal and a mask together")
    if f.window_lo is not None:
        reasons.append("a sliding window (SDPA would need a materialised (L, S) mask)")
    if f.softcap > 0.0:
        reasons.append("a softcap")
    if p.alibi is not None:
        reasons.append("ALiBi slopes")
    if p.rng is not None:
        reasons.append("dropout (SDPA's kernel draws its own masks, not fastattn's counter-based ones)")
    if p.mask is not None and p.mask.dtype not in (torch.bool, p.dtype):
        # The kernel takes masks of the query's dtype; a conversion could round a float32
        # finfo.min to -inf in float16, where the tiled path keeps the mask's own values.
        reasons.append("a float mask of another dtype than the query")
    return reasons


def sdpa_mask_rows(p: Problem) -> int:
    """How many query rows SDPA's op takes at a time: all of them, except with a bool mask, which
    the op takes as an additive one, converted at the mask's own (broadcast) size, and for a mask
    with a query dim a block of rows at a time so the copy stays within MASK_BLOCK_BYTES."""
    mask = p.mask
    rows = p.seqlen_q
    if mask is not None and mask.dtype == torch.bool and mask.shape[2] > 1:
        row_bytes = mask[:, :, :1].numel() * mask.new_empty((), dtype=p.dtype).element_size()
        rows = max(1, min(rows, MASK_BLOCK_BYTES // row_bytes))
    return rows


def sdpa_mask(p: Problem, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask as SDPA's CPU op takes it: additive, in the query's dtype (-inf where a bool mask is False)."""
    if mask is not None and mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=p.dtype, device=p.device).masked_fill_(~mask, float("-inf"))
    return mask


def sdpa_parts(p: Problem) -> list[tuple[slice, slice, bool]]:
    """The calls of SDPA's kernel, which knows top-left causality only, that make up `p`: (query
    rows, keys, causal) each. A causal diagonal at offset c (query i sees key j when j <= i + c;
    c = S - L bottom-right) is at most two calls: for c > 0, keys [0, c), which every row sees, and
    then keys [c, S) top-left causal; for c < 0, rows [-c, L) against every key, top-left causal
    (the rows above see no key). Call it after :func:`without_noop_causality` (c < S - 1)."""
    L, S, c = p.seqlen_q, p.seqlen_k, p.features.causal_offset
    every_row, every_key = slice(0, L), slice(0, S)
    if c is None or c == 0:
        return [(every_row, every_key, c == 0)]
    if c > 0:
        return [(every_row, slice(0, c), False), (every_row, slice(c, S), True)]
    return [(slice(-c, L), every_key, True)] if -c < L else []


def _sdpa_part(p: Problem, rows: slice, keys: slice, causal: bool) -> Problem:
    """The sub-problem of one :func:`sdpa_parts` call (no mask: causal with a mask is not SDPA's)."""
    features = dataclasses.replace(p.features, causal_offset=0 if causal else None)
    return dataclasses.replace(p, q=p.q[:, :, rows], k=p.k[:, :, keys], v=p.v[:, :, keys], features=features)


def _sdpa_cpu(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    parts = sdpa_parts(p)
    if len(parts) == 1 and parts[0][0].start == 0:
        return _sdpa_call(p)
    # Each part's out and lse are those of its keys alone; merged in float64 (O(L) work), so the
    # merged lse and weights add no rounding of their own to the parts' (with logits ~1e3, a float32
    # merge gave SDPA's backward, which recomputes P from this lse, 4x the dQ error: measured).
    out = torch.zeros(p.batch, p.heads_q, p.seqlen_q, p.head_dim_v, dtype=torch.float64, device=p.device)
    lse = torch.full((p.batch, p.heads_q, p.seqlen_q), -math.inf, dtype=torch.float64, device=p.device)
    for rows, keys, causal in parts:
        merge_(out[:, :, rows], lse[:, :, rows], *_sdpa_call(_sdpa_part(p, rows, keys, causal)))
    return out.to(p.dtype), lse.to(lse_dtype(p.dtype))


def _sdpa_call(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """One call of SDPA's kernel (no causal diagonal, or top-left), fixed up where fastattn's
    semantics differ (NaN query rows, rows a mask leaves without keys)."""
    mask = p.mask
    rows = sdpa_mask_rows(p)
    if rows >= p.seqlen_q:
        out, lse = _sdpa_cpu_rows(p, mask)
    else:
        out = torch.empty(p.batch, p.heads_q, p.seqlen_q, p.head_dim_v, dtype=p.dtype, device=p.device)
        lse = torch.empty(p.batch, p.heads_q, p.seqlen_q, dtype=lse_dtype(p.dtype), device=p.device)
        for r0 in range(0, p.seqlen_q, rows):
            r = slice(r0, r0 + rows)
            block = dataclasses.replace(p, q=p.q[:, :, r], mask=mask[:, :, r])
            out[:, :, r], lse[:, :, r] = _sdpa_cpu_rows(block, block.mask)
    lse = lse.to(lse_dtype(p.dtype))
    # SDPA's CPU kernel gives a query row holding NaN output 0 and lse 0; SDPA's math backend, the
    # reference and the tiled path give NaN there (NaN in K, V or the mask already propagates).
    # Only rows whose lse is 0 (or NaN) are suspects, and min |lse| finds whether any exists in
    # two small ops: checking all of q for NaN cost ~0.5 ms at (2, 8, 256, 64), a third of the
    # kernel's own time (measured).
    if not bool(lse.abs().amin() > 0):
        nan_rows = torch.isnan(p.q).any(dim=-1) & ((lse == 0) | torch.isnan(lse))
        out = out.masked_fill(nan_rows[..., None], math.nan)
        lse = lse.masked_fill(nan_rows, math.nan)
    if p.mask is not None:
        # The op returns out = 0 but lse = 0 for rows with no key; fastattn promises lse = -inf.
        dead = ~_mask_keep(p.mask).any(dim=-1)
        if dead.any():
            dead = dead.expand(p.batch, p.heads_q, p.seqlen_q)
            lse = lse.masked_fill(dead, float("-inf"))
            out = out.masked_fill(dead[..., None], 0.0)
    return out, lse


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _sdpa_cpu_rows(p: Problem, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    mask = sdpa_mask(p, mask)
    # The raw op (unlike F.scaled_dot_product_attention) assumes unit stride in the head dim and
    # silently returns garbage otherwise, e.g. for a (B, H, E, L) tensor transposed.
    q, k, v = (_last_dim_contiguous(t) for t in (p.q, p.k, p.v))
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, p.features.causal_offset is not None, attn_mask=mask, scale=p.features.scale
    )


def _chunks(B: int, H: int, rows: int, cols: int, tile_elements: int) -> list[tuple[slice, slice]]:
    """(batch, head) slices whose score tiles of `rows` x `cols` hold about `tile_elements` in all.

    A chunk is whole batches (every head) when one batch's tile fits, else heads of one batch, so
    its batch and head dims can always be viewed as one batch dim: matmul never copies a block.
    """
    per_head = max(1, rows * cols)
    if H * per_head <= tile_elements:
        step = max(1, tile_elements // (H * per_head))
        return [(slice(b, min(b + step, B)), slice(0, H)) for b in range(0, B, step)]
    step = max(1, tile_elements // per_head)
    return [(slice(b, b + 1), slice(h, min(h + step, H))) for b in range(B) for h in range(0, H, step)]


def kv_blocks(t: torch.Tensor, bs: slice, hs: slice, dtype: torch.dtype, buffer: torch.Tensor):
    """A function (n0, n1) -> positions [n0, n1) of the (batch, head) chunk (bs, hs) of K or V
    (B, Hkv, S, D), as (nb * nh, n1 - n0, D) in `dtype`: a view where the chunk already is
    contiguous in `dtype`, else a conversion into `buffer` (reused by every block). A whole long
    K converted into fresh memory costs page faults: bf16 to float32 of (8, 8, 32768, 64) took
    243 ms fresh, 34 ms into memory in use, 17 ms a 512-key block at a time (measured)."""
    chunk = t[bs, hs]
    nb, nh, _, D = chunk.shape
    if chunk.dtype == dtype and chunk.is_contiguous():
        return lambda n0, n1: chunk[:, :, n0:n1].reshape(nb * nh, n1 - n0, D)

    def convert(n0: int, n1: int) -> torch.Tensor:
        block = buffer[: nb * nh * (n1 - n0) * D].view(nb, nh, n1 - n0, D)
        return block.copy_(chunk[:, :, n0:n1]).view(nb * nh, n1 - n0, D)

    return convert


def wide_key_blocks(L: int, S: int, block_m: int, block_n: int) -> int:
    """The key block of a tiled call with L query rows: `block_n`, widened when L < block_m so that
    a tile still holds about block_m * block_n scores per head (decoding, L = 1 against a long
    cache, would otherwise take S / block_n rounds of ops on a few hundred scores each)."""
    if L >= block_m:
        return block_n
    return min(max(S, 1), max(block_n, block_m * block_n // max(L, 1)))


def tiled_attention(
    p: Problem,
    block_m: int | None = None,
    block_n: int | None = None,
    tile_elements: int | None = None,
    return_stats: bool = False,
) -> tuple[torch.Tensor, ...]:
    """FlashAttention's online softmax in PyTorch ops; works on any device: (out (B, Hq, L, Ev),
    lse (B, Hq, L)), and with return_stats the row statistics (2, B, Hq, L) the backward takes
    (each row's max score and the log of its sum of exponentials, apart; -inf and 0 for a row with
    no key; the layout of fused.forward.new_stats).

    Query blocks of `block_m` rows meet key/value blocks of `block_n` positions (wider where
    L < block_m: :func:`wide_key_blocks`); (batch, head) pairs are taken a chunk at a time so that
    a score tile holds about `tile_elements` values (it stays in cache). Query heads that share a KV head are stacked into one matrix product, so
    K and V are not repeated. Extra memory: the score tile, a block of K and V in the compute
    dtype (none for contiguous float32), the output and O(L) row statistics; never an (L, S)
    matrix. Scores and row maxima are in natural units, exactly as the backward recomputes them (P = exp(S - max) / sum from the
    statistics); each exponential is exp2 of a difference to the row max times log2(e)
    (:func:`fastattn.eager.scores.exp_diff_`). The block sizes default to
    ``fastattn.configs.CPU_FORWARD_TILES``. Dropout (p.rng) zeroes the dropped exponentials of
    each tile after they join the row sum (lse is that of the undropped scores) and rescales the
    output by 1 / (1 - p) at the end.
    """
    tiles = configs.CPU_FORWARD_TILES
    block_m, block_n = block_m or tiles.block_m, block_n or tiles.block_n
    tile_elements = tile_elements or tiles.tile_elements
    B, Hq, L, E = p.q.shape
    Hkv, S, Ev, G = p.heads_kv, p.seqlen_k, p.head_dim_v, p.group
    converts = not all(t.dtype == _compute_dtype(p.dtype) and t.is_contiguous() for t in (p.k, p.v))
    wide = wide_key_blocks(L, S, block_m, block_n)
    # Converted K and V blocks (kv_blocks) stay within a tile's budget: a wide block of a long
    # bf16 K would be a large conversion into fresh memory again.
    block_n = min(wide, max(block_n, tile_elements // (Hkv * max(E, Ev)))) if converts else wide
    neg_inf = -math.inf
    cdt = _compute_dtype(p.dtype)
    dev = p.device
    scale = p.features.scale
    q5 = p.q.reshape(B, Hkv, G, L, E)  # a view: it only splits the head dim
    out = torch.empty(B, Hkv, G, L, Ev, dtype=p.dtype, device=dev)
    lse = torch.empty(B, Hkv, G, L, dtype=cdt, device=dev)
    stats = torch.empty(2, B, Hkv, G, L, dtype=cdt, device=dev)
    mask5 = grouped_mask(p)
    alibi5 = grouped_alibi(p)
    bm_max, bn_max = min(block_m, L), min(block_n, S)
    chunks = _chunks(B, Hkv, G * bm_max, bn_max, tile_elements)
    # One score buffer, one accumulator and K and V block buffers for every tile (the first chunk
    # is the largest): fresh (L3-sized) tensors per tile cost page faults and zeroing in the
    # allocator (~13% of a product and its exp2).
    most = max((bs.stop - bs.start) * (hs.stop - hs.start) for bs, hs in chunks)
    tile_buffer = torch.empty(most * G * bm_max * bn_max, dtype=cdt, device=dev)
    acc_buffer = torch.empty(most * G * bm_max * Ev, dtype=cdt, device=dev)
    k_buffer = torch.empty(most * bn_max * E, dtype=cdt, device=dev)
    v_buffer = torch.empty(most * bn_max * Ev, dtype=cdt, device=dev)
    for bs, hs in chunks:
        nb, nh = bs.stop - bs.start, hs.stop - hs.start
        k_blocks = kv_blocks(p.k, bs, hs, cdt, k_buffer)
        v_blocks = kv_blocks(p.v, bs, hs, cdt, v_buffer)
        mask_c = None
        if mask5 is not None:
            mask_c = mask5[bs if mask5.shape[0] > 1 else slice(None), hs if mask5.shape[1] > 1 else slice(None)]
        alibi_c = None if alibi5 is None else alibi5[bs if alibi5.shape[0] > 1 else slice(None), hs]
        for m0 in range(0, L, block_m):
            m1 = min(m0 + block_m, L)
            bm = m1 - m0
            rows = G * bm
            # Keys no row of this block can see (outside the causal diagonal and the window) are
            # never visited: a sliding window costs L * window, not L * S.
            lo, hi = visible_keys(p.features, m0, m1, S)
            qb = scaled_queries(q5[bs, hs, :, m0:m1], scale, cdt).view(nb * nh, rows, E)
            acc = acc_buffer[: nb * nh * rows * Ev].view(nb * nh, rows, Ev)
            m_i = l_i = None  # the row max and sum so far: None before the first key block
            for n0 in range(lo, hi, block_n):
                n1 = min(n0 + block_n, hi)
                bn = n1 - n0
                s = tile_buffer[: nb * nh * rows * bn].view(nb * nh, rows, bn)
                torch.bmm(qb, k_blocks(n0, n1).transpose(1, 2), out=s)
                score_mods_(
                    s.view(nb, nh, G, bm, bn), p.features, mask_c, m0, m1, n0, n1,
                    alibi=alibi_c, seqlens=(L, S), cache_band=True,
                )  # fmt: skip
                m_new = s.amax(dim=-1) if m_i is None else torch.maximum(m_i, s.amax(dim=-1))
                # Guard (-inf) - (-inf) for rows that have seen no key yet.
                m_safe = m_new.masked_fill(m_new == neg_inf, 0.0)
                exp_diff_(s, m_safe.unsqueeze(-1))
                if m_i is None:  # the first block: the sums and the accumulator start here
                    l_i = s.sum(dim=-1)
                else:
                    alpha = exp_diff_(m_i, m_safe)
                    l_i.mul_(alpha).add_(s.sum(dim=-1))
                if p.rng is not None:
                    s.view(nb, nh, G, bm, bn).mul_(dropout.grouped_keep(p, bs, hs, m0, m1, n0, n1, s.dtype))
                v_b = v_blocks(n0, n1)
                if m_i is None:
                    torch.bmm(s, v_b, out=acc)
                else:
                    acc.mul_(alpha.unsqueeze(-1)).baddbmm_(s, v_b)
                m_i = m_new
            if m_i is None:  # no row of this block sees any key
                acc.zero_()
                m_i = torch.full((nb * nh, rows), neg_inf, dtype=cdt, device=dev)
                l_i = torch.zeros(nb * nh, rows, dtype=cdt, device=dev)
            dead = l_i == 0
            acc.div_(l_i.masked_fill_(dead, 1.0).unsqueeze(-1))
            if p.rng is not None:
                acc.mul_(dropout.rescale(p.features.dropout_p))
            out[bs, hs, :, m0:m1] = acc.view(nb, nh, G, bm, Ev)
            log_l = l_i.log_()
            stats[0, bs, hs, :, m0:m1] = m_i.view(nb, nh, G, bm)
            stats[1, bs, hs, :, m0:m1] = log_l.view(nb, nh, G, bm)
            lse[bs, hs, :, m0:m1] = m_i.add_(log_l).masked_fill_(dead, neg_inf).view(nb, nh, G, bm)
    result = out.view(B, Hq, L, Ev), lse.view(B, Hq, L)
    return (*result, stats.view(2, B, Hq, L)) if return_stats else result


def without_noop_causality(p: Problem) -> Problem:
    """`p`, without its causal diagonal where every query sees every key (e.g. one decoding step,
    bottom-right): so SDPA's kernel, which has top-left causality only, can serve it."""
    off = p.features.causal_offset
    if off is not None and off >= p.seqlen_k - 1:
        p = dataclasses.replace(p, features=dataclasses.replace(p.features, causal_offset=None))
    return p


def tiled_serves(p: Problem) -> bool:
    """Does :func:`tiled_attention` serve the dense problem `p` (not SDPA's kernel, in the calls of
    :func:`sdpa_parts`)?"""
    return bool(sdpa_cpu_reasons(without_noop_causality(p)))


def cpu_fallback_attention(p: Problem, return_stats: bool = False) -> tuple[torch.Tensor, ...]:
    """(out (B, Hq, L, Ev), lse (B, Hq, L)) of a canonical problem, by SDPA's CPU kernel or tiles;
    with return_stats also the tiled path's row statistics for the backward, or None where SDPA's
    kernel served (:func:`tiled_serves` says which)."""
    if not tiled_serves(p):
        result = _sdpa_cpu(without_noop_causality(p))
        return (*result, None) if return_stats else result
    return tiled_attention(p, return_stats=return_stats)

"""The score step in PyTorch: one definition of what turns q . k into the logits softmax sees.

The reference (one tile: the whole (L, S) matrix), the CPU forward and the CPU backward (tiles of
query rows [m0, m1) against keys [n0, n1)) all call :func:`score_mods_` on scores already scaled,
and skip the key blocks :func:`visible_keys` / :func:`visible_rows` say no row can see. The Triton
kernels have the same step in ``fused/kernels/common.py``.

The order, for every backend: s = scale * q . k, then the softcap (c * tanh(s / c)), then + the
ALiBi bias (-slope * |i + S - L - j|), then + the float mask (or -inf where a bool mask is False),
then -inf outside the band of visible keys: i + window_lo <= j <= i + causal_offset.
"""

from __future__ import annotations

import functools
import math

import torch

from ..features import Features

LOG2E = 1.4426950408889634


def scaled_queries(q: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """A new tensor: q converted to `dtype` and times the softmax scale, the left operand of every
    tiled score product (forward and backward take it from here, so their scores round alike)."""
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    return out.copy_(q).mul_(scale)


def exp_diff_(s: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """exp(s - base), in place in s (base broadcasts), as exp2((s - base) * log2(e)): the difference
    is taken in natural units, where it is exact for nearby values, and exp2 because torch's CPU exp
    is several times slower wherever its result underflows (-inf scores that causality or a mask
    hide, differences below about -87: 4-40x measured) while exp2 keeps its speed."""
    return s.sub_(base).mul_(LOG2E).exp2_()


def grouped_mask(p) -> torch.Tensor | None:
    """The problem's mask as (Bm, Hkv or 1, G or 1, Lm, Sm), a view matching the (B, Hkv, G, rows,
    cols) score tiles of the tiled paths (query heads grouped by their KV head); None without one."""
    if p.mask is None:
        return None
    Bm, Hm, Lm, Sm = p.mask.shape
    return p.mask.reshape(Bm, p.heads_kv, p.group, Lm, Sm) if Hm == p.heads_q else p.mask.reshape(Bm, 1, 1, Lm, Sm)


def grouped_alibi(p) -> torch.Tensor | None:
    """The problem's ALiBi slopes as (1 or B, Hkv, G), matching the tiled paths' (B, Hkv, G) score
    tiles; None without them."""
    return None if p.alibi is None else p.alibi.reshape(p.alibi.shape[0], p.heads_kv, p.group)


def causal_keep(rows: torch.Tensor, cols: torch.Tensor, offset: int) -> torch.Tensor:
    """(len(rows), len(cols)) bool: query i sees key j when j <= i + offset (0 top-left, S - L bottom-right)."""
    return cols[None, :] <= rows[:, None] + offset


def hides_keys_by_position(f: Features) -> bool:
    """Do the features hide keys by their position alone (the causal diagonal, a window)?"""
    return f.causal_offset is not None or f.window_lo is not None


def _clamp(x, lo: int, hi: int):
    return x.clamp(lo, hi) if isinstance(x, torch.Tensor) else max(lo, min(hi, x))


def key_bounds(f: Features, first_row, last_row, S: int):
    """Which keys the query rows first_row..last_row (inclusive) see: (lo, hi, full_lo, full_hi),
    keys [lo, hi) seen by at least one row, keys [full_lo, full_hi) by every row (no element check
    needed there; empty when full_lo >= full_hi). Rows may be ints or integer tensors (the host's
    block classes pass block starts and ends), so the block-level and element-level rules are this
    one definition."""
    lo = full_lo = 0
    hi = full_hi = S
    if f.causal_offset is not None:
        hi = _clamp(last_row + f.causal_offset + 1, 0, S)
        full_hi = _clamp(first_row + f.causal_offset + 1, 0, S)
    if f.window_lo is not None:
        lo = _clamp(first_row + f.window_lo, 0, S)
        full_lo = _clamp(last_row + f.window_lo, 0, S)
        if f.causal_offset is not None and f.window_lo > f.causal_offset:  # an empty band: no key at all
            lo = hi = full_lo = full_hi = 0
    return lo, hi, full_lo, full_hi


def visible_keys(f: Features, m0: int, m1: int, S: int) -> tuple[int, int]:
    """[lo, hi): the keys that at least one query row in [m0, m1) can see; the others need no visit."""
    lo, hi, _, _ = key_bounds(f, m0, m1 - 1, S)
    return lo, max(lo, hi)


def visible_rows(f: Features, n0: int, n1: int, L: int) -> tuple[int, int]:
    """[lo, hi): the query rows that can see at least one key in [n0, n1); the others need no visit."""
    lo, hi = 0, L
    if f.causal_offset is not None:  # j <= i + causal_offset for some j < n1: i >= n0 - offset
        lo = _clamp(n0 - f.causal_offset, 0, L)
    if f.window_lo is not None:  # j >= i + window_lo for some j <= n1 - 1
        hi = _clamp(n1 - f.window_lo, 0, L)
    return lo, max(lo, hi)


def _key_offsets(m0: int, m1: int, n0: int, n1: int, device) -> torch.Tensor:
    """(m1 - m0, n1 - n0) int: j - i, each key's offset from its query's diagonal."""
    return torch.arange(n0, n1, device=device)[None, :] - torch.arange(m0, m1, device=device)[:, None]


@functools.lru_cache(maxsize=64)
def _band_hidden(rows: int, cols: int, above: int | None, below: int | None, device: torch.device) -> torch.Tensor:
    """(rows, cols) bool, True where a tile's key is outside the band: its offset from the
    tile's first query, j' - i', is above `above` or below `below` (None: no such edge). The tiled
    paths meet the same few tiles relative to the diagonal again and again; the cache builds each
    once instead of an arange, a compare and an or per tile."""
    offsets = _key_offsets(0, rows, 0, cols, device)
    hidden = torch.zeros(rows, cols, dtype=torch.bool, device=device)
    if above is not None:
        hidden |= offsets > above
    if below is not None:
        hidden |= offsets < below
    return hidden


def score_mods_(
    s: torch.Tensor,
    f: Features,
    mask: torch.Tensor | None,
    m0: int,
    m1: int,
    n0: int,
    n1: int,
    alibi: torch.Tensor | None = None,
    seqlens: tuple[int, int] | None = None,
    softcap_grad: bool = False,
    cache_band: bool = False,
):
    """Apply, in place, the modifiers of the scores s (..., m1 - m0, n1 - n0) of query rows [m0, m1)
    against keys [n0, n1), and return s (with softcap_grad: (s, g), below).

    s holds scale * q . k, in natural units (the tiled paths take their exponentials as exp2 of
    the differences to the row max or lse times log2(e), after this step). In order:
    1. the softcap c (f.softcap > 0): s = c * tanh(s / c);
    2. ALiBi: alibi (slopes whose shape broadcasts against s.shape[:-2]) adds
       -slope * |i + S - L - j|, with seqlens = (L, S) the problem's lengths;
    3. the mask (bool: -inf where False; float: added): a tensor whose leading dims broadcast
       against s's and whose last two dims are 1 or the problem's full L and S (sliced here);
    4. -inf outside the band: key j > query i + causal_offset, or j < i + window_lo.
    softcap_grad: also return g = d(capped) / d(s) = 1 - tanh^2 (None without a softcap), which
    the backward multiplies into dS (the chain rule through step 1).
    cache_band: take step 4's pattern from a cache keyed by the tile's shape and its offset from
    the diagonal (the tiled loops, which meet the same few tiles again and again; not the
    reference, whose traced or fake tensors must not outlive the call).
    """
    grad = None
    if f.softcap > 0.0:
        cap = f.softcap
        t = torch.tanh(s / cap)  # not in place: autograd (the reference) needs tanh's output
        if softcap_grad:
            grad = 1.0 - t * t
        s.copy_(t * cap)
    if alibi is not None:
        L, S = seqlens
        offsets = _key_offsets(m0, m1, n0, n1, s.device)
        distance = (offsets - (S - L)).abs_().to(s.dtype)
        slopes = alibi.to(s.dtype)
        s.sub_(slopes[..., None, None] * distance)
    if mask is not None:
        rows = slice(m0, m1) if mask.shape[-2] > 1 else slice(None)
        cols = slice(n0, n1) if mask.shape[-1] > 1 else slice(None)
        tile = mask[..., rows, cols]
        if tile.dtype == torch.bool:
            s.masked_fill_(tile.logical_not(), -math.inf)
        else:
            s.add_(tile)
    off, lo = f.causal_offset, f.window_lo
    cuts_hi = off is not None and n1 - 1 > m0 + off  # the tile crosses the upper diagonal
    cuts_lo = lo is not None and n0 < m1 - 1 + lo  # ... or the window's lower one
    if cuts_hi or cuts_lo:  # offsets j - i = (n0 - m0) + (j' - i') within the tile
        above = off - (n0 - m0) if cuts_hi else None
        below = lo - (n0 - m0) if cuts_lo else None
        band = _band_hidden if cache_band else _band_hidden.__wrapped__
        s.masked_fill_(band(m1 - m0, n1 - n0, above, below, s.device), -math.inf)
    return (s, grad) if softcap_grad else s

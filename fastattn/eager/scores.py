"""The score step in PyTorch: one definition of what turns q . k into the logits softmax sees.

The reference (one tile: the whole (L, S) matrix), the CPU forward and the CPU backward (tiles of
query rows [m0, m1) against keys [n0, n1)) all call :func:`score_mods_` on scores already scaled,
and skip the key blocks :func:`visible_keys` / :func:`visible_rows` say no row can see. The Triton
kernels have the same step in ``fused/kernels/common.py``.
"""

from __future__ import annotations

import math

import torch

from ..features import Features

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def grouped_mask(p) -> torch.Tensor | None:
    """The problem's mask as (Bm, Hkv or 1, G or 1, Lm, Sm), a view matching the (B, Hkv, G, rows,
    cols) score tiles of the tiled paths (query heads grouped by their KV head); None without one."""
    if p.mask is None:
        return None
    Bm, Hm, Lm, Sm = p.mask.shape
    return p.mask.reshape(Bm, p.heads_kv, p.group, Lm, Sm) if Hm == p.heads_q else p.mask.reshape(Bm, 1, 1, Lm, Sm)


def causal_keep(rows: torch.Tensor, cols: torch.Tensor, offset: int) -> torch.Tensor:
    """(len(rows), len(cols)) bool: query i sees key j when j <= i + offset (0 top-left, S - L bottom-right)."""
    return cols[None, :] <= rows[:, None] + offset


def hides_keys_by_position(f: Features) -> bool:
    """Do the features hide keys by their position alone (the causal diagonal)?"""
    return f.causal_offset is not None


def key_bounds(f: Features, first_row, last_row, S: int):
    """Which keys the query rows first_row..last_row (inclusive) see: (lo, hi, full_lo, full_hi),
    keys [lo, hi) seen by at least one row, keys [full_lo, full_hi) by every row (no element check
    needed there). Rows may be ints or integer tensors (the host's block classes pass block starts
    and ends), so the block-level and element-level rules are this one definition."""
    if not hides_keys_by_position(f):
        return 0, S, 0, S
    off = f.causal_offset
    return 0, _clamp(last_row + off + 1, 0, S), 0, _clamp(first_row + off + 1, 0, S)


def _clamp(x, lo: int, hi: int):
    return x.clamp(lo, hi) if isinstance(x, torch.Tensor) else max(lo, min(hi, x))


def visible_keys(f: Features, m0: int, m1: int, S: int) -> tuple[int, int]:
    """[lo, hi): the keys that at least one query row in [m0, m1) can see; the others need no visit."""
    lo, hi, _, _ = key_bounds(f, m0, m1 - 1, S)
    return lo, hi


def visible_rows(f: Features, n0: int, n1: int, L: int) -> tuple[int, int]:
    """[lo, hi): the query rows that can see at least one key in [n0, n1); the others need no visit."""
    if f.causal_offset is None:
        return 0, L
    return min(L, max(0, n0 - f.causal_offset)), L


def score_mods_(
    s: torch.Tensor,
    f: Features,
    mask: torch.Tensor | None,
    m0: int,
    m1: int,
    n0: int,
    n1: int,
    log2_units: bool = False,
) -> torch.Tensor:
    """Apply, in place, the modifiers of the scores s (..., m1 - m0, n1 - n0) of query rows [m0, m1)
    against keys [n0, n1), and return s.

    s holds scale * q . k (times log2(e) when log2_units: the tiled forward works in log2 units
    so that each exponential is one exp2). In order: the mask (bool: -inf where False; float:
    added, in s's units), then the causal diagonal (-inf where key j > query i + causal_offset).
    mask: None, or a tensor whose leading dims broadcast against s's and whose last two dims are
    1 or the problem's full L and S (it is sliced to the tile here).
    """
    if mask is not None:
        rows = slice(m0, m1) if mask.shape[-2] > 1 else slice(None)
        cols = slice(n0, n1) if mask.shape[-1] > 1 else slice(None)
        tile = mask[..., rows, cols]
        if tile.dtype == torch.bool:
            s.masked_fill_(tile.logical_not(), -math.inf)
        elif log2_units:
            s.add_(tile, alpha=LOG2E)
        else:
            s.add_(tile)
    off = f.causal_offset
    if off is not None and n1 - 1 > m0 + off:  # the tile crosses the diagonal
        rows_i = torch.arange(m0, m1, device=s.device)
        cols_j = torch.arange(n0, n1, device=s.device)
        s.masked_fill_(~causal_keep(rows_i, cols_j, off), -math.inf)
    return s

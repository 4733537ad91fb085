"""Which tiles of the score matrix a masked problem must visit, built on the host.

Each (query block, key block) tile is DEAD (every score hidden: never loaded), CUT (some scores
hidden: the kernel applies element masks) or FULL (nothing hidden: no mask is loaded). The forward
and dQ kernels take, per (batch, head, query block), the list of key blocks to visit (FULL ones
first); the dK/dV kernel takes the transpose. Causality's part comes from the same key bounds the
PyTorch paths use (:func:`fastattn.eager.scores.key_bounds`).
"""

from __future__ import annotations

import math

import torch

from ..eager.scores import hides_keys_by_position, key_bounds
from ..features import Features

BLOCK_DEAD, BLOCK_CUT, BLOCK_FULL = 0, 1, 2


def causal_block_classes(L: int, S: int, block_m: int, block_n: int, f: Features, device) -> torch.Tensor:
    """(cdiv(L, block_m), cdiv(S, block_n)) int8 classes of the tiles, from the features alone."""
    m0 = torch.arange(0, L, block_m, device=device)[:, None]
    n0 = torch.arange(0, S, block_n, device=device)[None, :]
    n1 = torch.clamp(n0 + block_n, max=S)
    lo, hi, full_lo, full_hi = key_bounds(f, m0, torch.clamp(m0 + block_m, max=L) - 1, S)
    dead = (n0 >= hi) | (n1 <= lo)
    full = (n0 >= full_lo) & (n1 <= full_hi)
    cls = torch.full(dead.shape, BLOCK_CUT, dtype=torch.int8, device=device)
    return cls.masked_fill_(full, BLOCK_FULL).masked_fill_(dead, BLOCK_DEAD)


def _lists(cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts (..., 2) int32: FULL and CUT blocks per row of cls, index (...) int32: FULL blocks
    first, then CUT ones, then the rest) from classes (..., n_blocks)."""
    order = torch.argsort(-cls.to(torch.int16), dim=-1, stable=True).to(torch.int32)
    counts = torch.stack(((cls == BLOCK_FULL).sum(-1), (cls == BLOCK_CUT).sum(-1)), dim=-1).to(torch.int32)
    return counts.contiguous(), order.contiguous()


def mask_block_classes(mask: torch.Tensor, L: int, S: int, block_m: int, block_n: int, f: Features) -> torch.Tensor:
    """(Bm, Hm, Mc, cdiv(S, block_n)) int8 classes of a masked problem's tiles (Mc: cdiv(L, block_m),
    or 1 when the mask has no query dim and causality does not apply)."""
    Bm, Hm, Lm, _ = mask.shape
    keep = (mask if mask.dtype == torch.bool else ~torch.isneginf(mask)).expand(Bm, Hm, Lm, S)
    n_blocks = math.ceil(S / block_n)
    rows, m_blocks = (block_m, math.ceil(L / block_m)) if Lm > 1 else (1, 1)
    shape = (Bm, Hm, m_blocks * rows, n_blocks * block_n)
    tiles = (Bm, Hm, m_blocks, rows, n_blocks, block_n)
    # Padding is neutral: no key for "any", kept for "all" (the end of S is checked in-kernel).
    padded = keep.new_zeros(shape)
    padded[:, :, :Lm, :S] = keep
    any_keep = padded.view(tiles).any(dim=5).any(dim=3)
    if mask.dtype == torch.bool:
        padded.fill_(True)
        padded[:, :, :Lm, :S] = keep
        all_keep = padded.view(tiles).all(dim=5).all(dim=3)
        cls = any_keep.to(torch.int8) * (1 + all_keep.to(torch.int8))
    else:  # a float mask always needs loading; only blocks that are -inf throughout are left out
        cls = any_keep.to(torch.int8)
    if S % block_n:
        cls[..., -1].clamp_(max=BLOCK_CUT)
    if hides_keys_by_position(f):  # broadcasts (.., 1 or M, N) against (M, N)
        cls = torch.minimum(cls, causal_block_classes(L, S, block_m, block_n, f, mask.device))
    return cls


def mask_block_lists(
    mask: torch.Tensor, L: int, S: int, block_m: int, block_n: int, f: Features
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (b, h, query block) lists of the key blocks a masked problem must visit.

    mask: (Bm, Hm, Lm, Sm), each dim 1 or full. Returns counts (Bc, Hc, Mc, 2) int32 (blocks
    needing no masking, blocks needing it) and index (Bc, Hc, Mc, cdiv(S, block_n)) int32 holding
    the first kind, then the second; blocks that the mask and causality remove are left out.
    """
    return _lists(mask_block_classes(mask, L, S, block_m, block_n, f))


def key_block_lists(
    mask: torch.Tensor, L: int, S: int, block_m: int, block_n: int, f: Features
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (b, h, key block) lists of the query blocks the dK/dV kernel must visit: the transpose
    of :func:`mask_block_lists`, counts (Bc, Hc, Nc, 2) and index (Bc, Hc, Nc, cdiv(L, block_m)),
    Nc = cdiv(S, block_n); (Bc, Hc) are the mask's own (broadcast) batch and head sizes."""
    cls = mask_block_classes(mask, L, S, block_m, block_n, f)
    cls = cls.expand(*cls.shape[:2], math.ceil(L / block_m), cls.shape[-1]).transpose(-1, -2)
    return _lists(cls)

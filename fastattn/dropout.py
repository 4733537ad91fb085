"""Attention dropout, counter-based: which weights a call drops is a pure function of its draw.

A call with dropout_p = p > 0 draws ``rng`` = (seed, offset), an int64 (2,) tensor, from a torch
generator (:func:`draw`). Weight (b, h, i, j) (batch, query head, query row, key column; a packed
call's b is the sequence and i, j count within it) is kept when

    philox(key=seed, counter=(j // 4, i, b * Hq + h, offset mod 2**32))[j % 4] >= threshold(p)

with Philox4x32-10 (Salmon et al., 2011: the generator Triton's ``tl.philox`` / ``tl.randint4x``
implement; the key's low word is seed mod 2**32, its high word seed // 2**32) and
threshold(p) = round(p * 2**32), so a weight is kept with probability 1 - p to within 2**-32,
independently of every other. One Philox call gives the 32-bit draws of four neighbouring keys.
Kept weights are multiplied by 1 / (1 - p), dropped ones are 0 (SDPA's definition).

The same function is computed here with PyTorch integer ops (the reference, the CPU forward and
the CPU backward call :func:`keep`) and in the Triton kernels (``fused/kernels/common._dropout_keep``),
so a seed gives bit-identical masks on every backend, whatever their tiles, grids or splits; the
backward regenerates the mask from the saved rng instead of storing it.
"""

from __future__ import annotations

import os

import torch

WORD = 0xFFFFFFFF
# Philox4x32's round multipliers and Weyl key increments (the values tl.philox uses).
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
ROUNDS = 10
KEYS_PER_DRAW = 4  # the four 32-bit words of one Philox call go to four neighbouring keys


def threshold(p: float) -> int:
    """The 32-bit draw at or above which a weight is kept: round(p * 2**32), in [0, 2**32 - 1]."""
    return min(round(p * 2.0**32), WORD)


def rescale(p: float) -> float:
    """What kept weights are multiplied by: 1 / (1 - p)."""
    return 1.0 / (1.0 - p)


def check_generator(generator, device: torch.device) -> None:
    """generator: None, or a torch.Generator on the inputs' device or on the CPU."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    gdev = generator.device
    if gdev.type != "cpu" and (gdev.type != device.type or (gdev.index or 0) != (device.index or 0)):
        raise ValueError(
            f"generator is on {gdev} but the inputs are on {device}; pass a generator of the inputs' device, or a "
            "CPU generator"
        )


def draw(device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A call's rng: int64 (2,) (seed, offset) on `device`, drawn from `generator` (default: torch's
    default generator of `device`), so torch.manual_seed makes a run reproducible and consecutive
    calls differ. A CPU generator may serve inputs on any device (the two numbers are drawn on the
    host and copied): the way to give a CPU run and a GPU run the same masks. No host sync: under
    torch.compile the draw is one traced op."""
    where = device if generator is None else generator.device
    rng = torch.randint(0, 2**63 - 1, (2,), dtype=torch.int64, device=where, generator=generator)
    return rng if rng.device == device else rng.to(device)


def philox(key_lo, key_hi, c0, c1, c2, c3) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of the counter words (c0, c1, c2, c3) under the key (key_lo, key_hi): four
    words. Every argument is an int64 tensor (or int) holding a value in [0, 2**32); they broadcast,
    and the results have the broadcast shape. A 32x32-bit product fits in int64's 64 bits modulo
    2**64 (two's complement), so its high word is (x >> 32) & WORD whatever the sign."""
    k0, k1 = key_lo, key_hi
    for r in range(ROUNDS):
        hi0 = c2 * ROUND_B  # the 64-bit products; their low words are the next c1 and c3
        hi1 = c0 * ROUND_A
        c1_next = hi0 & WORD
        c3_next = hi1 & WORD
        c0 = ((hi0 >> 32) & WORD) ^ c1 ^ k0
        c2 = ((hi1 >> 32) & WORD) ^ c3 ^ k1
        c1, c3 = c1_next, c3_next
        if r + 1 < ROUNDS:
            k0 = (k0 + KEY_A) & WORD
            k1 = (k1 + KEY_B) & WORD
    return c0, c1, c2, c3


def _keep_words(key_lo, key_hi, offset, heads, rows, groups, t, dtype):
    """(H, R, 4 G) in `dtype`: 1 where a weight is kept, 0 where dropped. Philox of the counters
    (groups, rows, heads, offset) under the key, each word compared with the threshold t, the four
    words of a group side by side (key 4 g + w). The comparison is the sign of w - t (both below
    2**32), not a bool op: compiled, bool results made Inductor's loop 3x slower (measured)."""
    words = philox(key_lo, key_hi, groups[None, None, :], rows[None, :, None], heads[:, None, None], offset)
    return torch.stack([(((w - t) >> 63) + 1).to(dtype) for w in words], dim=-1).flatten(-2)


_compiled_keep_words = None  # torch.compile of _keep_words, built on first use (False: unavailable)


def _fast_keep_words():
    """_keep_words compiled by torch.compile for CPU tensors (Inductor's C++ loop: ~1 ns per weight
    on one core, 10-20x the PyTorch ops, bit-identical), or None where compiling fails (no C++
    compiler; FASTATTN_COMPILE_DROPOUT=0 turns it off). Compiled once per dtype, dynamic shapes."""
    global _compiled_keep_words
    if _compiled_keep_words is None:
        if os.environ.get("FASTATTN_COMPILE_DROPOUT", "1") == "0":
            _compiled_keep_words = False
        else:
            try:
                fn = torch.compile(_keep_words, dynamic=True)
                probe = [torch.tensor(v) for v in (1, 2, 3)] + [torch.arange(3)] * 3 + [2**31, torch.float32]
                _compiled_keep_words = fn if torch.equal(fn(*probe), _keep_words(*probe)) else False
            except Exception:  # noqa: BLE001 - any failure to compile means: use the PyTorch ops
                _compiled_keep_words = False
    return _compiled_keep_words or None


def keep(rng: torch.Tensor, p: float, heads: torch.Tensor, m0: int, m1: int, n0: int, n1: int,
         dtype: torch.dtype = torch.bool, fast: bool = False) -> torch.Tensor:  # fmt: skip
    """Which weights of query rows [m0, m1) and keys [n0, n1) survive dropout: a tensor of shape
    heads.shape + (m1 - m0, n1 - n0), True / 1 where kept (dtype: bool, or a float dtype for a
    multiplier).

    rng: the call's (seed, offset) (:func:`draw`); p: dropout_p; heads: int64 counter words
    b * Hq + h, of any shape. fast: on CPU tensors, run the compiled loop (:func:`_fast_keep_words`)
    where it is available: the same bits."""
    dev = rng.device
    seed, offset = rng[0], rng[1]
    g0, g1 = n0 // KEYS_PER_DRAW, -(-n1 // KEYS_PER_DRAW)
    args = (
        seed & WORD, (seed >> 32) & WORD, offset & WORD, heads.reshape(-1),
        torch.arange(m0, m1, device=dev), torch.arange(g0, g1, dtype=torch.int64, device=dev),
    )  # fmt: skip
    fn = _fast_keep_words() if fast and dev.type == "cpu" else None
    kept = (fn or _keep_words)(*args, threshold(p), dtype)
    start = n0 - g0 * KEYS_PER_DRAW
    return kept[..., start : start + (n1 - n0)].reshape(*heads.shape, m1 - m0, n1 - n0)


def keep_mask(rng: torch.Tensor, p: float, batch: int, heads: int, L: int, S: int, batch0: int = 0) -> torch.Tensor:
    """The whole (batch, heads, L, S) bool keep mask of a dense call with this rng and dropout_p
    (batch0: the index of the first batch); materialised, for tests and inspection."""
    dev = rng.device
    bh = (torch.arange(batch, device=dev) + batch0)[:, None] * heads + torch.arange(heads, device=dev)
    return keep(rng, p, bh, 0, L, 0, S)


def grouped_keep(
    p, batches: slice, kv_heads: slice, m0: int, m1: int, n0: int, n1: int, dtype: torch.dtype, fast: bool = True
) -> torch.Tensor:
    """The keep mask of problem `p`'s tile: batches x KV heads x their G query heads, query rows
    [m0, m1) x keys [n0, n1), as (nb, nh, G, m1 - m0, n1 - n0) in `dtype` (:func:`keep`), matching
    the PyTorch paths' grouped score tiles (query head h = kv_head * G + g; batch b counts from
    p.batch0). fast: as in :func:`keep` (the reference passes False: the oracle runs the PyTorch ops)."""
    dev, G = p.device, p.group
    b = torch.arange(batches.start, batches.stop, device=dev) + p.batch0
    h = torch.arange(kv_heads.start * G, kv_heads.stop * G, device=dev).view(-1, G)
    heads = b[:, None, None] * p.heads_q + h
    return keep(p.rng, p.features.dropout_p, heads, m0, m1, n0, n1, dtype=dtype, fast=fast)

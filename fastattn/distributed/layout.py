"""Where each rank's shard of the sequence lies, and the per-step work of the ring: pure functions.

A sequence of N positions is sharded over W ranks in one of two layouts:

- ``"contiguous"``: rank r holds one run of positions, [start_r, start_r + n_r); the lengths may
  differ between ranks (:func:`split_lengths` gives the first N % W ranks one more).
- ``"zigzag"``: the sequence is cut into 2W chunks of N / (2W) positions and rank r holds chunks
  r and 2W - 1 - r, in that order. With causal attention every rank then has the same work
  (early chunks see few keys, late ones many).

A shard is a tuple of :class:`Piece` s. At each step of the ring a rank attends its query shard to
one key shard; :func:`step_calls` splits that into the fewest dense attention calls, each with the
features of its block (``features.block_features``: plain where the block is inside the band,
causal on the diagonal, skipped where nothing is visible).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..features import Features, block_features

LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class Piece:
    """A run of consecutive positions: the global position of its first one, its first row in the
    rank's shard, and its length."""

    start: int
    offset: int
    length: int

    @property
    def rows(self) -> slice:
        return slice(self.offset, self.offset + self.length)


@dataclass(frozen=True)
class Call:
    """One dense attention call of a ring step: query rows `q` of the rank's query shard against
    rows `k` of the key shard it holds, with the block's `features`."""

    q: slice
    k: slice
    features: Features


def check_layout(layout) -> str:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def split_lengths(n: int, world_size: int, layout: str) -> list[int]:
    """Each rank's shard length when `n` positions are sharded over `world_size` ranks."""
    check_layout(layout)
    if layout == "zigzag":
        if n % (2 * world_size):
            raise ValueError(
                f"layout='zigzag' cuts the sequence into 2 * world_size = {2 * world_size} equal chunks; "
                f"the length {n} is not a multiple of it"
            )
        return [n // world_size] * world_size
    return [n // world_size + (r < n % world_size) for r in range(world_size)]


def check_lengths(name: str, lengths: list[int], layout: str) -> None:
    """The per-rank shard lengths a layout allows: any for contiguous; one even length for zigzag."""
    if layout == "zigzag" and (len(set(lengths)) != 1 or lengths[0] % 2):
        raise ValueError(
            f"layout='zigzag' needs every rank's {name} shard to hold the same even number of positions "
            f"(two chunks of one size); the ranks hold {lengths}"
        )


def pieces(layout: str, lengths: list[int], rank: int) -> tuple[Piece, ...]:
    """The pieces of rank `rank`'s shard, given every rank's shard length."""
    if layout == "zigzag":
        chunk, world = lengths[rank] // 2, len(lengths)
        return Piece(rank * chunk, 0, chunk), Piece((2 * world - 1 - rank) * chunk, chunk, chunk)
    return (Piece(sum(lengths[:rank]), 0, lengths[rank]),)


def split(x, dim: int, layout: str, lengths: list[int]) -> list:
    """The shards of the full tensor `x` along `dim`, one per rank (views for contiguous)."""
    import torch

    shards = []
    for r in range(len(lengths)):
        parts = [x.narrow(dim, p.start, p.length) for p in pieces(layout, lengths, r)]
        shards.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim))
    return shards


def join(shards: list, dim: int, layout: str):
    """The full tensor from every rank's shard along `dim` (the inverse of :func:`split`)."""
    import torch

    lengths = [s.shape[dim] for s in shards]
    located = []
    for r, shard in enumerate(shards):
        located += [(p.start, shard.narrow(dim, p.offset, p.length)) for p in pieces(layout, lengths, r)]
    return torch.cat([t for _, t in sorted(located, key=lambda item: item[0])], dim)


def _is_plain(f: Features | None) -> bool:
    return f is not None and f.causal_offset is None and f.window_lo is None


def step_calls(features: Features, q_pieces: tuple[Piece, ...], k_pieces: tuple[Piece, ...]) -> list[Call]:
    """The dense calls that attend a query shard to a key shard, in a fixed order.

    Every (query piece, key piece) block gets the call's features moved to its position; blocks
    that see nothing are left out. Blocks wholly inside the band join into one call where their
    rows are adjacent: the whole shards when every block is, else a key piece against the whole
    query shard, or a query piece against the whole key shard (zigzag's off-diagonal steps are
    each one call)."""
    blocks = {
        (a, b): block_features(features, qp.start - kp.start, qp.length, kp.length)
        for a, qp in enumerate(q_pieces)
        for b, kp in enumerate(k_pieces)
    }
    q_all = slice(0, sum(p.length for p in q_pieces))
    k_all = slice(0, sum(p.length for p in k_pieces))
    if all(_is_plain(f) for f in blocks.values()):
        return [Call(q_all, k_all, blocks[0, 0])]
    calls, done = [], set()
    if len(q_pieces) > 1:
        for b, kp in enumerate(k_pieces):
            column = [(a, b) for a in range(len(q_pieces))]
            if all(_is_plain(blocks[key]) for key in column):
                calls.append(Call(q_all, kp.rows, blocks[column[0]]))
                done.update(column)
    if len(k_pieces) > 1:
        for a, qp in enumerate(q_pieces):
            row = [(a, b) for b in range(len(k_pieces))]
            if all(key not in done and _is_plain(blocks[key]) for key in row):
                calls.append(Call(qp.rows, k_all, blocks[row[0]]))
                done.update(row)
    for (a, b), f in blocks.items():
        if (a, b) not in done and f is not None:
            calls.append(Call(q_pieces[a].rows, k_pieces[b].rows, f))
    return calls

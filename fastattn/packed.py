"""Packed calls (``fastattn.varlen_attention``): their argument checks, canonical form and sequences.

:func:`canonicalize_varlen` checks what can be checked without reading tensor contents (types,
dtypes, shapes, devices, heads) and gives a :class:`fastattn.problem.Problem` with a
:class:`fastattn.problem.Packing`. The contents of the index tensors are checked inside the op by
:func:`check_packing_values`, so a torch.compile graph never waits on them. :func:`runs` splits a
packed problem into dense problems of consecutive sequences of equal lengths (views, no copies,
except the gathered pages of a paged cache): the CPU path and the reference serve each run with
the dense code.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch

from .features import _check_window, anchored, check_features, relative_window
from .problem import Packing, Problem, _check_alibi, check_heads, check_qkv, dropout_draw


def _check_index(name: str, t, query: torch.Tensor, dims: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dim{'s' if dims > 1 else ''}, got shape {tuple(t.shape)}")
    if t.device != query.device:
        raise ValueError(f"{name} is on {t.device} but query is on {query.device}")


def _check_int(name: str, x, minimum: int) -> int:
    if isinstance(x, bool) or not isinstance(x, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if not isinstance(x, torch.SymInt) and x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")
    return x if isinstance(x, torch.SymInt) else int(x)


def canonicalize_varlen(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    scale=None,
    window_size=(-1, -1),
    enable_gqa=False,
    seqused_k=None,
    block_table=None,
    num_splits=None,
    softcap=0.0,
    alibi_slopes=None,
    dropout_p=0.0,
    generator=None,
) -> Problem:
    """Check ``varlen_attention``'s arguments (TypeError / ValueError naming the argument) and
    return the packed :class:`Problem` (with dropout's draw when dropout_p > 0)."""
    query, key, value = check_qkv(query, key, value, enable_gqa)
    paged = block_table is not None
    kv_dims = 4 if paged else 3
    if query.dim() != 3:
        raise ValueError(f"query must be (T_q, Hq, E), got shape {tuple(query.shape)}")
    for name, t in (("key", key), ("value", value)):
        if t.dim() != kv_dims:
            layout = "(num_pages, page_size, Hkv, E) with block_table" if paged else "(T_k, Hkv, E)"
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
    T_q, Hq, E = query.shape
    *kv_rows, Hkv, Ek = key.shape
    *v_rows, Hv, Ev = value.shape
    if v_rows != kv_rows:
        raise ValueError(
            f"key and value must have the same leading dims, got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    check_heads(Hq, Hkv, Hv, E, Ek, Ev, enable_gqa)

    _check_index("cu_seq_q", cu_seq_q, query, 1)
    N = cu_seq_q.shape[0] - 1
    if N < 0:
        raise ValueError("cu_seq_q must have at least one entry (N + 1 offsets for N sequences)")
    if cu_seq_k is None:
        if not paged:
            raise ValueError("cu_seq_k may be None only with block_table (the keys then come from the pages)")
    else:
        _check_index("cu_seq_k", cu_seq_k, query, 1)
        if cu_seq_k.shape[0] != N + 1:
            raise ValueError(f"cu_seq_k must have N + 1 = {N + 1} entries like cu_seq_q, got {cu_seq_k.shape[0]}")
    if seqused_k is not None:
        _check_index("seqused_k", seqused_k, query, 1)
        if seqused_k.shape[0] != N:
            raise ValueError(f"seqused_k must have one entry per sequence (N = {N}), got {seqused_k.shape[0]}")
    page_size = 0
    if paged:
        if seqused_k is None:
            raise ValueError("block_table needs seqused_k: the number of keys each sequence holds in its pages")
        _check_index("block_table", block_table, query, 2)
        if block_table.shape[0] != N:
            raise ValueError(f"block_table must have one row per sequence (N = {N}), got {block_table.shape[0]}")
        page_size = key.shape[1]
        if page_size < 1:
            raise ValueError(f"key's page_size (dim 1) must be at least 1, got {page_size}")
    max_q = _check_int("max_q", max_q, 0)
    max_k = _check_int("max_k", max_k, 0)
    if num_splits is not None:
        num_splits = _check_int("num_splits", num_splits, 1)

    # The features of the whole call, its band relative to each sequence's bottom-right corner.
    features = check_features(
        scale=scale, head_dim=E, causal_offset=None, dropout_p=dropout_p, window_size=(-1, -1), softcap=softcap
    )
    lower, upper = relative_window(_check_window(window_size))
    features = dataclasses.replace(features, causal_offset=upper, window_lo=lower)

    alibi = _check_alibi(alibi_slopes, query, (N,) if N > 0 else (), Hq)

    q = query.permute(1, 0, 2)[None]
    if paged:
        # The pool's pages as one run of rows: a view when its (num_pages, page_size) dims merge.
        key = key.reshape(-1, Hkv, E)
        value = value.reshape(-1, Hkv, Ev)
    k = key.permute(1, 0, 2)[None]
    v = value.permute(1, 0, 2)[None]
    packing = Packing(
        cu_seq_q=cu_seq_q,
        cu_seq_k=cu_seq_k,
        seqused_k=seqused_k,
        block_table=block_table,
        max_q=max_q,
        max_k=max_k,
        page_size=page_size,
        num_splits=num_splits or 0,
    )
    rng = dropout_draw(features, query.device, generator)
    return Problem(q=q, k=k, v=v, mask=None, features=features, alibi=alibi, packing=packing, rng=rng)


@dataclass(frozen=True)
class Sequence:
    """Sequence n of a packed problem, read on the host: query rows [q0, q0 + L), its key slot
    starting at row k0 (of `slot` rows; 0 with pages) of which the first S take part."""

    q0: int
    L: int
    k0: int
    slot: int
    S: int


def sequences(p: Problem) -> list[Sequence]:
    """The sequences of a packed problem (one host read of its index tensors)."""
    pk = p.packing
    cq = pk.cu_seq_q.tolist()
    ck = pk.cu_seq_k.tolist() if pk.cu_seq_k is not None else None
    used = pk.seqused_k.tolist() if pk.seqused_k is not None else None
    out = []
    for n in range(pk.num_seqs):
        k0, slot = (ck[n], ck[n + 1] - ck[n]) if ck is not None else (0, 0)
        out.append(Sequence(cq[n], cq[n + 1] - cq[n], k0, slot, used[n] if used is not None else slot))
    return out


def check_packing_values(p: Problem) -> list[Sequence]:
    """Check the contents of a packed problem's index tensors (ValueError naming the argument) and
    return its sequences."""
    pk = p.packing
    T_q, T_k = p.seqlen_q, p.seqlen_k
    for name, t, total in (("cu_seq_q", pk.cu_seq_q, T_q), ("cu_seq_k", pk.cu_seq_k, T_k)):
        if t is None:
            continue
        cu = t.tolist()
        if cu[0] != 0:
            raise ValueError(f"{name} must start at 0, got {cu[0]}")
        if any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"{name} must be non-decreasing (cumulative sequence offsets), got {cu}")
        if cu[-1] != total and not (name == "cu_seq_k" and pk.block_table is not None):
            rows = "query" if name == "cu_seq_q" else "key"
            raise ValueError(f"{name}[-1] = {cu[-1]} must equal the number of packed {rows} rows ({total})")
    seqs = sequences(p)
    if seqs:
        longest_q = max(s.L for s in seqs)
        if longest_q > pk.max_q:
            raise ValueError(f"max_q = {pk.max_q} is smaller than the longest query sequence ({longest_q})")
        longest_k = max(s.S for s in seqs)
        if longest_k > pk.max_k:
            raise ValueError(f"max_k = {pk.max_k} is smaller than the longest key sequence ({longest_k})")
    if pk.seqused_k is not None:
        if any(s.S < 0 for s in seqs):
            raise ValueError(f"seqused_k must be >= 0, got {pk.seqused_k.tolist()}")
        if pk.cu_seq_k is not None and any(s.S > s.slot for s in seqs):
            raise ValueError("seqused_k[n] must not exceed sequence n's key slot cu_seq_k[n + 1] - cu_seq_k[n]")
    if pk.block_table is not None:
        pages = p.seqlen_k // pk.page_size
        capacity = pk.block_table.shape[1] * pk.page_size
        if any(s.S > capacity for s in seqs):
            raise ValueError(
                f"seqused_k asks for more keys than block_table's {pk.block_table.shape[1]} pages of "
                f"{pk.page_size} hold ({capacity})"
            )
        for n, s in enumerate(seqs):
            used_pages = pk.block_table[n, : math.ceil(s.S / pk.page_size)]
            if used_pages.numel() and (int(used_pages.min()) < 0 or int(used_pages.max()) >= pages):
                raise ValueError(
                    f"block_table row {n} holds a page index outside the pool of {pages} pages: {used_pages.tolist()}"
                )
    return seqs


@dataclass(frozen=True)
class Run:
    """Consecutive sequences [n0, n0 + count) of equal lengths (L, S), with equal key slots when
    they come from cu_seq_k: as one batch they are views of the packed tensors."""

    n0: int
    count: int
    q0: int
    L: int
    k0: int
    slot: int
    S: int


def runs(p: Problem, seqs: list[Sequence]) -> list[Run]:
    """Group consecutive sequences of equal (L, S) (and slot) into runs."""
    out: list[Run] = []
    paged = p.packing.block_table is not None
    for n, s in enumerate(seqs):
        if out:
            r = out[-1]
            if (s.L, s.S) == (r.L, r.S) and (paged or (s.slot == r.slot and s.k0 == r.k0 + r.count * r.slot)):
                out[-1] = dataclasses.replace(r, count=r.count + 1)
                continue
        out.append(Run(n, 1, s.q0, s.L, s.k0, s.slot, s.S))
    return out


def rows_of(t: torch.Tensor, start: int, count: int, length: int, used: int | None = None) -> torch.Tensor:
    """(count, H, used or length, ...) view of `count` runs of `length` rows from row `start` of a
    heads-first packed tensor t (1, H, T, ...)."""
    x = t[0, :, start : start + count * length].unflatten(1, (count, length))
    if used is not None:
        x = x[:, :, :used]
    return x.transpose(0, 1)


def _paged_rows(p: Problem, r: Run) -> torch.Tensor:
    """(count * S,) row indices in the page pool of the run's logical key positions."""
    pk = p.packing
    pos = torch.arange(r.S, device=p.device)
    table = pk.block_table[r.n0 : r.n0 + r.count].long()
    pages = table[:, pos // pk.page_size] if r.S else table[:, :0]
    return (pages * pk.page_size + pos % pk.page_size).reshape(-1)


def run_problem(p: Problem, r: Run) -> Problem:
    """The dense problem of run `r`: q (count, Hq, L, E), k (count, Hkv, S, E), v likewise, with
    the features anchored at (L, S), the run's ALiBi slopes and its first sequence as dropout's
    batch index (batch0)."""
    if p.packing.block_table is not None:
        # Whole pool rows (Hkv * E contiguous values each) gathered into the run's own packed rows,
        # then seen as (count, Hkv, S, E) like a contiguous cache's slots.
        idx = _paged_rows(p, r)
        k, v = (
            t[0].transpose(0, 1).index_select(0, idx).unflatten(0, (r.count, r.S)).transpose(1, 2) for t in (p.k, p.v)
        )
    else:
        k, v = (rows_of(t, r.k0, r.count, r.slot, r.S) for t in (p.k, p.v))
    alibi = p.alibi
    if alibi is not None and alibi.shape[0] > 1:
        alibi = alibi[r.n0 : r.n0 + r.count]
    return Problem(
        q=rows_of(p.q, r.q0, r.count, r.L),
        k=k,
        v=v,
        mask=None,
        features=anchored(p.features, r.L, r.S),
        alibi=alibi,
        rng=p.rng,
        batch0=r.n0,
    )

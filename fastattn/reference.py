"""The textbook formula, computed literally: the oracle for every test and the benchmarks' baseline.

It materialises the full (..., Hq, L, S) score matrix, so it is only for small problems.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from . import dropout
from .dispatch import choose_backend
from .eager import scores
from .problem import Problem, canonicalize, empty_result


def causal_keep(L: int, S: int, offset: int, device=None) -> torch.Tensor:
    """(L, S) bool matrix: query i sees key j when j <= i + offset (0 top-left, S - L bottom-right)."""
    return scores.causal_keep(torch.arange(L, device=device), torch.arange(S, device=device), offset)


def problem_scores(p: Problem, dtype: torch.dtype) -> torch.Tensor:
    """Scaled, masked scores (B, Hq, L, S) in `dtype`; masked entries are -inf."""
    q, k = p.q.to(dtype), p.k.to(dtype)
    if p.group > 1:
        k = k.repeat_interleave(p.group, dim=1)
    # As SDPA's math backend: q and k scaled by sqrt(|scale|) before the product, so that float16
    # products beyond 65504 that the scale brings back into range do not overflow first.
    root = math.sqrt(abs(p.features.scale))
    s = torch.matmul(q * root, k.transpose(-2, -1) * root)
    if p.features.scale < 0:
        s = s.neg_()
    mask = None if p.mask is None else p.mask if p.mask.dtype == torch.bool else p.mask.to(dtype)
    return scores.score_mods_(
        s, p.features, mask, 0, p.seqlen_q, 0, p.seqlen_k, alibi=p.alibi, seqlens=(p.seqlen_q, p.seqlen_k)
    )


def problem_attention(p: Problem, dtype: torch.dtype | None = None, return_weights: bool = False):
    """(out, lse[, weights]) of a canonical problem, computed in `dtype` (default: the inputs')."""
    dtype = dtype or p.dtype
    lse_dt = torch.float64 if dtype == torch.float64 else torch.float32
    empty = empty_result(p)
    if empty is not None:
        out, lse = empty
        weights = p.q.new_zeros(p.batch, p.heads_q, p.seqlen_q, p.seqlen_k, dtype=dtype)
        out = out.to(dtype)
    else:
        s = problem_scores(p, dtype)
        dead = torch.isneginf(s).all(dim=-1, keepdim=True)
        # A row with nothing to attend to gets zero weights and lse = -inf (softmax and logsumexp
        # of all -inf would be NaN, in the values or in their gradients).
        live = s.masked_fill(dead, 0.0)
        lse = torch.logsumexp(live, dim=-1).masked_fill(dead[..., 0], -math.inf)
        weights = torch.softmax(live, dim=-1).masked_fill(dead, 0.0)
        if p.rng is not None:  # dropout: the kept weights, rescaled; lse stays that of the scores
            f = p.features
            keep = dropout.grouped_keep(
                p, slice(0, p.batch), slice(0, p.heads_kv), 0, p.seqlen_q, 0, p.seqlen_k, dtype, False
            )
            weights = weights * keep.reshape(weights.shape) * dropout.rescale(f.dropout_p)
        v = p.v.to(dtype)
        if p.group > 1:
            v = v.repeat_interleave(p.group, dim=1)
        out = torch.matmul(weights, v)
    if return_weights:
        return out, lse.to(lse_dt), weights
    return out, lse.to(lse_dt)


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask=None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_lse: bool = False,
    return_weights: bool = False,
    upcast: bool = False,
):
    """softmax(Q K^T * scale + mask) V, computed literally from the full score matrix.

    Arguments and their meaning are those of :func:`fastattn.attention` (SDPA's, plus the
    keyword-only window_size, softcap and alibi_slopes, applied in the order written there, and
    dropout_p with its generator: the same draw gives the same dropped weights as every backend).

    upcast: False computes in the inputs' dtype (the low-precision baseline the error-ratio tests
        compare against); True computes and returns everything in float64 (the oracle).
    return_lse: also return lse (..., Hq, L), the natural-log logsumexp of each row's scaled,
        masked scores (float32; float64 when upcast or for float64 inputs).
    return_weights: also return the attention probabilities (..., Hq, L, S): row i says how much
        query i took from each key position. Rows with no key to attend to are all zero. With
        dropout_p > 0, the weights after dropout: 0 where dropped, the rest times 1 / (1 - p).

    Returns out, or a tuple (out, lse), (out, weights) or (out, lse, weights) in that order.
    """
    p = canonicalize(
        query,
        key,
        value,
        attn_mask,
        dropout_p,
        is_causal,
        scale,
        enable_gqa,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        generator=generator,
    )
    choose_backend("reference", p)
    out, lse, weights = problem_attention(p, torch.float64 if upcast else None, return_weights=True)
    out, lse = p.restore(out, lse)
    results = [out]
    if return_lse:
        results.append(lse)
    if return_weights:
        results.append(weights.reshape(*out.shape[:-1], p.seqlen_k))
    return results[0] if len(results) == 1 else tuple(results)


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor | None,
    max_q: int,
    max_k: int,
    *,
    return_aux=None,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    enable_gqa: bool = False,
    seqused_k: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    num_splits: int | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    return_weights: bool = False,
    upcast: bool = False,
):
    """:func:`fastattn.varlen_attention` computed literally: a loop over the sequences, each one
    :func:`attention`'s formula on its own rows (its keys gathered from the pages with a block
    table; dropout's batch index is the sequence's). Arguments as there (num_splits is checked and
    has no effect); upcast as in :func:`attention`.

    return_weights: also return a list of the N sequences' attention weights (Hq, L_n, S_n).
    Returns out, then lse (with return_aux.lse), then the weights, as a tuple when more than one.
    """
    from .interface import _wants_lse
    from .packed import canonicalize_varlen, check_packing_values

    p = canonicalize_varlen(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size,
        enable_gqa=enable_gqa, seqused_k=seqused_k, block_table=block_table, num_splits=num_splits,
        softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p, generator=generator,
    )  # fmt: skip
    want_lse = _wants_lse(return_aux)
    Hq, Ev = query.shape[1], value.shape[-1]
    pool_k = key.reshape(-1, *key.shape[-2:])
    pool_v = value.reshape(-1, *value.shape[-2:])
    outs, lses, weights = [], [], []
    for n, s in enumerate(check_packing_values(p)):
        if block_table is not None:
            pos = torch.arange(s.S, device=query.device)
            rows = block_table[n].long()[pos // p.packing.page_size] * p.packing.page_size + pos % p.packing.page_size
            k_n, v_n = pool_k[rows], pool_v[rows]
        else:
            k_n, v_n = key[s.k0 : s.k0 + s.S], value[s.k0 : s.k0 + s.S]
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[n]
        sp = canonicalize(
            query[s.q0 : s.q0 + s.L].transpose(0, 1), k_n.transpose(0, 1), v_n.transpose(0, 1),
            scale=scale, enable_gqa=enable_gqa, window_size=window_size, softcap=softcap, alibi_slopes=slopes,
        )  # fmt: skip
        features = dataclasses.replace(sp.features, dropout_p=p.features.dropout_p)
        sp = dataclasses.replace(sp, features=features, rng=p.rng, batch0=n)
        o, lse, w = problem_attention(sp, torch.float64 if upcast else None, return_weights=True)
        o, lse = sp.restore(o, lse)
        outs.append(o.transpose(0, 1))
        lses.append(lse.t())
        weights.append(w.reshape(o.shape[:-1] + (s.S,)))
    dtype = torch.float64 if upcast else query.dtype
    lse_dt = torch.float64 if upcast or query.dtype == torch.float64 else torch.float32
    out = torch.cat(outs) if outs else query.new_zeros(0, Hq, Ev, dtype=dtype)
    lse = torch.cat(lses) if lses else query.new_zeros(0, Hq, dtype=lse_dt)
    results = [out] + ([lse] if want_lse else []) + ([weights] if return_weights else [])
    return results[0] if len(results) == 1 else tuple(results)

"""The PyTorch backward: FlashAttention-2's recompute scheme in PyTorch ops, on any device.

From the saved lse, each (query block, key block) tile recomputes P = exp(S - lse) and adds its
share of dV = P^T dO, dS = P * (dO V^T - delta), dQ = dS K * scale, dK = dS^T Q * scale, where
delta = rowsum(dO * O) - dlse. With dropout (keep mask Z / (1 - p), regenerated from the saved
draw), dV = (P * Z)^T dO and dS = P * (Z * dO V^T - delta). Memory beyond inputs, outputs and gradients is the score tiles
(B * Hq * block_m * block_n) and O(L) row statistics: never an (L, S) matrix, except dmask itself
when a float mask asks for its gradient (then of the mask's own, broadcast, shape).
"""

from __future__ import annotations

import math

import torch

from .. import configs, dropout
from ..problem import Problem
from .forward import sdpa_cpu_reasons, sdpa_mask, sdpa_mask_rows, without_noop_causality
from .scores import grouped_alibi, grouped_mask, score_mods_, visible_keys, visible_rows


def _reduce_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum `t` over the dims where `shape` has size 1 (the mask's broadcast dims)."""
    dims = [d for d, n in enumerate(shape) if n == 1 and t.shape[d] != 1]
    return t.sum(dim=dims, keepdim=True) if dims else t


def _scores(p: Problem, qb, kb, mask5, alibi5, m0: int, m1: int, n0: int, n1: int, softcap_grad: bool = False):
    """Scaled, masked scores (B, Hkv, G * bm, bn) of query rows [m0, m1) and keys [n0, n1); with
    softcap_grad, (scores, d capped / d raw of the same shape, or None without a softcap)."""
    s = torch.matmul(qb, kb.transpose(-1, -2)).mul_(p.features.scale)
    tile = s.view(p.batch, p.heads_kv, p.group, m1 - m0, n1 - n0)
    seqlens = (p.seqlen_q, p.seqlen_k)
    out = score_mods_(tile, p.features, mask5, m0, m1, n0, n1, alibi=alibi5, seqlens=seqlens, softcap_grad=softcap_grad)
    if not softcap_grad:
        return s
    grad = out[1]
    return s, None if grad is None else grad.view(s.shape)


def _keep(p: Problem, m0: int, m1: int, n0: int, n1: int, dtype: torch.dtype) -> torch.Tensor:
    """The dropout keep mask (B, Hkv, G, m1 - m0, n1 - n0) of a whole-batch tile, 1 / 0 in `dtype`."""
    return dropout.grouped_keep(p, slice(0, p.batch), slice(0, p.heads_kv), m0, m1, n0, n1, dtype)


def _row_stats(p: Problem, q5, k, v, do5, mask5, alibi5, block_m: int, block_n: int):
    """Row statistics of the scores, computed exactly as the backward computes them.

    Returns (B, Hkv, G, L) tensors: the row max, 1 / sum of exp(S - max) (so P = exp(S - max) / sum),
    and delta = rowsum(dO * P V). Rows with no key get max = +inf, 1 / sum = 0 and delta = 0,
    which make P = 0 there rather than NaN.
    """
    B, Hkv, G, L, E = q5.shape
    Ev = v.shape[-1]
    row_max = torch.empty(B, Hkv, G, L, dtype=q5.dtype, device=p.device)
    inv_sum, delta = torch.empty_like(row_max), torch.empty_like(row_max)
    for m0 in range(0, L, block_m):
        m1 = min(m0 + block_m, L)
        rows = G * (m1 - m0)
        qb = q5[:, :, :, m0:m1].reshape(B, Hkv, rows, E)
        m_i = torch.full((B, Hkv, rows), -math.inf, dtype=q5.dtype, device=p.device)
        l_i = torch.zeros_like(m_i)
        acc = torch.zeros(B, Hkv, rows, Ev, dtype=q5.dtype, device=p.device)
        lo, hi = visible_keys(p.features, m0, m1, p.seqlen_k)
        for n0 in range(lo, hi, block_n):
            n1 = min(n0 + block_n, hi)
            s = _scores(p, qb, k[:, :, n0:n1], mask5, alibi5, m0, m1, n0, n1)
            m_new = torch.maximum(m_i, s.amax(dim=-1))
            m_safe = m_new.masked_fill(torch.isneginf(m_new), 0.0)
            alpha = (m_i - m_safe).exp_()
            s.sub_(m_safe[..., None]).exp_()
            l_i = l_i.mul_(alpha).add_(s.sum(dim=-1))
            if p.rng is not None:  # delta = rowsum(dO * O) of the dropped output O
                s.view(B, Hkv, G, m1 - m0, n1 - n0).mul_(_keep(p, m0, m1, n0, n1, s.dtype))
            acc.mul_(alpha[..., None]).add_(torch.matmul(s, v[:, :, n0:n1]))
            m_i = m_new
        dead = l_i == 0
        inv = l_i.reciprocal().masked_fill_(dead, 0.0)
        dob = do5[:, :, :, m0:m1].reshape(B, Hkv, rows, Ev)
        row_max[:, :, :, m0:m1] = m_i.masked_fill(dead, math.inf).view(B, Hkv, G, m1 - m0)
        inv_sum[:, :, :, m0:m1] = inv.view(B, Hkv, G, m1 - m0)
        if p.rng is not None:
            inv = inv * dropout.rescale(p.features.dropout_p)
        delta[:, :, :, m0:m1] = ((dob * acc).sum(-1) * inv).view(B, Hkv, G, m1 - m0)
    return row_max, inv_sum, delta


def tiled_attention_backward(
    p: Problem,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None = None,
    mask_grad: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    partial: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dq, dk, dv, dmask) of a canonical problem from its out (B, Hq, L, Ev) and lse (B, Hq, L).

    out and lse are accepted for the op's uniform signature; this path recomputes what it needs
    from them (see below), unless `partial`: then `p` holds part of the keys of a larger call
    whose out and lse these are (a block of a context-parallel ring, fastattn.distributed), and
    they are used as FlashAttention's backward uses them, P = exp(S - lse) and delta =
    rowsum(dO * out) - dlse, so the gradients are this part's share of the larger call's.

    dlse: the gradient flowing into lse (a loss that uses lse), or None. mask_grad: also return
    the gradient of the float mask, summed over its broadcast dims (else dmask is None). Rows with
    no key to attend to (lse = -inf) get zero gradients. Query heads that share a KV head are
    stacked into one matrix product, so dK and dV sum over the group without repeating K or V.
    The block sizes default to ``fastattn.configs.CPU_BACKWARD_TILES``.
    """
    block_m = block_m or configs.CPU_BACKWARD_TILES.block_m
    block_n = block_n or configs.CPU_BACKWARD_TILES.block_n
    B, Hq, L, E = p.q.shape
    Hkv, S, Ev, G = p.heads_kv, p.seqlen_k, p.head_dim_v, p.group
    cdt = torch.float64 if p.dtype == torch.float64 else torch.float32
    scale = p.features.scale
    q5 = p.q.reshape(B, Hkv, G, L, E).to(cdt)
    do5 = dout.reshape(B, Hkv, G, L, Ev).to(cdt)
    k, v = p.k.to(cdt), p.v.to(cdt)
    mask5 = grouped_mask(p)
    alibi5 = grouped_alibi(p)
    # The row statistics and delta = rowsum(dO * O) are recomputed here (one more pass, like a
    # forward) rather than taken from the forward's lse and out: the forward may come from SDPA's
    # CPU kernel or the log2-unit tiled path, whose scores round differently, and lse ~ 1e3 in
    # float32 carries an absolute error of ~6e-5 by itself. With large logits in float32 these
    # made the gradients up to 25x less accurate than PyTorch's own (measured); with P and delta
    # from the same scores, the rows of dS sum to zero as softmax's backward needs. The saved
    # out and lse are not needed.
    if partial:  # P = exp(S - lse) of the larger call; rows with no key there: +inf makes P = 0
        lse5 = lse.reshape(B, Hkv, G, L).to(cdt)
        row_max = lse5.masked_fill(torch.isneginf(lse5), math.inf)
        inv_sum = torch.ones_like(row_max)
        delta5 = (do5 * out.reshape(B, Hkv, G, L, Ev).to(cdt)).sum(-1)
    else:
        row_max, inv_sum, delta5 = _row_stats(p, q5, k, v, do5, mask5, alibi5, block_m, block_n)
    if dlse is not None:
        delta5 = delta5 - dlse.reshape(B, Hkv, G, L).to(cdt)
    dmask = torch.zeros(p.mask.shape, dtype=cdt, device=p.device) if mask_grad else None

    dq = torch.zeros(B, Hkv, G, L, E, dtype=cdt, device=p.device)
    dk = torch.empty(B, Hkv, S, E, dtype=cdt, device=p.device)
    dv = torch.empty(B, Hkv, S, Ev, dtype=cdt, device=p.device)
    for n0 in range(0, S, block_n):
        n1 = min(n0 + block_n, S)
        bn = n1 - n0
        kb, vb = k[:, :, n0:n1], v[:, :, n0:n1]
        dk_acc = torch.zeros(B, Hkv, bn, E, dtype=cdt, device=p.device)
        dv_acc = torch.zeros(B, Hkv, bn, Ev, dtype=cdt, device=p.device)
        # Query rows that see none of this block's keys (above its causal diagonal, below its
        # window) are skipped.
        first_row, last_row = visible_rows(p.features, n0, n1, L)
        for m0 in range(first_row - first_row % block_m, last_row, block_m):
            m1 = min(m0 + block_m, L)
            bm = m1 - m0
            qb = q5[:, :, :, m0:m1].reshape(B, Hkv, G * bm, E)
            dob = do5[:, :, :, m0:m1].reshape(B, Hkv, G * bm, Ev)
            s, cap_grad = _scores(p, qb, kb, mask5, alibi5, m0, m1, n0, n1, softcap_grad=True)
            prob = s.sub_(row_max[:, :, :, m0:m1].reshape(B, Hkv, G * bm, 1)).exp_()
            prob.mul_(inv_sum[:, :, :, m0:m1].reshape(B, Hkv, G * bm, 1))
            ds = torch.matmul(dob, vb.transpose(-1, -2))
            if p.rng is not None:  # P_d = P * Z, Z = keep / (1 - p): dV = P_d^T dO, dP = Z * dO V^T
                z = _keep(p, m0, m1, n0, n1, prob.dtype).reshape(prob.shape)
                z.mul_(dropout.rescale(p.features.dropout_p))
                dv_acc.add_(torch.matmul((prob * z).transpose(-1, -2), dob))
                ds.mul_(z)
            else:
                dv_acc.add_(torch.matmul(prob.transpose(-1, -2), dob))
            ds.sub_(delta5[:, :, :, m0:m1].reshape(B, Hkv, G * bm, 1)).mul_(prob)
            if dmask is not None:  # the mask is added after the softcap: its gradient is dS itself
                ds_h = ds.view(B, Hq, bm, bn)
                rows_sel = slice(m0, m1) if dmask.shape[2] > 1 else slice(None)
                cols_sel = slice(n0, n1) if dmask.shape[3] > 1 else slice(None)
                dmask[:, :, rows_sel, cols_sel] += _reduce_to(ds_h, dmask.shape)
            if cap_grad is not None:  # the chain rule through c * tanh(s / c)
                ds.mul_(cap_grad)
            dq[:, :, :, m0:m1] += torch.matmul(ds, kb).view(B, Hkv, G, bm, E)
            dk_acc.add_(torch.matmul(ds.transpose(-1, -2), qb))
        dk[:, :, n0:n1] = dk_acc.mul_(scale)
        dv[:, :, n0:n1] = dv_acc
    dq.mul_(scale)
    grads = dq.view(B, Hq, L, E).to(p.dtype), dk.to(p.dtype), dv.to(p.dtype)
    return (*grads, dmask.to(p.mask.dtype) if dmask is not None else None)


SDPA_BACKWARD_OP = "_scaled_dot_product_flash_attention_for_cpu_backward"


def sdpa_backward_reasons(p: Problem, dlse: torch.Tensor | None, mask_grad: bool) -> list[str]:
    """Why SDPA's CPU backward op cannot differentiate `p` (empty when it can). It can where SDPA's
    CPU kernel served the forward (:func:`fastattn.eager.forward.sdpa_cpu_reasons`, after
    without_noop_causality, as cpu_fallback_attention decides), taking that forward's own out and
    lse, so their rounding is consistent; it has no input for a gradient of lse and gives none for
    the mask."""
    reasons = list(sdpa_cpu_reasons(without_noop_causality(p)))
    if not hasattr(torch.ops.aten, SDPA_BACKWARD_OP):
        reasons.append("this torch has no CPU flash-attention backward op")
    if mask_grad:
        reasons.append("a float mask's gradient (the op gives none)")
    if dlse is not None and bool(dlse.ne(0).any()):
        reasons.append("a loss that uses lse (the op takes no gradient of lse)")
    if sdpa_mask_rows(p) < p.seqlen_q:
        reasons.append("a bool mask the forward converted in row blocks (too large to convert whole)")
    return reasons


def sdpa_cpu_backward(p: Problem, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor):
    """(dq, dk, dv) by SDPA's CPU backward op, from the out and lse SDPA's kernel gave the forward
    (call it where :func:`sdpa_backward_reasons` is empty). Rows with no key carry lse = -inf in
    fastattn; the op needs +inf there (P = exp(s - lse) = 0), -inf would give NaN gradients."""
    p = without_noop_causality(p)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (p.q, p.k, p.v))
    lse = lse.masked_fill(torch.isneginf(lse), math.inf).contiguous()
    return getattr(torch.ops.aten, SDPA_BACKWARD_OP)(
        dout.contiguous(), q, k, v, out.contiguous(), lse, 0.0, p.features.causal_offset is not None,
        attn_mask=sdpa_mask(p, p.mask), scale=p.features.scale,
    )  # fmt: skip


def cpu_attention_backward(
    p: Problem,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse=None,
    mask_grad: bool = False,
    partial: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The "cpu" backend's backward: SDPA's own CPU backward op where SDPA's kernel served the
    forward and the op can differentiate the call (:func:`sdpa_backward_reasons`), else
    :func:`tiled_attention_backward`. (dq, dk, dv, dmask or None). partial: out and lse are those
    of a larger call whose keys `p` holds a part of (see tiled_attention_backward); SDPA's op takes
    them as they are."""
    if not sdpa_backward_reasons(p, dlse, mask_grad):
        return (*sdpa_cpu_backward(p, out, lse, dout), None)
    return tiled_attention_backward(p, out, lse, dout, dlse, mask_grad=mask_grad, partial=partial)

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
from .forward import (
    _sdpa_part,
    kv_blocks,
    sdpa_cpu_reasons,
    sdpa_mask,
    sdpa_mask_rows,
    sdpa_parts,
    tiled_attention,
    without_noop_causality,
)
from .scores import exp_diff_, grouped_alibi, grouped_mask, scaled_queries, score_mods_, visible_rows


def _reduce_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum `t` over the dims where `shape` has size 1 (the mask's broadcast dims)."""
    dims = [d for d, n in enumerate(shape) if n == 1 and t.shape[d] != 1]
    return t.sum(dim=dims, keepdim=True) if dims else t


def _keep(p: Problem, m0: int, m1: int, n0: int, n1: int, dtype: torch.dtype) -> torch.Tensor:
    """The dropout keep mask (B, Hkv, G, m1 - m0, n1 - n0) of a whole-batch tile, 1 / 0 in `dtype`."""
    return dropout.grouped_keep(p, slice(0, p.batch), slice(0, p.heads_kv), m0, m1, n0, n1, dtype)


def _rows(t: torch.Tensor, m0: int, m1: int) -> torch.Tensor:
    """Rows [m0, m1) of a (B, Hkv, G, L, ...) tensor as (B * Hkv, G * (m1 - m0), ...): a view when
    G == 1, else a copy (the group's rows are not adjacent)."""
    B, Hkv, G = t.shape[:3]
    return t[:, :, :, m0:m1].reshape(B * Hkv, G * (m1 - m0), *t.shape[4:])


def tiled_attention_backward(
    p: Problem,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None = None,
    mask_grad: bool = False,
    stats: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dq, dk, dv, dmask) of a canonical problem from its out (B, Hq, L, Ev) and lse (B, Hq, L).

    FlashAttention-2's backward in one pass over the tiles: each recomputes the scores as the
    tiled forward computes them (:func:`fastattn.eager.scores.scaled_queries`, the score step) and
    P from the forward's row statistics; delta = rowsum(dO * out) - dlse comes from the saved out.
    stats: the tiled forward's (2, B, Hq, L) row max m and log-sum log l
    (``tiled_attention(return_stats=True)``): P = exp(S - m) / l, with 1 / l folded into dO and
    delta. Without them P = exp(S - lse): for SDPA's kernel's out and lse, and for a larger call
    whose keys `p` holds a part of (a block of a context-parallel ring, fastattn.distributed),
    whose gradients are then this part's share of the larger call's. The row statistics keep
    the large lse (~1e3 with large logits) out of the exponent: in float32 its rounding alone
    (~6e-5) made dV up to 25x less accurate than the float32 reference's (measured).

    dlse: the gradient flowing into lse (a loss that uses lse), or None. mask_grad: also return
    the gradient of the float mask, summed over its broadcast dims (else dmask is None). Rows with
    no key to attend to (lse = -inf) get zero gradients. Query heads that share a KV head are
    stacked into one matrix product, so dK and dV sum over the group without repeating K or V.
    The computation is in float32 (float64 for float64 inputs); bf16 / fp16 queries and output
    gradients are converted once, whole (O(L) memory, like the float32 dQ), keys and values a key
    block at a time, and dK and dV are written a key block at a time in the inputs' dtype. The block sizes default to
    ``fastattn.configs.CPU_BACKWARD_TILES``.
    """
    block_m = block_m or configs.CPU_BACKWARD_TILES.block_m
    block_n = block_n or configs.CPU_BACKWARD_TILES.block_n
    B, Hq, L, E = p.q.shape
    Hkv, S, Ev, G = p.heads_kv, p.seqlen_k, p.head_dim_v, p.group
    BH = B * Hkv
    cdt = torch.float64 if p.dtype == torch.float64 else torch.float32
    scale = p.features.scale
    dev = p.device
    q5 = scaled_queries(p.q.reshape(B, Hkv, G, L, E), scale, cdt)  # scale * Q, as the forward's
    do5 = dout.reshape(B, Hkv, G, L, Ev).to(cdt)
    lse5 = lse.reshape(B, Hkv, G, L, 1).to(cdt)
    dead = torch.isneginf(lse5)
    delta5 = (do5 * out.reshape(B, Hkv, G, L, Ev).to(cdt)).sum(-1, keepdim=True)
    if dlse is not None:
        delta5 = delta5.sub_(dlse.reshape(B, Hkv, G, L, 1).to(cdt))
    # P = exp(S - base) * inv: rows with no key take base = +inf, which makes P = 0 there.
    if stats is None:
        base = lse5.masked_fill(dead, math.inf)
    else:
        base = stats[0].reshape(B, Hkv, G, L, 1).to(cdt).masked_fill(dead, math.inf)
        inv = torch.exp(-stats[1].reshape(B, Hkv, G, L, 1).to(cdt)).masked_fill_(dead, 0.0)
        do5, delta5 = do5 * inv, delta5.mul_(inv)  # P^T dO = exp(S - m)^T (dO / l), likewise dS
    mask5 = grouped_mask(p)
    alibi5 = grouped_alibi(p)
    dmask = torch.zeros(p.mask.shape, dtype=cdt, device=dev) if mask_grad else None
    seqlens = (L, S)

    dq = torch.zeros(B, Hkv, G, L, E, dtype=cdt, device=dev)
    dk = torch.empty(BH, S, E, dtype=p.dtype, device=dev)  # each key block's share, written once
    dv = torch.empty(BH, S, Ev, dtype=p.dtype, device=dev)
    # Buffers reused by every tile (fresh tensors per tile cost page faults in the allocator); K
    # and V are converted a key block at a time (kv_blocks), each block once.
    tile_rows, tile_cols = G * min(block_m, L), min(block_n, S)
    s_buffer, ds_buffer = (torch.empty(BH * tile_rows * tile_cols, dtype=cdt, device=dev) for _ in range(2))
    dq_buffer = torch.empty(BH * tile_rows * E, dtype=cdt, device=dev)
    everything = slice(0, None)
    k_blocks = kv_blocks(p.k, everything, everything, cdt, torch.empty(BH * tile_cols * E, dtype=cdt, device=dev))
    v_blocks = kv_blocks(p.v, everything, everything, cdt, torch.empty(BH * tile_cols * Ev, dtype=cdt, device=dev))
    dk_buffer = torch.empty(BH * tile_cols * E, dtype=cdt, device=dev)
    dv_buffer = torch.empty(BH * tile_cols * Ev, dtype=cdt, device=dev)
    for n0 in range(0, S, block_n):
        n1 = min(n0 + block_n, S)
        bn = n1 - n0
        kb, vb = k_blocks(n0, n1), v_blocks(n0, n1)
        dk_acc = dk_buffer[: BH * bn * E].view(BH, bn, E).zero_()
        dv_acc = dv_buffer[: BH * bn * Ev].view(BH, bn, Ev).zero_()
        # Query rows that see none of this block's keys (above its causal diagonal, below its
        # window) are skipped.
        first_row, last_row = visible_rows(p.features, n0, n1, L)
        for m0 in range(first_row - first_row % block_m, last_row, block_m):
            m1 = min(m0 + block_m, L)
            bm = m1 - m0
            qb, dob = _rows(q5, m0, m1), _rows(do5, m0, m1)
            s = torch.bmm(qb, kb.transpose(1, 2), out=s_buffer[: BH * G * bm * bn].view(BH, G * bm, bn))
            _, cap_grad = score_mods_(
                s.view(B, Hkv, G, bm, bn), p.features, mask5, m0, m1, n0, n1,
                alibi=alibi5, seqlens=seqlens, softcap_grad=True, cache_band=True,
            )  # fmt: skip
            prob = exp_diff_(s, _rows(base, m0, m1))
            ds = torch.bmm(dob, vb.transpose(1, 2), out=ds_buffer[: s.numel()].view(s.shape))  # dP = dO V^T
            if p.rng is not None:  # P_d = P * Z, Z = keep / (1 - p): dV = P_d^T dO, dP = Z * dO V^T
                z = _keep(p, m0, m1, n0, n1, prob.dtype).reshape(prob.shape)
                z.mul_(dropout.rescale(p.features.dropout_p))
                dv_acc.baddbmm_((prob * z).transpose(1, 2), dob)
                ds.mul_(z)
            else:
                dv_acc.baddbmm_(prob.transpose(1, 2), dob)
            ds.sub_(_rows(delta5, m0, m1)).mul_(prob)  # dS = P * (dP - delta)
            if dmask is not None:  # the mask is added after the softcap: its gradient is dS itself
                ds_h = ds.view(B, Hq, bm, bn)
                rows_sel = slice(m0, m1) if dmask.shape[2] > 1 else slice(None)
                cols_sel = slice(n0, n1) if dmask.shape[3] > 1 else slice(None)
                dmask[:, :, rows_sel, cols_sel] += _reduce_to(ds_h, dmask.shape)
            if cap_grad is not None:  # the chain rule through c * tanh(s / c)
                ds.mul_(cap_grad.view(ds.shape))
            dq_tile = torch.bmm(ds, kb, out=dq_buffer[: BH * G * bm * E].view(BH, G * bm, E))
            dq[:, :, :, m0:m1] += dq_tile.view(B, Hkv, G, bm, E)
            dk_acc.baddbmm_(ds.transpose(1, 2), qb)  # dK = dS^T (scale * Q)
        dk[:, n0:n1] = dk_acc
        dv[:, n0:n1] = dv_acc
    dq.mul_(scale)
    grads = dq.view(B, Hq, L, E).to(p.dtype), dk.view(B, Hkv, S, E), dv.view(B, Hkv, S, Ev)
    return (*grads, dmask.to(p.mask.dtype) if dmask is not None else None)


SDPA_BACKWARD_OP = "_scaled_dot_product_flash_attention_for_cpu_backward"


def sdpa_backward_reasons(p: Problem, dlse: torch.Tensor | None, mask_grad: bool) -> list[str]:
    """Why SDPA's CPU backward op cannot differentiate `p` (empty when it can). It can where SDPA's
    CPU kernel served the forward (:func:`fastattn.eager.forward.sdpa_cpu_reasons`, after
    without_noop_causality, as cpu_fallback_attention decides), taking that forward's own out and
    lse, so their rounding is consistent, and its gradients are those of torch's own SDPA (on some
    CPUs less accurate than the float32 reference: ``fastattn.configs.CPU_SDPA_BACKWARD``); it has
    no input for a gradient of lse and gives none for the mask."""
    reasons = list(sdpa_cpu_reasons(without_noop_causality(p)))
    if not configs.CPU_SDPA_BACKWARD:
        reasons.append("fastattn.configs.CPU_SDPA_BACKWARD is off (fastattn's own backward asked for)")
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
    (call it where :func:`sdpa_backward_reasons` is empty), one op call per call of the forward
    (:func:`fastattn.eager.forward.sdpa_parts`): each part takes the whole call's out and lse, so
    its gradients are its keys' share (P = exp(S - lse), delta = rowsum(dO * out)); dQ sums them."""
    p = without_noop_causality(p)
    parts = sdpa_parts(p)
    if len(parts) == 1 and parts[0][0].start == 0:
        return _sdpa_backward_call(p, out, lse, dout)
    acc = torch.float64 if p.dtype == torch.float64 else torch.float32
    dq = torch.zeros(p.q.shape, dtype=acc, device=p.device)
    dk = torch.zeros(p.k.shape, dtype=acc, device=p.device)
    dv = torch.zeros(p.v.shape, dtype=acc, device=p.device)
    for rows, keys, causal in parts:
        part = _sdpa_part(p, rows, keys, causal)
        gq, gk, gv = _sdpa_backward_call(part, out[:, :, rows], lse[:, :, rows], dout[:, :, rows])
        dq[:, :, rows] += gq
        dk[:, :, keys] += gk
        dv[:, :, keys] += gv
    return dq.to(p.dtype), dk.to(p.dtype), dv.to(p.dtype)


def _sdpa_backward_call(p: Problem, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor):
    """One call of SDPA's CPU backward op. Rows with no key carry lse = -inf in fastattn; the op
    needs +inf there (P = exp(s - lse) = 0), -inf would give NaN gradients."""
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
    stats: torch.Tensor | None = None,
    partial: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The "cpu" backend's backward: SDPA's own CPU backward op where SDPA's kernel served the
    forward and the op can differentiate the call (:func:`sdpa_backward_reasons`), else
    :func:`tiled_attention_backward`. (dq, dk, dv, dmask or None). stats: the tiled forward's row
    statistics (None where SDPA's kernel served the forward: then recomputed for the tiled
    backward). partial: out and lse are those of a larger call whose keys `p` holds a part of;
    both backwards take them as they are (P = exp(S - lse), delta = rowsum(dO * out))."""
    if not sdpa_backward_reasons(p, dlse, mask_grad):
        return (*sdpa_cpu_backward(p, out, lse, dout), None)
    if stats is None and not partial:
        # SDPA's kernel served the forward (the loss uses lse, or a float mask wants its gradient):
        # its lse alone, ~1e3 with large logits, carries a float32 rounding that made dQ up to 3.6x
        # less accurate than the float32 reference's (measured); the tiled forward's row
        # statistics, recomputed, keep it out of the exponent (at the cost of one forward).
        stats = tiled_attention(p, return_stats=True)[2]
    return tiled_attention_backward(p, out, lse, dout, dlse, mask_grad=mask_grad, stats=stats)

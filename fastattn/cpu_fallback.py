"""The PyTorch fallback: the same semantics as the kernel, with O(L) extra memory.

Where SDPA's own CPU kernel can express the call (no bottom-right causal, E == Ev, not causal and
masked at once) it is used directly, through the aten op that also returns the logsumexp. Every
other call takes :func:`tiled_attention`, the FlashAttention algorithm written with PyTorch ops:
query blocks of `block_m` rows meet key/value blocks of `block_n` positions, with a running max
and sum, so no (L, S) matrix is ever allocated.
"""

from __future__ import annotations

import math

import torch

from .inputs import Problem, lse_dtype

DEFAULT_BLOCK_M = 256
DEFAULT_BLOCK_N = 512


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
    if p.causal_offset not in (None, 0):
        reasons.append("bottom-right causal alignment with L != S")
    if p.causal_offset is not None and p.mask is not None:
        reasons.append("causal and a mask together")
    return reasons


def _sdpa_cpu(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    mask = p.mask
    if mask is not None and mask.dtype == torch.bool:
        # The op takes additive masks only; converted at the mask's own (broadcast) size.
        mask = torch.zeros(mask.shape, dtype=p.dtype).masked_fill_(~mask, float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        p.q, p.k, p.v, 0.0, p.causal_offset is not None, attn_mask=mask, scale=p.scale
    )
    lse = lse.to(lse_dtype(p.dtype))
    if p.mask is not None:
        # The op returns out = 0 but lse = 0 for rows with no key; fastattn promises lse = -inf.
        dead = ~_mask_keep(p.mask).any(dim=-1)
        if dead.any():
            dead = dead.expand(p.batch, p.heads_q, p.seqlen_q)
            lse = lse.masked_fill(dead, float("-inf"))
            out = out.masked_fill(dead[..., None], 0.0)
    return out, lse


def tiled_attention(
    p: Problem, block_m: int = DEFAULT_BLOCK_M, block_n: int = DEFAULT_BLOCK_N
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention's online softmax in PyTorch ops; works on any device.

    Extra memory is O(B * Hq * block_m * block_n) for the score tile plus O(B * Hq * L * Ev) for
    the output: never an (L, S) matrix. Query heads that share a KV head are stacked into one
    matrix product, so K and V are not repeated.
    """
    B, Hq, L, E = p.q.shape
    Hkv, S, Ev, G = p.heads_kv, p.seqlen_k, p.head_dim_v, p.group
    cdt = _compute_dtype(p.dtype)
    off = p.causal_offset
    out = torch.empty(B, Hkv, G, L, Ev, dtype=p.dtype, device=p.device)
    lse = torch.empty(B, Hkv, G, L, dtype=cdt, device=p.device)
    q5 = p.q.reshape(B, Hkv, G, L, E)
    mask5 = None
    if p.mask is not None:
        Bm, Hm, Lm, Sm = p.mask.shape
        mask5 = p.mask.reshape(Bm, Hkv, G, Lm, Sm) if Hm == Hq else p.mask.reshape(Bm, 1, 1, Lm, Sm)
    for m0 in range(0, L, block_m):
        m1 = min(m0 + block_m, L)
        bm = m1 - m0
        # Keys past the causal diagonal of this block's last row are never visited.
        hi = S if off is None else max(0, min(S, m1 + off))
        qb = (q5[:, :, :, m0:m1].to(cdt) * p.scale).reshape(B, Hkv, G * bm, E)
        acc = torch.zeros(B, Hkv, G * bm, Ev, dtype=cdt, device=p.device)
        m_i = torch.full((B, Hkv, G * bm), -math.inf, dtype=cdt, device=p.device)
        l_i = torch.zeros(B, Hkv, G * bm, dtype=cdt, device=p.device)
        rows = torch.arange(m0, m1, device=p.device)[:, None]
        mask_rows = slice(m0, m1) if mask5 is not None and mask5.shape[3] > 1 else slice(None)
        for n0 in range(0, hi, block_n):
            n1 = min(n0 + block_n, hi)
            kb = p.k[:, :, n0:n1].to(cdt)
            s = torch.matmul(qb, kb.transpose(-1, -2))  # (B, Hkv, G*bm, bn)
            s5 = s.view(B, Hkv, G, bm, n1 - n0)
            if mask5 is not None:
                mb = mask5[..., mask_rows, n0:n1] if mask5.shape[4] > 1 else mask5[..., mask_rows, :]
                if mb.dtype == torch.bool:
                    s5.masked_fill_(~mb, -math.inf)
                else:
                    s5.add_(mb)
            if off is not None and n1 - 1 > m0 + off:  # the block crosses the diagonal
                cols = torch.arange(n0, n1, device=p.device)[None, :]
                s5.masked_fill_(cols > rows + off, -math.inf)
            m_new = torch.maximum(m_i, s.amax(dim=-1))
            # Guard (-inf) - (-inf) for rows that have seen no key yet.
            m_safe = m_new.masked_fill(torch.isneginf(m_new), 0.0)
            s.sub_(m_safe[..., None]).exp_()
            alpha = (m_i - m_safe).exp_()
            l_i.mul_(alpha).add_(s.sum(dim=-1))
            acc.mul_(alpha[..., None]).add_(torch.matmul(s, p.v[:, :, n0:n1].to(cdt)))
            m_i = m_new
        dead = l_i == 0
        acc.div_(l_i.masked_fill(dead, 1.0)[..., None])
        out[:, :, :, m0:m1] = acc.view(B, Hkv, G, bm, Ev)
        lse[:, :, :, m0:m1] = (m_i + l_i.log()).masked_fill_(dead, -math.inf).view(B, Hkv, G, bm)
    return out.view(B, Hq, L, Ev), lse.view(B, Hq, L).to(lse_dtype(p.dtype))


def cpu_fallback_attention(p: Problem, return_lse: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Hq, L, Ev), lse (B, Hq, L)) of a canonical problem, by SDPA's CPU kernel or tiles."""
    if not sdpa_cpu_reasons(p):
        return _sdpa_cpu(p)
    return tiled_attention(p)

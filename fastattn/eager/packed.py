"""Packed calls on the PyTorch paths: one dense call per run of equal-length sequences.

A run (``fastattn.packed.runs``) of consecutive sequences with equal lengths is a batch of views
of the packed tensors, so a decode batch whose caches have one length is one call of the dense
CPU path (SDPA's CPU kernel where it expresses the call), and a packed training batch costs one
call per run: nothing is padded to max_q x max_k. Extra memory is that of the dense path for one
run, plus a run's gathered keys and values with a paged cache.
"""

from __future__ import annotations

import torch

from ..packed import rows_of, run_problem, runs, sequences
from ..problem import Problem, empty_result, lse_dtype


def packed_attention(p: Problem, dense) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (1, Hq, T_q, Ev) in the packed layout, lse (1, Hq, T_q)) of a packed problem whose index
    tensors were checked (packed.check_packing_values), each run computed by `dense` (a dense
    problem -> (out, lse); the CPU path or the reference)."""
    out = p.new_out()
    lse = torch.empty(1, p.heads_q, p.seqlen_q, dtype=lse_dtype(p.dtype), device=p.device)
    for r in runs(p, sequences(p)):
        if r.L == 0:
            continue
        rp = run_problem(p, r)
        o, l = empty_result(rp) or dense(rp)
        rows_of(out, r.q0, r.count, r.L).copy_(o)
        rows_of(lse[..., None], r.q0, r.count, r.L)[..., 0].copy_(l)
    return out, lse


def packed_attention_backward(p: Problem, out, lse, dout, dlse, dense_backward):
    """(dq, dk, dv) of a packed problem (no seqused_k or block_table: inference only), in the
    packed layout; each run by `dense_backward` (p, out, lse, dout, dlse) -> (dq, dk, dv, _)."""
    dq = torch.zeros_like(p.new_out(p.head_dim))
    dk = torch.zeros(p.seqlen_k, p.heads_kv, p.head_dim, dtype=p.dtype, device=p.device).permute(1, 0, 2)[None]
    dv = torch.zeros(p.seqlen_k, p.heads_kv, p.head_dim_v, dtype=p.dtype, device=p.device).permute(1, 0, 2)[None]
    for r in runs(p, sequences(p)):
        if r.L == 0 or r.S == 0:
            continue
        rp = run_problem(p, r)
        rows = (r.q0, r.count, r.L)
        lse_r = rows_of(lse[..., None], *rows)[..., 0]
        dlse_r = None if dlse is None else rows_of(dlse[..., None], *rows)[..., 0]
        grads = dense_backward(rp, rows_of(out, *rows), lse_r, rows_of(dout, *rows), dlse_r)
        rows_of(dq, *rows).copy_(grads[0])
        rows_of(dk, r.k0, r.count, r.slot, r.S).copy_(grads[1])
        rows_of(dv, r.k0, r.count, r.slot, r.S).copy_(grads[2])
    return dq, dk, dv

"""Merging partial attention results exactly, in PyTorch: the split-KV combine's formula.

Attention over keys split into disjoint parts (split-KV decoding, the blocks of a context-parallel
ring) is recovered from each part's (out_s, lse_s):

    lse = log sum_s exp(lse_s),   out = sum_s exp(lse_s - lse) out_s

``fused/kernels/decode.py``'s split_kv_combine_kernel computes the same on the GPU for the forward's
splits; :func:`merge_` is its PyTorch twin, folding one part at a time into a running result (the
ring's steps arrive one by one). Both are checked against the attention over all keys
(tests/test_varlen.py for the kernel's split factors, tests/test_distributed.py here).
"""

from __future__ import annotations

import math

import torch


def merge_(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor) -> None:
    """Fold the partial result (part_out (..., L, Ev), part_lse (..., L)) into the running (out,
    lse) of the same rows, in place: afterwards they are the attention over both parts' keys.

    out and lse hold the accumulator dtype (float32, or float64); part_out may be of the input
    dtype (it is upcast). A part whose row saw no key (lse = -inf) weighs 0; a row no part saw
    stays out = 0, lse = -inf (start from zeros and -inf). A NaN row stays NaN."""
    new = torch.logaddexp(lse, part_lse.to(lse.dtype))
    safe = new.masked_fill(torch.isneginf(new), 0.0)  # (-inf) - (-inf): both weights are 0 there
    out.mul_((lse - safe).exp_().unsqueeze(-1))
    out.add_(part_out.to(out.dtype) * (part_lse.to(lse.dtype) - safe).exp_().unsqueeze(-1))
    lse.copy_(new)


def merge(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the attention over every part's keys from the parts' (out_s, lse_s), merged in
    list order; out in the accumulator dtype of lse (float32 for low-precision parts)."""
    acc_dtype = torch.float64 if lses[0].dtype == torch.float64 else torch.float32
    out = torch.zeros(outs[0].shape, dtype=acc_dtype, device=outs[0].device)
    lse = torch.full(lses[0].shape, -math.inf, dtype=acc_dtype, device=lses[0].device)
    for part_out, part_lse in zip(outs, lses):
        merge_(out, lse, part_out, part_lse)
    return out, lse

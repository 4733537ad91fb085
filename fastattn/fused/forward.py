"""Host side of the Triton forward: outputs, config, mask block lists, strides, grid, launch."""

from __future__ import annotations

import contextlib
import math
import struct

import torch

from .configs import ForwardConfig, forward_config, padded_head_dim
from ..problem import Problem, lse_dtype
from .kernels import forward as forward_kernels
from .kernels import interpreted

# CUDA limits grid dims y and z to 65535; the batch axis is launched in chunks of at most this.
MAX_GRID_YZ = 65535

BLOCK_DEAD, BLOCK_CUT, BLOCK_FULL = 0, 1, 2


def _broadcast_strides(t: torch.Tensor) -> tuple[int, ...]:
    """Strides with 0 for size-1 dims, so one index formula serves broadcast and full dims."""
    return tuple(0 if size == 1 else stride for size, stride in zip(t.shape, t.stride()))


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def causal_block_classes(L: int, S: int, block_m: int, block_n: int, offset: int, device) -> torch.Tensor:
    """(cdiv(L, block_m), cdiv(S, block_n)) int8: which tiles causality removes, cuts or keeps whole."""
    m0 = torch.arange(0, L, block_m, device=device)[:, None]
    n0 = torch.arange(0, S, block_n, device=device)[None, :]
    last_row = torch.clamp(m0 + block_m, max=L) - 1
    dead = n0 > last_row + offset
    full = n0 + block_n - 1 <= m0 + offset
    cls = torch.full(dead.shape, BLOCK_CUT, dtype=torch.int8, device=device)
    return cls.masked_fill_(full, BLOCK_FULL).masked_fill_(dead, BLOCK_DEAD)


def mask_block_lists(
    mask: torch.Tensor, L: int, S: int, block_m: int, block_n: int, causal_offset: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (b, h, query block) lists of the key blocks a masked problem must visit.

    mask: (Bm, Hm, Lm, Sm), each dim 1 or full. Returns counts (Bc, Hc, Mc, 2) int32 (blocks
    needing no masking, blocks needing it) and index (Bc, Hc, Mc, cdiv(S, block_n)) int32 holding
    the first kind, then the second; blocks that the mask and causality remove are left out.
    A float mask always needs loading; only blocks that are -inf throughout are left out.
    """
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
    else:
        cls = any_keep.to(torch.int8)
    if S % block_n:
        cls[..., -1].clamp_(max=BLOCK_CUT)
    if causal_offset is not None:
        causal = causal_block_classes(L, S, block_m, block_n, causal_offset, mask.device)
        cls = torch.minimum(cls, causal)  # broadcasts (.., 1 or M, N) against (M, N)
    order = torch.argsort(-cls.to(torch.int16), dim=-1, stable=True).to(torch.int32)
    counts = torch.stack(((cls == BLOCK_FULL).sum(-1), (cls == BLOCK_CUT).sum(-1)), dim=-1).to(torch.int32)
    return counts.contiguous(), order.contiguous()


def _large_offsets(p: Problem, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> bool:
    """Can a key-block offset start_n * stride pass 2**31 (then the kernel computes it in 64 bits)?"""
    spans = (p.seqlen_k * abs(k.stride(2)), p.seqlen_k * abs(v.stride(2)), p.seqlen_k * abs(mask.stride(3)))
    return max(spans) >= 2**31


def _input_precision(p: Problem, interpret: bool) -> str:
    if p.dtype == torch.float32 and not interpret:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "ieee" if interpret else "tf32"  # ignored for 16-bit operands (float64 runs only interpreted)


def split_scale(x: float) -> tuple[float, float]:
    """(hi, lo) float32 values with hi + lo = x to ~48 bits: kernel float arguments are float32, and
    the float64 kernels multiply by both halves (narrower ones use hi)."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    lo = struct.unpack("f", struct.pack("f", x - hi))[0]
    return hi, lo


def triton_attention_forward(p: Problem, config: ForwardConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the fused forward kernel: (out (B, Hq, L, Ev) in the input dtype, lse (B, Hq, L) float32,
    float64 for float64 inputs).

    The kernel is compiled for the GPU, or run by Triton's interpreter when the process has it on
    (TRITON_INTERPRET=1; the only way CPU tensors can run it).
    """
    interpret = interpreted()
    B, Hq, L, E = p.q.shape
    S, Ev = p.seqlen_k, p.head_dim_v
    head_dim, head_dim_v = padded_head_dim(E), padded_head_dim(Ev)
    if config is None:
        capability = None if p.device.type != "cuda" else torch.cuda.get_device_capability(p.device)
        config = forward_config(head_dim, head_dim_v, p.dtype, capability, masked=p.mask is not None)
    q, k, v = (_last_dim_contiguous(t) for t in (p.q, p.k, p.v))
    out = torch.empty(B, Hq, L, Ev, dtype=p.dtype, device=p.device)
    lse = torch.empty(B, Hq, L, dtype=lse_dtype(p.dtype), device=p.device)

    if p.mask is None:
        mask_kind = 0
        mask = counts = index = torch.empty(1, 1, 1, 1, dtype=torch.int32, device=p.device)
    else:
        mask_kind = 1 if p.mask.dtype == torch.bool else 2
        mask = p.mask.view(torch.uint8) if mask_kind == 1 else p.mask
        counts, index = mask_block_lists(p.mask, L, S, config.block_m, config.block_n, p.causal_offset)

    launch = dict(
        HEAD_DIM=head_dim,
        HEAD_DIM_V=head_dim_v,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        IS_CAUSAL=p.causal_offset is not None,
        MASK_KIND=mask_kind,
        CHECK_M=L % config.block_m != 0,
        CHECK_N=S % config.block_n != 0,
        CHECK_E=E != head_dim,
        CHECK_EV=Ev != head_dim_v,
        LARGE_OFFSETS=_large_offsets(p, k, v, mask),
        INPUT_PRECISION=_input_precision(p, interpret),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    qk_scale = split_scale(p.scale * 1.4426950408889634)  # exp2 is one instruction: fold in log2(e)
    m_blocks = math.ceil(L / config.block_m)
    with torch.cuda.device(p.device) if p.device.type == "cuda" else contextlib.nullcontext():
        for b0 in range(0, B, MAX_GRID_YZ):
            b1 = min(B, b0 + MAX_GRID_YZ)

            # Per-batch masks and block lists follow the chunk; broadcast ones (batch dim 1) stay.
            mk, ct, ix = (t[b0:b1] if t.shape[0] > 1 else t for t in (mask, counts, index))
            grid = (m_blocks, Hq, b1 - b0)
            forward_kernels.attention_forward_kernel[grid](
                out[b0:b1],
                lse[b0:b1],
                q[b0:b1],
                k[b0:b1],
                v[b0:b1],
                mk,
                ct,
                ix,
                *q.stride(),
                *k.stride(),
                *v.stride(),
                *out.stride(),
                *_broadcast_strides(mk),
                *_broadcast_strides(ct)[:3],
                *_broadcast_strides(ix)[:3],
                Hq,
                p.group,
                L,
                S,
                E,
                Ev,
                *qk_scale,
                p.causal_offset or 0,
                **launch,
            )
    return out, lse

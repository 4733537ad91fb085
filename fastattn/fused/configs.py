"""Tunables of the Triton kernels, kept apart from the kernels so a user can replace them.

``forward_config`` maps (padded head dims, dtype, GPU capability) to block sizes, warps and
pipeline stages. Replace it with ``fastattn.configs.set_forward_config(fn)``; every config a
built-in function can return is compiled ahead of time for sm_80 and sm_90 by the tests
(``FORWARD_CONFIG_SPACE`` lists them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ForwardConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def padded_head_dim(d: int) -> int:
    """Head dims are padded to a power of two (and at least 16, tl.dot's minimum)."""
    return max(16, 1 << (d - 1).bit_length())


# (Hopper or newer, 16-bit inputs, head-dim bucket, tensor mask) -> (BLOCK_M, BLOCK_N, warps, stages).
# Chosen as the largest tiles that compile without register spills (python -m fastattn.aot, triton
# 3.9; the tests re-check every entry). Masked kernels load a (BLOCK_M, BLOCK_N) mask tile and
# convert its layout, which costs registers: they get narrower key blocks. Not yet tuned by timing
# on a GPU.
_FORWARD_TABLE = {
    (True, True, 64, False): (128, 128, 8, 3),
    (True, True, 64, True): (128, 32, 8, 3),
    (True, True, 128, False): (128, 64, 8, 3),
    (True, True, 128, True): (64, 32, 8, 3),
    (True, True, 256, False): (64, 16, 8, 3),
    (True, True, 256, True): (64, 16, 8, 3),
    (True, False, 64, False): (128, 32, 8, 3),
    (True, False, 64, True): (128, 32, 8, 3),
    (True, False, 128, False): (32, 32, 4, 3),
    (True, False, 128, True): (32, 32, 4, 3),
    (True, False, 256, False): (32, 32, 4, 3),
    (True, False, 256, True): (32, 32, 4, 3),
    (False, True, 64, False): (128, 128, 8, 2),
    (False, True, 64, True): (128, 32, 8, 2),
    (False, True, 128, False): (64, 32, 4, 2),
    (False, True, 128, True): (64, 32, 8, 2),
    (False, True, 256, False): (64, 32, 8, 2),
    (False, True, 256, True): (64, 32, 8, 2),
    (False, False, 64, False): (128, 32, 8, 2),
    (False, False, 64, True): (128, 32, 8, 2),
    (False, False, 128, False): (32, 32, 4, 2),
    (False, False, 128, True): (64, 32, 8, 2),
    (False, False, 256, False): (32, 32, 4, 2),
    (False, False, 256, True): (32, 16, 4, 2),
}


def default_forward_config(
    head_dim: int, head_dim_v: int, dtype: torch.dtype, capability: tuple[int, int] | None, masked: bool = False
) -> ForwardConfig:
    """The built-in choice. head_dim/head_dim_v are padded; capability None = Triton's interpreter."""
    if capability is None:
        # The interpreter runs each program in numpy: small tiles exercise the multi-block logic
        # on short test sequences, and cost little.
        return ForwardConfig(32, 32, 4, 1)
    bucket = next(b for b in (64, 128, 256) if max(head_dim, head_dim_v) <= b)
    key = (capability[0] >= 9, dtype != torch.float32, bucket, masked)
    return ForwardConfig(*_FORWARD_TABLE[key])


FORWARD_CONFIG_SPACE = [
    (hd, hdv, dtype, cap)
    for cap in ((8, 0), (9, 0))
    for dtype in (torch.float16, torch.bfloat16, torch.float32)
    for hd in (16, 32, 64, 128, 256)
    for hdv in (16, 32, 64, 128, 256)
]

_forward_config: Callable[..., ForwardConfig] = default_forward_config


def forward_config(
    head_dim: int, head_dim_v: int, dtype: torch.dtype, capability: tuple[int, int] | None, masked: bool = False
) -> ForwardConfig:
    """The config the launcher uses (the built-in one unless replaced); masked: a tensor attn_mask."""
    return _forward_config(head_dim, head_dim_v, dtype, capability, masked=masked)


def set_forward_config(fn: Callable[..., ForwardConfig] | None) -> None:
    """Replace the forward config function (same signature); None restores the built-in one."""
    global _forward_config
    _forward_config = fn or default_forward_config

"""The oracle itself: fastattn.reference against PyTorch's SDPA in float64, and its invariants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import make_mask, make_qkv
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

from fastattn import reference

F64 = torch.float64
# Both sides compute the same formula in float64; only summation order differs.
ATOL, RTOL = 1e-12, 1e-10


def assert_same(name: str, ours: torch.Tensor, sdpa: torch.Tensor) -> None:
    err = (ours - sdpa).abs().max().item() if ours.numel() else 0.0
    print(f"{name}: max|reference - SDPA| = {err:.3e}")
    assert ours.dtype == sdpa.dtype and ours.shape == sdpa.shape
    torch.testing.assert_close(ours, sdpa, atol=ATOL, rtol=RTOL)


# (id, B, Hq, Hkv, L, S, E, Ev, SDPA keyword arguments besides the mask)
CASES = [
    ("plain-L7-S17", 2, 3, 3, 7, 17, 16, 16, {}),
    ("L17-S7-scale", 2, 2, 2, 17, 7, 32, 32, {"scale": 0.3}),
    ("E40-Ev24", 1, 2, 2, 9, 13, 40, 24, {}),
    ("causal-L5-S9", 2, 2, 2, 5, 9, 16, 16, {"is_causal": True}),
    ("causal-L9-S5", 2, 2, 2, 9, 5, 16, 16, {"is_causal": True}),
    ("gqa-4-2", 2, 4, 2, 8, 11, 16, 16, {"enable_gqa": True}),
    ("mqa-6-1-causal", 1, 6, 1, 8, 8, 32, 16, {"enable_gqa": True, "is_causal": True}),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_sdpa(case):
    name, B, Hq, Hkv, L, S, E, Ev, kwargs = case
    q, k, v = make_qkv(B, Hq, Hkv, L, S, E, Ev, dtype=F64)
    assert_same(name, reference.attention(q, k, v, **kwargs), F.scaled_dot_product_attention(q, k, v, **kwargs))


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape_name", ["b11s", "1hls", "ls", "l1", "bhls"])
def test_masks_match_sdpa(kind, shape_name):
    B, H, L, S = 2, 3, 6, 10
    shape = {"b11s": (B, 1, 1, S), "1hls": (1, H, L, S), "ls": (L, S), "l1": (L, 1), "bhls": (B, H, L, S)}
    q, k, v = make_qkv(B, H, H, L, S, 16, 8, dtype=F64)
    # Key 0 always kept: fully masked rows are checked separately.
    mask = make_mask(shape[shape_name], kind, F64, keep=0.9)
    if mask.dtype == torch.bool:
        mask.reshape(-1, mask.shape[-1])[:, 0] = True
    else:
        mask.reshape(-1, mask.shape[-1])[:, 0] = 0.0
    ours = reference.attention(q, k, v, mask)
    assert_same(f"{kind}-{shape_name}", ours, F.scaled_dot_product_attention(q, k, v, mask))


def test_fully_masked_rows_give_zero_like_sdpa_math():
    q, k, v = make_qkv(2, 2, 2, 5, 7, 8, dtype=F64)
    mask = make_mask((2, 1, 5, 7), "bool", keep=0.7, dead_frac=0.3)
    out, lse = reference.attention(q, k, v, mask, return_lse=True)
    dead = ~mask.any(-1).expand(2, 2, 5)
    assert dead.any()
    assert (out[dead] == 0).all() and torch.isneginf(lse[dead]).all()
    assert torch.isfinite(lse[~dead]).all()
    assert_same("dead-rows", out, F.scaled_dot_product_attention(q, k, v, mask))


@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
@pytest.mark.parametrize("L,S", [(4, 9), (9, 9), (1, 6)])
def test_causal_bias_matches_sdpa(variant, L, S):
    """SDPA defines CausalBias for L <= S (lower-right with L > S leaves rows without keys)."""
    bias = (causal_upper_left if variant == "upper_left" else causal_lower_right)(L, S)
    q, k, v = make_qkv(2, 2, 2, L, S, 16, dtype=F64)
    assert_same(
        f"{variant}-L{L}-S{S}", reference.attention(q, k, v, bias), F.scaled_dot_product_attention(q, k, v, bias)
    )


@pytest.mark.filterwarnings("ignore:Lower right causal bias")
def test_causal_lower_right_with_l_over_s_leaves_rows_empty():
    L, S = 7, 4
    q, k, v = make_qkv(1, 2, 2, L, S, 8, dtype=F64)
    out, lse, weights = reference.attention(q, k, v, causal_lower_right(L, S), return_lse=True, return_weights=True)
    keep = reference.causal_keep(L, S, S - L)
    assert torch.equal(weights != 0, keep.expand_as(weights))
    assert (out[..., : L - S, :] == 0).all() and torch.isneginf(lse[..., : L - S]).all()


@pytest.mark.parametrize(
    "q_shape,kv_shape",
    [((5, 8), (9, 8)), ((3, 5, 8), (3, 9, 8)), ((2, 3, 4, 5, 8), (2, 3, 4, 9, 8))],
    ids=["2d", "3d", "5d"],
)
def test_ranks_match_sdpa(q_shape, kv_shape):
    q = torch.randn(q_shape, dtype=F64)
    k, v = torch.randn(kv_shape, dtype=F64), torch.randn(kv_shape, dtype=F64)
    ours, lse = reference.attention(q, k, v, return_lse=True)
    assert lse.shape == q_shape[:-1]
    assert_same(f"rank{len(q_shape)}", ours, F.scaled_dot_product_attention(q, k, v))


def test_weights_are_probabilities_and_give_out():
    q, k, v = make_qkv(2, 4, 2, 6, 9, 16, 8, dtype=F64)
    mask = make_mask((2, 1, 6, 9), "bool", keep=0.6, dead_frac=0.25)
    out, lse, w = reference.attention(q, k, v, mask, enable_gqa=True, return_lse=True, return_weights=True)
    assert w.shape == (2, 4, 6, 9)
    dead = ~mask.any(-1).expand(2, 4, 6)
    sums = w.sum(-1)
    torch.testing.assert_close(sums[~dead], torch.ones_like(sums[~dead]), atol=1e-14, rtol=0)
    assert (w[dead] == 0).all()
    assert (w[~mask.expand_as(w)] == 0).all()
    torch.testing.assert_close(out, w @ v.repeat_interleave(2, dim=1), atol=1e-14, rtol=0)


def test_lse_is_logsumexp_of_scaled_scores():
    q, k, v = make_qkv(2, 2, 2, 6, 9, 16, dtype=F64)
    mask = make_mask((6, 9), "float", F64, keep=0.8)
    scale = 0.37
    _, lse = reference.attention(q, k, v, mask, scale=scale, return_lse=True)
    scores = q @ k.transpose(-1, -2) * scale + mask
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-13, rtol=0)


def test_default_scale_is_inverse_sqrt_e():
    q, k, v = make_qkv(1, 2, 2, 5, 6, 24, dtype=F64)
    _, lse = reference.attention(q, k, v, return_lse=True)
    _, lse_explicit = reference.attention(q, k, v, scale=1 / math.sqrt(24), return_lse=True)
    torch.testing.assert_close(lse, lse_explicit, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_upcast_and_baseline_dtypes(dtype):
    q, k, v = make_qkv(1, 2, 2, 5, 6, 16, dtype=dtype)
    out, lse = reference.attention(q, k, v, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    out64, lse64 = reference.attention(q, k, v, return_lse=True, upcast=True)
    assert out64.dtype == F64 and lse64.dtype == F64
    torch.testing.assert_close(out64, F.scaled_dot_product_attention(q.double(), k.double(), v.double()))

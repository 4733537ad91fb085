"""Property tests (hypothesis): random shapes, alignments and masks through the PyTorch fallback's
two paths and the kernel (interpreter on CPU), against the float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import fastattn
from fastattn.dispatch import unsupported_reasons
from fastattn.eager.forward import tiled_attention
from fastattn.problem import canonicalize

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw, max_len=70, max_dim=40):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    group = draw(st.integers(1, 3))
    L, S = draw(st.integers(1, max_len)), draw(st.integers(0, max_len))
    E, Ev = draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))
    causal = draw(st.sampled_from([None, "tl", "br", "ul"]))
    mask_kind = draw(st.sampled_from([None, "bool", "float"])) if causal in (None, "tl") else None
    mask_dims = draw(st.lists(st.booleans(), min_size=4, max_size=4))  # which dims are full-size
    keep = draw(st.floats(0.0, 1.0))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.one_of(st.none(), st.floats(0.01, 2.0)))
    return B, Hkv, group, L, S, E, Ev, causal, mask_kind, mask_dims, keep, seed, scale


def _arguments(problem, dtype):
    B, Hkv, group, L, S, E, Ev, causal, mask_kind, mask_dims, keep, seed, scale = problem
    g = torch.Generator().manual_seed(seed)
    Hq = Hkv * group
    q = torch.randn(B, Hq, L, E, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, S, E, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, S, Ev, generator=g, dtype=torch.float64).to(dtype)
    kwargs = {"enable_gqa": group > 1, "scale": scale}
    if causal == "tl":
        kwargs["is_causal"] = True
    elif causal == "br":
        kwargs["attn_mask"] = causal_lower_right(L, S)
    elif causal == "ul":
        kwargs["attn_mask"] = causal_upper_left(L, S)
    if mask_kind:
        shape = tuple(n if full else 1 for n, full in zip((B, Hq, L, S), mask_dims))
        kept = torch.rand(shape, generator=g) < keep
        kwargs["attn_mask"] = (
            kept if mask_kind == "bool" else torch.randn(shape, generator=g).masked_fill(~kept, -math.inf).to(dtype)
        )
    return q, k, v, kwargs


def _assert_matches(out, lse, oracle_out, oracle_lse, atol):
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(oracle_lse))
    finite = torch.isfinite(oracle_lse)
    torch.testing.assert_close(out.double(), oracle_out, atol=atol, rtol=0)
    torch.testing.assert_close(lse.double()[finite], oracle_lse[finite], atol=atol, rtol=0)


@SETTINGS
@given(problems())
def test_cpu_backend_matches_reference_float64(problem):
    q, k, v, kwargs = _arguments(problem, torch.float64)
    oracle = fastattn.reference.attention(q, k, v, **kwargs, return_lse=True, upcast=True)
    out, lse = fastattn.attention(q, k, v, **kwargs, return_lse=True, backend="cpu")
    _assert_matches(out, lse, *oracle, atol=1e-10)


@SETTINGS
@given(problems(), st.integers(1, 5), st.integers(1, 5))
def test_tiled_path_matches_reference_any_blocks(problem, bm, bn):
    """The tiled path with tiny blocks of any size, so every block-boundary case is met."""
    q, k, v, kwargs = _arguments(problem, torch.float64)
    oracle = fastattn.reference.attention(q, k, v, **kwargs, return_lse=True, upcast=True)
    p = canonicalize(q, k, v, **kwargs)
    if p.seqlen_k == 0:
        return
    out, lse = p.restore(*tiled_attention(p, block_m=bm, block_n=bn))
    _assert_matches(out, lse, *oracle, atol=1e-10)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_len=40, max_dim=24))
def test_triton_kernel_matches_reference_float32(problem):
    q, k, v, kwargs = _arguments(problem, torch.float32)
    reasons = unsupported_reasons("triton", canonicalize(q, k, v, **kwargs))
    if reasons:  # no interpreter in this process (e.g. a GPU machine): covered by tests/test_gpu.py
        pytest.skip("; ".join(reasons))
    oracle = fastattn.reference.attention(q, k, v, **kwargs, return_lse=True, upcast=True)
    out, lse = fastattn.attention(q, k, v, **kwargs, return_lse=True, backend="triton")
    _assert_matches(out, lse, *oracle, atol=2e-5)

"""Every bad input raises the promised error naming the argument; empty problems; the signature."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import make_qkv
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import fastattn
from fastattn import BackendUnavailable, reference
from fastattn.dispatch import BACKENDS, choose_backend, unsupported_reasons
from fastattn.problem import canonicalize

CPU_TENSORS = True  # backend="triton" cases run through the interpreter (conftest skips them where it is off)


def qkv(B=2, Hq=2, Hkv=2, L=5, S=7, E=16, Ev=16, dtype=torch.float32):
    return make_qkv(B, Hq, Hkv, L, S, E, Ev, dtype=dtype)


def _bad_inputs():
    """(id, kwargs for fastattn.attention, error type, words the message must contain)."""
    q, k, v = qkv()
    q1, k1, v1 = qkv(Hq=4, Hkv=2)
    q3, k3, v3 = qkv(Hq=6, Hkv=4)
    half = q.half()
    meta_k = torch.empty(k.shape, device="meta")
    return [
        ("query-1d", dict(query=torch.randn(16), key=k, value=v), ValueError, ["query", "2 dims"]),
        ("key-1d", dict(query=q, key=torch.randn(16), value=v), ValueError, ["key"]),
        ("ranks-differ", dict(query=q, key=k[0], value=v[0]), ValueError, ["same number of dims"]),
        # key/value batch dims of 1 broadcast (tests/test_hardening.py); the query's may not
        ("batch-dims-differ", dict(query=q[:1], key=k, value=v), ValueError, ["batch dims"]),
        ("e-q-vs-k", dict(query=q, key=torch.randn(2, 2, 7, 8), value=v), ValueError, ["head dim", "query", "key"]),
        ("s-k-vs-v", dict(query=q, key=k, value=v[:, :, :3]), ValueError, ["key", "value"]),
        (
            "heads-k-vs-v",
            dict(query=q1, key=k1, value=torch.randn(2, 1, 7, 16), enable_gqa=True),
            ValueError,
            ["key", "value", "heads"],
        ),
        ("heads-without-gqa", dict(query=q1, key=k1, value=v1), ValueError, ["heads", "enable_gqa"]),
        ("hq-not-multiple", dict(query=q3, key=k3, value=v3, enable_gqa=True), ValueError, ["multiple", "6", "4"]),
        ("dtypes-mixed", dict(query=half, key=k, value=v), TypeError, ["dtype"]),
        ("dtype-int", dict(query=q.int(), key=k.int(), value=v.int()), TypeError, ["query", "dtype"]),
        ("devices-mixed", dict(query=q, key=meta_k, value=v), ValueError, ["device"]),
        (
            "mask-not-broadcast",
            dict(query=q, key=k, value=v, attn_mask=torch.ones(5, 6, dtype=torch.bool)),
            ValueError,
            ["attn_mask", "broadcast"],
        ),
        (
            "mask-too-many-dims",
            dict(query=q, key=k, value=v, attn_mask=torch.ones(1, 1, 1, 5, 7, dtype=torch.bool)),
            ValueError,
            ["attn_mask"],
        ),
        (
            "mask-complex",  # a float mask of another dtype is read in its own (test_hardening.py)
            dict(query=q, key=k, value=v, attn_mask=torch.zeros(5, 7, dtype=torch.complex64)),
            TypeError,
            ["attn_mask", "floating-point"],
        ),
        (
            "mask-int",
            dict(query=q, key=k, value=v, attn_mask=torch.zeros(5, 7, dtype=torch.int64)),
            TypeError,
            ["attn_mask"],
        ),
        (
            "mask-device",
            dict(query=q, key=k, value=v, attn_mask=torch.zeros(5, 7, device="meta")),
            ValueError,
            ["attn_mask", "meta"],
        ),
        ("mask-not-tensor", dict(query=q, key=k, value=v, attn_mask=[[True] * 7] * 5), TypeError, ["attn_mask"]),
        (
            "causal-bias-size",
            dict(query=q, key=k, value=v, attn_mask=causal_lower_right(5, 8)),
            ValueError,
            ["attn_mask", "CausalBias"],
        ),
        (
            "causal-bias-and-is-causal",
            dict(query=q, key=k, value=v, attn_mask=causal_upper_left(5, 7), is_causal=True),
            ValueError,
            ["is_causal", "CausalBias"],
        ),
        (
            "head-dim-over-256",
            dict(query=torch.randn(1, 1, 3, 257), key=torch.randn(1, 1, 4, 257), value=torch.randn(1, 1, 4, 16)),
            ValueError,
            ["256"],
        ),
        ("value-head-dim-over-256", dict(query=q, key=k, value=torch.randn(2, 2, 7, 300)), ValueError, ["256"]),
        ("query-not-tensor", dict(query=q.tolist(), key=k, value=v), TypeError, ["query", "Tensor"]),
        ("value-not-tensor", dict(query=q, key=k, value=None), TypeError, ["value", "Tensor"]),
        ("dropout-negative", dict(query=q, key=k, value=v, dropout_p=-0.1), ValueError, ["dropout_p"]),
        ("dropout-one", dict(query=q, key=k, value=v, dropout_p=1.0), ValueError, ["dropout_p"]),
        ("dropout-not-number", dict(query=q, key=k, value=v, dropout_p="0.1"), TypeError, ["dropout_p"]),
        (
            "generator-not-generator",
            dict(query=q, key=k, value=v, dropout_p=0.1, generator=0),
            TypeError,
            ["generator", "torch.Generator"],
        ),
        ("scale-not-number", dict(query=q, key=k, value=v, scale="0.1"), TypeError, ["scale"]),
        ("scale-nan", dict(query=q, key=k, value=v, scale=math.nan), ValueError, ["scale"]),
        ("is-causal-not-bool", dict(query=q, key=k, value=v, is_causal="yes"), TypeError, ["is_causal"]),
        ("enable-gqa-not-bool", dict(query=q, key=k, value=v, enable_gqa=None), TypeError, ["enable_gqa"]),
        ("return-lse-not-bool", dict(query=q, key=k, value=v, return_lse="yes"), TypeError, ["return_lse"]),
        ("backend-unknown", dict(query=q, key=k, value=v, backend="cuda"), ValueError, ["backend", "'cuda'"]),
        ("backend-not-str", dict(query=q, key=k, value=v, backend=1), TypeError, ["backend"]),
    ]


BAD_INPUTS = _bad_inputs()
# The reference takes the same arguments as fastattn.attention but `backend` and `return_lse`.
REFERENCE_BAD_INPUTS = [c for c in BAD_INPUTS if "backend" not in c[1] and "return_lse" not in c[1]]


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"])
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises(case, backend):
    name, kwargs, error, words = case
    kwargs = {"backend": backend, **kwargs}
    with pytest.raises(error) as info:
        fastattn.attention(**kwargs)
    message = str(info.value)
    print(f"{name}: {type(info.value).__name__}: {message}")
    for word in words:
        assert word in message, f"{name}: {word!r} missing from {message!r}"


@pytest.mark.parametrize("case", REFERENCE_BAD_INPUTS, ids=[c[0] for c in REFERENCE_BAD_INPUTS])
def test_reference_rejects_the_same(case):
    name, kwargs, error, _ = case
    with pytest.raises(error):
        reference.attention(**kwargs)


def _unavailable_message(q, k, v, **kwargs) -> str:
    with pytest.raises(BackendUnavailable) as info:
        fastattn.attention(q, k, v, backend="triton", **kwargs)
    return str(info.value)


def test_triton_on_cpu_bfloat16_is_unavailable_with_reasons():
    q, k, v = qkv(dtype=torch.bfloat16)
    message = _unavailable_message(q, k, v)
    reasons = unsupported_reasons("triton", canonicalize(q, k, v))
    assert reasons and all(r in message for r in reasons), message
    assert "bfloat16" in message and "backend='triton'" in message
    assert isinstance(BackendUnavailable("x"), ValueError)


def test_triton_serves_float64_through_the_interpreter_when_asked():
    """float64 runs the kernel (for gradient checks); auto still sends CPU tensors to the fallback."""
    q, k, v = qkv(dtype=torch.float64)
    p = canonicalize(q, k, v)
    assert not any("float64" in r for r in unsupported_reasons("triton", p, explicit=True))
    assert choose_backend("auto", p).name == "cpu"


def test_auto_on_cpu_picks_the_fallback_and_says_why_not_triton():
    q, k, v = qkv()
    p = canonicalize(q, k, v)
    assert unsupported_reasons("cpu", p, explicit=False) == []
    assert unsupported_reasons("triton", p, explicit=False)  # the interpreter only when asked for
    assert unsupported_reasons("reference", p, explicit=False)
    assert unsupported_reasons("reference", p, explicit=True) == []
    torch.testing.assert_close(fastattn.attention(q, k, v), fastattn.attention(q, k, v, backend="cpu"), atol=0, rtol=0)


# --- empty problems: the documented results on every backend ---------------------------------


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize("L,S", [(5, 0), (0, 7), (0, 0)], ids=["S0", "L0", "L0-S0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_empty_sequences(backend, L, S, dtype):
    q, k, v = qkv(B=2, Hq=4, Hkv=2, L=L, S=S, E=16, Ev=8, dtype=dtype)
    mask = torch.ones(2, 1, L, S, dtype=torch.bool)
    out, lse = fastattn.attention(q, k, v, mask, enable_gqa=True, return_lse=True, backend=backend)
    assert out.shape == (2, 4, L, 8) and out.dtype == dtype
    assert lse.shape == (2, 4, L) and lse.dtype == torch.float32
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_empty_batch(backend):
    q, k, v = qkv(B=0)
    out, lse = fastattn.attention(q, k, v, is_causal=True, return_lse=True, backend=backend)
    assert out.shape == (0, 2, 5, 16) and lse.shape == (0, 2, 5)


# --- the SDPA-compatible signature -------------------------------------------------------------


def test_signature_is_sdpa_s():
    params = list(inspect.signature(fastattn.attention).parameters.values())
    names = [p.name for p in params]
    assert names[:8] == ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    assert [p.default for p in params[3:8]] == [None, 0.0, False, None, False]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[8:])


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"])
def test_positional_call_matches_sdpa(backend):
    q, k, v = qkv(dtype=torch.float64)
    mask = torch.rand(5, 7) < 0.8
    mask[:, 0] = True
    # SDPA takes (query, key, value, attn_mask, dropout_p, is_causal) positionally.
    expected = F.scaled_dot_product_attention(q, k, v, mask, 0.0, False, scale=0.2)
    got = fastattn.attention(q, k, v, mask, 0.0, False, 0.2, False, backend=backend)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)
    expected = F.scaled_dot_product_attention(q, k, v, None, 0.0, True)
    torch.testing.assert_close(fastattn.attention(q, k, v, None, 0.0, True, backend=backend), expected)


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"])
def test_keyword_call_matches_sdpa(backend):
    q, k, v = qkv(Hq=4, Hkv=2, dtype=torch.float64)
    kwargs = dict(query=q, key=k, value=v, attn_mask=None, dropout_p=0.0, is_causal=True, scale=0.5, enable_gqa=True)
    expected = F.scaled_dot_product_attention(**kwargs)
    torch.testing.assert_close(fastattn.attention(**kwargs, backend=backend), expected, atol=1e-12, rtol=1e-10)


def test_return_lse_shapes_follow_batch_dims():
    q, k, v = torch.randn(2, 3, 4, 5, 8), torch.randn(2, 3, 4, 6, 8), torch.randn(2, 3, 4, 6, 8)
    out, lse = fastattn.attention(q, k, v, return_lse=True)
    assert out.shape == (2, 3, 4, 5, 8) and lse.shape == (2, 3, 4, 5)
    out, lse = fastattn.attention(q[0, 0, 0], k[0, 0, 0], v[0, 0, 0], return_lse=True)
    assert out.shape == (5, 8) and lse.shape == (5,)

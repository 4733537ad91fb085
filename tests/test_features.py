"""The canonical description of a call (fastattn.features) and the dispatch that reads it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fastattn
from fastattn import configs, dispatch
from fastattn.features import FEATURES, Features, used_features
from fastattn.problem import canonicalize


@pytest.mark.parametrize(
    "features",
    [Features(0.125), Features(0.3, causal_offset=0), Features(1e-3, causal_offset=-7, dropout_p=0.25)],
    ids=["plain", "causal", "negative-offset-dropout"],
)
def test_op_packing_round_trips(features):
    ints, floats = features.pack()
    assert all(type(i) is int for i in ints) and all(type(x) is float for x in floats)
    assert Features.unpack(ints, floats) == features


def test_packing_tells_none_from_zero():
    assert Features(1.0, causal_offset=None).pack() != Features(1.0, causal_offset=0).pack()


def test_used_features_name_what_a_call_uses():
    q = torch.randn(1, 2, 5, 8)
    float_mask = torch.zeros(5, 5, requires_grad=True)
    assert used_features(canonicalize(q, q, q)) == []
    assert used_features(canonicalize(q, q, q, is_causal=True)) == ["causal"]
    assert used_features(canonicalize(q, q, q, torch.ones(5, 5, dtype=torch.bool))) == ["bool mask"]
    assert used_features(canonicalize(q, q, q, float_mask)) == ["float mask", "float mask gradient"]
    assert used_features(canonicalize(q, q, q, dropout_p=0.1)) == ["dropout"]
    assert set(used_features(canonicalize(q, q, q, dropout_p=0.1))) <= set(FEATURES)


def test_mask_gradient_is_a_stated_backward_reason():
    """The Triton backward does not differentiate a float mask: dispatch says so and picks the
    PyTorch backward, instead of rerouting silently."""
    q = torch.randn(1, 2, 5, 8)
    p = canonicalize(q, q, q, torch.zeros(5, 5, requires_grad=True))
    reasons = dispatch.backward_reasons("triton", p)
    assert reasons == ["its backward does not differentiate the gradient of a float attn_mask that requires grad"]
    assert dispatch.choose_backward("triton", p) == "cpu"
    assert dispatch.backward_reasons("cpu", p) == []
    plain = canonicalize(q, q, q, torch.zeros(5, 5))
    assert dispatch.choose_backward("triton", plain) == "triton"


def test_unimplemented_feature_is_refused_by_declaration(monkeypatch):
    """A feature whose declaration names no backend is refused with FeatureNotImplemented (dropout
    stands in here, declared unserved); declaring a backend for it is what makes it served."""
    q = torch.randn(1, 2, 5, 8)
    p = canonicalize(q, q, q, dropout_p=0.1)
    unserved = dataclasses.replace(FEATURES["dropout"], forward=frozenset(), backward=frozenset())
    monkeypatch.setitem(FEATURES, "dropout", unserved)
    monkeypatch.setattr(dispatch, "_CHOSEN", {})  # answers cached under the real declaration
    with pytest.raises(dispatch.FeatureNotImplemented, match="dropout") as info:
        dispatch.choose_backend("auto", p)
    assert isinstance(info.value, NotImplementedError) and isinstance(info.value, ValueError)
    assert any("dropout" in r for r in dispatch.unsupported_reasons("cpu", p))
    with pytest.raises(NotImplementedError, match="dropout"):
        fastattn.reference.attention(q, q, q, dropout_p=0.5)
    served = dataclasses.replace(FEATURES["dropout"], forward=frozenset({"cpu"}))
    monkeypatch.setitem(FEATURES, "dropout", served)
    dispatch._CHOSEN.clear()
    assert dispatch.choose_backend("auto", p).name == "cpu"


@pytest.mark.parametrize("kind", ["forward", "backward"])
def test_config_replacement_api(kind):
    """set_<kind>_config replaces the choice, None restores the built-in one, a non-function is refused."""
    get, set_, default = (
        getattr(configs, f"{n}") for n in (f"{kind}_config", f"set_{kind}_config", f"default_{kind}_config")
    )
    tiny = configs.TileConfig(16, 16, 4, 1)
    chosen = tiny if kind == "forward" else configs.BackwardConfig(tiny, tiny)
    set_(lambda *args, masked=False: chosen)
    try:
        assert get(64, 64, torch.float16, (9, 0)) is chosen
    finally:
        set_(None)
    assert get(64, 64, torch.float16, (9, 0)) == default(64, 64, torch.float16, (9, 0))
    with pytest.raises(TypeError, match=f"set_{kind}_config"):
        set_("16x16")

"""The Triton backward (preprocess, dK/dV and dQ kernels) against autograd of the float64 reference.

Kernel runs go through Triton's interpreter on CPU (conftest sets TRITON_INTERPRET=1 without a
GPU) or the compiled kernels on CUDA, in float64, float32 and float16 (bfloat16 compiled only: the
interpreter's bf16 tl.dot is wrong); `torch.autograd.gradcheck` runs through the float64 kernels.

Pass rule: the error-ratio rule of helpers.py with the gradients' ratio 3, the baseline being
autograd of the reference in the inputs' own dtype, and one addition to the floor: the kernel
recomputes P = exp(s - lse) from the lse the forward saved, so P carries a relative error of a few
ulps of |lse| (float32 ulps; float64 ones for float64 inputs) that the baseline (which normalises by
its own row max, exact for the largest entry) does not have. With large logits (|lse| ~ 1e3) that
is ~1e-4 relative in float32, above its floor; it is added as LSE_ULPS * ulp * max|lse| *
max|gradient|. The AOT test compiles the backward kernels for sm_80 and sm_90 in a subprocess (no
GPU needed).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import (
    MODIFIER_CASES,
    PARITY_CASES,
    Case,
    assert_close_to_oracle,
    attention_arguments,
    make_mask,
    make_qkv,
)

import fastattn
from fastattn import reference
from fastattn.configs import BackwardConfig, TileConfig
from fastattn.dispatch import unsupported_reasons
from fastattn.features import Features
from fastattn.fused.backward import triton_attention_backward
from fastattn.fused.block_lists import key_block_lists
from fastattn.fused.forward import triton_attention_forward
from fastattn.problem import canonicalize, lse_dtype
from fastattn.reference import causal_keep
from fastattn.testing import FLOOR

# gpu: on a CUDA machine these run compiled on the GPU (DEVICE), so `pytest -m gpu` includes them;
# without one they run through Triton's interpreter.
pytestmark = [pytest.mark.filterwarnings("ignore:Lower right causal bias"), pytest.mark.gpu]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parents[1]


def _dtype_params():
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        probe = torch.zeros(1, 1, 1, 16, dtype=dtype, device=DEVICE)
        reasons = unsupported_reasons("triton", canonicalize(probe, probe, probe))
        marks = [pytest.mark.skip(reason="; ".join(reasons))] if reasons else []
        yield pytest.param(dtype, id=str(dtype).removeprefix("torch."), marks=marks)


DTYPES = list(_dtype_params())

# Rounding of the saved lse and of the recomputed score, in float32 ulps of |lse| (see above).
LSE_ULPS = 4

# The parity matrix without its 1000-long sequences (the interpreter runs each program in numpy).
BACKWARD_CASES = [c for c in PARITY_CASES if max(c.L, c.S) < 1000]


def _to_device(q, k, v, kwargs):
    mask = kwargs.get("attn_mask")
    if type(mask) is torch.Tensor:
        kwargs = dict(kwargs, attn_mask=mask.to(DEVICE))
    if kwargs.get("alibi_slopes") is not None:
        kwargs = dict(kwargs, alibi_slopes=kwargs["alibi_slopes"].to(DEVICE))
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), kwargs


def _reference_grads(q, k, v, kwargs, dout, dlse, upcast: bool):
    """Autograd of the reference: d/d(q, k, v) of sum(out * dout) [+ sum(lse * dlse)]."""
    dtype = torch.float64 if upcast else q.dtype
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    mask = kwargs.get("attn_mask")
    if type(mask) is torch.Tensor and mask.dtype != torch.bool:
        kwargs = dict(kwargs, attn_mask=mask.to(dtype))
    out, lse = reference.attention(q, k, v, **kwargs, return_lse=True)
    loss = (out * dout.to(dtype)).sum()
    if dlse is not None:
        # Rows with no key have lse = -inf and take no part in the loss.
        loss = loss + torch.where(torch.isneginf(lse), 0.0, lse * dlse.to(lse.dtype)).sum()
    return torch.autograd.grad(loss, (q, k, v)), lse.detach()


def _kernel_grads(q, k, v, kwargs, dout, dlse, config=None):
    p = canonicalize(q, k, v, **kwargs)
    out, lse, stats = triton_attention_forward(p)
    dout_c = dout.reshape(out.shape)
    dlse_c = None if dlse is None else dlse.reshape(lse.shape)
    dq, dk, dv = triton_attention_backward(p, out, lse, dout_c, dlse_c, config=config, stats=stats)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)


def check_grads(name, case_or_args, dtype, with_dlse=False, config=None):
    """Kernel gradients of one problem vs the float64 oracle, with the low-precision baseline."""
    q, k, v, kwargs = _to_device(*case_or_args)
    out_shape = (*q.shape[:-1], v.shape[-1])
    dout = torch.randn(out_shape, device=DEVICE).to(dtype)
    dlse = torch.randn(q.shape[:-1], device=DEVICE) if with_dlse else None
    got = _kernel_grads(q, k, v, kwargs, dout, dlse, config)
    oracle, lse = _reference_grads(q, k, v, kwargs, dout, dlse, upcast=True)
    baseline, _ = _reference_grads(q, k, v, kwargs, dout, dlse, upcast=False)
    finite_lse = lse[torch.isfinite(lse)]
    lse_max = finite_lse.abs().max().item() if finite_lse.numel() else 0.0
    for label, g, o, b, t in zip(("dq", "dk", "dv"), got, oracle, baseline, (q, k, v)):
        assert g.shape == t.shape and g.dtype == t.dtype, f"{name} {label}: {g.shape} {g.dtype}"
        magnitude = max(1.0, o.abs().max().item())
        lse_ulp = torch.finfo(lse_dtype(dtype)).eps / 2
        floor = (FLOOR[dtype] + LSE_ULPS * lse_ulp * lse_max) * magnitude
        assert_close_to_oracle(f"{name} {label}", g, o, b, dtype=dtype, floor=floor, ratio=3.0)
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=[c.id for c in BACKWARD_CASES])
def test_backward_parity(case: Case, dtype):
    check_grads(f"{case.id} {dtype}", attention_arguments(case, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MODIFIER_CASES, ids=[c.id for c in MODIFIER_CASES])
def test_backward_modifiers(case: Case, dtype):
    """Windows (block ranges that skip the blocks outside the band), softcap's chain rule and ALiBi
    in the dK/dV and dQ kernels."""
    check_grads(f"{case.id} {dtype}", attention_arguments(case, dtype), dtype, with_dlse=True)


LSE_CASES = [
    Case(17, 7, 32, Hq=2, Hkv=2, causal="br"),  # rows with no key: lse = -inf
    Case(65, 63, 96, 64, B=2, Hq=2, Hkv=2, mask="bool_b11s", dead=0.5),
    Case(63, 129, 80, Hq=4, Hkv=1, causal="tl", mask="float_1hls"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LSE_CASES, ids=[c.id for c in LSE_CASES])
def test_backward_through_lse(case: Case, dtype):
    """A loss that uses lse as well as out: dlse folds into delta."""
    check_grads(f"{case.id} {dtype} +dlse", attention_arguments(case, dtype), dtype, with_dlse=True)


@pytest.mark.parametrize(
    "Hq,Hkv,causal",
    [(6, 2, None), (8, 1, "tl"), (3, 3, "br")],
    ids=["gqa3", "mqa8-causal_tl", "mha-causal_br"],
)
def test_backward_head_groups(Hq, Hkv, causal):
    """dK/dV summed over each KV head's group of query heads (no atomics, no repeated K/V)."""
    dtype = torch.float32
    check_grads(f"Hq{Hq} Hkv{Hkv}", attention_arguments(Case(33, 47, 32, Hq=Hq, Hkv=Hkv, causal=causal), dtype), dtype)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_and_keys_get_zero_gradients(kind):
    """Rows that see no key: dq = 0; keys no row sees: dk = dv = 0; never NaN."""
    B, H, L, S, E = 1, 2, 40, 50, 32
    q, k, v = make_qkv(B, H, H, L, S, E)
    mask = make_mask((B, H, L, S), kind, keep=0.8)
    dead_rows, dead_keys = [0, 17, 33, 39], [2, 20, 21, 49]
    fill = False if kind == "bool" else -math.inf
    mask[..., dead_rows, :] = fill
    mask[..., :, dead_keys] = fill
    args = (q, k, v, {"attn_mask": mask})
    dq, dk, dv = check_grads(f"dead {kind}", args, torch.float32, with_dlse=True)
    for g in (dq, dk, dv):
        assert not g.isnan().any()
    assert (dq[..., dead_rows, :] == 0).all()
    assert (dk[..., dead_keys, :] == 0).all() and (dv[..., dead_keys, :] == 0).all()


@pytest.mark.parametrize(
    "causal,mask,shape,fast_mode",
    [(True, "float", (2, 1, 5, 7, 4, 3), False), (False, "bool", (4, 2, 9, 11, 6, 5), True)],
    ids=["causal-float-mask-full", "bool-mask-fast"],
)
def test_gradcheck_float64_through_the_kernel(causal, mask, shape, fast_mode, monkeypatch):
    """torch.autograd.gradcheck of (out, lse) through the Triton forward and backward in float64:
    GQA, E != Ev, ragged lengths, a row with no key (lse = -inf, zero gradients). The interpreter
    takes ~0.2 s a forward, so the full Jacobian is checked on the smaller shape and the larger one
    uses gradcheck's fast mode (random projections of the Jacobian)."""
    probe = torch.zeros(1, 1, 1, 16, dtype=torch.float64, device=DEVICE)
    reasons = unsupported_reasons("triton", canonicalize(probe, probe, probe))
    if reasons:
        pytest.skip("; ".join(reasons))
    torch.manual_seed(0)
    Hq, Hkv, L, S, E, Ev = shape
    opts = dict(dtype=torch.float64, device=DEVICE, requires_grad=True)
    q = torch.randn(1, Hq, L, E, **opts)
    k = torch.randn(1, Hkv, S, E, **opts)
    v = torch.randn(1, Hkv, S, Ev, **opts)
    if mask == "float":
        attn_mask = torch.randn(1, 1, L, S, dtype=torch.float64, device=DEVICE)
        attn_mask[:, :, 2] = -math.inf
    else:
        attn_mask = torch.rand(1, Hq, L, S, device=DEVICE) < 0.7
        attn_mask[:, :, 2] = False
    import fastattn.fused.backward as lb

    calls = []
    kernel_backward = lb.triton_attention_backward
    monkeypatch.setattr(lb, "triton_attention_backward", lambda *a, **kw: calls.append(1) or kernel_backward(*a, **kw))

    def f(q, k, v):
        out, lse = fastattn.attention(
            q, k, v, attn_mask, is_causal=causal, enable_gqa=True, return_lse=True, backend="triton"
        )
        return out, lse.nan_to_num(0.0, 0.0, 0.0)

    assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=fast_mode)
    assert calls  # the Triton backward ran (the forward: backend="triton" raises if it cannot serve)
    out = f(q, k, v)[0]
    (g,) = torch.autograd.grad(out.sum(), q)
    assert (g[:, :, 2] == 0).all() and not g.isnan().any()


def test_bottom_right_causal_with_more_queries_than_keys():
    """L > S bottom-right: the first L - S rows see no key and get dq = 0."""
    case = Case(45, 20, 16, causal="br")
    dq, _, _ = check_grads("br L>S", attention_arguments(case, torch.float32), torch.float32, with_dlse=True)
    assert (dq[..., : 45 - 20, :] == 0).all()


@pytest.mark.parametrize("mask", [False, True], ids=["causal", "causal-and-mask"])
def test_keys_no_query_sees_get_zero_gradients(mask):
    """Top-left causal with L < S: keys past L are seen by no query, whole key blocks of them, and
    their dK/dV programs visit nothing. The gradients are allocated uninitialised, so those
    programs must still write zeros (regression guard for dropping the memset)."""
    case = Case(20, 100, 16, causal="tl", mask="bool_ls" if mask else None)
    _, dk, dv = check_grads("tl L<S", attention_arguments(case, torch.float32), torch.float32)
    assert (dk[..., 20:, :] == 0).all() and (dv[..., 20:, :] == 0).all()


@pytest.mark.parametrize(
    "case",
    [Case(65, 63, 40, 24, B=2, Hq=4, Hkv=2, mask="float_bhls"), Case(64, 64, 64, Hq=2, Hkv=1, causal="tl")],
    ids=lambda c: c.id,
)
def test_backward_bitwise_repeatable(case: Case):
    q, k, v, kwargs = _to_device(*attention_arguments(case, torch.float16))
    dout = torch.randn(*q.shape[:-1], v.shape[-1], device=DEVICE).to(torch.float16)
    first = _kernel_grads(q, k, v, kwargs, dout, None)
    second = _kernel_grads(q, k, v, kwargs, dout, None)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("key_major", [False, True], ids=["query-major", "key-major"])
def test_backward_other_tiles(key_major):
    """Tiles unlike the default (dK/dV with more query rows than keys per step), in both
    orientations of the dK/dV score tiles, give the same grads."""
    config = BackwardConfig(TileConfig(32, 16, 4, 1, key_major), TileConfig(16, 32, 4, 1))
    case = Case(70, 90, 48, Hq=2, Hkv=1, causal="br")
    check_grads("tiles", attention_arguments(case, torch.float32), torch.float32, config=config)
    case = Case(70, 90, 48, Hq=2, Hkv=2, mask="bool_1hls", dead=0.2)
    check_grads("tiles masked", attention_arguments(case, torch.float32), torch.float32, config=config)


KEY_MAJOR_CASES = [
    Case(65, 63, 40, 24, B=2, Hq=4, Hkv=2, mask="float_bhls", dead=0.3),
    Case(45, 100, 64, Hq=4, Hkv=1, causal="br"),
    Case(100, 45, 80, 48, Hq=2, Hkv=2, causal="tl", mask="bool_b11s"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", KEY_MAJOR_CASES, ids=lambda c: c.id)
def test_key_major_dkdv_parity(case, dtype):
    """The key-major dK/dV orientation (some GPU configs pick it) against the float64 oracle:
    masks with dead rows, GQA/MQA, both causal alignments, E != Ev, ragged lengths."""
    config = BackwardConfig(TileConfig(32, 32, 4, 1, key_major=True), TileConfig(32, 32, 4, 1))
    check_grads(case.id, attention_arguments(case, dtype), dtype, with_dlse=True, config=config)


def test_empty_problems_give_zero_gradients():
    q = torch.randn(1, 2, 5, 8, device=DEVICE)
    k = torch.randn(1, 2, 0, 8, device=DEVICE)
    p = canonicalize(q, k, k)
    out, lse = torch.zeros(1, 2, 5, 8, device=DEVICE), torch.full((1, 2, 5), -math.inf, device=DEVICE)
    dq, dk, dv = triton_attention_backward(p, out, lse, torch.ones_like(out))
    assert dq.shape == q.shape and (dq == 0).all() and dk.shape == k.shape and dv.shape == k.shape


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", [(2, 1, 1, 45), (1, 3, 37, 45), (1, 1, 37, 1), (2, 3, 37, 45)])
@pytest.mark.parametrize("causal", [None, 0, 8, -9])
def test_key_block_lists_match_brute_force(kind, shape, causal):
    """The dK/dV kernel's lists: per key block, exactly the query blocks with a visible entry,
    those whose every entry is visible (bool masks) listed first as needing no masking."""
    B, H, L, S, bm, bn = 2, 3, 37, 45, 8, 16
    mask = make_mask(shape, kind, keep=0.9)
    if kind == "bool":
        mask[..., : min(shape[-2], 9), :] = True  # some all-true tiles
    keep = (mask if kind == "bool" else ~torch.isneginf(mask)).expand(B, H, L, S)
    if causal is not None:
        keep = keep & causal_keep(L, S, causal)
    counts, index = key_block_lists(mask, L, S, bm, bn, Features(1.0, causal))
    counts = counts.expand(B, H, *counts.shape[2:])
    index = index.expand(B, H, *index.shape[2:])
    for b in range(B):
        for h in range(H):
            for n in range(math.ceil(S / bn)):
                n_full, n_cut = counts[b, h, n].tolist()
                listed = index[b, h, n].tolist()
                tiles = [keep[b, h, m * bm : (m + 1) * bm, n * bn : (n + 1) * bn] for m in range(math.ceil(L / bm))]
                alive = [m for m, t in enumerate(tiles) if t.any()]
                full = [m for m, t in enumerate(tiles) if kind == "bool" and t.all() and (n + 1) * bn <= S]
                assert sorted(listed[:n_full]) == full
                assert sorted(listed[: n_full + n_cut]) == alive

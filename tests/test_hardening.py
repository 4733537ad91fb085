"""What real programs pass that once went wrong: transformers' finfo.min masks, torch.func, NaN,
float16 products past 65504, NumPy scales, autocast, masks of another dtype, broadcast K/V batches.

Each test pins the documented behaviour on every backend ("triton" through Triton's interpreter on
CPU tensors, conftest), against the float64 reference or SDPA itself.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_oracle

import fastattn
import fastattn.fused
from fastattn import reference
from fastattn.eager.forward import sdpa_cpu_reasons
from fastattn.problem import canonicalize

BACKENDS = ["cpu", "triton", "reference"]
# These tests use CPU tensors: "triton" runs them through Triton's interpreter, which a process that
# compiles for a GPU (TRITON_INTERPRET unset where CUDA is present) does not have.
NO_TRITON_ON_CPU = fastattn.fused.flavour_error("cpu")


@pytest.fixture(autouse=True)
def _skip_triton_without_interpreter(request):
    params = getattr(request.node, "callspec", None)
    if params is not None and params.params.get("backend") == "triton" and NO_TRITON_ON_CPU:
        pytest.skip(NO_TRITON_ON_CPU)
    if params is not None and params.params.get("path") == "triton" and NO_TRITON_ON_CPU:
        pytest.skip(NO_TRITON_ON_CPU)


def qkv(B=1, Hq=2, Hkv=2, L=5, S=6, E=16, Ev=16, dtype=torch.float32):
    return (
        torch.randn(B, Hq, L, E, dtype=dtype),
        torch.randn(B, Hkv, S, E, dtype=dtype),
        torch.randn(B, Hkv, S, Ev, dtype=dtype),
    )


# ---------------------------------------------------------------------------------------------
# 1. Additive masks over the whole finite range (transformers' eager masks use finfo.min).


def extreme_mask(dtype: torch.dtype, L: int = 5, S: int = 6) -> torch.Tensor:
    fmax = torch.finfo(dtype).max
    m = torch.zeros(1, 1, L, S, dtype=torch.float64)
    m[..., 0, :] = -fmax  # every key at finfo.min: the uniform average of V, as SDPA gives
    m[..., 1, :3] = -fmax  # transformers' padding
    m[..., 2, :] = torch.linspace(-0.99, -0.7, S, dtype=torch.float64)[torch.randperm(S)] * fmax  # huge, distinct
    m[..., 3, 2] = 0.5 * fmax  # one huge positive
    return m.to(dtype)


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("path", ["tiled E!=Ev", "tiled causal+mask", "sdpa kernel", "triton", "reference"])
def test_finite_masks_over_the_whole_range_are_finite_scores(path, mask_dtype):
    backend = {"triton": "triton", "reference": "reference"}.get(path, "cpu")
    Ev = 24 if path == "tiled E!=Ev" else 16
    causal = path == "tiled causal+mask"
    q, k, v = qkv(L=5, S=5 if causal else 6, Ev=Ev)
    mask = extreme_mask(mask_dtype, 5, k.shape[2]).to(torch.float32)  # the values the mask dtype holds
    if path == "sdpa kernel":
        assert not sdpa_cpu_reasons(canonicalize(q, k, v, mask))
    kw = dict(attn_mask=mask, is_causal=causal, return_lse=True)
    out, lse = fastattn.attention(q, k, v, backend=backend, **kw)
    oracle = reference.attention(q, k, v, upcast=True, **kw)
    baseline = reference.attention(q, k, v, **kw)
    assert torch.isfinite(lse).all()
    assert_close_to_oracle(f"{path} out", out, oracle[0], baseline[0])
    assert_close_to_oracle(f"{path} lse", lse, oracle[1], baseline[1], floor=1e-6 * torch.finfo(mask_dtype).max)
    if not causal:
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        tol = 1e-3 if mask_dtype == torch.float16 else 2e-5  # float32 scores - 65504 keep 3 decimals
        torch.testing.assert_close(out, sdpa, rtol=tol, atol=tol)
        if mask_dtype != torch.float16:  # the all-finfo.min row is the plain mean of V, as in SDPA
            torch.testing.assert_close(out[0, :, 0], v[0].mean(dim=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_finfo_min_mask_gradients_match_the_forward(backend):
    """Rows whose scores tie at finfo.min: the backward's P is 1/n there too (the forward's row
    max and log-sum are kept apart for the Triton backward)."""
    q, k, v = qkv(L=5, S=6, Ev=24)
    mask = extreme_mask(torch.float32).float()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fastattn.attention(*leaves, attn_mask=mask, backend=backend)
    g = torch.randn_like(out)
    out.backward(g)
    wide = [t.double().requires_grad_() for t in (q, k, v)]
    reference.attention(*wide, attn_mask=mask.double()).backward(g.double())
    low = [t.clone().requires_grad_() for t in (q, k, v)]
    reference.attention(*low, attn_mask=mask).backward(g)
    for name, a, o, b in zip(("dq", "dk", "dv"), leaves, wide, low):
        assert_close_to_oracle(f"{backend} {name}", a.grad, o.grad, b.grad, ratio=3.0)


# ---------------------------------------------------------------------------------------------
# 2-3. torch.func and forward-mode AD.


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_torch_func_grad_vmap_grad_and_jacrev(backend):
    q, k, v = qkv(L=4, S=5, E=8, Ev=8)

    def f(q):
        return fastattn.attention(q, k, v, is_causal=True, backend=backend)

    g = torch.func.grad(lambda q: f(q).sum())(q)
    want = torch.func.grad(lambda q: reference.attention(q, k, v, is_causal=True).sum())(q)
    torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5)
    qs = torch.randn(3, *q.shape)
    batched = torch.func.vmap(torch.func.grad(lambda q: f(q).sum()))(qs)
    for i in range(3):
        torch.testing.assert_close(batched[i], torch.func.grad(lambda q: f(q).sum())(qs[i]), rtol=1e-5, atol=1e-6)
    jac = torch.func.jacrev(f)(q)
    torch.testing.assert_close(jac, torch.func.jacrev(lambda q: reference.attention(q, k, v, is_causal=True))(q),
                               rtol=1e-5, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("how", ["torch.func.jvp", "forward_ad"])
def test_forward_mode_ad_raises_instead_of_a_zero_tangent(how):
    q, k, v = qkv()
    with pytest.raises(NotImplementedError, match="forward-mode"):
        if how == "torch.func.jvp":
            torch.func.jvp(lambda q: fastattn.attention(q, k, v), (q,), (torch.ones_like(q),))
        else:
            import torch.autograd.forward_ad as fwAD

            with fwAD.dual_level():
                fastattn.attention(fwAD.make_dual(q, torch.ones_like(q)), k, v)
    # the reference backend is plain PyTorch: its forward-mode derivative works
    _, tangent = torch.func.jvp(lambda q: fastattn.attention(q, k, v, backend="reference"), (q,), (torch.ones_like(q),))
    assert tangent.abs().max() > 0


def test_double_backward_under_torch_func_raises_the_fastattn_error():
    q, k, v = qkv(E=8, Ev=8)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.func.grad(lambda q: torch.func.grad(lambda q: fastattn.attention(q, k, v).sum())(q).sum())(q)


# ---------------------------------------------------------------------------------------------
# 4. NaN inputs give NaN rows on every path, as SDPA's math backend does.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["query", "key"])
def test_nan_propagates_like_sdpa_math(backend, where):
    q, k, v = qkv()
    if where == "query":
        q[0, 1, 2, 3] = math.nan
    else:
        k[0, 0, 4, 1] = math.nan
    out, lse = fastattn.attention(q, k, v, backend=backend, return_lse=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        want = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    assert torch.equal(torch.isnan(lse), torch.isnan(want).any(-1))
    torch.testing.assert_close(out.nan_to_num(7.0), want.nan_to_num(7.0))


# ---------------------------------------------------------------------------------------------
# 5. The float16 reference scales before the product, as SDPA's math backend.


def test_float16_reference_does_not_overflow_before_scaling():
    q = torch.full((1, 1, 2, 64), 40.0, dtype=torch.float16)  # q . k = 102400 > 65504 before the scale
    k = torch.full((1, 1, 3, 64), 40.0, dtype=torch.float16)
    v = torch.randn(1, 1, 3, 64, dtype=torch.float16)
    out = reference.attention(q, k, v)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        want = F.scaled_dot_product_attention(q, k, v)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want)


# ---------------------------------------------------------------------------------------------
# 6-8. SDPA's leniency: scale types, autocast, masks of another dtype, K/V batch broadcasting.


@pytest.mark.parametrize(
    "scale", [np.float32(0.5), np.float64(0.5), np.int64(1), torch.tensor(0.5), torch.tensor([0.5])], ids=str
)
def test_scale_of_any_real_type(scale):
    q, k, v = qkv()
    want = F.scaled_dot_product_attention(q, k, v, scale=float(scale))
    torch.testing.assert_close(fastattn.attention(q, k, v, scale=scale), want)
    torch.testing.assert_close(reference.attention(q, k, v, scale=scale), want)


@pytest.mark.parametrize(
    "scale,error",
    [(torch.tensor([0.5, 1.0]), TypeError), (True, TypeError), ("0.5", TypeError), (np.float32("nan"), ValueError)],
)
def test_bad_scale_still_raises(scale, error):
    q, k, v = qkv()
    with pytest.raises(error, match="scale"):
        fastattn.attention(q, k, v, scale=scale)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_autocast_computes_in_the_autocast_dtype(backend):
    q, k, v = qkv()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastattn.attention(q, k, v, backend=backend)
        want = F.scaled_dot_product_attention(q, k, v)
        packed = fastattn.varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                           torch.tensor([0, 5], dtype=torch.int32), torch.tensor([0, 6], dtype=torch.int32),
                                           5, 6, backend=backend)  # fmt: skip
    assert out.dtype == want.dtype == packed.dtype == torch.bfloat16
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
    # float64 is left alone, as autocast does
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fastattn.attention(*(t.double() for t in (q, k, v)), backend=backend).dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "q_dtype,mask_dtype",
    [(torch.float16, torch.float32), (torch.float32, torch.float64), (torch.float32, torch.bfloat16)],
    ids=str,
)
def test_float_mask_of_another_dtype_is_read_in_its_own(backend, q_dtype, mask_dtype):
    q, k, v = qkv(dtype=q_dtype)
    mask = torch.randn(1, 1, 5, 6).to(mask_dtype)
    mask[..., 0, :2] = torch.finfo(torch.float32).min if mask_dtype != torch.bfloat16 else -3e38
    out = fastattn.attention(q, k, v, attn_mask=mask, backend=backend)
    assert out.dtype == q_dtype
    oracle = reference.attention(q, k, v, attn_mask=mask, upcast=True)
    baseline = reference.attention(q, k, v, attn_mask=mask)
    assert_close_to_oracle(f"{backend} {q_dtype} q, {mask_dtype} mask", out, oracle, baseline)


def test_a_mask_of_another_dtype_leaves_the_sdpa_kernel_for_the_tiled_path():
    q, k, v = qkv(dtype=torch.float16)
    assert "a float mask of another dtype than the query" in sdpa_cpu_reasons(canonicalize(q, k, v, torch.zeros(5, 6)))
    with pytest.raises(TypeError, match="attn_mask must be bool or a floating-point"):
        fastattn.attention(q, k, v, torch.zeros(5, 6, dtype=torch.int32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_value_batch_of_one_broadcasts_like_sdpa(backend):
    q = torch.randn(3, 2, 5, 16)
    k, v = torch.randn(1, 2, 6, 16, requires_grad=True), torch.randn(1, 2, 6, 16, requires_grad=True)
    out = fastattn.attention(q, k, v, is_causal=True, backend=backend)
    want = F.scaled_dot_product_attention(q, k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1), is_causal=True)
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    dk, dv = torch.autograd.grad(out, (k, v), g)
    kk, vv = (t.detach().expand(3, -1, -1, -1).clone().requires_grad_() for t in (k, v))
    want_dk, want_dv = torch.autograd.grad(F.scaled_dot_product_attention(q, kk, vv, is_causal=True), (kk, vv), g)
    torch.testing.assert_close(dk, want_dk.sum(0, keepdim=True), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dv, want_dv.sum(0, keepdim=True), rtol=1e-4, atol=1e-5)


def test_query_batch_may_not_be_the_broadcast_one():
    q = torch.randn(1, 2, 5, 16)
    k = v = torch.randn(3, 2, 6, 16)
    with pytest.raises(ValueError, match="batch dims differ"):
        fastattn.attention(q, k, v)

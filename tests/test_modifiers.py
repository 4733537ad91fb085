"""Sliding windows, softcaps and ALiBi: the arguments' checks, their definitions against the eager
attention of the models that use them, edge cases, and the promise that a window's cost grows with
L * window (blocks outside the band are never read).

The parity and gradient matrices over every backend live with the others (test_parity.py,
test_backward.py, test_triton_backward.py: MODIFIER_CASES); "triton" runs here through Triton's
interpreter on CPU tensors (conftest), in float32.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import alibi_slopes, assert_close_to_oracle, cpu_runnable, skip_without_cpu_triton

import fastattn
from fastattn import configs, dispatch, reference
from fastattn.configs import BackwardConfig, TileConfig
from fastattn.eager import backward as eager_backward
from fastattn.eager import forward as eager_forward
from fastattn.eager.forward import sdpa_cpu_reasons
from fastattn.features import used_features
from fastattn.fused.block_lists import BLOCK_CUT, BLOCK_DEAD, BLOCK_FULL, causal_block_classes
from fastattn.problem import canonicalize

BACKENDS = ["cpu", "triton", "reference"]
CPU_TENSORS = True  # backend="triton" cases run through the interpreter (conftest skips them where it is off)
CALLS = {"attention": fastattn.attention, "reference": reference.attention}


def qkv(B=1, Hq=2, Hkv=2, L=16, S=16, E=16, dtype=torch.float32, requires_grad=False):
    q = torch.randn(B, Hq, L, E, dtype=dtype)
    k = torch.randn(B, Hkv, S, E, dtype=dtype)
    v = torch.randn(B, Hkv, S, E, dtype=dtype)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, from both public calls.


@pytest.mark.parametrize("call", list(CALLS), ids=list(CALLS))
@pytest.mark.parametrize(
    "window,error,match",
    [
        ((4,), TypeError, "window_size must be a pair"),
        (4, TypeError, "window_size must be a pair"),
        ((1, 2, 3), TypeError, "window_size must be a pair"),
        ((2.0, 0), TypeError, "window_size left must be an int"),
        ((True, 0), TypeError, "window_size left must be an int"),
        ((0, None), TypeError, "window_size right must be an int"),
        ((-2, 0), ValueError, "window_size left must be >= -1"),
        ((3, -7), ValueError, "window_size right must be >= -1"),
    ],
)
def test_bad_window_size(call, window, error, match):
    q, k, v = qkv()
    with pytest.raises(error, match=match):
        CALLS[call](q, k, v, window_size=window)


@pytest.mark.parametrize("call", list(CALLS), ids=list(CALLS))
@pytest.mark.parametrize(
    "softcap,error,match",
    [
        (-1.0, ValueError, "softcap must be finite and >= 0"),
        (math.nan, ValueError, "softcap must be finite and >= 0"),
        (math.inf, ValueError, "softcap must be finite and >= 0"),
        ("50", TypeError, "softcap must be a float"),
        (True, TypeError, "softcap must be a float"),
        (torch.tensor(1.0), TypeError, "softcap must be a float"),
    ],
)
def test_bad_softcap(call, softcap, error, match):
    q, k, v = qkv()
    with pytest.raises(error, match=match):
        CALLS[call](q, k, v, softcap=softcap)


@pytest.mark.parametrize("call", list(CALLS), ids=list(CALLS))
@pytest.mark.parametrize(
    "slopes,error,match",
    [
        ([0.5, 0.25], TypeError, "alibi_slopes must be a torch.Tensor"),
        (torch.ones(3), ValueError, r"alibi_slopes must have shape \(2,\) or \(2, 2\)"),
        (torch.ones(3, 2), ValueError, "alibi_slopes must have shape"),
        (torch.ones(2, 2, 1), ValueError, "alibi_slopes must have shape"),
        (torch.ones(2, dtype=torch.float64), TypeError, "alibi_slopes must be float32"),
        (torch.ones(2, dtype=torch.float16), TypeError, "alibi_slopes must be float32"),
        (torch.ones(2, device="meta"), ValueError, "alibi_slopes is on meta"),
        (torch.ones(2, requires_grad=True), ValueError, "alibi_slopes is not differentiable"),
    ],
)
def test_bad_alibi_slopes(call, slopes, error, match):
    q, k, v = qkv(B=2)
    with pytest.raises(error, match=match):
        CALLS[call](q, k, v, alibi_slopes=slopes)


def test_alibi_slopes_take_the_batch_dims_first():
    """(..., Hq) slopes follow the query's batch dims, (Hq,) slopes broadcast over them."""
    q = torch.randn(2, 3, 4, 8, 16)  # batch dims (2, 3), Hq = 4
    per_batch = torch.rand(2, 3, 4)
    out = fastattn.attention(q, q, q, alibi_slopes=per_batch, backend="cpu")
    for i in range(2):
        for j in range(3):
            one = fastattn.attention(q[i, j], q[i, j], q[i, j], alibi_slopes=per_batch[i, j], backend="cpu")
            torch.testing.assert_close(out[i, j], one)
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        fastattn.attention(q, q, q, alibi_slopes=torch.rand(6, 4))


# ---------------------------------------------------------------------------------------------
# The definitions, against the models' own eager attention, written literally.


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x.repeat_interleave(groups, dim=1)


def gemma2_eager(q, k, v, *, softcap: float, sliding_window: int | None, scaling: float):
    """Gemma 2's eager attention (transformers' gemma2 eager_attention_forward): scores scaled, capped
    with tanh, plus the (sliding-window) causal mask in the finfo.min form, softmax in float32."""
    L, S = q.shape[-2], k.shape[-2]
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    attn_weights = torch.matmul(q, k.transpose(2, 3)) * scaling
    attn_weights = attn_weights / softcap
    attn_weights = torch.tanh(attn_weights)
    attn_weights = attn_weights * softcap
    pos_q = torch.arange(S - L, S)[:, None]  # the queries are the last L positions of the cache
    pos_k = torch.arange(S)[None, :]
    allowed = pos_k <= pos_q
    if sliding_window is not None:
        allowed = allowed & (pos_q - pos_k < sliding_window)
    causal_mask = torch.zeros(L, S, dtype=q.dtype).masked_fill(~allowed, torch.finfo(q.dtype).min)
    attn_weights = attn_weights + causal_mask
    attn_weights = torch.softmax(attn_weights, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(attn_weights, v)


def mistral_eager(q, k, v, *, sliding_window: int):
    """Mistral's eager attention with its sliding-window causal mask: the key at position j is
    visible from the query at position i when j <= i and i - j < sliding_window (finfo.min form)."""
    L, S, E = q.shape[-2], k.shape[-2], q.shape[-1]
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    attn_weights = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(E)
    pos_q = torch.arange(S - L, S)[:, None]
    pos_k = torch.arange(S)[None, :]
    allowed = (pos_k <= pos_q) & (pos_q - pos_k < sliding_window)
    attn_weights = attn_weights.masked_fill(~allowed, torch.finfo(q.dtype).min)
    attn_weights = torch.softmax(attn_weights, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(attn_weights, v)


def bloom_eager(q, k, v, slopes):
    """BLOOM's ALiBi: slope * key position added to every row (a per-row constant away from
    -slope * (i - j), which softmax ignores), under the causal mask."""
    L, S, E = q.shape[-2], k.shape[-2], q.shape[-1]
    alibi = slopes[:, None, None] * torch.arange(S, dtype=q.dtype)[None, None, :]
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(E) + alibi.to(q.dtype)
    causal = torch.ones(L, S, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, torch.finfo(q.dtype).min)
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def _check_against_literal(name, literal, fast, inputs, backend):
    """Forward and backward of `fast` (fastattn, backend) against `literal` in float64 (oracle) and
    in float32 (baseline), with the error-ratio rule."""
    oracle_in = [t.detach().double().requires_grad_() for t in inputs]
    base_in = [t.detach().float().requires_grad_() for t in inputs]
    fast_in = [t.detach().float().requires_grad_() for t in inputs]
    oracle, base, out = literal(*oracle_in), literal(*base_in), fast(*fast_in, backend)
    assert_close_to_oracle(f"{name} {backend} out", out, oracle, base)
    dout = torch.randn(out.shape, dtype=torch.float64)
    grads = [
        torch.autograd.grad((o * dout.to(o.dtype)).sum(), x)
        for o, x in ((oracle, oracle_in), (base, base_in), (out, fast_in))
    ]
    for label, o, b, g in zip(("dq", "dk", "dv"), *grads):
        assert_close_to_oracle(f"{name} {backend} {label}", g, o, b, ratio=3.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,S", [(40, 40), (5, 70)], ids=["prefill", "decode-5"])
def test_gemma2_attention(backend, L, S):
    """Gemma 2: softcap 50 on the scores, query_pre_attn_scalar scaling, a local layer's window."""
    softcap, window, scaling = 50.0, 16, 1 / math.sqrt(24.0)
    q, k, v = qkv(Hq=4, Hkv=2, L=L, S=S, E=32)
    q, k = q * 4, k * 4  # scores of a few tens: the cap matters

    def literal(q, k, v):
        return gemma2_eager(q, k, v, softcap=softcap, sliding_window=window, scaling=scaling)

    def fast(q, k, v, backend):
        return fastattn.attention(
            q, k, v, scale=scaling, enable_gqa=True, softcap=softcap, window_size=(window - 1, 0), backend=backend
        )

    _check_against_literal("gemma2", literal, fast, (q, k, v), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,S", [(48, 48), (1, 80), (9, 80)], ids=["prefill", "decode-1", "decode-9"])
def test_mistral_attention(backend, L, S):
    """Mistral's sliding_window = w is window_size=(w - 1, 0), bottom-right aligned with the cache."""
    window = 20
    q, k, v = qkv(Hq=4, Hkv=1, L=L, S=S, E=16)

    def literal(q, k, v):
        return mistral_eager(q, k, v, sliding_window=window)

    def fast(q, k, v, backend):
        return fastattn.attention(q, k, v, enable_gqa=True, window_size=(window - 1, 0), backend=backend)

    _check_against_literal("mistral", literal, fast, (q, k, v), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bloom_alibi(backend):
    """BLOOM's ALiBi (slope * key position under a causal mask) equals FlashAttention's definition
    (-slope * |i + S - L - j|) with is_causal."""
    H, L = 4, 37
    q, k, v = qkv(Hq=H, Hkv=H, L=L, S=L, E=16)
    slopes = alibi_slopes(H)

    def literal(q, k, v):
        return bloom_eager(q, k, v, slopes.to(q.dtype))

    def fast(q, k, v, backend):
        return fastattn.attention(q, k, v, is_causal=True, alibi_slopes=slopes, backend=backend)

    _check_against_literal("bloom", literal, fast, (q, k, v), backend)


def test_the_documented_order():
    """s = scale q.k -> softcap -> + ALiBi -> + float mask -> band -> softmax, in the reference,
    against the formula written out (L != S, GQA, every modifier at once)."""
    B, Hq, Hkv, L, S, E = 2, 4, 2, 9, 14, 8
    q, k, v = (t.double() for t in qkv(B, Hq, Hkv, L, S, E))
    q = q * 3
    mask = torch.randn(B, 1, L, S, dtype=torch.float64)
    slopes, cap, scale, (left, right) = torch.rand(B, Hq), 2.5, 0.3, (4, 1)
    out, lse = reference.attention(
        q, k, v, mask, scale=scale, enable_gqa=True, window_size=(left, right), softcap=cap,
        alibi_slopes=slopes, return_lse=True,
    )  # fmt: skip
    kk, vv = _repeat_kv(k, 2), _repeat_kv(v, 2)
    i, j = torch.arange(L)[:, None], torch.arange(S)[None, :]
    s = scale * q @ kk.transpose(-1, -2)
    s = cap * torch.tanh(s / cap)
    s = s - slopes.double()[:, :, None, None] * (i + S - L - j).abs()
    s = s + mask
    band = (j >= i + S - L - left) & (j <= i + S - L + right)
    s = s.masked_fill(~band, -math.inf)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))
    torch.testing.assert_close(out, torch.softmax(s, -1) @ vv)


# ---------------------------------------------------------------------------------------------
# Edge cases, on every backend.


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_zero_zero_is_the_aligned_diagonal(backend):
    q, k, v = qkv(L=20, S=20, E=16)
    out = fastattn.attention(q, k, v, window_size=(0, 0), backend=backend)
    torch.testing.assert_close(out, v)  # each query sees exactly its own key: weight 1
    _, weights = reference.attention(q, k, v, window_size=(0, 0), return_weights=True)
    torch.testing.assert_close(weights, torch.eye(20).expand(1, 2, 20, 20))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [(19, 40), (500, 500), (-1, 19)])
def test_windows_wider_than_s_change_nothing(backend, window):
    """L = 20 > S = 17 with left and right >= L - 1 (or -1): every key of the (L, S) matrix is in the
    band, so the window is dropped from the canonical call and the result is the unwindowed one."""
    q, k, v = qkv(L=20, S=17)
    p = canonicalize(q, k, v, window_size=window)
    assert p.features.window_lo is None and p.features.causal_offset is None
    plain, plain_lse = fastattn.attention(q, k, v, backend=backend, return_lse=True)
    out, lse = fastattn.attention(q, k, v, window_size=window, backend=backend, return_lse=True)
    assert torch.equal(out, plain) and torch.equal(lse, plain_lse)


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_that_empties_rows(backend):
    """L = 12 > S = 5 with window (0, 0): query i sees key i - 7 only, so rows 0..6 see nothing:
    output 0, lse = -inf, zero gradients, no NaN anywhere."""
    q, k, v = qkv(L=12, S=5, requires_grad=True)
    out, lse = fastattn.attention(q, k, v, window_size=(0, 0), backend=backend, return_lse=True)
    assert torch.equal(out[:, :, :7], torch.zeros_like(out[:, :, :7]))
    assert torch.isneginf(lse[:, :, :7]).all() and torch.isfinite(lse[:, :, 7:]).all()
    torch.testing.assert_close(out[:, :, 7:], v[:, :, :5])
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert torch.equal(dq[:, :, :7], torch.zeros_like(dq[:, :, :7]))
    torch.testing.assert_close(dv, torch.ones_like(dv))


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_with_huge_logits(backend):
    """Scores ~1e6 saturate the cap: no overflow, no NaN, and the cap bounds every score (lse <=
    cap + log S)."""
    cap, S = 30.0, 24
    q, k, v = qkv(L=16, S=S, requires_grad=True)
    big = [t * 300 for t in (q, k)]
    out, lse = fastattn.attention(*big, v, softcap=cap, backend=backend, return_lse=True)
    oracle, oracle_lse = reference.attention(*big, v, softcap=cap, upcast=True, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert (lse <= cap + math.log(S) + 1e-4).all()
    torch.testing.assert_close(out.double(), oracle, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), oracle_lse, atol=1e-5, rtol=1e-6)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_softcap_gives_nearly_uniform_weights(backend):
    """softcap = 1e-3 squeezes every score into [-1e-3, 1e-3]: the output is within ~2e-3 of the
    mean of V, and still equal to the reference."""
    q, k, v = qkv(L=8, S=30)
    out = fastattn.attention(q * 10, k * 10, v, softcap=1e-3, backend=backend)
    mean = v.mean(dim=2, keepdim=True).expand_as(out)
    assert (out - mean).abs().max() < 2e-3 * v.abs().max() * 2
    oracle = reference.attention(q * 10, k * 10, v, softcap=1e-3, upcast=True)
    torch.testing.assert_close(out.double(), oracle, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_alibi_batch_slopes_are_per_batch_calls(backend):
    """(B, Hq) slopes give each batch entry the result of its own call with its (Hq,) row."""
    q, k, v = qkv(B=3, Hq=4, Hkv=2, L=11, S=19)
    slopes = alibi_slopes(4, 3)
    out = fastattn.attention(q, k, v, enable_gqa=True, is_causal=True, alibi_slopes=slopes, backend=backend)
    for b in range(3):
        one = fastattn.attention(
            q[b : b + 1], k[b : b + 1], v[b : b + 1], enable_gqa=True, is_causal=True, alibi_slopes=slopes[b],
            backend=backend,
        )  # fmt: skip
        torch.testing.assert_close(out[b : b + 1], one)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_float_mask_gradient_with_every_modifier(backend):
    """A float mask that requires grad gets its gradient (through the PyTorch backward, which dispatch
    picks for it) with a window, a softcap and ALiBi on."""
    q, k, v = (t.double() for t in qkv(B=2, Hq=2, Hkv=1, L=13, S=21))
    mask = torch.randn(2, 1, 13, 21, dtype=torch.float64)
    kwargs = dict(enable_gqa=True, window_size=(6, 2), softcap=3.0, alibi_slopes=torch.rand(2))
    got = torch.autograd.grad(
        fastattn.attention(q, k, v, mask.requires_grad_(), backend=backend, **kwargs).sum(), mask
    )[0]
    mask2 = mask.detach().requires_grad_()
    want = torch.autograd.grad(reference.attention(q, k, v, mask2, **kwargs).sum(), mask2)[0]
    torch.testing.assert_close(got, want)


def test_gradcheck_float64_with_every_modifier():
    """gradcheck of the CPU path and the float64 kernels (interpreter) with a window, softcap, ALiBi."""
    q, k, v = (t.double().requires_grad_() for t in qkv(Hq=2, Hkv=1, L=6, S=9, E=4))
    kwargs = dict(enable_gqa=True, window_size=(3, 1), softcap=1.5, alibi_slopes=torch.rand(2))
    for backend in cpu_runnable(("cpu", "triton")):

        def f(q, k, v, backend=backend):
            return fastattn.attention(q, k, v, backend=backend, **kwargs)

        assert torch.autograd.gradcheck(f, (q, k, v))


# ---------------------------------------------------------------------------------------------
# Dispatch: what a call uses, and why SDPA's CPU kernel does not serve it.


def test_used_features_and_sdpa_reasons():
    q = torch.randn(1, 2, 9, 8)
    assert used_features(canonicalize(q, q, q, window_size=(3, 0))) == ["causal", "sliding window"]
    assert used_features(canonicalize(q, q, q, window_size=(-1, 0))) == ["causal"]
    assert used_features(canonicalize(q, q, q, softcap=5.0)) == ["softcap"]
    assert used_features(canonicalize(q, q, q, alibi_slopes=torch.rand(2))) == ["alibi"]
    # (-1, 0) with L == S is SDPA's is_causal: the CPU path may hand it to SDPA's kernel.
    assert sdpa_cpu_reasons(canonicalize(q, q, q, window_size=(-1, 0))) == []
    reasons = sdpa_cpu_reasons(canonicalize(q, q, q, window_size=(3, 0), softcap=5.0, alibi_slopes=torch.rand(2)))
    window_reason = "a sliding window (SDPA would need a materialised (L, S) mask)"
    assert {window_reason, "a softcap", "ALiBi slopes"} <= set(reasons)
    for backend in dispatch.BACKENDS:
        assert dispatch.unsupported_reasons(backend, canonicalize(q, q, q, window_size=(3, 0), softcap=1.0)) in (
            [],
            dispatch.unsupported_reasons(backend, canonicalize(q, q, q)),
        )


def test_window_on_cpu_takes_the_tiled_path(monkeypatch):
    def refuse(p):
        raise AssertionError("SDPA's kernel cannot express a window")

    monkeypatch.setattr(eager_forward, "_sdpa_cpu", refuse)
    q = torch.randn(1, 2, 30, 16)
    out = fastattn.attention(q, q, q, window_size=(5, 0))
    torch.testing.assert_close(out, reference.attention(q, q, q, window_size=(5, 0)))


def test_compiles_without_graph_breaks():
    import torch._dynamo.testing

    slopes = torch.rand(4)

    def f(q, k, v):
        return fastattn.attention(q, k, v, enable_gqa=True, window_size=(7, 0), softcap=20.0, alibi_slopes=slopes)

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, backend=counter, fullgraph=True)
    q = torch.randn(2, 4, 33, 16, requires_grad=True)
    k, v = (torch.randn(2, 2, 33, 16, requires_grad=True) for _ in range(2))
    compiled(q, k, v).sum().backward()
    got = [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    f(q, k, v).sum().backward()
    for a, t in zip(got, (q, k, v)):
        torch.testing.assert_close(a, t.grad)
    assert torch._dynamo.explain(f)(q, k, v).graph_break_count == 0


# ---------------------------------------------------------------------------------------------
# Cost: a window visits L * window scores, not L * S, and never reads the blocks outside its band.


def test_cpu_forward_and_backward_visit_only_the_band(monkeypatch):
    """Count the score elements the CPU path computes: a window of w keys costs ~L * (w + block),
    forward and backward; full attention costs L * S."""
    counts = {"forward": 0, "backward": 0}
    score_step = eager_forward.score_mods_

    def counting(name):
        def step(s, *args, **kwargs):
            counts[name] += s.numel()
            return score_step(s, *args, **kwargs)

        return step

    monkeypatch.setattr(eager_forward, "score_mods_", counting("forward"))
    monkeypatch.setattr(eager_backward, "score_mods_", counting("backward"))
    monkeypatch.setattr(configs, "CPU_FORWARD_TILES", configs.CpuTiles(64, 64, 1 << 20))
    monkeypatch.setattr(configs, "CPU_BACKWARD_TILES", configs.CpuTiles(64, 64))
    L = S = 1024
    w = 64
    q, k, v = qkv(Hq=1, Hkv=1, L=L, S=S, requires_grad=True)
    fastattn.attention(q, k, v, window_size=(w - 1, 0), backend="cpu").sum().backward()
    print(counts)
    assert counts["forward"] <= L * (w + 64)
    # the backward computes each tile's scores once (the forward's row statistics give P), over
    # 64 x 64 tiles taken by key block
    assert counts["backward"] <= L * (w + 2 * 64)
    assert counts["backward"] < L * S / 4


def _poisoned(t: torch.Tensor, rows: slice) -> torch.Tensor:
    t = t.detach().clone()
    t[:, :, rows] = math.nan
    return t


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_blocks_outside_the_band_are_never_read(backend, monkeypatch):
    """NaN in K and V outside the key blocks a window needs (forward, dQ), and in Q and dO outside
    the query blocks it needs (dK/dV): any read of a block outside the band would bring NaN into
    the result (0 * NaN = NaN), so a finite result equal to the clean one proves the skip."""
    monkeypatch.setattr(configs, "CPU_BACKWARD_TILES", configs.CpuTiles(16, 16))
    configs.set_forward_config(lambda *a, **kw: TileConfig(16, 16, 4, 1))
    configs.set_backward_config(lambda *a, **kw: BackwardConfig(TileConfig(16, 16, 4, 1), TileConfig(16, 16, 4, 1)))
    try:
        # Forward and dQ: 16 queries at the end of 256 keys see keys 225..255 (blocks 14, 15).
        q, k, v = qkv(Hq=1, Hkv=1, L=16, S=256)
        kp, vp = _poisoned(k, slice(0, 224)), _poisoned(v, slice(0, 224))
        clean = [t.clone().requires_grad_() for t in (q, k, v)]
        dirty = [q.clone().requires_grad_(), kp.requires_grad_(), vp.requires_grad_()]
        want = fastattn.attention(*clean, window_size=(15, 0), backend="reference")
        got = fastattn.attention(*dirty, window_size=(15, 0), backend=backend)
        torch.testing.assert_close(got, want)
        dq_want = torch.autograd.grad(want.sum(), clean[0])[0]
        dq_got = torch.autograd.grad(got.sum(), dirty[0])[0]
        torch.testing.assert_close(dq_got, dq_want)
        # dK/dV: 16 keys, 256 queries; only queries 240..255 see them (query blocks 15).
        q, k, v = qkv(Hq=1, Hkv=1, L=256, S=16)
        qp = _poisoned(q, slice(0, 240))
        clean = [t.clone().requires_grad_() for t in (q, k, v)]
        dirty = [qp.requires_grad_(), k.clone().requires_grad_(), v.clone().requires_grad_()]
        dout = _poisoned(torch.randn(1, 1, 256, 16), slice(0, 240))
        want = fastattn.attention(*clean, window_size=(15, 0), backend="reference")
        got = fastattn.attention(*dirty, window_size=(15, 0), backend=backend)
        torch.testing.assert_close(got[:, :, 240:], want[:, :, 240:])
        assert torch.equal(got[:, :, :240], torch.zeros_like(got[:, :, :240]))
        dk_want, dv_want = torch.autograd.grad(want, clean[1:], grad_outputs=dout.nan_to_num(0.0))
        dk_got, dv_got = torch.autograd.grad(got, dirty[1:], grad_outputs=dout)  # NaN dO rows reach the op
        torch.testing.assert_close(dk_got, dk_want)
        torch.testing.assert_close(dv_got, dv_want)
    finally:
        configs.set_forward_config(None)
        configs.set_backward_config(None)


def _band_classes(L, S, bm, bn, lower, upper):
    i, j = torch.arange(L)[:, None], torch.arange(S)[None, :]
    keep = torch.ones(L, S, dtype=torch.bool)
    if lower is not None:
        keep &= j >= i + lower
    if upper is not None:
        keep &= j <= i + upper
    rows, cols = math.ceil(L / bm), math.ceil(S / bn)
    cls = torch.empty(rows, cols, dtype=torch.int8)
    for r in range(rows):
        for c in range(cols):
            tile = keep[r * bm : (r + 1) * bm, c * bn : (c + 1) * bn]
            cls[r, c] = BLOCK_FULL if tile.all() else BLOCK_CUT if tile.any() else BLOCK_DEAD
    return cls


@pytest.mark.parametrize(
    "L,S,window,causal",
    [
        (100, 100, (20, 0), False),
        (37, 130, (9, 4), False),
        (130, 37, (20, -1), False),
        (50, 40, (-1, 100), False),
        (64, 100, (30, 30), True),
    ],
    ids=["causal-window", "L<S", "L>S-left-only", "no-op", "empty-band"],
)
def test_window_block_classes_match_brute_force(L, S, window, causal):
    """The host's tile classes (what masked kernels visit) for a window, against the band itself."""
    q, k = torch.randn(1, 1, L, 8), torch.randn(1, 1, S, 8)
    f = canonicalize(q, k, k, is_causal=causal, window_size=window).features
    want = _band_classes(L, S, 16, 32, f.window_lo, f.causal_offset)
    got = causal_block_classes(L, S, 16, 32, f, "cpu")  # (1, N) when nothing depends on the row
    assert torch.equal(got.expand(want.shape), want)


def test_backward_config_hears_of_modifiers():
    """The backward's config function is told when a score modifier is on (its built-in table has
    tiles for that); a replacement gets `modified` only if it declares it."""
    skip_without_cpu_triton()
    seen = []

    def declares(head_dim, head_dim_v, dtype, capability, masked=False, modified=False):
        seen.append(modified)
        return BackwardConfig(TileConfig(16, 16, 4, 1), TileConfig(16, 16, 4, 1))

    def older(head_dim, head_dim_v, dtype, capability, masked=False):
        seen.append("older")
        return BackwardConfig(TileConfig(16, 16, 4, 1), TileConfig(16, 16, 4, 1))

    q, k, v = qkv(L=20, S=20, requires_grad=True)
    try:
        for fn in (declares, older):
            configs.set_backward_config(fn)
            for kwargs in ({}, {"window_size": (3, 0)}, {"softcap": 2.0}):
                out = fastattn.attention(q, k, v, backend="triton", **kwargs)
                torch.autograd.grad(out.sum(), (q, k, v))
    finally:
        configs.set_backward_config(None)
    assert seen == [False, True, True, "older", "older", "older"]
    plain = configs.default_backward_config(64, 64, torch.float32, (8, 0), allow_tf32=True)
    modified = configs.default_backward_config(64, 64, torch.float32, (8, 0), modified=True, allow_tf32=True)
    assert plain.dkdv != modified.dkdv and plain.dq == modified.dq


def test_numpy_scalars_and_empty_problems():
    """NumPy integers and floats are accepted as window sizes and softcaps; empty problems with
    every modifier give empty outputs (L = 0) or zeros with lse = -inf (S = 0)."""
    import numpy as np

    q, k, v = qkv(L=9, S=9)
    a = fastattn.attention(q, k, v, window_size=(np.int64(3), np.int32(0)), softcap=np.float32(2.0))
    torch.testing.assert_close(a, fastattn.attention(q, k, v, window_size=(3, 0), softcap=2.0), rtol=0, atol=0)
    mods = dict(window_size=(2, 1), softcap=3.0, alibi_slopes=torch.rand(2))
    for backend in cpu_runnable(BACKENDS):
        out, lse = fastattn.attention(*qkv(L=0, S=5), backend=backend, return_lse=True, **mods)
        assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)
        out, lse = fastattn.attention(*qkv(L=4, S=0), backend=backend, return_lse=True, **mods)
        assert torch.equal(out, torch.zeros(1, 2, 4, 16)) and torch.isneginf(lse).all()

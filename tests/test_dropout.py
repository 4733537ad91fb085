"""Dropout: the same bits on every backend, SDPA's semantics, reproducible draws, exact gradients.

The keep mask is recovered from outputs with V = identity (out[i, j] = P[i, j] * Z[i, j], nonzero
exactly where key j was kept and visible), so the tests see what each backend dropped without
reaching into it. "triton" runs through Triton's interpreter on CPU tensors (conftest); the GPU
tests (marked gpu) compare the compiled kernel's masks with the CPU path's, bf16 included.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close_to_oracle

import fastattn
import fastattn.fused
from fastattn import dropout, reference
from fastattn.problem import canonicalize

CUDA = torch.cuda.is_available()
NO_TRITON_ON_CPU = fastattn.fused.flavour_error("cpu")
BACKENDS = ["cpu", "triton", "reference"]


@pytest.fixture(autouse=True)
def _skip_triton_without_interpreter(request):
    params = getattr(request.node, "callspec", None)
    if params is not None and params.params.get("backend") == "triton" and NO_TRITON_ON_CPU:
        pytest.skip(NO_TRITON_ON_CPU)


def gen(seed: int = 1234, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def call(backend: str, *args, **kwargs):
    """fastattn.attention on `backend`, or the reference itself."""
    if backend == "reference":
        return reference.attention(*args, **kwargs)
    return fastattn.attention(*args, backend=backend, **kwargs)


def identity_values(B: int, Hkv: int, S: int, dtype, device="cpu") -> torch.Tensor:
    return torch.eye(S, dtype=dtype, device=device).expand(B, Hkv, S, S).contiguous()


def recovered_keep(out: torch.Tensor) -> torch.Tensor:
    """The weights a V = identity call kept (and could see): out[..., i, j] != 0."""
    return out != 0


# ---------------------------------------------------------------------------------------------
# The generator itself


def test_torch_philox_equals_tritons_bit_for_bit():
    """fastattn.dropout.philox (PyTorch integer ops) against tl.philox run by Triton's interpreter,
    on counters and keys that use every bit (the words' and the seed's high bits)."""
    if NO_TRITON_ON_CPU:
        pytest.skip(NO_TRITON_ON_CPU)
    import triton
    import triton.language as tl

    @triton.jit
    def philox_kernel(Out, Seeds, C, N: tl.constexpr):
        i = tl.arange(0, N)
        seed = tl.load(Seeds)
        c0, c1, c2, c3 = (tl.load(C + k * N + i) for k in range(4))
        r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
        for k, r in enumerate((r0, r1, r2, r3)):
            tl.store(Out + k * N + i, r.to(tl.int32, bitcast=True))

    N = 64
    words = torch.randint(0, 2**32, (4, N), dtype=torch.int64)
    words[:, :4] = torch.tensor([0, 1, 2**31, 2**32 - 1])[:, None]
    for seed in (0, 1, 2**32 - 1, 2**32, 2**63 - 2, 6111139894567229884):
        out = torch.empty(4, N, dtype=torch.int32)
        c = (words - (words >= 2**31) * 2**32).to(torch.int32)  # the same bits as int32
        philox_kernel[(1,)](out, torch.tensor([seed]), c, N=N)
        s = torch.tensor(seed)
        ours = dropout.philox(s & dropout.WORD, (s >> 32) & dropout.WORD, *words)
        for k in range(4):
            assert torch.equal(out[k].to(torch.int64) & dropout.WORD, ours[k]), (seed, k)


def test_philox_known_answer():
    """Philox4x32-10 of the Random123 known-answer vectors (counter, key) -> output (kat_vectors)."""
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, expected in cases:
        got = dropout.philox(*(torch.tensor(k) for k in key), *(torch.tensor(c) for c in counter))
        assert tuple(int(w) for w in got) == expected


def test_keep_is_a_function_of_its_counter_not_of_the_tile():
    """Any tile of the keep mask equals the same slice of the whole mask: the grouping of keys in
    fours never depends on where a tile starts."""
    rng = dropout.draw(torch.device("cpu"), gen(3))
    whole = dropout.keep_mask(rng, 0.5, 2, 3, 19, 45)
    heads = torch.arange(2)[:, None] * 3 + torch.arange(3)
    for m0, m1, n0, n1 in [(0, 19, 0, 45), (3, 11, 5, 6), (7, 8, 1, 44), (18, 19, 43, 45), (0, 4, 4, 8)]:
        for fast in (False, True):  # the PyTorch ops and the compiled loop
            tile = dropout.keep(rng, 0.5, heads, m0, m1, n0, n1, fast=fast)
            assert torch.equal(tile, whole[:, :, m0:m1, n0:n1]), (m0, m1, n0, n1, fast)


# ---------------------------------------------------------------------------------------------
# Every backend drops the same weights


MASK_CASES = {
    "plain": {},
    "causal": dict(is_causal=True),
    "bottom-right-window": dict(window_size=(9, 0)),
    "bool-mask": "bool",
    "softcap-alibi": dict(softcap=5.0, alibi_slopes=torch.tensor([0.05, 0.1, 0.02, 0.2])),
}


def case_arguments(case: str, B: int, L: int, S: int, dropout_p: float) -> dict:
    """The keyword arguments of MASK_CASES[case] (bool-mask: a random (B, 1, L, S) mask), with
    dropout_p and GQA."""
    kwargs = dict(MASK_CASES[case]) if case != "bool-mask" else dict(attn_mask=torch.rand(B, 1, L, S) > 0.3)
    return dict(kwargs, dropout_p=dropout_p, enable_gqa=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=["fp32", "fp64", "fp16"])
@pytest.mark.parametrize("case", list(MASK_CASES))
def test_every_backend_keeps_the_weights_the_formula_keeps(backend, dtype, case):
    """With one draw, each backend's recovered keep mask is fastattn.dropout.keep_mask's exactly,
    where the weight is visible (GQA: 4 query heads on 2 KV heads, each its own draws); the
    output is within the error-ratio rule of the float64 reference with the same draw."""
    B, Hq, Hkv, L, S = 2, 4, 2, 37, 70
    q = torch.randn(B, Hq, L, 16, dtype=dtype) * 0.3
    k = torch.randn(B, Hkv, S, 16, dtype=dtype) * 0.3
    v = identity_values(B, Hkv, S, dtype)
    kwargs = case_arguments(case, B, L, S, dropout_p=0.4)
    out = call(backend, q, k, v, generator=gen(7), **kwargs)
    rng = dropout.draw(torch.device("cpu"), gen(7))
    expected = dropout.keep_mask(rng, 0.4, B, Hq, L, S)
    weights = reference.attention(
        q.double(), k.double(), v.double(), **{**kwargs, "dropout_p": 0.0}, return_weights=True
    )[1]
    got = recovered_keep(out)
    assert not (got & ~expected).any(), "a dropped weight reached the output"
    # Where a weight is large enough not to underflow in the output's dtype, it shows iff kept.
    visible = weights > 1e-3
    assert visible.sum() > 500
    assert torch.equal(got & visible, expected & visible), (
        f"{((got != expected) & visible).sum().item()} weights differ"
    )
    oracle = reference.attention(q, k, v, generator=gen(7), upcast=True, **kwargs)
    baseline = reference.attention(q, k, v, generator=gen(7), **kwargs)
    assert_close_to_oracle(f"{backend} {case}", out, oracle, baseline, dtype=dtype)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_varlen_sequence_n_drops_what_a_dense_call_of_batch_n_drops(backend):
    """A packed call's sequence n keeps keep_mask(batch0=n) of its own rows and keys."""
    lens_q, lens_k = [5, 0, 17, 17, 9], [7, 3, 17, 17, 30]
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    S_max = max(lens_k)
    q = torch.randn(sum(lens_q), 2, 16) * 0.3
    k = torch.randn(sum(lens_k), 2, 16) * 0.3
    # V = identity per sequence: key j of a sequence carries e_j (Ev = S_max).
    v = torch.cat([torch.eye(n, S_max) for n in lens_k])[:, None].expand(-1, 2, -1).contiguous()
    out = fastattn.varlen_attention(q, k, v, cu_q, cu_k, 17, S_max, dropout_p=0.5, generator=gen(11), backend=backend)
    rng = dropout.draw(torch.device("cpu"), gen(11))
    oracle = reference.varlen_attention(q, k, v, cu_q, cu_k, 17, S_max, dropout_p=0.5, generator=gen(11))
    torch.testing.assert_close(out, oracle, rtol=1e-5, atol=1e-6)
    for n, (L, S) in enumerate(zip(lens_q, lens_k)):
        if L == 0:
            continue
        rows = out[cu_q[n] : cu_q[n + 1], :, :S].transpose(0, 1)
        assert torch.equal(recovered_keep(rows), dropout.keep_mask(rng, 0.5, 1, 2, L, S, batch0=n)[0]), n


def test_split_kv_decode_drops_the_same_weights():
    """The split-KV forward (decode shapes) splits the keys, not the draws: any split factor gives
    the unsplit result (float64, to rounding)."""
    if NO_TRITON_ON_CPU:
        pytest.skip(NO_TRITON_ON_CPU)
    from fastattn.fused.forward import triton_attention_forward

    q = torch.randn(3, 4, 2, 16, dtype=torch.float64)
    k = torch.randn(3, 4, 150, 16, dtype=torch.float64)
    v = torch.randn(3, 4, 150, 16, dtype=torch.float64)
    p = canonicalize(q, k, v, dropout_p=0.3, generator=gen(5))
    one = triton_attention_forward(p, num_splits=1)[0]
    for splits in (2, 5):
        torch.testing.assert_close(triton_attention_forward(p, num_splits=splits)[0], one, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(
        one, reference.attention(q, k, v, dropout_p=0.3, generator=gen(5)), rtol=1e-12, atol=1e-13
    )


# ---------------------------------------------------------------------------------------------
# Semantics


def test_reference_weights_are_the_dropped_rescaled_weights():
    q, k, v = (torch.randn(2, 3, 9, 8, dtype=torch.float64) for _ in range(3))
    out, w = reference.attention(q, k, v, dropout_p=0.25, generator=gen(2), return_weights=True)
    _, w0 = reference.attention(q, k, v, return_weights=True)
    keep = dropout.keep_mask(dropout.draw(torch.device("cpu"), gen(2)), 0.25, 2, 3, 9, 9)
    torch.testing.assert_close(w, w0 * keep / 0.75, rtol=0, atol=1e-15)
    torch.testing.assert_close(out, w @ v, rtol=0, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_is_that_of_the_scores_before_dropout(backend):
    q, k, v = (torch.randn(1, 2, 13, 16) for _ in range(3))
    _, lse = call(backend, q, k, v, dropout_p=0.6, is_causal=True, return_lse=True)
    _, lse0 = reference.attention(q, k, v, is_causal=True, return_lse=True, upcast=True)
    torch.testing.assert_close(lse.double(), lse0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_stay_zero_with_finite_gradients(backend):
    q, k, v = (torch.randn(1, 2, 6, 16, requires_grad=True) for _ in range(3))
    mask = torch.ones(6, 6, dtype=torch.bool)
    mask[2] = False
    out = call(backend, q, k, v, attn_mask=mask, dropout_p=0.5)
    assert not out.isnan().any()
    assert (out[:, :, 2] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_zero_draws_nothing_and_compiles_away(backend):
    """dropout_p = 0 leaves the generator's state alone and launches no dropout code."""
    from fastattn.fused import plumbing

    q = torch.randn(1, 2, 5, 16)
    state = torch.get_rng_state()
    call(backend, q, q, q, dropout_p=0.0)
    assert torch.equal(torch.get_rng_state(), state)
    p = canonicalize(q, q, q, dropout_p=0.0)
    assert p.rng is None and plumbing.feature_launch_args(p)[1]["HAS_DROPOUT"] is False
    assert plumbing.feature_launch_args(canonicalize(q, q, q, dropout_p=0.1))[1]["HAS_DROPOUT"] is True


def test_the_keep_probability_is_one_minus_p_to_2_pow_minus_32():
    for p in (0.0, 1e-12, 0.1, 0.5, 0.9, 1 - 2**-40):
        t = dropout.threshold(p)
        assert 0 <= t <= 2**32 - 1
        assert abs((1 - t / 2**32) - (1 - p)) <= 2**-32


# ---------------------------------------------------------------------------------------------
# Statistics (of the one function every backend computes, proven bit-identical above)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_fraction_and_its_spread_over_tiles_rows_and_heads(p):
    """Over 2 x 4 x 512 x 512 weights the kept fraction is within 5 sigma of 1 - p; so is the
    rate of every 64 x 64 tile, every row and every head (no structure where blocks, rows or heads
    meet); the four keys that share a Philox call are uncorrelated."""
    B, H, L, S = 2, 4, 512, 512
    keep = dropout.keep_mask(dropout.draw(torch.device("cpu"), gen(21)), p, B, H, L, S).double()
    q = 1.0 - p

    def within(rate, n, sigmas=5.0):
        return (rate - q).abs().max().item() <= sigmas * math.sqrt(q * p / n)

    assert within(keep.mean(), keep.numel())
    tiles = keep.reshape(B, H, L // 64, 64, S // 64, 64).mean(dim=(3, 5))
    assert within(tiles, 64 * 64, sigmas=5.5)  # 512 tiles: 5.5 sigma keeps the chance of a false alarm ~1e-5
    assert within(keep.mean(dim=(0, 1, 3)), B * H * S, sigmas=5.5)  # every row, over batches and heads
    assert within(keep.mean(dim=(2, 3)), L * S)  # every (batch, head)
    x = keep - q
    for shift in (1, 2, 3, 4, 64):  # neighbours within and across Philox calls and tiles
        corr = (x[..., :-shift] * x[..., shift:]).mean() / (p * q)
        assert abs(corr.item()) < 5 / math.sqrt(x[..., shift:].numel()), shift
    corr_rows = (x[:, :, :-1] * x[:, :, 1:]).mean() / (p * q)
    assert abs(corr_rows.item()) < 5 / math.sqrt(x[:, :, 1:].numel())


def test_the_mean_over_seeds_converges_to_attention_without_dropout():
    q, k, v = (torch.randn(1, 2, 16, 16, dtype=torch.float64) for _ in range(3))
    exact, w = reference.attention(q, k, v, return_weights=True)
    n, p = 400, 0.3
    g = gen(9)
    outs = torch.stack([fastattn.attention(q, k, v, dropout_p=p, generator=g, backend="cpu") for _ in range(n)])
    # Var(out) = sum_j w_j^2 v_j^2 * p / (1 - p) per element; the mean of n draws within 5 sigma.
    sigma = torch.sqrt((w**2) @ (v**2) * p / (1 - p) / n)
    assert ((outs.mean(0) - exact).abs() <= 5 * sigma + 1e-12).all()


# ---------------------------------------------------------------------------------------------
# Reproducibility


@pytest.mark.parametrize("backend", BACKENDS)
def test_manual_seed_reproduces_outputs_and_gradients_and_calls_differ(backend):
    def run():
        q, k, v = (torch.randn(1, 2, 9, 16, generator=gen(i), requires_grad=True) for i in range(3))
        out = call(backend, q, k, v, dropout_p=0.5)
        out.sum().backward()
        return out.detach(), q.grad, k.grad, v.grad

    torch.manual_seed(42)
    first, again = run(), run()
    torch.manual_seed(42)
    repeat = run()
    for a, b in zip(first, repeat):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], again[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_explicit_generator_is_honoured_and_the_default_one_untouched(backend):
    q = torch.randn(1, 2, 9, 16)
    torch.manual_seed(1)
    a = call(backend, q, q, q, dropout_p=0.5, generator=gen(77))
    state = torch.get_rng_state()
    torch.manual_seed(2)
    b = call(backend, q, q, q, dropout_p=0.5, generator=gen(77))
    assert torch.equal(a, b)
    torch.manual_seed(1)
    call(backend, q, q, q, dropout_p=0.5, generator=gen(77))
    assert torch.equal(torch.get_rng_state(), state)


def test_the_backward_is_bitwise_deterministic():
    q, k, v = (torch.randn(2, 2, 40, 16, requires_grad=True) for _ in range(3))
    grads = []
    for _ in range(2):
        out = fastattn.attention(q, k, v, dropout_p=0.2, generator=gen(4), backend="cpu")
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("kwargs", [dict(), dict(is_causal=True, enable_gqa=True), dict(window_size=(3, 1), softcap=2.0)],
                         ids=["plain", "causal-gqa", "window-softcap"])  # fmt: skip
def test_gradcheck_with_the_seed_fixed(backend, kwargs):
    Hq = 4 if kwargs.get("enable_gqa") else 2
    q = torch.randn(1, Hq, 7, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 11, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 11, 8, dtype=torch.float64, requires_grad=True)

    def f(q, k, v):
        return fastattn.attention(q, k, v, dropout_p=0.3, generator=gen(8), backend=backend, **kwargs)

    # fast_mode: a random projection of the Jacobian (the full one takes minutes through the interpreter).
    assert torch.autograd.gradcheck(f, (q, k, v), atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_gradients_follow_the_error_ratio_rule_against_the_reference_with_the_same_mask(backend, dtype):
    B, Hq, Hkv, L, S, E = 2, 4, 2, 33, 47, 32
    inputs = [torch.randn(B, h, n, E) for h, n in ((Hq, L), (Hkv, S), (Hkv, S))]
    dout = torch.randn(B, Hq, L, E)
    kwargs = dict(dropout_p=0.25, enable_gqa=True, is_causal=True)

    def grads(fn, dt, **extra):
        ts = [t.to(dt).requires_grad_() for t in inputs]
        out = fn(*ts, generator=gen(6), **kwargs, **extra)
        return torch.autograd.grad(out, ts, dout.to(out.dtype))

    got = grads(lambda *a, **kw: fastattn.attention(*a, backend=backend, **kw), dtype)
    oracle = grads(reference.attention, torch.float64)
    baseline = grads(reference.attention, dtype)
    for name, g, o, b in zip(("dq", "dk", "dv"), got, oracle, baseline):
        assert_close_to_oracle(f"{backend} {name}", g, o, b, dtype=dtype, ratio=3.0)


def test_a_float_mask_gets_its_gradient_through_dropout():
    q, k, v = (torch.randn(1, 2, 6, 8, dtype=torch.float64) for _ in range(3))
    mask = torch.randn(1, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    out = fastattn.attention(q, k, v, attn_mask=mask, dropout_p=0.4, generator=gen(1), backend="cpu")
    (got,) = torch.autograd.grad(out.sum(), mask)
    mask_r = mask.detach().clone().requires_grad_()
    ref = reference.attention(q, k, v, attn_mask=mask_r, dropout_p=0.4, generator=gen(1))
    (expected,) = torch.autograd.grad(ref.sum(), mask_r)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_varlen_gradients_with_dropout(backend):
    cu = torch.tensor([0, 5, 5, 21, 30], dtype=torch.int32)
    q, k, v = (torch.randn(30, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = fastattn.varlen_attention(q, k, v, cu, cu, 16, 16, window_size=(-1, 0), dropout_p=0.3, generator=gen(2),
                                    backend=backend)  # fmt: skip
    got = torch.autograd.grad(out.sum(), (q, k, v))
    ref = reference.varlen_attention(q, k, v, cu, cu, 16, 16, window_size=(-1, 0), dropout_p=0.3, generator=gen(2))
    for g, r in zip(got, torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Training, compile, bad input


class TinyEncoder(torch.nn.Module):
    """One attention layer with dropout 0.1 on its weights, for a few training steps."""

    def __init__(self, backend: str, dim: int = 32, heads: int = 2):
        super().__init__()
        self.backend, self.heads = backend, heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = fastattn.attention(q, k, v, dropout_p=0.1, is_causal=True, generator=generator, backend=self.backend)
        return self.out(a.transpose(1, 2).reshape(B, L, D))


def train(backend: str, device: str = "cpu", steps: int = 12) -> list[float]:
    torch.manual_seed(0)
    model = TinyEncoder(backend).to(device)
    x = torch.randn(4, 24, 32, generator=gen(1)).to(device)
    target = torch.randn(4, 24, 32, generator=gen(2)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = gen(3)  # a CPU generator: the same draws for a run on any device
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x, g), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_training_with_dropout_decreases_the_loss_and_backends_share_the_curve():
    cpu = train("cpu")
    assert cpu[-1] < cpu[0] * 0.98 and sum(cpu[-3:]) < sum(cpu[:3])
    ref = train("reference")
    assert max(abs(a - b) for a, b in zip(cpu, ref)) < 1e-5
    if not NO_TRITON_ON_CPU:
        tri = train("triton", steps=4)
        assert max(abs(a - b) for a, b in zip(cpu, tri)) < 1e-5


def test_compiles_with_fullgraph_and_drops_like_eager_semantics():
    """torch.compile(fullgraph=True) traces the draw (torch.randint on the default generator) and
    the op: no graph break, and the result is a dropout of the reference's weights (each weight
    is 0 or P / (1 - p)) with about 1 - p of them kept."""
    torch._dynamo.reset()
    q = torch.randn(1, 2, 32, 16) * 0.3
    v = identity_values(1, 2, 32, torch.float32)
    f = torch.compile(lambda q, v: fastattn.attention(q, q, v, dropout_p=0.5, backend="cpu"), fullgraph=True)
    out = f(q, v)
    _, w = reference.attention(q, q, v, return_weights=True)
    kept = out != 0
    torch.testing.assert_close(out[kept], (w / 0.5)[kept], rtol=1e-5, atol=1e-6)
    assert 0.4 < kept.double().mean().item() < 0.6
    assert not torch.equal(f(q, v), out)  # each call draws anew


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(dropout_p=-0.1), ValueError, ["dropout_p", "[0, 1)"]),
        (dict(dropout_p=1.0), ValueError, ["dropout_p"]),
        (dict(dropout_p=float("nan")), ValueError, ["dropout_p"]),
        (dict(dropout_p=0.1, generator=123), TypeError, ["generator"]),
        (dict(dropout_p=0.1, generator=torch.random.default_generator.get_state()), TypeError, ["generator"]),
    ],
    ids=["negative", "one", "nan", "int-generator", "state-not-generator"],
)
def test_bad_dropout_arguments(kwargs, error, words):
    q = torch.randn(1, 2, 4, 8)
    for fn in (fastattn.attention, reference.attention):
        with pytest.raises(error) as info:
            fn(q, q, q, **kwargs)
        assert all(w in str(info.value) for w in words), str(info.value)


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("case", ["plain", "causal", "bool-mask"])
def test_gpu_kernel_keeps_what_the_cpu_path_keeps(dtype, case):
    B, Hq, Hkv, L, S = 2, 4, 2, 129, 200
    q = torch.randn(B, Hq, L, 64, dtype=dtype) * 0.3
    k = torch.randn(B, Hkv, S, 64, dtype=dtype) * 0.3
    v = identity_values(B, Hkv, S, dtype)
    kwargs = case_arguments(case, B, L, S, dropout_p=0.3)
    cpu = fastattn.attention(q, k, v, generator=gen(5), backend="cpu", **kwargs)
    cuda_kwargs = {n: (t.cuda() if isinstance(t, torch.Tensor) else t) for n, t in kwargs.items()}
    out = fastattn.attention(q.cuda(), k.cuda(), v.cuda(), generator=gen(5), backend="triton", **cuda_kwargs)
    assert torch.equal(recovered_keep(out.cpu()), recovered_keep(cpu))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_training_curve_equals_the_cpu_one():
    cpu, gpu = train("cpu"), train("triton", device="cuda")
    assert max(abs(a - b) for a, b in zip(cpu, gpu)) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_a_generator_of_another_device_raises():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="generator"):
        fastattn.attention(q, q, q, dropout_p=0.1, generator=torch.Generator(device="cuda"))
    out = fastattn.attention(q.cuda(), q.cuda(), q.cuda(), dropout_p=0.1, generator=gen(1))  # a CPU one is fine
    assert out.is_cuda

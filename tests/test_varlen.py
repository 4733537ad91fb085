"""fastattn.varlen_attention: packed variable-length batches and KV-cache decoding.

Every backend against the per-sequence oracle (fastattn.reference.varlen_attention, a loop over
reference.attention), against fastattn.attention on the padded batch, paged caches against
contiguous ones, split-KV factors against each other, gradients against float64 autograd, bad
input, torch.compile. "triton" runs here through Triton's interpreter on CPU tensors (conftest);
the GPU runs the same checks in bf16 (marked gpu).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from helpers import assert_close_to_oracle

import fastattn
from fastattn import configs, reference
from fastattn.fused.forward import triton_attention_forward
from fastattn.problem import canonicalize

try:
    from torch.nn.attention.varlen import AuxRequest, varlen_attn
except ImportError:  # an older torch: any object with an lse attribute will do
    varlen_attn = None

    class AuxRequest:  # noqa: D101 - a stand-in for torch's NamedTuple
        def __init__(self, lse=False):
            self.lse = lse


CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# (query lengths, key lengths) per sequence: empty sequences, length 1, ragged, one long among short
LENGTHS = {
    "ragged": ([3, 0, 37, 1, 20], [4, 2, 37, 90, 7]),
    "equal": ([16, 16, 16], [16, 16, 16]),
    "long-among-short": ([1, 2, 70, 1], [2, 3, 70, 1]),
    "decode": ([1, 1, 1, 1], [5, 33, 64, 17]),
    "no-keys": ([4, 2, 3], [0, 9, 0]),
}

MODIFIERS = {
    "plain": {},
    "causal": dict(window_size=(-1, 0)),
    "window": dict(window_size=(5, 0)),
    "window-both": dict(window_size=(3, 2)),
    "softcap": dict(softcap=3.0, window_size=(-1, 0)),
    "alibi": dict(alibi="per-seq", window_size=(-1, 0)),
    "all": dict(window_size=(7, 1), softcap=2.0, alibi="shared"),
}


def cu(lengths, device=DEVICE) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def packed(lens_q, lens_k, Hq=4, Hkv=2, E=16, Ev=24, dtype=torch.float32, device=DEVICE):
    q = torch.randn(sum(lens_q), Hq, E, dtype=dtype, device=device)
    k = torch.randn(sum(lens_k), Hkv, E, dtype=dtype, device=device)
    v = torch.randn(sum(lens_k), Hkv, Ev, dtype=dtype, device=device)
    args = (q, k, v, cu(lens_q, device), cu(lens_k, device), max(lens_q, default=0), max(lens_k, default=0))
    return args


def modifier_kwargs(name: str, N: int, Hq: int, device=DEVICE) -> dict:
    kw = dict(MODIFIERS[name], enable_gqa=True)
    alibi = kw.pop("alibi", None)
    if alibi == "per-seq":
        kw["alibi_slopes"] = torch.rand(N, Hq, device=device)
    elif alibi == "shared":
        kw["alibi_slopes"] = torch.rand(Hq, device=device)
    return kw


def oracle_and_baseline(args, kw):
    oracle = reference.varlen_attention(*args, return_aux=AuxRequest(lse=True), upcast=True, **kw)
    baseline = reference.varlen_attention(*args, return_aux=AuxRequest(lse=True), **kw)
    return oracle, baseline


def check(name, got, oracle, baseline, dtype):
    (out, lse), (o_out, o_lse), (b_out, b_lse) = got, oracle, baseline
    assert out.shape == o_out.shape and out.is_contiguous()
    assert lse.shape == o_lse.shape and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_to_oracle(f"{name} out", out, o_out, b_out)
    assert_close_to_oracle(f"{name} lse", lse, o_lse, b_lse, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The call: torch's signature, then every backend against the oracle.


@pytest.mark.skipif(varlen_attn is None, reason="this torch has no torch.nn.attention.varlen")
def test_signature_matches_torch_varlen_attn():
    ours = list(inspect.signature(fastattn.varlen_attention).parameters.values())
    theirs = list(inspect.signature(varlen_attn).parameters.values())
    assert [p.name for p in theirs] == [p.name for p in ours[: len(theirs)]]
    for a, b in zip(theirs, ours):
        assert (a.kind, a.default) == (b.kind, b.default), a.name
    assert [p.name for p in ours[len(theirs) :]] == ["softcap", "alibi_slopes", "dropout_p", "generator", "backend"]


BACKEND_DTYPES = [("cpu", torch.float32), ("cpu", torch.bfloat16), ("cpu", torch.float16), ("cpu", torch.float64)]
BACKEND_DTYPES += [("triton", torch.float32)]
BACKEND_DTYPES += [("triton", torch.float16), ("triton", torch.float64), ("reference", torch.float32)]


@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("modifier", list(MODIFIERS))
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_packed_matches_oracle(backend, modifier, lengths):
    lens_q, lens_k = LENGTHS[lengths]
    args = packed(lens_q, lens_k)
    kw = modifier_kwargs(modifier, len(lens_q), 4)
    got = fastattn.varlen_attention(*args, return_aux=AuxRequest(lse=True), backend=backend, **kw)
    check(f"{backend} {modifier} {lengths}", got, *oracle_and_baseline(args, kw), torch.float32)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_random_packed_batches(backend, seed):
    """Random lengths (0 included) and a random modifier set, against the oracle."""
    g = torch.Generator().manual_seed(seed)
    N = int(torch.randint(1, 7, (), generator=g))
    lens_q = torch.randint(0, 40, (N,), generator=g).tolist()
    lens_k = [max(0, L + int(d)) for L, d in zip(lens_q, torch.randint(-5, 60, (N,), generator=g))]
    modifier = list(MODIFIERS)[seed % len(MODIFIERS)]
    args = packed(lens_q, lens_k)
    kw = modifier_kwargs(modifier, N, 4)
    got = fastattn.varlen_attention(*args, return_aux=AuxRequest(lse=True), backend=backend, **kw)
    check(f"{backend} seed {seed} {modifier} {lens_q} {lens_k}", got, *oracle_and_baseline(args, kw), torch.float32)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=[f"{b}-{str(d)[6:]}" for b, d in BACKEND_DTYPES])
def test_packed_dtypes(backend, dtype):
    if CUDA and backend == "triton" and dtype == torch.float64:
        pytest.skip("float64 runs the kernel only through Triton's interpreter (CPU tensors)")
    args = packed(*LENGTHS["ragged"], dtype=dtype)
    kw = modifier_kwargs("all", 5, 4)
    got = fastattn.varlen_attention(*args, return_aux=AuxRequest(lse=True), backend=backend, **kw)
    assert got[0].dtype == dtype
    check(f"{backend} {dtype}", got, *oracle_and_baseline(args, kw), dtype)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_packed_equals_padded_batch_with_padding_mask(backend, causal):
    """The packed call equals fastattn.attention on the padded batch with a key padding mask (for
    causal, sequences with L == S, where top-left and bottom-right agree)."""
    lens = [5, 19, 1, 12]
    lens_k = lens if causal else [9, 3, 30, 12]
    q, k, v, cq, ck, mq, mk = packed(lens, lens_k, E=16, Ev=16)
    N, Hq, Hkv = len(lens), 4, 2
    qp = q.new_zeros(N, Hq, mq, 16)
    kp, vp = k.new_zeros(N, Hkv, mk, 16), v.new_zeros(N, Hkv, mk, 16)
    keep = torch.zeros(N, 1, 1, mk, dtype=torch.bool, device=q.device)
    for n in range(N):
        qp[n, :, : lens[n]] = q[cq[n] : cq[n + 1]].transpose(0, 1)
        kp[n, :, : lens_k[n]] = k[ck[n] : ck[n + 1]].transpose(0, 1)
        vp[n, :, : lens_k[n]] = v[ck[n] : ck[n + 1]].transpose(0, 1)
        keep[n, ..., : lens_k[n]] = True
    window = (-1, 0) if causal else (-1, -1)
    out = fastattn.varlen_attention(q, k, v, cq, ck, mq, mk, window_size=window, enable_gqa=True, backend=backend)
    dense = fastattn.attention(qp, kp, vp, keep, is_causal=causal, enable_gqa=True, backend=backend)
    for n in range(N):
        torch.testing.assert_close(out[cq[n] : cq[n + 1]], dense[n, :, : lens[n]].transpose(0, 1))


def test_reference_returns_each_sequences_weights():
    args = packed([2, 3], [4, 3])
    out, weights = reference.varlen_attention(*args, enable_gqa=True, window_size=(-1, 0), return_weights=True)
    assert [tuple(w.shape) for w in weights] == [(4, 2, 4), (4, 3, 3)]
    for w in weights:
        torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
    assert weights[0][:, 0, 3].eq(0).all()  # bottom-right causal: the first query of 2 sees keys 0..2


def test_return_aux_takes_any_object_with_lse_and_refuses_others():
    args = packed([3], [3])
    out = fastattn.varlen_attention(*args, enable_gqa=True, return_aux=AuxRequest(lse=False))
    assert isinstance(out, torch.Tensor)
    with pytest.raises(TypeError, match="return_aux"):
        fastattn.varlen_attention(*args, enable_gqa=True, return_aux=True)


# ---------------------------------------------------------------------------------------------
# KV caches: seqused_k, pages in any order, split-KV.


def paged_cache(used, page_size, Hkv=2, E=32, extra_pages=3, dtype=torch.float32):
    """A cache of len(used) sequences, contiguous (slots of max pages) and paged (the same keys in
    pages of a random permutation of the pool)."""
    N = len(used)
    pages_per_seq = max(math.ceil(u / page_size) for u in used) + 1
    pool_pages = N * pages_per_seq + extra_pages
    slot = pages_per_seq * page_size
    k = torch.randn(N * slot, Hkv, E, dtype=dtype, device=DEVICE)
    v = torch.randn(N * slot, Hkv, E, dtype=dtype, device=DEVICE)
    table = torch.randperm(pool_pages, device=DEVICE)[: N * pages_per_seq].reshape(N, pages_per_seq).int()
    pool_k = torch.randn(pool_pages, page_size, Hkv, E, dtype=dtype, device=DEVICE)
    pool_v = torch.randn(pool_pages, page_size, Hkv, E, dtype=dtype, device=DEVICE)
    kk, vv = k.view(N, pages_per_seq, page_size, Hkv, E), v.view(N, pages_per_seq, page_size, Hkv, E)
    for n in range(N):
        pool_k[table[n].long()] = kk[n]
        pool_v[table[n].long()] = vv[n]
    cu_k = torch.arange(0, (N + 1) * slot, slot, dtype=torch.int32, device=DEVICE)
    seqused = torch.tensor(used, dtype=torch.int32, device=DEVICE)
    return (k, v, cu_k), (pool_k, pool_v, table), seqused


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("lens_q", [[1, 1, 1], [3, 1, 5]], ids=["decode", "chunked-prefill"])
def test_paged_cache_equals_contiguous_cache(backend, page_size, lens_q):
    used = [5, 40, 33]  # partly filled last pages, slots longer than what is used
    (k, v, cu_k), (pool_k, pool_v, table), seqused = paged_cache(used, page_size)
    q = torch.randn(sum(lens_q), 4, 32, device=DEVICE)
    cq = cu(lens_q)
    kw = dict(enable_gqa=True, window_size=(-1, 0), seqused_k=seqused, return_aux=AuxRequest(lse=True))
    slot_args = (q, k, v, cq, cu_k, max(lens_q), 64)
    paged_args = (q, pool_k, pool_v, cq, None, max(lens_q), 64)
    contiguous = fastattn.varlen_attention(*slot_args, backend=backend, **kw)
    paged = fastattn.varlen_attention(*paged_args, block_table=table, backend=backend, **kw)
    oracle, baseline = oracle_and_baseline(slot_args, {k: v for k, v in kw.items() if k != "return_aux"})
    check(f"{backend} contiguous cache", contiguous, oracle, baseline, torch.float32)
    check(f"{backend} paged cache", paged, oracle, baseline, torch.float32)
    # seqused_k really cuts the slot: the oracle on the used keys alone agrees
    trimmed_k = torch.cat([k[cu_k[n] : cu_k[n] + used[n]] for n in range(3)])
    trimmed_v = torch.cat([v[cu_k[n] : cu_k[n] + used[n]] for n in range(3)])
    alone = reference.varlen_attention(q, trimmed_k, trimmed_v, cq, cu(used), max(lens_q), 64, enable_gqa=True,
                                       window_size=(-1, 0), upcast=True)  # fmt: skip
    torch.testing.assert_close(alone, oracle[0])


def test_paged_cache_takes_none_or_a_slot_cu_seq_k():
    used = [7, 20]
    (k, v, cu_k), (pool_k, pool_v, table), seqused = paged_cache(used, 16)
    q = torch.randn(2, 4, 32, device=DEVICE)
    kw = dict(enable_gqa=True, seqused_k=seqused, block_table=table)
    a = fastattn.varlen_attention(q, pool_k, pool_v, cu([1, 1]), None, 1, 32, **kw)
    b = fastattn.varlen_attention(q, pool_k, pool_v, cu([1, 1]), cu_k, 1, 32, **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_triton_refuses_pages_not_a_multiple_of_16_and_auto_serves_them():
    (k, v, cu_k), (pool_k, pool_v, table), seqused = paged_cache([7, 20], 8)
    q = torch.randn(2, 4, 32, device=DEVICE)
    kw = dict(enable_gqa=True, seqused_k=seqused, block_table=table)
    with pytest.raises(fastattn.BackendUnavailable, match="multiple of 16"):
        fastattn.varlen_attention(q, pool_k, pool_v, cu([1, 1]), None, 1, 32, backend="triton", **kw)
    out = fastattn.varlen_attention(q, pool_k, pool_v, cu([1, 1]), None, 1, 32, **kw)
    oracle = reference.varlen_attention(q, pool_k, pool_v, cu([1, 1]), None, 1, 32, upcast=True, **kw)
    torch.testing.assert_close(out, oracle.float())


@pytest.mark.parametrize("modifier", ["plain", "window", "all"])
def test_split_kv_factors_agree(modifier):
    lens_q, lens_k = [1, 3, 1], [300, 77, 5]
    args = packed(lens_q, lens_k, E=32, Ev=32)
    kw = modifier_kwargs(modifier, 3, 4)
    oracle, baseline = oracle_and_baseline(args, kw)
    for splits in (1, 2, 3, 7):
        got = fastattn.varlen_attention(*args, num_splits=splits, return_aux=AuxRequest(lse=True), backend="triton",
                                        **kw)  # fmt: skip
        check(f"num_splits={splits}", got, oracle, baseline, torch.float32)


def test_num_splits_1_is_batch_invariant_bitwise():
    """With num_splits=1 a sequence's output does not depend on what else is in the batch."""
    torch.manual_seed(1)
    q1, k1, v1 = (
        torch.randn(1, 4, 32, device=DEVICE),
        torch.randn(200, 2, 32, device=DEVICE),
        torch.randn(200, 2, 32, device=DEVICE),
    )
    alone = fastattn.varlen_attention(q1, k1, v1, cu([1]), cu([200]), 1, 200, enable_gqa=True, num_splits=1,
                                      backend="triton")  # fmt: skip
    others_q, others_k = torch.randn(3, 4, 32, device=DEVICE), torch.randn(500, 2, 32, device=DEVICE)
    q = torch.cat([others_q[:2], q1, others_q[2:]])
    k = torch.cat([others_k[:100], k1, others_k[100:]])
    v = torch.cat([torch.randn(100, 2, 32, device=DEVICE), v1, torch.randn(400, 2, 32, device=DEVICE)])
    batched = fastattn.varlen_attention(q, k, v, cu([1, 1, 1, 1]), cu([50, 50, 200, 400]), 1, 400, enable_gqa=True,
                                        num_splits=1, backend="triton")  # fmt: skip
    assert torch.equal(batched[2], alone[0])


@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (40, 0)])
def test_dense_attention_split_kv_factors_agree(window):
    """fastattn.attention's decode shapes (L small, S large) through the split-KV forward."""
    q, k, v = (
        torch.randn(2, 4, 2, 32, device=DEVICE),
        torch.randn(2, 2, 300, 32, device=DEVICE),
        torch.randn(2, 2, 300, 32, device=DEVICE),
    )
    kw = dict(enable_gqa=True, window_size=window, softcap=5.0)
    oracle = reference.attention(q, k, v, upcast=True, return_lse=True, **kw)
    baseline = reference.attention(q, k, v, return_lse=True, **kw)
    p = canonicalize(q, k, v, enable_gqa=True, window_size=window, softcap=5.0)
    for splits in (1, 2, 3, 7):
        out, lse, _ = triton_attention_forward(p, num_splits=splits)
        assert_close_to_oracle(f"splits={splits} out", out, oracle[0], baseline[0])
        assert_close_to_oracle(f"splits={splits} lse", lse, oracle[1], baseline[1], dtype=torch.float32)


def test_split_heuristic():
    assert configs.kv_splits(8, 100_000, 64, None) == 1  # off a GPU
    assert configs.kv_splits(264, 100_000, 64, 132) == 1  # the programs already fill the GPU
    assert configs.kv_splits(8, 100_000, 64, 132) == 33  # two waves
    assert configs.kv_splits(1, 10**7, 64, 132) == configs.MAX_KV_SPLITS
    assert configs.kv_splits(8, 512, 64, 132) == 2  # each split keeps >= 4 key blocks


# ---------------------------------------------------------------------------------------------
# Gradients.


def _grads(fn, args, g):
    leaves = [t.detach().clone().requires_grad_() for t in args[:3]]
    fn(*leaves, *args[3:]).backward(g)
    return [t.grad for t in leaves]


@pytest.mark.parametrize("modifier", ["plain", "causal", "window-both", "softcap", "alibi", "all"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_packed_gradients_match_float64_autograd(backend, modifier):
    lens_q, lens_k = [3, 0, 37, 1, 20, 5], [4, 2, 37, 90, 7, 0]
    args = packed(lens_q, lens_k)
    kw = modifier_kwargs(modifier, len(lens_q), 4)
    g = torch.randn(sum(lens_q), 4, 24, device=DEVICE)
    got = _grads(lambda *a: fastattn.varlen_attention(*a, backend=backend, **kw), args, g)
    wide = [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args]
    oracle = _grads(lambda *a: reference.varlen_attention(*a, **kw), wide, g.double())
    baseline = _grads(lambda *a: reference.varlen_attention(*a, **kw), args, g)
    for name, a, o, b in zip(("dq", "dk", "dv"), got, oracle, baseline):
        assert a.shape == o.shape
        assert_close_to_oracle(f"{backend} {modifier} {name}", a, o, b, ratio=3.0)


def test_triton_packed_backward_is_bitwise_deterministic():
    args = packed(*LENGTHS["ragged"])
    kw = modifier_kwargs("all", 5, 4)
    g = torch.randn(61, 4, 24, device=DEVICE)
    first = _grads(lambda *a: fastattn.varlen_attention(*a, backend="triton", **kw), args, g)
    second = _grads(lambda *a: fastattn.varlen_attention(*a, backend="triton", **kw), args, g)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("paged", [False, True], ids=["seqused_k", "block_table"])
def test_kv_cache_calls_run_forward_under_autograd_and_refuse_the_gradient(paged):
    (k, v, cu_k), (pool_k, pool_v, table), seqused = paged_cache([5, 9], 16)
    q = torch.randn(2, 4, 32, device=DEVICE, requires_grad=True)
    kw = dict(enable_gqa=True, seqused_k=seqused)
    if paged:
        out = fastattn.varlen_attention(q, pool_k, pool_v, cu([1, 1]), None, 1, 16, block_table=table, **kw)
    else:
        out = fastattn.varlen_attention(q, k, v, cu([1, 1]), cu_k, 1, 16, **kw)
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="inference only"):
        out.sum().backward()


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument.


def _bad(case):
    q, k, v, cq, ck, mq, mk = packed([3, 5], [4, 6])
    call = dict(query=q, key=k, value=v, cu_seq_q=cq, cu_seq_k=ck, max_q=mq, max_k=mk, enable_gqa=True)
    return call, case(call)


BAD = {
    "cu_seq_q int64": (lambda c: c.update(cu_seq_q=c["cu_seq_q"].long()), TypeError, "cu_seq_q must be int32"),
    "cu_seq_k 2-D": (lambda c: c.update(cu_seq_k=c["cu_seq_k"][None]), ValueError, "cu_seq_k must have 1 dim"),
    "cu_seq_q list": (lambda c: c.update(cu_seq_q=[0, 3, 8]), TypeError, "cu_seq_q must be a torch.Tensor"),
    "cu_seq_q not from 0": (lambda c: c.update(cu_seq_q=cu([3, 5]) + 1), ValueError, "cu_seq_q must start at 0"),
    "cu_seq_k decreasing": (
        lambda c: c.update(cu_seq_k=torch.tensor([0, 7, 4], dtype=torch.int32, device=DEVICE)),
        ValueError,
        "cu_seq_k must be non-decreasing",
    ),
    "cu_seq_q short of T": (lambda c: c.update(cu_seq_q=cu([3, 4])), ValueError, r"cu_seq_q\[-1\] = 7 must equal"),
    "cu_seq_k sizes differ": (lambda c: c.update(cu_seq_k=cu([4, 3, 3])), ValueError, "cu_seq_k must have N"),
    "max_q too small": (lambda c: c.update(max_q=4), ValueError, "max_q = 4 is smaller"),
    "max_k too small": (lambda c: c.update(max_k=5), ValueError, "max_k = 5 is smaller"),
    "max_q float": (lambda c: c.update(max_q=5.0), TypeError, "max_q must be an int"),
    "heads without gqa": (lambda c: c.update(enable_gqa=False), ValueError, "enable_gqa=True"),
    "head dims differ": (lambda c: c.update(key=c["key"][..., :8]), ValueError, "head dim of query"),
    "query 4-D": (lambda c: c.update(query=c["query"][None]), ValueError, r"query must be \(T_q, Hq, E\)"),
    "block_table without seqused_k": (
        lambda c: c.update(
            block_table=torch.zeros(2, 1, dtype=torch.int32, device=DEVICE), key=c["key"][None], value=c["value"][None]
        ),  # fmt: skip
        ValueError,
        "block_table needs seqused_k",
    ),
    "seqused_k over the slot": (
        lambda c: c.update(seqused_k=torch.tensor([5, 6], dtype=torch.int32, device=DEVICE)),
        ValueError,
        "seqused_k",
    ),
    "seqused_k int64": (
        lambda c: c.update(seqused_k=torch.tensor([4, 6], device=DEVICE)),
        TypeError,
        "seqused_k must be int32",
    ),
    "num_splits 0": (lambda c: c.update(num_splits=0), ValueError, "num_splits must be >= 1"),
    "window": (lambda c: c.update(window_size=(-2, 0)), ValueError, "window_size left"),
    "alibi shape": (lambda c: c.update(alibi_slopes=torch.rand(3, 4, device=DEVICE)), ValueError, "alibi_slopes"),
}


@pytest.mark.parametrize("call", [fastattn.varlen_attention, reference.varlen_attention], ids=["fastattn", "reference"])
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input(call, name):
    edit, error, match = BAD[name]
    q, k, v, cq, ck, mq, mk = packed([3, 5], [4, 6])
    kw = dict(query=q, key=k, value=v, cu_seq_q=cq, cu_seq_k=ck, max_q=mq, max_k=mk, enable_gqa=True)
    edit(kw)
    args = [kw.pop(n) for n in ("query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k")]
    with pytest.raises(error, match=match):
        call(*args, **kw)


def test_page_index_outside_the_pool():
    (k, v, cu_k), (pool_k, pool_v, table), seqused = paged_cache([5, 9], 16)
    bad = table.clone()
    bad[1, 0] = pool_k.shape[0]
    with pytest.raises(ValueError, match="page index outside the pool"):
        fastattn.varlen_attention(torch.randn(2, 4, 32, device=DEVICE), pool_k, pool_v, cu([1, 1]), None, 1, 16, enable_gqa=True,
                                  seqused_k=seqused, block_table=bad)  # fmt: skip
    with pytest.raises(ValueError, match="more keys than block_table"):
        fastattn.varlen_attention(torch.randn(2, 4, 32, device=DEVICE), pool_k, pool_v, cu([1, 1]), None, 1, 1000, enable_gqa=True,
                                  seqused_k=seqused * 100, block_table=table)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The op and torch.compile.


def test_opcheck_packed_forward_and_backward():
    from fastattn.ops import attention_backward, attention_forward
    from fastattn.packed import canonicalize_varlen

    q, k, v, cq, ck, mq, mk = packed([3, 0, 5], [4, 2, 6])
    p = canonicalize_varlen(q, k, v, cq, ck, mq, mk, enable_gqa=True, window_size=(2, 0), softcap=2.0,
                            alibi_slopes=torch.rand(3, 4, device=DEVICE), dropout_p=0.2)  # fmt: skip
    ints, floats = p.features.pack()
    args = (p.q, p.k, p.v, None, p.alibi, p.rng, *p.packing.tensors(), ints, floats, p.packing.sizes(), "cpu")
    torch.library.opcheck(attention_forward, args)
    out, lse, stats = attention_forward(*args)
    bargs = (torch.randn_like(out), None, p.q, p.k, p.v, out, lse, stats, None, p.alibi, p.rng, cq, ck, ints, floats,
             p.packing.sizes(), "cpu", False)  # fmt: skip
    torch.library.opcheck(attention_backward, bargs)


def test_compile_dynamic_has_no_graph_break_and_no_recompile_per_batch():
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()

    def step(q, k, v, cq, ck, mq, mk):
        return fastattn.varlen_attention(q, k, v, cq, ck, mq, mk, enable_gqa=True, window_size=(-1, 0), backend="cpu")

    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    for lens_q, lens_k in (([3, 5], [4, 6]), ([7, 1, 2], [7, 9, 2]), ([10, 4, 4, 1], [12, 4, 5, 3])):
        args = packed(lens_q, lens_k)
        torch.testing.assert_close(compiled(*args), step(*args))
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times"


# ---------------------------------------------------------------------------------------------
# On a GPU: bf16, and torch's own varlen_attn where it runs.


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("modifier", ["plain", "causal", "all"])
def test_gpu_packed_bf16(modifier):
    torch.manual_seed(0)
    lens = torch.randint(64, 1024, (8,)).tolist()
    args = packed(lens, lens, Hq=8, Hkv=2, E=128, Ev=128, dtype=torch.bfloat16)
    kw = modifier_kwargs(modifier, len(lens), 8)
    got = fastattn.varlen_attention(*args, return_aux=AuxRequest(lse=True), backend="triton", **kw)
    check(f"gpu bf16 {modifier}", got, *oracle_and_baseline(args, kw), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or varlen_attn is None, reason="needs a CUDA GPU and torch's varlen_attn")
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0)])
def test_gpu_matches_torch_varlen_attn(window):
    torch.manual_seed(0)
    lens = torch.randint(16, 512, (6,)).tolist()
    args = packed(lens, lens, Hq=8, Hkv=8, E=64, Ev=64, dtype=torch.bfloat16)
    try:
        theirs = varlen_attn(*args, window_size=window)
    except Exception as e:  # torch's path needs FlashAttention for this GPU and build
        pytest.skip(f"torch's varlen_attn cannot run here: {e}")
    ours = fastattn.varlen_attention(*args, window_size=window)
    oracle = reference.varlen_attention(*args, window_size=window, upcast=True)
    baseline = reference.varlen_attention(*args, window_size=window)
    assert_close_to_oracle("fastattn", ours, oracle, baseline)
    assert_close_to_oracle("torch varlen_attn", theirs, oracle, baseline)

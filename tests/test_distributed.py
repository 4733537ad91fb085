"""fastattn.distributed: the ring's schedule, the lse merge, W virtual ranks, and real gloo rings.

- The schedule (pure): every visible (query, key) pair of the whole call is computed by exactly
  one call of one step, for every layout, world size up to 16, band and ragged length; causal
  steps that see nothing are skipped, and zigzag's off-diagonal steps are one call each.
- eager.merge: partial results over key splits merge to the full attention.
- simulated_ring_attention (W virtual ranks, one process) against the float64 reference with the
  error-ratio rule, forward and backward (with a loss on lse), W up to 16.
- gloo: 2 and 4 processes (tests/ring_worker.py), each world spawned once for all its cases:
  output, lse and gradients against the reference and the single-process call, bitwise equal to
  the simulation and across repeats, the bytes each rank received, and errors raised on every
  rank when the ranks disagree.
"""

from __future__ import annotations

import math
import os
import socket

import pytest
import ring_worker
import torch
import torch.multiprocessing as mp
from helpers import assert_close_to_oracle

import fastattn
from fastattn import distributed as fd
from fastattn import reference
from fastattn.distributed import layout as lay
from fastattn.eager.merge import merge
from fastattn.features import Features, block_features, check_features

# The schedule.


def _visible(f: Features | None, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Which (row, col) pairs of positions `f`'s band shows (i + window_lo <= j <= i + causal_offset)."""
    if f is None:
        return torch.zeros(len(rows), len(cols), dtype=torch.bool)
    i, j = rows[:, None], cols[None, :]
    seen = torch.ones(len(rows), len(cols), dtype=torch.bool)
    if f.causal_offset is not None:
        seen &= j <= i + f.causal_offset
    if f.window_lo is not None:
        seen &= j >= i + f.window_lo
    return seen


def test_block_features_show_the_calls_band_on_each_block():
    gen = torch.Generator().manual_seed(0)
    for _ in range(2000):
        L, S = (int(x) for x in torch.randint(1, 9, (2,), generator=gen))
        qs, ks = (int(x) for x in torch.randint(0, 20, (2,), generator=gen))
        upper = None if torch.rand(1, generator=gen) < 0.3 else int(torch.randint(-10, 10, (1,), generator=gen))
        lower = None if torch.rand(1, generator=gen) < 0.3 else int(torch.randint(-12, 8, (1,), generator=gen))
        f = Features(scale=1.0, causal_offset=upper, window_lo=lower)
        block = block_features(f, qs - ks, L, S)
        whole = _visible(f, torch.arange(qs, qs + L), torch.arange(ks, ks + S))
        assert torch.equal(_visible(block, torch.arange(L), torch.arange(S)), whole), (f, qs, ks, L, S, block)
        if block is not None:  # a diagonal that hides nothing is dropped
            assert block.causal_offset is None or not whole.all()
        assert (block is None) == (not whole.any())


def _positions(layout: str, lengths: list[int], rank: int) -> torch.Tensor:
    return torch.cat([torch.arange(p.start, p.start + p.length) for p in lay.pieces(layout, lengths, rank)])


SCHEDULES = [
    (W, layout, causal, window)
    for W in (1, 2, 3, 4, 7, 16)
    for layout in lay.LAYOUTS
    for causal, window in ((False, (-1, -1)), (True, (-1, -1)), (True, (5, 0)), (False, (3, 6)), (False, (-1, 0)))
]


@pytest.mark.parametrize(("W", "layout", "causal", "window"), SCHEDULES, ids=[f"W{s[0]}-{s[1]}-causal{s[2]}-w{s[3][0]}_{s[3][1]}" for s in SCHEDULES])  # fmt: skip
def test_every_visible_pair_is_computed_exactly_once(W, layout, causal, window):
    n_q, n_k = 4 * W * 3, 4 * W * 2 if layout == "contiguous" else 4 * W * 3
    q_lengths = lay.split_lengths(n_q, W, layout)
    k_lengths = lay.split_lengths(n_k, W, layout)
    if layout == "contiguous" and W > 1:  # ragged: move a few rows between ranks
        q_lengths[0] += 3
        q_lengths[-1] -= 3
    f = check_features(scale=1.0, head_dim=8, causal_offset=0 if causal else None, dropout_p=0.0,
                       window_size=window, seqlens=(n_q, n_k))  # fmt: skip
    count = torch.zeros(n_q, n_k, dtype=torch.int64)
    for rank in range(W):
        rows = _positions(layout, q_lengths, rank)
        for source in range(W):
            cols = _positions(layout, k_lengths, source)
            calls = lay.step_calls(f, lay.pieces(layout, q_lengths, rank), lay.pieces(layout, k_lengths, source))
            for call in calls:
                r, c = rows[call.q], cols[call.k]
                block = _visible(call.features, torch.arange(len(r)), torch.arange(len(c)))
                assert block.any(), "a call that sees nothing was not skipped"
                count[r[:, None], c[None, :]] += block.long()
    assert torch.equal(count, _visible(f, torch.arange(n_q), torch.arange(n_k)).long())


def test_causal_steps_skip_and_merge_calls():
    f = check_features(scale=1.0, head_dim=8, causal_offset=0, dropout_p=0.0, seqlens=(64, 64))
    W = 4
    lengths = lay.split_lengths(64, W, "zigzag")
    for rank in range(W):
        for source in range(W):
            calls = lay.step_calls(f, lay.pieces("zigzag", lengths, rank), lay.pieces("zigzag", lengths, source))
            assert len(calls) == (3 if source == rank else 1), (rank, source, calls)
    lengths = lay.split_lengths(64, W, "contiguous")
    for rank in range(W):
        for source in range(W):
            calls = lay.step_calls(
                f, lay.pieces("contiguous", lengths, rank), lay.pieces("contiguous", lengths, source)
            )
            if source > rank:
                assert calls == []
            else:
                assert len(calls) == 1
                assert (calls[0].features.causal_offset == 0) == (source == rank)  # the diagonal runs causal


def test_split_and_join_are_inverse():
    x = torch.arange(2 * 48).reshape(2, 48)
    for layout in lay.LAYOUTS:
        for W in (1, 2, 3, 4, 6, 8, 12, 24):
            if layout == "zigzag" and 48 % (2 * W):
                continue
            lengths = lay.split_lengths(48, W, layout)
            shards = lay.split(x, 1, layout, lengths)
            assert [s.shape[1] for s in shards] == lengths
            assert torch.equal(lay.join(shards, 1, layout), x)
    shards = lay.split(x, 1, "zigzag", [12] * 4)
    assert shards[1][0].tolist()[:6] == [6, 7, 8, 9, 10, 11] and shards[1][0, 6].item() == 36  # chunks 1 and 6


def test_layout_errors():
    with pytest.raises(ValueError, match="multiple of it"):
        lay.split_lengths(10, 4, "zigzag")
    with pytest.raises(ValueError, match="layout must be one of"):
        lay.split_lengths(10, 4, "striped")
    with pytest.raises(ValueError, match="same even number"):
        lay.check_lengths("query", [4, 6], "zigzag")
    with pytest.raises(ValueError, match="same even number"):
        lay.check_lengths("query", [5, 5], "zigzag")


# The merge.


def test_merge_of_key_splits_is_the_full_attention():
    q, k, v = torch.randn(2, 3, 40, 8, dtype=torch.float64), torch.randn(2, 3, 50, 8, dtype=torch.float64), None
    v = torch.randn(2, 3, 50, 5, dtype=torch.float64)
    q[1, 2, 7] = math.nan  # a NaN query row stays NaN
    window = (-1, 0)  # bottom-right causal with L < S: every row sees a different count of keys
    full_out, full_lse = reference.attention(q, k, v, window_size=window, return_lse=True)
    cuts = [0, 9, 10, 31, 50]
    outs, lses = [], []
    for a, b in zip(cuts, cuts[1:]):
        # The slice's features: the whole call's band moved to keys a..b (fastattn.distributed's way).
        f = check_features(
            scale=None, head_dim=8, causal_offset=None, dropout_p=0.0, window_size=window, seqlens=(40, 50)
        )
        block = block_features(f, -a, 40, b - a)
        if block is None:
            out, lse = (
                torch.zeros(2, 3, 40, 5, dtype=torch.float64),
                torch.full((2, 3, 40), -math.inf, dtype=torch.float64),
            )
        else:
            bias = torch.zeros(40, b - a, dtype=torch.float64).masked_fill(
                ~_visible(block, torch.arange(40), torch.arange(b - a)), -math.inf
            )
            out, lse = reference.attention(q, k[:, :, a:b], v[:, :, a:b], attn_mask=bias, return_lse=True)
        outs.append(out)
        lses.append(lse)
    assert torch.isneginf(lses[-1]).any()  # some rows see none of the last slice
    out, lse = merge(outs, lses)
    nan = torch.isnan(full_lse)
    assert torch.equal(torch.isnan(lse), nan) and torch.isnan(out[nan]).all()
    torch.testing.assert_close(out[~nan], full_out[~nan], rtol=0, atol=1e-13)
    torch.testing.assert_close(lse[~nan], full_lse[~nan], rtol=0, atol=1e-13)


def test_merge_of_nothing_seen_is_zero_and_minus_inf():
    outs = [torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2)]
    lses = [torch.full((1, 1, 3), -math.inf)] * 2
    out, lse = merge(outs, lses)
    assert torch.equal(out, torch.zeros(1, 1, 3, 2)) and torch.isneginf(lse).all()


# W virtual ranks.


def _loss_grads(fn, q, k, v, dout, dlse):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    loss = (out.double() * dout).sum() + (lse.double().nan_to_num(0.0, 0.0, 0.0) * dlse).sum()
    return (out, lse, *torch.autograd.grad(loss, (q, k, v)))


def _check_ring(name, got, q, k, v, kwargs, dout, dlse, dtype):
    oracle = _loss_grads(
        lambda *t: reference.attention(*t, **kwargs, return_lse=True), q.double(), k.double(), v.double(), dout, dlse
    )
    baseline = _loss_grads(lambda *t: reference.attention(*t, **kwargs, return_lse=True), q, k, v, dout, dlse)
    for label, g, o, b in zip(("out", "lse", "dq", "dk", "dv"), got, oracle, baseline):
        assert g.dtype == b.dtype and g.shape == o.shape, (label, g.dtype, b.dtype, g.shape, o.shape)
        assert_close_to_oracle(f"{name} {label}", g, o, b, dtype=dtype, ratio=2.0 if label in ("out", "lse") else 3.0)


SIMULATED = [
    (W, layout, mods, dtype)
    for W in (1, 2, 3, 5, 16)
    for layout in lay.LAYOUTS
    for mods in ("plain", "causal_gqa", "window_softcap", "bottom_right_dead_rows")
    for dtype in (torch.float32, torch.bfloat16)
    if not (layout == "zigzag" and mods == "bottom_right_dead_rows")
]
MODS = {
    "plain": {},
    "causal_gqa": {"is_causal": True, "enable_gqa": True},
    "window_softcap": {"window_size": (11, 3), "softcap": 1.5},
    "bottom_right_dead_rows": {"window_size": (-1, 0)},  # L > S: the first rows see no key
}


@pytest.mark.parametrize(("W", "layout", "mods", "dtype"), SIMULATED, ids=[f"W{W}-{lo}-{m}-{str(d)[6:]}" for W, lo, m, d in SIMULATED])  # fmt: skip
def test_simulated_ring_against_the_reference(W, layout, mods, dtype):
    kwargs = MODS[mods]
    N = 2 * W * 5
    S = N - 2 * W if mods == "bottom_right_dead_rows" else N
    Hkv = 2 if kwargs.get("enable_gqa") else 4
    q, k, v = (
        torch.randn(2, 4, N, 16).to(dtype),
        torch.randn(2, Hkv, S, 16).to(dtype),
        torch.randn(2, Hkv, S, 12).to(dtype),
    )
    dout, dlse = torch.randn(2, 4, N, 12, dtype=torch.float64), torch.randn(2, 4, N, dtype=torch.float64)
    ring = lambda *t: fd.simulated_ring_attention(*t, world_size=W, layout=layout, return_lse=True, **kwargs)
    got = _loss_grads(ring, q, k, v, dout, dlse)
    if mods == "bottom_right_dead_rows":
        assert torch.isneginf(got[1]).any()
    _check_ring(f"W={W} {layout} {mods}", got, q, k, v, kwargs, dout, dlse, dtype)


def test_simulated_ring_ragged_and_empty_shards():
    q, k, v = torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    dout, dlse = torch.randn(1, 2, 30, 8, dtype=torch.float64), torch.randn(1, 2, 30, dtype=torch.float64)
    kwargs = {"is_causal": True}
    ring = lambda *t: fd.simulated_ring_attention(*t, world_size=4, q_lengths=[11, 0, 12, 7], k_lengths=[3, 17, 0, 10],
                                                   return_lse=True, **kwargs)  # fmt: skip
    _check_ring("ragged", _loss_grads(ring, q, k, v, dout, dlse), q, k, v, kwargs, dout, dlse, torch.float32)


def test_simulated_ring_triton_interpreter():
    q, k, v = torch.randn(1, 2, 36, 16), torch.randn(1, 2, 36, 16), torch.randn(1, 2, 36, 16)
    dout, dlse = torch.randn(1, 2, 36, 16, dtype=torch.float64), torch.randn(1, 2, 36, dtype=torch.float64)
    kwargs = {"is_causal": True, "softcap": 3.0}
    ring = lambda *t: fd.simulated_ring_attention(
        *t, world_size=3, layout="zigzag", return_lse=True, backend="triton", **kwargs
    )
    _check_ring("triton", _loss_grads(ring, q, k, v, dout, dlse), q, k, v, kwargs, dout, dlse, torch.float32)


def test_simulated_ring_is_bitwise_repeatable():
    q, k, v = torch.randn(2, 4, 64, 16), torch.randn(2, 4, 64, 16), torch.randn(2, 4, 64, 16)
    dout = torch.randn(2, 4, 64, 16, dtype=torch.float64)
    ring = lambda *t: fd.simulated_ring_attention(*t, world_size=4, layout="zigzag", is_causal=True, return_lse=True)
    first, second = (_loss_grads(ring, q, k, v, dout, torch.zeros(2, 4, 64, dtype=torch.float64)) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_simulated_ring_without_lse_in_the_loss():
    q, k, v = (torch.randn(1, 2, 32, 8, requires_grad=True) for _ in range(3))
    out = fd.simulated_ring_attention(q, k, v, world_size=4, is_causal=True)
    out.square().sum().backward()
    expect = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    fastattn.attention(*expect, is_causal=True).square().sum().backward()
    for got, want in zip((q, k, v), expect):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    x = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="4-D"):
        fd.ring_attention(x[0], x[0], x[0])
    with pytest.raises(ValueError, match="backend"):
        fd.ring_attention(x, x, x, backend="reference")
    with pytest.raises(ValueError, match="layout"):
        fd.ring_attention(x, x, x, layout="striped")
    with pytest.raises(ValueError, match="window_size"):
        fd.ring_attention(x, x, x, window_size=(-2, 0))
    with pytest.raises(TypeError, match="is_causal"):
        fd.ring_attention(x, x, x, is_causal=1)
    with pytest.raises(ValueError, match="enable_gqa"):
        fd.ring_attention(x, x[:, :1], x[:, :1])
    with pytest.raises(RuntimeError, match="init_process_group"):
        fd.ring_attention(x, x, x)
    with pytest.raises(RuntimeError, match="init_process_group"):
        fd.shard(x)
    with pytest.raises(ValueError, match="world_size"):
        fd.simulated_ring_attention(x, x, x, world_size=0)
    with pytest.raises(ValueError, match="q_lengths"):
        fd.simulated_ring_attention(x, x, x, world_size=2, q_lengths=[3, 4])
    with pytest.raises(ValueError, match="same even number"):
        fd.simulated_ring_attention(x, x, x, world_size=2, layout="zigzag", q_lengths=[3, 5])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_simulated_ring_on_gpu(dtype):
    """NCCL needs more than one GPU: on one, the schedule with 4 virtual ranks on the device."""
    q, k, v = (torch.randn(2, 8, 1024, 128, device="cuda").to(dtype) for _ in range(3))
    dout = torch.randn(2, 8, 1024, 128, dtype=torch.float64, device="cuda")
    dlse = torch.randn(2, 8, 1024, dtype=torch.float64, device="cuda")
    kwargs = {"is_causal": True}
    ring = lambda *t: fd.simulated_ring_attention(*t, world_size=4, layout="zigzag", return_lse=True, **kwargs)
    _check_ring("gpu", _loss_grads(ring, q, k, v, dout, dlse), q, k, v, kwargs, dout, dlse, dtype)


# Real rings of 2 and 4 gloo processes.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SPAWNED: dict[int, list[dict]] = {}


def _world(W: int, tmp_path_factory) -> list[dict]:
    """Every rank's results for world size W (spawned once per session)."""
    if W not in _SPAWNED:
        outdir = str(tmp_path_factory.mktemp(f"ring{W}"))
        mp.spawn(ring_worker.run, args=(W, _free_port(), outdir), nprocs=W, join=True)
        _SPAWNED[W] = [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(W)]
        crashed = [r["errors"].get("crash") for r in _SPAWNED[W] if r["errors"].get("crash")]
        assert not crashed, crashed[0]
    return _SPAWNED[W]


@pytest.mark.parametrize("case", ring_worker.CASES, ids=[c.name for c in ring_worker.CASES])
def test_gloo_ring(case, tmp_path_factory):
    ranks = _world(case.processes, tmp_path_factory)
    if case.group_ranks is not None:  # the subgroup's members, in group rank order
        ranks = [ranks[r] for r in sorted(case.group_ranks)]
    lengths = ring_worker.shard_lengths(case)
    got = [lay.join([r["outputs"][case.name][i] for r in ranks], 2, case.layout) for i in range(5)]
    q, k, v, dout, dlse = ring_worker.case_tensors(case)
    kwargs = case.kwargs()
    _check_ring(case.name, got, q, k, v, kwargs, dout, dlse, case.dtype)
    single = _loss_grads(lambda *t: fastattn.attention(*t, **kwargs, return_lse=True), q, k, v, dout, dlse)
    print(
        "against the single-process call:",
        [f"{(a.double() - b.double()).abs().max().item():.2e}" for a, b in zip(got, single)],
    )
    simulated = _loss_grads(
        lambda *t: fd.simulated_ring_attention(*t, world_size=case.world, layout=case.layout, return_lse=True,
                                               q_lengths=lengths, k_lengths=lengths, **kwargs), q, k, v, dout, dlse,
    )  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(got, simulated)), "the gloo ring differs from the simulation"
    assert all(r["repeat_equal"][case.name] for r in ranks), "two runs differ"
    kv_bytes = [lengths[i] * case.B * case.Hkv * (case.E + case.Ev) * q.element_size() for i in range(case.world)]
    acc_size = 8 if q.dtype == torch.float64 else 4  # the dK/dV accumulators: float32 (float64)
    grad_bytes = [n * acc_size // q.element_size() for n in kv_bytes]
    for rank, r in enumerate(ranks):  # each K/V shard but its own, once: no all-gather
        assert r["received"][case.name]["forward"] == sum(kv_bytes) - kv_bytes[rank]
        if case.world > 1:  # and every shard's accumulator once, the last its own coming home
            assert r["received"][case.name]["backward"] == sum(kv_bytes) - kv_bytes[rank] + sum(grad_bytes)


ERRORS = {
    "dtype": "disagree on dtype",
    "is_causal": "disagree on is_causal",
    "zigzag_odd": "same even number",
    "zigzag_unequal": "same even number",
}


@pytest.mark.parametrize("W", [2, 4])
def test_gloo_shard_and_unshard(W, tmp_path_factory):
    for rank, r in enumerate(_world(W, tmp_path_factory)):
        assert r["collectives"] and all(r["collectives"].values()), (rank, r["collectives"])


@pytest.mark.parametrize("W", [2, 4])
def test_gloo_ring_errors_on_every_rank(W, tmp_path_factory):
    for rank, r in enumerate(_world(W, tmp_path_factory)):
        for name, expected in ERRORS.items():
            message = r["errors"][name]
            assert message is not None and expected in message, (rank, name, message)

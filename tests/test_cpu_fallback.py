"""The CPU fallback: its tiled online softmax, its delegation to SDPA's CPU kernel, its memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from helpers import (
    PARITY_CASES,
    assert_close_to_oracle,
    attention_arguments,
    check_against_reference,
    make_mask,
    make_qkv,
    sweep_cases,
)
from torch.nn.attention.bias import causal_lower_right

import fastattn
from fastattn import reference
from fastattn.configs import CPU_FORWARD_TILES as CPU_TILES
from fastattn.eager import forward as cpu_fallback
from fastattn.problem import canonicalize

pytestmark = pytest.mark.filterwarnings("ignore:Lower right causal bias")

# (id, block_m, block_n, tile_elements): blocks that divide nothing, one-head chunks, the defaults.
BLOCKINGS = [
    ("b13x7", 13, 7, CPU_TILES.tile_elements),
    ("b16x32-chunk1", 16, 32, 1),
    ("default", CPU_TILES.block_m, CPU_TILES.block_n, CPU_TILES.tile_elements),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def run_tiled(case, dtype, block_m, block_n, tile_elements):
    q, k, v, kwargs = attention_arguments(case, dtype)
    p = canonicalize(q, k, v, **kwargs)
    out, lse = p.restore(*cpu_fallback.tiled_attention(p, block_m, block_n, tile_elements))
    check_against_reference(f"{case.id} tiled {block_m}x{block_n}/{tile_elements}", out, lse, q, k, v, **kwargs)


def _tiled_params():
    """Every case with the default blocking; small blocks make hundreds of tiles on the long cases,
    so those get 13x7 blocks not at all and one-head chunks in float32 only."""
    for case in PARITY_CASES:
        for blocking in BLOCKINGS:
            for dtype in DTYPES:
                if blocking[0] == "b13x7" and case.L * case.S > 5_000:
                    continue
                if blocking[0] != "default" and case.L * case.S > 100_000 and dtype != torch.float32:
                    continue
                yield pytest.param(case, blocking, dtype, id=f"{case.id}-{blocking[0]}-{str(dtype)[6:]}")


@pytest.mark.parametrize("case,blocking,dtype", list(_tiled_params()))
def test_tiled_matches_oracle(case, blocking, dtype):
    run_tiled(case, dtype, *blocking[1:])


SWEEP = sweep_cases()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", SWEEP, ids=[c.id for c in SWEEP])
def test_tiled_sweep(case, dtype):
    run_tiled(case, dtype, 32, 64, 1 << 12)


def test_chunks_cover_every_head_once():
    for B, H, rows, cols, tile in [
        (3, 5, 16, 16, 1),
        (3, 5, 16, 16, 16 * 16 * 7),
        (4, 2, 8, 8, 1 << 20),
        (2, 3, 0, 0, 64),
    ]:
        seen = torch.zeros(B, H, dtype=torch.int64)
        for bs, hs in cpu_fallback._chunks(B, H, rows, cols, tile):
            seen[bs, hs] += 1
        assert (seen == 1).all(), (B, H, rows, cols, tile)


def test_tiled_repeats_are_bitwise_equal():
    q, k, v = make_qkv(2, 4, 2, 129, 200, 64, dtype=torch.bfloat16)
    p = canonicalize(q, k, v, is_causal=True, enable_gqa=True)
    first, second = cpu_fallback.tiled_attention(p, 32, 64), cpu_fallback.tiled_attention(p, 32, 64)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_wide_key_blocks_for_few_query_rows():
    """Fewer query rows than a block: the key block widens so a tile keeps about block_m *
    block_n scores per head, at most the whole key range; otherwise it stays."""
    assert cpu_fallback.wide_key_blocks(256, 4096, 256, 512) == 512
    assert cpu_fallback.wide_key_blocks(1000, 4096, 256, 512) == 512
    assert cpu_fallback.wide_key_blocks(1, 32768, 256, 512) == 32768
    assert cpu_fallback.wide_key_blocks(1, 1 << 20, 256, 512) == 256 * 512
    assert cpu_fallback.wide_key_blocks(16, 32768, 256, 512) == 256 * 512 // 16
    assert cpu_fallback.wide_key_blocks(2, 100, 4, 16) == 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "blocks", [(4, 16, None), (None, None, None), (None, None, 4096)], ids=["b4x16", "default", "budget4k"]
)
@pytest.mark.parametrize("L", [1, 3])
def test_tiled_decoding_with_wide_key_blocks(L, blocks, dtype):
    """A few query rows against many keys (widened key blocks: several of 32 or 48 keys, or one of
    all 3000; bf16 K and V converted a block at a time, within the tile budget: 512-key blocks
    with a 4096-score budget), E != Ev so that the tiled path serves it, GQA and a bool mask with
    holes."""
    q, k, v = make_qkv(2, 4, 2, L, 3000, 32, Ev=16, dtype=dtype)
    mask = torch.rand(2, 1, L, 3000) < 0.9
    kwargs = dict(attn_mask=mask, enable_gqa=True)
    p = canonicalize(q, k, v, **kwargs)
    out, lse = p.restore(*cpu_fallback.tiled_attention(p, *blocks))
    check_against_reference(f"decode L{L} {blocks}", out, lse, q, k, v, **kwargs)


def test_tiled_query_blocks_that_see_no_key():
    """Bottom-right causal with L > S: the first query blocks see no key at all (none visited):
    out 0, lse -inf, statistics (-inf, 0), as the reference has it; the rest match it."""
    q, k, v = make_qkv(1, 2, 2, 40, 9, 16, Ev=8)
    kwargs = dict(attn_mask=causal_lower_right(40, 9))
    p = canonicalize(q, k, v, **kwargs)
    out, lse, stats = cpu_fallback.tiled_attention(p, 8, 4, return_stats=True)
    dead = slice(0, 31)  # query i sees key j when j <= i - 31
    assert (out[:, :, dead] == 0).all() and torch.isneginf(lse[:, :, dead]).all()
    assert torch.isneginf(stats[0][:, :, dead]).all() and (stats[1][:, :, dead] == 0).all()
    check_against_reference("L > S bottom-right", *p.restore(out, lse), q, k, v, **kwargs)


def test_padding_at_finfo_min_in_a_whole_key_block():
    """transformers' left padding as an additive finfo.min mask over a whole key block: every
    row's max is finfo.min after the first block (the uniform weights of SDPA's math there) and is
    then replaced by the real keys' (the old weights rescaled to 0); forward and the tiled
    backward from the forward's statistics match the float64 oracle."""
    from fastattn.eager.backward import tiled_attention_backward

    q, k, v = make_qkv(1, 2, 2, 6, 9, 16, Ev=8)
    mask = torch.zeros(1, 1, 6, 9)
    mask[..., :3] = torch.finfo(torch.float32).min
    p = canonicalize(q, k, v, attn_mask=mask)
    out, lse, stats = cpu_fallback.tiled_attention(p, 4, 3, return_stats=True)
    check_against_reference("finfo.min padding", *p.restore(out, lse), q, k, v, attn_mask=mask)
    dout = torch.randn_like(out)
    grads = tiled_attention_backward(p, out, lse, dout, stats=stats, block_m=4, block_n=3)[:3]
    wide = [t.double().requires_grad_() for t in (q, k, v)]
    reference_out = reference.attention(*wide, attn_mask=mask.double())
    oracle = torch.autograd.grad(reference_out, wide, dout.double())
    low = [t.clone().requires_grad_() for t in (q, k, v)]
    baseline = torch.autograd.grad(reference.attention(*low, attn_mask=mask), low, dout)
    for name, g, o, b in zip(("dq", "dk", "dv"), grads, oracle, baseline):
        assert_close_to_oracle(f"finfo.min padding {name}", g, o, b, ratio=3.0)


# --- delegation to SDPA's CPU kernel ------------------------------------------------------------

DELEGATION = [
    # (id, builds kwargs from (L, S), E, Ev, expected to delegate)
    ("plain", lambda L, S: {}, 64, 64, True),
    ("causal_tl", lambda L, S: {"is_causal": True}, 64, 64, True),
    ("causal_br-L=S", lambda L, S: {"attn_mask": causal_lower_right(S, S)}, 64, 64, True),
    ("mask", lambda L, S: {"attn_mask": torch.rand(L, S) < 0.5}, 64, 64, True),
    ("gqa", lambda L, S: {"enable_gqa": True}, 64, 64, True),
    ("causal_br", lambda L, S: {"attn_mask": causal_lower_right(L, S)}, 64, 64, True),  # two SDPA calls
    ("causal_br-L>S", lambda L, S: {"attn_mask": causal_lower_right(L, S)}, 64, 64, True),  # rows without keys
    ("E!=Ev", lambda L, S: {}, 64, 32, False),
    ("causal+mask", lambda L, S: {"is_causal": True, "attn_mask": torch.rand(L, S) < 0.5}, 64, 64, False),
]


@pytest.mark.parametrize("case", DELEGATION, ids=[c[0] for c in DELEGATION])
def test_delegates_exactly_where_sdpa_can(case, monkeypatch):
    name, make_kwargs, E, Ev, delegates = case
    L, S = {"causal_br-L=S": (33, 33), "causal_br-L>S": (47, 33)}.get(name, (33, 47))
    q, k, v = make_qkv(2, 4, 2 if name == "gqa" else 4, L, S, E, Ev)
    kwargs = make_kwargs(L, S)
    assert (cpu_fallback.sdpa_cpu_reasons(canonicalize(q, k, v, **kwargs)) == []) == delegates

    def refuse(*args, **kw):
        raise AssertionError("the other path was taken")

    monkeypatch.setattr(cpu_fallback, "tiled_attention" if delegates else "_sdpa_cpu", refuse)
    out, lse = fastattn.attention(q, k, v, **kwargs, return_lse=True, backend="cpu")
    check_against_reference(f"{name} cpu", out, lse, q, k, v, **kwargs)


@pytest.mark.parametrize("S", [1, 50])
def test_decoding_step_is_delegated(S, monkeypatch):
    """One query row, bottom-right: it sees every key, so causality is a no-op and SDPA serves it."""

    def refuse(*args, **kw):
        raise AssertionError("tiled path taken")

    monkeypatch.setattr(cpu_fallback, "tiled_attention", refuse)
    q, k, v = make_qkv(2, 4, 1, 1, S, 32, dtype=torch.bfloat16)
    kwargs = {"attn_mask": causal_lower_right(1, S), "enable_gqa": True}
    out, lse = fastattn.attention(q, k, v, **kwargs, return_lse=True, backend="cpu")
    check_against_reference(f"decode-S{S}", out, lse, q, k, v, **kwargs)


def _delegated(case) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # causal_lower_right with L > S warns of NaN (not ours)
        q, k, v, kwargs = attention_arguments(case, torch.float32)
    return not cpu_fallback.sdpa_cpu_reasons(canonicalize(q, k, v, **kwargs))


SDPA_CASES = [c for c in PARITY_CASES if _delegated(c)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", SDPA_CASES, ids=[c.id for c in SDPA_CASES])
def test_sdpa_path_matches_oracle(case, dtype):
    """SDPA's kernel, with fastattn's fixes for rows that have no key (lse -inf, out 0)."""
    q, k, v, kwargs = attention_arguments(case, dtype)
    p = canonicalize(q, k, v, **kwargs)
    assert cpu_fallback.sdpa_cpu_reasons(p) == []
    out, lse = p.restore(*cpu_fallback._sdpa_cpu(p))
    check_against_reference(f"{case.id} sdpa", out, lse, q, k, v, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", [(2, 1, 37, 50), (37, 50), (1, 4, 37, 1)], ids=["b1ls", "ls", "1hl1"])
def test_sdpa_path_converts_bool_masks_in_row_blocks(shape, dtype, monkeypatch):
    """A bool mask with a query dim becomes an additive one a few rows at a time (here 1 to 5)."""
    q, k, v = make_qkv(2, 4, 2, 37, 50, 32, dtype=dtype)
    mask = make_mask(shape, "bool", keep=0.6, dead_frac=0.2)
    p = canonicalize(q, k, v, mask, enable_gqa=True)
    row_bytes = p.mask[:, :, :1].numel() * q.element_size()
    monkeypatch.setattr(cpu_fallback, "MASK_BLOCK_BYTES", 5 * row_bytes - 1)
    out, lse = p.restore(*cpu_fallback._sdpa_cpu(p))
    check_against_reference(f"row-blocks {shape}", out, lse, q, k, v, attn_mask=mask, enable_gqa=True)


def test_sdpa_op_given_strided_head_dim_regression():
    """Pins a bug: the raw aten op behind SDPA's CPU path assumes unit stride in the head dim and
    returned garbage (errors ~1e14) for a (B, H, E, L) tensor transposed; the public SDPA copies."""
    q, k, v = make_qkv(2, 2, 2, 37, 45, 16, layout="bhdl")
    assert q.stride(-1) != 1
    p = canonicalize(q, k, v)
    assert cpu_fallback.sdpa_cpu_reasons(p) == []
    out, lse = p.restore(*cpu_fallback._sdpa_cpu(p))
    check_against_reference("strided head dim", out, lse, q, k, v)


def test_sdpa_path_nan_rows_are_found_from_lse():
    """SDPA's CPU kernel gives a NaN query row out 0 and lse 0; fastattn looks for NaN only in rows
    whose lse is 0 or NaN. A NaN row becomes NaN; a row whose lse is exactly 0 without NaN (a zero
    query against one key) keeps its answer."""
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
    q[0, 0, 1] = 0.0  # score 0 against the one key: lse = log(1) = 0 exactly
    q[0, 1, 2, 3] = float("nan")
    p = canonicalize(q, k, v)
    assert cpu_fallback.sdpa_cpu_reasons(p) == []
    out, lse = cpu_fallback._sdpa_cpu(p)
    assert lse[0, 0, 1] == 0 and torch.equal(out[0, 0, 1], v[0, 0, 0])
    assert torch.isnan(out[0, 1, 2]).all() and torch.isnan(lse[0, 1, 2])
    assert not torch.isnan(out[0, 1, :2]).any() and not torch.isnan(out[0, 0]).any()


# --- memory: no (L, S) matrix at L = S = 16384 ---------------------------------------------------

N = 16384
LS_BYTES = N * N * 4  # one float32 (L, S) matrix: 1 GiB
MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch
    import fastattn
    from fastattn.eager import forward as cpu_fallback
    from fastattn.problem import canonicalize
    from torch.nn.attention.bias import causal_lower_right

    def rss_now():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def reset_peak():
        # The high-water mark of the process so far may lie above the resident size before a case
        # (memory freed since), which would be charged to the case: Linux resets it on "5".
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass  # then peak() is the lifetime high-water mark: an upper bound still

    def peak():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    N = {N}
    torch.set_num_threads(1)  # memory, not speed: one thread keeps a busy machine from stretching it
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, N, 64) for _ in range(3))
    pad = torch.rand(1, 1, 1, N) < 0.9
    full = torch.ones(N, N, dtype=torch.bool)  # the caller's own (L, S) mask: 256 MiB before we start
    full[:, ::7] = False  # (built in place: a temporary would raise the high-water mark for good)
    cases = {{
        "sdpa": lambda: fastattn.attention(q, k, v, backend="cpu"),
        "sdpa-causal": lambda: fastattn.attention(q, k, v, is_causal=True, backend="cpu"),
        "sdpa-padding-mask": lambda: fastattn.attention(q, k, v, pad, backend="cpu"),
        "sdpa-full-bool-mask": lambda: fastattn.attention(q, k, v, full, backend="cpu"),
        "tiled": lambda: cpu_fallback.tiled_attention(canonicalize(q, k, v)),
        "sdpa-causal_br": lambda: fastattn.attention(
            q[:, :, : N - 384], k, v, causal_lower_right(N - 384, N), backend="cpu"),
        "tiled-causal-padding-mask": lambda: fastattn.attention(q, k, v, pad, is_causal=True, backend="cpu"),
        # The instrument itself: a quarter of an (L, S) matrix must show up.
        "control-quarter-LS": lambda: torch.ones(N // 4, N),
    }}
    small = (t[:, :, :64] for t in (q, k, v))
    fastattn.attention(*small, backend="cpu")  # warm up: libraries and thread pools
    result = {{}}
    for name, run in cases.items():
        reset_peak()
        before, start = rss_now(), time.perf_counter()
        out = run()
        result[name] = (peak() - before, time.perf_counter() - start)
        del out
    print(json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def memory_growth() -> dict[str, int]:
    """Peak RSS growth (bytes) of each case, measured in a fresh process: the high-water mark
    after the call (reset before it, /proc/self/clear_refs) minus the resident size before it,
    an upper bound on what the call added."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT.format(N=N)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    growth = {}
    for name, (grown, seconds) in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        print(
            f"{name}: peak RSS +{grown / 2**20:.1f} MiB in {seconds:.2f} s (an (L, S) fp32 matrix: {LS_BYTES / 2**30:.0f} GiB)"
        )
        growth[name] = grown
    return growth


@pytest.mark.parametrize(
    "name",
    [
        "sdpa",
        "sdpa-causal",
        "sdpa-padding-mask",
        "sdpa-full-bool-mask",
        "tiled",
        "sdpa-causal_br",
        "tiled-causal-padding-mask",
    ],
)
def test_no_ls_matrix_at_16k(memory_growth, name):
    # Each case's own high-water mark (reset before it): with the process's lifetime mark, memory
    # freed before the first case was charged to it (+154 and +216 MiB in two runs; +5 MiB now).
    assert memory_growth[name] < LS_BYTES / 8, f"{name}: {memory_growth[name] / 2**20:.0f} MiB"


def test_memory_instrument_sees_an_ls_quarter(memory_growth):
    assert memory_growth["control-quarter-LS"] > LS_BYTES / 4 * 0.9

"""The parity matrix: every backend against the float64 reference with the error-ratio rule.

One list of named cases, each run on every (backend, dtype) pair the dispatcher declares it can
serve for CPU tensors: "cpu" in float64/float32/float16/bfloat16, "triton" (through Triton's
interpreter, slow: small B*H, few long sequences) in float64/float32/float16; Triton's interpreter
computes bfloat16 `tl.dot` wrongly, so the dispatcher refuses bf16 there and those pairs are skipped
with its reason. In float64 the baseline is the oracle's own precision, so the floor (1e-12) rules.

Together the cases cover L and S in {1, 7, 17, 63, 64, 65, 127, 129, 1000} with L != S, head dims
{16, 32, 40, 64, 80, 96, 128, 160, 192, 256} with E != Ev, causal in both alignments, bool and
float masks of broadcast shapes, GQA and MQA, non-contiguous (B, S, H, D)-transposed inputs,
fully masked rows, large logits (scores ~1e3) and NaN-poisoned surroundings. `-m slow` adds a
sweep over every (L, S) pair.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import (
    HEAD_DIMS,
    LENGTHS,
    MODIFIER_CASES,
    PARITY_CASES,
    Case,
    attention_arguments,
    check_against_reference,
    sweep_cases,
)

import fastattn
from fastattn.dispatch import unsupported_reasons
from fastattn.problem import canonicalize

pytestmark = pytest.mark.filterwarnings("ignore:Lower right causal bias")


SLOW_CASES = sweep_cases()


def backend_dtypes():
    """(backend, dtype) pairs; those the dispatcher refuses for CPU tensors skip with its reasons."""
    for backend, dtype in itertools.product(
        ("cpu", "triton"), (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    ):
        probe = torch.zeros(1, 1, 1, 16, dtype=dtype)
        reasons = unsupported_reasons(backend, canonicalize(probe, probe, probe))
        marks = [pytest.mark.skip(reason="; ".join(reasons))] if reasons else []
        yield pytest.param(backend, dtype, id=f"{backend}-{str(dtype).removeprefix('torch.')}", marks=marks)


BACKEND_DTYPES = list(backend_dtypes())


def run_case(case: Case, backend: str, dtype: torch.dtype) -> None:
    q, k, v, kwargs = attention_arguments(case, dtype)
    out, lse = fastattn.attention(q, k, v, **kwargs, return_lse=True, backend=backend)
    check_against_reference(f"{case.id} {backend} {dtype}", out, lse, q, k, v, **kwargs)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("case", PARITY_CASES, ids=[c.id for c in PARITY_CASES])
def test_parity(case, backend, dtype):
    run_case(case, backend, dtype)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("case", MODIFIER_CASES, ids=[c.id for c in MODIFIER_CASES])
def test_modifier_parity(case, backend, dtype):
    """Sliding windows, softcaps and ALiBi on every backend against the float64 reference."""
    run_case(case, backend, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("case", SLOW_CASES, ids=[c.id for c in SLOW_CASES])
def test_parity_sweep(case, backend, dtype):
    run_case(case, backend, dtype)


def test_cases_cover_the_matrix():
    """Each value of the issue's matrix appears in the default cases."""
    assert {c.L for c in PARITY_CASES} >= set(LENGTHS) and {c.S for c in PARITY_CASES} >= set(LENGTHS)
    assert {c.E for c in PARITY_CASES} | {c.Ev for c in PARITY_CASES} >= set(HEAD_DIMS)
    assert any(c.Ev not in (None, c.E) for c in PARITY_CASES)
    assert {c.causal for c in PARITY_CASES} >= {"tl", "br"}
    assert {c.mask.split("_")[1] for c in PARITY_CASES if c.mask} >= {"b11s", "1hls", "ls", "l1", "bhls"}
    assert {c.mask.split("_")[0] for c in PARITY_CASES if c.mask} == {"bool", "float"}
    assert any(c.Hkv == 1 < c.Hq for c in PARITY_CASES) and any(1 < c.Hkv < c.Hq for c in PARITY_CASES)
    assert (
        {c.layout for c in PARITY_CASES} >= {"blhd", "bhdl"}
        and any(c.large for c in PARITY_CASES)
        and any(c.dead for c in PARITY_CASES)
    )
    assert len({c.id for c in PARITY_CASES}) == len(PARITY_CASES)


SMALL = [c for c in PARITY_CASES if c.L * c.S <= 64 * 65 and c.B * c.Hq <= 2][:3]


@pytest.mark.parametrize("backend,dtype", [p for p in BACKEND_DTYPES if p.values[1] == torch.float32])
@pytest.mark.parametrize("case", SMALL, ids=[c.id for c in SMALL])
def test_without_lse_gives_the_same_output(case, backend, dtype):
    q, k, v, kwargs = attention_arguments(case, dtype)
    out, _ = fastattn.attention(q, k, v, **kwargs, return_lse=True, backend=backend)
    assert torch.equal(fastattn.attention(q, k, v, **kwargs, backend=backend), out)


@pytest.mark.parametrize("backend,dtype", [p for p in BACKEND_DTYPES if p.values[1] == torch.float16])
def test_repeats_are_bitwise_equal(backend, dtype):
    case = PARITY_CASES[8]
    q, k, v, kwargs = attention_arguments(case, dtype)
    first = fastattn.attention(q, k, v, **kwargs, return_lse=True, backend=backend)
    second = fastattn.attention(q, k, v, **kwargs, return_lse=True, backend=backend)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])

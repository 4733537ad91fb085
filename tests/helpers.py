"""Test helpers: the error-ratio assertion, random problems, masks and NaN-poisoned inputs.

The rule itself (and its floors) lives in fastattn.testing, shared with the benchmark gate.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
import torch
from torch.nn.attention.bias import causal_lower_right

from fastattn import reference
from fastattn.problem import lse_dtype
from fastattn.testing import error_ratio, infinities_match


def cpu_triton_error() -> str | None:
    """Why backend="triton" cannot run CPU tensors in this process (None when it can): they run
    through Triton's interpreter, off on a GPU machine (or with TRITON_INTERPRET=0)."""
    from fastattn.fused import flavour_error

    return flavour_error("cpu")


def skip_without_cpu_triton() -> None:
    """Skip a test that runs backend="triton" on CPU tensors where this process cannot."""
    err = cpu_triton_error()
    if err:
        pytest.skip(err)


def cpu_runnable(backends) -> list[str]:
    """The backends of `backends` that can run CPU tensors in this process (see cpu_triton_error)."""
    return [b for b in backends if b != "triton" or cpu_triton_error() is None]


def assert_close_to_oracle(
    name: str,
    out: torch.Tensor,
    oracle: torch.Tensor,
    baseline: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    floor: float | None = None,
    ratio: float = 2.0,
) -> None:
    """Assert the error-ratio rule (fastattn.testing.error_ratio) for `out`, printing the errors first.

    dtype: the precision the computation ran in (the inputs' dtype; lse is float32 even for fp16
        inputs), which picks the floor; default out.dtype. floor: overrides FLOOR[dtype] * scale.
    ratio: the allowed multiple of the baseline's error (2 for forward outputs; the backward
        issue allows up to 3 for gradients, whose recomputation adds its own rounding).
    Non-finite values (lse = -inf of rows with no key) must sit exactly where the oracle has them;
    NaN is never allowed. A baseline that is not finite where the oracle is counts as error inf.
    """
    assert out.shape == oracle.shape, f"{name}: shape {tuple(out.shape)} != oracle {tuple(oracle.shape)}"
    assert not torch.isnan(oracle).any(), f"{name}: the oracle has NaN (broken test)"
    check = error_ratio(name, out, oracle, baseline, dtype=dtype, floor=floor, ratio=ratio)
    print(check)
    assert infinities_match(out, oracle), f"{name}: NaN in the output, or infinities where the oracle has none"
    assert check.passed, (
        f"{name}: max error {check.err:.3e} > {ratio} * baseline {check.baseline_err:.3e} + floor {check.floor:.1e}"
    )


def check_against_reference(
    name: str,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    **kwargs,
) -> None:
    """Check `out` (and `lse` unless None) of an attention call with SDPA-style `kwargs` against the
    float64 reference with the error-ratio rule; the baseline is the reference in query's dtype."""
    oracle_out, oracle_lse = reference.attention(query, key, value, **kwargs, return_lse=True, upcast=True)
    base_out, base_lse = reference.attention(query, key, value, **kwargs, return_lse=True)
    assert out.dtype == query.dtype, f"{name}: output dtype {out.dtype}, inputs {query.dtype}"
    assert_close_to_oracle(f"{name} out", out, oracle_out, base_out, dtype=query.dtype)
    if lse is not None:
        assert lse.dtype == lse_dtype(query.dtype), f"{name}: lse dtype {lse.dtype}"
        assert_close_to_oracle(f"{name} lse", lse, oracle_lse, base_lse, dtype=query.dtype)


# Memory order of each layout, as a permutation of (B, H, N, D).
LAYOUTS = {"bhld": (0, 1, 2, 3), "blhd": (0, 2, 1, 3), "bhdl": (0, 1, 3, 2)}


def _strided(shape: tuple[int, ...], layout: str, pad: int, std: float, dtype: torch.dtype) -> torch.Tensor:
    """A (B, H, N, D) tensor of N(0, std^2) values in `layout`, optionally inside a NaN buffer.

    layout "bhld": a contiguous (B, H, N, D) tensor. "blhd": a (B, N, H, D) tensor transposed to
    (B, H, N, D), so heads and positions are not contiguous (the usual projection output).
    "bhdl": a (B, H, D, N) tensor transposed, so even the head dim is strided.
    pad > 0: the storage is a NaN-filled buffer `pad` larger on each side of every dim, so any
    out-of-bounds read brings NaN into the result.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    order = LAYOUTS[layout]
    stored = tuple(shape[i] for i in order)
    values = (torch.randn(stored) * std).to(dtype)
    if pad:
        buffer = torch.full([s + 2 * pad for s in stored], math.nan, dtype=dtype)
        view = buffer[tuple(slice(pad, pad + s) for s in stored)]
        view.copy_(values)
        values = view
    return values.permute(*(order.index(i) for i in range(4)))


def make_qkv(
    B: int,
    Hq: int,
    Hkv: int,
    L: int,
    S: int,
    E: int,
    Ev: int | None = None,
    dtype: torch.dtype = torch.float32,
    layout: str = "bhld",
    logit_std: float = 1.0,
    nan_pad: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev).

    logit_std: q and k have variance logit_std, so the default-scaled scores q.k/sqrt(E) have
        standard deviation logit_std (300 gives row maxima ~1e3: the large-logits case).
    layout / nan_pad: see :func:`_strided` (non-contiguous views; NaN-poisoned surroundings).
    """
    Ev = E if Ev is None else Ev
    qk_std = math.sqrt(logit_std)
    q = _strided((B, Hq, L, E), layout, nan_pad, qk_std, dtype)
    k = _strided((B, Hkv, S, E), layout, nan_pad, qk_std, dtype)
    v = _strided((B, Hkv, S, Ev), layout, nan_pad, 1.0, dtype)
    return q, k, v


def make_mask(
    shape: tuple[int, ...],
    kind: str,
    dtype: torch.dtype = torch.float32,
    keep: float = 0.75,
    dead_frac: float = 0.0,
) -> torch.Tensor:
    """A random mask of `shape` (any shape that broadcasts to the scores, e.g. (B,1,1,S), (L,1)).

    kind "bool": True = the key takes part, each with probability `keep`. kind "float": an additive
    bias of `dtype`, N(0, 1) where kept and -inf where not. dead_frac: that fraction of the mask's
    rows (all dims but the last; at least one row when > 0) is fully masked, so those query rows
    have no key to attend to.
    """
    kept = torch.rand(shape) < keep
    if dead_frac > 0:
        rows = kept.reshape(-1, shape[-1])
        n_dead = max(1, round(dead_frac * rows.shape[0]))
        rows[torch.randperm(rows.shape[0])[:n_dead]] = False
    if kind == "bool":
        return kept
    if kind == "float":
        return torch.randn(shape).masked_fill(~kept, -math.inf).to(dtype)
    raise ValueError(f"kind must be 'bool' or 'float', got {kind!r}")


def mask_shape(name: str, B: int, Hq: int, L: int, S: int) -> tuple[int, ...]:
    """The broadcast mask shapes the tests use, by name: "b11s" (padding), "1hls", "ls", "l1",
    "bhls" (full size), "11ls"."""
    shapes = {
        "b11s": (B, 1, 1, S),
        "1hls": (1, Hq, L, S),
        "ls": (L, S),
        "l1": (L, 1),
        "bhls": (B, Hq, L, S),
        "11ls": (1, 1, L, S),
    }
    return shapes[name]


LENGTHS = (1, 7, 17, 63, 64, 65, 127, 129, 1000)
HEAD_DIMS = (16, 32, 40, 64, 80, 96, 128, 160, 192, 256)
LARGE_LOGITS = 300.0  # score standard deviation: row maxima reach ~1e3


@dataclass(frozen=True)
class Case:
    L: int
    S: int
    E: int
    Ev: int | None = None
    B: int = 1
    Hq: int = 1
    Hkv: int = 1
    causal: str | None = None  # "tl": is_causal=True (top-left); "br": causal_lower_right
    mask: str | None = None  # "{bool|float}_{shape name}", shape names as in mask_shape()
    dead: float = 0.0  # fraction of the mask's rows fully masked
    layout: str = "bhld"
    large: bool = False
    nan_pad: int = 0
    window: tuple[int, int] | None = None  # window_size=(left, right)
    softcap: float = 0.0
    alibi: str | None = None  # "h": slopes (Hq,); "bh": slopes (B, Hq)

    def __post_init__(self):
        assert not (self.causal == "br" and self.mask), "a CausalBias is the mask: no tensor mask with it"

    @property
    def id(self) -> str:
        parts = [f"L{self.L}", f"S{self.S}", f"E{self.E}"]
        if self.Ev is not None and self.Ev != self.E:
            parts.append(f"Ev{self.Ev}")
        if self.causal:
            parts.append(f"causal_{self.causal}")
        if self.mask:
            parts.append(self.mask)
        if self.dead:
            parts.append("dead")
        if self.Hq != self.Hkv:
            parts.append("mqa" if self.Hkv == 1 else "gqa")
        if self.layout != "bhld":
            parts.append(self.layout)
        if self.large:
            parts.append("large")
        if self.nan_pad:
            parts.append("poison")
        if self.window:
            parts.append(f"win{self.window[0]}_{self.window[1]}")
        if self.softcap:
            parts.append(f"cap{self.softcap:g}")
        if self.alibi:
            parts.append(f"alibi_{self.alibi}")
        if self.B * self.Hq > 1:
            parts.append(f"B{self.B}H{self.Hq}")
        return "-".join(parts)


# The parity matrix (tests/test_parity.py), reused by the tiled-path tests: named cases that
# together cover every value of the matrix and its risky combinations.
PARITY_CASES = [
    Case(1, 1, 16, B=2, Hq=2, Hkv=2),
    Case(1, 1000, 64, Hq=4, Hkv=1, causal="br"),  # one decoding step over a long KV cache
    Case(1000, 7, 32, layout="blhd"),
    Case(7, 17, 40, 16, B=2, Hq=2, Hkv=2, causal="tl"),
    Case(17, 7, 32, Hq=2, Hkv=2, causal="br"),  # L > S: the first 10 rows see no key
    Case(17, 7, 32, causal="tl", layout="blhd"),
    Case(63, 129, 80, Hq=4, Hkv=2, causal="br"),
    Case(64, 64, 64, B=2, Hq=2, Hkv=2, causal="tl"),
    Case(65, 63, 96, 64, B=2, Hq=2, Hkv=2, mask="bool_b11s", dead=0.5),
    Case(127, 129, 128, Hq=4, Hkv=2, mask="float_1hls"),
    Case(129, 127, 160, Hq=2, Hkv=2, mask="bool_ls", dead=0.1, layout="blhd"),
    Case(64, 65, 192, 80, Hq=2, Hkv=2, mask="float_l1"),
    Case(65, 64, 256, causal="tl", mask="bool_bhls"),  # causal and a mask at once
    Case(1000, 1000, 64, causal="tl"),
    Case(127, 127, 64, Hq=2, Hkv=2, large=True),
    Case(65, 129, 128, Hq=4, Hkv=1, causal="br", large=True),
    Case(63, 65, 16, 256, mask="float_11ls", large=True),
    Case(7, 1000, 256, 32, B=2, Hq=2, Hkv=2, mask="bool_b11s"),
    Case(64, 127, 64, B=2, Hq=4, Hkv=2, mask="float_b11s", layout="bhdl"),  # head dim strided
    Case(65, 17, 40, 96, Hq=2, Hkv=2, causal="tl", layout="bhdl", nan_pad=1),
    Case(17, 17, 1, 3, Hq=2, Hkv=2, causal="tl"),  # the smallest head dims
    Case(63, 127, 80, B=2, Hq=2, Hkv=1, causal="tl", mask="bool_b11s", layout="blhd", nan_pad=3),
    Case(129, 64, 32, B=2, Hq=2, Hkv=2, mask="float_bhls", dead=0.2, nan_pad=2),
]


# Sliding windows, softcaps and ALiBi, alone and combined with each other and with GQA/MQA, masks,
# both causal alignments, L != S, ragged lengths, E != Ev and rows the window empties.
MODIFIER_CASES = [
    Case(65, 65, 64, Hq=2, Hkv=2, window=(15, 0)),  # Mistral's causal window of 16 keys
    Case(63, 129, 32, Hq=4, Hkv=2, window=(20, 0), layout="blhd"),  # bottom-right aligned, L < S, GQA
    Case(129, 63, 40, 16, Hq=2, Hkv=1, window=(7, 3)),  # L > S: the first rows see no key; MQA
    Case(64, 64, 16, window=(0, 0)),  # only the aligned diagonal
    Case(17, 7, 32, Hq=2, Hkv=2, window=(2, 1), causal="tl"),  # intersected with top-left causal
    Case(127, 127, 64, B=2, Hq=2, Hkv=2, window=(31, 8), mask="bool_b11s", dead=0.5),
    Case(7, 130, 32, Hq=2, Hkv=1, window=(200, 200)),  # wider than S on both sides
    Case(65, 17, 40, Hq=2, Hkv=2, window=(-1, 2)),  # right edge only
    Case(40, 90, 16, Hq=2, Hkv=2, window=(5, -1)),  # left edge only
    Case(65, 64, 80, Hq=2, Hkv=2, softcap=50.0, large=True),  # Gemma 2's cap on scores ~1e3
    Case(63, 65, 64, Hq=2, Hkv=2, softcap=1.0, causal="br"),
    Case(33, 47, 96, 64, Hq=4, Hkv=2, alibi="h", causal="tl", layout="bhdl"),
    Case(64, 127, 64, B=2, Hq=2, Hkv=2, alibi="bh", mask="float_1hls"),
    Case(100, 100, 64, B=2, Hq=4, Hkv=2, window=(24, 0), softcap=30.0, alibi="bh", mask="float_b11s", nan_pad=1),
    Case(1, 100, 64, Hq=2, Hkv=2, window=(31, 0), softcap=20.0, alibi="h"),  # one decoding step
]


def sweep_cases() -> list[Case]:
    """The slow sweep: every (L, S) pair of LENGTHS, cycling head dims, causal alignment, masks and head grouping."""
    masks = (None, "bool_b11s", "float_1hls", "bool_l1", "float_ls")
    heads = ((1, 1), (2, 1), (4, 2))
    cases = []
    for i, (L, S) in enumerate(itertools.product(LENGTHS, LENGTHS)):
        causal = (None, "tl", "br")[i % 3]
        hq, hkv = heads[i % 3 if L * S < 10**5 else 0]
        cases.append(
            Case(
                L,
                S,
                HEAD_DIMS[i % 10],
                HEAD_DIMS[(3 * i + 1) % 10],
                Hq=hq,
                Hkv=hkv,
                causal=causal,
                mask=None if causal == "br" else masks[i % 5],
                layout=("bhld", "blhd", "bhdl")[(i // 3) % 3],
            )
        )
    return cases


def attention_arguments(case: Case, dtype: torch.dtype):
    """(q, k, v, SDPA-style keyword arguments) of a case."""
    q, k, v = make_qkv(
        case.B,
        case.Hq,
        case.Hkv,
        case.L,
        case.S,
        case.E,
        case.Ev,
        dtype=dtype,
        layout=case.layout,
        logit_std=LARGE_LOGITS if case.large else 1.0,
        nan_pad=case.nan_pad,
    )
    kwargs = {"enable_gqa": case.Hq != case.Hkv}
    if case.causal == "tl":
        kwargs["is_causal"] = True
    elif case.causal == "br":
        kwargs["attn_mask"] = causal_lower_right(case.L, case.S)
    if case.mask:
        kind, shape_name = case.mask.split("_")
        shape = mask_shape(shape_name, case.B, case.Hq, case.L, case.S)
        kwargs["attn_mask"] = make_mask(shape, kind, dtype, dead_frac=case.dead)
    if case.window:
        kwargs["window_size"] = case.window
    if case.softcap:
        kwargs["softcap"] = case.softcap
    if case.alibi:
        kwargs["alibi_slopes"] = alibi_slopes(case.Hq, case.B if case.alibi == "bh" else None)
    return q, k, v, kwargs


def alibi_slopes(H: int, B: int | None = None) -> torch.Tensor:
    """ALiBi's geometric slopes 2^(-8 (h + 1) / H) (Press et al.), (H,) or, with B, (B, H) with a
    different scale per batch entry."""
    slopes = torch.pow(2.0, -8.0 * torch.arange(1, H + 1) / H)
    return slopes if B is None else slopes[None] * torch.linspace(0.5, 1.5, B)[:, None]

"""The error-ratio rule every test and the benchmark gate apply, in one place.

A fast path passes when (CONVENTIONS.md, from flash-attention, FlagAttention and xformers)

    max|x - oracle| <= ratio * max|baseline - oracle| + FLOOR[dtype] * max(1, max|oracle|)

where the oracle is ``fastattn.reference`` in float64 and the baseline the same reference computed
in the inputs' own dtype, i.e. what PyTorch gets in that precision (ratio 2 for outputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The floor is what the rule allows when the baseline happens to be (nearly) exact, in units of
# the largest oracle magnitude (ulps scale with magnitude: outputs reach max|V| ~ 4, lse reaches
# ~1e3 with large logits), so the bound is FLOOR[dtype] * max(1, max|oracle|).
#   float16 / bfloat16: one ulp at 1.0 (2^-10, 2^-7). A path that computes in fp32 still rounds
#     its result to the dtype once (half an ulp), and the baseline may round the other way.
#   float32: 1e-5 (~80 ulps at 1.0). Tiled paths add the same S terms in another order and fold
#     the scale into Q; that reorders roundings by O(sqrt(S) * eps) ~ 4e-6 at S = 1000, while the
#     fp32 baseline can be much closer than that on a given problem.
#   float64: the baseline *is* the oracle's precision, so only the floor counts: 1e-12 covers
#     summation-order differences (~sqrt(S) * 2.2e-16) with room to spare.
FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2.0**-10,
    torch.bfloat16: 2.0**-7,
}


def max_abs_error(x: torch.Tensor, oracle: torch.Tensor) -> float:
    """max|x - oracle| over the oracle's finite entries (0 when there are none); inf when x is
    NaN or infinite at one of them. Where the oracle is infinite (lse = -inf of a row with no
    key) nothing is measured: :func:`infinities_match` checks those positions."""
    x, oracle = x.detach().double(), oracle.detach().double()
    finite = torch.isfinite(oracle)
    if not finite.any():
        return 0.0
    diff = (x[finite] - oracle[finite]).abs()
    return diff.max().item() if torch.isfinite(diff).all() else math.inf


def infinities_match(x: torch.Tensor, oracle: torch.Tensor) -> bool:
    """x is -inf exactly where the oracle is, +inf exactly where it is, and never NaN."""
    return (
        not torch.isnan(x).any()
        and torch.equal(torch.isneginf(x), torch.isneginf(oracle))
        and torch.equal(torch.isposinf(x), torch.isposinf(oracle))
    )


@dataclass(frozen=True)
class ErrorRatio:
    """One tensor checked by the rule: its error, the baseline's, the floor and the bound."""

    name: str
    err: float
    baseline_err: float
    floor: float
    bound: float

    @property
    def passed(self) -> bool:
        return self.err <= self.bound

    def __str__(self) -> str:
        return (
            f"{self.name}: err={self.err:.3e} baseline_err={self.baseline_err:.3e} "
            f"floor={self.floor:.1e} bound={self.bound:.3e}"
        )


def error_ratio(
    name: str,
    x: torch.Tensor,
    oracle: torch.Tensor,
    baseline: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    floor: float | None = None,
    ratio: float = 2.0,
) -> ErrorRatio:
    """Apply the rule to `x`. dtype: the precision the computation ran in (picks the floor;
    default x.dtype). floor: overrides FLOOR[dtype] * max(1, max|oracle|)."""
    if floor is None:
        finite = oracle.detach().double()[torch.isfinite(oracle)]
        magnitude = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
        floor = FLOOR[dtype or x.dtype] * magnitude
    err, base_err = max_abs_error(x, oracle), max_abs_error(baseline, oracle)
    return ErrorRatio(name, err, base_err, floor, ratio * base_err + floor)

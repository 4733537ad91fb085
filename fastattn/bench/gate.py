"""The correctness gate: a provider is timed only after its answer matches the reference.

The rule is the project's error-ratio rule (``fastattn.testing``, which the tests use too): for
each checked tensor (the output; with a backward mode also dQ, dK, dV),

    max|x - oracle| <= 2 * max|baseline - oracle| + FLOOR[dtype] * max(1, max|oracle|)

where the oracle is ``fastattn.reference`` computed in float64 from the same inputs, and the
baseline is the same reference computed in the inputs' dtype (what plain PyTorch gets in that
precision). NaN or inf where the oracle is finite always fails.

The check runs on fresh random inputs of the case itself, or, when its score matrix is larger than
``GATE_MAX_SCORES[device]``, on a reduced copy (:meth:`Case.reduced`: same D, dtype, causality and
GQA group; B = 1, fewer heads and shorter sequences), so the float64 oracle stays affordable.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastattn import reference
from fastattn.testing import error_ratio

from .providers import Call
from .sweep import Case

# Float64 scores the oracle may materialise (it keeps several (B, Hq, L, S) matrices, more with grads).
GATE_MAX_SCORES = {"cpu": 2**20, "cuda": 2**26}
GATE_SEED = 1234  # fresh inputs, not the timed ones


@dataclass(frozen=True)
class GateResult:
    """The worst checked tensor: its name, error and bound; where the check ran; why it failed."""

    tensor: str
    max_err: float
    bound: float
    checked_on: str  # "full" or the label of the reduced case
    failure: str | None  # None when every tensor is within its bound

    @property
    def passed(self) -> bool:
        return self.failure is None


def _forward_and_grads(
    fn: Call, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor | None
) -> list[torch.Tensor]:
    """[out] or, with an output gradient do, [out, dq, dk, dv] (the inputs become fresh leaves)."""
    q, k, v = (t.detach().requires_grad_(do is not None) for t in (q, k, v))
    with torch.enable_grad():
        out = fn(q, k, v)
        if do is None:
            return [out.detach()]
        return [out.detach(), *torch.autograd.grad(out, (q, k, v), do)]


@functools.lru_cache(maxsize=1)  # every provider of a (case, mode) is checked against the same answers
def _expected(small: Case, grad: bool, device: str):
    """(inputs, do, oracle, baseline) for the gate's fresh inputs of `small`."""
    q, k, v = small.inputs(device, GATE_SEED)
    do = small.inputs(device, GATE_SEED + 1)[0] if grad else None
    kwargs = small.attention_kwargs(device)
    ref = lambda q, k, v: reference.attention(q, k, v, is_causal=small.causal, enable_gqa=small.gqa, **kwargs)
    oracle = _forward_and_grads(ref, q.double(), k.double(), v.double(), None if do is None else do.double())
    baseline = _forward_and_grads(ref, q, k, v, do)
    return (q, k, v), do, oracle, baseline


def check(call_for: Callable[[Case], Call], case: Case, mode: str, device: str) -> GateResult:
    """Run the provider on fresh inputs of `case` (or of its reduced copy) and apply the rule.

    call_for(case) -> the provider's call for that case (a reduced case may need its own setup,
    such as a block mask). Exceptions from the provider propagate: the runner turns them into rows.
    Returns the first failing tensor, or when all pass the one closest to its bound.
    """
    small = case.reduced(GATE_MAX_SCORES[device])
    checked_on = "full" if small == case else small.label
    inputs, do, oracle, baseline = _expected(small, mode != "fwd", device)
    got = _forward_and_grads(call_for(small), *inputs, do)

    results = []
    for name, x, o, b in zip(("out", "dq", "dk", "dv"), got, oracle, baseline):
        if tuple(x.shape) != tuple(o.shape):
            return GateResult(
                name, math.inf, 0.0, checked_on, f"{name} has shape {tuple(x.shape)}, not {tuple(o.shape)}"
            )
        r = error_ratio(name, x, o, b, dtype=small.dtype)
        if not r.passed:
            failure = f"{name}: max|err| {r.err:.2e} > bound {r.bound:.2e} against the float64 reference"
            return GateResult(name, r.err, r.bound, checked_on, failure)
        results.append(GateResult(name, r.err, r.bound, checked_on, None))
    return max(results, key=lambda r: r.max_err / r.bound)

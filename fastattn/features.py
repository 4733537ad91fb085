"""The canonical description of what one attention call asks for, declared once.

:class:`Features` holds every scalar property of a call beyond its tensors (q, k, v and the mask):
today the scale, the causal diagonal and dropout_p; tomorrow sliding windows, softcaps, dropout
seeds. Everything else reads it:

- the custom ops carry it as one ``int[]`` and one ``float[]`` argument (:meth:`Features.pack` /
  :meth:`Features.unpack`, generic over the fields), so the op schema, the fake kernels and
  autograd never name a feature;
- dispatch asks :func:`used_features` which named features a call uses and :data:`FEATURES` which
  backends serve each one (forward) and differentiate it (backward);
- the PyTorch score step (``eager/scores.py``), the kernel score step
  (``fused/kernels/common.py``), the launch constexprs and scalars (``fused/plumbing.py``) and the
  AOT variants (``fused/aot.py``) read the fields.

Adding a score modifier (a sliding window, a softcap, ALiBi), the whole checklist (8 files,
each a few lines, plus tests):

1. here: a field of :class:`Features` (an ``int``, ``int | None``, ``float`` or ``bool``: the op
   packing follows), its argument check in :func:`check_features`, and a :data:`FEATURES` entry
   (when a call uses it, which backends serve and differentiate it: dispatch reads nothing else);
2. ``interface.py`` and ``reference.py``: the keyword argument and its docstring sentence, and
   ``problem.canonicalize``: passing it to :func:`check_features`;
3. ``eager/scores.py``: its maths in ``score_mods_`` (and in ``key_bounds`` if it hides keys by
   position: the PyTorch loops and the host's block lists read it), which the reference, the CPU
   forward and the CPU backward all call;
4. ``fused/kernels/common.py``: the same maths in ``_score_step``, behind a constexpr; every
   kernel (forward, dQ, dK/dV in both orientations) computes its scores through it. A feature that
   hides keys by position (a sliding window) also narrows the block loops: ``_key_block_bounds``
   there and ``_query_block_bounds`` in ``kernels/backward.py``. Its scalar and constexpr are
   named in the top-level kernels' signatures and passed, by keyword, to the two step calls of
   each kernel (Triton has no structs; see the note in ``fused/plumbing.py``);
5. ``fused/plumbing.py``: that constexpr and its scalars in ``feature_launch_args`` (the AOT
   tool types scalars from the values the launchers pass; floats must be annotated ``tl.float32``
   in the kernel signature, or the AOT refuses them);
6. ``fused/aot.py``: one named variant in ``VARIANTS`` so its kernels are compiled ahead of time.

Plus its tests: the reference against an independent formula, every backend against the reference.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Features:
    """Scalar properties of one call, after checking (see :func:`check_features`).

    scale: multiplies Q K^T. causal_offset: None, or d such that query i sees key j only when
    j <= i + d (0: SDPA's top-left is_causal, S - L: bottom-right). dropout_p: the probability of
    dropping an attention weight (declared; no backend serves it yet).
    """

    scale: float
    causal_offset: int | None = None
    dropout_p: float = 0.0

    def pack(self) -> tuple[list[int], list[float]]:
        """(ints, floats) for the custom ops' schema; :meth:`unpack` inverts it."""
        ints: list[int] = []
        floats: list[float] = []
        for name, kind in _FIELD_KINDS.items():  # a constant: torch.compile traces this loop
            value = getattr(self, name)
            if kind == "float":
                floats.append(float(value))
            elif kind == "int?":
                ints += [0, 0] if value is None else [1, int(value)]
            else:
                ints.append(int(value))
        return ints, floats

    @classmethod
    def unpack(cls, ints: list[int], floats: list[float]) -> Features:
        values = {}
        i = j = 0
        for name, kind in _FIELD_KINDS.items():
            if kind == "float":
                values[name] = floats[j]
                j += 1
            elif kind == "int?":
                values[name] = ints[i + 1] if ints[i] else None
                i += 2
            else:
                values[name] = bool(ints[i]) if kind == "bool" else ints[i]
                i += 1
        return cls(**values)


def _field_kinds() -> dict[str, str]:
    """Each field's slot kind in the op packing: "int", "bool", "float" or "int?" (int | None)."""
    kinds = {int: "int", bool: "bool", float: "float", int | None: "int?"}
    hints = typing.get_type_hints(Features)
    out = {}
    for f in dataclasses.fields(Features):
        kind = kinds.get(hints[f.name])
        if kind is None:
            raise TypeError(f"Features.{f.name}: the op packing has no slot for {hints[f.name]}")
        out[f.name] = kind
    return out


_FIELD_KINDS = _field_kinds()


def check_features(*, scale: float | None, head_dim: int, causal_offset: int | None, dropout_p: float) -> Features:
    """Check the public arguments that become :class:`Features` (TypeError / ValueError name them)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
    return Features(
        scale=float(scale) if scale is not None else 1.0 / math.sqrt(head_dim),
        causal_offset=causal_offset,
        dropout_p=float(dropout_p),
    )


ALL_BACKENDS = frozenset({"triton", "cpu", "reference"})


@dataclass(frozen=True)
class Feature:
    """One named feature: when a call uses it and which backends implement it.

    forward: backends whose forward computes it; backward: backends whose backward differentiates
    it (a backward that cannot is never chosen silently: dispatch gives the reason).
    """

    description: str
    used: Callable[[typing.Any], bool]  # (Problem) -> bool
    forward: frozenset[str]
    backward: frozenset[str]


def _float_mask(p) -> bool:
    return p.mask is not None and p.mask.dtype != torch.bool


FEATURES: dict[str, Feature] = {
    "causal": Feature("a causal diagonal", lambda p: p.features.causal_offset is not None, ALL_BACKENDS, ALL_BACKENDS),
    "bool mask": Feature(
        "a bool attn_mask", lambda p: p.mask is not None and p.mask.dtype == torch.bool, ALL_BACKENDS, ALL_BACKENDS
    ),
    "float mask": Feature("a float attn_mask", _float_mask, ALL_BACKENDS, ALL_BACKENDS),
    "float mask gradient": Feature(
        "the gradient of a float attn_mask that requires grad",
        lambda p: _float_mask(p) and p.mask.requires_grad,
        ALL_BACKENDS,
        frozenset({"cpu", "reference"}),
    ),
    "dropout": Feature(
        "dropout_p > 0 (not implemented yet in fastattn; pass dropout_p=0.0)",
        lambda p: p.features.dropout_p > 0.0,
        frozenset(),
        frozenset(),
    ),
}


def used_features(p) -> list[str]:
    """The names of the :data:`FEATURES` problem `p` uses, in declaration order."""
    return [name for name, f in FEATURES.items() if f.used(p)]

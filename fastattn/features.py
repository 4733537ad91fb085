"""The canonical description of what one attention call asks for, declared once.

:class:`Features` holds every scalar property of a call beyond its tensors (q, k, v, the mask and the
ALiBi slopes): the scale, the band of visible keys (the causal diagonal and a sliding window's
edges), the softcap and dropout_p. Everything else reads it:

- the custom ops carry it as one ``int[]`` and one ``float[]`` argument (:meth:`Features.pack` /
  :meth:`Features.unpack`, generic over the fields), so the op schema, the fake kernels and
  autograd never name a feature;
- dispatch asks :func:`used_features` which named features a call uses and :data:`FEATURES` which
  backends serve each one (forward) and differentiate it (backward);
- the PyTorch score step (``eager/scores.py``), the kernel score step
  (``fused/kernels/common.py``), the launch constexprs and scalars (``fused/plumbing.py``) and the
  AOT variants (``fused/aot.py``) read the fields.

Adding a score modifier, the whole checklist (8 files, each a few lines, plus tests; the sliding
window and the softcap were added this way; ALiBi, a tensor, also needed a slot beside the mask in
``problem.Problem``, the op schema (``ops.py``) and the launch plans):

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
   there and ``_query_block_bounds`` in ``kernels/backward.py``. Its scalars are named in the
   top-level kernels' signatures and join the one ``mods`` tuple (``common._mods``) the per-block
   helpers pass on; its constexpr is still passed by keyword through the helpers to the two
   step calls of each kernel (Triton has no structs; see the note in ``fused/plumbing.py``);
5. ``fused/plumbing.py``: that constexpr and its scalars in ``feature_launch_args`` (the AOT
   tool types scalars from the values the launchers pass; floats must be annotated ``tl.float32``
   in the kernel signature, or the AOT refuses them);
6. ``fused/aot.py``: one named variant in ``VARIANTS`` so its kernels are compiled ahead of time.

Plus its tests: the reference against an independent formula, every backend against the reference.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Features:
    """Scalar properties of one call, after checking (see :func:`check_features`).

    scale: multiplies Q K^T.
    causal_offset: None, or d such that query i sees key j only when j <= i + d: the upper edge of
        the visible band (0: SDPA's top-left is_causal, S - L: bottom-right; a window's right edge
        S - L + right, intersected with the causal one, lands here too).
    window_lo: None, or w such that query i sees key j only when j >= i + w: the lower edge, from
        a sliding window's left size (w = S - L - left). None where it would hide nothing.
    softcap: 0.0, or c > 0: each scaled score s becomes c * tanh(s / c) before bias and mask.
    dropout_p: the probability of dropping an attention weight (fastattn.dropout: which ones is a
        function of the call's draw, ``Problem.rng``, a tensor that travels beside the mask).
    The ALiBi slopes are a tensor: they travel beside the mask (``Problem.alibi``), not here.
    """

    scale: float
    causal_offset: int | None = None
    window_lo: int | None = None
    softcap: float = 0.0
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


def _check_window(window_size) -> tuple[int, int]:
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair (left, right) of ints, got {window_size!r}")
    for side, w in zip(("left", "right"), window_size):
        if isinstance(w, bool) or not isinstance(w, numbers.Integral):  # NumPy integers too
            raise TypeError(f"window_size {side} must be an int (-1 for unbounded), got {type(w).__name__}")
        if w < -1:
            raise ValueError(f"window_size {side} must be >= -1 (-1: unbounded), got {w}")
    return int(window_size[0]), int(window_size[1])


def _check_softcap(softcap) -> float:
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):  # NumPy floats too
        raise TypeError(f"softcap must be a float, got {type(softcap).__name__}")
    if not (0.0 <= softcap < math.inf):  # also refuses NaN (comparisons only: dynamo traces them)
        raise ValueError(f"softcap must be finite and >= 0 (0: off), got {softcap}")
    return float(softcap)


def _check_scale(scale) -> float | None:
    """scale as SDPA takes it: None, any real number (NumPy's too) or a one-element real tensor."""
    if scale is None:
        return None
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or scale.dtype == torch.bool or scale.is_complex():
            raise TypeError(
                f"scale must be a float, None or a one-element real tensor, got a {scale.dtype} tensor of shape {tuple(scale.shape)}"
            )
        scale = scale.item()
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def window_bounds(window_size: tuple[int, int], L: int, S: int) -> tuple[int | None, int | None]:
    """(lower, upper) diagonal offsets of FlashAttention's window (left, right) for L queries and S
    keys: query i sees key j when i + S - L - left <= j <= i + S - L + right (bottom-right aligned;
    -1 unbounded). A side that hides no key of the (L, S) matrix gives None."""
    lower, upper = relative_window(window_size)
    return _hiding(None if lower is None else S - L + lower, None if upper is None else S - L + upper, L, S)


def relative_window(window_size: tuple[int, int]) -> tuple[int | None, int | None]:
    """(-left, right) of a window, None for an unbounded (-1) side: the band's diagonals relative
    to the bottom-right corner (S - L), as packed calls keep them for every sequence."""
    left, right = window_size
    return (-left if left >= 0 else None), (right if right >= 0 else None)


def _hiding(lower: int | None, upper: int | None, L: int, S: int) -> tuple[int | None, int | None]:
    """The diagonals (j >= i + lower, j <= i + upper) that hide some key of an (L, S) matrix."""
    if lower is not None and not lower > 1 - L:  # hides j < i + lower for some 0 <= j < L - 1 + lower
        lower = None
    if upper is not None and not upper < S - 1:  # hides some j > i + upper
        upper = None
    return lower, upper


def anchored(f: Features, L: int, S: int) -> Features:
    """The features of one sequence (L queries, S keys) of a packed call, whose `f` holds the band's
    diagonals relative to each sequence's bottom-right corner: shifted by S - L, and None where
    they hide nothing there (so a causal sequence with L == S is exactly is_causal=True)."""
    lower, upper = _hiding(
        None if f.window_lo is None else f.window_lo + S - L,
        None if f.causal_offset is None else f.causal_offset + S - L,
        L,
        S,
    )
    return dataclasses.replace(f, causal_offset=upper, window_lo=lower)


def block_features(f: Features, shift: int, L: int, S: int) -> Features | None:
    """The features of one block of a larger call, or None when its band leaves no key visible.

    The block's query i and key j are the call's query i + qs and key j + ks; shift = qs - ks. `f`
    holds the call's diagonals (query i sees key j when i + window_lo <= j <= i + causal_offset);
    the block's are moved by `shift` and set to None where they hide no key of its (L, S) matrix, so
    a block wholly inside the band is a plain call, and one on the causal diagonal a causal one.
    This is how a context-parallel ring (fastattn.distributed) runs each of its blocks."""
    if L == 0 or S == 0:
        return None
    lower = None if f.window_lo is None else f.window_lo + shift
    upper = None if f.causal_offset is None else f.causal_offset + shift
    if upper is not None and upper < 1 - L:  # even the last query sees no key j >= 0
        return None
    if lower is not None and (lower > S - 1 or (upper is not None and lower > upper)):
        return None
    lower, upper = _hiding(lower, upper, L, S)
    return dataclasses.replace(f, causal_offset=upper, window_lo=lower)


def check_features(
    *,
    scale: float | None,
    head_dim: int,
    causal_offset: int | None,
    dropout_p: float,
    window_size=(-1, -1),
    softcap: float = 0.0,
    seqlens: tuple[int, int] = (0, 0),
) -> Features:
    """Check the public arguments that become :class:`Features` (TypeError / ValueError name them).

    seqlens: (L, S), which place the window's diagonals; its right edge is intersected with the
    causal one (`causal_offset`, from is_causal or a CausalBias)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):  # NumPy floats too
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    scale = _check_scale(scale)
    window_lo, window_hi = window_bounds(_check_window(window_size), *seqlens)
    if window_hi is not None:
        causal_offset = window_hi if causal_offset is None else min(causal_offset, window_hi)
    return Features(
        scale=float(scale) if scale is not None else 1.0 / math.sqrt(head_dim),
        causal_offset=causal_offset,
        window_lo=window_lo,
        softcap=_check_softcap(softcap),
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
    "sliding window": Feature(
        "a sliding window's left edge (window_size[0] >= 0)",
        lambda p: p.features.window_lo is not None,
        ALL_BACKENDS,
        ALL_BACKENDS,
    ),
    "softcap": Feature(
        "logit softcapping (softcap > 0)", lambda p: p.features.softcap > 0.0, ALL_BACKENDS, ALL_BACKENDS
    ),
    "alibi": Feature("ALiBi slopes", lambda p: p.alibi is not None, ALL_BACKENDS, ALL_BACKENDS),
    "packed sequences": Feature(
        "packed variable-length sequences (varlen_attention)",
        lambda p: p.packing is not None,
        ALL_BACKENDS,
        ALL_BACKENDS,
    ),
    "kv cache": Feature(
        "a KV cache read through seqused_k (inference only: no backend differentiates it)",
        lambda p: p.packing is not None and p.packing.seqused_k is not None,
        ALL_BACKENDS,
        frozenset(),
    ),
    "paged kv cache": Feature(
        "a paged KV cache read through block_table (inference only: no backend differentiates it)",
        lambda p: p.packing is not None and p.packing.block_table is not None,
        ALL_BACKENDS,
        frozenset(),
    ),
    "dropout": Feature(
        "attention dropout (dropout_p > 0, counter-based: fastattn.dropout)",
        lambda p: p.features.dropout_p > 0.0,
        ALL_BACKENDS,
        ALL_BACKENDS,
    ),
}


# The features that change the scores beyond mask and causality (the kernels' configs give them
# narrower tiles: fused.plumbing.modified_scores).
SCORE_MODIFIERS = ("sliding window", "softcap", "alibi")


def used_features(p) -> list[str]:
    """The names of the :data:`FEATURES` problem `p` uses, in declaration order."""
    return [name for name, f in FEATURES.items() if f.used(p)]

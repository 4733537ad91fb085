"""fastattn as an attention implementation of Hugging Face transformers.

    import fastattn.integrations.transformers as fa_hf
    fa_hf.register()                                   # once; returns "fastattn"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fastattn")
    # or Model._from_config(cfg, attn_implementation="fastattn"), model.set_attn_implementation("fastattn")

:func:`register` puts two functions into transformers' registries under one name:

- :func:`attention_forward` in ``AttentionInterface``: what each attention layer calls with its
  heads-first q (B, Hq, L, E), k, v (B, Hkv, S, E), the mask, and keyword arguments;
- :func:`attention_mask` in ``AttentionMaskInterface``: how the model builds that mask. Without a
  registered mask function transformers hands a custom implementation the raw 2-D padding mask,
  which an SDPA-style function would silently ignore; this one is why padding works.

Supported transformers: 5.x (tested: the versions in ``TESTED_TRANSFORMERS``); 4.x releases
have another mask-function signature, and :func:`register` refuses them.

What the attention function honours, and how:

- GQA: Hq a multiple of Hkv goes to ``fastattn.attention(enable_gqa=True)``; K/V are never repeated.
- ``scaling``: the model's own scale (None: 1/sqrt(E)).
- The mask: when the model's mask is plain causal (or causal within a sliding window, or
  bidirectional) with no padding and the queries are the last positions of the keys (prefill,
  decode with a KV cache), the mask function returns None and no L x S mask is built: causality
  goes to fastattn as ``window_size=(-1, 0)`` (bottom-right, which is what decoding with a cache
  needs; for L == S it is ordinary causal) and a ``sliding_window`` of w as ``window_size=(w - 1,
  0)``, so the cost grows with L * w. The window is taken from the layer's ``sliding_window``
  argument only for model types known to pass it (``WINDOW_ARGUMENT_MODELS``); other models get a
  materialised mask for windowed layers (correct, not banded). Every other case (padding,
  packed sequences, a static cache, custom mask overlays, a cache offset under torch.compile)
  gets transformers' own boolean mask (B, 1, L, S), and a layer that receives a mask uses it
  alone, as transformers' eager attention does.
- ``softcap`` (Gemma 2): ``softcap=c`` in fastattn, applied to the scaled scores before the mask,
  as Gemma 2's eager code does.
- ``dropout``: the layer passes its dropout probability in training mode and 0 in eval;
  fastattn's dropout (SDPA's definition, torch's default generator).
- ``position_bias`` (an additive float bias, as T5-style models pass): added as a float mask,
  combined with the boolean mask where there is one.
- ``output_attentions=True`` (the call's argument or the config's): the layer's output and its
  weights (B, Hq, L, S) come from :func:`fastattn.reference.attention` with
  ``return_weights=True``: exact, differentiable, and slow (O(L * S) memory), for inspection.
- ``torch.compile(model, fullgraph=True)``: no graph break (fastattn's ops are custom ops; the
  mask function never reads a tensor's values while compiling).

Rows a padding mask leaves with no key (a left-padded query under causality) give zeros, where
transformers' eager path gives the mean of V (and SDPA NaN): those positions are padding, and
their outputs reach no loss or logit that a label covers.

What it refuses, with a ValueError naming the argument: attention sinks (``s_aux``, ``sinks``),
``head_mask``, and any other keyword in ``REFUSED_ARGUMENTS``.

:func:`record` captures every call's q, k, v and attention weights, for the explainer
(:mod:`fastattn.explain`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import torch

from .. import reference
from ..interface import attention as _attention

TESTED_TRANSFORMERS = ("5.0.0", "5.24.0")
MIN_TRANSFORMERS = "5.0.0"

# model_type values whose attention layers pass `sliding_window=` to the attention function for
# exactly the layers whose mask is windowed (checked in their modeling code and by the tests).
WINDOW_ARGUMENT_MODELS = frozenset({"mistral", "qwen2", "gemma2"})

# Keyword arguments a layer may pass that change what attention computes and that fastattn does
# not implement: refused rather than ignored.
REFUSED_ARGUMENTS = {
    "s_aux": "attention sinks (a learned per-head logit added to the softmax denominator)",
    "sinks": "attention sinks (a learned per-head logit added to the softmax denominator)",
    "head_mask": "a per-head multiplier on the attention weights",
}


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "fastattn.integrations.transformers needs Hugging Face transformers: "
            "pip install 'fastattn[transformers]' (or pip install transformers)"
        ) from e
    from packaging.version import Version

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise ImportError(
            f"fastattn.integrations.transformers needs transformers >= {MIN_TRANSFORMERS} "
            f"(AttentionMaskInterface); found {transformers.__version__}"
        )
    return transformers


def register(name: str = "fastattn", *, backend: str = "auto") -> str:
    """Register fastattn with transformers' AttentionInterface and AttentionMaskInterface as
    `name`, and return `name`. Idempotent: registering again (the same or another backend)
    replaces the entry. backend: the ``backend=`` every call passes to fastattn.attention
    ("auto", "cpu", "triton" or "reference").

    Raises ImportError when transformers is missing or older than MIN_TRANSFORMERS, and
    ValueError for a name transformers already uses for its own implementations.
    """
    _transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if not isinstance(name, str) or not name:
        raise ValueError(f"register: name must be a non-empty string, got {name!r}")
    builtin = {"eager", "sdpa", "flex_attention", "paged|eager"} | {
        k for k in AttentionInterface._global_mapping if k.startswith("flash_attention")
    }
    if name in builtin:
        raise ValueError(f"register: name {name!r} is one of transformers' own implementations; pick another")
    from ..dispatch import BACKENDS

    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"register: backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
    AttentionInterface.register(name, attention_function(backend))
    AttentionMaskInterface.register(name, attention_mask)
    return name


# ----------------------------------------------------------------------------------------------
# The mask function


def _static_int(x) -> bool:
    return isinstance(x, int) or (isinstance(x, torch.SymInt))


def attention_mask(
    batch_size: int,
    q_length: int | None = None,
    kv_length: int | None = None,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    allow_is_bidirectional_skip: bool = False,
    config=None,
    cache_position: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """transformers' mask interface for fastattn: None where the layer's own arguments describe
    the mask exactly (see the module docstring), else transformers' boolean mask (B, 1, L, S),
    True where the key takes part.

    The queries are given as q_length and q_offset (transformers 5.24) or, by earlier 5.x
    releases, as cache_position (their absolute positions); that tensor is read on the host
    (where a tensor of positions sits on a GPU, a sync) except while compiling, where the mask is
    built instead."""
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    if mask_function is None:
        mask_function = causal_mask_function
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask.bool()  # a 0/1 padding mask (transformers passes bool already)
    old_api = cache_position is not None
    if old_api:
        q_length = cache_position.shape[0]
        q_offset = None if torch.compiler.is_compiling() else int(cache_position[0])
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if _mask_is_implied(
        padding,
        q_length,
        kv_length,
        q_offset,
        kv_offset,
        local_size,
        allow_is_causal_skip,
        allow_is_bidirectional_skip,
        config,
    ):
        return None
    queries = dict(cache_position=cache_position) if old_api else dict(q_length=q_length, q_offset=q_offset)
    return sdpa_mask(
        batch_size=batch_size,
        kv_length=kv_length,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        local_size=local_size,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
        **queries,
        **kwargs,
    )


def _mask_is_implied(padding, q_length, kv_length, q_offset, kv_offset, local_size, causal_skip, bidir_skip, config):
    """True when the mask needs no tensor: no padding in the keys' range, and the pattern is one the
    layer's arguments give fastattn exactly (causal aligned bottom-right, possibly windowed, or
    full bidirectional)."""
    if not (causal_skip or bidir_skip):
        return False
    if not (_static_int(q_offset) and _static_int(kv_offset)):
        return False  # a static cache's tensor offset: reading it would sync or break a graph
    if padding is not None:
        if torch.compiler.is_compiling():
            return False  # the padding's values are unknown while tracing
        if not bool(padding[:, kv_offset : kv_offset + kv_length].all()):
            return False
    if causal_skip:
        # fastattn's causal window is aligned to the bottom-right corner: the last query is the
        # last key. True for prefill and for decoding with a dynamic or sliding cache.
        if q_offset + q_length != kv_offset + kv_length:
            return False
        if local_size is None or kv_length <= local_size:
            return True  # no window, or one that removes nothing
        model_type = getattr(config, "model_type", None)
        return model_type in WINDOW_ARGUMENT_MODELS and getattr(config, "sliding_window", None) == local_size
    # bidirectional: only without a window that removes something
    return local_size is None or kv_length < local_size


# ----------------------------------------------------------------------------------------------
# The attention function


@dataclasses.dataclass
class AttentionCall:
    """One attention call seen by :func:`record`: the layer's own inputs and what attention did.

    layer: the module's ``layer_idx`` (None when it has none); index: the call's position in the
    forward pass. query (B, Hq, L, E), key (B, Hkv, S, E), value (B, Hkv, S, Ev) and output
    (B, Hq, L, Ev) are detached; weights (B, Hq, L, S) come from fastattn.reference.attention
    (return_weights=True) in float32, before dropout; every row with a key sums to 1. scale,
    softcap and window_size are what fastattn was called with; is_causal: causality came from the
    window (no mask tensor); mask is the mask tensor it got (None: none).
    """

    index: int
    layer: int | None
    module: torch.nn.Module
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    output: torch.Tensor
    weights: torch.Tensor
    scale: float
    mask: torch.Tensor | None
    is_causal: bool
    window_size: tuple[int, int]
    softcap: float


_recorders: list[list[AttentionCall]] = []


@contextlib.contextmanager
def record():
    """Within ``with record() as calls:``, every call of a fastattn-registered attention function
    appends an :class:`AttentionCall` to `calls`, in call order. Nested recorders each get every
    call. Computing the weights costs O(L * S) memory per call; nothing is recorded while
    torch.compile traces."""
    calls: list[AttentionCall] = []
    _recorders.append(calls)
    try:
        yield calls
    finally:
        _recorders.remove(calls)


@functools.cache
def attention_function(backend: str = "auto"):
    """The AttentionInterface function for `backend` (one object per backend, so registering
    twice registers the same function)."""

    def fastattn_attention(module, query, key, value, attention_mask, **kwargs):
        return attention_forward(module, query, key, value, attention_mask, backend=backend, **kwargs)

    fastattn_attention.__doc__ = attention_forward.__doc__
    return fastattn_attention


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    position_bias: torch.Tensor | None = None,
    output_attentions: bool | None = None,
    backend: str = "auto",
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention-function contract, computed by fastattn.

    query (B, Hq, L, E), key (B, Hkv, S, E), value (B, Hkv, S, Ev), heads first; attention_mask
    None or a bool/float tensor broadcastable to (B, Hq, L, S). Returns (out (B, L, Hq, Ev),
    weights (B, Hq, L, S) or None): weights only with output_attentions (then both come from
    fastattn.reference). The module docstring gives each argument's meaning.
    """
    for arg, what in REFUSED_ARGUMENTS.items():
        if kwargs.get(arg) is not None:
            raise ValueError(f"fastattn attention: {arg}= ({what}) is not supported; use attn_implementation='eager'")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            "fastattn attention: query, key and value must be (batch, heads, seq, head_dim), got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    softcap = float(softcap) if softcap else 0.0
    if sliding_window is not None and (isinstance(sliding_window, bool) or sliding_window < 1):
        raise ValueError(f"fastattn attention: sliding_window must be a positive int or None, got {sliding_window!r}")

    mask = attention_mask
    window = (-1, -1)
    if mask is None:
        # The mask function returned None: the pattern is the layer's own (see the module docstring).
        if is_causal:
            window = (sliding_window - 1 if sliding_window else -1, 0)
        elif sliding_window:
            window = (sliding_window, sliding_window)  # transformers' bidirectional window: |i - j| <= w
    if position_bias is not None:
        mask = _with_bias(mask, position_bias)

    kw = dict(
        dropout_p=float(dropout or 0.0),
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
        window_size=window,
        softcap=softcap,
    )
    if output_attentions is None:
        output_attentions = bool(getattr(getattr(module, "config", None), "output_attentions", False))
    if output_attentions:
        out, weights = reference.attention(query, key, value, mask, return_weights=True, **kw)
    else:
        out, weights = _attention(query, key, value, mask, backend=backend, **kw), None
    if _recorders and not torch.compiler.is_compiling():
        _record(module, query, key, value, mask, out, kw, bool(is_causal and mask is None))
    return out.transpose(1, 2).contiguous(), weights


def _with_bias(mask: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, torch.finfo(bias.dtype).min)
    return bias + mask


def _record(module, query, key, value, mask, out, kw, causal):
    with torch.no_grad():
        q, k, v = (t.detach().float() for t in (query, key, value))
        m = mask.detach() if mask is not None else None
        if m is not None and m.is_floating_point():
            m = m.float()
        _, weights = reference.attention(q, k, v, m, return_weights=True, **{**kw, "dropout_p": 0.0})
    scale = kw["scale"] if kw["scale"] is not None else 1.0 / math.sqrt(query.shape[-1])
    for calls in _recorders:
        calls.append(
            AttentionCall(
                index=len(calls),
                layer=getattr(module, "layer_idx", None),
                module=module,
                query=query.detach(),
                key=key.detach(),
                value=value.detach(),
                output=out.detach(),
                weights=weights,
                scale=float(scale),
                mask=m,
                is_causal=causal,
                window_size=kw["window_size"],
                softcap=kw["softcap"],
            )
        )

"""Argument checks and the canonical form every backend receives.

`attention()` and `reference.attention()` accept SDPA's arguments and fastattn's score modifiers;
:func:`canonicalize` checks them once and turns them into a :class:`Problem`: 4-D tensors with one
flattened batch dimension, the mask kept at its own (broadcast) size, the ALiBi slopes as a
(1 or B, Hq) view, and every scalar property of the call in one
:class:`fastattn.features.Features` (the band of visible keys as two diagonal offsets: is_causal,
a CausalBias and a window's right edge intersect in one upper diagonal, its left edge is the
lower one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .features import Features, check_features


def _is_causal_bias(obj) -> bool:
    """Is `obj` SDPA's torch.nn.attention.bias.CausalBias? Checked without importing that module:
    importing it pulls in torch._dynamo and triton, and triton's interpreter mode is fixed at import."""
    return any(c.__name__ == "CausalBias" and c.__module__ == "torch.nn.attention.bias" for c in type(obj).__mro__)


MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Packing:
    """Where the N sequences of a packed call (``fastattn.varlen_attention``) lie.

    The problem's q is (1, Hq, T_q, E) (the packed (T_q, Hq, E) rows seen heads first), k and v
    (1, Hkv, T_k, E / Ev), or with a block table the page pool (num_pages, page_size, Hkv, E / Ev)
    as (1, Hkv, num_pages * page_size, E / Ev). Sequence n is query rows cu_seq_q[n] : cu_seq_q[n + 1]
    against keys from its slot cu_seq_k[n] : cu_seq_k[n + 1] (or its pages, logical position j at
    row block_table[n, j // page_size] * page_size + j % page_size), of which the first
    seqused_k[n] take part when seqused_k is given. The problem's features hold the band's
    diagonals relative to each sequence's bottom-right corner (``features.anchored``); its alibi is
    (1 or N, Hq). All index tensors are int32 on the query's device. max_q / max_k: the caller's
    bounds on the lengths (the launch grid); num_splits: the split-KV factor, 0 to let the launcher
    choose."""

    cu_seq_q: torch.Tensor
    cu_seq_k: torch.Tensor | None
    seqused_k: torch.Tensor | None
    block_table: torch.Tensor | None
    max_q: int
    max_k: int
    page_size: int = 0
    num_splits: int = 0

    @property
    def num_seqs(self) -> int:
        return self.cu_seq_q.shape[0] - 1

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        """The index tensors, in the op schema's order."""
        return self.cu_seq_q, self.cu_seq_k, self.seqused_k, self.block_table

    def sizes(self) -> list[int]:
        """The scalars, in the op schema's order (left as given: under torch.compile max_q and max_k
        may be symbolic, and int() would specialise the graph on them)."""
        return [self.max_q, self.max_k, self.page_size, self.num_splits]

    @classmethod
    def from_op(cls, tensors, sizes) -> Packing | None:
        """Packing from the op's arguments; None for a dense call (no cu_seq_q)."""
        if tensors[0] is None:
            return None
        return cls(*tensors, *sizes)


@dataclass(frozen=True)
class Problem:
    """One attention call in canonical form.

    q: (B, Hq, L, E), k: (B, Hkv, S, E), v: (B, Hkv, S, Ev). Query head h reads KV head
    h // (Hq // Hkv). mask: None or a 4-D bool or float tensor whose every dim is 1 or the full
    size of (B, Hq, L, S); never expanded in memory. features: the scale, the causal offset and
    every other scalar property of the call (:class:`fastattn.features.Features`). alibi: None or
    the ALiBi slopes, float32 (1 or B, Hq): head h of batch b adds -alibi[b, h] * |i + S - L - j|.
    batch_shape / squeeze_heads: how :meth:`restore` gives results the caller's shape. rng /
    batch0: dropout's draw and the counter index of the first batch (:mod:`fastattn.dropout`).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    features: Features
    alibi: torch.Tensor | None = None
    batch_shape: tuple[int, ...] = ()
    squeeze_heads: bool = False  # the caller passed 2-D (L, E) tensors without a head dim
    packing: Packing | None = None  # a packed call (varlen_attention): see Packing
    # dropout_p > 0: the call's int64 (2,) (seed, offset) draw (fastattn.dropout), on the device.
    rng: torch.Tensor | None = None
    # The dropout counter's batch index of batch 0 (a packed call's run of sequences: its first).
    batch0: int = 0

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads_q(self) -> int:
        return self.q.shape[1]

    @property
    def heads_kv(self) -> int:
        return self.k.shape[1]

    @property
    def seqlen_q(self) -> int:
        return self.q.shape[2]

    @property
    def seqlen_k(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def head_dim_v(self) -> int:
        return self.v.shape[3]

    @property
    def group(self) -> int:
        return self.heads_q // self.heads_kv

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    def new_out(self, head_dim: int | None = None) -> torch.Tensor:
        """An empty (B, Hq, L, head_dim (default Ev)) result in the layout the caller gets: packed
        calls (T_q, Hq, Ev) rows, seen heads first as (1, Hq, T_q, Ev); else contiguous."""
        d = self.head_dim_v if head_dim is None else head_dim
        if self.packing is not None:
            return self.q.new_empty(self.seqlen_q, self.heads_q, d).permute(1, 0, 2)[None]
        return self.q.new_empty(self.batch, self.heads_q, self.seqlen_q, d)

    def restore(self, out: torch.Tensor, lse: torch.Tensor | None):
        """Reshape backend outputs (B, Hq, L, Ev) and (B, Hq, L) to the caller's batch dims (packed
        calls: (T_q, Hq, Ev) and (T_q, Hq))."""
        if self.packing is not None:
            return out[0].transpose(0, 1).contiguous(), None if lse is None else lse[0].t().contiguous()
        if self.squeeze_heads:
            out, lse = out[0, 0], None if lse is None else lse[0, 0]
        else:
            out = out.reshape(*self.batch_shape, *out.shape[1:])
            if lse is not None:
                lse = lse.reshape(*self.batch_shape, *lse.shape[1:])
        return out, lse


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dims (..., L, E), got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32 (float64 on CPU backends)")
    if t.is_sparse or getattr(t, "is_nested", False):
        raise TypeError(f"{name} must be a dense strided tensor")


def check_qkv(query, key, value, enable_gqa) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The checks every public call makes of query, key and value (tensors of one supported dtype
    on one device) and enable_gqa; returns the three as autocast sees them (:func:`autocast_inputs`)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(name, t)
    query, key, value = autocast_inputs(query, key, value)
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}"
        )
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    return query, key, value


def check_heads(Hq: int, Hkv: int, Hv: int, E: int, Ek: int, Ev: int, enable_gqa: bool) -> None:
    """Head counts and head dims: key's E is the query's, value's heads are the key's, 1 <= E, Ev <=
    MAX_HEAD_DIM, and Hq != Hkv only with enable_gqa and Hq a multiple of Hkv."""
    if Ek != E:
        raise ValueError(f"head dim of query ({E}) and key ({Ek}) must match")
    if Hv != Hkv:
        raise ValueError(f"key has {Hkv} heads but value has {Hv}")
    if E < 1 or Ev < 1:
        raise ValueError(f"head dims must be at least 1, got E={E}, Ev={Ev}")
    if E > MAX_HEAD_DIM or Ev > MAX_HEAD_DIM:
        raise ValueError(f"head dims up to {MAX_HEAD_DIM} are supported, got E={E}, Ev={Ev}")
    if Hq != Hkv:
        if not enable_gqa:
            raise ValueError(
                f"query has {Hq} heads and key/value {Hkv}; pass enable_gqa=True for grouped-query attention"
            )
        if Hkv == 0 or Hq % Hkv != 0:
            raise ValueError(f"enable_gqa=True needs query heads ({Hq}) to be a multiple of key/value heads ({Hkv})")


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors as SDPA sees them inside a torch.autocast region of their device: float16,
    bfloat16 and float32 ones in the region's dtype (float64 is left alone, as autocast does)."""
    device_type = tensors[0].device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.dtype in (torch.float16, torch.bfloat16, torch.float32) else t for t in tensors)


def _broadcast_batch(name: str, t: torch.Tensor, batch_shape: tuple[int, ...]) -> torch.Tensor:
    """key or value with its batch dims broadcast to the query's (size-1 dims become stride-0
    views, as SDPA broadcasts them); the query's batch dims are the result's, so they may not be
    the broadcast ones."""
    own = tuple(t.shape[:-3])
    if own == batch_shape:
        return t
    try:
        ok = torch.broadcast_shapes(own, batch_shape) == torch.Size(batch_shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"batch dims differ: query {batch_shape}, {name} {own} ({name}'s may only broadcast to the query's, "
            "from size-1 dims)"
        )
    return t.expand(*batch_shape, *t.shape[-3:])


def _causal_from_bias(bias, L: int, S: int) -> int:
    from torch.nn.attention.bias import CausalVariant

    if bias.seq_len_q != L or bias.seq_len_kv != S:
        raise ValueError(
            f"attn_mask is a CausalBias for (L={bias.seq_len_q}, S={bias.seq_len_kv}) "
            f"but query has L={L} and key has S={S}"
        )
    if bias.variant == CausalVariant.UPPER_LEFT:
        return 0
    if bias.variant == CausalVariant.LOWER_RIGHT:
        return S - L
    raise ValueError(f"attn_mask: unknown CausalBias variant {bias.variant}")


def _normalize_mask(mask: torch.Tensor, q: torch.Tensor, batch_shape, Hq: int, L: int, S: int):
    """Return the mask as a 4-D view (Bm, Hm, Lm, Sm), each dim 1 or the full size."""
    target = (*batch_shape, Hq, L, S)
    if mask.dim() > len(target):
        raise ValueError(f"attn_mask has shape {tuple(mask.shape)}, more dims than the scores {target}")
    try:
        if torch.broadcast_shapes(mask.shape, target) != torch.Size(target):
            raise RuntimeError
    except RuntimeError:
        raise ValueError(
            f"attn_mask of shape {tuple(mask.shape)} does not broadcast to the scores' shape (..., Hq, L, S) = {target}"
        ) from None
    mask = mask.reshape((1,) * (len(target) - mask.dim()) + tuple(mask.shape)) if mask.dim() < len(target) else mask
    nb = len(batch_shape)
    head_shape = tuple(mask.shape[nb:])
    if all(s == 1 for s in mask.shape[:nb]):
        return mask.reshape(1, *head_shape)
    B = math.prod(batch_shape)
    # Only the batch dims are expanded (a copy only when they cannot be viewed as one).
    return mask.expand(*batch_shape, *head_shape).reshape(B, *head_shape)


def _check_alibi(alibi_slopes, query: torch.Tensor, batch_shape, Hq: int) -> torch.Tensor | None:
    """ALiBi slopes as a float32 (1 or B, Hq) view; accepted shapes (Hq,) and (*batch dims, Hq)."""
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(alibi_slopes).__name__}")
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
    if alibi_slopes.device != query.device:
        raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but query is on {query.device}")
    if alibi_slopes.requires_grad:
        raise ValueError("alibi_slopes is not differentiable in fastattn; pass alibi_slopes.detach()")
    shape = tuple(alibi_slopes.shape)
    if shape == (Hq,):
        return alibi_slopes.reshape(1, Hq)
    if shape == (*batch_shape, Hq) and batch_shape:
        return alibi_slopes.reshape(math.prod(batch_shape), Hq)
    expected = f"({Hq},)" + (f" or {(*batch_shape, Hq)}" if batch_shape else "")
    raise ValueError(f"alibi_slopes must have shape {expected} (query heads, optionally batch first), got {shape}")


def canonicalize(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    window_size=(-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Problem:
    """Check SDPA-style arguments (and fastattn's keyword-only modifiers) and return their
    :class:`Problem`, with dropout's draw from `generator` when dropout_p > 0. Raises
    TypeError/ValueError naming the argument."""
    query, key, value = check_qkv(query, key, value, enable_gqa)
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(
            f"query, key and value must have the same number of dims, got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    squeeze_heads = query.dim() == 2
    if squeeze_heads:
        query, key, value = query[None], key[None], value[None]
    batch_shape = tuple(query.shape[:-3])
    key, value = (_broadcast_batch(name, t, batch_shape) for name, t in (("key", key), ("value", value)))
    Hq, L, E = query.shape[-3:]
    Hkv, S, Ek = key.shape[-3:]
    Hv, Sv, Ev = value.shape[-3:]
    if Sv != S:
        raise ValueError(f"key has S={S} positions but value has {Sv}")
    check_heads(Hq, Hkv, Hv, E, Ek, Ev, enable_gqa)

    causal_offset = 0 if is_causal else None
    mask = None
    if attn_mask is not None:
        if _is_causal_bias(attn_mask):
            if is_causal:
                raise ValueError("pass either is_causal=True or a CausalBias attn_mask, not both")
            causal_offset = _causal_from_bias(attn_mask, L, S)
        elif isinstance(attn_mask, torch.Tensor):
            if attn_mask.device != query.device:
                raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
            if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
                raise TypeError(f"attn_mask must be bool or a floating-point tensor, got {attn_mask.dtype}")
            if squeeze_heads and attn_mask.dim() > 2:
                raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} has more dims than the (L, S) scores")
            mask = _normalize_mask(attn_mask, query, batch_shape, Hq, L, S)
        else:
            raise TypeError(
                f"attn_mask must be a torch.Tensor, a torch.nn.attention.bias.CausalBias or None, "
                f"got {type(attn_mask).__name__}"
            )

    B = math.prod(batch_shape)
    if len(batch_shape) == 1:  # already (B, H, L, E): no reshape (a decode loop's per-call cost)
        q, k, v = query, key, value
    else:
        q = query.reshape(B, Hq, L, E)
        k = key.reshape(B, Hkv, S, E)
        v = value.reshape(B, Hkv, S, Ev)
    features = check_features(
        scale=scale,
        head_dim=E,
        causal_offset=causal_offset,
        dropout_p=dropout_p,
        window_size=window_size,
        softcap=softcap,
        seqlens=(L, S),
    )
    alibi = _check_alibi(alibi_slopes, query, batch_shape, Hq)
    return Problem(
        q=q,
        k=k,
        v=v,
        mask=mask,
        features=features,
        alibi=alibi,
        batch_shape=batch_shape,
        squeeze_heads=squeeze_heads,
        rng=dropout_draw(features, query.device, generator),
    )


def dropout_draw(features: Features, device: torch.device, generator) -> torch.Tensor | None:
    """The call's dropout draw (fastattn.dropout.draw) when dropout_p > 0, else None (and no draw:
    the generator's state is untouched); the generator is checked either way."""
    from . import dropout

    dropout.check_generator(generator, device)
    return dropout.draw(device, generator) if features.dropout_p > 0.0 else None


def empty_result(p: Problem) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The answer for empty problems (a zero-sized dim or S = 0), or None if there is work to do."""
    if p.seqlen_k > 0 and p.q.numel() > 0 and p.head_dim_v > 0:
        return None
    out = p.q.new_zeros(p.batch, p.heads_q, p.seqlen_q, p.head_dim_v)
    lse = torch.full((p.batch, p.heads_q, p.seqlen_q), -math.inf, dtype=lse_dtype(p.dtype), device=p.device)
    return out, lse


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """lse is float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32

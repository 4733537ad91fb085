"""Context parallelism: exact ring attention over torch.distributed, forward and backward.

The sequence is sharded over the ranks of a process group; K/V shards travel the ring while each
rank attends its queries to the shard it holds, and the partial results merge exactly through
their logsumexp. Any torch.distributed backend with point-to-point ops works (gloo on CPU, NCCL
on GPUs). :func:`ring_attention` is the call, :func:`shard` / :func:`unshard` convert full tensors,
:func:`simulated_ring_attention` runs the same schedule with W virtual ranks in one process, and
:func:`trace` records what each step cost. ``ring.py`` describes the algorithm, ``layout.py`` the
layouts.
"""

from __future__ import annotations

import math

import torch

from ..features import check_features
from ..problem import SUPPORTED_DTYPES, check_heads, check_qkv
from . import layout as lay
from .layout import LAYOUTS, split_lengths
from .ring import RingPlan, StepTrace, Transport, VirtualRing, ring_backward, ring_forward, trace

__all__ = [
    "ring_attention",
    "simulated_ring_attention",
    "shard",
    "unshard",
    "split_lengths",
    "trace",
    "StepTrace",
    "LAYOUTS",
]

RING_BACKENDS = ("auto", "triton", "cpu")


def _dist():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("fastattn.distributed needs torch.distributed initialised: call init_process_group first")
    return dist


def _group_of(group):
    dist = _dist()
    group = dist.group.WORLD if group is None else group
    return group, dist.get_rank(group), dist.get_world_size(group)


def _check_backend(backend) -> str:
    if not isinstance(backend, str) or backend not in RING_BACKENDS:
        raise ValueError(
            f"backend must be one of {RING_BACKENDS} for ring attention, got {backend!r} (compare with "
            "fastattn.reference.attention on the gathered tensors instead of backend='reference')"
        )
    return backend


def _check_shards(query, key, value, enable_gqa, is_causal, return_lse):
    query, key, value = check_qkv(query, key, value, enable_gqa)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D (B, H, L, E) shard, got shape {tuple(t.shape)}")
    if key.shape[0] != query.shape[0] or value.shape[0] != query.shape[0]:
        raise ValueError(f"batch sizes differ: query {query.shape[0]}, key {key.shape[0]}, value {value.shape[0]}")
    if value.shape[2] != key.shape[2]:
        raise ValueError(f"key has {key.shape[2]} positions but value has {value.shape[2]}")
    check_heads(query.shape[1], key.shape[1], value.shape[1], query.shape[3], key.shape[3], value.shape[3], enable_gqa)
    for name, flag in (("is_causal", is_causal), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    return query, key, value


# What every rank must agree on, gathered once per call (one small all_gather).
_AGREED = ("batch", "query heads", "key heads", "head dim", "value head dim", "dtype", "layout", "is_causal",
           "window left", "window right", "softcap", "scale", "enable_gqa", "backend")  # fmt: skip


def _gather_call(group, world_size, query, key, value, **call) -> tuple[list[int], list[int]]:
    """Every rank's (query length, key length), after checking the ranks agree on the rest."""
    dist = _dist()
    B, Hq, L, E = query.shape
    scale = call["scale"]
    values = [
        B, Hq, key.shape[1], E, value.shape[3], SUPPORTED_DTYPES.index(query.dtype), LAYOUTS.index(call["layout"]),
        call["is_causal"], *call["window_size"], call["softcap"], math.inf if scale is None else float(scale),
        call["enable_gqa"], RING_BACKENDS.index(call["backend"]), L, key.shape[2],
    ]  # fmt: skip
    device = query.device if query.is_cuda else torch.device("cpu")
    mine = torch.tensor([float(x) for x in values], dtype=torch.float64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu().tolist()
    for i, name in enumerate(_AGREED):
        column = [row[i] for row in table]
        if len(set(column)) != 1:
            shown = [SUPPORTED_DTYPES[int(x)] for x in column] if name == "dtype" else column
            raise ValueError(f"ring_attention: the ranks disagree on {name}: {shown} (rank order)")
    n = len(_AGREED)
    return [int(row[n]) for row in table], [int(row[n + 1]) for row in table]


def _plan(q_lengths, k_lengths, layout, head_dim, is_causal, scale, window_size, softcap, backend) -> RingPlan:
    lay.check_lengths("query", q_lengths, layout)
    lay.check_lengths("key", k_lengths, layout)
    features = check_features(
        scale=scale,
        head_dim=head_dim,
        causal_offset=0 if is_causal else None,
        dropout_p=0.0,
        window_size=window_size,
        softcap=softcap,
        seqlens=(sum(q_lengths), sum(k_lengths)),
    )
    return RingPlan(layout, tuple(q_lengths), tuple(k_lengths), features, backend)


class _RingAttention(torch.autograd.Function):
    """One rank's part of the ring, forward and backward (every rank must run both)."""

    @staticmethod
    def forward(ctx, q, k, v, plan, rank, group):
        out, lse = ring_forward(plan, rank, Transport(group, rank, plan.world_size), q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.rank, ctx.group = plan, rank, group
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout
        transport = Transport(ctx.group, ctx.rank, ctx.plan.world_size)
        dq, dk, dv = ring_backward(ctx.plan, ctx.rank, transport, q, k, v, out, lse, dout, dlse)
        return dq, dk, dv, None, None, None


def ring_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    group=None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    layout: str = "contiguous",
    return_lse: bool = False,
    backend: str = "auto",
):
    """This rank's shard of exact attention over a sequence sharded across a process group.

    Every rank of `group` (default: the world) calls it with its shards, in SDPA's layout:
        query (B, Hq, L_r, E), key (B, Hkv, S_r, E), value (B, Hkv, S_r, Ev) -> out (B, Hq, L_r, Ev)
    and gets its shard of ``fastattn.attention(Q, K, V, is_causal=..., scale=..., enable_gqa=...,
    window_size=..., softcap=...)`` on the gathered tensors Q, K, V (``unshard`` of the shards).

    layout: how the positions are sharded (fastattn.distributed.shard makes the shards):
        "contiguous": rank r holds positions [L_0 + ... + L_{r-1}, ... + L_r) of the queries (and
            the same for keys with the S_r); the lengths may differ between ranks.
        "zigzag": the sequence is cut into 2W chunks and rank r holds chunks r and 2W - 1 - r
            (each rank's shard is the two, in that order); every rank's query shard has the same
            even length, and so has its key shard. With is_causal every rank has the same work.
    is_causal, scale, enable_gqa, window_size, softcap: as in fastattn.attention, in the global
        positions (is_causal is top-left: query i sees key j <= i; the window is aligned to the
        bottom-right corner of the whole (L, S) matrix).
    return_lse: also return this rank's rows of lse (B, Hq, L_r), float32 (float64 for float64).
    backend: "auto", "triton" or "cpu", as in fastattn.attention, chosen per block.

    How: W steps. At step s rank r attends to the K/V shard of rank (r - s) mod W, while sending
    the shard it holds to rank r + 1 and receiving the next from rank r - 1 (torch.distributed
    batch_isend_irecv, overlapped with the step's attention). Blocks that see no key are skipped
    and blocks inside the band run without a mask; the diagonal block runs causal. Partial
    (out, lse) merge exactly (float32). Each rank receives W - 1 K/V shards: (W - 1) / W of the
    whole K and V, the least any scheme without recomputation can move; nothing is all-gathered.

    Gradients of query, key and value (and of lse when the loss uses it): the backward runs the
    ring again, each K/V shard travelling with its float32 dK/dV accumulator, each block's share
    computed by fastattn's backward from the merged out and lse. Every rank must run the backward
    (as with DDP). Sums run in a fixed order: repeated runs are bitwise identical, and equal to
    :func:`simulated_ring_attention`'s. fp16 / bf16 partial results are rounded to the input dtype
    before merging (as flash-attention's ring does), so the result can differ from the
    single-device call by about one rounding; float32 lse of very large logits (~1e3) carries its
    own ~1e-4 rounding into the backward.

    Raises ValueError naming the argument, or what the ranks disagree on (batch, heads, head dims,
    dtype, layout, the modifiers, the scale), or shard lengths the layout does not allow;
    RuntimeError without an initialised process group. The tensors must be where the group's
    backend communicates (gloo: CPU, NCCL: CUDA).
    """
    query, key, value = _check_shards(query, key, value, enable_gqa, is_causal, return_lse)
    lay.check_layout(layout)
    _check_backend(backend)
    # Argument errors before any communication.
    check_features(scale=scale, head_dim=query.shape[3], causal_offset=None, dropout_p=0.0, window_size=window_size,
                   softcap=softcap)  # fmt: skip
    call = dict(layout=layout, is_causal=is_causal, window_size=tuple(window_size), softcap=softcap, scale=scale,
                enable_gqa=enable_gqa, backend=backend)  # fmt: skip
    group, rank, world_size = _group_of(group)
    q_lengths, k_lengths = _gather_call(group, world_size, query, key, value, **call)
    plan = _plan(q_lengths, k_lengths, layout, query.shape[3], is_causal, scale, window_size, softcap, backend)
    out, lse = _RingAttention.apply(query, key, value, plan, rank, group)
    return (out, lse) if return_lse else out


class _SimulatedRing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan):
        ring = VirtualRing(plan)
        qs, ks, vs = (lay.split(t, 2, plan.layout, list(n)) for t, n in ((q, plan.q_lengths), (k, plan.k_lengths),
                                                                         (v, plan.k_lengths)))  # fmt: skip
        outs, lses = ring.forward(qs, ks, vs)
        out, lse = lay.join(outs, 2, plan.layout), lay.join(lses, 2, plan.layout)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        plan = ctx.plan
        dout = torch.zeros_like(out) if dout is None else dout
        qn, kn = list(plan.q_lengths), list(plan.k_lengths)
        shards = [
            lay.split(t, 2, plan.layout, n) for t, n in ((q, qn), (k, kn), (v, kn), (out, qn), (lse, qn), (dout, qn))
        ]
        dlses = None if dlse is None else lay.split(dlse, 2, plan.layout, qn)
        dqs, dks, dvs = VirtualRing(plan).backward(*shards, dlses)
        return lay.join(dqs, 2, plan.layout), lay.join(dks, 2, plan.layout), lay.join(dvs, 2, plan.layout), None


def simulated_ring_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    world_size: int,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    layout: str = "contiguous",
    return_lse: bool = False,
    backend: str = "auto",
    q_lengths: list[int] | None = None,
    k_lengths: list[int] | None = None,
):
    """:func:`ring_attention`'s schedule with `world_size` virtual ranks in this process, on full
    tensors (B, Hq, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev): sharded, run step by step as the ring
    runs them (the same calls, merges and sums in the same order, no communication), joined.
    Differentiable. For tests and for seeing what a ring of W devices computes on one; the
    arguments are ring_attention's. q_lengths / k_lengths: the per-rank shard lengths (default
    :func:`split_lengths`)."""
    query, key, value = _check_shards(query, key, value, enable_gqa, is_causal, return_lse)
    lay.check_layout(layout)
    _check_backend(backend)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    q_lengths = split_lengths(query.shape[2], world_size, layout) if q_lengths is None else list(q_lengths)
    k_lengths = split_lengths(key.shape[2], world_size, layout) if k_lengths is None else list(k_lengths)
    for name, lengths, n in (("q_lengths", q_lengths, query.shape[2]), ("k_lengths", k_lengths, key.shape[2])):
        if len(lengths) != world_size or sum(lengths) != n or min(lengths) < 0:
            raise ValueError(f"{name} must be {world_size} lengths >= 0 summing to {n}, got {lengths}")
    plan = _plan(q_lengths, k_lengths, layout, query.shape[3], is_causal, scale, window_size, softcap, backend)
    out, lse = _SimulatedRing.apply(query, key, value, plan)
    return (out, lse) if return_lse else out


def shard(x: torch.Tensor, dim: int = 2, layout: str = "contiguous", group=None) -> torch.Tensor:
    """This rank's shard of the full tensor `x` (the same on every rank) along `dim` (default 2,
    the positions of a (B, H, N, D) tensor): contiguous splits N as :func:`split_lengths` (the
    first N % W ranks get one more), zigzag needs N to be a multiple of 2W."""
    lay.check_layout(layout)
    _, rank, world_size = _group_of(group)
    return lay.split(x, dim, layout, split_lengths(x.shape[dim], world_size, layout))[rank]


def unshard(x: torch.Tensor, dim: int = 2, layout: str = "contiguous", group=None) -> torch.Tensor:
    """The full tensor, on every rank, from every rank's shard `x` along `dim` (the inverse of
    :func:`shard`; shards may differ in length along `dim`). A collective: every rank calls it.
    Not differentiable."""
    lay.check_layout(layout)
    dist = _dist()
    group, _, world_size = _group_of(group)
    x = x.detach().contiguous()
    n = torch.tensor([x.shape[dim]], dtype=torch.int64, device=x.device)
    lengths = [torch.empty_like(n) for _ in range(world_size)]
    dist.all_gather(lengths, n, group=group)
    lengths = [int(t.item()) for t in lengths]
    longest = max(lengths)
    padded = torch.zeros(*x.shape[:dim], longest, *x.shape[dim + 1 :], dtype=x.dtype, device=x.device)
    padded.narrow(dim, 0, x.shape[dim]).copy_(x)
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded, group=group)
    return lay.join([t.narrow(dim, 0, m) for t, m in zip(gathered, lengths)], dim, layout)

"""torch.library custom ops for the forward and backward, their fake kernels and autograd.

``fastattn::forward(q, k, v, mask, alibi, rng, cu_seq_q, cu_seq_k, seqused_k, block_table, ints,
floats, sizes, backend) -> (out, lse)`` runs a backend on a canonical problem (fastattn.problem.Problem:
q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), mask None or 4-D with dims 1 or full, alibi
None or float32 (1 or B, Hq) slopes, rng None or dropout's int64 (2,) draw, which the backward
takes too and regenerates the dropout mask from; a packed call's index tensors and sizes, its
:class:`fastattn.problem.Packing`, or None and []). ``ints`` and ``floats`` are the call's
:class:`fastattn.features.Features`, packed by :meth:`Features.pack`: the schema never names a
scalar feature, so a new one needs no change here. Packed calls return out (and take dout, and
give dq, dk, dv) in their packed (T, H, D) layout, seen heads first (``Problem.new_out``). ``fastattn::backward`` returns (dq, dk, dv, dmask)
from the saved inputs, out and lse: the score matrix is recomputed block by block, never stored.
Its backend is chosen by :func:`fastattn.dispatch.choose_backward` when the forward runs. Being
custom ops with fake kernels, both trace into ``torch.compile`` graphs as single nodes.
"""

from __future__ import annotations

import torch

from .features import Features
from .problem import Packing, Problem, empty_result, lse_dtype

_NO_MASK_GRAD = (0,)  # dmask placeholder shape when the mask needs no gradient
_NO_STATS = (0,)  # the stats placeholder of calls whose backward needs none
_DENSE = (None, None, None, None)  # the packing tensors of a dense call


def _problem(q, k, v, mask, alibi, rng, packed, ints, floats, sizes) -> Problem:
    packing = Packing.from_op(packed, sizes)
    features = Features.unpack(ints, floats)
    return Problem(q=q, k=k, v=v, mask=mask, alibi=alibi, features=features, packing=packing, rng=rng)


def _packing_args(p: Problem) -> tuple[tuple, list[int]]:
    return (_DENSE, []) if p.packing is None else (p.packing.tensors(), p.packing.sizes())


def _in_layout(packed: bool, t: torch.Tensor) -> torch.Tensor:
    """t (B, H, rows, D) in the layout the op promises: contiguous, or for a packed call the packed
    (rows, H, D) layout seen heads first (no copy when a backend wrote it so)."""
    if not packed:
        return t.contiguous()
    return t[0].transpose(0, 1).contiguous().transpose(0, 1)[None]


def run_forward(p: Problem, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of `p` by `backend` (a custom-op backend) through fastattn::forward: differentiable.

    Under torch.func's transforms (grad, vjp, jacrev, vmap: the inputs are functorch-wrapped), the
    op's autograd (torch.library's register_autograd, which they do not support) is bypassed for
    :class:`_FunctorchAttention`, the same forward and backward ops as an autograd.Function with a
    setup_context. Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) raises: the ops have
    no forward-mode derivative, and the custom op would silently give a zero tangent."""
    if not torch.compiler.is_compiling():
        _refuse_forward_ad(p)
        wrapped = any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in (p.q, p.k, p.v))
        if not wrapped and not _needs_grad(p):
            # Nothing to differentiate and no graph to trace: the op's body without its dispatch
            # (the per-call cost of a decode loop; the results are the op's, bit for bit).
            return _forward_impl(p, backend)[:2]
    packed, sizes = _packing_args(p)
    args = (p.q, p.k, p.v, p.mask, p.alibi, p.rng, *packed, *p.features.pack(), sizes, backend)
    if not torch.compiler.is_compiling() and wrapped:
        return _FunctorchAttention.apply(*args)[:2]
    return attention_forward(*args)[:2]


def _needs_grad(p: Problem) -> bool:
    if not torch.is_grad_enabled():
        return False
    return p.q.requires_grad or p.k.requires_grad or p.v.requires_grad or (p.mask is not None and p.mask.requires_grad)


FORWARD_AD_MESSAGE = (
    "fastattn's Triton and CPU backends have no forward-mode derivative (torch.func.jvp, jacfwd, "
    "torch.autograd.forward_ad); use backend='reference' (plain PyTorch ops) for forward-mode AD"
)


def _refuse_forward_ad(p: Problem) -> None:
    import torch.autograd.forward_ad as fwAD

    if fwAD._current_level >= 0:  # inside a dual_level: an input may carry a tangent
        tensors = (p.q, p.k, p.v, p.mask, p.alibi)
        if any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors):
            raise NotImplementedError(FORWARD_AD_MESSAGE)


class _FunctorchAttention(torch.autograd.Function):
    """fastattn::forward as an autograd.Function, for torch.func's transforms: forward and backward
    are the ops themselves, setup_context and backward the op's own registration."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return attention_forward(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, dout, dlse, dstats):
        return _backward(ctx, dout, dlse, backward_op=_FunctorchAttentionBackward.apply)

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(FORWARD_AD_MESSAGE)


class _FunctorchAttentionBackward(torch.autograd.Function):
    """fastattn::backward for torch.func's transforms (its inputs are wrapped there too): no
    derivative of its own, as for the op (double backward raises)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return attention_backward(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        _no_double_backward(ctx, *grads)


@torch.library.custom_op("fastattn::forward", mutates_args=())
def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    alibi: torch.Tensor | None,
    rng: torch.Tensor | None,
    cu_seq_q: torch.Tensor | None,
    cu_seq_k: torch.Tensor | None,
    seqused_k: torch.Tensor | None,
    block_table: torch.Tensor | None,
    ints: list[int],
    floats: list[float],
    sizes: list[int],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (B, Hq, L, Ev), lse (B, Hq, L), stats) of a canonical problem, computed by `backend`.
    stats: what the backend's backward needs beyond lse (each row's max and log-sum apart, (2, B,
    Hq, L), from the Triton forward of a float-mask call and from the CPU path's tiled forward: the
    Backend's stats declaration), else an empty (0,) tensor."""
    p = _problem(q, k, v, mask, alibi, rng, (cu_seq_q, cu_seq_k, seqused_k, block_table), ints, floats, sizes)
    return _forward_impl(p, backend)


def _forward_impl(p: Problem, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fastattn::forward's body: (out, lse, stats) of `p` by `backend`, in the fake kernel's layout."""
    from .dispatch import REGISTRY
    from .packed import check_packing_values

    if p.packing is not None:
        check_packing_values(p)  # the index tensors' contents: inside the op, so compile traces no sync
    result = empty_result(p)
    if result is None:
        result = REGISTRY[backend].run(p)
    # In the fake kernel's layout (SDPA's CPU op returns lse in (B, L, H) layout).
    out, lse, *stats = result
    stats = stats[0].contiguous() if stats and stats[0] is not None else lse.new_empty(_NO_STATS)
    assert tuple(stats.shape) == _stats_shape(p, backend), "a backend's stats declaration disagrees with its forward"
    return _in_layout(p.packing is not None, out), lse.contiguous(), stats


def _stats_shape(p: Problem, backend: str) -> tuple[int, ...]:
    """The stats output's shape: (2, B, Hq, L) where the backend declares stats for a call with
    work (dispatch.Backend.stats), else (0,)."""
    from .dispatch import REGISTRY

    work = p.q.numel() > 0 and p.k.shape[2] > 0 and p.v.shape[3] > 0  # as problem.empty_result
    if work and REGISTRY[backend].stats(p):
        return (2, p.batch, p.heads_q, p.seqlen_q)
    return _NO_STATS


@attention_forward.register_fake
def _(q, k, v, mask, alibi, rng, cu_seq_q, cu_seq_k, seqused_k, block_table, ints, floats, sizes, backend):
    out = q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    lse = q.new_empty(q.shape[0], q.shape[1], q.shape[2], dtype=lse_dtype(q.dtype))
    p = _problem(q, k, v, mask, alibi, rng, (cu_seq_q, cu_seq_k, seqused_k, block_table), ints, floats, sizes)
    return _in_layout(cu_seq_q is not None, out), lse, lse.new_empty(_stats_shape(p, backend))


@torch.library.custom_op("fastattn::backward", mutates_args=())
def attention_backward(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    stats: torch.Tensor,
    mask: torch.Tensor | None,
    alibi: torch.Tensor | None,
    rng: torch.Tensor | None,
    cu_seq_q: torch.Tensor | None,
    cu_seq_k: torch.Tensor | None,
    ints: list[int],
    floats: list[float],
    sizes: list[int],
    backend: str,
    mask_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dmask) of a canonical problem by `backend`'s backward; dmask has the mask's
    shape when mask_grad, else (0,). Packed calls have no seqused_k or block_table here: those
    are inference only."""
    from .dispatch import REGISTRY

    p = _problem(q, k, v, mask, alibi, rng, (cu_seq_q, cu_seq_k, None, None), ints, floats, sizes)
    packed = p.packing is not None
    no_dmask = q.new_empty(_NO_MASK_GRAD)
    if empty_result(p) is not None:
        dmask = mask.new_zeros(mask.shape) if mask_grad else no_dmask
        return tuple(_in_layout(packed, t.new_zeros(t.shape)) for t in (q, k, v)) + (dmask,)
    stats = stats if stats.numel() else None
    dq, dk, dv, dmask = REGISTRY[backend].run_backward(p, out, lse, dout, dlse, mask_grad, stats=stats)
    dmask = dmask.contiguous() if mask_grad else no_dmask
    return _in_layout(packed, dq), _in_layout(packed, dk), _in_layout(packed, dv), dmask


@attention_backward.register_fake
def _(
    dout, dlse, q, k, v, out, lse, stats, mask, alibi, rng, cu_seq_q, cu_seq_k, ints, floats, sizes, backend, mask_grad
):
    dmask = mask.new_empty(mask.shape) if mask_grad else q.new_empty(_NO_MASK_GRAD)
    packed = cu_seq_q is not None
    return tuple(_in_layout(packed, t.new_empty(t.shape)) for t in (q, k, v)) + (dmask,)


def _setup_context(ctx, inputs, output):
    from .dispatch import FALLBACK_BACKWARD, backward_reasons, choose_backward

    q, k, v, mask, alibi, rng, cu_seq_q, cu_seq_k, seqused_k, block_table, ints, floats, sizes, backend = inputs
    out, lse, stats = output
    ctx.save_for_backward(q, k, v, out, lse, stats, mask, alibi, rng, cu_seq_q, cu_seq_k)
    ctx.ints, ctx.floats, ctx.sizes = ints, floats, sizes
    # Chosen with the inputs as the caller passed them: a float mask's requires_grad is a feature.
    p = _problem(q, k, v, mask, alibi, rng, (cu_seq_q, cu_seq_k, seqused_k, block_table), ints, floats, sizes)
    ctx.backend = choose_backward(backend, p)
    # What no backward differentiates (a KV cache) fails when a gradient is asked for, not before:
    # a forward under autograd (no torch.no_grad()) still runs.
    ctx.refused = backward_reasons(ctx.backend, p) if ctx.backend == FALLBACK_BACKWARD else []
    ctx.mask_grad = mask is not None and mask.requires_grad
    # A loss that does not use lse (or out) passes None for its gradient instead of a zero tensor:
    # the backward then neither reads a dlse nor checks it for zeros.
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse, dstats=None, backward_op=None):
    backward_op = backward_op or attention_backward
    if ctx.refused:
        raise RuntimeError("fastattn cannot compute this gradient: " + "; ".join(ctx.refused))
    q, k, v, out, lse, stats, mask, alibi, rng, cu_seq_q, cu_seq_k = ctx.saved_tensors
    packed = cu_seq_q is not None
    if dout is None:  # only lse takes part in the loss
        dout = torch.zeros_like(out)
    dq, dk, dv, dmask = backward_op(
        _in_layout(packed, dout), dlse, q, k, v, out, lse, stats, mask, alibi, rng, cu_seq_q, cu_seq_k,
        ctx.ints, ctx.floats, ctx.sizes, ctx.backend, ctx.mask_grad,
    )  # fmt: skip
    return dq, dk, dv, dmask if ctx.mask_grad else None, *([None] * 10)


attention_forward.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "fastattn does not support double backward (gradients of gradients); "
        "use backend='reference' for higher-order derivatives"
    )


def _setup_backward_context(ctx, inputs, output):
    pass


attention_backward.register_autograd(_no_double_backward, setup_context=_setup_backward_context)

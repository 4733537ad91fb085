"""torch.library custom ops for the forward and backward, their fake kernels and autograd.

``fastattn::forward(q, k, v, mask, alibi, ints, floats, backend) -> (out, lse)`` runs a backend on
a canonical problem (fastattn.problem.Problem: q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev),
mask None or 4-D with dims 1 or full, alibi None or float32 (1 or B, Hq) slopes). ``ints`` and ``floats`` are the call's
:class:`fastattn.features.Features`, packed by :meth:`Features.pack`: the schema never names a
feature, so a new one needs no change here. ``fastattn::backward`` returns (dq, dk, dv, dmask)
from the saved inputs, out and lse: the score matrix is recomputed block by block, never stored.
Its backend is chosen by :func:`fastattn.dispatch.choose_backward` when the forward runs. Being
custom ops with fake kernels, both trace into ``torch.compile`` graphs as single nodes.
"""

from __future__ import annotations

import torch

from .features import Features
from .problem import Problem, empty_result, lse_dtype

_NO_MASK_GRAD = (0,)  # dmask placeholder shape when the mask needs no gradient


def _problem(q, k, v, mask, alibi, ints, floats) -> Problem:
    return Problem(q=q, k=k, v=v, mask=mask, alibi=alibi, features=Features.unpack(ints, floats))


def run_forward(p: Problem, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of `p` by `backend` (a custom-op backend) through fastattn::forward: differentiable."""
    return attention_forward(p.q, p.k, p.v, p.mask, p.alibi, *p.features.pack(), backend)


@torch.library.custom_op("fastattn::forward", mutates_args=())
def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    alibi: torch.Tensor | None,
    ints: list[int],
    floats: list[float],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Hq, L, Ev), lse (B, Hq, L)) of a canonical problem, computed by `backend`."""
    from .dispatch import REGISTRY

    p = _problem(q, k, v, mask, alibi, ints, floats)
    result = empty_result(p)
    if result is None:
        result = REGISTRY[backend].run(p)
    # Contiguous, as the fake kernel promises (SDPA's CPU op returns lse in (B, L, H) layout).
    return tuple(t.contiguous() for t in result)


@attention_forward.register_fake
def _(q, k, v, mask, alibi, ints, floats, backend):
    out = q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    lse = q.new_empty(q.shape[0], q.shape[1], q.shape[2], dtype=lse_dtype(q.dtype))
    return out, lse


@torch.library.custom_op("fastattn::backward", mutates_args=())
def attention_backward(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor | None,
    alibi: torch.Tensor | None,
    ints: list[int],
    floats: list[float],
    backend: str,
    mask_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dmask) of a canonical problem by `backend`'s backward; dmask has the mask's
    shape when mask_grad, else (0,)."""
    from .dispatch import REGISTRY

    p = _problem(q, k, v, mask, alibi, ints, floats)
    no_dmask = q.new_empty(_NO_MASK_GRAD)
    if empty_result(p) is not None:
        dmask = mask.new_zeros(mask.shape) if mask_grad else no_dmask
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape), dmask
    dq, dk, dv, dmask = REGISTRY[backend].run_backward(p, out, lse, dout, dlse, mask_grad)
    dmask = dmask.contiguous() if mask_grad else no_dmask
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dmask


@attention_backward.register_fake
def _(dout, dlse, q, k, v, out, lse, mask, alibi, ints, floats, backend, mask_grad):
    dmask = mask.new_empty(mask.shape) if mask_grad else q.new_empty(_NO_MASK_GRAD)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def _setup_context(ctx, inputs, output):
    from .dispatch import choose_backward

    q, k, v, mask, alibi, ints, floats, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, alibi)
    ctx.ints, ctx.floats = ints, floats
    # Chosen with the inputs as the caller passed them: a float mask's requires_grad is a feature.
    ctx.backend = choose_backward(backend, _problem(q, k, v, mask, alibi, ints, floats))
    ctx.mask_grad = mask is not None and mask.requires_grad


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, mask, alibi = ctx.saved_tensors
    if dout is None:  # only lse takes part in the loss
        dout = torch.zeros_like(out)
    dq, dk, dv, dmask = attention_backward(
        dout.contiguous(), dlse, q, k, v, out, lse, mask, alibi, ctx.ints, ctx.floats, ctx.backend, ctx.mask_grad
    )
    return dq, dk, dv, dmask if ctx.mask_grad else None, None, None, None, None


attention_forward.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "fastattn does not support double backward (gradients of gradients); "
        "use backend='reference' for higher-order derivatives"
    )


def _setup_backward_context(ctx, inputs, output):
    pass


attention_backward.register_autograd(_no_double_backward, setup_context=_setup_backward_context)

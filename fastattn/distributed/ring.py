"""The ring: each rank's steps, run over torch.distributed or over W virtual ranks in one process.

Forward, on rank r of W, step s = 0 .. W-1: the rank holds the K/V shard of rank (r - s) mod W,
sends it on to rank r + 1 while it receives the next from rank r - 1 (batch_isend_irecv, started
before the step's attention so that the transfer hides behind it), attends its queries to the
shard it holds (``layout.step_calls``: dense calls through fastattn's op bodies, each returning
(out, lse)) and folds each result into its running (out, lse) (``eager.merge.merge_``, float32).

Backward, the same ring again: K/V travel as in the forward, and with each K/V shard travels its
dK/dV accumulator (float32): every rank adds its share and passes it on, and after W steps it is
back home with every rank's share summed in ring order. Each call's gradients come from fastattn's
backward given the *merged* out and lse (``run_backward(..., partial=True)``: P = exp(S - lse),
delta = rowsum(dO * out) - dlse), so they are the blocks' shares of the whole call's gradients.
dQ stays on its rank. No step all-gathers anything; sums run in a fixed order, so repeated runs
are bitwise identical.

:class:`VirtualRing` runs the same steps for all W ranks in one process (no communication) in the
same order, so its results equal the distributed ring's bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch

from ..dispatch import REGISTRY, choose_backend, choose_backward
from ..eager.merge import merge_
from ..features import Features
from ..ops import _forward_impl
from ..problem import Problem, lse_dtype
from . import layout as lay


@dataclass(frozen=True)
class RingPlan:
    """What every rank's steps are: the layout, every rank's query and key shard lengths, the
    call's features (diagonals in global positions) and the backend."""

    layout: str
    q_lengths: tuple[int, ...]
    k_lengths: tuple[int, ...]
    features: Features
    backend: str

    @property
    def world_size(self) -> int:
        return len(self.q_lengths)

    def calls(self, rank: int, source: int) -> list[lay.Call]:
        """The dense calls of rank `rank` attending to the K/V shard of rank `source`."""
        return lay.step_calls(
            self.features,
            lay.pieces(self.layout, list(self.q_lengths), rank),
            lay.pieces(self.layout, list(self.k_lengths), source),
        )


def _block(q, k, v, call: lay.Call) -> Problem:
    return Problem(q=q[:, :, call.q], k=k[:, :, call.k], v=v[:, :, call.k], mask=None, features=call.features)


def forward_step(plan: RingPlan, rank: int, source: int, q, k, v, out, lse) -> None:
    """Rank `rank`'s step with the K/V shard (k, v) of rank `source`: fold its partial results into
    the running (out, lse) (accumulator dtype), in place."""
    for call in plan.calls(rank, source):
        p = _block(q, k, v, call)
        part_out, part_lse, _ = _forward_impl(p, choose_backend(plan.backend, p).name)
        merge_(out[:, :, call.q], lse[:, :, call.q], part_out, part_lse)


def backward_step(plan: RingPlan, rank: int, source: int, q, k, v, out, lse, dout, dlse, dq):
    """Rank `rank`'s backward step with the K/V shard (k, v) of rank `source`: add its dQ share to
    dq (accumulator dtype) in place and return its (dK, dV) shares of that shard (accumulator
    dtype), or None when it sees none of the shard."""
    calls = plan.calls(rank, source)
    if not calls:
        return None
    acc = dq.dtype
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    for call in calls:
        p = _block(q, k, v, call)
        backend = choose_backward(choose_backend(plan.backend, p).name, p)
        rows = call.q
        block_dlse = None if dlse is None else dlse[:, :, rows]
        dq_part, dk_part, dv_part, _ = REGISTRY[backend].run_backward(
            p, out[:, :, rows], lse[:, :, rows], dout[:, :, rows], block_dlse, False, partial=True
        )
        dq[:, :, rows] += dq_part
        dk[:, :, call.k] += dk_part
        dv[:, :, call.k] += dv_part
    return dk, dv


def new_accumulators(q, v) -> tuple[torch.Tensor, torch.Tensor]:
    """The running (out, lse) of a query shard before any step: 0 and -inf, accumulator dtype."""
    acc = lse_dtype(q.dtype)
    out = torch.zeros(*q.shape[:3], v.shape[3], dtype=acc, device=q.device)
    return out, torch.full(q.shape[:3], -math.inf, dtype=acc, device=q.device)


# Tracing: what each step of the ring cost (fastattn.distributed.trace).


@dataclass(frozen=True)
class StepTrace:
    """One step of one rank: direction ("forward" or "backward"), step index, seconds spent in
    attention (and in adding the step's shares), seconds spent waiting for transfers, and the bytes
    this rank sent and received in the step (the backward's last step includes the rank's own
    dK/dV accumulator coming home)."""

    direction: str
    step: int
    compute_s: float
    wait_s: float
    bytes_sent: int
    bytes_received: int


# The open trace() lists: a module global, not a context variable, because autograd runs a CUDA
# backward on its own device threads, which would not see the caller's context.
_TRACES: list[list[StepTrace]] = []


@contextlib.contextmanager
def trace():
    """Record every ring step this process runs while inside (forward and backward, any thread):
    yields the list of :class:`StepTrace`. While tracing, CUDA work is synchronised to time it."""
    steps: list[StepTrace] = []
    _TRACES.append(steps)
    try:
        yield steps
    finally:
        _TRACES.remove(steps)


class _Clock:
    """One direction's step timings and bytes, kept only while tracing."""

    def __init__(self, direction: str, device: torch.device):
        self.direction, self.device, self.tracing = direction, device, bool(_TRACES)

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def begin(self, step: int) -> None:
        self.step, self.compute_s, self.wait_s, self.sent_bytes, self.received_bytes = step, 0.0, 0.0, 0, 0

    @contextlib.contextmanager
    def computing(self):
        if not self.tracing:
            yield
            return
        start = self._now()
        yield
        self.compute_s += self._now() - start

    def sent(self, tensors) -> None:
        self.sent_bytes += _nbytes(tensors)

    def wait(self, pending: _Pending) -> list[torch.Tensor]:
        if not self.tracing:
            return pending.wait()
        start = self._now()
        received = pending.wait()
        self.wait_s += self._now() - start
        self.received_bytes += _nbytes(received)
        return received

    def end(self) -> None:
        if self.tracing:
            record = StepTrace(
                self.direction, self.step, self.compute_s, self.wait_s, self.sent_bytes, self.received_bytes
            )
            for steps in _TRACES:
                steps.append(record)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# Over torch.distributed.


class _Pending:
    """Transfers in flight: wait() gives the received tensors."""

    def __init__(self, requests, received):
        self.requests, self.received = requests, received

    def wait(self) -> list[torch.Tensor]:
        for request in self.requests:
            request.wait()
        return self.received


class Transport:
    """Point-to-point transfers to the next rank of the ring and from the previous one."""

    def __init__(self, group, rank: int, world_size: int):
        import torch.distributed as dist

        self.group, self.world_size = group, world_size
        self.next = dist.get_global_rank(group, (rank + 1) % world_size)
        self.prev = dist.get_global_rank(group, (rank - 1) % world_size)
        self.tag = 0

    def exchange(self, send: list[torch.Tensor], receive: list[tuple[tuple[int, ...], torch.dtype]]) -> _Pending:
        """Start sending `send` to the next rank and receiving tensors of the given (shape, dtype)
        from the previous one (in the same order on every rank)."""
        import torch.distributed as dist

        device = send[0].device
        received = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in receive]
        ops = []
        for i, t in enumerate(send):
            ops.append(dist.P2POp(dist.isend, t.contiguous(), self.next, self.group, self.tag + i))
        for i, t in enumerate(received):
            ops.append(dist.P2POp(dist.irecv, t, self.prev, self.group, self.tag + i))
        self.tag += max(len(send), len(received))
        return _Pending(dist.batch_isend_irecv(ops), received)


def _incoming(plan: RingPlan, tensors, source: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of `tensors` (B, H, rows, D) as the K/V shard of rank `source` holds them."""
    return [((*t.shape[:2], plan.k_lengths[source], t.shape[3]), t.dtype) for t in tensors]


def ring_forward(plan: RingPlan, rank: int, transport: Transport, q, k, v):
    """This rank's (out (input dtype), lse) of the whole call, by the ring."""
    W = plan.world_size
    out, lse = new_accumulators(q, v)
    clock = _Clock("forward", q.device)
    for step in range(W):
        source, incoming = (rank - step) % W, (rank - step - 1) % W
        clock.begin(step)
        pending = None
        if step < W - 1:  # the next shard travels while this one is attended to
            pending = transport.exchange([k, v], _incoming(plan, (k, v), incoming))
            clock.sent((k, v))
        with clock.computing():
            forward_step(plan, rank, source, q, k, v, out, lse)
        if pending is not None:
            k, v = clock.wait(pending)
        clock.end()
    return out.to(q.dtype), lse


def ring_backward(plan: RingPlan, rank: int, transport: Transport, q, k, v, out, lse, dout, dlse):
    """This rank's (dq, dk, dv), input dtype, by the ring in the forward's direction."""
    W = plan.world_size
    acc = lse_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    clock = _Clock("backward", q.device)
    pending_grads = None
    for step in range(W):
        source, incoming = (rank - step) % W, (rank - step - 1) % W
        clock.begin(step)
        pending_kv = None
        if step < W - 1:
            pending_kv = transport.exchange([k, v], _incoming(plan, (k, v), incoming))
            clock.sent((k, v))
        with clock.computing():
            shares = backward_step(plan, rank, source, q, k, v, out, lse, dout, dlse, dq)
        if pending_grads is not None:  # the accumulator of the shard held now, from the previous rank
            dk, dv = clock.wait(pending_grads)
        if shares is not None:
            with clock.computing():
                dk += shares[0]
                dv += shares[1]
        if W > 1:  # on to the next rank; after the last step that is the shard's home
            pending_grads = transport.exchange([dk, dv], _incoming(plan, (dk, dv), incoming))
            clock.sent((dk, dv))
        if pending_kv is not None:
            k, v = clock.wait(pending_kv)
        if step == W - 1 and pending_grads is not None:  # this rank's own accumulator, home
            dk, dv = clock.wait(pending_grads)
        clock.end()
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


# W virtual ranks in one process.


class VirtualRing:
    """The ring's steps for every rank in one process, in the distributed ring's order, on lists
    of shards (index = rank): the same results, bit for bit, with no communication."""

    def __init__(self, plan: RingPlan):
        self.plan = plan

    def forward(self, qs, ks, vs):
        W = self.plan.world_size
        accs = [new_accumulators(q, v) for q, v in zip(qs, vs)]
        for step in range(W):
            for rank in range(W):
                source = (rank - step) % W
                forward_step(self.plan, rank, source, qs[rank], ks[source], vs[source], *accs[rank])
        return [out.to(q.dtype) for (out, _), q in zip(accs, qs)], [lse for _, lse in accs]

    def backward(self, qs, ks, vs, outs, lses, douts, dlses):
        W = self.plan.world_size
        acc = lse_dtype(qs[0].dtype)
        dqs = [torch.zeros(q.shape, dtype=acc, device=q.device) for q in qs]
        dks = [torch.zeros(k.shape, dtype=acc, device=k.device) for k in ks]
        dvs = [torch.zeros(v.shape, dtype=acc, device=v.device) for v in vs]
        for step in range(W):
            for rank in range(W):
                source = (rank - step) % W
                dlse = None if dlses is None else dlses[rank]
                shares = backward_step(
                    self.plan, rank, source, qs[rank], ks[source], vs[source], outs[rank], lses[rank],
                    douts[rank], dlse, dqs[rank],
                )  # fmt: skip
                if shares is not None:
                    dks[source] += shares[0]
                    dvs[source] += shares[1]
        dtype = qs[0].dtype
        return [t.to(dtype) for t in dqs], [t.to(dtype) for t in dks], [t.to(dtype) for t in dvs]

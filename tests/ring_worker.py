"""The processes of tests/test_distributed.py's gloo tests: each rank runs every case of its world
size through fastattn.distributed.ring_attention and saves its shards of the results.

Kept apart from the test module so that the spawned processes import only this (and fastattn).
"""

from __future__ import annotations

import os
import traceback
import zlib
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class RingCase:
    name: str
    world: int
    layout: str = "contiguous"
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    gqa: bool = False
    dtype: torch.dtype = torch.float32
    N: int = 64
    E: int = 16
    Ev: int = 16
    lengths: tuple[int, ...] | None = None  # contiguous shards of these lengths (default: split_lengths)
    B: int = 2
    Hq: int = 4
    spawn: int = 0  # processes spawned (default: world)
    group_ranks: tuple[int, ...] | None = None  # the ring runs on this subgroup of the spawned ranks

    @property
    def processes(self) -> int:
        return self.spawn or self.world

    @property
    def Hkv(self) -> int:
        return 2 if self.gqa else self.Hq

    def kwargs(self) -> dict:
        return dict(is_causal=self.causal, window_size=self.window, softcap=self.softcap, enable_gqa=self.gqa)


CASES = [
    RingCase("W2_contiguous", 2),
    RingCase("W2_contiguous_causal", 2, causal=True),
    RingCase("W2_zigzag_causal_gqa", 2, "zigzag", causal=True, gqa=True),
    RingCase("W2_zigzag_bf16", 2, "zigzag", dtype=torch.bfloat16),
    RingCase("W2_window_softcap", 2, window=(9, 0), softcap=2.0),
    RingCase("W2_ragged_causal_gqa_bf16", 2, causal=True, gqa=True, dtype=torch.bfloat16, lengths=(37, 27)),
    RingCase("W2_zigzag_fp16_causal_window", 2, "zigzag", causal=True, window=(12, 0), dtype=torch.float16),
    RingCase("W4_contiguous_causal_gqa", 4, causal=True, gqa=True),
    RingCase("W4_zigzag_causal", 4, "zigzag", causal=True),
    RingCase(
        "W4_zigzag_causal_window_gqa_bf16", 4, "zigzag", causal=True, window=(20, 0), gqa=True, dtype=torch.bfloat16
    ),  # fmt: skip
    RingCase("W4_ragged_empty_shard_causal", 4, causal=True, lengths=(20, 0, 31, 13)),
    RingCase("W4_E16_Ev8_bidirectional_window", 4, window=(5, 5), Ev=8),
    RingCase("W2_subgroup_of_4_zigzag_causal", 2, "zigzag", causal=True, spawn=4, group_ranks=(3, 1)),
]


def case_tensors(case: RingCase):
    """The full q, k, v and the loss's dout, dlse of a case (float64 dout / dlse), the same on every rank."""
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    shape = (case.B, case.Hq, case.N)
    q = torch.randn(*shape, case.E, generator=g).to(case.dtype)
    k = torch.randn(case.B, case.Hkv, case.N, case.E, generator=g).to(case.dtype)
    v = torch.randn(case.B, case.Hkv, case.N, case.Ev, generator=g).to(case.dtype)
    dout = torch.randn(*shape, case.Ev, generator=g, dtype=torch.float64)
    dlse = torch.randn(*shape, generator=g, dtype=torch.float64)
    return q, k, v, dout, dlse


def shard_lengths(case: RingCase) -> list[int]:
    from fastattn.distributed import split_lengths

    return list(case.lengths) if case.lengths else split_lengths(case.N, case.world, case.layout)


@dataclass
class Results:
    outputs: dict = field(default_factory=dict)  # case name -> (out, lse, dq, dk, dv) shards
    repeat_equal: dict = field(default_factory=dict)
    received: dict = field(default_factory=dict)  # case name -> {direction: bytes received}
    collectives: dict = field(default_factory=dict)  # shard / unshard checks -> passed
    errors: dict = field(default_factory=dict)  # error case -> message


def _run_case(case: RingCase, rank: int, group=None):
    from fastattn import distributed as fd
    from fastattn.distributed import layout as lay

    q, k, v, dout, dlse = case_tensors(case)
    lengths = shard_lengths(case)
    local = [lay.split(t, 2, case.layout, lengths)[rank] for t in (q, k, v, dout, dlse)]

    def once():
        ql, kl, vl = (t.clone().requires_grad_() for t in local[:3])
        with fd.trace() as steps:
            out, lse = fd.ring_attention(ql, kl, vl, group=group, layout=case.layout, return_lse=True, **case.kwargs())
            loss = (out.double() * local[3]).sum() + (lse.double() * local[4]).sum()
            loss.backward()
        received = {d: sum(s.bytes_received for s in steps if s.direction == d) for d in ("forward", "backward")}
        assert [s.step for s in steps] == 2 * list(range(case.world)), steps
        return [t.detach() for t in (out, lse, ql.grad, kl.grad, vl.grad)], received

    first, received = once()
    second, _ = once()
    return first, all(torch.equal(a, b) for a, b in zip(first, second)), received


def _error_cases(rank: int, world: int) -> dict:
    """Calls the ranks disagree on, or shards a layout refuses: each must raise on every rank."""
    from fastattn import distributed as fd

    x = torch.randn(1, 2, 8, 16)
    calls = {
        "dtype": lambda: fd.ring_attention(
            x if rank else x.double(), x if rank else x.double(), x if rank else x.double()
        ),
        "is_causal": lambda: fd.ring_attention(x, x, x, is_causal=rank == 0),
        "zigzag_odd": lambda: fd.ring_attention(x[:, :, :7], x[:, :, :7], x[:, :, :7], layout="zigzag"),
        "zigzag_unequal": lambda: fd.ring_attention(x[:, :, : 4 + 2 * rank], x, x, layout="zigzag"),
    }
    messages = {}
    for name, call in calls.items():
        try:
            call()
            messages[name] = None
        except (ValueError, TypeError) as e:
            messages[name] = f"{type(e).__name__}: {e}"
    return messages


def _collectives(rank: int, world: int) -> dict:
    """fastattn.distributed.shard and unshard against the pure split / join, ragged shards too."""
    from fastattn import distributed as fd
    from fastattn.distributed import layout as lay

    x = torch.arange(3 * 8 * world * 5, dtype=torch.float32).reshape(3, 8 * world, 5)
    checks = {}
    for layout in lay.LAYOUTS:
        mine = fd.shard(x, 1, layout)
        checks[f"shard {layout}"] = torch.equal(
            mine, lay.split(x, 1, layout, fd.split_lengths(8 * world, world, layout))[rank]
        )
        checks[f"unshard {layout}"] = torch.equal(fd.unshard(mine, 1, layout), x)
    ragged = [2 * r + 1 for r in range(world)]
    local = lay.split(x[:, : sum(ragged)], 1, "contiguous", ragged)[rank]
    checks["unshard ragged"] = torch.equal(fd.unshard(local, 1), x[:, : sum(ragged)])
    return checks


def run(rank: int, world: int, port: int, outdir: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = Results()
    try:
        for case in CASES:
            if case.processes != world:
                continue
            group, member = None, rank
            if case.group_ranks is not None:
                group = dist.new_group(sorted(case.group_ranks))  # every process takes part in creating it
                if rank not in case.group_ranks:
                    continue
                member = dist.get_rank(group)
            out, equal, received = _run_case(case, member, group)
            results.outputs[case.name] = out
            results.repeat_equal[case.name] = equal
            results.received[case.name] = received
        results.errors = _error_cases(rank, world)
        results.collectives = _collectives(rank, world)
    except Exception:
        results.errors["crash"] = traceback.format_exc()
    finally:
        torch.save(results.__dict__, os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()

"""Who is timed: fastattn, SDPA pinned to each of its backends and left to its own choice,
FlexAttention, and the reference.

A provider turns a case into a forward call ``call(q, k, v) -> out`` (setting up what it needs,
such as FlexAttention's block mask, outside the call) and names a context that every call, the
correctness check included, runs inside (SDPA's backend pinning). Backward is timed through
autograd on that same call, so a provider gains backward rows the day its forward becomes
differentiable: until then its forward raises for inputs that require grad and the row says why.

| name | what | devices |
| --- | --- | --- |
| fastattn | ``fastattn.attention`` (backend "auto": the Triton kernel on CUDA, the fallback on CPU) | cpu, cuda |
| fastattn-triton | ``fastattn.attention(backend="triton")``: on CPU through Triton's interpreter | cpu, cuda |
| sdpa | ``F.scaled_dot_product_attention`` with its own backend choice (the baseline) | cpu, cuda |
| sdpa-flash | SDPA pinned to FLASH_ATTENTION (on CPU: its flash-attention CPU kernel) | cpu, cuda |
| sdpa-efficient | SDPA pinned to EFFICIENT_ATTENTION (memory-efficient, xformers') | cuda |
| sdpa-cudnn | SDPA pinned to CUDNN_ATTENTION | cuda |
| sdpa-math | SDPA pinned to MATH (the composite of matmuls and softmax) | cpu, cuda |
| flex | ``torch.compile(flex_attention)`` with a causal block mask | where torch has it |
| reference | ``fastattn.reference.attention`` in the inputs' dtype (full score matrix) | cpu, cuda |
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastattn
from fastattn import dispatch, reference
from fastattn.problem import canonicalize

from .sweep import Case

Call = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
# torch._fused_sdp_choice's answer, an SDPBackend value, as the name of the pinned provider.
_SDPA_CHOICE_NAMES = {backend.value: name for name, backend in SDPA_BACKENDS.items()}


@dataclass(frozen=True)
class Provider:
    """One contestant.

    make(case, device) -> the forward call; context() wraps every call (default: none).
    materializes_scores: it allocates the (B, Hq, L, S) score matrix, so on CPU (where running out
        of memory kills the process instead of raising) the runner skips cases that would not fit.
    default_skip: device -> why a default sweep lists it there without timing it (naming the
        provider in --providers times it anyway).
    choice(case, q, k, v) -> what it dispatches to, shown in the row's note.
    """

    name: str
    description: str
    devices: tuple[str, ...]
    make: Callable[[Case, str], Call]
    context: Callable[[], AbstractContextManager] = nullcontext
    materializes_scores: bool = False
    default_skip: dict[str, str] = field(default_factory=dict)
    choice: Callable[[Case, torch.Tensor, torch.Tensor, torch.Tensor], str] | None = None


def _fastattn(backend: str) -> Callable[[Case, str], Call]:
    def make(case: Case, device: str) -> Call:
        return lambda q, k, v: fastattn.attention(q, k, v, is_causal=case.causal, enable_gqa=case.gqa, backend=backend)

    return make


def _fastattn_choice(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    problem = canonicalize(q, k, v, is_causal=case.causal, enable_gqa=case.gqa)
    return f"auto -> {dispatch.choose_backend('auto', problem).name}"


def _sdpa(case: Case, device: str) -> Call:
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=case.causal, enable_gqa=case.gqa)


def _sdpa_choice(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    # A private call, but the one SDPA itself uses to pick; it names no backend for nested tensors.
    picked = torch._fused_sdp_choice(q, k, v, None, 0.0, case.causal, enable_gqa=case.gqa)
    return f"picks {_SDPA_CHOICE_NAMES.get(picked, str(picked))}"


@functools.cache
def _compiled_flex_attention() -> Callable:
    # Imported here: torch.nn.attention.flex_attention pulls in torch._dynamo and triton, and
    # triton's kernel flavour is fixed at its first import (see fastattn.env).
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    # One static compile per shape (as FlexAttention is benchmarked upstream): a sweep has hundreds
    # of shapes, far past dynamo's default of 8 recompiles, after which it would fall back to eager.
    torch._dynamo.config.recompile_limit = 1_000_000
    torch._dynamo.config.accumulated_recompile_limit = 1_000_000
    return torch.compile(flex_attention, dynamic=False)


def _flex(case: Case, device: str) -> Call:
    from torch.nn.attention.flex_attention import create_block_mask

    block_mask = None
    if case.causal:
        block_mask = create_block_mask(lambda b, h, i, j: j <= i, None, None, case.L, case.S, device=device)
    flex = _compiled_flex_attention()
    return lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=case.gqa)


def _reference(case: Case, device: str) -> Call:
    return lambda q, k, v: reference.attention(q, k, v, is_causal=case.causal, enable_gqa=case.gqa)


def _pinned(name: str, devices: tuple[str, ...], what: str, **kwargs) -> Provider:
    return Provider(
        f"sdpa-{name}",
        f"SDPA pinned to {SDPA_BACKENDS[name].name}{what}",
        devices,
        _sdpa,
        context=functools.partial(sdpa_kernel, SDPA_BACKENDS[name]),
        **kwargs,
    )


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider(
            "fastattn",
            "fastattn.attention (backend auto)",
            ("cpu", "cuda"),
            _fastattn("auto"),
            choice=_fastattn_choice,
        ),
        Provider(
            "fastattn-triton",
            "fastattn.attention(backend='triton'); CPU tensors run it through Triton's interpreter",
            ("cpu", "cuda"),
            _fastattn("triton"),
            default_skip={"cpu": "interpreter (no GPU)"},
        ),
        Provider(
            "sdpa",
            "F.scaled_dot_product_attention, its own backend choice",
            ("cpu", "cuda"),
            _sdpa,
            choice=_sdpa_choice,
        ),
        _pinned("flash", ("cpu", "cuda"), " (on CPU: its flash-attention CPU kernel)"),
        _pinned("efficient", ("cuda",), " (memory-efficient attention)"),
        _pinned("cudnn", ("cuda",), ""),
        _pinned("math", ("cpu", "cuda"), " (matmuls and softmax)", materializes_scores=True),
        Provider(
            "flex",
            "torch.compile(flex_attention), a block mask for causal",
            ("cpu", "cuda"),
            _flex,
            default_skip={
                "cpu": "torch.compile on CPU (C++ inductor) takes 5-30 s per shape; name flex in --providers to time it"
            },
        ),
        Provider(
            "reference",
            "fastattn.reference.attention in the inputs' dtype (full score matrix)",
            ("cpu", "cuda"),
            _reference,
            materializes_scores=True,
        ),
    )
}


def flex_available() -> bool:
    """Does the installed torch have FlexAttention? (Checked without importing it.)"""
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def available_providers(device: str) -> list[str]:
    """The providers that exist for `device` with this torch, in table order."""
    return [name for name, p in PROVIDERS.items() if device in p.devices and (name != "flex" or flex_available())]


def default_providers(device: str) -> list[str]:
    """A default sweep's providers: every available one but fastattn-triton on CUDA, where it is
    what fastattn (auto) runs already."""
    return [name for name in available_providers(device) if not (device == "cuda" and name == "fastattn-triton")]

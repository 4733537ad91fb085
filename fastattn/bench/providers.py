"""Who is timed: fastattn, SDPA pinned to each of its backends and left to its own choice,
FlexAttention, and the reference.

A provider turns a case into a forward call ``call(q, k, v) -> out`` (setting up what it needs,
such as FlexAttention's block mask, outside the call) and names a context that every call, the
correctness check included, runs inside (SDPA's backend pinning). Backward is timed through
autograd on that same call, so a provider gains backward rows the day its forward becomes
differentiable: until then its forward raises for inputs that require grad and the row says why.

Score modifiers (sliding window, softcap, ALiBi): fastattn and the reference take them as
arguments; FlexAttention gets a mask_mod for the window and a score_mod for softcap and ALiBi;
SDPA can express a window and ALiBi only through a materialised (1, Hq or 1, L, S) mask, built
outside the timed call (the row's note says so), and a softcap not at all ("unsupported").

| name | what | devices |
| --- | --- | --- |
| fastattn | ``fastattn.attention`` (backend "auto": the Triton kernel on CUDA, the fallback on CPU) | cpu, cuda |
| fastattn-triton | ``fastattn.attention(backend="triton")``: on CPU through Triton's interpreter | cpu, cuda |
| sdpa | ``F.scaled_dot_product_attention`` with its own backend choice (the baseline) | cpu, cuda |
| sdpa-flash | SDPA pinned to FLASH_ATTENTION (on CPU: its flash-attention CPU kernel) | cpu, cuda |
| sdpa-efficient | SDPA pinned to EFFICIENT_ATTENTION (memory-efficient, xformers') | cuda |
| sdpa-cudnn | SDPA pinned to CUDNN_ATTENTION | cuda |
| sdpa-math | SDPA pinned to MATH (the composite of matmuls and softmax) | cpu, cuda |
| flex | ``torch.compile(flex_attention)`` with a block mask (causal, window), a score_mod (softcap, ALiBi) | where torch has it |
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
        kwargs = case.attention_kwargs(device)
        return lambda q, k, v: fastattn.attention(
            q, k, v, is_causal=case.causal, enable_gqa=case.gqa, backend=backend, **kwargs
        )

    return make


def _fastattn_choice(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    kwargs = case.attention_kwargs(str(q.device))
    problem = canonicalize(q, k, v, is_causal=case.causal, enable_gqa=case.gqa, **kwargs)
    return f"auto -> {dispatch.choose_backend('auto', problem).name}"


@functools.lru_cache(maxsize=1)
def sdpa_mask(case: Case, device: str) -> torch.Tensor | None:
    """The mask SDPA needs to express a window or ALiBi: bool (1, 1, L, S) for a window alone, else
    an additive (1, Hq, L, S) bias of the case's dtype (-inf outside the causal band). None when
    the case has neither (SDPA's is_causal serves plain causal cases)."""
    if not (case.window or case.alibi):
        return None
    i = torch.arange(case.L, device=device)[:, None] + (case.S - case.L)
    j = torch.arange(case.S, device=device)[None, :]
    keep = torch.ones(case.L, case.S, dtype=torch.bool, device=device)
    if case.causal or case.window:
        keep &= j <= i
    if case.window:
        keep &= j > i - case.window
    if not case.alibi:
        return keep[None, None]
    slopes = case.attention_kwargs(device)["alibi_slopes"]
    bias = -slopes[:, None, None] * (i - j).abs()[None].float()
    return bias.masked_fill(~keep, float("-inf")).to(case.dtype)[None]


def _sdpa(case: Case, device: str) -> Call:
    if case.softcap:
        raise NotImplementedError("SDPA has no softcap (it applies no function to the scores)")
    mask = sdpa_mask(case, device)
    if mask is not None:
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=case.gqa)
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=case.causal, enable_gqa=case.gqa)


def _sdpa_choice(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    # A private call, but the one SDPA itself uses to pick; it names no backend for nested tensors.
    mask = sdpa_mask(case, str(q.device))
    causal = case.causal and mask is None
    picked = torch._fused_sdp_choice(q, k, v, mask, 0.0, causal, enable_gqa=case.gqa)
    note = "materialised (L, S) mask; " if mask is not None else ""
    return f"{note}picks {_SDPA_CHOICE_NAMES.get(picked, str(picked))}"


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
    if case.window:
        w = case.window
        block_mask = create_block_mask(
            lambda b, h, i, j: (j <= i) & (i - j < w), None, None, case.L, case.S, device=device
        )
    elif case.causal:
        block_mask = create_block_mask(lambda b, h, i, j: j <= i, None, None, case.L, case.S, device=device)
    score_mod = None
    if case.softcap or case.alibi:
        cap = case.softcap
        slopes = case.attention_kwargs(device).get("alibi_slopes")

        def score_mod(score, b, h, i, j):
            if cap:
                score = cap * torch.tanh(score / cap)
            if slopes is not None:
                score = score - slopes[h] * (i - j).abs()
            return score

    flex = _compiled_flex_attention()
    return lambda q, k, v: flex(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=case.gqa)


def _reference(case: Case, device: str) -> Call:
    kwargs = case.attention_kwargs(device)
    return lambda q, k, v: reference.attention(q, k, v, is_causal=case.causal, enable_gqa=case.gqa, **kwargs)


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

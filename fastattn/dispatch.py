"""Which backend serves a call, forward and backward, and why the others cannot.

Each backend declares what it supports (devices, dtypes, head dims, and through
:data:`fastattn.features.FEATURES` the features it computes and differentiates);
:func:`unsupported_reasons` reads the declarations and lists every reason a backend cannot serve a
problem. `backend="auto"` takes the first backend of AUTO_ORDER that can; an explicit backend that
cannot raises :class:`BackendUnavailable` with all its reasons. The backward is chosen apart from
the forward (:func:`choose_backward`): a backend whose backward cannot differentiate what the call
needs hands it to the PyTorch backward, and :func:`backward_reasons` says why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .features import FEATURES, used_features
from .problem import MAX_HEAD_DIM, Problem

BACKENDS = ("triton", "cpu", "reference")
AUTO_ORDER = ("triton", "cpu")
# The backward every custom-op backend can fall back to: PyTorch ops, any device.
FALLBACK_BACKWARD = "cpu"
MIN_CUDA_CAPABILITY = (8, 0)
ALL_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


class BackendUnavailable(ValueError):
    """An explicitly requested backend cannot serve the call; the message lists every reason."""


class FeatureNotImplemented(BackendUnavailable, NotImplementedError):
    """The call uses a feature that no fastattn backend implements yet."""


def _triton_reasons(p: Problem, explicit: bool) -> list[str]:
    """What the declarations cannot say: the kernel flavour of this process and the GPU."""
    from .fused import flavour_error

    if p.device.type not in ("cuda", "cpu"):
        return []  # the device declaration has said it
    reasons = []
    if p.packing is not None and p.packing.block_table is not None and p.packing.page_size % 16:
        reasons.append(f"pages of a multiple of 16 keys only, got page_size={p.packing.page_size}")
    err = flavour_error(p.device.type)
    if err:
        reasons.append(err)
    if p.device.type == "cuda":
        cap = torch.cuda.get_device_capability(p.device)
        if cap < MIN_CUDA_CAPABILITY:
            reasons.append(f"needs an NVIDIA GPU of compute capability >= 8.0 (sm_80), this one is sm_{cap[0]}{cap[1]}")
        if torch.version.hip is not None:
            reasons.append("ROCm GPUs are not tuned or tested")
        if p.dtype == torch.float64:
            # The float64 kernels exist for gradcheck through the interpreter; no GPU config table or
            # GPU test covers them, so compiled float64 is refused rather than run untuned and unchecked.
            reasons.append(
                "float64 runs the kernel only through Triton's interpreter (CPU tensors); on CUDA use backend='cpu'"
            )
    else:
        if not explicit:
            reasons.append("runs CPU tensors only through Triton's interpreter, when asked for by backend='triton'")
        if p.dtype == torch.bfloat16:
            reasons.append("Triton's interpreter computes bfloat16 tl.dot wrongly; use backend='cpu' on CPU")
    return reasons


def _reference_reasons(p: Problem, explicit: bool) -> list[str]:
    if not explicit:
        return ["the reference materialises the (L, S) score matrix; it runs only when asked for"]
    return []


def _run_triton(p: Problem):
    from .fused.forward import triton_attention_forward

    return triton_attention_forward(p)


def _run_cpu(p: Problem):
    from .eager.forward import cpu_fallback_attention

    if p.packing is not None:
        from .eager.packed import packed_attention

        return packed_attention(p, cpu_fallback_attention)
    return cpu_fallback_attention(p, return_stats=True)


def _cpu_stats(p: Problem) -> bool:
    from .eager.forward import tiled_serves

    return p.packing is None and tiled_serves(p)


def _triton_backward(p: Problem, out, lse, dout, dlse, mask_grad: bool, stats=None, partial: bool = False):
    from .fused.backward import triton_attention_backward

    # partial needs nothing here: the kernels always take P = exp(S - lse) and delta from out.
    return (*triton_attention_backward(p, out, lse, dout, dlse, stats=stats), None)


def _cpu_backward(p: Problem, out, lse, dout, dlse, mask_grad: bool, stats=None, partial: bool = False):
    from .eager.backward import cpu_attention_backward

    if p.packing is not None:
        from .eager.packed import packed_attention_backward

        return (*packed_attention_backward(p, out, lse, dout, dlse, cpu_attention_backward), None)
    return cpu_attention_backward(p, out, lse, dout, dlse, mask_grad=mask_grad, stats=stats, partial=partial)


def _run_reference(p: Problem):
    from .reference import problem_attention

    if p.packing is not None:
        from .eager.packed import packed_attention
        from .packed import check_packing_values

        check_packing_values(p)  # plain PyTorch ops, no fastattn::forward: checked here
        return packed_attention(p, problem_attention)
    return problem_attention(p)


@dataclass(frozen=True)
class Backend:
    """A backend's declaration. devices: the device types it runs (None: any PyTorch runs).
    custom_op: its forward runs inside the fastattn::forward op and the backward is chosen by
    :func:`choose_backward`; False: plain PyTorch ops that autograd differentiates directly.
    run: (p) -> (out, lse) or (out, lse, stats), stats what its backward needs beyond lse.
    run_backward: (p, out, lse, dout, dlse, mask_grad, stats=, partial=) -> (dq, dk, dv, dmask or
    None), for custom-op backends (stats: the forward's, or None; partial: p holds part of the keys
    of a larger call whose out and lse these are, so the backward must not recompute them).
    more_reasons: what the declarations cannot say (p, explicit) -> reasons.
    stats: (p) -> whether its forward returns stats for a problem with work (the op's output
    shape, also for the fake kernel; the forward must agree)."""

    name: str
    description: str
    devices: tuple[str, ...] | None
    dtypes: frozenset[torch.dtype]
    max_head_dim: int
    custom_op: bool
    run: Callable[[Problem], tuple[torch.Tensor, torch.Tensor]]
    run_backward: Callable[..., tuple] | None = None
    more_reasons: Callable[[Problem, bool], list[str]] = lambda p, explicit: []
    stats: Callable[[Problem], bool] = lambda p: False


REGISTRY: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            "triton",
            "fused Triton kernel (CUDA sm_80+; CPU tensors through Triton's interpreter)",
            devices=("cuda", "cpu"),
            dtypes=ALL_DTYPES,
            max_head_dim=MAX_HEAD_DIM,
            custom_op=True,
            run=_run_triton,
            run_backward=_triton_backward,
            more_reasons=_triton_reasons,
            stats=lambda p: p.mask is not None and p.mask.dtype != torch.bool,  # fused.forward.new_stats
        ),
        Backend(
            "cpu",
            "PyTorch fallback: SDPA's CPU kernel where it expresses the call, else a tiled online softmax",
            devices=None,
            dtypes=ALL_DTYPES,
            max_head_dim=MAX_HEAD_DIM,
            custom_op=True,
            run=_run_cpu,
            run_backward=_cpu_backward,
            stats=_cpu_stats,  # the tiled forward's row statistics
        ),
        Backend(
            "reference",
            "the textbook formula on the full score matrix",
            devices=None,
            dtypes=ALL_DTYPES,
            max_head_dim=MAX_HEAD_DIM,
            custom_op=False,
            run=_run_reference,
            more_reasons=_reference_reasons,
        ),
    )
}


def unsupported_reasons(name: str, p: Problem, explicit: bool = True, used: list[str] | None = None) -> list[str]:
    """Every reason backend `name` cannot serve problem `p` forward (empty when it can). used: the
    problem's :func:`used_features`, when the caller has them already."""
    b = REGISTRY[name]
    reasons = []
    if b.devices is not None and p.device.type not in b.devices:
        reasons.append(f"runs on {' or '.join(b.devices)} tensors, not {p.device.type}")
    if p.dtype not in b.dtypes:
        reasons.append(f"does not take {p.dtype}")
    if max(p.head_dim, p.head_dim_v) > b.max_head_dim:
        reasons.append(f"head dims up to {b.max_head_dim}, got E={p.head_dim}, Ev={p.head_dim_v}")
    reasons += [
        f"does not implement {FEATURES[f].description}"
        for f in (used_features(p) if used is None else used)
        if name not in FEATURES[f].forward
    ]
    return reasons + b.more_reasons(p, explicit)


def backward_reasons(name: str, p: Problem) -> list[str]:
    """Every reason backend `name`'s backward cannot differentiate `p` (empty when it can).

    Call it with the problem as the forward saw it (a float mask's requires_grad is a feature)."""
    return [
        f"its backward does not differentiate {FEATURES[f].description}"
        for f in used_features(p)
        if name not in FEATURES[f].backward
    ]


def choose_backward(forward: str, p: Problem) -> str:
    """The backend whose backward differentiates `p` after `forward` served it: its own when it
    can (see backward_reasons), else the PyTorch backward (FALLBACK_BACKWARD), which works on any
    device and differentiates every feature the forwards serve."""
    return forward if not backward_reasons(forward, p) else FALLBACK_BACKWARD


def _check_implemented(used: list[str]) -> None:
    for f in used:
        if not FEATURES[f].forward:
            raise FeatureNotImplemented(f"no fastattn backend implements {FEATURES[f].description}")


def choose_backend(name: str, p: Problem) -> Backend:
    """The backend that serves `p`: `name` itself, or for "auto" the first in AUTO_ORDER that can."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if name != "auto" and name not in REGISTRY:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    used = used_features(p)
    if torch.compiler.is_compiling():  # a traced dict lookup would guard on the cache's contents
        return _choose(name, p, used)
    key = (name, p.device, p.dtype, p.head_dim, p.head_dim_v, tuple(used), _extra_key(p))
    cached = _CHOSEN.get(key)
    if cached is not None:
        return cached
    chosen = _choose(name, p, used)
    if len(_CHOSEN) < 4096:
        _CHOSEN[key] = chosen
    return chosen


# choose_backend's answers, by everything the declarations and reasons read: a decode loop asks
# the same question thousands of times. Failures are not cached (they raise).
_CHOSEN: dict[tuple, Backend] = {}


def _extra_key(p: Problem):
    """What the reasons read beyond device, dtype, head dims and features: a packed call's page size."""
    return None if p.packing is None or p.packing.block_table is None else p.packing.page_size % 16


def _choose(name: str, p: Problem, used: list[str]) -> Backend:
    _check_implemented(used)
    if name == "auto":
        why = {}
        for candidate in AUTO_ORDER:
            reasons = unsupported_reasons(candidate, p, explicit=False, used=used)
            if not reasons:
                return REGISTRY[candidate]
            why[candidate] = reasons
        detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in why.items())
        raise BackendUnavailable(f"no backend can serve this call ({detail})")
    reasons = unsupported_reasons(name, p, explicit=True, used=used)
    if reasons:
        listed = "\n".join(f"  - {r}" for r in reasons)
        raise BackendUnavailable(f"backend={name!r} cannot serve this call:\n{listed}")
    return REGISTRY[name]

"""Which backend serves a call, and why the others cannot.

Each backend declares what it supports; :func:`unsupported_reasons` lists every reason a backend
cannot serve a problem, `backend="auto"` takes the first backend that can, and an explicit backend
that cannot raises :class:`BackendUnavailable` with all its reasons.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .problem import Problem

BACKENDS = ("triton", "cpu", "reference")
AUTO_ORDER = ("triton", "cpu")
MIN_CUDA_CAPABILITY = (8, 0)


class BackendUnavailable(ValueError):
    """An explicitly requested backend cannot serve the call; the message lists every reason."""


def triton_import_error() -> str | None:
    """Why `import triton` fails here, or None when it works."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"triton cannot be imported ({type(e).__name__}: {e})"
    return None


def triton_flavour_error(device_type: str) -> str | None:
    """Why this process's kernel flavour cannot run tensors on `device_type` (None when it can)."""
    err = triton_import_error()
    if err:
        return err
    from .fused.kernels import interpreted

    try:
        interp = interpreted()
    except Exception as e:  # e.g. Triton's interpreter failing to import with this numpy
        return f"the Triton kernels cannot be loaded ({type(e).__name__}: {e})"
    if device_type == "cpu" and not interp:
        return (
            "CPU tensors run the kernel only through Triton's interpreter, which is off in this process: "
            "set TRITON_INTERPRET=1 before triton is first imported"
        )
    if device_type == "cuda" and interp:
        return "TRITON_INTERPRET=1 is set in this process: the kernels run in the interpreter, not on the GPU"
    return None


def _triton_reasons(p: Problem, explicit: bool) -> list[str]:
    reasons = []
    if p.device.type in ("cuda", "cpu"):
        err = triton_flavour_error(p.device.type)
        if err:
            reasons.append(err)
    if p.device.type == "cuda":
        cap = torch.cuda.get_device_capability(p.device)
        if cap < MIN_CUDA_CAPABILITY:
            reasons.append(f"needs an NVIDIA GPU of compute capability >= 8.0 (sm_80), this one is sm_{cap[0]}{cap[1]}")
        if torch.version.hip is not None:
            reasons.append("ROCm GPUs are not tuned or tested")
    elif p.device.type == "cpu":
        if not explicit:
            reasons.append("runs CPU tensors only through Triton's interpreter, when asked for by backend='triton'")
        if p.dtype == torch.bfloat16:
            reasons.append("Triton's interpreter computes bfloat16 tl.dot wrongly; use backend='cpu' on CPU")
    else:
        reasons.append(f"runs on CUDA tensors (or CPU ones through the interpreter), not {p.device.type}")
    if p.dtype == torch.float64 and p.device.type != "cpu":
        # The float64 kernels exist for gradcheck through the interpreter; no GPU config table or
        # GPU test covers them, so compiled float64 is refused rather than run untuned and unchecked.
        reasons.append(
            "float64 runs the kernel only through Triton's interpreter (CPU tensors); on CUDA use backend='cpu'"
        )
    return reasons


def _cpu_reasons(p: Problem, explicit: bool) -> list[str]:
    # Plain PyTorch ops: any device PyTorch runs, every dtype the public call accepts.
    return []


def _reference_reasons(p: Problem, explicit: bool) -> list[str]:
    if not explicit:
        return ["the reference materialises the (L, S) score matrix; it runs only when asked for"]
    return []


def _run_triton(p: Problem, return_lse: bool):
    from .fused.forward import triton_attention_forward

    return triton_attention_forward(p)


def _run_cpu(p: Problem, return_lse: bool):
    from .eager.forward import cpu_fallback_attention

    return cpu_fallback_attention(p, return_lse=return_lse)


def _run_reference(p: Problem, return_lse: bool):
    from .reference import problem_attention

    return problem_attention(p)


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    reasons: Callable[[Problem, bool], list[str]]
    run: Callable[[Problem, bool], tuple[torch.Tensor, torch.Tensor | None]]


REGISTRY: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            "triton",
            "fused Triton kernel (CUDA sm_80+; CPU tensors through Triton's interpreter)",
            _triton_reasons,
            _run_triton,
        ),
        Backend(
            "cpu",
            "PyTorch fallback: SDPA's CPU kernel where it expresses the call, else a tiled online softmax",
            _cpu_reasons,
            _run_cpu,
        ),
        Backend("reference", "the textbook formula on the full score matrix", _reference_reasons, _run_reference),
    )
}


def unsupported_reasons(name: str, p: Problem, explicit: bool = True) -> list[str]:
    """Every reason backend `name` cannot serve problem `p` (empty when it can)."""
    return REGISTRY[name].reasons(p, explicit)


def choose_backend(name: str, p: Problem) -> Backend:
    """The backend that serves `p`: `name` itself, or for "auto" the first in AUTO_ORDER that can."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if name == "auto":
        why = {}
        for candidate in AUTO_ORDER:
            reasons = unsupported_reasons(candidate, p, explicit=False)
            if not reasons:
                return REGISTRY[candidate]
            why[candidate] = reasons
        detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in why.items())
        raise BackendUnavailable(f"no backend can serve this call ({detail})")
    if name not in REGISTRY:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    reasons = unsupported_reasons(name, p, explicit=True)
    if reasons:
        listed = "\n".join(f"  - {r}" for r in reasons)
        raise BackendUnavailable(f"backend={name!r} cannot serve this call:\n{listed}")
    return REGISTRY[name]

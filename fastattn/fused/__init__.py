"""The fused path: Triton kernels with their launchers, configs and ahead-of-time compile tool.

Everything under this folder may import triton; nothing outside it does. Importing this package
does not import triton either (the kernel flavour, compiled or interpreted, is fixed at triton's
first import), so :func:`triton_import_error` and :func:`flavour_error` can ask first.

- ``kernels/``: ``@triton.jit`` code only (``common``: the shared tile helpers and the score step;
  ``forward``; ``backward``).
- ``configs``: every tunable (block sizes, warps, stages) and the replace-the-config API.
- ``plumbing``: host code both launchers share (strides, scale, precision, 64-bit offsets, batch
  chunks, the feature constexprs).
- ``block_lists``: which tiles causality and a mask leave to visit.
- ``forward`` / ``backward``: the launchers (a :class:`plumbing.Launch` plan per kernel, then launch).
- ``aot``: ``python -m fastattn.fused.aot``, compiling the launchers' plans for sm_80 / sm_90.
"""

from __future__ import annotations

import functools


@functools.cache  # the answers are fixed for the process: triton's flavour is chosen at its import
def triton_import_error() -> str | None:
    """Why `import triton` fails here, or None when it works."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"triton cannot be imported ({type(e).__name__}: {e})"
    return None


def triton_version() -> str | None:
    """The installed triton's version, or None when it cannot be imported."""
    if triton_import_error() is not None:
        return None
    import triton

    return triton.__version__


@functools.cache
def flavour_error(device_type: str) -> str | None:
    """Why this process's kernel flavour cannot run tensors on `device_type` (None when it can)."""
    err = triton_import_error()
    if err:
        return err
    from .kernels import interpreted

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

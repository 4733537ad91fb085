"""Triton kernels: ``@triton.jit`` code only; nothing here imports from the layers above.

forward.py holds the forward kernel, backward.py the three backward kernels; both import their
shared pieces (tile loads and stores, the score step, loop bounds) from common.py.

``triton.jit`` fixes at decoration time whether kernels are compiled for a GPU or run by Triton's
CPU interpreter, and triton's own library functions are fixed when triton is first imported: the
``TRITON_INTERPRET`` environment variable at that moment chooses one flavour per process.
:func:`interpreted` tells which one this process has.
"""

from __future__ import annotations

import functools


@functools.cache  # fixed at triton's import
def interpreted() -> bool:
    """True when the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    from .forward import attention_forward_kernel

    return isinstance(attention_forward_kernel, InterpretedFunction)

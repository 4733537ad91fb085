"""fastattn: exact attention, softmax(QK^T/sqrt(d))V, as a drop-in for PyTorch's SDPA.

``fastattn.attention`` takes SDPA's arguments and gives SDPA's answer: on NVIDIA GPUs from a fused
Triton kernel, on CPU from a PyTorch fallback with O(L) extra memory. ``fastattn.reference``
holds the textbook formula every path is tested against.
"""

from . import reference
from .dispatch import BACKENDS, BackendUnavailable, unsupported_reasons
from .interface import attention, varlen_attention

__version__ = "0.3.0"

__all__ = ["attention", "varlen_attention", "reference", "BACKENDS", "BackendUnavailable", "unsupported_reasons", "__version__"]

"""fastattn: exact attention, softmax(QK^T/sqrt(d))V, as a drop-in for PyTorch's SDPA.

``fastattn.attention`` takes SDPA's arguments and gives SDPA's answer: on NVIDIA GPUs from a fused
Triton kernel, on CPU from a PyTorch fallback with O(L) extra memory. ``fastattn.varlen_attention`` is
the same for packed variable-length batches and KV-cache decoding (contiguous or paged), with the
arguments of torch's ``varlen_attn``. ``fastattn.reference`` holds the textbook formula every
path is tested against; ``fastattn.dropout`` the counter-based dropout mask every backend draws;
``fastattn.distributed.ring_attention`` shards one sequence over a torch.distributed process group
(context parallelism: exact ring attention, forward and backward).
"""

from . import distributed, dropout, reference
from .dispatch import BACKENDS, BackendUnavailable, unsupported_reasons
from .interface import attention, varlen_attention

__version__ = "0.5.0"

__all__ = [
    "attention",
    "varlen_attention",
    "reference",
    "dropout",
    "distributed",
    "BACKENDS",
    "BackendUnavailable",
    "unsupported_reasons",
    "__version__",
]

"""The public call: a drop-in for torch.nn.functional.scaled_dot_product_attention."""

from __future__ import annotations

import torch

from .dispatch import choose_backend
from .ops import run_forward
from .problem import canonicalize, empty_result


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Exact attention, softmax(Q K^T * scale + mask) V, with SDPA's arguments and FlashAttention's
    score modifiers (sliding window, softcap, ALiBi).

    Shapes (the leading batch dims "..." are any SDPA accepts, including none):
        query (..., Hq, L, E), key (..., Hkv, S, E), value (..., Hkv, S, Ev) -> (..., Hq, L, Ev).
        2-D inputs (L, E), (S, E), (S, Ev) give (L, Ev). E and Ev may differ, each 1..256.

    Arguments (names, order and defaults are SDPA's):
        attn_mask: None; a bool tensor (True = the key takes part) or a float tensor of the
            query's dtype (added to the scaled scores), broadcastable to (..., Hq, L, S) and read
            through its strides (a (B, 1, 1, S) padding mask is never expanded); or SDPA's
            ``torch.nn.attention.bias.CausalBias`` (``causal_upper_left(L, S)`` /
            ``causal_lower_right(L, S)``). A tensor mask may be combined with ``is_causal=True``
            (both apply; SDPA refuses this on some backends).
        dropout_p: must be 0.0 for now; > 0 raises NotImplementedError (dropout comes later).
        is_causal: SDPA's top-left alignment: query i sees key j when j <= i. For L=2, S=4::

                top-left (is_causal=True)   bottom-right (causal_lower_right(2, 4))
                1 0 0 0                     1 1 1 0
                1 1 0 0                     1 1 1 1

            bottom-right (query i sees j <= i + S - L) is what KV-cache decoding needs.
        scale: multiplies Q K^T; default 1/sqrt(E).
        enable_gqa: allow Hq != Hkv when Hq is a multiple of Hkv: query head h reads KV head
            h // (Hq // Hkv) (SDPA's grouping). K and V are never repeated in memory.

    Score modifiers (keyword-only; FlashAttention's names and definitions):
        window_size: (left, right), each an int >= -1 (-1: unbounded on that side). Query i sees
            key j only when i + S - L - left <= j <= i + S - L + right: the band is aligned to
            the bottom-right corner, like FlashAttention's. (-1, 0) is bottom-right causal;
            (w - 1, 0) is a causal window of w keys ending at the query's own position (Mistral's
            ``sliding_window = w``). The cost grows with L * window, not L * S: key blocks outside
            the band are never visited. For L=3, S=5::

                window_size=(2, 1)          window_size=(2, 1) and is_causal=True (top-left)
                1 1 1 1 0                   1 0 0 0 0
                0 1 1 1 1                   0 1 0 0 0
                0 0 1 1 1                   0 0 1 0 0

            Every mask that applies is intersected: with is_causal=True (SDPA's top-left
            alignment) and L != S the two diagonals differ, as drawn; pass window_size=(w - 1, 0)
            without is_causal for a bottom-right causal window.
        softcap: 0.0 (off) or c > 0: each scaled score s becomes c * tanh(s / c) (Gemma 2's
            ``attn_logit_softcapping``). Finite; differentiable through (the chain rule is exact).
        alibi_slopes: None, or a float32 tensor of shape (Hq,) or (..., Hq) (the batch dims
            first) on the query's device: head h adds -slope[h] * |i + S - L - j| to its scores
            (FlashAttention's ALiBi). Not differentiable: a slopes tensor that requires grad raises.

        The order, the same on every backend: s = scale * q . k -> softcap -> + ALiBi bias ->
        + float mask (or -inf where a bool mask is False) -> -inf outside causal (is_causal or
        CausalBias) and outside the window -> softmax. return_lse gives the lse of exactly these.
        return_lse: also return lse (..., Hq, L), float32 (float64 for float64 inputs), the
            natural-log logsumexp of each row's scores, after every modifier above.
        backend: "auto" (CUDA tensors -> "triton", falling back to "cpu" where Triton cannot
            serve; CPU tensors -> "cpu"), "triton" (the fused kernel; CPU tensors run it through
            Triton's interpreter: slow, for tests and debugging), "cpu" (the PyTorch fallback:
            O(L) extra memory), "reference" (the textbook formula, O(L*S) memory). An explicit
            backend that cannot serve the call raises BackendUnavailable (a ValueError) listing
            every reason.

    dtypes: float16, bfloat16, float32; float64 on the "cpu" and "reference" backends, and on
    "triton" for CPU tensors through the interpreter (for gradient checks). The output has the
    input dtype. float32 matmuls on CUDA use TF32 only when
    ``torch.backends.cuda.matmul.allow_tf32`` is True, as in the rest of PyTorch.

    Rows with nothing to attend to (every key masked out or outside the window, or S = 0) give
    output 0 and lse = -inf,
    never NaN. SDPA's math backend also gives 0 there, but some of its fused backends give NaN
    (and its CPU kernel reports lse = 0).

    Returns out, or (out, lse) when return_lse=True.

    Gradients: query, key, value and a float attn_mask are differentiable (lse too, when it
    takes part in the loss). The backward recomputes the scores block by block from the saved
    lse (O(L) extra memory); the Triton backward runs without atomics, so repeated backward
    passes are bitwise identical. A float mask that requires grad gets its gradient summed over
    its broadcast dims, through the slower PyTorch tiled backward. Double backward raises.
    ``fastattn::forward`` and ``fastattn::backward`` are torch.library custom ops, so
    torch.compile traces the call without graph breaks.

    Raises TypeError / ValueError naming the argument for bad input (ranks, batch dims, head
    counts, head dims, dtypes, devices, mask shape or dtype, dropout_p, window_size, softcap,
    alibi_slopes' shape, dtype or device).
    """
    p = canonicalize(
        query,
        key,
        value,
        attn_mask,
        dropout_p,
        is_causal,
        scale,
        enable_gqa,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
    )
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    chosen = choose_backend(backend, p)
    if chosen.custom_op:
        result = run_forward(p, chosen.name)
    else:  # plain PyTorch ops: autograd differentiates them directly
        result = empty_result(p) or chosen.run(p)
    out, lse = p.restore(*result)
    return (out, lse) if return_lse else out

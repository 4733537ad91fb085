"""The public call: a drop-in for torch.nn.functional.scaled_dot_product_attention."""

from __future__ import annotations

import torch

from .dispatch import choose_backend
from .ops import run_forward
from .packed import canonicalize_varlen
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
    generator: torch.Generator | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Exact attention, softmax(Q K^T * scale + mask) V, with SDPA's arguments and FlashAttention's
    score modifiers (sliding window, softcap, ALiBi), and dropout that is the same bits on every
    backend.

    Shapes (the leading batch dims "..." are any SDPA accepts, including none):
        query (..., Hq, L, E), key (..., Hkv, S, E), value (..., Hkv, S, Ev) -> (..., Hq, L, Ev).
        2-D inputs (L, E), (S, E), (S, Ev) give (L, Ev). E and Ev may differ, each 1..256. Key
        and value batch dims of size 1 broadcast to the query's (stride-0 views).

    Arguments (names, order and defaults are SDPA's):
        attn_mask: None; a bool tensor (True = the key takes part) or a float tensor of any float
            dtype (added to the scaled scores, read in its own dtype; every finite value, to
            +-finfo.max, is a finite score: a row of finfo.min is the mean of V, as in SDPA),
            broadcastable to (..., Hq, L, S) and read through its strides (a (B, 1, 1, S) padding
            mask is never expanded); or SDPA's
            ``torch.nn.attention.bias.CausalBias`` (``causal_upper_left(L, S)`` /
            ``causal_lower_right(L, S)``). A tensor mask may be combined with ``is_causal=True``
            (both apply; SDPA refuses this on some backends).
        dropout_p: in [0, 1). SDPA's definition: each attention weight is dropped (0) with
            probability dropout_p, independently per (batch, query head, query row, key), and
            the kept ones are multiplied by 1 / (1 - dropout_p); 0.0 costs nothing. Applied
            whenever dropout_p > 0 (as SDPA: pass 0.0 in eval mode). Which weights are dropped is
            a pure function of a draw of two int64 numbers (seed, offset) made per call from
            `generator` (fastattn.dropout gives the formula: Philox4x32-10 counters), so
            torch.manual_seed makes runs reproducible, consecutive calls differ, and one draw
            gives bit-identical masks on every backend and device, whatever the tiles; the
            backward regenerates the mask (never stored). lse (return_lse) is that of the
            scores before dropout, as FlashAttention defines it. fastattn.reference.attention(...,
            return_weights=True) shows the dropped weights.
        is_causal: SDPA's top-left alignment: query i sees key j when j <= i. For L=2, S=4::

                top-left (is_causal=True)   bottom-right (causal_lower_right(2, 4))
                1 0 0 0                     1 1 1 0
                1 1 0 0                     1 1 1 1

            bottom-right (query i sees j <= i + S - L) is what KV-cache decoding needs.
        scale: multiplies Q K^T; default 1/sqrt(E). Any real number or one-element tensor.
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
        generator: None (torch's default generator of the inputs' device) or a torch.Generator
            to draw dropout's seed and offset from: on the inputs' device, or a CPU generator
            for inputs on any device (so that a CPU and a GPU run draw the same masks). Not
            read when dropout_p = 0. Under torch.compile the draw is a traced op (no graph break;
            the compiled program may draw other numbers than eager mode does).

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
    input dtype; inside torch.autocast of the inputs' device, q, k and v (not float64) take the
    autocast dtype first, as SDPA does. float32 matmuls on CUDA use TF32 only when
    ``torch.backends.cuda.matmul.allow_tf32`` is True, as in the rest of PyTorch.

    Rows with nothing to attend to (every key masked out or outside the window, or S = 0) give
    output 0 and lse = -inf,
    never NaN. SDPA's math backend also gives 0 there, but some of its fused backends give NaN
    (and its CPU kernel reports lse = 0). A query row holding NaN gives a NaN row (output and lse),
    as in SDPA's math backend, on every backend.

    Returns out, or (out, lse) when return_lse=True.

    Gradients: query, key, value and a float attn_mask are differentiable (lse too, when it
    takes part in the loss). The backward recomputes the scores block by block from the saved
    lse (O(L) extra memory); the Triton backward runs without atomics, so repeated backward
    passes are bitwise identical. A float mask that requires grad gets its gradient summed over
    its broadcast dims, through the slower PyTorch tiled backward. Double backward raises.
    torch.func.grad, vjp, jacrev and vmap work; forward-mode AD (torch.func.jvp, jacfwd,
    torch.autograd.forward_ad) raises NotImplementedError: use backend="reference" for it.
    ``fastattn::forward`` and ``fastattn::backward`` are torch.library custom ops, so
    torch.compile traces the call without graph breaks.

    Raises TypeError / ValueError naming the argument for bad input (ranks, batch dims, head
    counts, head dims, dtypes, devices, mask shape or dtype, dropout_p, window_size, softcap,
    alibi_slopes' shape, dtype or device, a generator of another device).
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
        generator=generator,
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


def _wants_lse(return_aux) -> bool:
    if return_aux is None:
        return False
    if not hasattr(return_aux, "lse"):
        raise TypeError(
            f"return_aux must be None or torch.nn.attention.varlen.AuxRequest (an object with an 'lse' "
            f"attribute), got {type(return_aux).__name__}"
        )
    return bool(return_aux.lse)


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor | None,
    max_q: int,
    max_k: int,
    *,
    return_aux=None,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    enable_gqa: bool = False,
    seqused_k: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    num_splits: int | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    backend: str = "auto",
):
    """Attention over a packed batch of variable-length sequences, and KV-cache decoding (contiguous
    or paged). Names, order, defaults and meaning of the arguments up to num_splits are those of
    ``torch.nn.attention.varlen.varlen_attn``; softcap, alibi_slopes, dropout_p, generator and
    backend are fastattn's, as in :func:`fastattn.attention`. Runs on any device.

    Shapes (N sequences; T_q, T_k the packed row counts):
        query (T_q, Hq, E), key (T_k, Hkv, E), value (T_k, Hkv, Ev) -> out (T_q, Hq, Ev), contiguous.
        cu_seq_q, cu_seq_k: int32 (N + 1,) cumulative offsets, starting at 0 and ending at T_q / T_k.
        Sequence n is query rows cu_seq_q[n] : cu_seq_q[n + 1] attending to key rows
        cu_seq_k[n] : cu_seq_k[n + 1] (its "slot"), exactly as fastattn.attention would on those
        rows alone. Sequences may be empty: a sequence with no keys gives its rows 0.
        max_q, max_k: the longest query and key sequence (an upper bound is fine; a smaller value
        raises). They size the Triton launch grid, so passing them avoids reading cu_seq on the host.

    Arguments:
        return_aux: ``torch.nn.attention.varlen.AuxRequest(lse=True)`` (or any object with a true
            ``lse`` attribute) also returns lse (T_q, Hq), float32 (float64 for float64 inputs).
        scale: multiplies Q K^T; default 1/sqrt(E).
        window_size: (left, right), per sequence and aligned to its bottom-right corner: query i of a
            sequence of L queries and S keys sees key j when i + S - L - left <= j <= i + S - L + right
            (-1: unbounded). (-1, 0) is causal (bottom-right, as torch's varlen_attn: a decoding query
            sees its whole cache); (w - 1, 0) a causal window of w keys.
        enable_gqa: allow Hq a multiple of Hkv; query head h reads KV head h // (Hq // Hkv). K and V
            are never repeated.
        seqused_k: int32 (N,): only the first seqused_k[n] keys of sequence n take part (a KV cache
            whose slot is larger than its filled part); the window aligns to seqused_k[n] keys.
        block_table: int32 (N, max_pages), with seqused_k: key and value are then a pool of pages
            (num_pages, page_size, Hkv, E / Ev) in any order; logical key j of sequence n is row
            j % page_size of page block_table[n, j // page_size]. cu_seq_k may then be None (if given,
            seqused_k[n] must fit its slot). Any page_size on the "cpu" and "reference" backends; on
            "triton", multiples of 16.
        num_splits: the split-KV factor of the Triton kernel for decoding: None lets fastattn choose
            (from the GPU's SM count, N * Hq and max_k); 1 disables the split, so each sequence's
            result is bitwise identical whatever else is in the batch. The "cpu" and "reference"
            backends compute the same values without splitting and ignore it.
        softcap, alibi_slopes: as in fastattn.attention (alibi_slopes (Hq,) or (N, Hq)), per
            sequence: ALiBi's distance is |i + S - L - j| with that sequence's lengths.
        dropout_p, generator: as in fastattn.attention, with sequence n as the batch index and
            rows and keys counted within the sequence: sequence n drops what a dense call of
            batch n on its rows alone would, with the same draw.
        backend: "auto", "triton", "cpu" or "reference", as in fastattn.attention.

    Returns out, or (out, lse) when return_aux asks for lse.

    Gradients: query, key and value of packed calls, with every modifier, on every backend (the
    Triton backward is deterministic, as fastattn.attention's). Calls with seqused_k or block_table
    are inference only, as in torch: asking for their gradient raises RuntimeError.

    Raises TypeError / ValueError naming the argument for bad input: cu_seq not int32, not 1-D, not
    starting at 0, decreasing, or not ending at T; max_q / max_k smaller than a real length;
    block_table without seqused_k; a page index outside the pool; seqused_k larger than its slot or
    pages; mismatched heads or head dims. The contents of the index tensors are checked inside the
    op (one host read of them per call), so torch.compile traces the call without a graph break.
    """
    p = canonicalize_varlen(
        query,
        key,
        value,
        cu_seq_q,
        cu_seq_k,
        max_q,
        max_k,
        scale=scale,
        window_size=window_size,
        enable_gqa=enable_gqa,
        seqused_k=seqused_k,
        block_table=block_table,
        num_splits=num_splits,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        dropout_p=dropout_p,
        generator=generator,
    )
    want_lse = _wants_lse(return_aux)
    chosen = choose_backend(backend, p)
    result = run_forward(p, chosen.name) if chosen.custom_op else chosen.run(p)
    out, lse = p.restore(*result)
    return (out, lse) if want_lse else out

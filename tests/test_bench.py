"""The benchmark harness itself (fastattn.bench), on CPU: the FLOP convention, the correctness gate,
OOM / failure / unsupported rows, the writers, and `python -m fastattn.bench --quick` end to end."""

from __future__ import annotations

import csv
import json
import math
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import skip_without_cpu_triton

from fastattn.bench import __main__ as cli
from fastattn.bench import readme, report
from fastattn.bench.gate import GATE_MAX_SCORES, check
from fastattn.bench.progress import Progress
from fastattn.bench.providers import PROVIDERS, Provider, available_providers, default_providers, sdpa_mask
from fastattn.bench.runner import Row, Settings, classify, measure, run_sweep, with_speedups
from fastattn.bench.sweep import Case, attention_flops, sweep_cases, window_scores
from fastattn.bench.timing import Timing, peak_memory_bytes, summarize

TINY = Case("mha", torch.float32, 1, 2, 2, 32, 32, 16, causal=True)
TINY_GQA = Case("gqa", torch.float32, 1, 4, 1, 24, 24, 16, causal=False)
FAST = Settings(device="cpu", modes=("fwd",), providers=(), min_run_time=0.001)
CEILINGS = {"matmul_tflops": {"fp32": 0.1}, "matmul_n": 64, "copy_gbps": 10.0, "copy_bytes": 2**20}


def fake(name: str, forward) -> Provider:
    """A provider whose call is forward(case, q, k, v)."""
    return Provider(
        name, f"test provider {name}", ("cpu",), lambda case, device: lambda q, k, v: forward(case, q, k, v)
    )


def sdpa(case: Case, q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal, enable_gqa=case.gqa)


def raising(exc: BaseException) -> Provider:
    def forward(case, q, k, v):
        raise exc

    return fake(type(exc).__name__, forward)


# ---- FLOPs ---------------------------------------------------------------------------------------


def test_flops_forward_is_4BHLSD_halved_when_causal():
    assert attention_flops(2, 4, 128, 256, 64, False, "fwd") == 4 * 2 * 4 * 128 * 256 * 64
    assert attention_flops(2, 4, 128, 256, 64, True, "fwd") == 2 * 2 * 4 * 128 * 256 * 64


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flops_backward_is_2_5x_and_fwd_bwd_3_5x_the_forward(causal):
    fwd = attention_flops(1, 8, 512, 512, 128, causal, "fwd")
    assert attention_flops(1, 8, 512, 512, 128, causal, "bwd") == 2.5 * fwd
    assert attention_flops(1, 8, 512, 512, 128, causal, "fwd+bwd") == 3.5 * fwd


def test_flops_count_query_heads_and_row_tflops_uses_them():
    case = Case("gqa", torch.bfloat16, 2, 32, 8, 1024, 1024, 128, causal=True)
    assert case.flops("fwd") == 4 * 2 * 32 * 1024 * 1024 * 128 / 2
    row = Row(case, "bwd", "p", "ok", timing=Timing(1e-3, 1e-3, 1e-3, 1))
    assert row.tflops == pytest.approx(2.5 * case.flops("fwd") / 1e-3 / 1e12)


# ---- sweep -------------------------------------------------------------------------------------------


def test_default_cuda_sweep_has_the_papers_shapes_gqa_and_long_context():
    cases = sweep_cases("cuda")
    mha = [c for c in cases if c.family == "mha"]
    assert {c.B * c.L for c in mha} == {16384} and {c.Hq * c.D for c in mha} == {2048}
    assert {c.D for c in mha} == {64, 128, 256} and {c.L for c in mha} == {512, 1024, 2048, 4096, 8192, 16384}
    assert {c.causal for c in mha} == {False, True} and {c.dtype for c in mha} == {torch.bfloat16, torch.float16}
    assert {(c.Hq, c.Hkv) for c in cases if c.family == "gqa"} == {(32, 8)}
    assert min(c.L for c in cases if c.family == "long") >= 32768


def test_axis_overrides_replace_every_family_and_seqlens_drop_long_context():
    cases = sweep_cases("cpu", dtypes=(torch.bfloat16,), seqlens=(64, 128), head_dims=(32,), causal=(True,))
    assert cases and {c.family for c in cases} == {"mha", "gqa", "window", "softcap", "alibi"}
    assert {(c.dtype, c.L, c.D, c.causal) for c in cases} == {(torch.bfloat16, L, 32, True) for L in (64, 128)}


def test_decode_family_is_one_query_against_a_cache_timed_forward_only():
    cuda = sweep_cases("cuda", families=("decode",))
    assert {(c.B, c.L, c.S) for c in cuda} == {(B, 1, S) for B in (1, 16, 64) for S in (1024, 16384, 131072)}
    assert all(c.inference and (c.Hq, c.Hkv, c.D) == (32, 8, 128) and not c.causal for c in cuda)
    case = sweep_cases("cpu", quick=True, families=("decode",))[0]
    assert case.L == 1 and case.kv_bytes == 2 * case.B * case.Hkv * case.S * case.D * 4
    row = measure(fake("sdpa", sdpa), case, "bwd", FAST)
    assert row.status == "skipped" and "inference only" in row.reason
    row = measure(fake("sdpa", sdpa), case, "fwd", FAST)
    rec = report.record(row, report.metadata(FAST, "python -m fastattn.bench --test", CEILINGS))
    assert rec["kv_gbps"] == pytest.approx(case.kv_bytes / row.timing.median_s / 1e9)
    assert rec["pct_of_copy"] == pytest.approx(100 * rec["kv_gbps"] / CEILINGS["copy_gbps"])


def test_modifier_families_follow_the_models():
    cuda = {c.family: c for c in sweep_cases("cuda")}
    assert cuda["window"].window == 4096 and {c.L for c in sweep_cases("cuda", families=("window",))} == {16384, 32768}
    assert cuda["softcap"].softcap == 50.0 and cuda["alibi"].alibi
    cpu = sweep_cases("cpu", families=("window",))
    assert {(c.L, c.window) for c in cpu} == {(4096, 512), (16384, 512)}
    assert "window512" in cpu[0].label and cpu[0].attention_kwargs("cpu") == {"window_size": (511, 0)}
    with pytest.raises(ValueError, match="families"):
        sweep_cases("cpu", families=("nope",))


def test_window_flops_count_the_band_exactly():
    assert window_scores(4, 4, 2) == 1 + 2 + 2 + 2
    assert window_scores(3, 5, 10) == 3 + 4 + 5  # wider than S: bottom-right causal
    assert window_scores(5, 2, 1) == 2  # L > S: the first rows see no key
    flops = attention_flops(1, 2, 8, 8, 16, True, "fwd", window=3)
    assert flops == 4 * 2 * 16 * window_scores(8, 8, 3)


@pytest.mark.parametrize(
    "case",
    [
        Case("window", torch.float32, 1, 2, 1, 40, 40, 16, True, window=9),
        Case("alibi", torch.float32, 2, 2, 2, 24, 24, 16, True, alibi=True),
        Case("mix", torch.float32, 1, 2, 2, 30, 30, 16, True, window=7, alibi=True),
    ],
    ids=["window", "alibi", "window-alibi"],
)
def test_sdpa_mask_expresses_the_modifiers(case):
    """The mask SDPA gets for a window or ALiBi gives fastattn's answer, and its rows pass the gate."""
    q, k, v = case.inputs("cpu", 0)
    want = PROVIDERS["fastattn"].make(case, "cpu")(q, k, v)
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask(case, "cpu"), enable_gqa=case.gqa)
    torch.testing.assert_close(got, want)
    for name in ("fastattn", "sdpa", "reference"):
        row = measure(PROVIDERS[name], case, "bwd", FAST)
        assert row.status == "ok", row
    assert "materialised" in measure(PROVIDERS["sdpa"], case, "fwd", FAST).note


def test_sdpa_has_no_softcap_row():
    case = Case("softcap", torch.float32, 1, 2, 2, 32, 32, 16, True, softcap=5.0)
    row = measure(PROVIDERS["sdpa"], case, "fwd", FAST)
    assert row.status == "unsupported" and "softcap" in row.reason
    assert measure(PROVIDERS["fastattn"], case, "fwd", FAST).status == "ok"


def test_reduced_case_keeps_what_selects_the_kernel():
    case = Case("gqa", torch.bfloat16, 8, 32, 8, 4096, 4096, 128, causal=True)
    small = case.reduced(2**22)
    assert small.scores <= 2**22
    assert (small.D, small.dtype, small.causal, small.Hq // small.Hkv) == (128, torch.bfloat16, True, 4)
    assert TINY.reduced(2**22) is TINY


# ---- the correctness gate ------------------------------------------------------------------------


def test_gate_rejects_a_wrong_provider_with_its_reason_and_no_time():
    wrong = fake("one-percent-off", lambda case, q, k, v: sdpa(case, q, k, v) * 1.01)
    row = measure(wrong, TINY, "fwd", FAST)
    print(row)
    assert row.status == "wrong"
    assert row.timing is None and row.tflops is None and row.peak_bytes is None
    assert "out: max|err|" in row.reason and "bound" in row.reason
    assert row.gate.max_err > row.gate.bound


def test_gate_rejects_nan_and_wrong_shapes():
    nan = fake("nan", lambda case, q, k, v: sdpa(case, q, k, v).masked_fill(torch.rand_like(q) < 0.01, math.nan))
    assert check(lambda c: nan.make(c, "cpu"), TINY, "fwd", "cpu").max_err == math.inf
    assert measure(nan, TINY, "fwd", FAST).status == "wrong"
    short = fake("short", lambda case, q, k, v: sdpa(case, q, k, v)[..., :-1, :])
    row = measure(short, TINY, "fwd", FAST)
    assert row.status == "wrong" and "shape" in row.reason


def test_gate_checks_gradients_in_backward_modes():
    def bad_grad(case, q, k, v):  # right output, but dq is twice what it should be
        return sdpa(case, q + q - q.detach(), k, v)

    provider = fake("bad-grad", bad_grad)
    assert measure(provider, TINY, "fwd", FAST).status == "ok"
    row = measure(provider, TINY, "bwd", FAST)
    assert row.status == "wrong" and row.reason.startswith("dq:")


def test_a_correct_provider_is_timed_with_its_error_within_bound():
    row = measure(fake("sdpa-copy", sdpa), TINY_GQA, "fwd", FAST)
    assert row.status == "ok" and row.gate.passed and row.gate.max_err <= row.gate.bound
    assert row.timing.p20_s <= row.timing.median_s <= row.timing.p80_s and row.timing.samples >= 3
    assert row.peak_bytes >= TINY_GQA.B * TINY_GQA.Hq * TINY_GQA.L * TINY_GQA.D * 4  # at least the output
    assert row.gate.checked_on == "full"


def test_gate_runs_on_a_reduced_copy_of_a_big_case(monkeypatch):
    monkeypatch.setitem(GATE_MAX_SCORES, "cpu", 2**12)
    case = Case("mha", torch.float32, 2, 4, 4, 256, 256, 16, causal=True)
    result = check(lambda c: PROVIDERS["sdpa"].make(c, "cpu"), case, "fwd", "cpu")
    assert result.passed and result.checked_on == case.reduced(2**12).label != case.label


# ---- OOM, failure and unsupported rows -----------------------------------------------------------


def test_out_of_memory_is_a_row_marked_oom_not_a_crash():
    provider = raising(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB"))
    rows = run_sweep([TINY], Settings("cpu", ("fwd", "bwd"), (provider, fake("sdpa", sdpa)), min_run_time=0.001))
    assert [(r.provider, r.mode, r.status) for r in rows] == [
        ("OutOfMemoryError", "fwd", "OOM"),
        ("sdpa", "fwd", "ok"),
        ("OutOfMemoryError", "bwd", "OOM"),
        ("sdpa", "bwd", "ok"),
    ]
    assert rows[0].timing is None and "Tried to allocate" in rows[0].reason
    assert classify(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB"))[0] == "OOM"


def test_a_failing_provider_is_an_error_row_with_its_reason():
    row = measure(raising(RuntimeError("boom")), TINY, "fwd", FAST)
    assert (row.status, row.reason, row.timing) == ("error", "RuntimeError: boom", None)


def test_sdpa_backend_that_cannot_run_the_case_is_unsupported_with_the_why():
    row = measure(PROVIDERS["sdpa-efficient"], TINY, "fwd", FAST)  # no memory-efficient kernel on CPU
    assert row.status == "unsupported" and "No viable backend" in row.reason
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("Flash attention requires head_dim <= 256", UserWarning, stacklevel=1)
    status, reason = classify(RuntimeError("No available kernel. Aborting execution."), caught)
    assert status == "unsupported" and "head_dim <= 256" in reason


def forward_only(case: Case, q, k, v):
    """Like fastattn 0.1: refuses inputs that require grad."""
    if torch.is_grad_enabled() and q.requires_grad:
        raise NotImplementedError("no backward pass yet")
    return sdpa(case, q, k, v)


def test_backward_rows_say_unsupported_until_the_forward_is_differentiable():
    rows = run_sweep(
        [TINY], Settings("cpu", ("fwd", "bwd", "fwd+bwd"), (fake("fwd-only", forward_only),), min_run_time=0.001)
    )
    assert [(r.mode, r.status) for r in rows] == [("fwd", "ok"), ("bwd", "unsupported"), ("fwd+bwd", "unsupported")]
    assert rows[1].reason == "NotImplementedError: no backward pass yet" and rows[1].timing is None
    # A differentiable forward gets checked (gradients too) and timed rows in the same modes.
    for provider in (PROVIDERS["fastattn"], PROVIDERS["reference"]):
        for mode in ("bwd", "fwd+bwd"):
            row = measure(provider, TINY_GQA, mode, FAST)
            assert row.status == "ok" and row.timing is not None, row


def test_default_skips_apply_only_when_the_provider_was_not_named():
    skipped = measure(PROVIDERS["fastattn-triton"], TINY, "fwd", FAST)
    assert (skipped.status, skipped.reason) == ("skipped", "interpreter (no GPU)")
    assert "flex" not in default_providers("cpu") or PROVIDERS["flex"].default_skip["cpu"]
    skip_without_cpu_triton()  # the named provider runs the kernel through the interpreter
    named = measure(
        PROVIDERS["fastattn-triton"],
        TINY,
        "fwd",
        Settings("cpu", ("fwd",), (), explicit_providers=True, min_run_time=0.001),
    )
    assert named.status == "ok", named.reason


def test_materialising_providers_are_skipped_over_the_host_budget():
    settings = Settings("cpu", ("fwd",), (), min_run_time=0.001, host_memory_bytes=1024)
    row = measure(PROVIDERS["reference"], TINY, "fwd", settings)
    assert row.status == "skipped" and "GiB" in row.reason
    assert measure(PROVIDERS["sdpa-flash"], TINY, "fwd", settings).status == "ok"


def test_cpu_providers_and_defaults():
    assert available_providers("cpu")[:3] == ["fastattn", "fastattn-triton", "sdpa"]
    assert "sdpa-cudnn" not in available_providers("cpu") and "sdpa-cudnn" in available_providers("cuda")
    assert "fastattn-triton" not in default_providers("cuda")


# ---- speed-ups, timing, memory -------------------------------------------------------------------


def test_speedups_against_sdpa_default_and_best_backend():
    t = lambda s: Timing(s, s, s, 3)
    rows = [
        Row(TINY, "fwd", "fastattn", "ok", timing=t(2.0)),
        Row(TINY, "fwd", "sdpa", "ok", timing=t(3.0)),
        Row(TINY, "fwd", "sdpa-flash", "ok", timing=t(1.0)),
        Row(TINY, "fwd", "sdpa-math", "wrong"),
        Row(TINY, "fwd", "reference", "ok", timing=t(0.5)),  # not SDPA: never the "best SDPA"
    ]
    mine = with_speedups(rows)[0]
    assert (mine.speedup_vs_sdpa, mine.speedup_vs_best_sdpa, mine.best_sdpa) == (1.5, 0.5, "sdpa-flash")


def test_summarize_median_and_percentiles():
    t = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median_s, t.samples) == (3.0, 5) and 1.0 < t.p20_s < t.median_s < t.p80_s < 5.0


def test_cpu_peak_memory_sees_an_allocation():
    peak = peak_memory_bytes(lambda: torch.empty(2**20, dtype=torch.float32).fill_(1.0), "cpu")
    assert peak is None or peak >= 4 * 2**20


def test_progress_bar_prints_tenths_when_not_a_terminal(capsys):
    progress = Progress(100)
    for i in range(100):
        progress.step(f"step {i}")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10 and lines[-1].endswith("step 90")


# ---- writers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept():
    """(meta, records) of a tiny sweep with a good, a forward-only, a wrong and an OOM provider."""
    providers = (
        fake("sdpa", sdpa),
        fake("fastattn", forward_only),
        fake("wrong", lambda case, q, k, v: sdpa(case, q, k, v) + 0.1),
        raising(torch.OutOfMemoryError("out of memory")),
    )
    settings = Settings("cpu", ("fwd", "bwd"), providers, min_run_time=0.001)
    cases = [TINY, Case("mha", torch.float32, 1, 2, 2, 64, 64, 16, causal=True)]
    rows = run_sweep(cases, settings)
    meta = report.metadata(settings, "python -m fastattn.bench --test", CEILINGS)
    meta["loadavg_end"] = [0.0, 0.0, 0.0]
    return meta, [report.record(r, meta) for r in rows]


def test_csv_and_json_rows_carry_the_metadata(swept, tmp_path):
    meta, records = swept
    paths = report.write_outputs(tmp_path, meta, records)
    assert {p.name for p in paths} >= {"results.csv", "results.json", "results.md"}
    with open(tmp_path / "results.csv") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == report.FIELDS
        rows = list(reader)
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(rows) == len(data["rows"]) == 2 * 2 * 4  # cases x modes x providers
    for row in (*rows, *data["rows"]):
        for key in ("date", "command", "device", "device_name", "torch", "triton", "fastattn", "python"):
            assert row[key], key
        assert row["torch"] == torch.__version__ and row["command"] == "python -m fastattn.bench --test"
    assert data["meta"]["ceilings"] == CEILINGS and len(data["meta"]["loadavg_start"]) == 3
    by = {(r["provider"], r["case"], r["mode"]): r for r in data["rows"]}
    good, wrong, oom = (by[(p, TINY.label, "fwd")] for p in ("fastattn", "wrong", "OutOfMemoryError"))
    assert good["status"] == "ok" and good["median_ms"] > 0 and good["tflops"] > 0 and good["speedup_vs_sdpa"] > 0
    assert wrong["status"] == "wrong" and wrong["median_ms"] is None and wrong["max_err"] > wrong["err_bound"]
    assert oom["status"] == "OOM" and oom["median_ms"] is None
    md = (tmp_path / "results.md").read_text()
    assert "| fwd | wrong | wrong | – |" in md and "## Summary: fastattn vs SDPA" in md
    summary = md.split("## Summary: fastattn vs SDPA")[1]
    assert f"| fwd | mha {TINY.label} |" in summary
    assert "- bwd: no fastattn time in any case (unsupported: NotImplementedError: no backward pass yet)" in summary
    assert "- fwd: fastattn vs SDPA's own choice over 2 cases: geometric mean" in summary


def test_png_plots_are_written(swept, tmp_path):
    pytest.importorskip("matplotlib")
    meta, records = swept
    paths = report.write_plots(tmp_path, records)
    assert {p.name for p in paths} == {"tflops_fwd.png", "tflops_bwd.png", "speedup.png"}
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_plots_are_skipped_cleanly_without_matplotlib(swept, tmp_path, monkeypatch, capsys):
    meta, records = swept
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    paths = report.write_outputs(tmp_path, meta, records)
    assert [p.name for p in paths] == ["results.csv", "results.json", "results.md"]
    assert not list(tmp_path.glob("*.png")) and "matplotlib is not installed" in capsys.readouterr().err


# ---- the command ---------------------------------------------------------------------------------


def test_cli_quick_end_to_end(tmp_path, capsys):
    argv = ["--quick", "--seqlens", "32", "--head-dims", "16", "--causal", "yes", "--modes", "fwd,bwd"]
    argv += ["--providers", "fastattn,sdpa", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    print(out)
    assert "## mha · fp32" in out and "## gqa · fp32" in out and "## Summary: fastattn vs SDPA" in out
    assert "## window · fp32" in out and "window64" in out
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["command"] == "python -m fastattn.bench " + " ".join(argv)
    rows = data["rows"]
    assert len(rows) == 3 * 2 * 2  # cases (mha, gqa, window) x modes x providers
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in rows), [r for r in rows if r["status"] != "ok"]
    assert all(r["speedup_vs_sdpa"] for r in rows if r["provider"] == "fastattn")
    assert (tmp_path / "results.md").read_text().startswith("# fastattn benchmark")

    section = readme.render(tmp_path, tmp_path.parent)
    assert f"`{data['meta']['command']}`" in section and "| fwd | mha fp32" in section and "| bwd | gqa fp32" in section
    doc = tmp_path / "README.md"
    doc.write_text(f"intro\n{readme.BEGIN}\nold\n{readme.END}\noutro\n")
    assert readme.main([str(tmp_path), "--readme", str(doc)]) == 0
    text = doc.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith(f"{readme.END}\noutro\n")
    assert "(results.md)" in text


@pytest.mark.parametrize(
    "argv", [["--providers", "nonsense"], ["--modes", "sideways"], ["--dtype", "int8"], ["--seqlens", "x"]]
)
def test_cli_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2

"""fastattn.fused.precompile and replay: a GPU's Triton kernels planned and compiled without a GPU.

The compile halves run in subprocesses with TRITON_INTERPRET=0 (compiling needs triton's compiled
flavour); one of them has torch blocked, as on a machine with only the GPU's triton."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastattn import configs
from fastattn.fused import plumbing as pl
from fastattn.fused import precompile
from fastattn.problem import canonicalize

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.aot
REPLAY = ROOT / "fastattn" / "fused" / "replay.py"
H200 = pl.Target((9, 0))


def _meta(*shape, dtype=torch.float16):
    return torch.empty(shape, device="meta", dtype=dtype)


def _problem(dtype=torch.float16, L=1000, causal=True):
    return canonicalize(_meta(2, 4, L, 64, dtype=dtype), _meta(2, 4, L, 64, dtype=dtype),
                        _meta(2, 4, L, 64, dtype=dtype), is_causal=causal)  # fmt: skip


def test_recording_plans_a_gpu_call_on_meta_tensors_without_running_it():
    launches = precompile.plan_launches(_problem(), True, H200)
    assert [launch.kernel for launch in launches] == [
        "attention_forward_kernel",
        "attention_backward_preprocess_kernel",
        "attention_backward_dkdv_kernel",
        "attention_backward_dq_kernel",
    ]
    # The GPU's config, not the interpreter's small tile; outside recording, the CPU's target.
    fwd = configs.forward_config(64, 64, torch.float16, (9, 0))
    assert (launches[0].tile.block_m, launches[0].tile.block_n) == (fwd.block_m, fwd.block_n)
    assert launches[0].constexprs["IS_CAUSAL"] is True
    assert pl.Target.of(_problem()).capability is None
    with pl.recording(H200) as recorded:
        assert pl.Target.of(_problem()) == H200
        pl.run(launches[:1], torch.device("meta"))
    assert recorded == launches[:1]


def test_the_manifest_covers_the_gpu_checks_benchmark_and_info_problems():
    manifest = precompile.build_manifest(["bench", "info"], 90)
    whats = {e["what"] for e in manifest["launches"]}
    kernels = {e["kernel"] for e in manifest["launches"]}
    assert kernels == {"attention_forward_kernel", "attention_backward_preprocess_kernel",
                       "attention_backward_dkdv_kernel", "attention_backward_dq_kernel"}  # fmt: skip
    assert any(w.startswith("bench bf16") for w in whats) and any(w.startswith("bench fp16") for w in whats)
    assert any(w.startswith("info") for w in whats)
    assert json.loads(json.dumps(manifest)) == manifest  # plain JSON data
    entry = manifest["launches"][0]
    assert entry["args"]["Q"] == {"tensor": "torch.bfloat16", "offset": 0}


def _run(args, env_extra, **kw):
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT), **env_extra)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, **kw)


def test_a_torch_free_replay_finds_what_the_launch_path_compiled_and_a_second_process_compiles_nothing(tmp_path):
    """Compile the launches in a torch process through triton's launch path (fused.aot), then
    replay their manifest in processes without torch (stand-in tensors, the kernels imported
    without fastattn's package code): every kernel is found in the cache, none compiled. fp16 and
    bf16 launches alternate (stand-in dtypes must not be mistaken for one another)."""
    cache, manifest = tmp_path / "cache", tmp_path / "manifest.json"
    script = textwrap.dedent(
        f"""
        import json, torch
        from triton import knobs
        from fastattn.fused import aot, plumbing as pl, precompile
        from fastattn.problem import canonicalize

        def meta(dtype):
            return torch.empty(2, 4, 1000, 64, device="meta", dtype=dtype)

        target = pl.Target((9, 0))
        launches = precompile.plan_launches(canonicalize(*(meta(torch.float16) for _ in "qkv"), is_causal=True), True, target)
        launches.insert(1, precompile.plan_launches(canonicalize(*(meta(torch.bfloat16) for _ in "qkv")), False, target)[0])
        entries = [precompile.manifest_entry(launch, "test") for launch in launches]
        open({str(manifest)!r}, "w").write(json.dumps(dict(arch=90, launches=entries)))
        events = []
        knobs.compilation.listener = lambda **e: events.append(e["cache_hit"])
        for launch in launches:
            aot.compile_launch(launch, 90)
        print(json.dumps(dict(compiled=events.count(False), cached=events.count(True))))
        """
    )
    env = {"TRITON_CACHE_DIR": str(cache)}
    first = _run(["-c", script], env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads(first.stdout.splitlines()[-1]) == {"compiled": 5, "cached": 0}

    no_torch = textwrap.dedent(
        f"""
        import runpy, sys

        class NoTorch:  # import torch raises ImportError, as where torch is not installed
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torch":
                    raise ImportError("no torch here")

        sys.meta_path.insert(0, NoTorch())
        sys.argv = [{str(REPLAY)!r}, {str(manifest)!r}]
        runpy.run_path({str(REPLAY)!r}, run_name="__main__")
        """
    )
    for _ in range(2):
        proc = _run(["-c", no_torch], env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        counts = json.loads(proc.stdout.splitlines()[-1])
        assert (counts["launches"], counts["kernels"], counts["compiled"], counts["cached"]) == (5, 5, 0, 5)
        assert counts["cache_dir"] == str(cache)


def test_the_command_writes_the_manifest_and_the_counts(tmp_path, monkeypatch):
    """The command line's plumbing, with the compile half stubbed (the test above compiles)."""
    seen = {}

    def fake_compile(path, cache, python, jobs):
        seen.update(path=path, cache=cache, python=python, jobs=jobs)
        return {"launches": len(json.loads(path.read_text())["launches"]), "compiled": 0, "cached": 0}

    monkeypatch.setattr(precompile, "compile_manifest", fake_compile)
    assert precompile.main(["--cache", str(tmp_path), "--workloads", "info", "--python", "py3.12", "--jobs", "3"]) == 0
    counts = json.loads((tmp_path / "precompile-90.json").read_text())
    assert counts["launches"] == len(json.loads((tmp_path / "precompile-90.manifest.json").read_text())["launches"]) > 0
    assert (seen["python"], seen["jobs"], seen["cache"]) == ("py3.12", 3, tmp_path)


def test_an_unknown_workload_is_refused(tmp_path, capsys):
    try:
        precompile.main(["--cache", str(tmp_path), "--workloads", "bench,tests"])
    except SystemExit as e:
        assert e.code == 2
    assert "unknown ['tests']" in capsys.readouterr().err

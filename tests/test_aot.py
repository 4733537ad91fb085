"""Ahead-of-time compilation of the launchers' plans for sm_80 and sm_90, with no GPU: what the
interpreter cannot see (shared memory, registers, spills, tensor-core instructions).

Compilation needs triton's compiled flavour, so it runs in a subprocess with TRITON_INTERPRET=0
(this process may have the interpreter on). Kernels compile as launched (fused.aot.compile_launch:
triton's own specialisation). The default run covers, for float16 and float32 both with TF32 off
("fp32": IEEE matmuls, torch's default) and on ("tf32"), every padded head dim with E == Ev of the
forward in the main variants, the backward kernels at head dims 64, 128, 256 in the main
variants, the forward in the score modifiers', packed and decode variants; fp16 and IEEE fp32
for the backward in those and the dropout and 64-bit-offset variants (TF32 there: the slow run
and benchmarks/results/aot); the main tables for sm_80 and sm_90, the other variants for sm_90
(SM90); `--runslow` adds bfloat16, every (E, Ev) pair and every variant on both archs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.aot


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=3000)


def _compile(*args: str) -> list[dict]:
    """fused.aot's JSON rows for `args`; FASTATTN_AOT_ARCHS (e.g. "90") narrows the archs of the
    calls that do not name theirs (CI's triton 3.6 stack: the lent H200's sm_90)."""
    if "--archs" not in args and os.environ.get("FASTATTN_AOT_ARCHS"):
        args = (*args, "--archs", os.environ["FASTATTN_AOT_ARCHS"])
    proc = _run(["-m", "fastattn.fused.aot", "--json", *args])
    if proc.returncode not in (0, 1):
        pytest.fail(f"fastattn.fused.aot failed:\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, proc.stderr[-2000:]
    for r in rows:
        print(
            f"sm_{r['arch']} {r['dtype']} E={r['head_dim']} Ev={r['head_dim_v']} {r['variant']}: "
            f"{r['block_m']}x{r['block_n']} w{r['num_warps']} s{r['num_stages']} regs={r['registers']} "
            f"spills={r['spill_stores']}/{r['spill_loads']} stack={r['stack_bytes']} "
            f"shared={r['shared_bytes']}/{r['shared_limit']} hgmma={r['hgmma']}"
        )
    over = [r for r in rows if r["shared_bytes"] > r["shared_limit"]]
    assert not over, f"{len(over)} configurations need more shared memory than the GPU has: {over[:3]}"
    return rows


TRITON = tuple(int(x) for x in version("triton").split(".")[:2])
# The variant families beyond the main tables compile for sm_90 (the lent H200's) in the default
# run, sm_80 too under --runslow (every variant, both archs) or with FASTATTN_AOT_ARCHS set: each
# arch costs minutes of compiles on a cold cache.
SM90 = () if os.environ.get("FASTATTN_AOT_ARCHS") else ("--archs", "90")


def required_spill_free(r: dict) -> bool:
    """Every compiled kernel must be spill-free but these, which are reported (configs.py says
    why): the backward kernels at head dim 256, and the IEEE fp32 backward kernels but at 128 (no
    candidate tile compiled spill-free in every variant there: fused.aot --search). The tables are
    derived with triton 3.9; with an older triton (3.6: the lent H200 machine's) its sm_90 16-bit
    kernels below head dim 256 are required spill-free (their tiles were searched with 3.6 too)
    and the rest is reported (benchmarks/results/aot/as_launched_triton-3.6.md lists what spills
    there: no forward tile tried at 256 compiled spill-free in every variant with 3.6)."""
    backward = r["variant"].startswith(("dkdv", "dq"))
    if backward and (r["head_dim"] >= 256 or (r["dtype"] == "fp32" and r["head_dim"] != 128)):
        return False
    return TRITON >= (3, 9) or (r["arch"] == 90 and r["dtype"] in ("fp16", "bf16") and r["head_dim"] < 256)


def _check_spill_free(rows: list[dict]) -> None:
    spilling = [r for r in rows if (r["spill_stores"] or r["spill_loads"]) and required_spill_free(r)]
    assert not spilling, f"{len(spilling)} configurations spill registers to local memory: {spilling[:3]}"
    # On sm_90 the 16-bit kernels with tiles must use Hopper's warpgroup MMA (HGMMA), not the sm_80 path.
    # Decode tiles have 16 rows, fewer than the warpgroup MMA takes (configs.decode_tile).
    tiled = [r for r in rows if not r["variant"].startswith(("preprocess", "combine")) and r["block_m"] >= 64]
    no_wgmma = [r for r in tiled if r["arch"] == 90 and r["dtype"] in ("fp16", "bf16") and not r["hgmma"]]
    assert not no_wgmma, f"sm_90 16-bit kernels without HGMMA: {no_wgmma[:3]}"


FORWARD_VARIANTS = "plain,causal,ragged,causal-ragged,bool-mask,padded-dims,bool-mask-ragged,float-mask-causal"
# The slow runs: every variant but large-offsets (reported by its own test).
SPILL_FREE_VARIANTS = (
    FORWARD_VARIANTS
    + ",window,window-ragged,window-bool-mask,softcap-causal,alibi-causal,softcap-alibi-window"
    + ",dropout,dropout-causal-ragged,dropout-bool-mask,dropout-softcap-alibi-window"
)


def test_every_dispatched_forward_config_compiles():
    _check_spill_free(_compile("--kernels", "forward", "--dtypes", "fp16,fp32,tf32", "--variants", FORWARD_VARIANTS))


def test_backward_kernels_compile_for_sm80_sm90():
    """Every built-in backward config (fp16, fp32, tf32; head dims 64, 128, 256) in the main
    variants: shared memory fits; no spills but where :func:`required_spill_free` reports them."""
    rows = _compile(
        "--kernels", "dkdv,dq,preprocess", "--dtypes", "fp16,fp32,tf32", "--head-dims", "64,128,256",
        "--variants", "plain,causal-ragged,bool-mask-ragged,float-mask-causal",
    )  # fmt: skip
    _check_spill_free(rows)


MODIFIER_VARIANTS = "window-ragged,window-bool-mask,softcap-alibi-window"


def test_modifier_variants_compile_spill_free():
    """The score modifiers' kernels (a window's gap-skipping ranges with ragged lengths, a window
    with a mask's block lists, softcap + ALiBi + window at once), forward at every bucket's head
    dim (fp16, fp32, tf32) and backward at 64 and 128 (fp16, fp32): no spills (but
    required_spill_free), shared memory fits."""
    forward = _compile(
        "--kernels", "forward", "--dtypes", "fp16,fp32,tf32", "--head-dims", "64,128,256", "--variants", MODIFIER_VARIANTS,
        *SM90,
    )  # fmt: skip
    backward = _compile(
        "--kernels", "dkdv,dq", "--dtypes", "fp16,fp32", "--head-dims", "64,128", "--variants", MODIFIER_VARIANTS, *SM90
    )  # fmt: skip
    _check_spill_free(forward + backward)


VARLEN_VARIANTS = "varlen-causal,varlen-softcap-alibi-window"
DECODE_VARIANTS = "split-decode,paged-split-decode,dense-split-decode"


def test_varlen_and_decode_variants_compile_spill_free():
    """Packed calls (the forward and both backward kernels, per sequence), split-KV decoding over
    contiguous and paged caches (the forward with SPLIT_KV and PAGED, and the combine kernel), fp16
    and fp32, head dims 64, 128, 256 (backward: 64, 128): no spills, shared memory fits."""
    forward = _compile(
        "--kernels", "forward,combine", "--dtypes", "fp16,fp32,tf32", "--head-dims", "64,128,256",
        "--variants", f"{VARLEN_VARIANTS},{DECODE_VARIANTS}", *SM90,
    )  # fmt: skip
    assert {r["variant"] for r in forward} >= {"split-decode", "combine:paged-split-decode", "varlen-causal"}
    backward = _compile(
        "--kernels", "dkdv,dq", "--dtypes", "fp16,fp32", "--head-dims", "64,128", "--variants", VARLEN_VARIANTS, *SM90
    )  # fmt: skip
    _check_spill_free(forward + backward)


DROPOUT_VARIANTS = "dropout-causal-ragged,dropout-softcap-alibi-window,varlen-dropout"


def test_dropout_variants_compile_spill_free():
    """The dropout kernels (a Philox4x32-10 call per score: the forward, dK/dV and dQ), causal and
    ragged, with softcap + ALiBi + window, packed, on sm_90 (fp16, fp32; head dims 64, 128): no
    spills, shared memory fits. sm_80 and the other dropout variants: the slow runs and
    benchmarks/results/aot/dropout_triton-*.md."""
    rows = _compile(
        "--kernels", "forward,dkdv,dq", "--archs", "90", "--dtypes", "fp16,fp32", "--head-dims", "64,128",
        "--variants", DROPOUT_VARIANTS,
    )  # fmt: skip
    _check_spill_free(rows)


def test_large_offsets_variants_compile():
    """The 64-bit-offset kernels (LARGE_OFFSETS=True, planned for a KV view whose rows lie 2**21
    elements apart) compile and fit for every kernel; their spills are reported, not required to be 0
    (the tiles are chosen for the 32-bit path, which nearly every call takes)."""
    rows = _compile("--dtypes", "fp16,fp32", "--head-dims", "128", "--variants", "large-offsets", *SM90)
    assert {r["variant"].split(":")[0] for r in rows} >= {"large-offsets", "dkdv", "dq", "preprocess"}


def test_the_aot_compile_specialises_as_a_launch_does():
    """The AOT compile goes through triton's own launch path: a unit stride becomes a constant,
    integers divisible by 16 and 16-byte aligned pointers are marked, other integers are not;
    fp32 without TF32 compiles IEEE matmuls, with TF32 TF32 ones; a launch the kernel does not
    take is refused."""
    script = textwrap.dedent(
        """
        import json
        import torch
        from fastattn.fused import aot

        launch = aot.plan("forward", "ragged", "fp16", 64, 64, 90)  # L = S = 1000: 1000 % 16 = 8
        compiled = aot.compile_launch(launch, 90)
        names = [p.name for p in launch.jit_function().params]
        marked = {names[path[0]] for path, attr in compiled.src.attrs.items() if attr}
        constants = {names[path[0]]: v for path, v in compiled.src.constants.items()}
        print(json.dumps(dict(
            unit_stride=constants.get("stride_qk"), q_marked="Q" in marked, row_stride_marked="stride_qm" in marked,
            seqlen=launch.args["L"], seqlen_marked="L" in marked,
            precisions=[aot.plan("forward", "plain", p, 64, 64, 90).constexprs["INPUT_PRECISION"] for p in ("fp32", "tf32")],
        )))
        launch.args["not_an_argument"] = 1
        try:
            aot.compile_launch(launch, 90)
        except TypeError as e:
            print("refused:", e)
        """
    )
    proc = _run(["-c", script])
    lines = proc.stdout.splitlines()
    assert lines and lines[0].startswith("{"), proc.stdout + proc.stderr[-3000:]
    got = json.loads(lines[0])
    assert got == dict(
        unit_stride=1, q_marked=True, row_stride_marked=True, seqlen=1000, seqlen_marked=False,
        precisions=["ieee", "tf32"],
    )  # fmt: skip
    assert "refused: attention_forward_kernel: the launch passes arguments the kernel does not take" in proc.stdout


@pytest.mark.slow
def test_every_dispatched_config_compiles_all_pairs_and_variants():
    _check_spill_free(_compile("--kernels", "forward", "--all-pairs", "--variants", SPILL_FREE_VARIANTS))


@pytest.mark.slow
def test_backward_kernels_compile_all_variants():
    rows = _compile("--kernels", "dkdv,dq,preprocess", "--variants", SPILL_FREE_VARIANTS)
    _check_spill_free(rows)

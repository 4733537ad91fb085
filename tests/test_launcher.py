"""The Triton launchers' host logic: mask block lists, 64-bit offsets, batch chunking, configs.

Kernel runs go through Triton's interpreter on CPU (conftest sets TRITON_INTERPRET=1 without a
GPU) or the compiled kernel on CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import check_against_reference, make_mask, make_qkv

import fastattn
from fastattn import configs
from fastattn.configs import ForwardConfig
from fastattn.dispatch import unsupported_reasons
from fastattn.features import Features
from fastattn.fused import block_lists, plumbing
from fastattn.fused.backward import plan_backward
from fastattn.fused.forward import plan_forward
from fastattn.problem import canonicalize
from fastattn.reference import causal_keep

# gpu: on a CUDA machine these run compiled on the GPU (DEVICE), so `pytest -m gpu` includes them;
# without one they run through Triton's interpreter.
pytestmark = pytest.mark.gpu
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _skip_without_kernel(dtype=torch.float32):
    q = torch.zeros(1, 1, 1, 16, dtype=dtype, device=DEVICE)
    reasons = unsupported_reasons("triton", canonicalize(q, q, q))
    if reasons:
        pytest.skip("; ".join(reasons))


def _brute_force_classes(keep: torch.Tensor, L: int, S: int, bm: int, bn: int, is_bool: bool) -> torch.Tensor:
    """(.., cdiv(L, bm), cdiv(S, bn)) classes from a dense (.., L, S) keep matrix, tile by tile."""
    nm, nn = math.ceil(L / bm), math.ceil(S / bn)
    cls = torch.zeros(*keep.shape[:-2], nm, nn, dtype=torch.int8)
    for i in range(nm):
        for j in range(nn):
            tile = keep[..., i * bm : (i + 1) * bm, j * bn : (j + 1) * bn]
            any_ = tile.flatten(-2).any(-1)
            all_ = tile.flatten(-2).all(-1) & ((j + 1) * bn <= S) if is_bool else torch.zeros_like(any_)
            cls[..., i, j] = any_.to(torch.int8) * (1 + all_.to(torch.int8))
    return cls


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape_name", ["b11s", "1hls", "l1", "bhls"])
@pytest.mark.parametrize("causal", [None, 0, 5, -9])
def test_mask_block_lists_match_brute_force(kind, shape_name, causal):
    B, H, L, S, bm, bn = 2, 3, 37, 45, 16, 8
    shape = {"b11s": (B, 1, 1, S), "1hls": (1, H, L, S), "l1": (1, 1, L, 1), "bhls": (B, H, L, S)}[shape_name]
    mask = make_mask(shape, kind, keep=0.9)
    if kind == "bool":
        mask[..., : min(shape[-2], 3), :] = True  # some all-true tiles
    keep = (mask if kind == "bool" else ~torch.isneginf(mask)).expand(B, H, L, S)
    if causal is not None:
        keep = keep & causal_keep(L, S, causal)
    expected = _brute_force_classes(keep, L, S, bm, bn, kind == "bool")

    counts, index = block_lists.mask_block_lists(mask, L, S, bm, bn, Features(1.0, causal))
    counts = counts.expand(B, H, *counts.shape[2:]).long()
    index = index.expand(B, H, *index.shape[2:]).long()
    counts = counts.expand(B, H, expected.shape[2], 2)
    index = index.expand(B, H, expected.shape[2], index.shape[-1])
    for b in range(B):
        for h in range(H):
            for m in range(expected.shape[2]):
                n_full, n_cut = counts[b, h, m].tolist()
                listed = index[b, h, m].tolist()
                assert sorted(listed[:n_full]) == torch.nonzero(expected[b, h, m] == 2).flatten().tolist()
                assert (
                    sorted(listed[n_full : n_full + n_cut]) == torch.nonzero(expected[b, h, m] == 1).flatten().tolist()
                )


def test_causal_block_classes_brute_force():
    for L, S, off in [(37, 45, 0), (37, 45, 8), (45, 37, -8), (5, 100, 95), (100, 5, -95)]:
        keep = causal_keep(L, S, off)
        expected = _brute_force_classes(keep, L, S, 16, 8, True)
        got = block_lists.causal_block_classes(L, S, 16, 8, Features(1.0, off), "cpu")
        # Tiles cut only by the end of S count as full here (the kernel checks S separately).
        expected_full_ok = torch.where((expected == 1) & (got == 2), 2, expected)
        assert torch.equal(got, expected_full_ok.to(got.dtype)), (L, S, off)


def _plans(p):
    """The forward and backward launch plans of `p` (outputs and gradients allocated, not run)."""
    out = torch.empty(*p.q.shape[:-1], p.head_dim_v)
    lse = torch.empty(p.q.shape[:-1])
    grads = tuple(torch.empty_like(t) for t in (p.q, p.k, p.v))
    return plan_forward(p, out, lse), plan_backward(p, out, lse, torch.ones_like(out), None, grads)


def test_large_offsets_path(monkeypatch):
    """The kernels' 64-bit offsets (chosen when start * stride can pass 2**31) give the same answer
    and the same gradients, forward and backward."""
    _skip_without_kernel()
    monkeypatch.setattr(plumbing, "OFFSET_LIMIT", 1)
    q, k, v = (t.to(DEVICE) for t in make_qkv(1, 2, 1, 65, 97, 32, dtype=torch.float32))
    mask = make_mask((1, 1, 1, 97), "bool").to(DEVICE)
    for kwargs in ({"is_causal": True}, {"attn_mask": mask}):
        p = canonicalize(q, k, v, enable_gqa=True, **kwargs)
        forward, backward = _plans(p)
        assert all(
            launch.constexprs["LARGE_OFFSETS"] for launch in forward + backward if "LARGE_OFFSETS" in launch.constexprs
        )
        check_grads("large offsets", q, k, v, enable_gqa=True, **kwargs)


def test_large_offsets_flag_follows_strides():
    q = torch.zeros(1, 1, 4, 16)
    p = canonicalize(q, q, q)
    assert not plumbing.large_offsets(p, p.k, p.k, p.v)
    huge = torch.empty(0, device="meta").as_strided((1, 1, 4, 16), (0, 0, 2**30, 1))
    assert plumbing.large_offsets(p, p.k, huge, p.v)
    assert plumbing.large_offsets(p, huge, p.k)  # the mask's strides count too


def test_batch_launched_in_chunks(monkeypatch):
    """Batches past CUDA's grid limit are launched in chunks, forward and backward; per-batch masks
    and block lists follow their chunk."""
    _skip_without_kernel()
    monkeypatch.setattr(plumbing, "MAX_GRID_YZ", 2)
    q, k, v = (t.to(DEVICE) for t in make_qkv(5, 1, 1, 9, 20, 16))
    mask = make_mask((5, 1, 1, 20), "bool", dead_frac=0.2).to(DEVICE)
    forward, backward = _plans(canonicalize(q, k, v, mask))
    assert [launch.grid[2] for launch in forward] == [2, 2, 1]
    assert [launch.grid[2] for launch in backward] == [2] * 6 + [1] * 3
    check_grads("chunked", q, k, v, attn_mask=mask)


def check_grads(label, q, k, v, **kwargs):
    """fastattn's triton forward and backward against the reference's, in float32."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = fastattn.attention(*leaves, return_lse=True, backend="triton", **kwargs)
    check_against_reference(
        label,
        out.detach().cpu(),
        lse.cpu(),
        q.cpu(),
        k.cpu(),
        v.cpu(),
        **{n: t.cpu() if torch.is_tensor(t) else t for n, t in kwargs.items()},
    )
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref_kwargs = {n: t.cpu() if torch.is_tensor(t) else t for n, t in kwargs.items()}
    ref = fastattn.reference.attention(*ref_leaves, **ref_kwargs)
    want = torch.autograd.grad(ref, ref_leaves, dout.cpu().double())
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        err = (g.cpu().double() - w).abs().max().item()
        print(f"{label} {name}: max err {err:.2e}")
        assert err <= 1e-4 * max(1.0, w.abs().max().item()), (label, name, err)


def test_forward_config_is_replaceable():
    """A user's config function is used by the launcher (here: 16 x 16 tiles), and can be undone."""
    _skip_without_kernel()
    seen = []

    def tiny(head_dim, head_dim_v, dtype, capability, masked=False):
        seen.append((head_dim, head_dim_v, dtype))
        return ForwardConfig(16, 16, 4, 1)

    q, k, v = (t.to(DEVICE) for t in make_qkv(1, 2, 2, 40, 50, 20, 24))
    configs.set_forward_config(tiny)
    try:
        out, lse = fastattn.attention(q, k, v, is_causal=True, return_lse=True, backend="triton")
    finally:
        configs.set_forward_config(None)
    assert seen == [(32, 32, torch.float32)]
    assert configs.forward_config(64, 64, torch.float16, (9, 0)) == configs.default_forward_config(
        64, 64, torch.float16, (9, 0)
    )
    check_against_reference("tiny tiles", out.cpu(), lse.cpu(), q.cpu(), k.cpu(), v.cpu(), is_causal=True)


def test_backward_config_is_replaceable():
    """A user's backward config function is used by the backward launcher, and can be undone."""
    _skip_without_kernel()
    seen = []

    def tiny(head_dim, head_dim_v, dtype, capability, masked=False):
        seen.append((head_dim, head_dim_v, dtype, masked))
        tile = configs.TileConfig(16, 16, 4, 1)
        return configs.BackwardConfig(tile, tile)

    q, k, v = (t.to(DEVICE) for t in make_qkv(1, 2, 2, 40, 50, 20, 24))
    mask = make_mask((1, 1, 40, 50), "bool").to(DEVICE)
    configs.set_backward_config(tiny)
    try:
        check_grads("tiny backward tiles", q, k, v, attn_mask=mask, is_causal=True)
    finally:
        configs.set_backward_config(None)
    assert seen == [(32, 32, torch.float32, True)]


def test_input_precision_follows_allow_tf32():
    matmul = torch.backends.cuda.matmul  # a module proxy: monkeypatch cannot restore its flags
    saved = matmul.allow_tf32
    try:
        # Both sides: the flag on gives TF32, off gives IEEE, for the compiled target only.
        for flag, want in ((True, "tf32"), (False, "ieee")):
            matmul.allow_tf32 = flag
            target = plumbing.Target(capability=(9, 0), allow_tf32=matmul.allow_tf32)
            assert target.input_precision(torch.float32) == want
            assert plumbing.Target(None, flag).input_precision(torch.float32) == "ieee"
    finally:
        matmul.allow_tf32 = saved


@pytest.mark.parametrize("E", [1, 16, 17, 100, 256])
def test_padded_head_dim(E):
    d = configs.padded_head_dim(E)
    assert d >= max(16, E) and d & (d - 1) == 0 and d < 2 * max(16, E)


def test_fp32_tiles_follow_torchs_tf32_flag():
    """fp32 launches on a GPU pick their tiles by precision: TF32 allowed (tensor-core MMAs) or not
    (IEEE fp32 on the FMA units: smaller tiles, 8 warps); 16-bit inputs ignore the flag. The plan
    carries the matching input precision; a replacement config function that declares
    allow_tf32 gets it."""
    from fastattn.fused import plumbing as pl
    from fastattn.fused.forward import plan_forward
    from fastattn.problem import canonicalize

    ieee = configs.forward_config(128, 128, torch.float32, (9, 0))
    tf32 = configs.forward_config(128, 128, torch.float32, (9, 0), allow_tf32=True)
    assert ieee != tf32 and ieee.num_warps == 8
    half = [configs.forward_config(128, 128, torch.float16, (9, 0), allow_tf32=a) for a in (False, True)]
    assert half[0] == half[1]
    assert configs.backward_config(128, 128, torch.float32, (9, 0)) != configs.backward_config(
        128, 128, torch.float32, (9, 0), allow_tf32=True
    )
    q, k, v = (torch.empty(1, 2, 256, 128, device="meta") for _ in range(3))
    p = canonicalize(q, k, v)
    out, lse = torch.empty_like(q), torch.empty(1, 2, 256, device="meta")
    for allow, tile, precision in ((False, ieee, "ieee"), (True, tf32, "tf32")):
        (launch,) = plan_forward(p, out, lse, target=pl.Target((9, 0), allow_tf32=allow))
        assert (launch.tile, launch.constexprs["INPUT_PRECISION"]) == (tile, precision)
    seen = []

    def mine(head_dim, head_dim_v, dtype, capability, masked=False, allow_tf32=False):
        seen.append(allow_tf32)
        return configs.TileConfig(16, 16, 4, 1)

    configs.set_forward_config(mine)
    try:
        plan_forward(p, out, lse, target=pl.Target((9, 0), allow_tf32=True))
    finally:
        configs.set_forward_config(None)
    assert seen == [True]

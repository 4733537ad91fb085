"""The compiled Triton kernel on a CUDA GPU: the parity matrix (bf16 included, which the CPU
interpreter cannot check), NaN-poisoned padding, bitwise-identical repeats, SDPA agreement at
training sizes. Skipped cleanly without CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import MODIFIER_CASES, PARITY_CASES, assert_close_to_oracle, attention_arguments, check_against_reference

import fastattn
from fastattn import reference
from fastattn.dispatch import choose_backend
from fastattn.problem import canonicalize

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def to_cuda(t):
    """Move a tensor to the GPU keeping its strides and whatever storage surrounds it (NaN padding)."""
    if not torch.is_tensor(t):
        return t
    base = t._base if t._base is not None else t
    if base is t:
        return t.cuda()
    moved = base.cuda()
    return moved.as_strided(t.shape, t.stride(), t.storage_offset() - base.storage_offset())


def _cuda_args(case, dtype):
    q, k, v, kwargs = attention_arguments(case, dtype)
    return q, k, v, kwargs, (to_cuda(q), to_cuda(k), to_cuda(v), {n: to_cuda(a) for n, a in kwargs.items()})


def test_auto_picks_triton_on_cuda():
    q = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.float16)
    assert choose_backend("auto", canonicalize(q, q, q)).name == "triton"


def test_float64_on_cuda_takes_the_fallback():
    """The float64 kernels run only in the interpreter: on CUDA, auto takes "cpu" and triton refuses."""
    q = torch.randn(1, 2, 64, 32, device="cuda", dtype=torch.float64)
    assert choose_backend("auto", canonicalize(q, q, q)).name == "cpu"
    with pytest.raises(fastattn.BackendUnavailable, match="float64"):
        fastattn.attention(q, q, q, backend="triton")


GPU_CASES = PARITY_CASES + MODIFIER_CASES  # windows, softcaps and ALiBi compiled, bf16 included


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", GPU_CASES, ids=[c.id for c in GPU_CASES])
def test_gpu_parity(case, dtype):
    q, k, v, kwargs, (qc, kc, vc, kwc) = _cuda_args(case, DTYPES[dtype])
    out, lse = fastattn.attention(qc, kc, vc, **kwc, return_lse=True, backend="triton")
    torch.cuda.synchronize()
    check_against_reference(f"cuda {case.id} {dtype}", out.cpu(), lse.cpu(), q, k, v, **kwargs)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("window", [(4095, 0), (255, 255)], ids=["mistral-4096", "local-511"])
def test_gpu_window_at_training_size_matches_sdpa_with_a_mask(dtype, window):
    """B=1, H=16/4kv, L=S=8192, D=128: the window against SDPA given the materialised band (float32
    oracle, SDPA in the same low precision as the baseline), forward and the three gradients."""
    dt = DTYPES[dtype]
    q, k, v = (torch.randn(1, h, 8192, 128, device="cuda", dtype=dt, requires_grad=True) for h in (16, 4, 4))
    i = torch.arange(8192, device="cuda")[:, None]
    j = torch.arange(8192, device="cuda")[None, :]
    band = (j >= i - window[0]) & (j <= i + window[1])
    out = fastattn.attention(q, k, v, window_size=window, enable_gqa=True)
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    oracle = F.scaled_dot_product_attention(*leaves, attn_mask=band, enable_gqa=True)
    baseline = F.scaled_dot_product_attention(q, k, v, attn_mask=band, enable_gqa=True)
    name = f"L8192 window{window} {dtype}"
    assert_close_to_oracle(f"{name} out", out.float(), oracle, baseline.float(), dtype=dt)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(oracle, leaves, dout.float())
    base = torch.autograd.grad(baseline, (q, k, v), dout)
    for label, g, o, b in zip(("dq", "dk", "dv"), got, want, base):
        assert_close_to_oracle(f"{name} {label}", g.float(), o, b.float(), dtype=dt, ratio=3.0)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("case", PARITY_CASES[::4], ids=[c.id for c in PARITY_CASES[::4]])
def test_gpu_bitwise_repeatable(case, dtype):
    _, _, _, _, (qc, kc, vc, kwc) = _cuda_args(case, DTYPES[dtype])
    first = fastattn.attention(qc, kc, vc, **kwc, return_lse=True, backend="triton")
    second = fastattn.attention(qc, kc, vc, **kwc, return_lse=True, backend="triton")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("E", [64, 128])
def test_gpu_training_size_matches_sdpa(dtype, causal, E):
    """B=2, H=16, L=S=2048: the error-ratio rule against float32 (oracle), with SDPA's own kernel in
    the same low precision as the baseline."""
    dt = DTYPES[dtype]
    q, k, v = (torch.randn(2, 16, 2048, E, device="cuda", dtype=dt) for _ in range(3))
    out = fastattn.attention(q, k, v, is_causal=causal)
    oracle = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
    baseline = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert_close_to_oracle(f"L2048 E{E} {dtype} causal={causal}", out.float(), oracle, baseline.float(), dtype=dt)


def test_gpu_tf32_follows_torch_flag():
    """float32 uses full fp32 matmuls unless torch allows TF32 (conftest turns it off), and TF32
    when it does: both sides of the flag."""
    q, k, v = (torch.randn(1, 2, 256, 64, device="cuda") for _ in range(3))
    oracle = reference.attention(q.double(), k.double(), v.double())
    exact = fastattn.attention(q, k, v)
    matmul = torch.backends.cuda.matmul
    matmul.allow_tf32 = True
    try:
        fast = fastattn.attention(q, k, v)
    finally:
        matmul.allow_tf32 = False
    exact_err = (exact.double() - oracle).abs().max().item()
    tf32_err = (fast.double() - oracle).abs().max().item()
    print(f"ieee err {exact_err:.2e}, tf32 err {tf32_err:.2e}")
    assert exact_err < 1e-5
    assert tf32_err > 10 * exact_err  # TF32 keeps 10 mantissa bits: its rounding shows

"""What a sweep times: cases, the default sweep of each device, and the FLOP convention.

A case is one attention problem: query (B, Hq, L, D), key and value (B, Hkv, S, D). The default
sweeps keep the number of tokens B*L fixed while L grows, as the FlashAttention papers do, so every
point of a plot does about the same work per token:

* CUDA: the papers' grid (B*L = 16k tokens, Hq*D = 2048, D in 64/128/256, L = 512..16k, causal and
  not, bf16 and fp16), Llama-style grouped-query attention (32 query heads, 8 KV heads, D = 128,
  B*L = 16k) and long context (B = 1, the GQA heads, L = 32k..128k, causal);
* CPU: the same families scaled to finish in about 3 minutes on 2 idle cores (B*L = 2048,
  Hq*D = 512, L = 512..2048, float32; GQA 8/2 heads; one 4k-token causal case).

``--quick`` shrinks both to a sweep of seconds (CPU) or a minute (CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# The backward pass does 2.5x the forward's matmul work (dV, dP, dS->dQ, dK, and recomputing P).
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def attention_flops(B: int, H: int, L: int, S: int, D: int, causal: bool, mode: str) -> float:
    """Floating-point operations of attention by the usual convention.

    Forward: 4*B*H*L*S*D (two matmuls, QK^T and PV, of 2*L*S*D each per head), halved when causal
    (whatever L and S are); backward: 2.5x the forward; fwd+bwd: 3.5x. H counts query heads.
    """
    forward = 4.0 * B * H * L * S * D
    if causal:
        forward /= 2
    return forward * MODE_FLOP_FACTOR[mode]


@dataclass(frozen=True)
class Case:
    """One problem: query (B, Hq, L, D), key and value (B, Hkv, S, D); Hq is a multiple of Hkv.

    family names its group in the sweep ("mha", "gqa", "long"); the configuration (family, dtype,
    heads, D, causal) is everything but B, L and S: one plot line runs over L within it.
    """

    family: str
    dtype: torch.dtype
    B: int
    Hq: int
    Hkv: int
    L: int
    S: int
    D: int
    causal: bool

    @property
    def scores(self) -> int:
        """Entries of the (B, Hq, L, S) score matrix: what a materialising path allocates."""
        return self.B * self.Hq * self.L * self.S

    @property
    def gqa(self) -> bool:
        return self.Hq != self.Hkv

    @property
    def heads(self) -> str:
        return f"H{self.Hq}" if not self.gqa else f"H{self.Hq}/{self.Hkv}kv"

    @property
    def label(self) -> str:
        """E.g. "bf16 B8 H32/8kv L2048 S2048 D128 causal"."""
        parts = [DTYPE_NAMES[self.dtype], f"B{self.B}", self.heads, f"L{self.L}", f"S{self.S}", f"D{self.D}"]
        return " ".join(parts + (["causal"] if self.causal else []))

    @property
    def config(self) -> str:
        """E.g. "gqa bf16 H32/8kv D128 causal": the case without B, L and S."""
        parts = [self.family, DTYPE_NAMES[self.dtype], self.heads, f"D{self.D}"]
        return " ".join(parts + (["causal"] if self.causal else []))

    def flops(self, mode: str) -> float:
        return attention_flops(self.B, self.Hq, self.L, self.S, self.D, self.causal, mode)

    def inputs(
        self, device: str, seed: int, requires_grad: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Random normal (q, k, v) on `device`, never zeros (they hide unwritten outputs)."""
        g = torch.Generator(device=device).manual_seed(seed)
        shapes = [
            (self.B, self.Hq, self.L, self.D),
            (self.B, self.Hkv, self.S, self.D),
            (self.B, self.Hkv, self.S, self.D),
        ]
        return tuple(
            torch.randn(s, generator=g, device=device, dtype=self.dtype).requires_grad_(requires_grad) for s in shapes
        )

    def reduced(self, max_scores: int) -> Case:
        """A copy with at most `max_scores` scores for the float64 oracle: B = 1, one KV head (and
        its query heads), then L and S halved together while both stay over 128. D, dtype,
        causality and the GQA group are kept, so the same kernels and code paths run."""
        if self.scores <= max_scores:
            return self
        small = replace(self, B=1, Hq=self.Hq // self.Hkv, Hkv=1)
        while small.scores > max_scores and min(small.L, small.S) > 128:
            small = replace(small, L=small.L // 2, S=small.S // 2)
        return small


@dataclass(frozen=True)
class Family:
    """A grid of cases: B = max(1, tokens // L); Hq = Hkv = max(1, hidden // D) unless heads are fixed."""

    name: str
    tokens: int
    seqlens: tuple[int, ...]
    head_dims: tuple[int, ...]
    causal: tuple[bool, ...]
    dtypes: tuple[torch.dtype, ...]
    hidden: int = 0  # Hq * D, for families whose head count follows the head dim
    heads: tuple[int, int] | None = None  # (Hq, Hkv), for families with fixed heads

    def cases(self) -> list[Case]:
        out = []
        for dtype in self.dtypes:
            for D in self.head_dims:
                Hq, Hkv = self.heads or (max(1, self.hidden // D),) * 2
                for causal in self.causal:
                    for L in self.seqlens:
                        out.append(Case(self.name, dtype, max(1, self.tokens // L), Hq, Hkv, L, L, D, causal))
        return out


def default_families(device: str, quick: bool) -> list[Family]:
    """The default sweep of `device` ("cpu" or "cuda"), full or quick (see the module docstring)."""
    both = (False, True)
    if device == "cuda":
        half = (torch.bfloat16, torch.float16)
        if quick:
            return [
                Family("mha", 8192, (512, 2048), (64, 128), both, (torch.bfloat16,), hidden=2048),
                Family("gqa", 8192, (2048,), (128,), (True,), (torch.bfloat16,), heads=(32, 8)),
            ]
        seqlens = (512, 1024, 2048, 4096, 8192, 16384)
        return [
            Family("mha", 16384, seqlens, (64, 128, 256), both, half, hidden=2048),
            Family("gqa", 16384, seqlens, (128,), both, (torch.bfloat16,), heads=(32, 8)),
            Family("long", 1, (32768, 65536, 131072), (128,), (True,), (torch.bfloat16,), heads=(32, 8)),
        ]
    f32 = (torch.float32,)
    if quick:
        return [
            Family("mha", 512, (128, 256), (64,), both, f32, hidden=128),
            Family("gqa", 512, (256,), (64,), (True,), f32, heads=(4, 1)),
        ]
    return [
        Family("mha", 2048, (512, 1024, 2048), (64, 128), both, f32, hidden=512),
        Family("gqa", 2048, (512, 2048), (64,), (True,), f32, heads=(8, 2)),
        Family("long", 1, (4096,), (64,), (True,), f32, heads=(8, 2)),
    ]


def sweep_cases(
    device: str,
    quick: bool = False,
    *,
    dtypes: tuple[torch.dtype, ...] | None = None,
    seqlens: tuple[int, ...] | None = None,
    head_dims: tuple[int, ...] | None = None,
    causal: tuple[bool, ...] | None = None,
) -> list[Case]:
    """The cases of the default sweep, with any of its axes replaced.

    Each given axis replaces that axis in every family. Giving seqlens drops the "long" family,
    whose lengths are what define it; giving head_dims keeps the hidden size (Hq * D) of the
    families that have one and the fixed heads of the others.
    """
    families = default_families(device, quick)
    if seqlens is not None:
        families = [replace(f, seqlens=seqlens) for f in families if f.name != "long"]
    for axis, value in (("dtypes", dtypes), ("head_dims", head_dims), ("causal", causal)):
        if value is not None:
            families = [replace(f, **{axis: value}) for f in families]
    return [case for family in families for case in family.cases()]

"""What a sweep times: cases, the default sweep of each device, and the FLOP convention.

A case is one attention problem: query (B, Hq, L, D), key and value (B, Hkv, S, D). The default
sweeps keep the number of tokens B*L fixed while L grows, as the FlashAttention papers do, so every
point of a plot does about the same work per token:

* CUDA: the papers' grid (B*L = 16k tokens, Hq*D = 2048, D in 64/128/256, L = 512..16k, causal and
  not, bf16 and fp16), Llama-style grouped-query attention (32 query heads, 8 KV heads, D = 128,
  B*L = 16k) and long context (B = 1, the GQA heads, L = 32k..128k, causal);
* CPU: the same families scaled to finish in about 3 minutes on 2 idle cores (B*L = 2048,
  Hq*D = 512, L = 512..2048, float32; GQA 8/2 heads; one 4k-token causal case).

Score modifiers have families of their own, shaped after the models that use them: "window"
(Mistral: a causal sliding window of 4096 keys at 16k-32k tokens on CUDA; 512 keys at 4k and 16k
on CPU, where its cost must grow with L, not L^2), "softcap" (Gemma 2: softcap 50, D = 256 on CUDA)
and "alibi" (BLOOM: ALiBi slopes, MHA). "decode" times one query per sequence against a KV cache
(Llama-style 32/8 heads, D = 128; batch 1..64, cache 1k..128k on CUDA, 4k and 16k on CPU), forward
only; its rows also give the K/V bytes read per second.

``--quick`` shrinks both to a sweep of seconds (CPU) or a minute (CUDA).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# The backward pass does 2.5x the forward's matmul work (dV, dP, dS->dQ, dK, and recomputing P).
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


@functools.cache  # a row's FLOPs are asked for several times; the count loops over L
def window_scores(L: int, S: int, window: int) -> int:
    """Scores per head inside a causal window of `window` keys ending at each query (bottom-right
    aligned: query i sees keys i + S - L - window + 1 .. i + S - L), counted exactly."""
    total = 0
    for i in range(L):
        hi = min(S - 1, i + S - L)
        lo = max(0, i + S - L - window + 1)
        total += max(0, hi - lo + 1)
    return total


def attention_flops(B: int, H: int, L: int, S: int, D: int, causal: bool, mode: str, window: int = 0) -> float:
    """Floating-point operations of attention by the usual convention.

    Forward: 4*B*H*L*S*D (two matmuls, QK^T and PV, of 2*L*S*D each per head), halved when causal
    (whatever L and S are); with a sliding window of `window` keys, 4*B*H*D times the scores inside
    the band (:func:`window_scores`), the work a kernel that skips the rest does; backward: 2.5x
    the forward; fwd+bwd: 3.5x. H counts query heads.
    """
    if window:
        forward = 4.0 * B * H * D * window_scores(L, S, window)
    else:
        forward = 4.0 * B * H * L * S * D
        if causal:
            forward /= 2
    return forward * MODE_FLOP_FACTOR[mode]


def alibi_slopes(H: int, device: str = "cpu") -> torch.Tensor:
    """ALiBi's geometric slopes 2^(-8 (h + 1) / H) (Press et al.), float32 (H,)."""
    return torch.pow(2.0, -8.0 * torch.arange(1, H + 1, device=device, dtype=torch.float32) / H)


@dataclass(frozen=True)
class Case:
    """One problem: query (B, Hq, L, D), key and value (B, Hkv, S, D); Hq is a multiple of Hkv.

    family names its group in the sweep ("mha", "gqa", "long", "window", "softcap", "alibi"); the
    configuration (family, dtype, heads, D, causal, modifiers) is everything but B, L and S: one
    plot line runs over L within it. Modifiers: window > 0, a causal sliding window of that many
    keys (window_size=(window - 1, 0)); softcap > 0; alibi, the geometric slopes of
    :func:`alibi_slopes`.
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
    window: int = 0
    softcap: float = 0.0
    alibi: bool = False
    inference: bool = False  # a decode step: only its forward is timed

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V a call must read at least once: what bounds a decode step."""
        return 2 * self.B * self.Hkv * self.S * self.D * self.dtype.itemsize

    @property
    def modifiers(self) -> list[str]:
        """E.g. ["window4096", "softcap50", "alibi"]."""
        out = [f"window{self.window}"] if self.window else []
        if self.softcap:
            out.append(f"softcap{self.softcap:g}")
        return out + (["alibi"] if self.alibi else [])

    def attention_kwargs(self, device: str) -> dict:
        """fastattn's keyword arguments for the modifiers (window_size, softcap, alibi_slopes)."""
        kwargs: dict = {}
        if self.window:
            kwargs["window_size"] = (self.window - 1, 0)
        if self.softcap:
            kwargs["softcap"] = self.softcap
        if self.alibi:
            kwargs["alibi_slopes"] = alibi_slopes(self.Hq, device)
        return kwargs

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
        return " ".join(parts + (["causal"] if self.causal else []) + self.modifiers)

    @property
    def config(self) -> str:
        """E.g. "gqa bf16 H32/8kv D128 causal": the case without B, L and S."""
        parts = [self.family, DTYPE_NAMES[self.dtype], self.heads, f"D{self.D}"]
        return " ".join(parts + (["causal"] if self.causal else []) + self.modifiers)

    def flops(self, mode: str) -> float:
        return attention_flops(self.B, self.Hq, self.L, self.S, self.D, self.causal, mode, self.window)

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
    window: int = 0  # the modifiers of every case (see Case)
    softcap: float = 0.0
    alibi: bool = False
    query_len: int = 0  # decode families: L queries against S = seqlens keys (0: L = S)
    batches: tuple[int, ...] = ()  # decode families: these batch sizes instead of tokens // L

    def cases(self) -> list[Case]:
        out = []
        mods = dict(window=self.window, softcap=self.softcap, alibi=self.alibi, inference=bool(self.query_len))
        for dtype in self.dtypes:
            for D in self.head_dims:
                Hq, Hkv = self.heads or (max(1, self.hidden // D),) * 2
                for causal in self.causal:
                    for S in self.seqlens:
                        L = self.query_len or S
                        for B in self.batches or (max(1, self.tokens // L),):
                            out.append(Case(self.name, dtype, B, Hq, Hkv, L, S, D, causal, **mods))
        return out


def default_families(device: str, quick: bool) -> list[Family]:
    """The default sweep of `device` ("cpu" or "cuda"), full or quick (see the module docstring)."""
    both = (False, True)
    if device == "cuda":
        half = (torch.bfloat16, torch.float16)
        bf16 = (torch.bfloat16,)
        if quick:
            return [
                Family("mha", 8192, (512, 2048), (64, 128), both, bf16, hidden=2048),
                Family("gqa", 8192, (2048,), (128,), (True,), bf16, heads=(32, 8)),
                Family("window", 16384, (16384,), (128,), (True,), bf16, heads=(32, 8), window=4096),
                Family("decode", 0, (16384,), (128,), (False,), bf16, heads=(32, 8), query_len=1, batches=(1, 64)),
            ]
        seqlens = (512, 1024, 2048, 4096, 8192, 16384)
        return [
            Family("mha", 16384, seqlens, (64, 128, 256), both, half, hidden=2048),
            Family("gqa", 16384, seqlens, (128,), both, bf16, heads=(32, 8)),
            Family("long", 1, (32768, 65536, 131072), (128,), (True,), bf16, heads=(32, 8)),
            Family("window", 16384, (16384, 32768), (128,), (True,), bf16, heads=(32, 8), window=4096),
            Family("softcap", 16384, (4096, 8192), (256,), (True,), bf16, heads=(16, 8), softcap=50.0),
            Family("alibi", 16384, (2048, 8192), (128,), (True,), bf16, heads=(16, 16), alibi=True),
            Family(
                "decode",
                0,
                (1024, 16384, 131072),
                (128,),
                (False,),
                bf16,
                heads=(32, 8),
                query_len=1,
                batches=(1, 16, 64),
            ),
        ]
    f32 = (torch.float32,)
    if quick:
        return [
            Family("mha", 512, (128, 256), (64,), both, f32, hidden=128),
            Family("gqa", 512, (256,), (64,), (True,), f32, heads=(4, 1)),
            Family("window", 512, (512,), (64,), (True,), f32, heads=(2, 1), window=64),
            Family("decode", 0, (2048,), (64,), (False,), f32, heads=(8, 2), query_len=1, batches=(1, 4)),
        ]
    return [
        Family("mha", 2048, (512, 1024, 2048), (64, 128), both, f32, hidden=512),
        Family("gqa", 2048, (512, 2048), (64,), (True,), f32, heads=(8, 2)),
        Family("long", 1, (4096,), (64,), (True,), f32, heads=(8, 2)),
        Family("window", 1, (4096, 16384), (64,), (True,), f32, heads=(4, 1), window=512),
        Family("softcap", 2048, (1024,), (64,), (True,), f32, heads=(8, 4), softcap=50.0),
        Family("alibi", 2048, (1024,), (64,), (True,), f32, heads=(8, 8), alibi=True),
        Family("decode", 0, (4096, 16384), (128,), (False,), f32, heads=(32, 8), query_len=1, batches=(1, 8)),
    ]


def sweep_cases(
    device: str,
    quick: bool = False,
    *,
    dtypes: tuple[torch.dtype, ...] | None = None,
    seqlens: tuple[int, ...] | None = None,
    head_dims: tuple[int, ...] | None = None,
    causal: tuple[bool, ...] | None = None,
    families: tuple[str, ...] | None = None,
) -> list[Case]:
    """The cases of the default sweep, with any of its axes replaced.

    Each given axis replaces that axis in every family. Giving seqlens drops the "long" and
    "decode" families, whose lengths are what define them; giving head_dims keeps the hidden size (Hq * D) of the
    families that have one and the fixed heads of the others. families: keep only these (by name).
    """
    chosen = families
    families = default_families(device, quick)
    if chosen is not None:
        unknown = set(chosen) - {f.name for f in families}
        if unknown:
            raise ValueError(f"families {sorted(unknown)} are not in the {device} sweep ({[f.name for f in families]})")
        families = [f for f in families if f.name in chosen]
    if seqlens is not None:
        families = [replace(f, seqlens=seqlens) for f in families if f.name not in ("long", "decode")]
    for axis, value in (("dtypes", dtypes), ("head_dims", head_dims), ("causal", causal)):
        if value is not None:
            families = [replace(f, **{axis: value}) for f in families]
    return [case for family in families for case in family.cases()]

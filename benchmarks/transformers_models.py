"""fastattn inside transformers on CPU: accuracy and time against "eager" and "sdpa".

For small models of each tested architecture (random weights, built from configs, nothing
downloaded), on a left-padded batch (right-padded for BERT):

  * agreement: max |logits - eager's| over the real (unpadded) positions for sdpa and fastattn,
    all in float32, and for a training step's gradients the largest difference over all
    parameters relative to the largest eager gradient (tests/test_transformers.py holds the
    error-ratio checks against a float64 oracle; this is the size of the differences);
  * time: forward (no grad) and a training step (forward + backward), median of interleaved runs
    (torch.utils.benchmark), for each attention implementation.

    python benchmarks/transformers_models.py            # writes benchmarks/results/cpu/transformers_models.md
    python benchmarks/transformers_models.py --quick    # shorter sequences and timings
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
import transformers
from cpu_fallback_ratio import environment, save_results, time_interleaved

from fastattn.integrations import transformers as fa_hf

IMPLS = ("eager", "sdpa", "fastattn")
COMMON = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8)
ARCHS = {
    "Llama (GQA 8/2)": (transformers.LlamaForCausalLM, transformers.LlamaConfig, dict(num_key_value_heads=2)),
    "Mistral (window 128)": (
        transformers.MistralForCausalLM,
        transformers.MistralConfig,
        dict(num_key_value_heads=2, sliding_window=128),
    ),
    "Qwen2 (window 128 on layers 2-3)": (
        transformers.Qwen2ForCausalLM,
        transformers.Qwen2Config,
        dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=128, max_window_layers=2),
    ),
    "Gemma 2 (softcap 50, alternating windows 128)": (
        transformers.Gemma2ForCausalLM,
        transformers.Gemma2Config,
        dict(num_key_value_heads=4, head_dim=32, query_pre_attn_scalar=32, sliding_window=128),
    ),
    "BERT (padding)": (
        transformers.BertForMaskedLM,
        transformers.BertConfig,
        dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    ),
}


def build(arch):
    cls, cfg_cls, extra = ARCHS[arch]
    torch.manual_seed(0)
    return cls._from_config(cfg_cls(**COMMON, **extra), attn_implementation="eager").eval()


def inputs(arch, B, L):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, COMMON["vocab_size"], (B, L), generator=g)
    mask = torch.ones_like(ids)
    for b in range(B):  # row b padded by b * L / (2B) tokens
        n = b * L // (2 * B)
        if n:
            if arch.startswith("BERT"):
                mask[b, -n:] = 0
            else:
                mask[b, :n] = 0
    return ids, mask


def variant(base, impl, dtype=torch.float32):
    m = copy.deepcopy(base).to(dtype)
    m.set_attn_implementation(impl)
    return m


def labels(arch, ids, mask):
    """-100 on the padding and on a causal row's first real token (it would be predicted from a
    padding position's logits)."""
    out = ids.masked_fill(mask == 0, -100)
    if not arch.startswith("BERT"):
        out[torch.arange(ids.shape[0]), mask.argmax(dim=1)] = -100
    return out


def train_grads(m, ids, mask, y):
    m.train()
    m.zero_grad(set_to_none=True)
    loss = m(input_ids=ids, attention_mask=mask, labels=y).loss
    loss.backward()
    m.eval()
    return loss.detach(), {n: p.grad.detach() for n, p in m.named_parameters() if p.grad is not None}


def measure(arch, B, L, min_run_time):
    base = build(arch)
    ids, mask = inputs(arch, B, L)
    keep = mask.bool()
    models = {}
    for impl in IMPLS:
        try:
            models[impl] = variant(base, impl)
        except ValueError as e:  # Gemma 2 refuses sdpa (no softcap there)
            print(f"{arch}: {impl} refused: {str(e)[:80]}")
    y = labels(arch, ids, mask)
    with torch.no_grad():
        logits = {i: m(input_ids=ids, attention_mask=mask).logits[keep] for i, m in models.items()}
    grads = {i: train_grads(m, ids, mask, y)[1] for i, m in models.items()}
    g_scale = max(g.abs().max().item() for g in grads["eager"].values())
    row = {"model": arch, "B": B, "L": L}
    for impl in models:
        if impl == "eager":
            continue
        row[f"{impl} logits diff"] = (logits[impl] - logits["eager"]).abs().max().item()
        row[f"{impl} grad diff"] = (
            max((grads[impl][n] - g).abs().max().item() for n, g in grads["eager"].items()) / g_scale
        )

    def forward(m):
        with torch.no_grad():
            m(input_ids=ids, attention_mask=mask)

    def step(m):
        m.zero_grad(set_to_none=True)
        m(input_ids=ids, attention_mask=mask, labels=y).loss.backward()

    fns = {f"{i} fwd": (lambda m=m: forward(m)) for i, m in models.items()}
    fns |= {f"{i} step": (lambda m=m: step(m)) for i, m in models.items()}
    times = time_interleaved(fns, rounds=3, min_run_time=min_run_time)
    for name, ts in times.items():
        row[f"{name} ms"] = statistics.median(ts) * 1e3
    return row


def table(rows):
    lines = [
        "| model | B x L | max logits diff to eager: sdpa / fastattn | max grad diff to eager (rel): sdpa / fastattn "
        "| forward ms: eager / sdpa / fastattn | train step ms: eager / sdpa / fastattn |",
        "|---|---|---|---|---|---|",
    ]

    def cells(r, key, fmt, impls=IMPLS):
        return " / ".join(format(r[f"{i} {key}"], fmt) if f"{i} {key}" in r else "n/a" for i in impls)

    for r in rows:
        e, g = cells(r, "logits diff", ".1e", IMPLS[1:]), cells(r, "grad diff", ".1e", IMPLS[1:])
        f, s = cells(r, "fwd ms", ".1f"), cells(r, "step ms", ".1f")
        lines.append(f"| {r['model']} | {r['B']} x {r['L']} | {e} | {g} | {f} | {s} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="L = 128, short timings")
    args = ap.parse_args(argv)
    fa_hf.register()
    B, L, t = (2, 128, 0.2) if args.quick else (4, 512, 1.0)
    env = environment() | {"transformers": transformers.__version__}
    rows = []
    for arch in ARCHS:
        rows.append(measure(arch, B, L, t))
        print(rows[-1], flush=True)
    text = "\n".join(
        [
            "# fastattn inside transformers (CPU)",
            "",
            "`python benchmarks/transformers_models.py" + (" --quick" if args.quick else "") + "`: "
            f"{env['date']}, {env['cpu']}, {env['threads']} threads, load average "
            f"{', '.join(f'{x:.1f}' for x in env['load_average'])}, torch {env['torch']}, transformers {env['transformers']}.",
            "",
            "Models: hidden 256, 4 layers, 8 query heads, vocabulary 512, random weights; a padded batch"
            " (row b has b·L/(2B) padding tokens: left for the decoders, right for BERT), float32."
            " Differences are to transformers' eager attention: max |logits − eager's| over the real"
            " positions, and a training step's largest gradient difference over all parameters"
            " relative to the largest eager gradient."
            " Times are medians of interleaved runs; a train step is forward + backward. n/a: the"
            " implementation refuses the model (transformers' sdpa has no softcap).",
            "",
            table(rows),
            "",
        ]
    )
    print(text)
    save_results("transformers_models" + ("_quick" if args.quick else ""), text, env, rows)


if __name__ == "__main__":
    main()

"""What a sweep leaves behind: the run's metadata, flat records, markdown, CSV, JSON and PNG plots.

Every record (one row of the sweep) carries the run's metadata: device and its name, torch,
triton, fastattn and python versions, the thread count, the date and the exact command; plus
the 1-minute load average when the row was measured. The JSON holds the metadata once more, with
the machine's ceilings, the environment lines of ``python -m fastattn`` and the load average at
the start and end. Markdown and plots are rendered from records alone, so
``python -m fastattn.bench.readme`` can redraw them from a JSON file.

Files written by :func:`write_outputs` into the --out directory: results.csv, results.json,
results.md and, when matplotlib is installed (the ``bench`` extra), tflops_<mode>.png (TFLOP/s
against L, one panel per configuration, one line per provider) and speedup.png (fastattn's
speed-up over SDPA's own choice and over the best SDPA backend).
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

import fastattn
from fastattn.env import cpu_name, environment_lines
from fastattn.fused import triton_version

from .runner import Row, Settings
from .sweep import DTYPE_NAMES, MODES

META_FIELDS = ("date", "command", "device", "device_name", "torch", "triton", "fastattn", "python", "threads")
ROW_FIELDS = (
    "loadavg_1m",
    "family",
    "config",
    "case",
    "dtype",
    "B",
    "Hq",
    "Hkv",
    "L",
    "S",
    "D",
    "causal",
    "mode",
    "provider",
    "status",
    "reason",
    "note",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "samples",
    "gflop",
    "tflops",
    "kv_gbps",
    "pct_of_copy",
    "pct_of_matmul_peak",
    "peak_mem_mib",
    "max_err",
    "err_bound",
    "err_tensor",
    "checked_on",
    "speedup_vs_sdpa",
    "speedup_vs_best_sdpa",
    "best_sdpa",
)
FIELDS = META_FIELDS + ROW_FIELDS
REASON_CHARS = 160  # a markdown cell's share of a long reason; CSV and JSON keep it whole


def _triton_version() -> str:
    return triton_version() or "not importable"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return cpu_name()


def metadata(settings: Settings, command: str, ceilings: dict) -> dict:
    """The run's metadata (loadavg_end and duration_s are added when the run ends)."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "device": settings.device,
        "device_name": device_name(settings.device),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "fastattn": fastattn.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "loadavg_start": list(os.getloadavg()),
        "ceilings": ceilings,
        "providers": {p.name: p.description for p in settings.providers},
        "modes": list(settings.modes),
        "environment": environment_lines(),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def record(row: Row, meta: dict) -> dict:
    """One flat record: the metadata fields, then the row's (FIELDS order; None where n/a)."""
    c, t, g = row.case, row.timing, row.gate
    peak = meta["ceilings"]["matmul_tflops"].get(DTYPE_NAMES[c.dtype])
    rec = {key: meta[key] for key in META_FIELDS}
    rec.update(
        loadavg_1m=row.loadavg,
        family=c.family,
        config=c.config,
        case=c.label,
        dtype=DTYPE_NAMES[c.dtype],
        B=c.B,
        Hq=c.Hq,
        Hkv=c.Hkv,
        L=c.L,
        S=c.S,
        D=c.D,
        causal=c.causal,
        mode=row.mode,
        provider=row.provider,
        status=row.status,
        reason=row.reason,
        note=row.note,
        median_ms=_ms(t and t.median_s),
        p20_ms=_ms(t and t.p20_s),
        p80_ms=_ms(t and t.p80_s),
        samples=t and t.samples,
        gflop=row.flops / 1e9,
        tflops=row.tflops,
        kv_gbps=None if t is None else c.kv_bytes / t.median_s / 1e9,
        pct_of_copy=None if t is None else 100 * c.kv_bytes / t.median_s / 1e9 / meta["ceilings"]["copy_gbps"],
        pct_of_matmul_peak=None if row.tflops is None or not peak else 100 * row.tflops / peak,
        peak_mem_mib=None if row.peak_bytes is None else row.peak_bytes / 2**20,
        max_err=g and g.max_err,
        err_bound=g and g.bound,
        err_tensor=g and g.tensor,
        checked_on=g and g.checked_on,
        speedup_vs_sdpa=row.speedup_vs_sdpa,
        speedup_vs_best_sdpa=row.speedup_vs_best_sdpa,
        best_sdpa=row.best_sdpa,
    )
    return rec


# ---- markdown ---------------------------------------------------------------------------------


def _num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:.0f}"


def _short(text: str) -> str:
    text = text.replace("|", "/")
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 1] + "…"


def header_markdown(meta: dict) -> str:
    """The title, the environment and the machine's ceilings."""
    c = meta["ceilings"]
    matmul = ", ".join(f"{dt} {v:.3g}" for dt, v in c["matmul_tflops"].items())
    load = ", ".join(f"{x:.2f}" for x in meta["loadavg_start"])
    lines = [
        f"# fastattn benchmark: {meta['device_name']} ({meta['device']})",
        "",
        f"`{meta['command']}` · {meta['date']} · load average at start {load}"
        + (f", at end {', '.join(f'{x:.2f}' for x in meta['loadavg_end'])}" if "loadavg_end" in meta else "")
        + (f" · took {meta['duration_s']:.0f} s" if "duration_s" in meta else ""),
        "",
        "```",
        *meta["environment"],
        "```",
        "",
        f"Ceilings measured in this run: matmul TFLOP/s ({c['matmul_n']}x{c['matmul_n']} torch.mm): {matmul}; "
        f"device-to-device copy {c['copy_gbps']:.3g} GB/s (read + write).",
        "",
        "TFLOP/s: forward 4·B·H·L·S·D, halved when causal; backward 2.5x, fwd+bwd 3.5x the forward. "
        "Decode rows: K/V bytes read (2·B·Hkv·S·D·itemsize) per second, against the copy rate. "
        "% of matmul: TFLOP/s over this run's torch.mm rate in the same dtype (a fused kernel can pass it "
        "where torch.mm does not reach the chip's peak). Times: median (p20–p80). Peak MiB: what one call "
        "allocates beyond its inputs. Every timed row first matched the float64 reference within its bound "
        "(error / bound).",
    ]
    return "\n".join(lines) + "\n"


def case_markdown(records: Sequence[dict]) -> str:
    """The table of one case: a row per mode and provider."""
    first = records[0]
    gflop = ", ".join(f"{m} {r['gflop']:.3g}" for m, r in {r["mode"]: r for r in records}.items())
    lines = [
        f"## {first['family']} · {first['case']}",
        "",
        f"GFLOP per call: {gflop}",
        "",
        "| mode | provider | status | median ms (p20–p80) | TFLOP/s | % of matmul | peak MiB | error / bound | note |",
        "|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in records:
        if r["status"] == "ok":
            time = f"{_num(r['median_ms'])} ({_num(r['p20_ms'])}–{_num(r['p80_ms'])})"
            err = f"{r['max_err']:.1e} / {r['err_bound']:.1e}"
            if r["checked_on"] != "full":
                err += f" (on {r['checked_on']})"
            note = r["note"]
            if r["family"] == "decode" and r["kv_gbps"] is not None:
                kv = f"K/V read at {_num(r['kv_gbps'])} GB/s ({_num(r['pct_of_copy'])}% of copy)"
                note = "; ".join(filter(None, [note, kv]))
            if r["speedup_vs_best_sdpa"] is not None:
                vs = f"{_num(r['speedup_vs_sdpa'])}x sdpa, " if r["speedup_vs_sdpa"] is not None else ""
                note = "; ".join(
                    filter(None, [note, f"{vs}{_num(r['speedup_vs_best_sdpa'])}x best ({r['best_sdpa']})"])
                )
            cells = [time, _num(r["tflops"]), _num(r["pct_of_matmul_peak"], 2), _num(r["peak_mem_mib"]), err, note]
        else:
            cells = ["–", "–", "–", "–", "–", _short(r["reason"])]
        lines.append("| " + " | ".join([r["mode"], r["provider"], r["status"], *cells]) + " |")
    return "\n".join(lines) + "\n"


def summary_markdown(records: Sequence[dict], provider: str = "fastattn") -> str:
    """The headline: `provider` against SDPA, per case and mode. A mode in which `provider` has
    no timed row is one line saying why instead of a column of dashes."""
    lines = []
    table = [
        f"| mode | case | {provider} ms | TFLOP/s | SDPA ms | best SDPA | best ms | vs SDPA | vs best |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    timed = False
    for mode in MODES:
        mine = [r for r in records if r["mode"] == mode and r["provider"] == provider]
        if not mine:
            continue
        if not any(r["status"] == "ok" for r in mine):
            reasons = dict.fromkeys(f"{r['status']}: {_short(r['reason'])}" for r in mine)
            lines.append(f"- {mode}: no {provider} time in any case ({'; '.join(reasons)})")
            continue
        for r in mine:
            same = {
                x["provider"]: x
                for x in records
                if x["mode"] == mode and x["case"] == r["case"] and x["config"] == r["config"] and x["status"] == "ok"
            }
            sdpa, best = same.get("sdpa"), same.get(r["best_sdpa"] or "")
            if r["status"] == "ok":
                mine_cells = [_num(r["median_ms"]), _num(r["tflops"])]
            else:
                mine_cells = [f"{r['status']}: {_short(r['reason'])}", "–"]
            table.append(
                "| "
                + " | ".join(
                    [
                        mode,
                        f"{r['family']} {r['case']}",
                        *mine_cells,
                        _num(sdpa and sdpa["median_ms"]),
                        r["best_sdpa"] or "–",
                        _num(best and best["median_ms"]),
                        _num(r["speedup_vs_sdpa"], 2),
                        _num(r["speedup_vs_best_sdpa"], 2),
                    ]
                )
                + " |"
            )
            timed = True
    out = table if timed else []
    for mode in MODES:
        speedups = [
            r["speedup_vs_sdpa"]
            for r in records
            if r["mode"] == mode and r["provider"] == provider and r["speedup_vs_sdpa"]
        ]
        if speedups:
            geomean = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
            lines.append(
                f"- {mode}: {provider} vs SDPA's own choice over {len(speedups)} cases: geometric mean "
                f"{geomean:.2f}x, range {min(speedups):.2f}x–{max(speedups):.2f}x (> 1: {provider} is faster)"
            )
    return "\n".join(out + ([""] if out and lines else []) + lines) + "\n"


def markdown(meta: dict, records: Sequence[dict]) -> str:
    """The whole report: header, one table per case (in sweep order), then the summary."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["config"], r["case"]), []).append(r)
    parts = [header_markdown(meta), *(case_markdown(g) for g in groups.values())]
    parts.append("## Summary: fastattn vs SDPA\n\n" + summary_markdown(records))
    return "\n".join(parts)


# ---- files ------------------------------------------------------------------------------------


def write_csv(path: Path, records: Iterable[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(records)


def write_json(path: Path, meta: dict, records: Sequence[dict]) -> None:
    path.write_text(json.dumps({"meta": meta, "rows": list(records)}, indent=1) + "\n")


def write_plots(out_dir: Path, records: Sequence[dict]) -> list[Path]:
    """tflops_<mode>.png per mode with timed rows, and speedup.png when fastattn has speed-ups.
    Without matplotlib: writes nothing, says so on stderr and returns []."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG plots (pip install 'fastattn[bench]')", file=sys.stderr)
        return []
    written = []
    ok = [r for r in records if r["status"] == "ok"]
    providers = list(dict.fromkeys(r["provider"] for r in records))
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(providers)}
    for mode in MODES:
        rows = [r for r in ok if r["mode"] == mode]
        configs = list(dict.fromkeys(r["config"] for r in rows))
        if not configs:
            continue
        fig, axes = _grid(plt, len(configs))
        for ax, config in zip(axes, configs):
            for p in providers:
                points = sorted((r["L"], r["tflops"]) for r in rows if r["config"] == config and r["provider"] == p)
                if points:
                    ax.plot(*zip(*points), marker="o", label=p, color=colors[p])
            _axes(ax, config, "TFLOP/s", [r["L"] for r in rows if r["config"] == config])
        _legend(fig, axes)
        fig.suptitle(f"{mode}: TFLOP/s against sequence length ({records[0]['device_name']})")
        written.append(_save(fig, plt, out_dir / f"tflops_{mode}.png"))
    with_speedup = [r for r in records if r["provider"] == "fastattn" and r["speedup_vs_best_sdpa"] is not None]
    modes = list(dict.fromkeys(r["mode"] for r in with_speedup))
    if modes:
        fig, axes = _grid(plt, len(modes))
        for ax, mode in zip(axes, modes):
            rows = [r for r in with_speedup if r["mode"] == mode]
            for i, config in enumerate(dict.fromkeys(r["config"] for r in rows)):
                color = plt.get_cmap("tab10")(i % 10)
                points = sorted(
                    (r["L"], r["speedup_vs_sdpa"], r["speedup_vs_best_sdpa"]) for r in rows if r["config"] == config
                )
                L, vs_sdpa, vs_best = zip(*points)
                if all(s is not None for s in vs_sdpa):
                    ax.plot(L, vs_sdpa, marker="o", color=color, label=f"{config} vs sdpa")
                ax.plot(L, vs_best, marker="x", linestyle="--", color=color, label=f"{config} vs best SDPA")
            ax.axhline(1.0, color="gray", linewidth=0.8)
            _axes(ax, mode, "speed-up (x)", [r["L"] for r in rows])
        _legend(fig, axes)
        fig.suptitle(f"fastattn speed-up over SDPA (> 1: faster; {records[0]['device_name']})")
        written.append(_save(fig, plt, out_dir / "speedup.png"))
    return written


def _grid(plt, n: int):
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.4 * rows), squeeze=False)
    flat = axes.ravel().tolist()
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _axes(ax, title: str, ylabel: str, seqlens: Sequence[int]) -> None:
    """Log-2 seqlen axis labelled with the lengths themselves; y from 0 so gaps keep their size."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(seqlens)), [str(L) for L in sorted(set(seqlens))])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("sequence length L = S")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def _legend(fig, axes) -> None:
    """One legend for the figure, right of the panels."""
    labels: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    fig.legend(labels.values(), labels.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_outputs(out_dir: Path, meta: dict, records: Sequence[dict]) -> list[Path]:
    """results.csv, results.json, results.md and the plots; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "results.csv", records)
    write_json(out_dir / "results.json", meta, records)
    (out_dir / "results.md").write_text(markdown(meta, records))
    return [out_dir / name for name in ("results.csv", "results.json", "results.md")] + write_plots(out_dir, records)

"""`python -m fastattn.bench.readme DIR [DIR ...] [--readme README.md]`: the README's benchmark
results, rendered from the results.json that ``python -m fastattn.bench --out DIR`` wrote.

For each DIR: where and how it was measured (device, versions, date, command, load average, the
machine's ceilings), the headline table (fastattn against SDPA per case and mode, from
:func:`fastattn.bench.report.summary_markdown`) and one plot (tflops_fwd.png). Without --readme
the section is printed; with it, the text between ``<!-- bench-results -->`` and
``<!-- /bench-results -->`` in that file is replaced, links made relative to the file's folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .report import summary_markdown

BEGIN, END = "<!-- bench-results -->", "<!-- /bench-results -->"


def render(result_dir: Path, base: Path) -> str:
    """The section for one results folder; links are relative to `base`."""
    data = json.loads((result_dir / "results.json").read_text())
    meta, records = data["meta"], data["rows"]
    rel = lambda name: Path(os.path.relpath(result_dir / name, base)).as_posix()
    ceilings = meta["ceilings"]
    matmul = ", ".join(f"{dt} matmul {v:.3g} TFLOP/s" for dt, v in ceilings["matmul_tflops"].items())
    load = f"{meta['loadavg_start'][0]:.2f} at start"
    if "loadavg_end" in meta:
        load += f", {meta['loadavg_end'][0]:.2f} at end"
    lines = [
        f"**{meta['device_name']}** (`{meta['device']}`, {meta['threads']} threads), {meta['date']}: "
        f"`{meta['command']}` with torch {meta['torch']}, triton {meta['triton']}, fastattn {meta['fastattn']}, "
        f"python {meta['python']}; 1-minute load average {load}. "
        f"This machine's ceilings in the same run: {matmul}, copy {ceilings['copy_gbps']:.3g} GB/s. "
        f"Every timed row first matched the float64 reference. "
        f"All rows and providers: [{rel('results.md')}]({rel('results.md')}) "
        f"([csv]({rel('results.csv')}), [json]({rel('results.json')})).",
        "",
        summary_markdown(records).rstrip(),
    ]
    plots = sorted(result_dir.glob("tflops_*.png"), key=lambda p: p.name != "tflops_fwd.png")
    if plots:
        lines += ["", f"![TFLOP/s against sequence length, {meta['device_name']}]({rel(plots[0].name)})"]
    return "\n".join(lines) + "\n"


def replace_section(text: str, section: str, begin: str = BEGIN, end: str = END) -> str:
    """`text` with what lies between the markers `begin` and `end` replaced by `section`."""
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"no {begin} ... {end} block to replace")
    return text[: start + len(begin)] + "\n" + section + text[stop:]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastattn.bench.readme", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="folders holding a results.json")
    parser.add_argument("--readme", type=Path, help="rewrite the bench-results block of this file")
    args = parser.parse_args(argv)
    base = args.readme.parent if args.readme else Path.cwd()
    section = "\n".join(render(d, base) for d in args.dirs)
    if args.readme is None:
        sys.stdout.write(section)
    else:
        args.readme.write_text(replace_section(args.readme.read_text(), section))
    return 0


if __name__ == "__main__":
    sys.exit(main())

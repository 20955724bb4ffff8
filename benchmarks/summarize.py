"""Turn the CSVs of one benchmark folder into a Markdown summary (one table per CSV).

    python -m benchmarks.summarize FOLDER > FOLDER/SUMMARY.md

Each table shows the columns of ``COLUMNS`` that its CSV has, in that order; a CSV with none of them
shows all of its columns. The device, versions and git SHA (the same in every row of a run) head the
table instead of repeating in each row.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

# The columns worth reading, across the kinds of CSV a run writes: environment (item, value), the doctor's
# checks, the SDXL step rows, the kernel benchmarks.
COLUMNS = [
    "section", "item", "value", "config", "mode", "op", "variant", "shape", "dtype", "provider", "result",
    "tflops_per_step", "tome_ratio", "ms", "ms_per_step", "speedup", "eta", "tflops", "gbps", "texps",
    "floor_ms", "pct_of_floor", "extra_mb", "peak_mem_mb", "finite_output", "map_ms", "gwpr_ms", "topk_ms",
    "gather_ms", "recovery_match_ms", "recovery_copy_ms", "overhead_ms", "overhead_share", "error", "note",
]
STAMP = ["device", "torch", "triton", "git_sha", "triton_interpret"]


def _cell(value: str) -> str:
    try:
        return f"{float(value):.3g}"
    except ValueError:
        return value.replace("|", "/")


def summarize(folder: Path) -> str:
    parts = []
    for path in sorted(folder.glob("*.csv")):
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows:
            continue
        first = rows[0]
        parts.append(f"## {path.stem}\n\n{first.get('device', '?')}, torch {first.get('torch', '?')}, "
                     f"triton {first.get('triton', '?')}, git {first.get('git_sha', '?')}\n")
        columns = [column for column in COLUMNS if column in first]
        columns = columns or [column for column in first if column not in STAMP]
        parts.append("| " + " | ".join(columns) + " |")
        parts.append("|" + "---|" * len(columns))
        parts += ["| " + " | ".join(_cell(row.get(column) or "") for column in columns) + " |" for row in rows]
        parts.append("")
    return "\n".join(parts)


if __name__ == "__main__":
    print(summarize(Path(sys.argv[1])))

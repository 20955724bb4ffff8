"""Turn the CSVs of one benchmark folder into a Markdown summary (one table per CSV).

    python -m benchmarks.summarize FOLDER > FOLDER/SUMMARY.md
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

COLUMNS = ["op", "variant", "shape", "dtype", "provider", "ms", "tflops", "gbps", "floor_ms", "pct_of_floor", "extra_mb", "error"]


def _cell(value: str) -> str:
    try:
        return f"{float(value):.3g}"
    except ValueError:
        return value


def summarize(folder: Path) -> str:
    parts = []
    for path in sorted(folder.glob("*.csv")):
        rows = list(csv.DictReader(path.open()))
        if not rows:
            continue
        first = rows[0]
        parts.append(f"## {path.stem}\n\n{first.get('device', '?')}, torch {first.get('torch', '?')}, "
                     f"triton {first.get('triton', '?')}, git {first.get('git_sha', '?')}\n")
        columns = [column for column in COLUMNS if column in first]
        parts.append("| " + " | ".join(columns) + " |")
        parts.append("|" + "---|" * len(columns))
        parts += ["| " + " | ".join(_cell(row.get(column, "")) for column in columns) + " |" for row in rows]
        parts.append("")
    return "\n".join(parts)


if __name__ == "__main__":
    print(summarize(Path(sys.argv[1])))

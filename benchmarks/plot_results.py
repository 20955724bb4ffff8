"""Plots for RESULTS.md from a ``bench_sdxl_step`` CSV: speed-up vs counted TFLOPs, and AT-EDM's overhead.

    python -m benchmarks.plot_results benchmarks/results/sdxl_step.csv --out benchmarks/results/cpu

Writes ``speedup_vs_tflops.png`` (AT-EDM presets and ToMe against the FLOPs-ideal curve full/x) and
``overhead_breakdown.png`` (a stacked bar per AT-EDM row: map, G-WPR, top-k, gather, recovery, as a share
of the step), for one device/batch/mode slice of the CSV (the last run's by default).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STAGES = ["map", "gwpr", "topk", "gather", "recovery_match", "recovery_copy"]


def load_slice(path: Path, batch: str | None, mode: str) -> list[dict]:
    rows = [row for row in csv.DictReader(path.open()) if row["mode"] == mode]
    if batch is not None:
        rows = [row for row in rows if row["batch"] == batch]
    if not rows:
        raise SystemExit(f"no rows with mode={mode} batch={batch} in {path}")
    sha = rows[-1]["git_sha"]  # the last run recorded
    return [row for row in rows if row["git_sha"] == sha][-len({r["config"] for r in rows}):]


def plot_speedup(rows: list[dict], out: Path, title: str) -> Path:
    full = next(row for row in rows if row["config"] == "full")
    full_tflops = float(full["tflops_per_step"])
    fig, ax = plt.subplots(figsize=(6, 4.2))
    xs = sorted(float(row["tflops_per_step"]) for row in rows)
    grid = [xs[0] * 0.95 + (full_tflops - xs[0] * 0.95) * i / 50 for i in range(51)]
    ax.plot(grid, [full_tflops / x for x in grid], color="grey", linestyle="--", label="FLOPs-ideal (eta = 1)")
    for kind, marker, color in (("atedm", "o", "tab:blue"), ("tomesd", "s", "tab:orange"), ("full", "*", "black")):
        chosen = [row for row in rows if _kind(row["config"]) == kind]
        ax.scatter([float(r["tflops_per_step"]) for r in chosen], [float(r["speedup"]) for r in chosen],
                   marker=marker, color=color, label={"atedm": "AT-EDM", "tomesd": "ToMe", "full": "full SDXL"}[kind])
        for row in chosen:
            ax.annotate(row["config"], (float(row["tflops_per_step"]), float(row["speedup"])), fontsize=8,
                        xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("counted UNet TFLOPs per step (per image)")
    ax.set_ylabel("measured speed-up over full SDXL")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out / "speedup_vs_tflops.png")


def plot_overhead(rows: list[dict], out: Path, title: str) -> Path:
    chosen = [row for row in rows if row.get("overhead_ms")]
    fig, ax = plt.subplots(figsize=(6, 4))
    bottoms = [0.0] * len(chosen)
    for stage in STAGES:
        shares = [100 * float(row[f"{stage}_ms"]) / float(row["ms_per_step"]) for row in chosen]
        ax.bar([row["config"] for row in chosen], shares, bottom=bottoms, label=stage)
        bottoms = [b + s for b, s in zip(bottoms, shares)]
    ax.set_ylabel("share of the step (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, out / "overhead_breakdown.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _kind(config: str) -> str:
    return "full" if config == "full" else "tomesd" if config.startswith("tomesd") else "atedm"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", default=None)
    parser.add_argument("--mode", default="eager")
    args = parser.parse_args()
    rows = load_slice(args.csv, args.batch, args.mode)
    args.out.mkdir(parents=True, exist_ok=True)
    first = rows[0]
    title = (f"{first['device']}, {first['dtype']}, {first['height']}x{first['width']}, batch {first['batch']}, "
             f"{args.mode}, git {first['git_sha']}")
    print(plot_speedup(rows, args.out, title))
    print(plot_overhead(rows, args.out, title))


if __name__ == "__main__":
    main()

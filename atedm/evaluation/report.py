"""Results on disk: ``metrics.json`` (settings, methods, versions, rows), ``metrics.csv`` (the rows) and the
paper's two figures as PNGs: FID vs TFLOPs/step (one line per method family and CFG scale) and FID vs CLIP
score (one line per config, across CFG scales)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .generate import write_bytes_atomically

CSV_COLUMNS = ("config", "family", "cfg_scale", "num_images", "fid", "clip_score", "tflops_per_step",
               "overhead_tflops", "flops_counted", "tome_ratio", "paper_fid", "paper_clip")


def write_results(out: Path, results: dict) -> None:
    rows = results["results"]
    write_bytes_atomically(out / "metrics.json", (json.dumps(results, indent=2) + "\n").encode())
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({column: row.get(column) for column in CSV_COLUMNS} for row in rows)
    write_bytes_atomically(out / "metrics.csv", text.getvalue().encode())
    write_bytes_atomically(out / "fid_vs_tflops.png", plot_fid_vs_tflops(rows))
    write_bytes_atomically(out / "fid_vs_clip.png", plot_fid_vs_clip(rows))


def _figure():
    # The object API without pyplot: no global backend or figure registry is touched.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.8), dpi=120)
    return figure, figure.add_subplot()


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def plot_fid_vs_tflops(rows: list[dict]) -> bytes:
    """FID against TFLOPs/step: per (family, CFG scale) one line through its configs, sorted by FLOPs."""
    figure, axes = _figure()
    scales = sorted({row["cfg_scale"] for row in rows})
    for family in dict.fromkeys(row["family"] for row in rows):
        for scale in scales:
            points = sorted((row["tflops_per_step"], row["fid"], row["config"]) for row in rows
                            if row["family"] == family and row["cfg_scale"] == scale)
            if not points:
                continue
            label = family if len(scales) == 1 else f"{family}, CFG {scale:g}"
            axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
            for flops, fid, name in points:
                axes.annotate(name, (flops, fid), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("TFLOPs per step (UNet, one image)")
    axes.set_ylabel("FID (lower is better)")
    axes.set_title("FID vs compute")
    axes.grid(alpha=0.3)
    axes.legend()
    return _png(figure)


def plot_fid_vs_clip(rows: list[dict]) -> bytes:
    """FID against CLIP score: per config one line over its CFG scales, each point labelled with the scale."""
    figure, axes = _figure()
    for name in dict.fromkeys(row["config"] for row in rows):
        points = sorted((row["cfg_scale"], row["clip_score"], row["fid"]) for row in rows if row["config"] == name)
        axes.plot([p[1] for p in points], [p[2] for p in points], marker="o", label=name)
        for scale, clip, fid in points:
            axes.annotate(f"{scale:g}", (clip, fid), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("CLIP score (cosine similarity)")
    axes.set_ylabel("FID (lower is better)")
    axes.set_title("FID vs CLIP score over CFG scales")
    axes.grid(alpha=0.3)
    axes.legend()
    return _png(figure)

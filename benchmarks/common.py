"""Shared plumbing for the benchmarks: timing, the environment stamp and CSV rows.

Every figure a benchmark writes carries the machine, GPU, versions and git SHA next to it, so a CSV row
can be read on its own.
"""

from __future__ import annotations

import csv
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip()
    except Exception:
        return "unknown"


def environment_info(device: torch.device | str | None = None) -> dict:
    """Machine, accelerator and versions, as CSV columns."""
    device = torch.device(device) if device is not None else None
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    if device is not None and device.type == "cuda":
        accelerator = torch.cuda.get_device_name(device)
    else:
        accelerator = f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    return {
        "device": accelerator,
        "torch": torch.__version__,
        "triton": triton_version,
        "git_sha": git_sha(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }


def time_ms(fn: Callable[[], object], device: torch.device | str, warmup: int = 3, repeats: int = 20) -> dict:
    """Median and quartiles of ``fn`` in ms: triton.testing.do_bench on CUDA, wall clock on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing

        q20, median, q80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.2, 0.5, 0.8])
        return {"ms": median, "ms_q20": q20, "ms_q80": q80}
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    quartiles = statistics.quantiles(samples, n=5) if len(samples) > 1 else samples * 4
    return {"ms": statistics.median(samples), "ms_q20": quartiles[0], "ms_q80": quartiles[-1]}


def write_rows(path: Path | str, rows: list[dict]) -> Path:
    """Append rows to a CSV (header from the first row's keys when the file is new)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    fields = list(rows[0].keys())
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def pick_device(requested: str | None) -> torch.device:
    """CUDA when present; on the CPU a kernel benchmark runs the reference providers only."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

"""The end-to-end benchmarks run (tiny UNet, tiny size): every kind of row and the overhead breakdown."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The benchmarks run for their rows, not their speed: one thread each, since OpenMP threads spinning for
# cores that a busy machine does not have made the tiny UNet's steps up to 30x slower.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_bench_sdxl_step_runs_every_kind_of_row(tmp_path):
    """Every kind of row, eager; then --compile with a 1 s budget: each compiled row is skipped, with the reason."""
    out = tmp_path / "step.csv"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_sdxl_step", "--tiny", "--height", "64", "--width", "64",
         "--repeats", "1", "--configs", "full,c,dagger,c-ref,tomesd-0.5", "--compile", "--time-budget", "1",
         "--out", str(out)],
        cwd=ROOT, env=ONE_THREAD, check=True, capture_output=True, text=True, timeout=600,
    )
    rows = list(csv.DictReader(out.open()))
    configs = ["full", "c", "dagger", "c-ref", "tomesd-0.5"]
    assert [(row["config"], row["mode"]) for row in rows] == [(c, "eager") for c in configs] + [(c, "compiled") for c in configs]
    by_name = {row["config"]: row for row in rows if row["mode"] == "eager"}
    for row in by_name.values():  # every speed-up is against the full row of the same run
        assert float(row["speedup"]) == pytest.approx(float(by_name["full"]["ms_per_step"]) / float(row["ms_per_step"]), rel=1e-3)
    assert float(by_name["c"]["tflops_per_step"]) < float(by_name["dagger"]["tflops_per_step"]) < float(by_name["full"]["tflops_per_step"])
    assert float(by_name["c"]["overhead_ms"]) > 0 and 0 < float(by_name["c"]["overhead_share"]) < 1
    assert by_name["tomesd-0.5"]["overhead_ms"] == ""  # the breakdown is AT-EDM's only
    assert float(by_name["tomesd-0.5"]["tome_ratio"]) == 0.5
    compiled = rows[len(configs):]
    assert all(row["ms_per_step"] == "" and row["tflops_per_step"] != "" for row in compiled)
    assert compiled[0]["note"].startswith("not compiled: ") and "s of the time budget left" in compiled[0]["note"]
    assert all(row["note"] == "not compiled: the compiled baseline (full) was skipped" for row in compiled[1:])


def test_bench_generation_runs_a_whole_denoising_loop(tmp_path):
    out = tmp_path / "generation.csv"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_generation", "--tiny", "--height", "64", "--width", "64",
         "--steps", "4", "--repeats", "1", "--configs", "full,c,tomesd-0.5", "--out", str(out)],
        cwd=ROOT, env=ONE_THREAD, check=True, capture_output=True, text=True, timeout=600,
    )
    rows = list(csv.DictReader(out.open()))
    assert [(row["config"], row["steps"]) for row in rows] == [("full", "4"), ("c", "4"), ("tomesd-0.5", "4")]
    assert all(float(row["seconds"]) > 0 for row in rows)
    assert all(float(row["speedup"]) == pytest.approx(float(rows[0]["seconds"]) / float(row["seconds"]), rel=1e-3)
               for row in rows)


def test_bench_cpu_pruning_layer_times_every_route(tmp_path):
    out = tmp_path / "layer.csv"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_cpu_pruning_layer", "--sizes", "128", "--repeats", "1",
         "--dtype", "float32", "--out", str(out)],
        cwd=ROOT, env=ONE_THREAD, check=True, capture_output=True, text=True, timeout=600,
    )
    rows = list(csv.DictReader(out.open()))
    assert [(row["level"], row["route"]) for row in rows] == [
        (level, route) for level in ("2", "3") for route in ("sdpa", "two_pass", "one_pass")]
    assert [int(row["tokens"]) for row in rows] == [64] * 3 + [16] * 3  # 128 px: 8x8 and 4x4 latent grids
    assert all(float(row["ms"]) > 0 for row in rows)
    sdpa_ms = {row["level"]: float(row["ms"]) for row in rows if row["route"] == "sdpa"}
    for row in rows:  # a route's overhead is its time beyond plain SDPA at the same level
        assert float(row["overhead_ms"]) == pytest.approx(float(row["ms"]) - sdpa_ms[row["level"]], abs=1e-3)


def test_breakdown_times_the_one_pass_route(monkeypatch):
    """The CPU's one-pass route must show up in the breakdown: its G-WPR walk over the prebuilt map under
    "gwpr", and the one-pass call's time beyond plain attention under "map". A one-pass call made 50 ms
    slower must show at least those 50 ms under "map", the difference of the two raw sums."""
    import time

    import torch

    import atedm.patch as patch
    from atedm_kernels import plan_token_pruning
    from benchmarks.bench_sdxl_step import stage_timers

    one_pass = patch.attention_with_map

    def slower_one_pass(*args, **kwargs):
        time.sleep(0.05)
        return one_pass(*args, **kwargs)

    monkeypatch.setattr(patch, "attention_with_map", slower_one_pass)
    q, k, v = (torch.randn(2, 4, 48, 16) for _ in range(3))
    totals = {}
    with stage_timers(torch.device("cpu"), totals):
        _, attention_map = patch.attention_with_map(q, k, v)
        plan_token_pruning(q, k, None, 20, attention_map=attention_map, backend="torch")
    assert totals["gwpr"] > 0.0 and totals["plain_attention"] > 0.0
    assert totals["map"] == max(0.0, totals["one_pass_attention"] - totals["plain_attention"])
    assert totals["map"] >= 50.0 - totals["plain_attention"]
    assert patch.attention_with_map is slower_one_pass  # the timer is undone on exit

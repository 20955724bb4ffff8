"""Ahead-of-time compile check (``atedm_kernels/aot.py``): every kernel, every autotune config, fp16 and
bf16, SDXL's shapes, built for sm_80 and sm_90 with Triton's compiler and its bundled ptxas, no GPU.

The check runs in a subprocess with ``TRITON_INTERPRET=0`` (this process runs the interpreter, under which
the kernels are not compilable). It reuses the rows of ``docs/aot_compile.json`` whose Triton cache key
is unchanged, so only kernels edited since the table was generated are compiled here (all of them, about
4 minutes on 2 cores, after a Triton upgrade).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GENERATED_TABLE = REPO / "docs" / "aot_compile.json"


def run_aot_check(output: Path, *args: str) -> tuple[dict, str]:
    """``python -m atedm_kernels.aot --json output *args`` compiled for real; returns (report, its log)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    process = subprocess.run(
        [sys.executable, "-m", "atedm_kernels.aot", "--json", str(output), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    log = process.stdout + process.stderr
    assert output.exists(), f"the AOT check wrote no report (exit {process.returncode}):\n{log[-4000:]}"
    return json.loads(output.read_text()), log


@pytest.fixture(scope="module")
def full_check(tmp_path_factory):
    return run_aot_check(tmp_path_factory.mktemp("aot") / "aot.json", "--cache", str(GENERATED_TABLE))


def test_every_binary_compiles_without_spills_and_fits_shared_memory(full_check):
    report, log = full_check
    rows = report["rows"]
    # Both archs, both dtypes and all three shapes must be in the registry, not just "something compiled".
    assert {row["arch"] for row in rows} == {80, 90}
    assert {dtype for row in rows for dtype in row["dtype"].split(", ")} == {"fp16", "bf16"}
    assert {shape for row in rows for shape in row["shape"].split(", ")} == {"L2 1024px", "L3 1024px", "L2 2048px"}
    failures = [
        f"{row['kernel']} [{row['config']}] {row['dtype']} sm_{row['arch']}: error={row['error']}, spills "
        f"{row['spill_store_bytes']}/{row['spill_load_bytes']} B, shared {row['shared_bytes']}/{row['shared_limit']} B"
        for row in rows
        if row["error"] is not None or row["spill_store_bytes"] != 0 or row["spill_load_bytes"] != 0
        or row["shared_bytes"] > row["shared_limit"]
    ]
    assert not failures, "\n".join(failures) + f"\n\nlog tail:\n{log[-3000:]}"


def test_registry_covers_every_kernel(full_check):
    report, _ = full_check
    assert report["unregistered_kernels"] == []
    assert set(report["kernels"]) == {row["kernel"] for row in report["rows"]}
    # Discovery finds the launched kernels and leaves out the @jit helpers that kernels call.
    assert {
        "attention_lse._attention_lse_kernel", "attention_map._head_mean_map_kernel", "gwpr._map_power_step_kernel",
        "gwpr._weighted_column_sums_kernel", "topk_gather._topk_keep_kernel", "topk_gather._gather_rows_kernel",
        "recovery._match_from_map_kernel", "recovery._match_from_qk_kernel", "recovery._match_key_cosine_kernel",
    } <= set(report["kernels"])
    helpers = {"_online_softmax_tile", "load_head_rows", "_order_key", "_fold_running_argmax"}
    assert not {name.rsplit(".", 1)[1] for name in report["kernels"]} & helpers


def test_every_autotune_config_is_built_for_every_arch(full_check):
    report, _ = full_check
    assert {"attention_lse._attention_lse_kernel", "attention_map._head_mean_map_kernel", "gwpr._map_power_step_kernel",
            "gwpr._weighted_column_sums_kernel"} <= set(report["autotune_configs"])
    for kernel, configs in report["autotune_configs"].items():
        for arch in (80, 90):
            labels = [set(row["config"].split()) for row in report["rows"]
                      if row["kernel"] == kernel and row["arch"] == arch]
            for config in configs:
                wanted = {f"{name}={value}" for name, value in config.items()
                          if name not in ("num_warps", "num_stages")}
                wanted |= {f"w{config['num_warps']}", f"s{config['num_stages']}"}
                assert any(wanted <= label for label in labels), f"{kernel} {config} not built for sm_{arch}"


def test_check_reports_spills_and_shared_memory_overflow(tmp_path):
    """Deliberately bad variants of real launches, compiled for real: a register cap far below what the
    power step needs must spill, and eight pipeline stages of 64 x 128 attention tiles (K and V, 32 KiB a
    stage) must overflow sm_90's 227 KiB."""
    report, log = run_aot_check(
        tmp_path / "trial.json", "--no-cache", "--arch", "90", "--jobs", "1",
        "--trial", "gwpr._map_power_step_kernel:maxnreg=24",
        "--trial", "attention_lse._attention_lse_kernel:BLOCK_M=64,BLOCK_N=128,num_stages=8",
    )
    spilling, overflowing = report["rows"]
    assert spilling["error"] is None and overflowing["error"] is None, log[-3000:]
    assert spilling["registers"] <= 24 and spilling["spill_store_bytes"] > 0 and spilling["spill_load_bytes"] > 0
    assert not spilling["passed"]
    assert overflowing["shared_bytes"] > overflowing["shared_limit"] == 232448
    assert not overflowing["passed"]

"""The one GPU run (benchmarks/gpu_run.py) cannot rot: its CPU dry run runs every step and each step writes
its rows; a step past its budget is killed and reported while the next still runs; without CUDA and without
--dry-run it refuses."""

import csv
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from benchmarks import bench_attention_lse, bench_gwpr, bench_prune_plan, bench_recovery, bench_topk_gather
from benchmarks.gpu_run import KERNEL_BENCHMARKS, STEP_ORDER, Command, RunRecord, Step, run_steps

ROOT = Path(__file__).resolve().parent.parent

HEADLINE_CONFIGS = ["full", "c", "dagger", "c-ref", "tomesd@c"]
STAGE_COLUMNS = ["map_ms", "gwpr_ms", "topk_ms", "gather_ms", "recovery_match_ms", "recovery_copy_ms"]


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def make_probe_wheel(folder: Path) -> None:
    """A one-module wheel: the dry run must install it and the later steps must import it from there."""
    name, version = "atedm_probe", "1.0"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f'__version__ = "{version}"\n',
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: atedm-probe\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_run")
    wheelhouse = tmp_path_factory.mktemp("wheelhouse")
    make_probe_wheel(wheelhouse)
    env = {key: value for key, value in os.environ.items() if key != "OUT"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_run", "--dry-run", "--out", str(out),
                           "--wheelhouse", str(wheelhouse)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    run_dirs = [path for path in out.iterdir() if path.is_dir()]
    assert len(run_dirs) == 1, done.stdout[-3000:] + done.stderr[-3000:]
    return done, out, run_dirs[0]


def test_dry_run_finishes_every_step_ok(dry_run):
    done, out, run_dir = dry_run
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    summary = (run_dir / "SUMMARY.md").read_text()
    for step in STEP_ORDER:
        assert f"| {step} | ok |" in summary
    for name in KERNEL_BENCHMARKS:
        assert f"| kernels | bench_{name} | ok |" in summary
    assert (out / "results.md").read_text().startswith(summary)
    with tarfile.open(out / f"{run_dir.name}.tar.gz") as archive:
        archived = {Path(name).name for name in archive.getnames()}
    assert {path.name for path in run_dir.iterdir()} <= archived
    combined = read_csv(out / "results.csv")
    assert len(combined) == sum(len(read_csv(path)) for path in run_dir.glob("*.csv"))


def test_dry_run_installs_the_wheelhouse_for_the_later_steps(dry_run):
    _, _, run_dir = dry_run
    values = {row["item"]: row["value"] for row in read_csv(run_dir / "environment.csv")}
    assert values["wheel:atedm-probe"] == "1.0 -> atedm_probe"
    assert values["atedm_probe"] == "1.0 (wheelhouse)"  # imported by a later process, from the target
    assert not values["diffusers"].startswith("MISSING") and not values["tomesd"].startswith("MISSING")
    assert values["triton_interpret"] == "1"


def test_dry_run_checks_every_op_and_the_chain(dry_run):
    _, _, run_dir = dry_run
    rows = read_csv(run_dir / "checks.csv")
    assert {row["item"] for row in rows} >= {"attention_with_lse", "head_mean_attention_map", "gwpr_scores",
                                             "topk_keep_indices", "recovery_source", "gather_tokens",
                                             "scatter_recover", "chain"}
    assert all(row["result"] == "ok" for row in rows)


def test_dry_run_headline_has_a_row_per_config(dry_run):
    _, _, run_dir = dry_run
    rows = read_csv(run_dir / "headline.csv")
    assert [(row["config"], row["mode"]) for row in rows] == [(config, "eager") for config in HEADLINE_CONFIGS]
    by_config = {row["config"]: row for row in rows}
    for row in rows:  # every speed-up is against the full row of the same run
        assert float(row["speedup"]) == pytest.approx(float(by_config["full"]["ms_per_step"]) / float(row["ms_per_step"]), rel=1e-3)
    assert all(float(row["ms_per_step"]) > 0 and row["finite_output"] == "True" for row in rows)
    for config in ("c", "dagger", "c-ref"):
        row = by_config[config]
        assert all(row[column] != "" for column in STAGE_COLUMNS)
        assert float(row["overhead_ms"]) == pytest.approx(sum(float(row[column]) for column in STAGE_COLUMNS))
        assert float(row["overhead_ms"]) > 0
    tome = by_config["tomesd@c"]
    assert 0.0 < float(tome["tome_ratio"]) <= 0.75 and tome["overhead_ms"] == ""
    # ToMe at preset c's budget: its counted FLOPs near c's, or at its highest ratio with the reason given.
    assert abs(float(tome["tflops_per_step"]) / float(by_config["c"]["tflops_per_step"]) - 1) < 0.05 or tome["note"]


def expected_kernel_rows() -> dict[str, set]:
    """(op, variant, shape, provider) of every row each kernel benchmark's --tiny run must write."""
    tiny = "tiny"
    lse_providers = {"sdpa", "torch_ref", "lse_triton"}  # on the CPU the op offers its Triton kernel alone
    gwpr_variants = {f"{variant}_k{k}" for variant in bench_gwpr.VARIANTS for k in bench_gwpr.ITERATIONS}
    pair = {"torch_ref", "triton"}
    return {
        "attention_lse": {("attention_with_lse", "", tiny, p) for p in lse_providers},
        "attention_map": {("head_mean_attention_map", "fp16_map", tiny, p) for p in pair},
        "gwpr": {("gwpr_scores", v, tiny, p) for v in gwpr_variants for p in pair},
        "topk_gather": {(op, "", tiny, p) for op in ("topk_keep_indices", "gather_tokens") for p in pair},
        "recovery": {("scatter_recover" if v == "refill" else "recovery_source", v, tiny, p)
                     for v in bench_recovery.ALL_VARIANTS for p in pair},
        "prune_plan": {("prune_plan", f"rho={bench_prune_plan.PRUNE_RATIO},K={bench_prune_plan.ITERATIONS}", tiny, p)
                       for p in pair},
    }


def test_dry_run_kernel_benchmarks_write_a_row_per_op_shape_provider(dry_run):
    _, _, run_dir = dry_run
    assert bench_attention_lse.TINY_SHAPES.keys() == bench_topk_gather.TINY_SHAPES.keys() == {"tiny"}
    for name, expected in expected_kernel_rows().items():
        rows = read_csv(run_dir / f"{name}.csv")
        written = [(row["op"], row.get("variant", ""), row["shape"], row["provider"]) for row in rows]
        assert len(written) == len(set(written)) and set(written) == expected, name
        for row in rows:
            assert row["error"] == "" and float(row["ms"]) > 0, (name, row)
            assert row["triton_interpret"] == "1"
        if name == "attention_lse":
            assert all(float(row["texps"]) > 0 for row in rows)  # exps/s of the op's own work


def test_a_step_past_its_budget_is_killed_and_the_next_step_still_runs(tmp_path):
    """The sleeper writes a row and starts a grandchild, then outlives its budget: the whole process group
    goes, the row stays, the summary says "timed out", and the step after it runs."""
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    run_dir.mkdir()
    out_dir.mkdir()
    pid_file = tmp_path / "grandchild.pid"
    sleeper = (
        "import subprocess, sys, time\n"
        "open(sys.argv[1], 'w').write('op,ms\\nsleeper,1.5\\n')\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "open(sys.argv[2], 'w').write(str(child.pid))\n"
        "print('row written', flush=True)\n"
        "time.sleep(120)\n"
    )
    steps = [
        Step("slow", 3.0, [Command("sleeper", lambda _: [sys.executable, "-c", sleeper, str(run_dir / "slow.csv"),
                                                          str(pid_file)])]),
        Step("next", 60.0, [Command("echo", lambda _: [sys.executable, "-c", "print('next step ran')"])]),
    ]
    record = RunRecord(run_dir, out_dir, "test run", dict(os.environ))
    record.budgets = {step.name: step.budget_s for step in steps}
    start = time.monotonic()
    run_steps(steps, record)
    assert time.monotonic() - start < 30
    assert [(outcome.step, outcome.status) for outcome in record.outcomes] == [("slow", "timed out"), ("next", "ok")]
    summary = (run_dir / "SUMMARY.md").read_text()
    assert "| slow | timed out |" in summary and "| next | ok |" in summary
    assert "row written" in (run_dir / "slow.log").read_text()
    assert "next step ran" in (run_dir / "next.log").read_text()
    assert read_csv(out_dir / "results.csv") == [{"source": "slow", "op": "sleeper", "ms": "1.5"}]
    grandchild = Path(f"/proc/{pid_file.read_text()}/stat")
    for _ in range(50):  # killed with its group; gone once reaped
        if not grandchild.exists() or grandchild.read_text().split(")")[-1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail("the timed-out step's grandchild outlived it")


def test_the_gpu_run_refuses_without_cuda(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("OUT", None)
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_run", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr and "--dry-run" in done.stderr
    assert list(tmp_path.iterdir()) == []

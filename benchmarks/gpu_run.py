"""The one GPU run that cannot waste the lease: four steps, each a child process with its own time budget,
every result written the moment it exists.

    python -m benchmarks.gpu_run [--out DIR] [--dry-run] [--compile] [--compile-ref] [--budget-scale X]
                                 [--steps environment,checks,headline,kernels] [--wheelhouse DIR]

Steps, in order of value (``STEP_BUDGETS_S`` gives each one's wall-clock budget, derived beside it):

1. ``environment``: installs the wheelhouse (``benchmarks/wheelhouse.sh``; diffusers and tomesd, which
   the GPU image lacks) with ``pip install --no-index --no-deps --target`` into a temporary folder that
   the later steps get on ``PYTHONPATH``, then records GPU, SM count, memory, driver, versions and git SHA
   and checks that ``diffusers`` and ``tomesd`` import.
2. ``checks``: ``python -m atedm doctor --sections checks`` in fp16 and bf16 at SDXL's shapes: every kernel
   and the whole per-block chain against the fp32 reference, kept sets exactly equal (up to provable
   near-ties). Only the compiles this needs; fp32 stays a CPU/interpreter matter.
3. ``headline``: ``benchmarks/bench_sdxl_step.py`` on the full SDXL-base UNet (random weights) at 1024 px,
   fp16, batch 2 (one image with CFG): full, c, dagger, c-ref (the paper's "maps rebuilt next to fused
   attention" row) and ToMe at its best setting (``tomesd@c``), eager; with ``--compile`` also compiled
   rows, as many as fit in the step's budget.
4. ``kernels``: each kernel benchmark at SDXL's shapes against the floors of docs/performance.md; the step's
   budget is shared, each benchmark getting an equal share of what is left when it starts.

Every child runs with ``PYTHONUNBUFFERED=1`` and ``TRITON_INTERPRET=0`` (dry run: 1), appends CSV rows as
they are measured, and logs to ``<step>.log``. A step that runs past its budget is killed (with its whole
process group) and reported as timed out; the next step still runs. ``SUMMARY.md`` is rewritten after
every command, so a run killed from outside still leaves a summary of what finished.

Where results go. ``--out DIR`` (default: ``$OUT`` when set, else ``benchmarks/results/gpu``) receives three
files at its top: ``results.md`` (the summary, every CSV as a table, the tail of the log of each command
that did not finish ok), ``results.csv`` (every CSV row, with a ``source`` column) and
``<gpu>-<date>.tar.gz`` (the whole run folder). The run folder ``<gpu>-<date>`` holding every CSV and log is
``DIR/<gpu>-<date>``, except when DIR is the device tool's ``$OUT``: only 8 files come back from there, so
the folder is then ``benchmarks/results/gpu/<gpu>-<date>`` and reaches ``$OUT`` inside the tarball. All three
are refreshed after every step.

``--dry-run`` runs the same steps on the CPU: interpreter kernels, tiny shapes, the tests' tiny UNet,
smaller budgets (``tests/test_gpu_run.py`` runs it). Without it and without a CUDA device the run refuses.

On the device tool (the GPU machine has no network and no diffusers). Once, here: ``bash
benchmarks/wheelhouse.sh`` (fills the git-ignored ``.whl/``). Then one call::

    run(command="ATEDM_GIT_SHA=<git rev-parse --short HEAD, here> bash benchmarks/gpu_check.sh",
        carry=[".whl"], timeout_s=420)

(the working tree travels without ``.git``, hence the SHA in the environment). The run takes at most
``sum(STEP_BUDGETS_S)`` = 315 s plus start-up; with ``--compile`` up to ``COMPILE_EXTRA_BUDGET_S`` more.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from io import StringIO
from pathlib import Path
from typing import Callable

from benchmarks.summarize import summarize

ROOT = Path(__file__).resolve().parents[1]
RESULTS_GPU = ROOT / "benchmarks" / "results" / "gpu"
DEFAULT_WHEELHOUSE = ROOT / ".whl"
STEP_ORDER = ("environment", "checks", "headline", "kernels")

# Wall-clock budgets on a cold H100/H200, in seconds (the whole run must end within 6 minutes):
STEP_BUDGETS_S = {
    # pip unpacking three pure-Python wheels (~3 s), then one process importing torch, triton, diffusers (which
    # pulls peft and transformers where they are installed) and tomesd and creating a CUDA context (~10 s).
    "environment": 25,
    # The limit for the fp16 and bf16 correctness checks at SDXL's shapes, compiles included.
    "checks": 60,
    # Imports and the UNet built on the GPU (~10 s); Triton autotuning and compiles of the c/dagger kernels
    # in the warm-up round (the largest share, tens of seconds cold); 11 rounds of 8 row-phases at
    # ~50-80 ms (fp16, 1024 px, batch 2) plus c-ref's slower eager maps (~10 s); peak-memory, finiteness
    # and breakdown passes (~2 s). The FLOPs counts and the ToMe ratio solve (~45 s on 2 CPU cores) run
    # in worker processes alongside.
    "headline": 130,
    # Six benchmarks, 1024 px shapes first: a process start and CUDA context each (~4 s), then seconds of
    # autotuning and timing per shape; Triton's disk cache holds the kernels the earlier steps compiled.
    "kernels": 100,
}
# The dry run on 2 loaded CPU cores: generous caps (the test suite runs it), not targets.
DRY_RUN_BUDGETS_S = {"environment": 60, "checks": 180, "headline": 240, "kernels": 300}
# --compile: torch.compile of the SDXL UNet per graph (a row in one DSAP phase); the headline's compiled
# rows take what fits in this much more time (bench_sdxl_step decides per row).
COMPILE_EXTRA_BUDGET_S = 240
# --compile-ref: a cold torch.compile of each reference, per shape and variant.
COMPILE_REF_EXTRA_BUDGET_S = 120
# The headline benchmark plans its compiled rows to end this long before its process is killed.
HEADLINE_EXIT_MARGIN_S = 10
# Kernel benchmarks, most valuable first (the lse providers against SDPA pick the default; then the whole
# per-block pipeline), except that the cheap top-k/gather one runs before the heavy ones, so that the
# time it leaves unused goes to them; G-WPR, with 6 variants per shape, last.
KERNEL_BENCHMARKS = ("attention_lse", "prune_plan", "topk_gather", "attention_map", "recovery", "gwpr")
LOG_TAIL_LINES = 40


@dataclass
class Command:
    """One child process of a step. ``argv`` is built when it starts, from the seconds it is given."""

    label: str
    argv: Callable[[float], list[str]]
    on_success: Callable[[], None] | None = None


@dataclass
class Step:
    name: str
    budget_s: float
    commands: list[Command]


@dataclass
class Outcome:
    step: str
    label: str
    status: str  # "ok", "failed (rc N)", "timed out"
    seconds: float
    timeout_s: float


@dataclass
class RunRecord:
    """What the run did so far, and the files that report it."""

    run_dir: Path
    out_dir: Path
    title: str
    env: dict
    budgets: dict = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def log_path(self, step: str) -> Path:
        return self.run_dir / f"{step}.log"

    def step_status(self, step: str) -> tuple[str, float]:
        mine = [outcome for outcome in self.outcomes if outcome.step == step]
        if not mine:
            return "not run", 0.0
        bad = [outcome.status for outcome in mine if outcome.status != "ok"]
        if not bad:
            status = "ok"
        elif len(mine) == 1:
            status = bad[0]
        else:
            status = f"{len(bad)} of {len(mine)} not ok"
        return status, sum(outcome.seconds for outcome in mine)

    def summary(self) -> str:
        lines = [f"# {self.title}", "", *self.notes, "", "| step | status | seconds | budget s |", "|---|---|---|---|"]
        for step, budget in self.budgets.items():
            status, seconds = self.step_status(step)
            lines.append(f"| {step} | {status} | {seconds:.1f} | {budget:.0f} |")
        lines += ["", "| step | command | status | seconds | timeout s |", "|---|---|---|---|---|"]
        lines += [f"| {o.step} | {o.label} | {o.status} | {o.seconds:.1f} | {o.timeout_s:.0f} |" for o in self.outcomes]
        return "\n".join(lines) + "\n"

    def write_summary(self) -> None:
        write_atomically(self.run_dir / "SUMMARY.md", self.summary())

    def write_results(self) -> None:
        """results.md, results.csv and the tarball at the top of the output folder."""
        tails = []
        for outcome in self.outcomes:
            if outcome.status != "ok":
                log = self.log_path(outcome.step).read_text(errors="replace").splitlines()
                tails.append(f"## {outcome.step} / {outcome.label}: {outcome.status} (end of {outcome.step}.log)\n\n```\n"
                             + "\n".join(log[-LOG_TAIL_LINES:]) + "\n```\n")
        write_atomically(self.out_dir / "results.md", "\n".join([self.summary(), summarize(self.run_dir), *tails]))
        write_atomically(self.out_dir / "results.csv", combined_csv(self.run_dir))
        tarball = self.out_dir / f"{self.run_dir.name}.tar.gz"
        partial = tarball.with_name(tarball.name + ".partial")
        with tarfile.open(partial, "w:gz") as archive:
            archive.add(self.run_dir, arcname=self.run_dir.name)
        partial.replace(tarball)


def write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def combined_csv(run_dir: Path) -> str:
    """Every CSV of the run in one table: the union of their columns, plus the file each row came from."""
    rows, columns = [], ["source"]
    for path in sorted(run_dir.glob("*.csv")):
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                rows.append({"source": path.stem, **row})
                columns += [column for column in row if column not in columns]
    buffer = StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _pump(stream, log, prefix: str) -> None:
    for line in stream:
        log.write(line)
        log.flush()
        sys.stdout.write(f"[{prefix}] {line}")
        sys.stdout.flush()


def run_command(argv: list[str], env: dict, timeout_s: float, log_path: Path, prefix: str) -> tuple[str, float]:
    """Run one child in its own process group; kill the group at ``timeout_s``. Returns (status, seconds)."""
    start = time.monotonic()
    with log_path.open("a") as log:
        log.write(f"$ {' '.join(argv)}   (timeout {timeout_s:.0f} s)\n")
        log.flush()
        child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, errors="replace", start_new_session=True)
        pump = threading.Thread(target=_pump, args=(child.stdout, log, prefix), daemon=True)
        pump.start()
        try:
            returncode = child.wait(timeout=max(timeout_s, 0.0))
            status = "ok" if returncode == 0 else f"failed (rc {returncode})"
        except subprocess.TimeoutExpired:
            status = "timed out"
        # The whole group, also after a normal exit: FLOPs-count and compile workers, pip's children, anything
        # left holding GPU memory or the log pipe goes with the command.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        pump.join(timeout=5)
        seconds = time.monotonic() - start
        log.write(f"--- {status} after {seconds:.1f} s\n")
    return status, seconds


def run_steps(steps: list[Step], record: RunRecord) -> None:
    """Run the steps in order. A step's commands share its budget: each gets an equal share of what is
    left when it starts, so time one leaves unused goes to the next."""
    for step in steps:
        step_end = time.monotonic() + step.budget_s
        record.log_path(step.name).touch()
        for index, command in enumerate(step.commands):
            timeout_s = (step_end - time.monotonic()) / (len(step.commands) - index)
            print(f"== {step.name}: {command.label} ({timeout_s:.0f} s)", flush=True)
            status, seconds = run_command(command.argv(timeout_s), record.env, timeout_s,
                                          record.log_path(step.name), step.name)
            record.outcomes.append(Outcome(step.name, command.label, status, seconds, timeout_s))
            print(f"== {step.name}: {command.label}: {status} in {seconds:.1f} s", flush=True)
            if status == "ok" and command.on_success:
                command.on_success()
            record.write_summary()
        record.write_results()


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def build_steps(args, run_dir: Path, record: RunRecord, wheel_target: Path) -> list[Step]:
    budgets = DRY_RUN_BUDGETS_S if args.dry_run else STEP_BUDGETS_S
    budgets = {name: seconds * args.budget_scale for name, seconds in budgets.items()}
    if args.compile:
        budgets["headline"] += COMPILE_EXTRA_BUDGET_S * args.budget_scale
    if args.compile_ref:
        budgets["kernels"] += COMPILE_REF_EXTRA_BUDGET_S * args.budget_scale

    environment = []
    wheels = sorted(Path(args.wheelhouse).glob("*.whl"))
    if wheels:
        def put_on_path():
            record.env["PYTHONPATH"] = os.pathsep.join([str(wheel_target), record.env["PYTHONPATH"]])

        environment.append(Command("install the wheelhouse", lambda _: [
            sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
            "--disable-pip-version-check", "--target", str(wheel_target), *map(str, wheels)], put_on_path))
    else:
        record.notes.append(f"No wheelhouse at {args.wheelhouse}: diffusers and tomesd must be installed already.")
    environment.append(Command("report", lambda _: python_module(
        "benchmarks.gpu_run", "--report-environment", str(run_dir / "environment.csv"),
        "--wheel-target", str(wheel_target), *(["--dry-run"] if args.dry_run else []))))

    if args.dry_run:
        doctor = ["--device", "cpu", "--tiny"]
        headline = ["--tiny", "--height", "64", "--width", "64", "--repeats", "1", "--device", "cpu"]
        kernel_size = ["--tiny", "--device", "cpu"]
    else:
        doctor = ["--device", "cuda", "--dtypes", "float16,bfloat16"]
        headline = ["--height", "1024", "--width", "1024", "--repeats", "10", "--device", "cuda", "--dtype", "float16"]
        kernel_size = ["--device", "cuda", "--dtype", "float16"]
    checks = [Command("atedm doctor --sections checks", lambda _: python_module(
        "atedm", "doctor", *doctor, "--sections", "checks", "--csv", str(run_dir / "checks.csv")))]
    headline_command = [Command("bench_sdxl_step", lambda seconds: python_module(
        "benchmarks.bench_sdxl_step", *headline, "--batches", "2", "--configs", "full,c,dagger,c-ref,tomesd@c",
        "--out", str(run_dir / "headline.csv"), "--time-budget", f"{max(seconds - HEADLINE_EXIT_MARGIN_S, 0):.0f}",
        *(["--compile"] if args.compile else [])))]
    kernels = [Command(f"bench_{name}", lambda _, name=name: python_module(
        f"benchmarks.bench_{name}", *kernel_size, "--out", str(run_dir / f"{name}.csv"),
        *(["--compile-ref"] if args.compile_ref else []))) for name in KERNEL_BENCHMARKS]

    chosen = [Step("environment", budgets["environment"], environment), Step("checks", budgets["checks"], checks),
              Step("headline", budgets["headline"], headline_command), Step("kernels", budgets["kernels"], kernels)]
    return [step for step in chosen if step.name in args.steps]


def report_environment(csv_path: Path, wheel_target: Path, dry_run: bool) -> int:
    """Record the machine and versions, one CSV row per item as it is found; 1 if diffusers or tomesd
    (or a wheel of the wheelhouse) does not import."""
    import importlib
    import importlib.metadata

    import torch

    from benchmarks.common import environment_info, git_sha, write_rows

    device = torch.device("cpu" if dry_run else "cuda")
    stamp = environment_info(device)
    problems = 0

    def emit(item: str, value) -> None:
        write_rows(csv_path, [{"item": item, "value": value, **stamp}])
        print(f"{item}: {value}")

    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        emit("gpu", properties.name)
        emit("sm_count", properties.multi_processor_count)
        emit("gpu_memory_gib", f"{properties.total_memory / 2**30:.1f}")
        emit("compute_capability", f"{properties.major}.{properties.minor}")
        emit("cuda_runtime", torch.version.cuda)
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as error:
            driver = f"unknown ({error})"
        emit("driver", driver)
    else:
        emit("gpu", "none: dry run on the CPU (Triton interpreter)")
    emit("python", sys.version.split()[0])
    emit("git_sha", git_sha())
    emit("triton_interpret", os.environ.get("TRITON_INTERPRET", "0"))
    wheel_modules = []
    for info in sorted(wheel_target.glob("*.dist-info")):
        distribution = importlib.metadata.Distribution.at(info)
        # The importable names: the top folders and modules the wheel installed (not its scripts, "../bin").
        tops = sorted({file.parts[0].removesuffix(".py") for file in distribution.files or []
                       if file.parts[0].removesuffix(".py").isidentifier() and file.parts[0] != "__pycache__"})
        wheel_modules += tops
        emit(f"wheel:{distribution.metadata['Name']}", f"{distribution.version} -> {', '.join(tops)}")
    for module in dict.fromkeys(["torch", "triton", "numpy", "diffusers", "tomesd", *wheel_modules]):
        try:
            imported = importlib.import_module(module)
            location = Path(getattr(imported, "__file__", None) or ".").resolve()
            from_wheelhouse = " (wheelhouse)" if wheel_target.resolve() in location.parents else ""
            emit(module, f"{installed_version(imported)}{from_wheelhouse}")
        except Exception as error:  # noqa: BLE001 - any import failure is reported and fails the step
            emit(module, f"MISSING: {type(error).__name__}: {error}")
            problems += 1
    return 1 if problems else 0


def installed_version(module) -> str:
    """A module's version: its ``__version__``, else its distribution's (tomesd has no ``__version__``)."""
    import importlib.metadata

    try:
        return getattr(module, "__version__", None) or importlib.metadata.version(module.__name__)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def gpu_label() -> str:
    import torch

    return torch.cuda.get_device_name(0).replace(" ", "_")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", default=None,
                        help="where results.md, results.csv and the tarball go (default: $OUT, else benchmarks/results/gpu)")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU at tiny shapes")
    parser.add_argument("--compile", action="store_true", help="also compiled headline rows, as many as fit")
    parser.add_argument("--compile-ref", action="store_true", help="kernel benchmarks also time torch.compile of each reference")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every step's budget")
    parser.add_argument("--steps", default=",".join(STEP_ORDER), help="which steps to run (always in their order)")
    parser.add_argument("--wheelhouse", default=str(DEFAULT_WHEELHOUSE), help="folder of wheels to install first")
    parser.add_argument("--report-environment", metavar="CSV", help=argparse.SUPPRESS)
    parser.add_argument("--wheel-target", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.report_environment:
        return report_environment(Path(args.report_environment), Path(args.wheel_target), args.dry_run)
    args.steps = [name.strip() for name in args.steps.split(",") if name.strip()]
    unknown = set(args.steps) - set(STEP_ORDER)
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}; choose from {', '.join(STEP_ORDER)}")

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_run: no CUDA device here. This run times the Triton kernels and the SDXL UNet on a GPU; on "
              "the CPU, run `python -m benchmarks.gpu_run --dry-run` to check that every step still works.",
              file=sys.stderr)
        return 2
    sys.stdout.reconfigure(line_buffering=True)
    name = f"{'dry-run-cpu' if args.dry_run else gpu_label()}-{datetime.now():%Y%m%d-%H%M%S}"
    out_dir = Path(args.out or os.environ.get("OUT") or RESULTS_GPU)
    device_out = os.environ.get("OUT")
    run_dir = RESULTS_GPU / name if device_out and out_dir.resolve() == Path(device_out).resolve() else out_dir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_INTERPRET": "1" if args.dry_run else "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if args.dry_run:
        # The dry run checks that every step works, not how fast: one thread per child, since OpenMP
        # threads spinning for cores that a busy test machine does not have made a tiny UNet step 30x slower.
        env["OMP_NUM_THREADS"] = "1"
    record = RunRecord(run_dir, out_dir, f"atedm GPU run {name}", env)
    record.notes.append(f"{'Dry run on the CPU (interpreter kernels, tiny shapes)' if args.dry_run else 'GPU run'}; "
                        f"budgets scaled by {args.budget_scale:g}; run folder {run_dir}.")
    with tempfile.TemporaryDirectory(prefix="atedm-wheels-") as wheel_target:
        steps = build_steps(args, run_dir, record, Path(wheel_target))
        record.budgets = {step.name: step.budget_s for step in steps}
        record.write_summary()
        started = time.monotonic()
        run_steps(steps, record)
    print(record.summary())
    print(f"gpu_run: {time.monotonic() - started:.0f} s; results in {out_dir} (run folder {run_dir})")
    return 0 if all(outcome.status == "ok" for outcome in record.outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Shared plumbing for the benchmarks: timing, the environment stamp and CSV rows.

Every figure a benchmark writes carries the machine, GPU, versions and git SHA next to it, so a CSV row
can be read on its own.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from atedm_kernels import selfcheck
from atedm_kernels._dispatch import triton_interpreter_on
from atedm_kernels.selfcheck import git_sha  # noqa: F401 - the benchmarks' stamp is the doctor's

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def environment_info(device: torch.device | str | None = None) -> dict:
    """Machine, accelerator, versions and git SHA, as CSV columns (the doctor's stamp: one definition)."""
    return selfcheck.environment_info(device if device is not None else "cpu")


def time_ms(fn: Callable[[], object], device: torch.device | str, warmup: int = 3, repeats: int = 20) -> dict:
    """Median and quartiles of ``fn`` in ms: triton.testing.do_bench on CUDA, wall clock on the CPU
    (``warmup`` and ``repeats`` apply there)."""
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


# Ceilings measured on the lent GPUs (shared/spec/performance.md): dense bf16/fp16 matmul TFLOP/s, copy
# TB/s, and Hopper's special-function (exp) rate in T/s (the "texps" column is the achieved rate).
DEVICE_CEILINGS = {
    "H100": {"tflops": 800.0, "tbps": 3.0, "texps": 3.9},
    "H200": {"tflops": 790.0, "tbps": 4.3, "texps": 3.9},
}


def device_ceilings(device: torch.device | str) -> dict | None:
    """The ceilings of the GPU behind ``device``, or None where none were measured (CPU, other GPUs)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((ceilings for key, ceilings in DEVICE_CEILINGS.items() if key in name), None)


def floor_ms(ceilings: dict | None, flops: float = 0.0, bytes_moved: float = 0.0, exps: float = 0.0) -> float | None:
    """Physical floor of a kernel in ms: the slowest of its matmul, memory and exp work at the ceilings
    (the three units run concurrently, so the floor is their maximum, not their sum)."""
    if ceilings is None:
        return None
    seconds = max(flops / (ceilings["tflops"] * 1e12), bytes_moved / (ceilings["tbps"] * 1e12),
                  exps / (ceilings["texps"] * 1e12))
    return seconds * 1e3


def rotating(input_sets: list) -> Callable[[], object]:
    """Each call returns the next of several input sets, so repeated timing does not run out of a warm L2."""
    state = {"i": -1}

    def next_inputs():
        state["i"] = (state["i"] + 1) % len(input_sets)
        return input_sets[state["i"]]

    return next_inputs


# Timing repeats on the CPU (after the untimed first call): --tiny runs the Triton kernels through the
# interpreter, up to seconds per call, and checks that the run works rather than timing it.
CPU_REPEATS = 20
TINY_REPEATS = 1


def kernel_bench_args(description: str, default_out: str) -> argparse.Namespace:
    """The command line every kernel benchmark takes: --quick, --tiny, --compile-ref, --out, --device, --dtype.
    Output is line-buffered, so that a benchmark killed at its time limit has printed what it measured."""
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(description=description)
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true",
                       help="reduced shapes; on a machine without CUDA only the PyTorch providers run")
    sizes.add_argument("--tiny", action="store_true",
                       help="shapes small enough for the Triton interpreter (the GPU run's CPU dry run); with "
                            "TRITON_INTERPRET=1 the Triton providers run on the CPU too")
    parser.add_argument("--compile-ref", action="store_true",
                        help="also time torch.compile of the PyTorch reference (a cold compile per shape and variant)")
    parser.add_argument("--out", default=str(RESULTS_DIR / default_out), help="CSV to append rows to (per shape)")
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                        help="input dtype (default: float16 on CUDA, float32 on the CPU)")
    args = parser.parse_args()
    args.device = pick_device(args.device)
    if args.device.type != "cuda" and not (args.quick or args.tiny):
        raise SystemExit(
            f"{parser.prog}: no CUDA device, and the Triton kernels and the SDXL shapes need one. Run with --quick "
            "to time the PyTorch providers at a reduced size on the CPU (or --tiny under TRITON_INTERPRET=1)."
        )
    default_dtype = "float16" if args.device.type == "cuda" else "float32"
    args.dtype = getattr(torch, args.dtype or default_dtype)
    args.repeats = TINY_REPEATS if args.tiny else CPU_REPEATS
    # The Triton providers: on CUDA, and on the CPU through the interpreter at --tiny shapes only (the GPU
    # run's dry run; at SDXL or --quick shapes an interpreted kernel takes minutes).
    args.triton = args.device.type == "cuda" or (args.tiny and triton_interpreter_on())
    return args


def bench_shapes(args: argparse.Namespace, shapes: dict, quick: dict, tiny: dict) -> dict:
    """The shapes this run times: SDXL's, or the --quick / --tiny stand-ins."""
    return tiny if args.tiny else quick if args.quick else shapes


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A short Markdown table of the chosen columns (floats to 3 significant digits)."""
    def cell(value):
        return f"{value:.3g}" if isinstance(value, float) else ("" if value is None else str(value))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def op_providers(args, call: Callable, reference: Callable, kernel: Callable) -> dict[str, Callable[[], object]]:
    """An op's providers at one shape, each run as ``call(fn, **kwargs)`` on fresh inputs: the PyTorch
    reference, the Triton kernel (``--triton``) and torch.compile of the reference (``--compile-ref``)."""
    providers = {"torch_ref": lambda: call(reference)}
    if args.triton:
        providers["triton"] = lambda: call(kernel, backend="triton")
    if args.compile_ref:
        # A fresh cache per shape: past dynamo's recompile limit the compiled provider would silently
        # run eagerly.
        torch._dynamo.reset()
        compiled_reference = torch.compile(reference)
        providers["torch_compile_ref"] = lambda: call(compiled_reference)
    return providers


def time_providers(
    providers: dict[str, Callable[[], object]],
    device: torch.device,
    flops: float = 0.0,
    bytes_moved: float = 0.0,
    exps: float = 0.0,
    phases: list[dict] | None = None,
    repeats: int = CPU_REPEATS,
    **columns,
) -> list[dict]:
    """Time each provider and return one CSV row each: ``columns`` (op, shape, ...), ms with quartiles,
    achieved TFLOP/s, GB/s and T exps/s of the op's own work (``flops``, ``bytes_moved``, ``exps``: the same
    for every provider, so the numbers compare), its floor and the percentage of the floor reached.
    ``phases`` (dicts of flops/bytes_moved/exps) describes work done one phase after another instead: the
    work is then the phases' sum and the floor the sum of the phases' floors. The first call runs outside
    the timing (torch.compile and Triton autotuning happen there). A provider that fails (out of memory, a
    compiler error) gets a row with the error instead of stopping the run. Each provider's time is printed
    as soon as it exists; ``repeats`` applies on the CPU."""
    ceilings = device_ceilings(device)
    if phases is None:
        floor = floor_ms(ceilings, flops, bytes_moved, exps)
    else:
        floor = None if ceilings is None else sum(floor_ms(ceilings, **phase) for phase in phases)
        flops, bytes_moved, exps = (sum(phase.get(key, 0.0) for phase in phases) for key in ("flops", "bytes_moved", "exps"))
    rows = []
    for provider, fn in providers.items():
        row = {**columns, "provider": provider, "ms": None, "ms_q20": None, "ms_q80": None, "tflops": None,
               "gbps": None, "texps": None, "floor_ms": floor, "pct_of_floor": None, "error": ""}
        try:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            row.update(time_ms(fn, device, warmup=min(3, repeats - 1), repeats=repeats))
        except Exception as exc:  # noqa: BLE001 - reported in the row, the other providers still run
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
            print(f"  {provider}: {row['error']}")
        else:
            seconds = row["ms"] / 1e3
            row["tflops"] = flops / seconds / 1e12 if flops else None
            row["gbps"] = bytes_moved / seconds / 1e9 if bytes_moved else None
            row["texps"] = exps / seconds / 1e12 if exps else None
            row["pct_of_floor"] = 100.0 * floor / row["ms"] if floor else None
            floor_note = f", {row['pct_of_floor']:.0f}% of floor" if row["pct_of_floor"] else ""
            print(f"  {provider}: {row['ms']:.4g} ms{floor_note}")
        rows.append({**row, **environment_info(device)})
    return rows

"""``python -m atedm doctor``: the self-check a user runs on their own machine, in about two minutes.

It prints the versions and the device, then one table, a row as soon as it exists:

* ``checks``: every op's kernel against its fp32 reference at SDXL's shapes, and the whole per-block
  chain with kept sets exact (``atedm_kernels.selfcheck``, whose docstring states the rules);
* ``block``: ms of each stage of one pruning block, on the path the integration runs (``--backend``; on
  the CPU never the interpreter), and AT-EDM's overhead over plain attention;
* ``step``: one UNet step (batch 2 = one image with CFG), full against preset c in its late phase,
  interleaved, with the speed-up and eta = speed-up / FLOPs-ideal speed-up of that phase.

The exit status is 0 when no row says FAIL, else 1 (2 when the requested device is missing). ``--csv``
appends every row with the device, versions and git SHA.
"""

from __future__ import annotations

import csv
import importlib.metadata
import platform
import secrets
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from atedm_kernels import selfcheck
from atedm_kernels._dispatch import triton_interpreter_on
from atedm_kernels.selfcheck import ROW_FIELDS, row

from .presets import get_preset
from .timing import time_interleaved
from .unets import build_random_unet, cpu_supports_bf16, default_unet_config, load_unet_config, tiny_unet_config

SECTIONS = ("checks", "block", "step")
STEP_PRESET = "c"  # the paper's headline operating point
STEP_BATCH = 2  # one image with classifier-free guidance
TINY_RESOLUTION = 128  # the tiny UNet's 16 x 16 latent: 64 tokens at level 2, 16 at level 3
# Column widths of the printed table; a longer cell just pushes the rest of its line.
COLUMN_WIDTHS = dict(section=7, item=23, dtype=8, shape=13, result=6, ms=9)


@dataclass(frozen=True)
class Settings:
    device: torch.device
    dtypes: list[torch.dtype]
    resolution: int
    sections: tuple[str, ...]
    shapes: list[selfcheck.BlockShape]
    backend: str
    seed: int
    tiny: bool


# The CPU default size: a 2.57B-parameter UNet step at 512 px takes 5 s in bf16 and about 30-90 s in fp32
# on a 2-core machine, which alone would blow the doctor's 2-minute budget; at 256 px (256 and 64 tokens
# at the pruned levels) the whole run fits it. --resolution 512 or 1024 for a slower, closer look.
CPU_RESOLUTION = 256


def default_dtypes(device: torch.device) -> list[torch.dtype]:
    """fp16 and bf16 on CUDA; on the CPU fp32 under the Triton interpreter (it has no bf16), else bf16
    where the CPU computes it natively, else fp32."""
    if device.type == "cuda":
        return [torch.float16, torch.bfloat16]
    if triton_interpreter_on() or not cpu_supports_bf16():
        return [torch.float32]
    return [torch.bfloat16]


def resolve_settings(args) -> Settings:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    by_name = {selfcheck.dtype_name(dtype): dtype for dtype in selfcheck.TOLERANCES}
    names = [name.strip() for name in args.dtypes.split(",") if name.strip()] if args.dtypes else []
    if args.dtypes is not None and (not names or not set(names) <= set(by_name)):
        raise ValueError(f"--dtypes takes {','.join(by_name)}; got {args.dtypes!r}")
    dtypes = [by_name[name] for name in names] or default_dtypes(device)
    sections = tuple(name.strip() for name in args.sections.split(",") if name.strip())
    if not sections or not set(sections) <= set(SECTIONS):
        raise ValueError(f"--sections takes a subset of {','.join(SECTIONS)}; got {args.sections!r}")
    if args.repeats is None:  # a CPU step of the full UNet takes seconds: one timed round there
        args.repeats = 3 if device.type == "cuda" else 1
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1; got {args.repeats}")
    resolution = args.resolution or (TINY_RESOLUTION if args.tiny else 1024 if device.type == "cuda"
                                     else CPU_RESOLUTION)
    shapes = selfcheck.sdxl_block_shapes(resolution, args.tiny)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    return Settings(device, dtypes, resolution, sections, shapes, args.backend, seed, args.tiny)


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def header_lines(settings: Settings, environment: dict) -> list[str]:
    checked = selfcheck.kernel_backend(settings.backend, settings.device)
    lines = [
        f"atedm doctor: python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), "
        f"triton {environment['triton']}, diffusers {_package_version('diffusers')}, numpy {_package_version('numpy')}, "
        f"atedm git {environment['git_sha']}",
        f"device: {environment['device']}; TRITON_INTERPRET={environment['triton_interpret']}",
        f"checks test {selfcheck.describe_backend(checked, settings.device)}; block and step time "
        f"{selfcheck.describe_backend(settings.backend, settings.device)}",
        f"dtypes {', '.join(selfcheck.dtype_name(d) for d in settings.dtypes)}; {settings.resolution} px; sections "
        f"{', '.join(settings.sections)}; input seed {settings.seed} (--seed to repeat)",
        "checks: ms = the check's wall time, compiles and reference included; block, step: median ms per call",
    ]
    if triton_interpreter_on() and settings.backend == "triton":
        lines.append("under the Triton interpreter the block and step times show only that the code runs")
    return lines


class Table:
    """Prints each row as it comes and appends it to the CSV (environment columns added) at once."""

    def __init__(self, environment: dict, csv_path: str | None):
        self.environment = environment
        self.csv_path = Path(csv_path) if csv_path else None
        self.rows: list[dict] = []
        print(self._line({name: name for name in ROW_FIELDS}), flush=True)
        print("|" + "|".join("-" * (COLUMN_WIDTHS.get(name, 4) + 2) for name in ROW_FIELDS) + "|", flush=True)

    @staticmethod
    def _line(cells: dict) -> str:
        def cell(name):
            value = cells[name]
            if name == "ms" and isinstance(value, float):
                value = f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"
            text = "" if value is None else str(value)
            width = COLUMN_WIDTHS.get(name, 0)
            return text.rjust(width) if name == "ms" else text.ljust(width)

        return "| " + " | ".join(cell(name) for name in ROW_FIELDS) + " |"

    def add(self, new_row: dict) -> None:
        self.rows.append(new_row)
        print(self._line(new_row), flush=True)
        if self.csv_path is None:
            return
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        new_file = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        with self.csv_path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[*ROW_FIELDS, *self.environment])
            if new_file:
                writer.writeheader()
            writer.writerow({**new_row, **self.environment})

    @property
    def failures(self) -> int:
        return sum(r["result"].startswith("FAIL") for r in self.rows)


# --- the UNet step ---------------------------------------------------------------------------------

def _load_unet(args, settings: Settings, dtype: torch.dtype):
    """(unet, its config, where the weights came from)."""
    if args.model:
        from diffusers import UNet2DConditionModel

        folder = Path(args.model)
        subfolder = None if (folder / "config.json").exists() else "unet"  # a UNet folder or a pipeline's
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder=subfolder, torch_dtype=dtype)
        return unet.to(settings.device).eval(), dict(unet.config), f"weights of {args.model}"
    if settings.tiny:
        config, name = tiny_unet_config(), "tiny SDXL-shaped UNet"
    elif args.unet_config:
        config, name = load_unet_config(args.unet_config), args.unet_config  # a JSON path or a shipped layout
    else:
        config, name = default_unet_config(), "SDXL-base UNet"
    # Parameters initialised on the device they run on: SDXL's 2.6 B random weights take 15-30 s on the CPU.
    with settings.device:
        unet = build_random_unet(config, dtype, str(settings.device), seed=settings.seed)
    return unet, config, f"{name}, random weights"


def _timed_step(unet, inputs: dict, device: torch.device) -> tuple[float, bool]:
    """(ms of one UNet call, whether its output is finite)."""
    output = {}

    def call():
        output["sample"] = unet(**inputs).sample

    with torch.inference_mode():
        ms = selfcheck.call_ms(call, device)
    return ms, bool(torch.isfinite(output["sample"]).all())


def _peak_memory_note(unet, inputs: dict, device: torch.device) -> str:
    if device.type != "cuda":
        return ""
    torch.cuda.reset_peak_memory_stats(device)
    _timed_step(unet, inputs, device)
    return f"; peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"


def step_rows(args, settings: Settings) -> Iterator[dict]:
    shape = f"{STEP_BATCH}x{settings.resolution}px"
    first = selfcheck.dtype_name(settings.dtypes[0])
    try:  # the only section that needs diffusers
        from .flops import example_inputs, flops_per_step
        from .patch import apply, remove, set_phase
    except ImportError as exc:
        yield row("step", "build", first, shape, f"skipped: {exc}")
        return
    preset = get_preset(STEP_PRESET).replace(backend=args.backend)
    start = time.perf_counter()
    try:
        unet, unet_config, source = _load_unet(args, settings, settings.dtypes[0])
        built = time.perf_counter()
        flops = flops_per_step(unet_config, preset, settings.resolution, settings.resolution)
    except Exception as exc:  # noqa: BLE001 - reported in the row
        yield row("step", "build", first, shape, f"FAIL: {type(exc).__name__}: {exc}")
        return
    yield row("step", "build", first, shape, "ok", (built - start) * 1e3,
              f"{source}; TFLOPs/img {flops.full_tflops:.3g} full, {flops.late_unet_tflops:.3g} preset c late "
              f"(counted in {time.perf_counter() - built:.0f} s)")
    ideal = flops.full_tflops / flops.late_unet_tflops

    def configure(name: str) -> None:
        if name == "full":
            remove(unet)
        else:
            apply(unet, preset)
            set_phase(unet, "late")

    for dtype in settings.dtypes:
        name = selfcheck.dtype_name(dtype)
        try:
            if unet.dtype != dtype:
                unet.to(dtype)
            torch.manual_seed(settings.seed)
            inputs = example_inputs(unet_config, STEP_BATCH, settings.resolution, settings.resolution,
                                    device=settings.device, dtype=dtype)
            finite = {}

            def measure(config_name: str, phase: None) -> float:
                ms, finite[config_name] = _timed_step(unet, inputs, settings.device)
                return ms

            names = ["full", STEP_PRESET]
            timed = time_interleaved(names, configure, measure, args.repeats)
            times = {config_name: samples[None] for config_name, samples in zip(names, timed)}
            notes = {}
            for config_name in names:
                configure(config_name)
                notes[config_name] = _peak_memory_note(unet, inputs, settings.device)
            remove(unet)
        except Exception as exc:  # noqa: BLE001 - reported in the row
            remove(unet)
            yield row("step", "full vs c", name, shape, f"FAIL: {type(exc).__name__}: {exc}")
            continue
        full_ms, pruned_ms = statistics.median(times["full"]), statistics.median(times[STEP_PRESET])
        speedup = full_ms / pruned_ms
        yield row("step", "full", name, shape, "ok", full_ms,
                  f"median of {args.repeats}" + ("" if finite["full"] else "; output not finite") + notes["full"])
        result = "ok" if finite[STEP_PRESET] or not finite["full"] else "FAIL: output not finite (full's is)"
        yield row("step", f"preset {STEP_PRESET} (late)", name, shape, result, pruned_ms,
                  f"{speedup:.2f}x over full; FLOPs ideal {ideal:.2f}x; eta {speedup / ideal:.2f}" + notes[STEP_PRESET])


# --- the command -----------------------------------------------------------------------------------

def run_doctor(args) -> int:
    """The body of ``python -m atedm doctor``; returns the exit status."""
    try:
        settings = resolve_settings(args)
    except ValueError as exc:
        print(f"atedm doctor: {exc}", flush=True)
        return 2
    if settings.device.type == "cuda" and not torch.cuda.is_available():
        print("atedm doctor: --device cuda, but torch sees no CUDA device here", flush=True)
        return 2
    environment = selfcheck.environment_info(settings.device)
    for line in header_lines(settings, environment):
        print(line, flush=True)
    table = Table(environment, args.csv)
    start = time.perf_counter()
    preset = get_preset(STEP_PRESET)
    plan = dict(prune_ratio=preset.prune_ratio, iterations=preset.gwpr_iterations, seed=settings.seed)
    if "checks" in settings.sections:
        checked = selfcheck.kernel_backend(settings.backend, settings.device)
        for new_row in selfcheck.check_rows(settings.shapes, settings.dtypes, settings.device, checked, **plan):
            table.add(new_row)
    if "block" in settings.sections:
        # Timed as the pipeline runs, like the step: on the CPU that is never the interpreter.
        for new_row in selfcheck.block_rows(settings.shapes, settings.dtypes, settings.device, settings.backend,
                                            **plan):
            table.add(new_row)
    if "step" in settings.sections:
        for new_row in step_rows(args, settings):
            table.add(new_row)
    verdict = f"{table.failures} FAIL rows" if table.failures else "no failures"
    print(f"{verdict}; {len(table.rows)} rows in {time.perf_counter() - start:.0f} s", flush=True)
    return 1 if table.failures else 0

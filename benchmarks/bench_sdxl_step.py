"""Whole SDXL UNet steps, side by side in one run: full SDXL (SDPA) vs AT-EDM presets vs ToMe.

Builds the real SDXL-base UNet architecture once, straight on the device (seeded random weights, or a
local checkpoint with ``--unet-path``), then times one UNet step per row, all rows interleaved round by
round so that drift hits every row alike. Rows (``--configs``):

* ``full``            plain SDXL with PyTorch SDPA
* ``a`` .. ``dagger`` AT-EDM presets on ``--backend`` (auto: Triton on CUDA, PyTorch on the CPU)
* ``c-ref``           preset c on the PyTorch reference path (on a GPU: the paper's "maps rebuilt next to
                      fused attention" row, what the kernels buy)
* ``tomesd-<r>``      tomesd with ``max_downsample=2`` (its default 1 does nothing on SDXL), merging
                      attention, cross-attention and MLP tokens at ratio r
* ``tomesd@<preset>`` ToMe at its best setting against a preset: merging in every transformer block at the
                      ratio whose counted FLOPs match the preset's (``atedm.tome``, as the evaluation
                      harness solves it), or at its highest ratio where its FLOPs floor lies above

Per row: counted TFLOPs/step (meta device, per image, DSAP-averaged over ``--steps``), median ms/step
with the 20/80% quantiles, speed-up over full, eta = speed-up / (full FLOPs / row FLOPs), peak memory
(CUDA), whether the output was finite, and for AT-EDM rows the overhead breakdown (map, G-WPR, top-k,
gather, recovery) in ms/step and as a share of the step, timed with CUDA events on a GPU. Each row is
appended to the CSV the moment it is complete. ``--compile`` adds the same rows under ``torch.compile``
(with ``--time-budget``, only the rows whose compile fits in the time left; the others get a row saying
why); ``--explain`` counts graphs and graph breaks with ``torch._dynamo.explain``.

The FLOPs counts (seconds each at 1024 px, a ToMe ratio solve about 45 s on 2 CPU cores) run in worker
processes while this one builds the UNet, and on a GPU also while it warms up and times the steps.

    python -m benchmarks.bench_sdxl_step                       # CPU: 512 px, batch 2, bf16 if supported
    python -m benchmarks.bench_sdxl_step --height 1024 --width 1024 --batches 1,2,4 --compile --explain
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace

import torch

import atedm
import atedm_kernels
from atedm.evaluation.settings import MethodConfig, parse_config
from atedm.flops import example_inputs
from atedm.timing import call_unet, dsap_phases, schedule_average, time_interleaved, unet_step_timer
from atedm.tome import MAX_RATIO
from atedm.unets import build_random_unet, default_unet_config, step_dtype, tiny_unet_config
from benchmarks.common import RESULTS_DIR, environment_info, markdown_table, write_rows

PRESET_ROWS = ("a", "b", "c", "d", "dagger")
# The stages of AT-EDM's own work and the functions that do them, wrapped for the breakdown.
# (The CPU's one-pass route times its map separately, in stage_timers.)
STAGES = {
    "map": [("atedm_kernels.prune_plan", "head_mean_attention_map")],
    "gwpr": [("atedm_kernels.prune_plan", "gwpr_scores"), ("atedm_kernels.prune_plan", "gwpr_power_iteration")],
    "topk": [("atedm_kernels.prune_plan", "topk_keep_indices")],
    "gather": [("atedm.patch", "gather_tokens")],
    "recovery_match": [("atedm_kernels.prune_plan", "recovery_source")],
    "recovery_copy": [("atedm.patch", "scatter_recover")],
}
# Seconds one cold torch.compile graph (a row in one DSAP phase) is assumed to take before this run has
# compiled one: Inductor took about 110 s per phase of c on the 2-core CPU here (benchmarks/RESULTS.md).
# After the first compiled row the measured time replaces it.
COMPILE_SECONDS_FIRST_GUESS = 110.0


@dataclass
class Row:
    name: str
    kind: str  # full | atedm | tomesd
    config: atedm.ATEDMConfig | None = None
    tome: MethodConfig | None = None  # a matched ToMe row's ratio is solved with its FLOPs count
    phases: tuple = (None,)
    early_steps: int = 0
    counted: Future | None = None  # the FLOPs count running in a worker process
    tflops: float | None = None
    overhead_tflops: float | None = None
    note: str = ""
    times: dict = field(default_factory=dict)


def parse_rows(text: str, backend: str, steps: int = 50) -> list[Row]:
    """Rows from their names; ``steps`` (the schedule DSAP averages over) sets each AT-EDM row's early steps."""
    rows = []
    for name in (part.strip() for part in text.split(",") if part.strip()):
        if name == "full":
            rows.append(Row(name, "full"))
        elif name in PRESET_ROWS or name == "c-ref":
            config = atedm.get_preset(name.removesuffix("-ref"))
            config = config.replace(backend="torch" if name == "c-ref" else backend)
            early = config.early_steps(steps) if config.dsap_fraction > 0 else 0
            rows.append(Row(name, "atedm", config, phases=dsap_phases(early), early_steps=early))
        elif name.startswith("tomesd-"):
            tome = MethodConfig(name, "tomesd", float(name.split("-", 1)[1]), tome_max_downsample=2,
                                tome_merge_crossattn=True, tome_merge_mlp=True)
            rows.append(Row(name, "tomesd", tome=tome))
        elif name.startswith("tomesd@"):
            try:
                rows.append(Row(name, "tomesd", tome=parse_config(name)))
            except ValueError as error:
                raise SystemExit(str(error)) from None
        else:
            raise SystemExit(f"unknown row {name!r}: use full, {', '.join(PRESET_ROWS)}, c-ref, tomesd-<ratio> "
                             "or tomesd@<preset>")
    return rows


def counted_flops(unet_config: dict, row: Row, height: int, width: int, steps: int) -> dict:
    """Counted TFLOPs/step of one image for a row (in a worker process); a matched ToMe row's ratio is
    solved first, falling back to ToMe's highest ratio when even that leaves more FLOPs than the target."""
    if row.kind != "tomesd":
        report = atedm.flops_per_step(unet_config, row.config, height, width, steps)
        return {"tflops": report.unet_tflops, "overhead_tflops": report.overhead_tflops if row.config else None}
    from atedm.evaluation.tflops import config_key, counted_tflops, solve_tome_ratio

    key, tome, note = config_key(unet_config), row.tome, ""
    if tome.tome_ratio is None:
        try:
            ratio = solve_tome_ratio(tome, key, height, width, steps)
        except ValueError as error:
            ratio, note = MAX_RATIO, f"{error}; timed at its highest ratio"
        tome = replace(tome, tome_ratio=ratio)
    return {"tflops": counted_tflops(key, tome, height, width, steps)["tflops_per_step"], "tome": tome, "note": note}


def start_flops_counts(unet_config: dict, rows: list[Row], height: int, width: int, steps: int) -> ProcessPoolExecutor:
    """Submit every distinct count (c-ref counts as c) to worker processes; each row gets its future."""
    jobs: dict[tuple, list[Row]] = {}
    for row in rows:
        identity = (row.kind, row.config.replace(backend="auto") if row.config else None, row.tome)
        jobs.setdefault(identity, []).append(row)
    # spawn: the parent may hold a CUDA context, which a forked child must not inherit. One core stays
    # with this process; one thread per worker: counting on the meta device is Python work, and idle
    # OpenMP threads would spin on the cores.
    pool = ProcessPoolExecutor(max_workers=max(1, min(len(jobs), (os.cpu_count() or 1) - 1)),
                               mp_context=multiprocessing.get_context("spawn"), initializer=torch.set_num_threads,
                               initargs=(1,))
    # Longest first: a matched ToMe row's ratio solve counts about ten times.
    for same in sorted(jobs.values(), key=lambda same: same[0].kind != "tomesd"):
        future = pool.submit(counted_flops, unet_config, replace(same[0], counted=None), height, width, steps)
        for row in same:
            row.counted = future
    return pool


def fill_count(row: Row, result: dict) -> None:
    row.tflops, row.overhead_tflops = result["tflops"], result.get("overhead_tflops")
    row.tome, row.note = result.get("tome", row.tome), result.get("note", "")


def count_flops(unet_config: dict, row: Row, height: int, width: int, steps: int) -> None:
    """Count the row's FLOPs here and now (a benchmark without worker processes)."""
    fill_count(row, counted_flops(unet_config, row, height, width, steps))


def resolve_count(row: Row) -> None:
    """Wait for the row's FLOPs count (and a matched ToMe row's ratio)."""
    if row.tflops is None:
        fill_count(row, row.counted.result())


def configure(unet, row: Row) -> None:
    """Put the UNet in the row's state: every patch off, then this row's."""
    import tomesd

    atedm.remove(unet)
    tomesd.remove_patch(unet)
    if row.kind == "atedm":
        atedm.apply(unet, row.config)
    elif row.kind == "tomesd":
        resolve_count(row)
        tomesd.apply_patch(unet, **row.tome.tome_kwargs())


def quantile(index: int):
    """Picks the 20% (index 0) or 80% (index -1) quantile of a row's samples."""
    return lambda samples: statistics.quantiles(samples, n=5)[index] if len(samples) > 1 else samples[0]


def step_ms(row: Row, steps: int, pick=statistics.median) -> float:
    """A step's time averaged over the schedule with the same weights as the row's FLOPs."""
    return schedule_average(row.times, row.early_steps, steps, pick)


class StageClock:
    """Sums ms per stage. On a GPU with CUDA event pairs, read after one synchronize at the end: a
    synchronize around each of the ~70 stage calls of a step would drain the launch queue each time and
    charge the launch latency to the stages. On the CPU with the wall clock."""

    def __init__(self, device: torch.device, totals: dict):
        self.device, self.totals, self.pending = device, totals, []

    def add(self, stage: str, ms: float) -> None:
        self.totals[stage] = self.totals.get(stage, 0.0) + ms

    @contextlib.contextmanager
    def measure(self, stage: str):
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pending.append((stage, start, end))
        else:
            start = time.perf_counter()
            yield
            self.add(stage, (time.perf_counter() - start) * 1e3)

    def collect(self) -> None:
        if self.pending:
            torch.cuda.synchronize(self.device)
        for stage, start, end in self.pending:
            self.add(stage, start.elapsed_time(end))
        self.pending.clear()


@contextlib.contextmanager
def stage_timers(device: torch.device, totals: dict):
    """Wrap AT-EDM's stage functions with timers that add ms per stage to ``totals`` (complete on exit).

    The CPU's one-pass route builds the map inside the attention call (atedm_kernels.attention_with_map):
    its "map" share is that call's time beyond plain attention on the same q, k, v, timed side by side.
    Both raw sums are kept (``one_pass_attention``, ``plain_attention``); "map" gets their difference,
    clamped at zero over the whole pass rather than per call, so that timing noise does not add up.
    """
    clock = StageClock(device, totals)
    originals = []
    for stage, module_name, function_name in [(stage, *where) for stage, places in STAGES.items() for where in places]:
        module = importlib.import_module(module_name)
        original = getattr(module, function_name)

        def timed(*args, _original=original, _stage=stage, **kwargs):
            with clock.measure(_stage):
                return _original(*args, **kwargs)

        setattr(module, function_name, timed)
        originals.append((module, function_name, original))
    import atedm.patch as patch_module

    one_pass = patch_module.attention_with_map

    def one_pass_timed(q, k, v, scale=None):
        with clock.measure("one_pass_attention"):
            result = one_pass(q, k, v, scale)
        with clock.measure("plain_attention"):
            atedm_kernels.attention_with_lse(q, k, v, scale)
        return result

    patch_module.attention_with_map = one_pass_timed
    originals.append((patch_module, "attention_with_map", one_pass))
    try:
        yield
    finally:
        for module, function_name, original in originals:
            setattr(module, function_name, original)
        clock.collect()
        if "one_pass_attention" in totals:
            clock.add("map", max(0.0, totals["one_pass_attention"] - totals["plain_attention"]))


def breakdown(unet, row: Row, inputs, device, steps: int) -> dict:
    """ms per step of each stage, DSAP-weighted like the step time."""
    per_phase = {}
    for phase in row.phases:
        totals: dict = {}
        atedm.set_phase(unet, phase)
        with stage_timers(device, totals), torch.inference_mode():
            call_unet(unet, inputs)
        per_phase[phase] = totals
    weights = {"late": steps - row.early_steps, "early": row.early_steps} if len(row.phases) > 1 else {row.phases[0]: steps}
    return {stage: sum(weights[p] * per_phase[p].get(stage, 0.0) for p in row.phases) / steps for stage in STAGES}


def memory_and_finiteness(unet, row: Row, inputs, device) -> tuple[float | None, bool]:
    """Peak memory of one step in MB (CUDA; None on the CPU), and whether its output was all finite
    (random fp16 weights could overflow, and a NaN step's timings would mean nothing)."""
    if row.phases[0] is not None:
        atedm.set_phase(unet, row.phases[0])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        finite = bool(torch.isfinite(call_unet(unet, inputs).sample).all())
    peak = torch.cuda.max_memory_allocated(device) / 1e6 if device.type == "cuda" else None
    return peak, finite


def explain_counts(unet, inputs) -> tuple[int, int]:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda: call_unet(unet, inputs))()
    return explained.graph_count, explained.graph_break_count


def time_rounds(model, unet, rows: list[Row], inputs, device, repeats: int, label: str) -> None:
    """Round 0 warms up (Triton autotuning, torch.compile); rounds 1..repeats are recorded in ``row.times``."""
    def print_round(round_index: int, row: Row, phase: str | None, elapsed: float) -> None:
        print(f"  {label} round {round_index} {row.name:>10} {phase or '':>5}: {elapsed:9.1f} ms", file=sys.stderr)

    timed = time_interleaved(rows, lambda row: configure(unet, row), unet_step_timer(unet, inputs, device, model),
                             repeats, phases=lambda row: row.phases, report=print_round)
    for row, times in zip(rows, timed):
        row.times = times


def compile_within_budget(model, unet, rows: list[Row], inputs, device, args, deadline: float,
                          eager_ms: dict) -> tuple[list[Row], dict]:
    """Compile (warm) the rows one at a time, full first, each only if its compile and its timing rounds
    fit in the time left; returns the compiled rows and, per skipped row, why."""
    seconds_per_graph, compiled, skipped = COMPILE_SECONDS_FIRST_GUESS, [], {}
    measure = unet_step_timer(unet, inputs, device, model)
    for row in sorted(rows, key=lambda row: row.kind != "full"):
        graphs = len(row.phases)
        timing = (args.repeats + 1) * graphs * eager_ms[row.name] / 1e3
        needed, left = seconds_per_graph * graphs + timing, deadline - time.monotonic()
        if row.kind != "full" and not compiled:
            skipped[row.name] = "not compiled: the compiled baseline (full) was skipped"
        elif left < needed:
            skipped[row.name] = f"not compiled: {left:.0f} s of the time budget left, about {needed:.0f} s needed"
        if row.name in skipped:
            print(f"  {row.name}: {skipped[row.name]}", file=sys.stderr)
            continue
        start = time.monotonic()
        configure(unet, row)
        for phase in row.phases:
            measure(row, phase)
        seconds_per_graph = (time.monotonic() - start) / graphs
        print(f"  {row.name}: compiled in {seconds_per_graph:.1f} s per graph", file=sys.stderr)
        compiled.append(row)
    return compiled, skipped


def make_record(row: Row, mode: str, batch: int, dtype: torch.dtype, args, device, **measured) -> dict:
    """One CSV row; every row has the same columns, measured or not."""
    record = {
        "config": row.name, "mode": mode, "batch": batch, "height": args.height, "width": args.width,
        "dtype": str(dtype).removeprefix("torch."), "tflops_per_step": row.tflops, "atedm_own_tflops": row.overhead_tflops,
        "tome_ratio": row.tome.tome_ratio if row.tome else None, "ms_per_step": None, "ms_q20": None, "ms_q80": None,
        "speedup": None, "eta": None, "peak_mem_mb": None, "finite_output": None,
        **{f"{stage}_ms": None for stage in STAGES}, "overhead_ms": None, "overhead_share": None,
        "graphs": None, "graph_breaks": None, "note": row.note,
    }
    record.update(measured)
    return {**record, **environment_info(device)}


def measured_record(row: Row, full: Row, mode: str, batch: int, dtype, unet, inputs, device, args) -> dict:
    """The row's record from its timings: speed-up and eta against ``full`` in the same mode, and in eager
    mode peak memory, the finiteness check and (AT-EDM rows) the stage breakdown."""
    resolve_count(row)
    resolve_count(full)
    configure(unet, row)
    ms, full_ms = step_ms(row, args.steps), step_ms(full, args.steps)
    measured = {"ms_per_step": ms, "ms_q20": step_ms(row, args.steps, quantile(0)),
                "ms_q80": step_ms(row, args.steps, quantile(-1)), "speedup": full_ms / ms,
                "eta": full_ms / ms * row.tflops / full.tflops}
    if mode == "eager":
        measured["peak_mem_mb"], measured["finite_output"] = memory_and_finiteness(unet, row, inputs, device)
        if row.kind == "atedm" and args.breakdown:
            stages = breakdown(unet, row, inputs, device, args.steps)
            measured.update({f"{stage}_ms": value for stage, value in stages.items()})
            measured["overhead_ms"] = sum(stages.values())
            measured["overhead_share"] = measured["overhead_ms"] / ms
        if args.explain:
            if row.kind == "atedm":
                atedm.set_phase(unet, row.phases[0])
            measured["graphs"], measured["graph_breaks"] = explain_counts(unet, inputs)
    return make_record(row, mode, batch, dtype, args, device, **measured)


def load_unet(args, device: torch.device, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(args.unet_path, subfolder=args.unet_subfolder, torch_dtype=dtype)
    return unet.to(device).eval()


def run(args, emit) -> list[dict]:
    """Measure every row; ``emit`` gets each record the moment it is complete."""
    deadline = time.monotonic() + args.time_budget if args.time_budget else float("inf")
    device = torch.device(args.device)
    dtype = step_dtype(args.dtype, device)
    rows = parse_rows(args.configs, args.backend, args.steps)
    full = next((row for row in rows if row.kind == "full"), None)
    if full is None:
        raise SystemExit("--configs must include 'full': every speed-up is measured against it")
    if args.unet_path:
        unet = load_unet(args, device, dtype)
        unet_config = dict(unet.config)
        pool = start_flops_counts(unet_config, rows, args.height, args.width, args.steps)
    else:
        unet_config = tiny_unet_config() if args.tiny else default_unet_config()
        pool = start_flops_counts(unet_config, rows, args.height, args.width, args.steps)
        print(f"building the UNet ({dtype}, {device}) ...", file=sys.stderr)
        # Initialised where it runs: 2.57B parameters take 15-30 s to initialise on the CPU, a few on a GPU.
        with torch.device(device):
            unet = build_random_unet(unet_config, dtype, str(device), seed=args.seed)
    if device.type != "cuda":
        # On the CPU the counts would take cores from the timed steps: let them finish first.
        for row in rows:
            resolve_count(row)

    results = []
    try:
        for batch in [int(b) for b in args.batches.split(",")]:
            torch.manual_seed(args.seed)
            inputs = example_inputs(unet_config, batch, args.height, args.width, device=device, dtype=dtype)
            time_rounds(unet, unet, rows, inputs, device, args.repeats, f"batch {batch} eager")
            eager_ms = {row.name: step_ms(row, args.steps) for row in rows}
            for row in rows:
                results.append(emit(measured_record(row, full, "eager", batch, dtype, unet, inputs, device, args)))
            if args.compile:
                results += compiled_records(unet, rows, full, batch, dtype, inputs, device, args, deadline, eager_ms, emit)
            configure(unet, Row("full", "full"))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return results


def compiled_records(unet, rows, full, batch, dtype, inputs, device, args, deadline, eager_ms, emit) -> list[dict]:
    # One compiled module for every row: dynamo guards on the hooks and the phase and keeps a graph per
    # (row, phase); the limit is raised so that none falls back to eager.
    torch._dynamo.reset()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    model = torch.compile(unet)
    compiled, skipped = compile_within_budget(model, unet, rows, inputs, device, args, deadline, eager_ms)
    time_rounds(model, unet, compiled, inputs, device, args.repeats, f"batch {batch} compiled")
    records, compiled_names = [], {row.name for row in compiled}
    for row in rows:
        if row.name in compiled_names:
            records.append(emit(measured_record(row, full, "compiled", batch, dtype, unet, inputs, device, args)))
        else:
            resolve_count(row)
            records.append(emit(make_record(row, "compiled", batch, dtype, args, device, note=skipped[row.name])))
    return records


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_cuda = torch.cuda.is_available()
    parser.add_argument("--configs", default="full,a,b,c,d,dagger,c-ref,tomesd-0.5,tomesd@c")
    parser.add_argument("--height", type=int, default=1024 if on_cuda else 512)
    parser.add_argument("--width", type=int, default=1024 if on_cuda else 512)
    parser.add_argument("--batches", default="1,2,4" if on_cuda else "2", help="2 = one image with CFG")
    parser.add_argument("--repeats", type=int, default=10 if on_cuda else 3)
    parser.add_argument("--steps", type=int, default=50, help="schedule length DSAP averages over")
    parser.add_argument("--device", default="cuda" if on_cuda else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows (baseline compiled too)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="seconds this run may take: compiled rows whose compile would not fit are skipped, "
                             "with the reason in their row (default: no limit)")
    parser.add_argument("--explain", action="store_true", help="count graphs and graph breaks per row")
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false")
    parser.add_argument("--unet-path", help="a local SDXL checkpoint folder instead of random weights")
    parser.add_argument("--unet-subfolder", default="unet")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny SDXL-shaped UNet (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS_DIR / "sdxl_step.csv"), help="CSV to append rows to (per row)")
    args = parser.parse_args()

    def emit(record: dict) -> dict:
        write_rows(args.out, [record])
        print(f"{record['config']} {record['mode']} batch {record['batch']}: "
              + (f"{record['ms_per_step']:.1f} ms/step, {record['speedup']:.2f}x" if record["ms_per_step"]
                 else record["note"]))
        return record

    results = run(args, emit)
    columns = ["config", "mode", "batch", "tflops_per_step", "ms_per_step", "speedup", "eta", "overhead_share",
               "peak_mem_mb", "graph_breaks", "note"]
    print(markdown_table(results, columns))
    print(f"rows appended to {args.out}")


if __name__ == "__main__":
    main()

"""Whole SDXL UNet steps, side by side in one run: full SDXL (SDPA) vs AT-EDM presets vs ToMe.

Builds the real SDXL-base UNet architecture once (seeded random weights, or a local checkpoint with
``--unet-path``), then times one UNet step per row, all rows interleaved round by round so that drift
hits every row alike. Rows (``--configs``):

* ``full``            plain SDXL with PyTorch SDPA
* ``a`` .. ``dagger`` AT-EDM presets on ``--backend`` (auto: Triton on CUDA, PyTorch on the CPU)
* ``c-ref``           preset c on the PyTorch reference path (what the kernels buy, on a GPU)
* ``tomesd-<r>``      tomesd with ``max_downsample=2`` (its default 1 does nothing on SDXL), merging
                      attention, cross-attention and MLP tokens at ratio r

Per row: counted TFLOPs/step (meta device, per image, DSAP-averaged over ``--steps``), median ms/step
with the 20/80% quantiles, speed-up over full, eta = speed-up / (full FLOPs / row FLOPs), peak memory
(CUDA), and for AT-EDM rows the overhead breakdown (map, G-WPR, top-k, gather, recovery) in ms/step and
as a share of the step. ``--compile`` adds the same rows under ``torch.compile``; ``--explain`` counts
graphs and graph breaks with ``torch._dynamo.explain``.

    python -m benchmarks.bench_sdxl_step                       # CPU: 512 px, batch 2, bf16 if supported
    python -m benchmarks.bench_sdxl_step --height 1024 --width 1024 --batches 1,2,4 --compile --explain
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

import atedm
import atedm_kernels
from atedm.cli import build_random_unet, cpu_supports_bf16, default_unet_config
from atedm.flops import build_meta_unet, example_inputs
from benchmarks.common import RESULTS_DIR, environment_info, markdown_table, tiny_unet_config, write_rows

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


@dataclass
class Row:
    name: str
    kind: str  # full | atedm | tomesd
    config: atedm.ATEDMConfig | None = None
    tome_ratio: float = 0.0
    tflops: float = 0.0
    overhead_tflops: float = 0.0
    early_steps: int = 0
    phases: tuple = (None,)
    times: dict = field(default_factory=dict)


def parse_rows(text: str, backend: str) -> list[Row]:
    rows = []
    for name in (part.strip() for part in text.split(",") if part.strip()):
        if name == "full":
            rows.append(Row(name, "full"))
        elif name in PRESET_ROWS:
            rows.append(Row(name, "atedm", atedm.get_preset(name).replace(backend=backend)))
        elif name == "c-ref":
            rows.append(Row(name, "atedm", atedm.get_preset("c").replace(backend="torch")))
        elif name.startswith("tomesd-"):
            rows.append(Row(name, "tomesd", tome_ratio=float(name.split("-", 1)[1])))
        else:
            raise SystemExit(f"unknown row {name!r}: use full, {', '.join(PRESET_ROWS)}, c-ref or tomesd-<ratio>")
    return rows


def configure(unet, row: Row) -> None:
    """Put the UNet in the row's state: every patch off, then this row's."""
    import tomesd

    atedm.remove(unet)
    tomesd.remove_patch(unet)
    if row.kind == "atedm":
        atedm.apply(unet, row.config)
    elif row.kind == "tomesd":
        tomesd.apply_patch(unet, ratio=row.tome_ratio, max_downsample=2, merge_crossattn=True, merge_mlp=True)


def call_unet(unet, inputs: dict):
    # Positional sample and timestep: tomesd's hook reads the latent size from args[0].
    rest = {k: v for k, v in inputs.items() if k not in ("sample", "timestep")}
    return unet(inputs["sample"], inputs["timestep"], **rest)


def count_flops(unet_config: dict, row: Row, height: int, width: int, steps: int) -> None:
    if row.kind != "tomesd":
        report = atedm.flops_per_step(unet_config, row.config, height, width, steps)
        row.tflops, row.overhead_tflops, row.early_steps = report.unet_tflops, report.overhead_tflops, report.early_steps
        row.phases = ("late", "early") if row.early_steps else ("late",) if row.kind == "atedm" else (None,)
        return
    from torch.utils.flop_counter import FlopCounterMode

    meta = build_meta_unet(unet_config)
    configure(meta, row)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        call_unet(meta, example_inputs(unet_config, 1, height, width))
    row.tflops = counter.get_total_flops() / 1e12  # includes ToMe's own matching work


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(unet, inputs, device, phase) -> float:
    if phase is not None:
        atedm.set_phase(unet, phase)
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        call_unet(unet, inputs)
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def step_ms(row: Row, steps: int, pick=statistics.median) -> float:
    """A step's time averaged over the schedule with the same weights as the row's FLOPs."""
    late = pick(row.times[row.phases[0]])
    if len(row.phases) == 1:
        return late
    early = pick(row.times["early"])
    return (row.early_steps * early + (steps - row.early_steps) * late) / steps


@contextlib.contextmanager
def stage_timers(device: torch.device, totals: dict):
    """Wrap AT-EDM's stage functions with synchronised timers (a separate pass: the syncs cost time)."""
    import importlib

    originals = []
    for stage, module_name, function_name in [(stage, *where) for stage, places in STAGES.items() for where in places]:
        module = importlib.import_module(module_name)
        original = getattr(module, function_name)

        def timed(*args, _original=original, _stage=stage, **kwargs):
            synchronize(device)
            start = time.perf_counter()
            result = _original(*args, **kwargs)
            synchronize(device)
            totals[_stage] = totals.get(_stage, 0.0) + (time.perf_counter() - start) * 1e3
            return result

        setattr(module, function_name, timed)
        originals.append((module, function_name, original))
    # The CPU's one-pass route builds the map inside the attention call (atedm_kernels.attention_with_map):
    # its "map" share is that call's time beyond plain attention on the same q, k, v, timed side by side.
    import atedm.patch as patch_module

    one_pass = patch_module.attention_with_map

    def one_pass_timed(q, k, v, scale=None):
        synchronize(device)
        start = time.perf_counter()
        result = one_pass(q, k, v, scale)
        synchronize(device)
        fused_ms = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        atedm_kernels.attention_with_lse(q, k, v, scale)
        synchronize(device)
        plain_ms = (time.perf_counter() - start) * 1e3
        totals["map"] = totals.get("map", 0.0) + max(0.0, fused_ms - plain_ms)
        return result

    patch_module.attention_with_map = one_pass_timed
    originals.append((patch_module, "attention_with_map", one_pass))
    try:
        yield
    finally:
        for module, function_name, original in originals:
            setattr(module, function_name, original)


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


def peak_memory_mb(unet, row, inputs, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    time_step(unet, inputs, device, row.phases[0])
    return torch.cuda.max_memory_allocated(device) / 1e6


def explain_counts(unet, inputs) -> tuple[int, int]:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda: call_unet(unet, inputs))()
    return explained.graph_count, explained.graph_break_count


def run(args) -> list[dict]:
    device = torch.device(args.device)
    if args.dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else (torch.bfloat16 if cpu_supports_bf16() else torch.float32)
    else:
        dtype = getattr(torch, args.dtype)
    unet_config = default_unet_config() if not args.unet_path else None
    if args.unet_path:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(args.unet_path, subfolder=args.unet_subfolder, torch_dtype=dtype)
        unet = unet.to(device).eval()
        unet_config = dict(unet.config)
    else:
        if args.tiny:
            unet_config = tiny_unet_config()
        print(f"building the UNet ({dtype}, {device}) ...", file=sys.stderr)
        unet = build_random_unet(unet_config, dtype, str(device), seed=args.seed)

    rows = parse_rows(args.configs, args.backend)
    for row in rows:
        count_flops(unet_config, row, args.height, args.width, args.steps)
    full_tflops = next((row.tflops for row in rows if row.kind == "full"), None)
    if full_tflops is None:
        raise SystemExit("--configs must include 'full': every speed-up is measured against it")

    results = []
    modes = ["eager"] + (["compiled"] if args.compile else [])
    for batch in [int(b) for b in args.batches.split(",")]:
        torch.manual_seed(args.seed)
        inputs = example_inputs(unet_config, batch, args.height, args.width, device=device, dtype=dtype)
        for mode in modes:
            for row in rows:
                row.times = {phase: [] for phase in row.phases}
            model = unet
            if mode == "compiled":
                # One compiled module for every row: dynamo guards on the hooks and the phase and keeps a
                # graph per (row, phase); the limit is raised so that none falls back to eager.
                torch._dynamo.reset()
                torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
                model = torch.compile(unet)
            for round_index in range(args.repeats + 1):  # round 0 warms up (and compiles)
                for row in rows:
                    configure(unet, row)
                    for phase in row.phases:
                        if phase is not None:
                            atedm.set_phase(unet, phase)
                        elapsed = time_step(model, inputs, device, None)
                        if round_index:
                            row.times[phase].append(elapsed)
                        print(f"  batch {batch} {mode} round {round_index} {row.name:>10} {phase or '':>5}: "
                              f"{elapsed:9.1f} ms", file=sys.stderr)
            full_ms = step_ms(next(row for row in rows if row.kind == "full"), args.steps)
            for row in rows:
                configure(unet, row)
                ms = step_ms(row, args.steps)
                speedup = full_ms / ms
                record = {
                    "config": row.name, "mode": mode, "batch": batch, "height": args.height, "width": args.width,
                    "dtype": str(dtype).removeprefix("torch."), "tflops_per_step": row.tflops,
                    "atedm_own_tflops": row.overhead_tflops, "ms_per_step": ms,
                    "ms_q20": step_ms(row, args.steps, lambda xs: statistics.quantiles(xs, n=5)[0] if len(xs) > 1 else xs[0]),
                    "ms_q80": step_ms(row, args.steps, lambda xs: statistics.quantiles(xs, n=5)[-1] if len(xs) > 1 else xs[0]),
                    "speedup": speedup, "eta": speedup * row.tflops / full_tflops,
                    "peak_mem_mb": peak_memory_mb(unet, row, inputs, device) if mode == "eager" else None,
                }
                record.update({f"{stage}_ms": None for stage in STAGES}, overhead_ms=None, overhead_share=None,
                              graphs=None, graph_breaks=None)  # every CSV row has the same columns
                if row.kind == "atedm" and mode == "eager" and args.breakdown:
                    stages = breakdown(unet, row, inputs, device, args.steps)
                    record.update({f"{stage}_ms": value for stage, value in stages.items()})
                    record["overhead_ms"] = sum(stages.values())
                    record["overhead_share"] = record["overhead_ms"] / ms
                if args.explain and mode == "eager":
                    if row.kind == "atedm":
                        atedm.set_phase(unet, row.phases[0])
                    record["graphs"], record["graph_breaks"] = explain_counts(unet, inputs)
                results.append({**record, **environment_info(device)})
            configure(unet, Row("full", "full"))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_cuda = torch.cuda.is_available()
    parser.add_argument("--configs", default="full,a,b,c,d,dagger,c-ref,tomesd-0.5,tomesd-0.75")
    parser.add_argument("--height", type=int, default=1024 if on_cuda else 512)
    parser.add_argument("--width", type=int, default=1024 if on_cuda else 512)
    parser.add_argument("--batches", default="1,2,4" if on_cuda else "2", help="2 = one image with CFG")
    parser.add_argument("--repeats", type=int, default=10 if on_cuda else 3)
    parser.add_argument("--steps", type=int, default=50, help="schedule length DSAP averages over")
    parser.add_argument("--device", default="cuda" if on_cuda else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows (baseline compiled too)")
    parser.add_argument("--explain", action="store_true", help="count graphs and graph breaks per row")
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false")
    parser.add_argument("--unet-path", help="a local SDXL checkpoint folder instead of random weights")
    parser.add_argument("--unet-subfolder", default="unet")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny SDXL-shaped UNet (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS_DIR / "sdxl_step.csv"))
    args = parser.parse_args()
    results = run(args)
    path = write_rows(args.out, results)
    columns = ["config", "mode", "batch", "tflops_per_step", "ms_per_step", "speedup", "eta", "overhead_share",
               "peak_mem_mb", "graph_breaks"]
    print(markdown_table(results, [c for c in columns if any(c in r for r in results)]))
    print(f"rows appended to {path}")


if __name__ == "__main__":
    main()

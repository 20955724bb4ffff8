"""The frontier's speed axis: every setting's measured speed-up on the real SDXL-base architecture.

    python -m benchmarks.frontier.speed                         # SDXL-base, CPU, 512 px, bf16, CFG batch 2
    python -m benchmarks.frontier.speed --settings full,atedm-c-copy-attention-gwpr,deepcache-3 --tiny --steps 4
                                                                # a smoke run on the tests' tiny UNet

Seeded random weights (speed does not depend on them), random text embeddings, no VAE: what a pipeline
runs between its text encoders and its VAE. Two measurements, each side by side in this one run:

* ``step``: settings that change each UNet call alike (full, AT-EDM, tomesd, ToDo). Each is timed per
  UNet step, interleaved round by round; an AT-EDM setting in both DSAP phases, averaged over a
  ``--steps`` schedule with the weights of its early and late steps (``atedm.timing.schedule_average``).
  Speed-up = full's ms/step over the setting's.
* ``generation``: settings that work across steps (DeepCache, AT-EDM c with DeepCache) and full, as
  whole ``--steps``-step generations (SDXL's Euler scheduler, CFG 5 batched), interleaved. Speed-up =
  full's seconds over the setting's.

Every timing goes to ``<out>.log.jsonl`` the moment it exists; the CSV (``--out``) is written at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from atedm.flops import example_inputs
from atedm.timing import dsap_phases, schedule_average, time_interleaved, unet_step_timer
from atedm.unets import build_random_unet, default_unet_config, step_dtype, tiny_unet_config
from benchmarks.bench_generation import denoise_seconds, sdxl_scheduler
from benchmarks.common import RESULTS_DIR, environment_info, git_sha, markdown_table, write_rows

from .settings import Setting, apply_setting, select

GUIDANCE = 5.0


def early_steps_of(setting: Setting, steps: int) -> int:
    config = setting.atedm_config()
    return config.early_steps(steps) if config is not None and config.dsap_fraction > 0 else 0


def time_generation(unet, setting: Setting, inputs: dict, steps: int) -> float:
    """Seconds of one whole generation of ``steps`` steps with ``setting`` applied for its duration."""
    scheduler = sdxl_scheduler()
    scheduler.set_timesteps(steps)
    remove = apply_setting(unet, setting, scheduler)
    try:
        return denoise_seconds(unet, inputs, scheduler, GUIDANCE, "cpu")
    finally:
        remove()


def warm_up_set(settings: list[Setting]) -> list[Setting]:
    """The settings of the warm-up round: the first of each family and AT-EDM preset. A warm-up of every
    setting would double the run on this CPU; the rest share their token counts with one of these (or
    differ from them by one op), so their first call pays no extra one-off cost worth a round."""
    seen, chosen = set(), []
    for setting in settings:
        key = (setting.family, setting.atedm_preset)
        if key not in seen:
            seen.add(key)
            chosen.append(setting)
    return chosen


def measure_steps(unet, settings: list[Setting], inputs: dict, steps: int, repeats: int, log) -> list[dict]:
    """Per-step timings, interleaved: a warm-up round (``warm_up_set``), then ``repeats`` rounds of all."""
    applied = []  # the function that takes the current setting off

    def configure(setting: Setting) -> None:
        while applied:
            applied.pop()()
        applied.append(apply_setting(unet, setting))

    def phases(setting: Setting) -> tuple:
        return dsap_phases(early_steps_of(setting, steps)) if setting.atedm_preset else (None,)

    def report(round_index: int, setting: Setting, phase: str | None, elapsed: float) -> None:
        log({"measure": "step", "setting": setting.name, "phase": phase, "round": round_index, "ms": elapsed})

    try:
        timed = time_interleaved(settings, configure, unet_step_timer(unet, inputs, "cpu"), repeats, phases, report,
                                 warm_up=warm_up_set(settings))
    finally:
        while applied:
            applied.pop()()
    times = {setting.name: setting_times for setting, setting_times in zip(settings, timed)}
    full_ms = schedule_average(times["full"], 0, steps)
    rows = []
    for setting in settings:
        ms = schedule_average(times[setting.name], early_steps_of(setting, steps), steps)
        rows.append({"setting": setting.name, "family": setting.family, "measure": "step", "ms_per_step": ms,
                     "seconds_per_generation": ms * steps / 1e3, "speedup": full_ms / ms,
                     "early_steps": early_steps_of(setting, steps),
                     "samples": sum(len(samples) for samples in times[setting.name].values())})
    return rows


def measure_generations(unet, settings: list[Setting], inputs: dict, steps: int, repeats: int, log) -> list[dict]:
    """Whole generations, interleaved; a one-step generation of each setting warms it up first."""
    for setting in settings:
        time_generation(unet, setting, inputs, 1)
    seconds = {setting.name: [] for setting in settings}
    for round_index in range(1, repeats + 1):
        for setting in settings:
            elapsed = time_generation(unet, setting, inputs, steps)
            log({"measure": "generation", "setting": setting.name, "round": round_index, "seconds": elapsed})
            seconds[setting.name].append(elapsed)
    full_s = statistics.median(seconds["full"])
    return [{"setting": setting.name, "family": setting.family, "measure": "generation",
             "ms_per_step": statistics.median(seconds[setting.name]) * 1e3 / steps,
             "seconds_per_generation": statistics.median(seconds[setting.name]),
             "speedup": full_s / statistics.median(seconds[setting.name]),
             "early_steps": early_steps_of(setting, steps), "samples": len(seconds[setting.name])}
            for setting in settings]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="all", help="comma-separated names or families (default: all)")
    parser.add_argument("--part", choices=["step", "generation", "both"], default="both")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps of a generation")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1, help="measured rounds (after the warm-up)")
    parser.add_argument("--dtype", default="bfloat16", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny SDXL-shaped UNet (smoke run)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "cpu" / "frontier_speed_512px.csv"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        settings = select(args.settings)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if settings[0].name != "full":
        settings.insert(0, select("full")[0])  # every speed-up is against full, measured in the same run
    device = torch.device("cpu")
    dtype = step_dtype(args.dtype, device)
    unet_config = tiny_unet_config() if args.tiny else default_unet_config()
    print(f"building {'the tiny' if args.tiny else 'the SDXL-base'} UNet ({dtype}) ...", file=sys.stderr)
    unet = build_random_unet(unet_config, dtype, "cpu")
    torch.manual_seed(0)
    inputs = example_inputs(unet_config, 2, args.height, args.width, device=device, dtype=dtype)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_suffix(".log.jsonl")
    context = {"model": "tiny" if args.tiny else "sdxl-base", "height": args.height, "width": args.width,
               "batch": 2, "steps": args.steps, "dtype": str(dtype).removeprefix("torch."),
               "threads": torch.get_num_threads(), "git_sha": git_sha()}

    def log(record: dict) -> None:
        print(json.dumps(record), file=sys.stderr)
        with log_path.open("a") as handle:
            handle.write(json.dumps({**record, **context}) + "\n")

    rows = []
    per_step = [setting for setting in settings if not setting.across_steps]
    across = [settings[0]] + [setting for setting in settings if setting.across_steps]
    if args.part in ("step", "both"):
        rows += measure_steps(unet, per_step, inputs, args.steps, args.repeats, log)
    if args.part in ("generation", "both") and len(across) > 1:
        rows += measure_generations(unet, across, inputs, args.steps, args.repeats, log)
    rows = [{**row, **context, **environment_info(device)} for row in rows]
    write_rows(out, rows)
    print(markdown_table(rows, ["setting", "measure", "ms_per_step", "seconds_per_generation", "speedup"]))
    print(f"rows appended to {out}")


if __name__ == "__main__":
    main()

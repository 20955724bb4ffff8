"""The atedm command line: benchmark full vs AT-EDM SDXL steps, count FLOPs, or generate an image.

    python -m atedm bench      # default: SDXL-base architecture, seeded random weights, on the CPU
    python -m atedm flops      # counted TFLOPs/step of every preset at 1024 px (meta device, no weights)
    python -m atedm flops --unet-config ssd-1b   # any shipped layout (atedm.unets.UNET_LAYOUTS) or a config.json
    python -m atedm generate --model PATH_OR_HUB_ID --preset c --prompt "..."
    python -m atedm doctor     # kernels vs references at SDXL's shapes, block and step timings, one table
"""

from __future__ import annotations

import argparse
import sys

import torch

from .doctor import run_doctor
from .flops import example_inputs, flops_per_step_by_config
from .patch import apply, remove
from .presets import PAPER_PRESETS, PRESET_BUDGETS_TFLOPS, PRESETS, get_preset
from .timing import dsap_phases, schedule_average, time_interleaved, unet_step_timer
from .unets import (
    UNET_LAYOUTS,
    build_random_unet,
    default_unet_config,
    load_unet_config,
    same_architecture,
    step_dtype,
)

UNET_CONFIG_HELP = f"a UNet config.json, or a shipped layout: {', '.join(UNET_LAYOUTS)} (default: sdxl-base)"
SDXL_BASE_FULL_TFLOPS = 6.7  # the paper's count for the full SDXL-base UNet, 1024 px


def _parse_configs(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        get_preset(name)
    return names


def _unet_config_and_name(args) -> tuple[dict, str]:
    if not args.unet_config:
        return default_unet_config(), "sdxl-base"
    try:
        return load_unet_config(args.unet_config), args.unet_config
    except ValueError as error:  # a typo in a layout name: the message lists the known ones, no traceback
        raise SystemExit(f"atedm: {error}") from None


def run_bench(args) -> list[dict]:
    """Full and AT-EDM steps, interleaved in one run; prints and returns the table rows."""
    unet_config, unet_name = _unet_config_and_name(args)
    device = args.device
    dtype = step_dtype(args.dtype, device)
    presets = _parse_configs(args.presets)
    steps = args.steps

    counted = flops_per_step_by_config(
        unet_config, {"full": None, **{name: get_preset(name) for name in presets}}, args.height, args.width, steps
    )

    print(f"building the {unet_name} UNet architecture with random weights ({dtype}, {device}) ...", file=sys.stderr)
    unet = build_random_unet(unet_config, dtype, device, seed=args.seed)
    torch.manual_seed(args.seed)
    inputs = example_inputs(unet_config, args.batch, args.height, args.width, device=device, dtype=dtype)

    def configure(name: str) -> None:
        if name == "full":
            remove(unet)
        else:
            apply(unet, get_preset(name), backend=args.backend)

    def phases(name: str) -> tuple:
        return (None,) if name == "full" else dsap_phases(counted[name].early_steps)

    def print_round(round_index: int, name: str, phase: str | None, elapsed: float) -> None:
        print(f"  round {round_index} {name:>6} {phase or '':>5}: {elapsed:8.1f} ms", file=sys.stderr)

    names = ["full"] + presets
    timed = time_interleaved(names, configure, unet_step_timer(unet, inputs, device), args.repeats, phases, print_round)
    remove(unet)

    def step_ms(name: str) -> float:
        return schedule_average(timed[names.index(name)], counted[name].early_steps, steps)

    full_ms = step_ms("full")
    rows = []
    for name in names:
        report = counted[name]
        ms = step_ms(name)
        speedup = full_ms / ms
        rows.append(
            {
                "config": name,
                "tflops_per_step": report.unet_tflops,
                "overhead_tflops": report.overhead_tflops,
                "ms_per_step": ms,
                "speedup": speedup,
                "eta": speedup / report.ideal_speedup,
            }
        )
    print(
        f"\n{unet_name} UNet, random weights, {args.height}x{args.width}, batch {args.batch} (CFG), {dtype}, "
        f"{device}, backend={args.backend}, {args.repeats} interleaved rounds, DSAP over {steps} steps"
    )
    print("TFLOPs/step: UNet FLOPs per image at this size (AT-EDM's own scoring work in brackets)")
    print(f"{'config':<8} {'TFLOPs/step':>18} {'ms/step':>10} {'speed-up':>9} {'eta':>6}")
    for row in rows:
        flops = f"{row['tflops_per_step']:.3f}" + (f" (+{row['overhead_tflops']:.3f})" if row["config"] != "full" else "")
        print(f"{row['config']:<8} {flops:>18} {row['ms_per_step']:>10.1f} {row['speedup']:>8.2f}x {row['eta']:>6.2f}")
    return rows


def run_flops(args) -> None:
    unet_config, unet_name = _unet_config_and_name(args)
    # The paper's budgets are SDXL-base's; a UNet of another architecture shows none.
    sdxl_base = same_architecture(unet_config, default_unet_config())
    counted = flops_per_step_by_config(unet_config, {"full": None, **PRESETS}, args.height, args.width, args.steps)
    full = counted["full"]
    print(f"{unet_name} UNet: counted FLOPs per image per UNet pass, {args.height}x{args.width}, "
          f"averaged over {args.steps} steps")
    width = max(len("config"), *(len(name) for name in PRESETS))
    print(f"{'config':<{width}} {'UNet TFLOPs':>12} {'budget':>7} {'AT-EDM own':>11} {'saved':>7}")
    print(f"{'full':<{width}} {full.unet_tflops:>12.3f} {SDXL_BASE_FULL_TFLOPS if sdxl_base else '-':>7} {'':>11} {'':>7}")
    for name in PRESETS:
        report = counted[name]
        saved = 1 - report.unet_tflops / full.unet_tflops
        budget = PRESET_BUDGETS_TFLOPS[name] if sdxl_base else "-"
        print(f"{name:<{width}} {report.unet_tflops:>12.3f} {budget:>7} {report.overhead_tflops:>11.3f} {saved:>6.1%}")


def run_generate(args) -> None:
    from diffusers import AutoPipelineForText2Image

    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (torch.float16 if args.device.startswith("cuda") else torch.float32)
    pipe = AutoPipelineForText2Image.from_pretrained(args.model, torch_dtype=dtype).to(args.device)
    if args.preset != "none":
        apply(pipe, get_preset(args.preset), backend=args.backend)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    image = pipe(
        args.prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        generator=generator,
    ).images[0]
    image.save(args.out)
    print(f"saved {args.out} ({args.width}x{args.height}, preset {args.preset}, {args.steps} steps)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atedm", description="AT-EDM token pruning for SDXL")
    sub = parser.add_subparsers(dest="command")

    bench = sub.add_parser("bench", help="time full vs AT-EDM UNet steps (default command)")
    bench.add_argument("--presets", default=",".join(PAPER_PRESETS),
                       help="comma-separated preset names (default: the paper's)")
    bench.add_argument("--height", type=int, default=512)
    bench.add_argument("--width", type=int, default=512)
    bench.add_argument("--batch", type=int, default=2, help="2 = one image with classifier-free guidance")
    bench.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds after one warm-up")
    bench.add_argument("--steps", type=int, default=50, help="schedule length that DSAP averages over")
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bench.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    bench.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    bench.add_argument("--unet-config", help=UNET_CONFIG_HELP)
    bench.add_argument("--seed", type=int, default=0)

    flops = sub.add_parser("flops", help="counted TFLOPs/step of the full UNet and every preset")
    flops.add_argument("--height", type=int, default=1024)
    flops.add_argument("--width", type=int, default=1024)
    flops.add_argument("--steps", type=int, default=50)
    flops.add_argument("--unet-config", help=UNET_CONFIG_HELP)

    gen = sub.add_parser("generate", help="generate an image with an SDXL pipeline and a preset")
    gen.add_argument("--model", required=True, help="local pipeline folder or hub id")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--preset", default="c", choices=sorted(PRESETS) + ["none"])
    gen.add_argument("--steps", type=int, default=50)
    gen.add_argument("--guidance-scale", type=float, default=7.0)
    gen.add_argument("--height", type=int, default=1024)
    gen.add_argument("--width", type=int, default=1024)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", default="atedm.png")
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    gen.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])

    doctor = sub.add_parser("doctor", help="self-check: kernels vs references, block and step timings")
    doctor.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when present, else cpu")
    doctor.add_argument("--dtypes", help="comma-separated; default float16,bfloat16 on CUDA, one CPU dtype")
    doctor.add_argument("--resolution", type=int, help="image size in px; default 1024 on CUDA, 256 on the CPU")
    doctor.add_argument("--sections", default="checks,block,step", help="any of checks,block,step")
    doctor.add_argument("--model", help="a local diffusers UNet folder, or a pipeline folder with unet/")
    doctor.add_argument("--unet-config", help=UNET_CONFIG_HELP + " (random weights)")
    doctor.add_argument("--tiny", action="store_true", help="tiny shapes and the tests' tiny UNet (dry run)")
    doctor.add_argument("--csv", help="CSV to append every row to, with device, versions and git SHA")
    doctor.add_argument("--repeats", type=int,
                        help="interleaved UNet step rounds after one warm-up; default 3 on CUDA, 1 on the CPU")
    doctor.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    doctor.add_argument("--seed", type=int, help="seed of the random inputs (default: fresh, printed)")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        argv = ["bench"] + argv
    args = build_parser().parse_args(argv)
    if args.command == "doctor":
        sys.exit(run_doctor(args))
    {"bench": run_bench, "flops": run_flops, "generate": run_generate}[args.command](args)

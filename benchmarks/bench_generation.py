"""Per-generation latency: a whole SDXL denoising loop over the UNet, full vs AT-EDM vs ToMe.

The loop is what a pipeline runs between the text encoders and the VAE: SDXL's Euler scheduler, CFG
batched into one UNet call per step, ``guidance_scale`` 5. Text embeddings are random (no encoder is
needed to time the UNet), the VAE is left out. AT-EDM's DSAP follows the schedule given with
``atedm.set_timesteps``. Configs are interleaved generation by generation.

For scale, the paper's totals per generation (their GPU; steps and batch not stated): SDXL 18.0 s,
AT-EDM with rebuilt maps 18.3 s, with a hypothetical map-returning kernel 16.3 s, ToMe 17.7 s.

    python -m benchmarks.bench_generation                      # CPU: 256 px, 30 and 50 steps
    python -m benchmarks.bench_generation --height 1024 --width 1024 --repeats 3   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from diffusers import EulerDiscreteScheduler

import atedm
from atedm.flops import example_inputs
from atedm.timing import call_unet, synchronize, time_interleaved
from atedm.unets import build_random_unet, default_unet_config, step_dtype, tiny_unet_config
from benchmarks.bench_sdxl_step import Row, configure, count_flops, parse_rows
from benchmarks.common import RESULTS_DIR, environment_info, markdown_table, write_rows

PAPER_SECONDS = {"full": 18.0, "c": 16.3, "tomesd": 17.7}  # fused attention; AT-EDM with a fused kernel


def sdxl_scheduler() -> EulerDiscreteScheduler:
    """SDXL-base's scheduler settings."""
    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  timestep_spacing="leading", steps_offset=1)


def generate(unet, row: Row, inputs: dict, steps: int, guidance: float, device) -> float:
    """Seconds for one generation of ``steps`` denoising steps."""
    scheduler = sdxl_scheduler()
    scheduler.set_timesteps(steps, device=device)
    return denoise_seconds(unet, inputs, scheduler, guidance, device)


def denoise_seconds(unet, inputs: dict, scheduler, guidance: float, device) -> float:
    """Seconds for the denoising loop over ``scheduler``'s timesteps (``set_timesteps`` done), CFG batched.
    An AT-EDM patch on ``unet`` follows this schedule. The timestep goes positionally as a 0-d tensor
    (``call_unet``), which DeepCache's helper reads to index the step."""
    if atedm.get_state(unet) is not None:
        atedm.set_timesteps(unet, scheduler.timesteps)
        atedm.set_phase(unet, None)
    half = inputs["sample"][: inputs["sample"].shape[0] // 2]
    latents = half * scheduler.init_noise_sigma
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            noise = call_unet(unet, {**inputs, "sample": model_input, "timestep": t}).sample
            uncond, cond = noise.chunk(2)
            latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_cuda = torch.cuda.is_available()
    parser.add_argument("--configs", default="full,c,dagger,tomesd-0.5")
    parser.add_argument("--steps", default="30,50")
    parser.add_argument("--height", type=int, default=1024 if on_cuda else 256)
    parser.add_argument("--width", type=int, default=1024 if on_cuda else 256)
    parser.add_argument("--repeats", type=int, default=3 if on_cuda else 1)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--device", default="cuda" if on_cuda else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny SDXL-shaped UNet (smoke test)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "generation.csv"))
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = step_dtype(args.dtype, device)
    unet_config = tiny_unet_config() if args.tiny else default_unet_config()
    print(f"building the UNet ({dtype}, {device}) ...", file=sys.stderr)
    unet = build_random_unet(unet_config, dtype, str(device))
    torch.manual_seed(0)
    inputs = example_inputs(unet_config, 2, args.height, args.width, device=device, dtype=dtype)
    rows = parse_rows(args.configs, args.backend)
    if rows[0].kind != "full":
        raise SystemExit("--configs must start with 'full': every speed-up is measured against it")

    results = []
    for steps in [int(s) for s in args.steps.split(",")]:
        for row in rows:
            count_flops(unet_config, row, args.height, args.width, steps)

        def print_round(round_index: int, row: Row, phase: None, elapsed: float) -> None:
            print(f"  {steps} steps round {round_index} {row.name:>10}: {elapsed:8.2f} s", file=sys.stderr)

        timed = time_interleaved(rows, lambda row: configure(unet, row),
                                 lambda row, phase: generate(unet, row, inputs, steps, args.guidance, device),
                                 args.repeats, report=print_round)
        configure(unet, Row("full", "full"))
        full_s = statistics.median(timed[0][None])
        for row, seconds in zip(rows, timed):
            median = statistics.median(seconds[None])
            results.append({
                "config": row.name, "steps": steps, "height": args.height, "width": args.width, "batch": 2,
                "dtype": str(dtype).removeprefix("torch."), "tflops_per_step": row.tflops, "seconds": median,
                "speedup": full_s / median, "eta": full_s / median * row.tflops / rows[0].tflops,
                "paper_seconds": PAPER_SECONDS.get(row.name.split("-")[0]), **environment_info(device),
            })
    path = write_rows(args.out, results)
    print(markdown_table(results, ["config", "steps", "tflops_per_step", "seconds", "speedup", "eta", "paper_seconds"]))
    print(f"rows appended to {path}")


if __name__ == "__main__":
    main()

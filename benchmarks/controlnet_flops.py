"""Counted FLOPs of one SDXL UNet + ControlNet step, with AT-EDM on the UNet, on the ControlNet, or on both.

    python -m benchmarks.controlnet_flops [--height 1024 --width 1024 --steps 50 --presets a,b,c,d,dagger]

A ControlNet pipeline runs two networks per denoising step: the UNet, and a ControlNet that copies the UNet's
embeddings, down blocks and mid block and adds a conditioning embedding (control image -> latent grid) and one
zero-initialised 1x1 convolution per residual. ``atedm.apply(pipe, ...)`` prunes the UNet only;
``atedm.apply(pipe.controlnet, ...)`` is the opt-in that also prunes the ControlNet's five attention blocks
(down_blocks.1/2 and the mid block, the same blocks as the UNet's down path).

Both are counted on the real SDXL-base architecture on the ``meta`` device (no weights), the ControlNet built
the way the published SDXL ControlNets are (``ControlNetModel.from_unet``), under ``FlopCounterMode`` exactly as
``atedm.flops`` counts the UNet: 2 x multiply-adds of matmuls, convolutions and attention, per image (batch 1);
AT-EDM's own scoring and recovery work is reported apart. The ControlNet's DSAP blocks follow the published
rule (down_blocks.1.attentions.0, down_blocks.2.attentions.0 unpruned in the first 10% of steps); the per-step
figure averages the early and late passes over the schedule, as ``atedm.flops_per_step`` does. The UNet's
elementwise addition of the residuals costs no counted FLOPs, so the UNet's figures are ``flops_per_step``'s.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import diffusers
import torch
from diffusers import ControlNetModel

from atedm.config import ATEDMConfig
# count_pass and pruned_report take any model and its inputs: the ControlNet is counted exactly as the UNet is.
from atedm.flops import FlopsReport, build_meta_unet, count_pass, example_inputs, flops_per_step_by_config, pruned_report
from atedm.presets import PRESETS
from atedm.unets import default_unet_config
from benchmarks.common import git_sha


def build_meta_controlnet(unet_config: dict) -> ControlNetModel:
    """The ControlNet of a UNet architecture on the meta device (SDXL's: factor-8 conditioning embedding)."""
    unet = build_meta_unet(unet_config)
    with torch.device("meta"):
        return ControlNetModel.from_unet(unet, load_weights_from_unet=False)


def controlnet_inputs(unet_config: dict, height: int, width: int) -> dict:
    """ControlNet call arguments for one image: the UNet's, plus the control image at full image size."""
    inputs = example_inputs(unet_config, 1, height, width)
    inputs["controlnet_cond"] = torch.randn(1, 3, height, width, device="meta")
    return inputs


def controlnet_flops_by_config(
    unet_config: dict,
    configs: Mapping[str, ATEDMConfig | str | None],
    height: int = 1024,
    width: int = 1024,
    num_inference_steps: int = 50,
) -> dict[str, FlopsReport]:
    """``atedm.flops_per_step_by_config`` for the ControlNet of ``unet_config``: by name, one report per config
    (None = unpatched), on one meta ControlNet whose full pass is counted once.

    Each report's ``unet_tflops`` / ``early_unet_tflops`` / ``late_unet_tflops`` are the ControlNet's own work
    here (the field names are atedm.flops's) and ``full_tflops`` the unpatched ControlNet's.
    """
    controlnet = build_meta_controlnet(unet_config)
    inputs = controlnet_inputs(unet_config, height, width)
    full, _ = count_pass(controlnet, inputs, None)
    return {
        name: pruned_report(controlnet, inputs, full, config, num_inference_steps)
        if config is not None
        else FlopsReport(full / 1e12, 0.0, full / 1e12, full / 1e12, full / 1e12, 0, num_inference_steps)
        for name, config in configs.items()
    }


def flops_table(presets: list[str], height: int = 1024, width: int = 1024, num_inference_steps: int = 50,
                unet_config: dict | None = None) -> list[dict]:
    """One row per (network, preset), the unpatched one first; TFLOPs per image per step."""
    unet_config = unet_config or default_unet_config()
    configs = {"none": None, **{preset: preset for preset in presets}}
    unet_reports = flops_per_step_by_config(unet_config, configs, height, width, num_inference_steps)
    controlnet_reports = controlnet_flops_by_config(unet_config, configs, height, width, num_inference_steps)
    return [
        {"network": network, "preset": name, "early": report.early_unet_tflops, "late": report.late_unet_tflops,
         "per_step": report.unet_tflops, "overhead": report.overhead_tflops, "early_steps": report.early_steps}
        for network, reports in (("UNet", unet_reports), ("ControlNet", controlnet_reports))
        for name, report in reports.items()
    ]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50, help="schedule length the DSAP average is taken over")
    parser.add_argument("--presets", default=",".join(PRESETS))
    args = parser.parse_args(argv)
    presets = args.presets.split(",")
    rows = flops_table(presets, args.height, args.width, args.steps)

    print(f"SDXL-base UNet + ControlNet (from_unet), 1 image {args.height} x {args.width} (latent "
          f"{args.height // 8} x {args.width // 8}, control image 3 x {args.height} x {args.width}), 77 text tokens, "
          f"{args.steps} steps; counted on the meta device with torch {torch.__version__}, diffusers "
          f"{diffusers.__version__}, atedm {git_sha()}")
    print(f"DSAP early steps per generation: {rows[-1]['early_steps']} of {args.steps}. TFLOPs per image per step.\n")
    print("| network    | AT-EDM | early  | late   | per step | AT-EDM overhead |")
    print("|------------|--------|--------|--------|----------|-----------------|")
    for row in rows:
        print(f"| {row['network']:<10} | {row['preset']:<6} | {row['early']:6.3f} | {row['late']:6.3f} | "
              f"{row['per_step']:8.3f} | {row['overhead']:15.3f} |")

    per_step = {(row["network"], row["preset"]): row["per_step"] for row in rows}
    full = per_step["UNet", "none"] + per_step["ControlNet", "none"]
    print("\n| UNet + ControlNet per step         | TFLOPs | of the unpruned pair |")
    print("|------------------------------------|--------|----------------------|")
    for unet_preset, controlnet_preset in [("none", "none"), *((p, "none") for p in presets), *((p, p) for p in presets)]:
        pair = per_step["UNet", unet_preset] + per_step["ControlNet", controlnet_preset]
        label = f"UNet {unet_preset} + ControlNet {controlnet_preset}"
        print(f"| {label:<34} | {pair:6.3f} | {pair / full:20.1%} |")
    return rows


if __name__ == "__main__":
    main()

"""Solve each preset's prune ratio for the paper's FLOPs budget on the SDXL-base architecture.

    python -m benchmarks.calibrate_presets [--unet-config PATH]

Bisects ``prune_ratio`` (the counted UNet FLOPs fall monotonically as it grows) with the other fields of
each preset fixed, and prints the ratio to put in ``atedm/presets.py`` with the FLOPs it gives.
"""

from __future__ import annotations

import argparse
import json

import atedm
from atedm.presets import PAPER_PRESETS, PRESET_BUDGETS_TFLOPS
from atedm.unets import default_unet_config


def solve_ratio(unet_config: dict, base: atedm.ATEDMConfig, budget: float, steps: int = 14) -> tuple[float, float]:
    low, high = 0.0, 0.99
    for _ in range(steps):
        middle = (low + high) / 2
        tflops = atedm.flops_per_step(unet_config, base.replace(prune_ratio=middle)).unet_tflops
        low, high = (middle, high) if tflops > budget else (low, middle)
    ratio = round((low + high) / 2, 3)
    return ratio, atedm.flops_per_step(unet_config, base.replace(prune_ratio=ratio)).unet_tflops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet-config", help="UNet config JSON (default: the SDXL-base config atedm ships)")
    parser.add_argument("--presets", default=",".join(PAPER_PRESETS))
    args = parser.parse_args()
    unet_config = json.load(open(args.unet_config)) if args.unet_config else default_unet_config()
    for name in args.presets.split(","):
        ratio, tflops = solve_ratio(unet_config, PAPER_PRESETS[name], PRESET_BUDGETS_TFLOPS[name])
        print(f"{name}: prune_ratio={ratio}  ->  {tflops:.3f} TFLOPs/step (budget {PRESET_BUDGETS_TFLOPS[name]})")


if __name__ == "__main__":
    main()

"""Counted TFLOPs per config, and the ToMe ratio that matches a FLOPs budget (``tomesd@<target>`` configs).

Everything is counted on the ``meta`` device from the pipeline's UNet config (no weights are loaded):
UNet FLOPs of one image per step at the run's size, 2 x multiply-adds, averaged over the DSAP schedule
for AT-EDM (``atedm.flops_per_step``), and for ToMe its UNet's and its matching work together
(``atedm.tome``). A matched ToMe config gets the ratio in (0, 0.75] whose counted TFLOPs per step are
closest to the target's, as close as whole tokens allow (``atedm.tome.solve_ratio``).
"""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import replace

from ..presets import PRESETS
from ..tome import count_tome_flops, solve_ratio
from .settings import EvalSettings, MethodConfig

MATCH_TOLERANCE = 0.05  # a budget ToMe misses by more than this (relative) is refused


def model_configs(model: str) -> tuple[dict, int]:
    """The UNet config and the VAE factor of a pipeline (a folder or a hub id), read without loading weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet_config = UNet2DConditionModel.load_config(model, subfolder="unet")
    try:
        vae_channels = AutoencoderKL.load_config(model, subfolder="vae")["block_out_channels"]
        vae_factor = 2 ** (len(vae_channels) - 1)
    except (OSError, KeyError):
        vae_factor = 8  # SDXL's
    return dict(unet_config), vae_factor


def _count_size(settings: EvalSettings, vae_factor: int) -> tuple[int, int]:
    # flops_per_step takes the image size and assumes SDXL's VAE factor 8; scale so the latent is right.
    return settings.height * 8 // vae_factor, settings.width * 8 // vae_factor


@functools.lru_cache(maxsize=64)
def counted_tflops(unet_config_json: str, config: MethodConfig, height: int, width: int, steps: int) -> dict:
    """TFLOPs/step of one image for a (resolved) config, counted on the meta device (cached: counting takes seconds)."""
    from ..flops import flops_per_step

    unet_config = json.loads(unet_config_json)
    if config.kind in ("full", "atedm"):
        report = flops_per_step(unet_config, None if config.kind == "full" else config.name, height, width, steps)
        return {"tflops_per_step": report.unet_tflops, "overhead_tflops": report.overhead_tflops if config.kind == "atedm" else None,
                "flops_counted": True}
    try:
        flops = count_tome_flops(unet_config, config.tome_kwargs(), height, width).total / 1e12
    except Exception as error:  # a tomesd/diffusers mismatch on meta tensors must not lose the metrics
        print(f"warning: could not count ToMe FLOPs ({error!r}); reporting the full model's", file=sys.stderr)
        full = counted_tflops(unet_config_json, MethodConfig("full", "full"), height, width, steps)
        return {**full, "flops_counted": False}
    return {"tflops_per_step": flops, "overhead_tflops": None, "flops_counted": True}


def config_key(unet_config: dict) -> str:
    """The UNet config as the JSON text the counts are cached by."""
    return json.dumps(unet_config, sort_keys=True, default=str)


def target_tflops(config: MethodConfig, unet_config_json: str, height: int, width: int, steps: int) -> float:
    """The TFLOPs per step a matched config aims at: its preset's counted UNet FLOPs, or the number given."""
    if config.tome_match in PRESETS:
        preset = MethodConfig(config.tome_match, "atedm")
        return counted_tflops(unet_config_json, preset, height, width, steps)["tflops_per_step"]
    return float(config.tome_match)


def solve_tome_ratio(config: MethodConfig, unet_config_json: str, height: int, width: int, steps: int) -> float:
    """The ratio whose counted ToMe TFLOPs/step are closest to the target's (``height`` and ``width``: the
    counting size, latent x 8). Raises a ValueError when the target is out of ToMe's reach (by more than
    ``MATCH_TOLERANCE``)."""
    unet_config = json.loads(unet_config_json)

    def tflops_at(ratio: float) -> float:
        return count_tome_flops(unet_config, replace(config, tome_ratio=ratio).tome_kwargs(), height, width).total / 1e12

    target = target_tflops(config, unet_config_json, height, width, steps)
    return solve_ratio(tflops_at, target, (height // 8) * (width // 8), MATCH_TOLERANCE, config.name)


def resolve_configs(settings: EvalSettings, configs: tuple[MethodConfig, ...] | None = None) -> tuple[MethodConfig, ...]:
    """The run's configs with every matched ToMe ratio solved for its model, size and steps."""
    configs = settings.method_configs if configs is None else configs
    if not any(config.kind == "tomesd" and config.tome_ratio is None for config in configs):
        return configs
    unet_config, vae_factor = model_configs(settings.model)
    height, width = _count_size(settings, vae_factor)
    key = config_key(unet_config)
    return tuple(
        replace(config, tome_ratio=solve_tome_ratio(config, key, height, width, settings.steps))
        if config.kind == "tomesd" and config.tome_ratio is None else config
        for config in configs
    )


def count_tflops(settings: EvalSettings, configs: tuple[MethodConfig, ...] | None = None) -> dict[str, dict]:
    """Per config name: UNet TFLOPs/step of one image at the run's size (and AT-EDM's own work apart)."""
    configs = resolve_configs(settings, configs)
    unet_config, vae_factor = model_configs(settings.model)
    height, width = _count_size(settings, vae_factor)
    key = config_key(unet_config)
    return {config.name: counted_tflops(key, config, height, width, settings.steps) for config in configs}

"""Counted TFLOPs per config, and the ToMe ratio that matches a FLOPs budget (``tomesd@<target>`` configs).

Everything is counted on the ``meta`` device from the pipeline's UNet config (no weights are loaded):
UNet FLOPs of one image per step at the run's size, 2 x multiply-adds, averaged over the DSAP schedule
for AT-EDM (``atedm.flops_per_step``). A matched ToMe config gets the ratio in (0, 0.75] whose counted
TFLOPs per step are closest to the target's. tomesd merges ``int(tokens * ratio)`` tokens at each level it
patches, so the count is a step function of the ratio that changes only at multiples of 1 / (latent
tokens); the search runs over those steps (a ratio in the middle of each, safe from rounding), by
interpolation with a bisection safeguard: a handful of counts, and the match is as close as whole tokens
allow.
"""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import replace

import torch

from ..presets import PRESETS
from .settings import TOME_MAX_RATIO, EvalSettings, MethodConfig, import_tomesd

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


@functools.lru_cache(maxsize=1)
def _meta_unet(unet_config_json: str):
    from ..flops import build_meta_unet

    return build_meta_unet(json.loads(unet_config_json))


@functools.lru_cache(maxsize=256)
def _tome_tflops(unet_config_json: str, kwargs: tuple, height: int, width: int) -> float:
    """TFLOPs of one ToMe-patched UNet pass (``kwargs``: sorted ``tomesd.apply_patch`` arguments)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..flops import example_inputs

    tomesd = import_tomesd()
    unet = _meta_unet(unet_config_json)  # one meta UNet, patched and unpatched per count
    inputs = example_inputs(json.loads(unet_config_json), 1, height, width)
    sample = inputs.pop("sample")
    # use_rand off: it moves which tokens merge, not how many. tomesd's size hook reads the sample
    # from the positional arguments, so it is passed positionally.
    tomesd.apply_patch(unet, use_rand=False, **dict(kwargs))
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unet(sample, inputs.pop("timestep"), **inputs)
    finally:
        tomesd.remove_patch(unet)
    return counter.get_total_flops() / 1e12


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
        flops = _tome_tflops(unet_config_json, tuple(sorted(config.tome_kwargs().items())), height, width)
    except Exception as error:  # a tomesd/diffusers mismatch on meta tensors must not lose the metrics
        print(f"warning: could not count ToMe FLOPs ({error!r}); reporting the full model's", file=sys.stderr)
        full = counted_tflops(unet_config_json, MethodConfig("full", "full"), height, width, steps)
        return {**full, "flops_counted": False}
    return {"tflops_per_step": flops, "overhead_tflops": None, "flops_counted": True}


def _config_key(unet_config: dict) -> str:
    return json.dumps(unet_config, sort_keys=True, default=str)


def target_tflops(config: MethodConfig, unet_config_json: str, height: int, width: int, steps: int) -> float:
    """The TFLOPs per step a matched config aims at: its preset's counted UNet FLOPs, or the number given."""
    if config.tome_match in PRESETS:
        preset = MethodConfig(config.tome_match, "atedm")
        return counted_tflops(unet_config_json, preset, height, width, steps)["tflops_per_step"]
    return float(config.tome_match)


def solve_tome_ratio(config: MethodConfig, unet_config_json: str, height: int, width: int, steps: int) -> float:
    """The ratio in (0, 0.75] whose counted ToMe TFLOPs/step are closest to the target's (``height`` and
    ``width``: the counting size, latent x 8). Raises a ValueError when the target is out of ToMe's reach
    (by more than ``MATCH_TOLERANCE``)."""
    target = target_tflops(config, unet_config_json, height, width, steps)
    tokens = (height // 8) * (width // 8)  # every patched level's token count divides this one

    def ratio(k: int) -> float:  # the middle of the k-th step: int(level tokens * ratio) is exact
        return min(round((k + 0.5) / tokens, 6), TOME_MAX_RATIO)

    def tflops(k: int) -> float:
        kwargs = replace(config, tome_ratio=ratio(k)).tome_kwargs()
        return _tome_tflops(unet_config_json, tuple(sorted(kwargs.items())), height, width)

    lo, hi = 0, int(TOME_MAX_RATIO * tokens)  # the count falls (weakly) as k grows
    f_lo, f_hi = tflops(lo), tflops(hi)
    what = f"{config.name}: the target of {target:.4g} TFLOPs/step"
    if target < f_hi * (1 - MATCH_TOLERANCE):
        raise ValueError(f"{what} is below ToMe's reach: merging the most it can (ratio {TOME_MAX_RATIO}) leaves "
                         f"{f_hi:.4g} TFLOPs/step at this size")
    if target > f_lo * (1 + MATCH_TOLERANCE):
        raise ValueError(f"{what} is above the unpatched model's ({f_lo:.4g} TFLOPs/step at this size)")
    if target <= f_hi:
        return ratio(hi)
    if target >= f_lo:
        return ratio(lo)
    moved = []  # which end moved at each step: two in a row on one side -> bisect (regula falsi stalls)
    while hi - lo > 1:  # invariant: tflops(lo) > target >= tflops(hi)
        if moved[-2:] in (["lo", "lo"], ["hi", "hi"]):
            mid = (lo + hi) // 2
        else:
            mid = lo + round((f_lo - target) / (f_lo - f_hi) * (hi - lo))
        mid = min(max(mid, lo + 1), hi - 1)
        value = tflops(mid)
        if value > target:
            lo, f_lo = mid, value
            moved.append("lo")
        else:
            hi, f_hi = mid, value
            moved.append("hi")
    return ratio(lo) if f_lo - target < target - f_hi else ratio(hi)


def resolve_configs(settings: EvalSettings, configs: tuple[MethodConfig, ...] | None = None) -> tuple[MethodConfig, ...]:
    """The run's configs with every matched ToMe ratio solved for its model, size and steps."""
    configs = settings.method_configs if configs is None else configs
    if not any(config.kind == "tomesd" and config.tome_ratio is None for config in configs):
        return configs
    unet_config, vae_factor = model_configs(settings.model)
    height, width = _count_size(settings, vae_factor)
    key = _config_key(unet_config)
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
    key = _config_key(unet_config)
    return {config.name: counted_tflops(key, config, height, width, settings.steps) for config in configs}

"""ToMe for SD (``tomesd``), the baseline AT-EDM is compared with: its counted FLOPs, and the ratio
that meets a FLOPs budget.

FLOPs are counted as ``atedm.flops_per_step`` counts AT-EDM's: on the ``meta`` device (no weights),
one UNet pass of one image, 2 x multiply-adds. ToMe's own work, the similarity matmuls that choose which
tokens merge, is counted apart from the UNet's, as AT-EDM's scoring work is.

tomesd merges ``int(level tokens * ratio)`` tokens at each level it patches, and every patched level's
token count divides the latent's, so the count is a step function of the ratio that changes only at
multiples of 1 / (latent tokens). ``solve_ratio`` searches those steps (a ratio in the middle of each,
safe from rounding) by interpolation with a bisection safeguard: a handful of counts, and the match is as
close as whole tokens allow.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Callable

import torch

MAX_RATIO = 0.75  # one destination per 2x2 window: at most 3/4 of the tokens can merge


def import_tomesd():
    """tomesd, or an ImportError saying how to install it (an optional dependency)."""
    try:
        import tomesd
    except ImportError as error:
        raise ImportError("tomesd:<ratio> configs need the tomesd package: pip install tomesd") from error
    return tomesd


@dataclass(frozen=True)
class TomeFlops:
    """FLOPs of one ToMe-patched UNet pass for one image."""

    unet: float  # the UNet's own work on the merged tokens
    matching: float  # ToMe's similarity matmuls that choose the merges

    @property
    def total(self) -> float:
        return self.unet + self.matching


@functools.lru_cache(maxsize=1)
def _meta_unet(unet_config_json: str):
    from .flops import build_meta_unet

    return build_meta_unet(json.loads(unet_config_json))


@functools.lru_cache(maxsize=256)
def _count(unet_config_json: str, tome_kwargs: tuple, height: int, width: int) -> TomeFlops:
    from torch.utils.flop_counter import FlopCounterMode

    from .flops import example_inputs

    tomesd = import_tomesd()
    unet = _meta_unet(unet_config_json)  # one meta UNet, patched and unpatched per count
    inputs = example_inputs(json.loads(unet_config_json), 1, height, width)
    sample, timestep = inputs.pop("sample"), inputs.pop("timestep")
    matching = []
    compute_merge = tomesd.patch.compute_merge

    def counted_compute_merge(x, tome_info):
        with FlopCounterMode(display=False) as counter:
            merge_functions = compute_merge(x, tome_info)
        matching.append(counter.get_total_flops())
        return merge_functions

    # use_rand off: it moves which tokens merge, not how many. ToMe's blocks look compute_merge up in
    # tomesd.patch at call time, so swapping it there counts the matching apart.
    tomesd.apply_patch(unet, use_rand=False, **dict(tome_kwargs))
    tomesd.patch.compute_merge = counted_compute_merge
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            # tomesd's size hook reads the sample from the positional arguments.
            unet(sample, timestep, **inputs)
    finally:
        tomesd.patch.compute_merge = compute_merge
        tomesd.remove_patch(unet)
    matching_flops = float(sum(matching))
    return TomeFlops(float(counter.get_total_flops()) - matching_flops, matching_flops)


def count_tome_flops(unet_config: dict, tome_kwargs: dict, height: int, width: int) -> TomeFlops:
    """FLOPs of one ToMe-patched pass at an image size (latent = image / 8); ``tome_kwargs``: the
    ``tomesd.apply_patch`` arguments besides the model. Cached: a count at 1024 px takes seconds."""
    config_json = json.dumps(unet_config, sort_keys=True, default=str)
    return _count(config_json, tuple(sorted(tome_kwargs.items())), height, width)


def solve_ratio(tflops_at: Callable[[float], float], target: float, latent_tokens: int, tolerance: float,
                label: str) -> float:
    """The ratio in (0, ``MAX_RATIO``] whose ``tflops_at(ratio)`` (TFLOPs/step, falling with the ratio in
    steps of 1 / ``latent_tokens``) is closest to ``target``. Raises a ValueError, its message starting
    with ``label``, when the target lies out of ToMe's reach by more than ``tolerance`` (relative)."""
    def ratio(k: int) -> float:  # the middle of the k-th step: int(level tokens * ratio) is exact
        return min(round((k + 0.5) / latent_tokens, 6), MAX_RATIO)

    def tflops(k: int) -> float:
        return tflops_at(ratio(k))

    lo, hi = 0, int(MAX_RATIO * latent_tokens)  # the count falls (weakly) as k grows
    f_lo, f_hi = tflops(lo), tflops(hi)
    what = f"{label}: the target of {target:.4g} TFLOPs/step"
    if target < f_hi * (1 - tolerance):
        raise ValueError(f"{what} is below ToMe's reach: merging the most it can (ratio {MAX_RATIO}) leaves "
                         f"{f_hi:.4g} TFLOPs/step at this size")
    if target > f_lo * (1 + tolerance):
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

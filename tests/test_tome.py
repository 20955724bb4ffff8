"""ToMe's counted FLOPs and the ratio solver that matches them to a budget (``atedm.tome``)."""

import math
import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import atedm
from atedm.flops import build_meta_unet, example_inputs
from atedm.tome import MAX_RATIO, count_tome_flops, solve_ratio
from atedm.unets import tiny_unet_config

TINY_SIZE = 128  # px: a 16 x 16 latent, 64 tokens at level 2 and 16 at level 3 of the tiny UNet


def random_step_function(latent_tokens: int, rng: random.Random) -> list[float]:
    """TFLOPs per step k of 1 / latent_tokens, falling weakly (plateaus, as where a coarse level decides)."""
    counts, value = [], rng.uniform(5.0, 7.0)
    for _ in range(int(MAX_RATIO * latent_tokens) + 1):
        counts.append(value)
        value -= rng.choice([0.0, 0.0, rng.uniform(1e-4, 1e-2)])
    return counts


def closest_step(counts: list[float], target: float) -> int:
    """By brute force: of the first step at or below the target and the one before it, the closer
    (ties to the lower count)."""
    below = next(k for k, count in enumerate(counts) if count <= target)
    above = below - 1
    return above if counts[above] - target < target - counts[below] else below


@pytest.mark.parametrize("latent_tokens", [1024, 4096 + 17, 300])
def test_solve_ratio_finds_the_closest_step_in_a_handful_of_counts(latent_tokens):
    rng = random.Random(latent_tokens)
    for _ in range(20):
        counts = random_step_function(latent_tokens, rng)
        calls = []

        def tflops_at(ratio: float) -> float:
            calls.append(ratio)
            return counts[int(ratio * latent_tokens)]

        target = rng.uniform(counts[-1], counts[0])
        while target in counts:  # tie-free: the closer step is unique
            target = rng.uniform(counts[-1], counts[0])
        ratio = solve_ratio(tflops_at, target, latent_tokens, 0.05, "test")
        expected = closest_step(counts, target)
        assert int(ratio * latent_tokens) == expected
        assert ratio == round((expected + 0.5) / latent_tokens, 6)  # the middle of the step: safe from rounding
        assert len(calls) <= 2 * math.ceil(math.log2(latent_tokens)) + 2


def test_solve_ratio_clamps_within_tolerance_and_refuses_beyond():
    latent_tokens = 256
    counts = random_step_function(latent_tokens, random.Random(0))

    def tflops_at(ratio: float) -> float:
        return counts[int(ratio * latent_tokens)]

    assert solve_ratio(tflops_at, counts[-1] * 0.99, latent_tokens, 0.05, "x") == MAX_RATIO
    assert solve_ratio(tflops_at, counts[0] * 1.01, latent_tokens, 0.05, "x") == round(0.5 / latent_tokens, 6)
    with pytest.raises(ValueError, match=r"^x: the target of .* is below ToMe's reach"):
        solve_ratio(tflops_at, counts[-1] * 0.94, latent_tokens, 0.05, "x")
    with pytest.raises(ValueError, match=r"^x: the target of .* is above the unpatched model's"):
        solve_ratio(tflops_at, counts[0] * 1.06, latent_tokens, 0.05, "x")


def single_counter_flops(unet_config: dict, tome_kwargs: dict) -> int:
    """The patched pass under one FlopCounterMode: the matching counted apart must not be lost from it."""
    tomesd = pytest.importorskip("tomesd")
    unet = build_meta_unet(unet_config)
    inputs = example_inputs(unet_config, 1, TINY_SIZE, TINY_SIZE)
    tomesd.apply_patch(unet, use_rand=False, **tome_kwargs)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(inputs.pop("sample"), inputs.pop("timestep"), **inputs)
    return counter.get_total_flops()


def test_tome_merging_no_token_counts_the_unpatched_unet():
    config = tiny_unet_config()
    full_tflops = atedm.flops_per_step(config, None, TINY_SIZE, TINY_SIZE).full_tflops
    latent_tokens = (TINY_SIZE // 8) ** 2
    # Below one token's share: tomesd merges int(tokens * ratio) = 0 and skips its matching.
    idle = count_tome_flops(config, {"ratio": 0.5 / latent_tokens, "max_downsample": 2}, TINY_SIZE, TINY_SIZE)
    assert idle.unet / 1e12 == full_tflops and idle.matching == 0
    merging = count_tome_flops(config, {"ratio": 0.5, "max_downsample": 2}, TINY_SIZE, TINY_SIZE)
    assert merging.unet / 1e12 < full_tflops and merging.matching > 0
    assert merging.total == single_counter_flops(config, {"ratio": 0.5, "max_downsample": 2})


def test_tome_counts_depend_on_how_many_tokens_merge_not_on_the_ratio_within_a_step():
    config = tiny_unet_config()
    level_tokens = (TINY_SIZE // 16) ** 2  # the level max_downsample=2 patches
    kwargs = {"max_downsample": 2, "merge_crossattn": True, "merge_mlp": True}
    low, high = (count_tome_flops(config, {**kwargs, "ratio": ratio}, TINY_SIZE, TINY_SIZE)
                 for ratio in (10.1 / level_tokens, 10.9 / level_tokens))
    next_step = count_tome_flops(config, {**kwargs, "ratio": 11.1 / level_tokens}, TINY_SIZE, TINY_SIZE)
    assert low == high
    assert next_step.unet < low.unet

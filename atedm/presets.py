"""Named AT-EDM operating points, calibrated on the FLOPs counter to the paper's budgets.

The paper reports four budgets (average TFLOPs per UNet pass for one 1024 x 1024 image over 50 steps)
but not the settings behind them. Each preset here keeps the published method (prune once per block,
G-WPR over the head-averaged map, copy by attention, the four DSAP blocks unpruned for the first 10% of
steps) and solves for the prune ratio that lands on the budget with ``atedm.flops_per_step``;
``tests/test_flops.py`` checks every preset against its budget (within 3%).

| preset | budget (TFLOPs/step) | paper's FID / CLIP |
|--------|----------------------|--------------------|
| a      | 2.9                  | 52.00 / 0.2784     |
| b      | 3.6                  | 29.80 / 0.3095     |
| c      | 4.1 (the headline)   | 28.04 / 0.3209     |
| d      | 4.5                  | 27.23 / 0.3245     |
| dagger | 4.5, no level-2 pruning | (the paper's AT-EDM-dagger) |

Beyond the paper (``BEYOND_PAPER_PRESETS``), named apart so that a to d and dagger stay the published method.
Each keeps its paper preset's ratio, levels and G-WPR ranking (so its UNet FLOPs and, as measured, its speed)
and changes only the refill: a pruned token keeps its own state from the cut and adds the change of its
most key-similar kept token (``recovery="delta"``, ``similarity="key_cosine"``), instead of taking the
output of its most-attended kept token. On both trained fidelity models they stay closer to the unpruned
samples than the published presets at the same measured speed on SDXL-base (benchmarks/RESULTS.md, "The
quality-speed frontier"; PSNR to the unpruned samples):

| preset | speed-up (SDXL-base, CPU) | digits model | scenes model |
|--------|---------------------------|--------------|--------------|
| c_delta | 1.35x (c: 1.35x) | 27.6 dB (c: 15.6) | 19.1 dB (c: 16.2) |
| dagger_delta | 1.31x (dagger: 1.33x) | 28.2 dB (dagger: 18.2) | 34.7 dB (dagger: 24.1) |

Evidence from small models only: SDXL's own weights need the COCO FID/CLIP harness.
"""

from __future__ import annotations

from .config import ATEDMConfig

PRESET_BUDGETS_TFLOPS = {"a": 2.9, "b": 3.6, "c": 4.1, "d": 4.5, "dagger": 4.5, "c_delta": 4.1, "dagger_delta": 4.5}

PAPER_PRESETS: dict[str, ATEDMConfig] = {
    # Ratios from ``python -m benchmarks.calibrate_presets`` on the SDXL-base config (1024 px, 50 steps).
    "a": ATEDMConfig(prune_ratio=0.974),
    "b": ATEDMConfig(prune_ratio=0.778),
    "c": ATEDMConfig(prune_ratio=0.645),
    "d": ATEDMConfig(prune_ratio=0.542),
    "dagger": ATEDMConfig(prune_ratio=0.637, prune_levels=(3,)),
}
BEYOND_PAPER_PRESETS: dict[str, ATEDMConfig] = {
    "c_delta": PAPER_PRESETS["c"].replace(recovery="delta", similarity="key_cosine"),
    "dagger_delta": PAPER_PRESETS["dagger"].replace(recovery="delta", similarity="key_cosine"),
}
# Every named preset: what get_preset, atedm.apply(pipe, "<name>") and the CLI's --preset accept.
PRESETS: dict[str, ATEDMConfig] = {**PAPER_PRESETS, **BEYOND_PAPER_PRESETS}


def get_preset(name: str) -> ATEDMConfig:
    """The config of a named preset; an unknown name raises a KeyError listing the known ones."""
    if name not in PRESETS:
        raise KeyError(f"unknown AT-EDM preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]


def resolve_config(config: ATEDMConfig | str | None = None, **overrides) -> ATEDMConfig:
    """An ``ATEDMConfig`` from a config, a preset name or None (defaults), with field overrides."""
    if config is None:
        config = ATEDMConfig()
    elif isinstance(config, str):
        config = get_preset(config)
    elif not isinstance(config, ATEDMConfig):
        raise TypeError(f"config must be an ATEDMConfig, a preset name or None; got {type(config).__name__}")
    return config.replace(**overrides) if overrides else config

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
"""

from __future__ import annotations

from .config import ATEDMConfig

PRESET_BUDGETS_TFLOPS = {"a": 2.9, "b": 3.6, "c": 4.1, "d": 4.5, "dagger": 4.5}

PRESETS: dict[str, ATEDMConfig] = {
    # Ratios from ``python -m benchmarks.calibrate_presets`` on the SDXL-base config (1024 px, 50 steps).
    "a": ATEDMConfig(prune_ratio=0.974),
    "b": ATEDMConfig(prune_ratio=0.778),
    "c": ATEDMConfig(prune_ratio=0.645),
    "d": ATEDMConfig(prune_ratio=0.542),
    "dagger": ATEDMConfig(prune_ratio=0.637, prune_levels=(3,)),
}


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

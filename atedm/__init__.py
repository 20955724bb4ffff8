"""atedm: AT-EDM token pruning for Stable Diffusion XL in diffusers, with fused Triton kernels.

    import atedm
    atedm.apply(pipe, "c")        # or atedm.apply(pipe.unet, atedm.ATEDMConfig(prune_ratio=0.5))
    image = pipe(prompt).images[0]
    atedm.remove(pipe)
"""

from .config import ATEDMConfig
from .flops import FlopsReport, flops_per_step
from .patch import apply, get_state, remove, set_phase, set_timesteps
from .presets import BEYOND_PAPER_PRESETS, PAPER_PRESETS, PRESETS, get_preset

__all__ = [
    "ATEDMConfig",
    "BEYOND_PAPER_PRESETS",
    "FlopsReport",
    "PAPER_PRESETS",
    "PRESETS",
    "apply",
    "flops_per_step",
    "get_preset",
    "get_state",
    "remove",
    "set_phase",
    "set_timesteps",
]

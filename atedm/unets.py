"""The UNets that the command line, the doctor, the benchmarks and the tests build, and their dtype.

``default_unet_config`` is SDXL-base's UNet config, shipped with the package (no download);
``unet_config(layout)`` returns any of the SDXL family's shipped configs by name (``UNET_LAYOUTS``), and
``load_unet_config`` takes either such a name or a path to a diffusers ``config.json``. Each shipped file
says where its fields come from in a ``_source`` key, which diffusers skips when it builds the UNet, as
it does every ``_`` key.

``tiny_unet_config`` keeps SDXL-base's block types, names and level structure (three levels, attention
at levels 2 and 3, the four DSAP blocks, linear projections, text-time conditioning) with few channels:
depth 2 at level 2 and 3 at level 3, so that both levels prune after their first layer. It serves the
``--tiny`` dry runs and the tests, which build it with random weights in well under a second.
"""

from __future__ import annotations

import inspect
import json
from importlib import resources
from pathlib import Path

import torch

TINY_CROSS_DIM = 32
TINY_TEXT_EMBED_DIM = 32
TINY_TIME_EMBED_DIM = 8


# Layout name -> the UNet config.json shipped under atedm/data/ (no download).
UNET_LAYOUTS = {
    "sdxl-base": "sdxl_base_unet_config.json",
    "sdxl-refiner": "sdxl_refiner_unet_config.json",
    "sdxl-inpainting": "sdxl_inpainting_unet_config.json",
    "ssd-1b": "ssd_1b_unet_config.json",
    "segmind-vega": "segmind_vega_unet_config.json",
    "playground-v2.5": "playground_v2_5_unet_config.json",
}


def unet_config(layout: str) -> dict:
    """The shipped UNet config of an SDXL-family layout (a key of ``UNET_LAYOUTS``, any case)."""
    filename = UNET_LAYOUTS.get(layout.lower())
    if filename is None:
        raise ValueError(f"unknown UNet layout {layout!r}; known layouts: {', '.join(UNET_LAYOUTS)}")
    return json.loads(resources.files("atedm").joinpath("data", filename).read_text())


def load_unet_config(path_or_layout: str) -> dict:
    """A UNet config from a diffusers config.json path or, when no such file exists, a layout name."""
    path = Path(path_or_layout)
    if path.is_file():
        return json.loads(path.read_text())
    if path_or_layout.lower() in UNET_LAYOUTS:
        return unet_config(path_or_layout)
    raise ValueError(
        f"{path_or_layout!r} is neither a UNet config file nor a known layout; "
        f"known layouts: {', '.join(UNET_LAYOUTS)}"
    )


def same_architecture(config: dict, other: dict) -> bool:
    """True when two UNet configs build the same network: equal in every constructor argument, a missing
    one counting as its default (config files written by different diffusers versions list different
    fields)."""
    from diffusers import UNet2DConditionModel

    parameters = inspect.signature(UNet2DConditionModel.__init__).parameters
    defaults = {name: p.default for name, p in parameters.items() if name != "self"}

    def arguments(unet_config: dict) -> dict:  # sample_size is only the default generation size
        return {name: unet_config.get(name, default) for name, default in defaults.items() if name != "sample_size"}

    return arguments(config) == arguments(other)


def default_unet_config() -> dict:
    """The real SDXL-base UNet config, shipped with the package (no download)."""
    return unet_config("sdxl-base")


def tiny_unet_config(**changes) -> dict:
    """SDXL-base's UNet config with few channels (module docstring); ``changes`` override its fields."""
    config = default_unet_config()
    config.update(
        block_out_channels=[32, 64, 64],
        attention_head_dim=[1, 2, 4],
        transformer_layers_per_block=[1, 2, 3],
        cross_attention_dim=TINY_CROSS_DIM,
        addition_time_embed_dim=TINY_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TINY_TEXT_EMBED_DIM + 6 * TINY_TIME_EMBED_DIM,
        sample_size=16,
    )
    config.update(changes)
    return config


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matmul (AVX512-BF16 or AMX), where bf16 beats fp32 ~3x."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def step_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The dtype a timed UNet step runs in: ``name``, or for "auto" fp16 on CUDA, bf16 on a CPU that
    computes it natively, else fp32."""
    if name != "auto":
        return getattr(torch, name)
    if torch.device(device).type == "cuda":
        return torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def build_random_unet(unet_config: dict, dtype: torch.dtype, device: str, seed: int = 0):
    """The UNet architecture with seeded random weights (diffusers' default init) in ``dtype``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build straight in bf16: half the peak memory of an fp32 build
    try:
        unet = UNet2DConditionModel.from_config(unet_config)
    finally:
        torch.set_default_dtype(previous)
    return unet.to(device=device, dtype=dtype).eval()

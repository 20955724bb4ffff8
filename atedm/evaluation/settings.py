"""What one evaluation run is: ``EvalSettings`` (validated) and the configs it compares (``MethodConfig``).

Config names on the command line and in the results:

* ``full``: the unpatched pipeline;
* an AT-EDM preset name (``a``, ``b``, ``c``, ``d``, ``dagger``; see ``atedm.presets``);
* ``tomesd:<ratio>``: ToMe (the ``tomesd`` package) merging ``ratio`` of the tokens with
  ``max_downsample=2``, i.e. in the attention blocks at latent strides 1 and 2 (SDXL: the 4096-token
  level at 1024 px), the baseline of the paper's comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..presets import PRESETS, get_preset

DTYPES = ("auto", "float32", "float16", "bfloat16")
STAGES = ("all", "generate", "metrics")
TOME_MAX_DOWNSAMPLE = 2


@dataclass(frozen=True)
class MethodConfig:
    """One compared configuration; ``name`` is canonical (``tomesd:0.50`` becomes ``tomesd:0.5``)."""

    name: str
    kind: str  # "full" | "atedm" | "tomesd"
    tome_ratio: float | None = None

    @property
    def dirname(self) -> str:
        """The folder name under the output folder (no ':' in paths: it breaks some tools and filesystems)."""
        return self.name.replace(":", "-")

    @property
    def family(self) -> str:
        return {"full": "SDXL", "atedm": "AT-EDM", "tomesd": "ToMe"}[self.kind]

    def apply(self, pipe, backend: str = "auto") -> None:
        if self.kind == "atedm":
            from ..patch import apply

            apply(pipe, get_preset(self.name), backend=backend)
        elif self.kind == "tomesd":
            tomesd = import_tomesd()
            tomesd.apply_patch(pipe, ratio=self.tome_ratio, max_downsample=TOME_MAX_DOWNSAMPLE)

    def remove(self, pipe) -> None:
        if self.kind == "atedm":
            from ..patch import remove

            remove(pipe)
        elif self.kind == "tomesd":
            import_tomesd().remove_patch(pipe)

    def before_generation(self, pipe, seed: int) -> None:
        """Seed what the config draws at random itself, so an image depends on its seed alone.

        tomesd picks its merge destinations with a generator that it forks from the global RNG once and
        then advances over every later call: without this an image would depend on what ran before it.
        """
        if self.kind != "tomesd":
            return
        info = getattr(pipe.unet, "_tome_info", None)
        if not isinstance(info, dict) or "args" not in info or "generator" not in info["args"]:
            raise RuntimeError("this tomesd version keeps its state elsewhere than unet._tome_info['args']; "
                               "the harness cannot seed its random merges (tested with tomesd 0.1.3)")
        info["args"]["generator"] = torch.Generator(device=pipe.unet.device).manual_seed(seed)


def import_tomesd():
    try:
        import tomesd
    except ImportError as error:
        raise ImportError("tomesd:<ratio> configs need the tomesd package: pip install tomesd") from error
    return tomesd


def parse_config(text: str) -> MethodConfig:
    """A ``MethodConfig`` from its command-line name; unknown names raise a ValueError listing the known ones."""
    name = text.strip()
    if name == "full":
        return MethodConfig("full", "full")
    if name in PRESETS:
        return MethodConfig(name, "atedm")
    if name.startswith("tomesd:"):
        value = name.split(":", 1)[1]
        try:
            ratio = float(value)
        except ValueError:
            raise ValueError(f"config {text!r}: the ToMe ratio {value!r} is not a number (e.g. tomesd:0.5)") from None
        # tomesd merges into one destination per 2x2 window, so at most 3/4 of the tokens can go.
        if not 0.0 < ratio <= 0.75:
            raise ValueError(f"config {text!r}: the ToMe ratio must be in (0, 0.75]; got {ratio}")
        return MethodConfig(f"tomesd:{ratio:g}", "tomesd", ratio)
    raise ValueError(f"unknown config {text!r}; known: 'full', the AT-EDM presets {sorted(PRESETS)}, 'tomesd:<ratio>'")


def cfg_dirname(scale: float) -> str:
    return f"cfg{scale:g}"


@dataclass(frozen=True)
class EvalSettings:
    """Everything that defines an evaluation run. Validated on construction.

    Attributes:
        model: the SDXL pipeline, a local folder or a hub id (loaded with AutoPipelineForText2Image).
        captions: COCO captions JSON (``captions_val2017.json``).
        out: output folder: ``<out>/<config>/cfg<scale>/<image_id>.png`` and the results.
        reference: folder of reference images for FID (COCO val2017); needed by the metrics stage only.
        configs: config names (see the module docstring).
        cfg_scales: classifier-free guidance scales, each >= 1 (1 = no guidance).
        num_images: how many captions (images) to evaluate: the first ``num_images`` image ids.
        seed: base seed; image i is generated from ``image_seed(seed, image_id)``.
        steps, height, width: sampling steps and image size.
        batch_size: prompts per pipeline call.
        device: torch device; under torchrun ``cuda`` becomes ``cuda:<LOCAL_RANK>``.
        dtype: ``auto`` = float16 on CUDA, float32 elsewhere.
        backend: AT-EDM backend (``auto``, ``torch``, ``triton``).
        fid_mode: clean-fid's mode for the default FID features (``clean`` is clean-fid's default).
        clip_model, clip_pretrained: the open_clip model of the default CLIP score.
        metrics_batch_size: images per feature-extractor call.
        wait_timeout_s: how long rank 0 waits for the other ranks' images before computing metrics.
    """

    model: str
    captions: Path
    out: Path
    reference: Path | None = None
    configs: tuple[str, ...] = ("full", "a", "b", "c", "d", "dagger")
    cfg_scales: tuple[float, ...] = (7.0,)
    num_images: int = 5000
    seed: int = 0
    steps: int = 50
    height: int = 1024
    width: int = 1024
    batch_size: int = 1
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    dtype: str = "auto"
    backend: str = "auto"
    fid_mode: str = "clean"
    clip_model: str = "ViT-g-14"
    clip_pretrained: str = "laion2b_s34b_b88k"
    metrics_batch_size: int = 32
    wait_timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "captions", Path(self.captions))
        object.__setattr__(self, "out", Path(self.out))
        if self.reference is not None:
            object.__setattr__(self, "reference", Path(self.reference))
        configs = [parse_config(name) for name in self.configs]
        names = [config.name for config in configs]
        if not names:
            raise ValueError("configs is empty; give at least one (e.g. full)")
        if len(set(names)) != len(names):
            raise ValueError(f"configs name the same config twice: {names}")
        object.__setattr__(self, "configs", tuple(names))
        scales = []
        for scale in self.cfg_scales:
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 1:
                # diffusers turns guidance off for every scale <= 1, so 0.5 would silently mean 1.
                raise ValueError(f"CFG scales must be finite numbers >= 1 (1 = no guidance); got {scale!r}")
            scales.append(float(scale))
        if not scales:
            raise ValueError("cfg_scales is empty; give at least one (e.g. 7)")
        if len({cfg_dirname(s) for s in scales}) != len(scales):
            raise ValueError(f"cfg_scales repeat a scale: {scales}")
        object.__setattr__(self, "cfg_scales", tuple(scales))
        for name in ("num_images", "steps", "batch_size", "metrics_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8:
                raise ValueError(f"{name} must be a positive multiple of 8 (the VAE factor); got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0; got {self.seed!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {DTYPES}")
        if self.fid_mode not in ("clean", "legacy_tensorflow", "legacy_pytorch"):
            raise ValueError(f"unknown clean-fid mode {self.fid_mode!r}; expected clean, legacy_tensorflow or legacy_pytorch")

    @property
    def method_configs(self) -> tuple[MethodConfig, ...]:
        return tuple(parse_config(name) for name in self.configs)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float16 if str(self.device).startswith("cuda") else torch.float32
        return getattr(torch, self.dtype)

    def image_folder(self, config: MethodConfig, scale: float) -> Path:
        return self.out / config.dirname / cfg_dirname(scale)

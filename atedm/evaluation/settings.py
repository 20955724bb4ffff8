"""What one evaluation run is: ``EvalSettings`` (validated) and the configs it compares (``MethodConfig``).

Config names on the command line and in the results:

* ``full``: the unpatched pipeline;
* an AT-EDM preset name (``a``, ``b``, ``c``, ``d``, ``dagger``; see ``atedm.presets``);
* ``tomesd:<ratio>``: ToMe (the ``tomesd`` package) merging ``ratio`` of the tokens with
  ``max_downsample=2``, self-attention only (tomesd's defaults otherwise), i.e. in the attention blocks at
  latent strides 1 and 2 (SDXL: the 4096-token level at 1024 px). On SDXL this saves at most ~7% of the
  UNet FLOPs (ratio 0.75): it cannot reach the presets' budgets.
* ``tomesd@<preset>`` / ``tomesd@<TFLOPs>``: ToMe at matched FLOPs, the paper's comparison: ToMe merging
  in every transformer block (``max_downsample=4``: both SDXL attention levels; self-attention,
  cross-attention and MLP merged), with the ratio solved on the FLOPs counter so that its UNet TFLOPs per
  step equal the preset's (counted at the run's model, size and steps), or the given TFLOPs per step.
  The ratio is solved when a run starts (``tflops.resolve_configs``) and recorded in the results and in
  each image's PNG text.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..presets import PRESETS, get_preset
from ..tome import MAX_RATIO, import_tomesd

DTYPES = ("auto", "float32", "float16", "bfloat16")
STAGES = ("all", "generate", "metrics")
FID_BACKENDS = ("clean-fid", "torch-fidelity")
FID_MODES = ("clean", "legacy_tensorflow", "legacy_pytorch")
TOME_MAX_DOWNSAMPLE = 2  # tomesd:<ratio>
# tomesd@<target>: merge in every transformer block, the only ToMe setting that reaches AT-EDM's budgets.
TOME_MATCHED = {"max_downsample": 4, "merge_crossattn": True, "merge_mlp": True}
FACTORY_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")  # module.path:callable


@dataclass(frozen=True)
class MethodConfig:
    """One compared configuration; ``name`` is canonical (``tomesd:0.50`` becomes ``tomesd:0.5``)."""

    name: str
    kind: str  # "full" | "atedm" | "tomesd"
    tome_ratio: float | None = None  # None until solved for a matched config (``tflops.resolve_configs``)
    tome_max_downsample: int = TOME_MAX_DOWNSAMPLE
    tome_merge_crossattn: bool = False
    tome_merge_mlp: bool = False
    tome_match: str | None = None  # tomesd@<target>: a preset name or TFLOPs per step, as text

    @property
    def dirname(self) -> str:
        """The folder name under the output folder (no ':' or '@' in paths: they break some tools)."""
        return self.name.replace(":", "-").replace("@", "-at-")

    @property
    def family(self) -> str:
        if self.kind == "tomesd" and self.tome_match is not None:
            return "ToMe (matched FLOPs)"
        return {"full": "SDXL", "atedm": "AT-EDM", "tomesd": "ToMe"}[self.kind]

    def tome_kwargs(self) -> dict:
        """``tomesd.apply_patch`` arguments (besides the model and ``use_rand``)."""
        if self.tome_ratio is None:
            raise RuntimeError(f"config {self.name}: the ToMe ratio is not solved yet; "
                               "resolve the configs first (atedm.evaluation.tflops.resolve_configs)")
        return {"ratio": self.tome_ratio, "max_downsample": self.tome_max_downsample,
                "merge_crossattn": self.tome_merge_crossattn, "merge_mlp": self.tome_merge_mlp}

    def apply(self, pipe, backend: str = "auto") -> None:
        if self.kind == "atedm":
            from ..patch import apply

            apply(pipe, get_preset(self.name), backend=backend)
        elif self.kind == "tomesd":
            kwargs = self.tome_kwargs()
            import_tomesd().apply_patch(pipe, **kwargs)

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
        if not 0.0 < ratio <= MAX_RATIO:
            raise ValueError(f"config {text!r}: the ToMe ratio must be in (0, {MAX_RATIO}]; got {ratio}")
        return MethodConfig(f"tomesd:{ratio:g}", "tomesd", ratio)
    if name.startswith("tomesd@"):
        target = name.split("@", 1)[1].strip()
        if target not in PRESETS:
            try:
                tflops = float(target)
            except ValueError:
                raise ValueError(f"config {text!r}: match an AT-EDM preset {sorted(PRESETS)} or a TFLOPs-per-step number "
                                 f"(e.g. tomesd@c or tomesd@4.1); got {target!r}") from None
            if not (math.isfinite(tflops) and tflops > 0):
                raise ValueError(f"config {text!r}: the TFLOPs to match must be a positive number; got {target!r}")
            target = f"{tflops:g}"
        return MethodConfig(f"tomesd@{target}", "tomesd", None, tome_match=target, **{
            f"tome_{key}": value for key, value in TOME_MATCHED.items()})
    raise ValueError(f"unknown config {text!r}; known: 'full', the AT-EDM presets {sorted(PRESETS)}, "
                     "'tomesd:<ratio>', 'tomesd@<preset or TFLOPs>'")


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
        fid_backend: the library of the default FID features: ``clean-fid`` (its InceptionV3 torchscript
            port and resize) or ``torch-fidelity`` (the InceptionV3 that torchmetrics' FID also uses).
        fid_mode: clean-fid's mode for the default FID features (``clean`` is clean-fid's default).
        fid_weights: a local copy of the backend's Inception weights (no download): clean-fid's
            ``inception-2015-12-05.pt`` or torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``.
        clip_model, clip_pretrained: the open_clip model of the default CLIP score; ``clip_pretrained`` is an
            open_clip tag or a local checkpoint file (no download).
        feature_extractor_factory, clip_scorer_factory: your own metric models, as ``module:callable``
            (e.g. ``mylab.metrics:DinoFeatures``): imported by the process that computes the metrics and
            called with its torch device, like the built-in classes; the result follows the
            ``FeatureExtractor`` / ``ClipScorer`` protocol and replaces the default model (and its options).
            The command line's way to the models that ``run_evaluation`` takes as objects.
        metrics_batch_size: images per feature-extractor call.
        wait_timeout_s: how long rank 0 waits for the other ranks' images before computing metrics.
        download_timeout_s: socket timeout of the metric weights' downloads: offline, they fail instead of hanging.
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
    fid_backend: str = "clean-fid"
    fid_mode: str = "clean"
    fid_weights: Path | None = None
    clip_model: str = "ViT-g-14"
    clip_pretrained: str = "laion2b_s34b_b88k"
    feature_extractor_factory: str | None = None
    clip_scorer_factory: str | None = None
    metrics_batch_size: int = 32
    wait_timeout_s: float = 3600.0
    download_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "captions", Path(self.captions))
        object.__setattr__(self, "out", Path(self.out))
        if self.reference is not None:
            object.__setattr__(self, "reference", Path(self.reference))
        if self.fid_weights is not None:
            object.__setattr__(self, "fid_weights", Path(self.fid_weights))
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
        if self.fid_backend not in FID_BACKENDS:
            raise ValueError(f"unknown FID backend {self.fid_backend!r}; expected one of {FID_BACKENDS}")
        if self.fid_mode not in FID_MODES:
            raise ValueError(f"unknown clean-fid mode {self.fid_mode!r}; expected clean, legacy_tensorflow or legacy_pytorch")
        if self.fid_backend != "clean-fid" and self.fid_mode != "clean":
            raise ValueError(f"fid_mode {self.fid_mode!r} is a clean-fid mode; the {self.fid_backend} backend has none")
        for name in ("feature_extractor_factory", "clip_scorer_factory"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and FACTORY_SPEC.fullmatch(value)):
                raise ValueError(f"{name} must be 'module:callable' (e.g. mylab.metrics:DinoFeatures); got {value!r}")
        for name in ("wait_timeout_s", "download_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0; got {value!r}")

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

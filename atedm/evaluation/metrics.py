"""The metrics stage: FID against the reference images, CLIP score, and counted TFLOPs per config.

FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)), the Frechet distance between Gaussians fitted
(mean, unbiased covariance) to the features of two image sets. Features come from a ``FeatureExtractor``;
the default is clean-fid's InceptionV3 (pool3, 2048-d) in its default ``clean`` mode (PIL bicubic resize
to 299 x 299 in float, as ``cleanfid.fid.compute_fid`` does). The distance itself is computed here
(``frechet_distance``), the same formula clean-fid uses.

CLIP score = the mean over images of the cosine similarity between the image embedding and its caption's
embedding, as a fraction (not x 100, not clipped at 0): the convention of the paper's table (0.3284 for
SDXL). The default ``ClipScorer`` is open_clip's ViT-g-14 ``laion2b_s34b_b88k``.

clean-fid and open_clip pull torchvision; they are imported only when the default extractors are built.
"""

from __future__ import annotations

import functools
import json
import sys
import warnings
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import scipy.linalg
import torch
from PIL import Image

from .generate import check_manifest, image_path, load_prompts, missing_images, rank_device, rank_from_env
from .prompts import Prompt
from .settings import TOME_MAX_DOWNSAMPLE, EvalSettings, MethodConfig, import_tomesd

IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".png", ".ppm", ".tif", ".tiff", ".webp"}

# The paper's table (COCO-2017 val, 1024 px), for side-by-side columns: {(config, CFG scale): (FID, CLIP)}.
PAPER_RESULTS = {
    ("full", 7.0): (31.94, 0.3284),
    ("full", 4.0): (27.30, 0.3226),
    ("a", 7.0): (52.00, 0.2784),
    ("b", 7.0): (29.80, 0.3095),
    ("c", 7.0): (28.04, 0.3209),
    ("d", 7.0): (27.23, 0.3245),
}


class FeatureExtractor(Protocol):
    """Images -> one feature row per image, shape (len(images), d). ``name`` says what it is, in the results."""

    name: str

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray: ...


class ClipScorer(Protocol):
    """(images, their captions) -> one image-text cosine similarity per pair, shape (len(images),)."""

    name: str

    def __call__(self, images: Sequence[Image.Image], captions: Sequence[str]) -> np.ndarray: ...


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of feature rows (as clean-fid and pytorch-fid fit them)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 feature rows of shape (n, d); got shape {features.shape}")
    return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) for two Gaussians N(mu1, S1), N(mu2, S2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64)), np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched Gaussians: means {mu1.shape}, {mu2.shape}; covariances {sigma1.shape}, {sigma2.shape}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if caught or not np.isfinite(covmean).all():
        # A singular product (fewer images than feature dimensions) has no reliable square root; a
        # small ridge on both covariances makes it well defined and moves FID by O(eps * d).
        ridge = eps * np.eye(sigma1.shape[0])
        covmean = scipy.linalg.sqrtm((sigma1 + ridge) @ (sigma2 + ridge))
    if np.iscomplexobj(covmean):
        # Round-off gives a small imaginary part; a large one means the inputs were not covariances.
        if np.abs(np.diagonal(covmean).imag).max() > 1e-3 * max(1.0, np.abs(np.trace(covmean.real))):
            raise ValueError(f"sqrtm(S1 S2) has a large imaginary part ({np.abs(covmean.imag).max():.3g}); are both inputs covariances?")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


class CleanFIDInception:
    """clean-fid's InceptionV3 features (the torchscript port of TF-Inception, pool3), clean-fid's resize."""

    def __init__(self, device: str, mode: str = "clean"):
        try:
            from cleanfid.features import build_feature_extractor
            from cleanfid.resize import build_resizer
        except ImportError as error:
            raise ImportError("the default FID features need clean-fid: pip install 'atedm[eval]' "
                              "(or pass your own feature_extractor)") from error
        self.name = f"clean-fid InceptionV3 pool3 (2048-d), mode {mode!r}"
        self.device = torch.device(device)
        self.model = build_feature_extractor(mode, self.device)
        self.resize = build_resizer(mode)

    def __call__(self, images):
        # Exactly clean-fid's ResizeDataset: uint8 RGB array -> resizer -> CHW float in [0, 255].
        batch = np.stack([np.asarray(self.resize(np.asarray(image.convert("RGB")))).transpose(2, 0, 1) for image in images])
        with torch.no_grad():
            features = self.model(torch.from_numpy(batch.astype(np.float32)).to(self.device))
        return features.double().cpu().numpy()


class OpenCLIPScore:
    """Cosine similarity of open_clip image and text embeddings (ViT-g-14 laion2b_s34b_b88k by default)."""

    def __init__(self, device: str, model: str = "ViT-g-14", pretrained: str = "laion2b_s34b_b88k"):
        try:
            import open_clip
        except ImportError as error:
            raise ImportError("the default CLIP score needs open_clip: pip install 'atedm[eval]' "
                              "(or pass your own clip_scorer)") from error
        self.name = f"open_clip {model} {pretrained}, cosine similarity"
        self.device = torch.device(device)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=self.device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model)

    def __call__(self, images, captions):
        pixels = torch.stack([self.preprocess(image.convert("RGB")) for image in images]).to(self.device)
        tokens = self.tokenizer(list(captions)).to(self.device)
        with torch.no_grad():
            image_embeds = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
            text_embeds = torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return (image_embeds * text_embeds).sum(dim=-1).double().cpu().numpy()


def reference_images(folder: Path | None) -> list[Path]:
    """The image files under the reference folder (recursively, as clean-fid lists a folder), sorted."""
    if folder is None:
        raise ValueError("the metrics stage needs reference images: give --reference (e.g. COCO's val2017 folder)")
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"reference folder {folder} does not exist")
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if len(files) < 2:
        raise ValueError(f"reference folder {folder} holds {len(files)} image(s); FID needs at least 2")
    return files


def check_default_metric_libraries(feature_extractor, clip_scorer) -> None:
    """Fail before hours of generation, not after, when a default metric library is missing."""
    import importlib.util

    for needed, module, package in ((feature_extractor is None, "cleanfid", "clean-fid"),
                                    (clip_scorer is None, "open_clip", "open_clip_torch")):
        if needed and importlib.util.find_spec(module) is None:
            raise ImportError(f"the default metrics need {package}: pip install 'atedm[eval]' (or inject your own extractor)")


def _load(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")  # convert loads the pixels and keeps the PNG text chunks


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def extract_features(files: list[Path], extractor: FeatureExtractor, batch_size: int) -> np.ndarray:
    rows = [np.asarray(extractor([_load(path) for path in chunk]), dtype=np.float64) for chunk in _batches(files, batch_size)]
    features = np.concatenate(rows)
    if features.ndim != 2 or features.shape[0] != len(files):
        raise ValueError(f"the feature extractor returned shape {features.shape} for {len(files)} images; expected (n, d)")
    return features


def score_image_set(paths: list[Path], prompts: list[Prompt], extractor: FeatureExtractor, scorer: ClipScorer,
                    batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Features and CLIP scores of one generated set, reading each image once."""
    features, scores = [], []
    for chunk in _batches(list(zip(paths, prompts)), batch_size):
        images = [_load(path) for path, _ in chunk]
        features.append(np.asarray(extractor(images), dtype=np.float64))
        chunk_scores = np.asarray(scorer(images, [prompt.caption for _, prompt in chunk]), dtype=np.float64).reshape(-1)
        if chunk_scores.shape[0] != len(chunk):
            raise ValueError(f"the CLIP scorer returned {chunk_scores.shape[0]} scores for {len(chunk)} images")
        scores.append(chunk_scores)
    return np.concatenate(features), np.concatenate(scores)


def _model_configs(model: str) -> tuple[dict, int]:
    """The UNet config and the VAE factor of a pipeline, read without loading any weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet_config = UNet2DConditionModel.load_config(model, subfolder="unet")
    try:
        vae_channels = AutoencoderKL.load_config(model, subfolder="vae")["block_out_channels"]
        vae_factor = 2 ** (len(vae_channels) - 1)
    except (OSError, KeyError):
        vae_factor = 8  # SDXL's
    return dict(unet_config), vae_factor


@functools.lru_cache(maxsize=64)
def _counted_tflops(unet_config_json: str, config: MethodConfig, height: int, width: int, steps: int) -> dict:
    """TFLOPs/step of one image for a config, counted on the meta device (cached: counting takes seconds)."""
    from ..flops import build_meta_unet, example_inputs, flops_per_step

    unet_config = json.loads(unet_config_json)
    if config.kind in ("full", "atedm"):
        report = flops_per_step(unet_config, None if config.kind == "full" else config.name, height, width, steps)
        return {"tflops_per_step": report.unet_tflops, "overhead_tflops": report.overhead_tflops if config.kind == "atedm" else None,
                "flops_counted": True}
    tomesd = import_tomesd()
    unet = build_meta_unet(unet_config)
    inputs = example_inputs(unet_config, 1, height, width)
    sample = inputs.pop("sample")
    # use_rand off: it moves which tokens merge, not how many. tomesd's size hook reads the sample
    # from the positional arguments, so it is passed positionally.
    tomesd.apply_patch(unet, ratio=config.tome_ratio, max_downsample=TOME_MAX_DOWNSAMPLE, use_rand=False)
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unet(sample, inputs.pop("timestep"), **inputs)
        flops = counter.get_total_flops()
    except Exception as error:  # a tomesd/diffusers mismatch on meta tensors must not lose the metrics
        print(f"warning: could not count ToMe FLOPs ({error!r}); reporting the full model's", file=sys.stderr)
        full = _counted_tflops(unet_config_json, MethodConfig("full", "full"), height, width, steps)
        return {**full, "flops_counted": False}
    finally:
        tomesd.remove_patch(unet)
    return {"tflops_per_step": flops / 1e12, "overhead_tflops": None, "flops_counted": True}


def count_tflops(settings: EvalSettings) -> dict[str, dict]:
    """Per config: UNet TFLOPs/step of one image at the run's size (and AT-EDM's own work apart)."""
    unet_config, vae_factor = _model_configs(settings.model)
    # flops_per_step takes the image size and assumes SDXL's VAE factor 8; scale so the latent is right.
    height, width = settings.height * 8 // vae_factor, settings.width * 8 // vae_factor
    key = json.dumps(unet_config, sort_keys=True, default=str)
    return {config.name: _counted_tflops(key, config, height, width, settings.steps) for config in settings.method_configs}


def compute_metrics(settings: EvalSettings, feature_extractor: FeatureExtractor | None = None,
                    clip_scorer: ClipScorer | None = None) -> dict:
    """FID, CLIP score and TFLOPs for every (config, CFG scale) of the run; writes the results and plots.

    Every image of the run must exist. Returns the results dictionary written to ``metrics.json``.
    """
    from .report import write_results

    prompts, digest = load_prompts(settings)
    check_manifest(settings, digest, required=True)
    if missing := missing_images(settings, prompts):
        raise FileNotFoundError(f"images are missing (per set: {missing}); finish the generation stage first")
    if len(prompts) < 2:
        raise ValueError("FID needs at least 2 images per set; raise --num-images")
    references = reference_images(settings.reference)
    device = rank_device(settings.device, rank_from_env())
    extractor = feature_extractor if feature_extractor is not None else CleanFIDInception(device, settings.fid_mode)
    scorer = clip_scorer if clip_scorer is not None else OpenCLIPScore(device, settings.clip_model, settings.clip_pretrained)

    reference_stats = gaussian_stats(extract_features(references, extractor, settings.metrics_batch_size))
    flops = count_tflops(settings)
    rows = []
    for config in settings.method_configs:
        for scale in settings.cfg_scales:
            paths = [image_path(settings, config, scale, prompt) for prompt in prompts]
            features, scores = score_image_set(paths, prompts, extractor, scorer, settings.metrics_batch_size)
            paper_fid, paper_clip = PAPER_RESULTS.get((config.name, scale), (None, None))
            rows.append({
                "config": config.name,
                "family": config.family,
                "cfg_scale": scale,
                "num_images": len(prompts),
                "fid": frechet_distance(*gaussian_stats(features), *reference_stats),
                "clip_score": float(scores.mean()),
                **flops[config.name],
                "paper_fid": paper_fid,
                "paper_clip": paper_clip,
            })
    results = {
        "settings": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(settings).items()},
        "num_reference_images": len(references),
        "fid_features": getattr(extractor, "name", type(extractor).__name__),
        "clip_score": getattr(scorer, "name", type(scorer).__name__) + " (mean over images, a fraction as in the paper's table)",
        "tflops": "UNet FLOPs per image per step at the run's size, counted on the meta device (2 x multiply-adds); "
                  "AT-EDM's own scoring work in overhead_tflops; ToMe rows include ToMe's similarity matmuls",
        "versions": _versions(),
        "results": rows,
    }
    write_results(settings.out, results)
    return results


def _versions() -> dict:
    import diffusers

    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__}
    if torch.cuda.is_available():
        versions["gpu"] = torch.cuda.get_device_name()
    return versions

"""The metrics stage: FID against the reference images, CLIP score, and counted TFLOPs per config.

FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)), the Frechet distance between Gaussians fitted
(mean, unbiased covariance) to the features of two image sets. Features come from a ``FeatureExtractor``;
the default is clean-fid's InceptionV3 (pool3, 2048-d) in its default ``clean`` mode (PIL bicubic resize
to 299 x 299 in float, as ``cleanfid.fid.compute_fid`` does), or torch-fidelity's (``--fid-backend``;
see ``backends``). The distance itself is computed here (``frechet_distance``), the formula clean-fid,
pytorch-fid and torch-fidelity use, with clean-fid's fallback for a singular product.

CLIP score = the mean over images of the cosine similarity between the image embedding and its caption's
embedding, as a fraction (not x 100, not clipped at 0): the convention of the paper's table (0.3284 for
SDXL). The default ``ClipScorer`` is open_clip's ViT-g-14 ``laion2b_s34b_b88k``.

clean-fid, torch-fidelity and open_clip pull torchvision; they are imported only when a default model is built.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import scipy.linalg
import torch
from PIL import Image

from .backends import (  # noqa: F401  (re-exported: the default metric models lived here)
    CleanFIDInception,
    OpenCLIPScore,
    TorchFidelityInception,
    build_clip_scorer,
    build_feature_extractor,
    check_default_metrics,
)
from .generate import check_manifest, image_path, load_prompts, missing_images, rank_device, rank_from_env
from .prompts import Prompt
from .settings import EvalSettings
from .tflops import count_tflops, resolve_configs

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
    configs = resolve_configs(settings)
    flops = count_tflops(settings, configs)
    device = rank_device(settings.device, rank_from_env())
    extractor = feature_extractor if feature_extractor is not None else build_feature_extractor(settings, device)
    scorer = clip_scorer if clip_scorer is not None else build_clip_scorer(settings, device)

    reference_stats = gaussian_stats(extract_features(references, extractor, settings.metrics_batch_size))
    rows = []
    for config in configs:
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
                "tome_ratio": config.tome_ratio,
                "paper_fid": paper_fid,
                "paper_clip": paper_clip,
            })
    results = {
        "settings": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(settings).items()},
        "num_reference_images": len(references),
        "fid_features": getattr(extractor, "name", type(extractor).__name__),
        "clip_score": getattr(scorer, "name", type(scorer).__name__) + " (mean over images, a fraction as in the paper's table)",
        "tflops": "UNet FLOPs per image per step at the run's size, counted on the meta device (2 x multiply-adds); "
                  "AT-EDM's own scoring work in overhead_tflops; ToMe rows include ToMe's similarity matmuls; "
                  "tomesd@<target> rows: tome_ratio solved so that tflops_per_step matches the target's",
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

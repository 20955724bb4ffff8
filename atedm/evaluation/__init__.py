"""The COCO-2017 FID / CLIP evaluation harness: AT-EDM presets, ToMe and full SDXL, over CFG scales.

    python -m atedm.evaluation --model stabilityai/stable-diffusion-xl-base-1.0 \
        --captions annotations/captions_val2017.json --reference val2017 --out eval \
        --configs full,a,b,c,d,dagger,tomesd@c --cfg-scales 7

Modules: ``prompts`` (caption choice, seeds, sharding), ``settings`` (the run and its configs),
``generate`` (sharded, resumable, atomic image generation), ``tflops`` (counted TFLOPs, ToMe ratios at
matched FLOPs), ``metrics`` (FID, CLIP score), ``backends`` (the default clean-fid / torch-fidelity /
open_clip models and their weights), ``report`` (JSON, CSV, plots), ``cli`` (stages and the command line).

From Python, with your own metric models (any callables with the protocols' signatures)::

    from atedm.evaluation import EvalSettings, run_evaluation
    run_evaluation(EvalSettings(model=..., captions=..., reference=..., out=...),
                   feature_extractor=my_features, clip_scorer=my_clip)

or from the command line, under any launcher: ``--feature-extractor mylab.metrics:MyFeatures`` (a callable
that takes the torch device and returns the model; ``--clip-scorer`` likewise).
"""

from .backends import CleanFIDInception, OpenCLIPScore, TorchFidelityInception
from .cli import run_evaluation
from .generate import RankInfo, generate_images, rank_from_env
from .metrics import ClipScorer, FeatureExtractor, compute_metrics, frechet_distance, gaussian_stats
from .prompts import Prompt, image_seed, load_coco_captions, shard_batches
from .settings import EvalSettings, MethodConfig, parse_config
from .tflops import count_tflops, resolve_configs

__all__ = [
    "CleanFIDInception",
    "ClipScorer",
    "EvalSettings",
    "FeatureExtractor",
    "MethodConfig",
    "OpenCLIPScore",
    "Prompt",
    "RankInfo",
    "TorchFidelityInception",
    "compute_metrics",
    "count_tflops",
    "frechet_distance",
    "gaussian_stats",
    "generate_images",
    "image_seed",
    "load_coco_captions",
    "parse_config",
    "rank_from_env",
    "resolve_configs",
    "run_evaluation",
    "shard_batches",
]

"""``python -m atedm.evaluation``: generate COCO images for several configs and CFG scales, then score them.

Stages (``--stage``):

* ``all`` (default): generate, then compute the metrics. Under ``torchrun`` / ``accelerate launch``
  every rank generates its share; the other ranks then exit, and rank 0 waits until every image is on
  disk (polling the output folder, up to ``--wait-timeout`` seconds) and computes the metrics alone.
  The ranks share nothing but the output folder (no process group): on several machines it must be
  shared (or the images gathered into one folder).
* ``generate``: this rank's images only.
* ``metrics``: FID / CLIP / TFLOPs from the images on disk; one process; every image must exist.

Rerunning any stage is safe: finished images are kept, missing ones are generated. A rank killed
mid-run (or the whole job) loses at most the images it was writing; rerun the same command.

Bad input is refused by every rank before any image is generated, with one ``error:`` line and exit
status 2: the captions file, ``--num-images``, the model folder, the device, the configs (and a ToMe
FLOPs budget the model cannot reach) and, for the stages that compute metrics, the reference folder,
which every rank must therefore see. The process that computes the metrics also checks the default
metric models (those not injected): their libraries import, the CLIP model and tag exist, and their
weights are on disk, downloaded now if missing, so a missing library, a typo or an offline machine fails
in seconds, not after hours of generation. Offline: --fid-weights FILE and --clip-pretrained FILE (see
``backends``), or your own models with --feature-extractor / --clip-scorer module:callable.
"""

from __future__ import annotations

import argparse

import torch

from .generate import (
    RankInfo,
    check_model_folder,
    generate_images,
    load_prompts,
    rank_device,
    rank_from_env,
    wait_for_images,
)
from .backends import check_default_metrics
from .metrics import ClipScorer, FeatureExtractor, compute_metrics, reference_images
from .settings import DTYPES, FID_BACKENDS, FID_MODES, STAGES, EvalSettings
from .tflops import resolve_configs


def check_inputs(settings: EvalSettings, stage: str, ranks: RankInfo, feature_extractor: FeatureExtractor | None = None,
                 clip_scorer: ClipScorer | None = None) -> None:
    """Raise on any input the run would fail on later, before an image is generated.

    Every rank checks for itself: under a launcher, a rank that skipped a check would start generating
    while the rank that failed it exits. Only the process that computes the metrics checks the metric
    models: their libraries and names first, their weights (a download of minutes) after everything else.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    computes_metrics = stage == "metrics" or (stage == "all" and ranks.rank == 0)
    if computes_metrics:
        check_default_metrics(settings, feature_extractor, clip_scorer)
    load_prompts(settings)
    check_model_folder(settings.model)
    rank_device(settings.device, ranks)
    resolve_configs(settings)
    if stage in ("all", "metrics"):
        reference_images(settings.reference)
    if computes_metrics:
        check_default_metrics(settings, feature_extractor, clip_scorer, fetch=True)


def run_evaluation(settings: EvalSettings, stage: str = "all", feature_extractor: FeatureExtractor | None = None,
                   clip_scorer: ClipScorer | None = None, pipe=None, ranks: RankInfo | None = None,
                   on_image_saved=None, progress: bool = True) -> dict | None:
    """Run a stage; returns the results dictionary on the process that computed metrics, else None."""
    ranks = rank_from_env() if ranks is None else ranks
    check_inputs(settings, stage, ranks, feature_extractor, clip_scorer)
    return _run_checked(settings, stage, ranks, feature_extractor, clip_scorer, pipe, on_image_saved, progress)


def _run_checked(settings: EvalSettings, stage: str, ranks: RankInfo, feature_extractor=None, clip_scorer=None,
                 pipe=None, on_image_saved=None, progress: bool = True) -> dict | None:
    if stage in ("all", "generate"):
        generate_images(settings, pipe=pipe, ranks=ranks, on_image_saved=on_image_saved, progress=progress)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the metric models need the memory the pipeline held
        if stage == "generate" or ranks.rank != 0:
            return None
        if ranks.world_size > 1:
            wait_for_images(settings, load_prompts(settings)[0])
    results = compute_metrics(settings, feature_extractor, clip_scorer)
    if progress:
        print(format_table(results["results"]))
        print(f"results in {settings.out}/metrics.json, metrics.csv, fid_vs_tflops.png, fid_vs_clip.png")
    return results


def format_table(rows: list[dict]) -> str:
    lines = [f"{'config':<12} {'CFG':>5} {'TFLOPs/step':>12} {'FID':>9} {'CLIP':>8} {'paper FID':>10} {'paper CLIP':>11}"]
    for row in rows:
        paper_fid = f"{row['paper_fid']:.2f}" if row["paper_fid"] is not None else "-"
        paper_clip = f"{row['paper_clip']:.4f}" if row["paper_clip"] is not None else "-"
        flops = f"{row['tflops_per_step']:.4g}" + ("" if row["flops_counted"] else "*")
        lines.append(f"{row['config']:<12} {row['cfg_scale']:>5g} {flops:>12} {row['fid']:>9.3f} "
                     f"{row['clip_score']:>8.4f} {paper_fid:>10} {paper_clip:>11}")
    return "\n".join(lines)


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _scales(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(item) for item in _comma_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"CFG scales must be comma-separated numbers (e.g. 4,7); got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m atedm.evaluation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="SDXL pipeline: local folder or hub id")
    parser.add_argument("--captions", required=True, help="COCO captions JSON (captions_val2017.json)")
    parser.add_argument("--reference", help="folder of reference images for FID (COCO val2017); not needed by --stage generate")
    parser.add_argument("--out", required=True, help="output folder: <out>/<config>/cfg<scale>/<image_id>.png and the results")
    parser.add_argument("--configs", type=_comma_list, default=("full", "a", "b", "c", "d", "dagger"),
                        help="comma-separated: full, AT-EDM presets (a,b,c,d,dagger), tomesd:<ratio>, tomesd@<preset or "
                             "TFLOPs> (ToMe at matched FLOPs, e.g. tomesd@c) (default: full,a,b,c,d,dagger)")
    parser.add_argument("--cfg-scales", type=_scales, default=(7.0,), help="comma-separated guidance scales (default: 7)")
    parser.add_argument("--num-images", type=int, default=5000, help="captions to evaluate, one per image (default: 5000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per pipeline call")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device; under torchrun 'cuda' means cuda:<LOCAL_RANK>")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="auto = float16 on CUDA, float32 elsewhere")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"], help="AT-EDM backend")
    parser.add_argument("--stage", default="all", choices=STAGES)
    parser.add_argument("--fid-backend", default="clean-fid", choices=FID_BACKENDS,
                        help="library of the FID Inception features: clean-fid (default) or torch-fidelity (torchmetrics' network)")
    parser.add_argument("--fid-mode", default="clean", choices=FID_MODES,
                        help="clean-fid mode of the FID features (default: clean, clean-fid's default)")
    parser.add_argument("--fid-weights", help="local Inception weights file of the FID backend (no download)")
    parser.add_argument("--clip-model", default="ViT-g-14", help="open_clip model of the CLIP score (default: ViT-g-14)")
    parser.add_argument("--clip-pretrained", default="laion2b_s34b_b88k",
                        help="open_clip pretrained tag, or a local checkpoint file (default: laion2b_s34b_b88k)")
    parser.add_argument("--feature-extractor", metavar="MODULE:CALLABLE",
                        help="your own FID features instead of --fid-backend's: called with the device, returns a "
                             "FeatureExtractor (see atedm.evaluation.metrics); the module must be importable")
    parser.add_argument("--clip-scorer", metavar="MODULE:CALLABLE",
                        help="your own CLIP score instead of open_clip's: called with the device, returns a ClipScorer")
    parser.add_argument("--metrics-batch-size", type=int, default=32)
    parser.add_argument("--wait-timeout", type=float, default=3600.0,
                        help="seconds rank 0 waits for the other ranks' images before giving up (default: 3600)")
    parser.add_argument("--download-timeout", type=float, default=60.0,
                        help="socket timeout in seconds of the metric weights' downloads (default: 60)")
    return parser


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    return EvalSettings(
        model=args.model, captions=args.captions, reference=args.reference, out=args.out, configs=args.configs,
        cfg_scales=args.cfg_scales, num_images=args.num_images, seed=args.seed, steps=args.steps, height=args.height,
        width=args.width, batch_size=args.batch_size, device=args.device, dtype=args.dtype, backend=args.backend,
        fid_backend=args.fid_backend, fid_mode=args.fid_mode, fid_weights=args.fid_weights, clip_model=args.clip_model,
        clip_pretrained=args.clip_pretrained, feature_extractor_factory=args.feature_extractor,
        clip_scorer_factory=args.clip_scorer, metrics_batch_size=args.metrics_batch_size, wait_timeout_s=args.wait_timeout,
        download_timeout_s=args.download_timeout,
    )


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
        ranks = rank_from_env()
        check_inputs(settings, args.stage, ranks)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))  # bad input: one line on each rank and exit status 2, not a traceback
    _run_checked(settings, args.stage, ranks)


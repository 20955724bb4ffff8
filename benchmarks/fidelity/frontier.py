"""The frontier's fidelity axis: every frontier setting on a trained fidelity model, at the same seeds.

    python -m benchmarks.fidelity.frontier --model digits            # ~45 min on one thread
    python -m benchmarks.fidelity.frontier --model scenes --shard 0/2 &   # two processes, one thread each
    python -m benchmarks.fidelity.frontier --model scenes --shard 1/2

The settings are ``benchmarks.frontier.settings`` (the same names the speed run measures on SDXL-base).
Sampling is ``bench_fidelity``'s: image i has label i % (number of labels) and starts from the noise of
seed 1000 + i; DDIM (eta 0) with classifier-free guidance 2, CFG batched [uncond, cond]. Every setting is
compared with the unpruned samples of the same seeds:

* ``psnr_db`` (mean over images, with its standard error) and ``mse``;
* ``feature_distance``: the mean Euclidean distance, image by image, between the model's classifier
  features (its penultimate layer) of the setting's sample and of the unpruned sample; and
  ``feature_distance_unrelated``, the same between unpruned samples of the same labels from other seeds
  (what "no resemblance beyond the label" scores);
* ``accuracy``: the classifier's accuracy on the intended labels.

Each setting's row is appended to ``results/<model dir>/frontier.csv`` as soon as it is scored, so an
interrupted run keeps what it finished; ``--shard i/n`` takes every n-th setting from the i-th.
"""

from __future__ import annotations

import argparse
import platform
import time

import diffusers
import numpy as np
import torch
from diffusers import DDIMScheduler

from benchmarks.common import git_sha, write_rows
from benchmarks.frontier.settings import Setting, apply_setting, select

from .bench_fidelity import FIRST_SEED, GLOBAL_RNG_SEED, OTHER_SEEDS_OFFSET, OUT_DIRS
from .model import MODELS, FidelityModel, load_fidelity_model
from .sampling import classifier_accuracy, classifier_features, mse_per_image, psnr_per_image, sample_images

DEFAULT_IMAGES = {"digits": 50, "scenes": 48}  # 5 per digit, 3 per scene label


def sample_setting(model: FidelityModel, setting: Setting, labels: torch.Tensor, seeds: list[int],
                   steps: int, guidance: float) -> torch.Tensor:
    """The setting's samples; the UNet carries the setting only while sampling."""
    torch.manual_seed(GLOBAL_RNG_SEED)  # random ranking and ToMe draw from the global generator
    # DeepCache indexes steps in this scheduler's timesteps: the same schedule sample_images sets up.
    schedule = DDIMScheduler.from_config(model.scheduler_config)
    schedule.set_timesteps(steps)
    remove = apply_setting(model.unet, setting, schedule, backend="torch")
    try:
        return sample_images(model, labels, seeds, steps, guidance)
    finally:
        remove()


def feature_distance(model: FidelityModel, images: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Per image, the Euclidean distance between the classifier features of ``images`` and ``reference``."""
    return np.linalg.norm(classifier_features(model, images) - classifier_features(model, reference), axis=1)


def score(model: FidelityModel, samples: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> dict:
    psnr = psnr_per_image(samples, reference).double().numpy()
    distance = feature_distance(model, samples, reference)
    return {"psnr_db": psnr.mean(), "psnr_sem": psnr.std(ddof=1) / np.sqrt(len(psnr)),
            "mse": mse_per_image(samples, reference).mean().item(), "feature_distance": distance.mean(),
            "feature_distance_sem": distance.std(ddof=1) / np.sqrt(len(distance)),
            "accuracy": classifier_accuracy(model, samples, labels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="digits")
    parser.add_argument("--settings", default="all", help="comma-separated names or families (default: all)")
    parser.add_argument("--images", type=int, default=None, help="default: 50 digits, 48 scenes")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--shard", default="0/1", help="i/n: this process takes settings i, i + n, ...")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--out", default=None, help="CSV (default: results/<model dir>/frontier.csv)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        settings = select(args.settings)
        index, count = (int(part) for part in args.shard.split("/"))
        if not 0 <= index < count:
            raise ValueError(f"--shard must be i/n with 0 <= i < n; got {args.shard!r}")
    except ValueError as error:
        raise SystemExit(str(error)) from None
    settings = [setting for setting in settings if setting.name != "full"][index::count]

    spec = MODELS[args.model]
    model = load_fidelity_model(spec.directory)
    num_images = args.images or DEFAULT_IMAGES[spec.name]
    labels = torch.arange(num_images) % spec.num_classes
    seeds = [FIRST_SEED + i for i in range(num_images)]
    out = args.out or OUT_DIRS[spec.name] / "frontier.csv"
    context = {"model": spec.name, "images": num_images, "ddim_steps": args.steps, "guidance": args.guidance,
               "threads": args.threads, "trained_steps": model.record["settings"]["steps"],
               "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "diffusers": diffusers.__version__, "git_sha": git_sha()}

    started = time.perf_counter()
    reference = sample_setting(model, select("full")[0], labels, seeds, args.steps, args.guidance)
    unrelated = sample_images(model, labels, [seed + OTHER_SEEDS_OFFSET for seed in seeds], args.steps, args.guidance)
    floor = {"feature_distance_unrelated": feature_distance(model, unrelated, reference).mean(),
             "psnr_unrelated_db": psnr_per_image(unrelated, reference).mean().item(),
             "accuracy_full": classifier_accuracy(model, reference, labels)}
    print(f"{spec.name}: unpruned and unrelated samples in {time.perf_counter() - started:.0f} s; "
          f"unrelated PSNR {floor['psnr_unrelated_db']:.1f} dB, feature distance "
          f"{floor['feature_distance_unrelated']:.3f}, accuracy {floor['accuracy_full']:.2f}", flush=True)
    for setting in settings:
        started = time.perf_counter()
        samples = sample_setting(model, setting, labels, seeds, args.steps, args.guidance)
        row = {"setting": setting.name, "family": setting.family, **score(model, samples, reference, labels),
               **floor, "seconds": time.perf_counter() - started, **context}
        write_rows(out, [row])
        print(f"  {setting.name:34s} PSNR {row['psnr_db']:5.1f} dB  features {row['feature_distance']:.3f}  "
              f"accuracy {row['accuracy']:.2f}  ({row['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

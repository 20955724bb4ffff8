"""Fidelity of AT-EDM vs other token reducers at matched FLOPs, on a trained SDXL-shaped UNet.

    python -m benchmarks.fidelity.bench_fidelity            # digits, 100 images, DDIM 25 steps: ~1 h on one shared thread
    python -m benchmarks.fidelity.bench_fidelity --quick    # 20 images, 10 steps, one budget: a smoke run
    python -m benchmarks.fidelity.bench_fidelity --model scenes --attention-only   # the attention statistics alone

``--model`` picks the trained model (``digits``: ``model/``, results in ``results/fidelity/``;
``scenes``: ``scenes_model/``, results in ``results/fidelity_scenes/``). Every configuration samples
the same images: label i % (number of labels) from the noise of seed 1000 + i, DDIM (eta 0) with
classifier-free guidance 2 (the models were trained with 10% label dropout), CFG batched [uncond,
cond] as in diffusers' SDXL pipeline. Compared at the same counted UNet FLOPs per step:

* ``gwpr``: AT-EDM as published (G-WPR, K = 3, head-mean map, copy by attention, DSAP 10%);
* ``column_sum``: the same with K = 1 (one step of the walk: the attention each token receives);
* ``random``: the same with uniform-noise scores (what the ranking is worth at this budget);
* ``tomesd``: ToMe for SD (merging before self-attention, cross-attention and the MLP, in both
  attention levels, ``max_downsample=4``), its ratio solved so that its FLOPs match
  (``atedm.tome.solve_ratio``, within 0.5%); and
  ``tomesd_level2`` (``max_downsample=2``, the 256-token level only), where that can reach the budget.

Budgets are AT-EDM prune ratios; FLOPs are counted on the meta device with
``atedm.flops_per_step`` (latent 32x32 = "image" 256x256 for its 8x VAE factor, batch 1, its 77
context tokens) and for tomesd with ``atedm.tome.count_tome_flops``, its matching work (the similarity
matmul) counted apart as AT-EDM's scoring work is. Plus ablations at prune ratio 0.63: G-WPR iterations
K = 1, 2, 3, 5, DSAP fraction 0 / 0.1 / 0.2, and the recovery copy by key cosine instead of by
attention (G-WPR and random ranking). And a look at the model itself: how peaked the
first-layer self-attention of each pruning block is (normalised entropy of the head-mean map and of
each head's), and how much K = 1 and K = 3 agree on which tokens to keep, for the trained and a
random-weight UNet.

Scores per configuration: PSNR and MSE of each image against the unpruned image of the same seed,
the classifier's accuracy on the intended label, and the Frechet distance of classifier features to
real images (all digits; 1000 held-out scenes). Writes ``{fidelity.csv, attention.csv, summary.md,
psnr_vs_flops.png, samples.png}`` (``--attention-only``: ``attention.csv`` and ``attention.md``).
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import diffusers
import numpy as np
import tomesd
import torch
import torch.nn.functional as F

import atedm
from atedm.tome import TomeFlops, count_tome_flops, solve_ratio
from benchmarks.common import RESULTS_DIR, environment_info, markdown_table, write_rows

from .model import IMAGE_SIZE, MODELS, FidelityModel, load_fidelity_model, reference_images
from .sampling import (classifier_accuracy, classifier_features, frechet_distance, mse_per_image, psnr_per_image,
                       sample_images)

OUT_DIRS = {"digits": RESULTS_DIR / "fidelity", "scenes": RESULTS_DIR / "fidelity_scenes"}
ATTENTION_PROBES = 20
ATTENTION_TIMESTEPS = (900, 500, 100)
# flops_per_step assumes SDXL's 8x VAE: our 32x32 "latent" is its 256x256 image.
FLOPS_IMAGE_SIZE = 8 * IMAGE_SIZE
FIRST_SEED = 1000
OTHER_SEEDS_OFFSET = 500_000  # the "unrelated sample" floor: same labels, different noise
# Ranking by noise and ToMe's random destination tokens draw from torch's global generator: seeding
# it before every configuration makes each one reproducible on its own.
GLOBAL_RNG_SEED = 1234
TOMESD_MATCH_TOLERANCE = 0.005  # a budget ToMe misses by more than this (relative) is skipped
ABLATION_RATIO = 0.63


@dataclass(frozen=True)
class Run:
    """One sampled configuration."""

    name: str
    method: str  # unpruned | gwpr | column_sum | random | tomesd | tomesd_level2
    group: str  # reference | budget | iterations | dsap | recovery
    atedm_config: atedm.ATEDMConfig | None = None
    tomesd_ratio: float | None = None
    tomesd_max_downsample: int | None = None
    budget_ratio: float | None = None  # the AT-EDM prune ratio whose FLOPs this run matches


def tomesd_kwargs(ratio: float, max_downsample: int) -> dict:
    # Merging before all three sub-layers: merging before self-attention only saves at most 20% of this
    # UNet's FLOPs (both levels, ratio 0.75), short of AT-EDM's 0.63 budget (22%) and beyond.
    return dict(ratio=ratio, max_downsample=max_downsample, merge_attn=True, merge_crossattn=True, merge_mlp=True)


def tomesd_flops(unet_config: dict, ratio: float, max_downsample: int) -> TomeFlops:
    """ToMe's counted FLOPs of one pass for one image, its UNet's and its matching apart."""
    return count_tome_flops(unet_config, tomesd_kwargs(ratio, max_downsample), FLOPS_IMAGE_SIZE, FLOPS_IMAGE_SIZE)


def matched_tomesd_ratio(unet_config: dict, target_flops: float, max_downsample: int, name: str) -> float:
    """The tomesd ratio whose UNet FLOPs (its matching apart) come closest to ``target_flops``; a ValueError
    where ToMe misses them by more than ``TOMESD_MATCH_TOLERANCE``."""
    def unet_tflops_at(ratio: float) -> float:
        return tomesd_flops(unet_config, ratio, max_downsample).unet / 1e12

    # Our 32x32 "latent": every patched level's token count divides its IMAGE_SIZE ** 2 tokens.
    return solve_ratio(unet_tflops_at, target_flops / 1e12, IMAGE_SIZE**2, TOMESD_MATCH_TOLERANCE, name)


def plan_runs(budget_ratios: list[float], include_ablations: bool) -> list[Run]:
    base = atedm.ATEDMConfig(backend="torch")
    runs = [Run("unpruned", "unpruned", "reference")]
    for ratio in budget_ratios:
        config = base.replace(prune_ratio=ratio)
        runs += [
            Run(f"gwpr@{ratio}", "gwpr", "budget", config, budget_ratio=ratio),
            Run(f"column_sum@{ratio}", "column_sum", "budget", config.replace(gwpr_iterations=1), budget_ratio=ratio),
            Run(f"random@{ratio}", "random", "budget", config.replace(ranking="random"), budget_ratio=ratio),
            Run(f"tomesd@{ratio}", "tomesd", "budget", tomesd_max_downsample=4, budget_ratio=ratio),
            Run(f"tomesd_level2@{ratio}", "tomesd_level2", "budget", tomesd_max_downsample=2, budget_ratio=ratio),
        ]
    if include_ablations:
        config = base.replace(prune_ratio=ABLATION_RATIO)
        runs += [Run(f"gwpr_K{k}@{ABLATION_RATIO}", "gwpr", "iterations", config.replace(gwpr_iterations=k),
                     budget_ratio=ABLATION_RATIO) for k in (2, 5)]
        runs += [Run(f"gwpr_dsap{fraction}@{ABLATION_RATIO}", "gwpr", "dsap", config.replace(dsap_fraction=fraction),
                     budget_ratio=ABLATION_RATIO) for fraction in (0.0, 0.2)]
        # The copy that refills pruned tokens, by key cosine instead of attention: separates what the
        # ranking costs from what the recovery costs.
        key_cosine = config.replace(similarity="key_cosine")
        runs += [Run(f"gwpr_keycos@{ABLATION_RATIO}", "gwpr", "recovery", key_cosine, budget_ratio=ABLATION_RATIO),
                 Run(f"random_keycos@{ABLATION_RATIO}", "random", "recovery", key_cosine.replace(ranking="random"),
                     budget_ratio=ABLATION_RATIO)]
    return runs


def count_flops(unet_config: dict, runs: list[Run], num_steps: int) -> tuple[list[Run], dict[str, dict]]:
    """Counted FLOPs of every run; tomesd runs get their matched ratio (and are dropped where unreachable)."""
    full = atedm.flops_per_step(unet_config, None, FLOPS_IMAGE_SIZE, FLOPS_IMAGE_SIZE, num_steps).unet_tflops * 1e12
    counted, kept = {}, []
    atedm_flops = {}
    for run in runs:
        if run.atedm_config is not None:
            report = atedm.flops_per_step(unet_config, run.atedm_config, FLOPS_IMAGE_SIZE, FLOPS_IMAGE_SIZE, num_steps)
            counted[run.name] = {"unet_flops": report.unet_tflops * 1e12, "extra_flops": report.overhead_tflops * 1e12}
            atedm_flops[run.budget_ratio, run.group] = counted[run.name]["unet_flops"]
        elif run.tomesd_max_downsample is not None:
            target = atedm_flops[run.budget_ratio, "budget"]
            try:
                ratio = matched_tomesd_ratio(unet_config, target, run.tomesd_max_downsample, run.name)
            except ValueError:
                print(f"  {run.name}: tomesd cannot reach {target / 1e9:.3f} GFLOPs with max_downsample="
                      f"{run.tomesd_max_downsample}; skipped")
                continue
            run = Run(run.name, run.method, run.group, tomesd_ratio=ratio,
                      tomesd_max_downsample=run.tomesd_max_downsample, budget_ratio=run.budget_ratio)
            flops = tomesd_flops(unet_config, run.tomesd_ratio, run.tomesd_max_downsample)
            counted[run.name] = {"unet_flops": flops.unet, "extra_flops": flops.matching}
        else:
            counted[run.name] = {"unet_flops": full, "extra_flops": 0.0}
        counted[run.name]["flops_vs_full"] = counted[run.name]["unet_flops"] / full
        kept.append(run)
    return kept, counted


def sample_run(model: FidelityModel, run: Run, labels: torch.Tensor, seeds: list[int], args) -> torch.Tensor:
    """The run's samples; the UNet is patched for the run and restored afterwards."""
    torch.manual_seed(GLOBAL_RNG_SEED)
    if run.atedm_config is not None:
        atedm.apply(model.unet, run.atedm_config)
    elif run.tomesd_ratio is not None:
        tomesd.apply_patch(model.unet, **tomesd_kwargs(run.tomesd_ratio, run.tomesd_max_downsample))
    try:
        return sample_images(model, labels, seeds, args.steps, args.guidance, args.batch_size)
    finally:
        atedm.remove(model.unet)
        tomesd.remove_patch(model.unet)


def attention_statistics(unet, model: FidelityModel, prune_ratio: float) -> list[dict]:
    """Per pruning block, at three noise levels, from the first layer's self-attention (what AT-EDM reads),
    on ``ATTENTION_PROBES`` real images (digits: drawn from all; scenes: held out) noised to t:

    * how peaked the rows are: entropy / log N of the head-mean map and of each head's map (1 =
      uniform; per head, the mean over heads and the sharpest head), and the largest weight of a
      head-mean row times N (1 = uniform);
    * what G-WPR (K = 3) keeps at ``prune_ratio``: the overlap with K = 1's kept set, the share of the
      score mass on the kept tokens (uniform scores: k / N), the share of kept tokens on the foreground
      (a digit's strokes, a scene's label object; beside the foreground's share of all tokens), and the
      mean grid distance from a pruned token to its nearest kept token, beside the same for a random
      keep set of the same size.
    """
    from diffusers import DDPMScheduler

    images, labels, foreground = reference_images(model.spec)
    generator = torch.Generator().manual_seed(0)
    index = torch.randperm(len(images), generator=generator)[:ATTENTION_PROBES]
    clean, labels, foreground = images[index], labels[index], foreground[index]
    noise = torch.randn(clean.shape, generator=generator)
    noising = DDPMScheduler.from_config(model.scheduler_config)
    first_layers = {name: module.transformer_blocks[0].attn1 for name, module in unet.named_modules()
                    if type(module).__name__ == "Transformer2DModel" and len(module.transformer_blocks) >= 2}
    captured = {}
    hooks = [attn.register_forward_pre_hook(lambda mod, args, name=name: captured.__setitem__(name, args[0]))
             for name, attn in first_layers.items()]
    rows = []
    try:
        for timestep in ATTENTION_TIMESTEPS:
            t = torch.full((len(clean),), timestep)
            with torch.no_grad():
                unet(noising.add_noise(clean, noise, t), t, encoder_hidden_states=model.context(labels))
            for name, attn in first_layers.items():
                statistics = _map_statistics(attn, captured[name], foreground, prune_ratio,
                                             torch.Generator().manual_seed(1))
                rows.append({"block": name, "timestep": timestep, **statistics})
    finally:
        for hook in hooks:
            hook.remove()
    return rows


def _map_statistics(attn, hidden_states: torch.Tensor, foreground: torch.Tensor, prune_ratio: float,
                    generator: torch.Generator) -> dict:
    batch, num_tokens, _ = hidden_states.shape
    side = math.isqrt(num_tokens)  # square latents here
    with torch.no_grad():
        query, key = attn.to_q(hidden_states), attn.to_k(hidden_states)
        query, key = (t.view(batch, num_tokens, attn.heads, -1).transpose(1, 2) for t in (query, key))
        head_maps = torch.softmax(query @ key.transpose(-1, -2) * attn.scale, dim=-1)  # (B, H, N, N)
    mean_map = head_maps.mean(1)

    def row_entropies(maps):
        return -(maps * maps.clamp_min(1e-30).log()).sum(-1) / math.log(num_tokens)

    def normalised_entropy(maps):
        return row_entropies(maps).mean().item()

    num_kept = max(1, math.ceil((1 - prune_ratio) * num_tokens))

    def kept_mask(scores):
        return torch.zeros(batch, num_tokens, dtype=torch.bool).scatter_(1, scores.topk(num_kept).indices, True)

    scores, kept = torch.full((batch, num_tokens), 1.0 / num_tokens), {}
    for iteration in range(1, 4):
        scores = torch.einsum("bij,bi->bj", mean_map, scores)  # s <- A^T s
        kept[iteration] = kept_mask(scores)
    randomly_kept = kept_mask(torch.rand(batch, num_tokens, generator=generator))
    # A token is foreground where the map averaged over its pixels is above 0: a digit brighter than
    # mid-grey, more than half of it on a scene's label object.
    on_foreground = F.adaptive_avg_pool2d(foreground, side).mean(1).flatten(1) > 0.0

    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    positions = torch.stack([rows.flatten(), cols.flatten()], 1).float()
    grid_distance = torch.cdist(positions, positions)  # (N, N) in token steps

    def pruned_to_kept_distance(keep):
        distance = grid_distance.expand(batch, -1, -1).masked_fill(~keep.unsqueeze(1), float("inf")).amin(-1)
        return distance[~keep].mean().item()

    return {
        "tokens": num_tokens,
        "row_entropy": normalised_entropy(mean_map),
        "head_row_entropy": normalised_entropy(head_maps),
        "sharpest_head_row_entropy": row_entropies(head_maps).mean((0, 2)).min().item(),
        "row_max_x_tokens": (mean_map.amax(-1) * num_tokens).mean().item(),
        "k1_k3_kept_overlap": ((kept[1] & kept[3]).sum(1).float() / num_kept).mean().item(),
        "kept_score_share": scores.topk(num_kept).values.sum(1).mean().item(),
        "kept_share_if_uniform": num_kept / num_tokens,
        "foreground_share": on_foreground.float().mean().item(),
        "gwpr_kept_on_foreground": ((kept[3] & on_foreground).sum() / kept[3].sum()).item(),
        "gwpr_pruned_to_kept_distance": pruned_to_kept_distance(kept[3]),
        "random_pruned_to_kept_distance": pruned_to_kept_distance(randomly_kept),
    }


def score_runs(model, runs, samples, labels, real_features, counted) -> list[dict]:
    """One CSV row per run: its FLOPs and its scores against the unpruned samples and the real digits."""
    reference = samples["unpruned"]
    def similarity(run: Run) -> str:
        return run.atedm_config.similarity if run.atedm_config else "attention"

    # Each run against random ranking at the same budget and with the same recovery.
    random_psnr = {(run.budget_ratio, similarity(run)): psnr_per_image(samples[run.name], reference)
                   for run in runs if run.method == "random"}
    rows = []
    for run in runs:
        images = samples[run.name]
        psnr = psnr_per_image(images, reference)
        row = {
            "run": run.name,
            "method": run.method,
            "group": run.group,
            "budget_prune_ratio": run.budget_ratio,
            "prune_ratio": run.atedm_config.prune_ratio if run.atedm_config else None,
            "gwpr_iterations": run.atedm_config.gwpr_iterations if run.atedm_config else None,
            "dsap_fraction": run.atedm_config.dsap_fraction if run.atedm_config else None,
            "similarity": run.atedm_config.similarity if run.atedm_config else None,
            "tomesd_ratio": run.tomesd_ratio,
            "tomesd_max_downsample": run.tomesd_max_downsample,
            "unet_gflops_per_step": counted[run.name]["unet_flops"] / 1e9,
            "extra_gflops_per_step": counted[run.name]["extra_flops"] / 1e9,
            "flops_vs_full": counted[run.name]["flops_vs_full"],
            "psnr_db": psnr.mean().item() if run.method != "unpruned" else None,
            "psnr_sem_db": (psnr.std() / math.sqrt(len(psnr))).item() if run.method != "unpruned" else None,
            "mse": mse_per_image(images, reference).mean().item(),
            "accuracy": classifier_accuracy(model, images, labels),
            "frechet_distance": frechet_distance(classifier_features(model, images), real_features),
            "psnr_gain_vs_random_db": None,
            "wins_vs_random": None,
        }
        baseline = random_psnr.get((run.budget_ratio, similarity(run)))
        if baseline is not None and run.method not in ("unpruned", "random"):
            row["psnr_gain_vs_random_db"] = (psnr - baseline).mean().item()
            row["wins_vs_random"] = (psnr > baseline).float().mean().item()
        rows.append(row)
    return rows


def plot_psnr_vs_flops(rows: list[dict], model_name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    markers = {"gwpr": "o", "column_sum": "s", "random": "x", "tomesd": "^", "tomesd_level2": "v"}
    for method, marker in markers.items():
        points = sorted((r["flops_vs_full"], r["psnr_db"], r["psnr_sem_db"]) for r in rows
                        if r["method"] == method and r["group"] == "budget")
        if points:
            x, y, err = zip(*points)
            axis.errorbar([100 * v for v in x], y, yerr=err, marker=marker, capsize=3, label=method)
    axis.set_xlabel("UNet FLOPs per step, % of unpruned")
    axis.set_ylabel("PSNR to the unpruned sample (dB)")
    axis.set_title(f"Trained SDXL-shaped {model_name} UNet, DDIM, same seeds")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_samples(samples: dict[str, torch.Tensor], names: list[str], num_classes: int, path: Path) -> None:
    """The first image of each label, one row per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(names), num_classes, figsize=(num_classes * 0.7, len(names) * 0.75))
    for row, name in enumerate(names):
        for label in range(num_classes):
            axis = axes[row, label]
            image = samples[name][label]
            if len(image) == 1:
                axis.imshow(image[0].numpy(), cmap="gray", vmin=-1, vmax=1)
            else:
                axis.imshow(((image.permute(1, 2, 0) + 1.0) / 2.0).clamp(0.0, 1.0).numpy())
            axis.set_xticks([])
            axis.set_yticks([])
        axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def average_by_level(attention_rows: list[dict]) -> list[dict]:
    """Mean of every statistic over the blocks with the same model, timestep and token count."""
    groups: dict[tuple, list[dict]] = {}
    for row in attention_rows:
        groups.setdefault((row["model"], row["timestep"], row["tokens"]), []).append(row)
    averaged = []
    for (model, timestep, tokens), rows in groups.items():
        statistics = {key: float(np.mean([row[key] for row in rows])) for key in rows[0]
                      if key not in ("model", "timestep", "tokens", "block")}
        averaged.append({"model": model, "timestep": timestep, "tokens": tokens, "blocks": len(rows), **statistics})
    return averaged


ATTENTION_COLUMNS = ["model", "timestep", "tokens", "blocks", "row_entropy", "head_row_entropy",
                     "sharpest_head_row_entropy", "row_max_x_tokens", "k1_k3_kept_overlap", "kept_score_share",
                     "kept_share_if_uniform", "foreground_share", "gwpr_kept_on_foreground",
                     "gwpr_pruned_to_kept_distance", "random_pruned_to_kept_distance"]


def attention_tables(attention_rows: list[dict]) -> list[str]:
    """The attention statistics averaged by level, then per block at t = 500 and 100 (trained model)."""
    per_block_columns = ["block", "tokens"] + ATTENTION_COLUMNS[4:]
    tables = [
        f"First-layer self-attention of the pruning blocks, averaged over the blocks of a level "
        f"({ATTENTION_PROBES} real images noised to t; per block in attention.csv):",
        markdown_table(average_by_level(attention_rows), ATTENTION_COLUMNS),
    ]
    for timestep in (500, 100):
        tables += [f"The same per block, trained model, t = {timestep}:",
                   markdown_table([row for row in attention_rows
                                   if row["model"] == "trained" and row["timestep"] == timestep], per_block_columns)]
    return tables


def measure_attention(model_dir: str, out_dir: Path) -> list[dict]:
    """Attention statistics of the trained UNet and of a random-weight one of the same config, to attention.csv."""
    model = load_fidelity_model(model_dir)  # a fresh copy: nothing of a run's patches can leak in
    torch.manual_seed(0)
    random_weights = type(model.unet).from_config(dict(model.unet.config)).eval()
    attention_rows = [{"model": "trained", **row} for row in attention_statistics(model.unet, model, ABLATION_RATIO)]
    attention_rows += [{"model": "random init", **row}
                       for row in attention_statistics(random_weights, model, ABLATION_RATIO)]
    attention_path = out_dir / "attention.csv"
    attention_path.unlink(missing_ok=True)
    write_rows(attention_path, attention_rows)
    return attention_rows


def write_summary(rows, attention_rows, header: str, path: Path) -> None:
    budget = [r for r in rows if r["group"] in ("reference", "budget")]
    ablation = [r for r in rows if r["group"] in ("iterations", "dsap", "recovery")
                or (r["method"] in ("gwpr", "column_sum") and r["budget_prune_ratio"] == ABLATION_RATIO)]
    columns = ["run", "unet_gflops_per_step", "flops_vs_full", "tomesd_ratio", "psnr_db", "psnr_sem_db", "mse",
               "psnr_gain_vs_random_db", "wins_vs_random", "accuracy", "frechet_distance"]
    ablation_columns = ["run", "gwpr_iterations", "dsap_fraction", "similarity", "flops_vs_full", "psnr_db",
                        "psnr_sem_db", "psnr_gain_vs_random_db", "accuracy", "frechet_distance"]
    text = "\n\n".join([
        header,
        markdown_table(budget, columns),
        "Ablations at prune ratio 0.63 (gain vs random: random ranking with the same recovery):",
        markdown_table(ablation, ablation_columns),
        *attention_tables(attention_rows),
    ])
    path.write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="digits", help="which trained model")
    parser.add_argument("--num-images", type=int, default=None,
                        help="a multiple of the number of labels (default: 10 per label)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale")
    parser.add_argument("--budgets", default="0.4,0.63,0.9", help="AT-EDM prune ratios that set the FLOPs budgets")
    parser.add_argument("--batch-size", type=int, default=100, help="images per UNet call (x2 for CFG)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--quick", action="store_true", help="20 images, 10 steps, one budget, no ablations")
    parser.add_argument("--attention-only", action="store_true", help="only the attention statistics")
    parser.add_argument("--out-dir", default=None, help="default: results/fidelity/ (digits), results/fidelity_scenes/")
    parser.add_argument("--model-dir", default=None, help="what benchmarks.fidelity.train wrote (default: the model's)")
    args = parser.parse_args()
    spec = MODELS[args.model]
    model_dir = args.model_dir or str(spec.directory)
    num_classes = spec.num_classes
    if args.num_images is None:
        args.num_images = 10 * num_classes
    if args.quick:
        args.num_images, args.steps, args.budgets = 20, 10, "0.63"
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir or OUT_DIRS[spec.name])
    out_dir.mkdir(parents=True, exist_ok=True)
    environment = environment_info("cpu") | {"diffusers": diffusers.__version__, "tomesd": metadata.version("tomesd")}
    machine = (f"{environment['device']}, python {platform.python_version()}, torch {torch.__version__}, "
               f"diffusers {diffusers.__version__}, git {environment['git_sha']}")

    if args.attention_only:
        model = load_fidelity_model(model_dir)
        header = (f"{spec.name} model ({model_dir}, {model.record.get('steps_done', model.record['settings']['steps'])}"
                  f" training steps); {machine}.")
        (out_dir / "attention.md").write_text("\n\n".join([header, *attention_tables(
            measure_attention(model_dir, out_dir))]) + "\n")
        print((out_dir / "attention.md").read_text())
        return

    model = load_fidelity_model(model_dir)
    unet_config = dict(model.unet.config)
    labels = torch.arange(args.num_images) % num_classes
    seeds = [FIRST_SEED + i for i in range(args.num_images)]
    budgets = [float(value) for value in args.budgets.split(",")]

    runs, counted = count_flops(unet_config, plan_runs(budgets, include_ablations=not args.quick), args.steps)
    samples = {}
    start = time.perf_counter()
    for run in runs:
        samples[run.name] = sample_run(model, run, labels, seeds, args)
        print(f"  {run.name:<24} {100 * counted[run.name]['flops_vs_full']:5.1f}% FLOPs  "
              f"{time.perf_counter() - start:7.0f} s", flush=True)
    other_seeds = [seed + OTHER_SEEDS_OFFSET for seed in seeds]
    floor_images = sample_images(model, labels, other_seeds, args.steps, args.guidance, args.batch_size)
    floor_psnr = psnr_per_image(floor_images, samples["unpruned"]).mean().item()

    real_images, _, _ = reference_images(spec)
    rows = score_runs(model, runs, samples, labels, classifier_features(model, real_images), counted)
    setting = {"model": spec.name, "num_images": args.num_images, "ddim_steps": args.steps,
               "guidance": args.guidance, "threads": args.threads, "trained_steps": model.record["settings"]["steps"]}
    csv_path = out_dir / "fidelity.csv"
    csv_path.unlink(missing_ok=True)  # one run's results per file: the summary and plot describe it
    write_rows(csv_path, [row | setting | environment for row in rows])
    attention_rows = measure_attention(model_dir, out_dir)

    plot_psnr_vs_flops(rows, spec.name, out_dir / "psnr_vs_flops.png")
    top = max(budgets)
    plot_samples(samples, [name for name in ["unpruned", f"gwpr@{top}", f"column_sum@{top}", f"random@{top}",
                                             f"tomesd@{top}"] if name in samples],
                 min(num_classes, args.num_images), out_dir / "samples.png")
    header = (f"{spec.name} model, {args.num_images} images, DDIM {args.steps} steps, CFG {args.guidance}; "
              f"{machine}; sampling took {time.perf_counter() - start:.0f} s. PSNR of unrelated "
              f"samples (unpruned, other seeds, same labels): {floor_psnr:.2f} dB.")
    write_summary(rows, attention_rows, header, out_dir / "summary.md")
    print((out_dir / "summary.md").read_text())


if __name__ == "__main__":
    main()

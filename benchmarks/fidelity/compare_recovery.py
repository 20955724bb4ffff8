"""Recovery rules side by side on the fidelity model, at the tests' small settings (a few minutes).

PSNR of pruned samples against unpruned ones from the same noise, prune ratio 0.63, for the published
copy and for ``recovery="delta"`` (the pruned token keeps its own state at the cut and adds its match's
change), under G-WPR and random ranking and both match rules. Two image-seed sets, so the spread shows.

    python -m benchmarks.fidelity.compare_recovery [--num-steps 8] [--seed-sets 7000,8000]
"""

from __future__ import annotations

import argparse

import torch

import atedm
from benchmarks.fidelity.model import load_fidelity_model
from benchmarks.fidelity.sampling import psnr_per_image, sample_images

CONFIGS = {
    "gwpr, copy by attention (published)": dict(),
    "gwpr, delta by attention": dict(recovery="delta"),
    "random, delta by attention": dict(recovery="delta", ranking="random"),
    "gwpr, copy by key cosine": dict(similarity="key_cosine"),
    "gwpr, delta by key cosine": dict(similarity="key_cosine", recovery="delta"),
    "random, delta by key cosine": dict(similarity="key_cosine", recovery="delta", ranking="random"),
    "gwpr, delta, cut after self-attention": dict(recovery="delta", prune_after="first_self_attention"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-steps", type=int, default=8, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--prune-ratio", type=float, default=0.63)
    parser.add_argument("--seed-sets", default="7000,8000", help="image i of a set starts from seed set + i")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_fidelity_model()
    labels = torch.arange(10)
    seed_sets = [int(s) for s in args.seed_sets.split(",")]
    base = atedm.ATEDMConfig(prune_ratio=args.prune_ratio, backend="torch")
    print(f"| config | " + " | ".join(f"PSNR dB, seeds {s}+" for s in seed_sets) + " |")
    print("|---|" + "---|" * len(seed_sets))
    references = {s: sample_images(model, labels, [s + d for d in range(10)], args.num_steps, args.guidance, 10)
                  for s in seed_sets}
    for name, overrides in CONFIGS.items():
        values = []
        for seed_set in seed_sets:
            torch.manual_seed(0)  # the random ranking's draws
            atedm.apply(model.unet, base.replace(**overrides))
            try:
                samples = sample_images(model, labels, [seed_set + d for d in range(10)], args.num_steps,
                                        args.guidance, 10)
            finally:
                atedm.remove(model.unet)
            values.append(psnr_per_image(samples, references[seed_set]).mean().item())
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |", flush=True)


if __name__ == "__main__":
    main()

"""Train the fidelity model on this CPU: an SDXL-shaped UNet denoiser of digits and a digit classifier.

    python -m benchmarks.fidelity.train                 # one thread, ~22 min CPU; writes benchmarks/fidelity/model/
    python -m benchmarks.fidelity.train --steps 50 --out /tmp/fid-model   # a quick smoke run

What it does (see ``benchmarks/fidelity/model.py`` for the architecture and data):

1. a small CNN classifier on 80% of the upsampled digits (random shifts and noise as augmentation, so
   it also reads generated digits), scored on the other 20%;
2. the UNet and the label conditioner together as an epsilon-prediction denoiser on all digits: DDPM
   noising (diffusers' DDPMScheduler, linear betas, 1000 steps), uniform timesteps, MSE on the noise,
   the label dropped to the null label 10% of the time so classifier-free guidance works; AdamW with
   warm-up and cosine decay; the saved weights are an exponential moving average;
3. a check of what was saved (the UNet in fp16, a 5 MB file): 100 samples (10 per class, DDIM 25
   steps, CFG 2) scored by the classifier.

Seeded and single-threaded, so a rerun on the same machine and versions gives the same weights. The
record (settings, losses, wall and CPU time, scores, versions) goes to ``model/training.json``.
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import diffusers
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel

from benchmarks.common import git_sha

from .model import (
    MODEL_DIR,
    NULL_LABEL,
    NUM_CLASSES,
    DigitClassifier,
    LabelConditioner,
    classifier_split,
    load_digit_images,
    load_fidelity_model,
    save_fidelity_model,
    save_record,
    scheduler_config,
    unet_config,
)
from .sampling import classifier_accuracy, sample_digits


def shifted(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by up to ``max_shift`` pixels in x and y, the border filled with background (-1)."""
    size = images.shape[-1]
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + size, dx:dx + size] for i, (dy, dx) in enumerate(offsets)])


def train_classifier(images, labels, args, generator) -> tuple[DigitClassifier, float]:
    """The classifier, trained on a seeded 80% split; returns it with its accuracy on the other 20%."""
    train, test = classifier_split(len(images), generator)
    classifier = DigitClassifier()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=2e-3)
    for epoch in range(args.classifier_epochs):
        for batch in torch.randperm(len(train), generator=generator).split(64):
            batch_images = shifted(images[train[batch]], 2, generator)
            # Noise of a random strength up to 0.3: generated digits keep some grain, real ones have none.
            noise_scale = 0.3 * torch.rand(len(batch_images), 1, 1, 1, generator=generator)
            batch_images = batch_images + noise_scale * torch.randn(batch_images.shape, generator=generator)
            loss = F.cross_entropy(classifier(batch_images), labels[train[batch]])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    classifier.eval()
    with torch.no_grad():
        accuracy = (classifier(images[test]).argmax(1) == labels[test]).float().mean().item()
    return classifier, accuracy


class EMA:
    """Exponential moving average of parameters, with the usual warm-up (1 + t) / (10 + t) on the decay
    so that a short run is not dominated by its random initialisation."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.average = copy.deepcopy(module).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for averaged, current in zip(self.average.parameters(), module.parameters()):
            averaged.lerp_(current, 1.0 - decay)
        self.updates += 1


class Denoiser(torch.nn.Module):
    """UNet and label conditioner as one module, so they are optimised and averaged together."""

    def __init__(self):
        super().__init__()
        self.unet = UNet2DConditionModel.from_config(unet_config())
        self.conditioner = LabelConditioner()

    def forward(self, noisy, timesteps, labels):
        return self.unet(noisy, timesteps, encoder_hidden_states=self.conditioner(labels)).sample


def learning_rate(step: int, args) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_denoiser(images, labels, args, generator) -> tuple[Denoiser, list[float]]:
    """The EMA denoiser and the mean training loss of each tenth of the run."""
    denoiser = Denoiser().train()
    ema = EMA(denoiser, args.ema_decay)
    noising = DDPMScheduler.from_config(scheduler_config())
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=args.lr, weight_decay=0.0)
    losses, window = [], []
    start = time.perf_counter()
    for step in range(args.steps):
        index = torch.randint(len(images), (args.batch_size,), generator=generator)
        clean, batch_labels = images[index], labels[index].clone()
        dropped = torch.rand(args.batch_size, generator=generator) < args.label_dropout
        batch_labels[dropped] = NULL_LABEL
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, noising.config.num_train_timesteps, (args.batch_size,), generator=generator)
        loss = F.mse_loss(denoiser(noising.add_noise(clean, noise, timesteps), timesteps, batch_labels), noise)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(denoiser.parameters(), 1.0)
        optimizer.step()
        ema.update(denoiser)
        window.append(loss.item())
        if (step + 1) % max(1, args.steps // 10) == 0 or step + 1 == args.steps:
            losses.append(sum(window) / len(window))
            window = []
            elapsed = time.perf_counter() - start
            print(f"  step {step + 1:5d}/{args.steps}  loss {losses[-1]:.4f}  {elapsed:7.1f} s", flush=True)
    return ema.average, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps of the denoiser")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--label-dropout", type=float, default=0.1, help="share of labels replaced by the null label")
    parser.add_argument("--classifier-epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--out", default=str(MODEL_DIR))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    images, labels = load_digit_images()
    wall_start, cpu_start = time.perf_counter(), time.process_time()

    classifier, classifier_test_accuracy = train_classifier(images, labels, args, generator)
    classifier_seconds = time.perf_counter() - wall_start
    print(f"classifier: {classifier_test_accuracy:.3f} accuracy on held-out digits ({classifier_seconds:.0f} s)")

    print(f"denoiser: {args.steps} steps of batch {args.batch_size}")
    denoiser, losses = train_denoiser(images, labels, args, generator)
    wall_seconds, cpu_seconds = time.perf_counter() - wall_start, time.process_time() - cpu_start

    record = {
        "settings": {name: value for name, value in vars(args).items() if name != "out"},
        "data": "sklearn load_digits (1797 images), /8 - 1, bilinear 8x8 -> 32x32",
        "denoiser_parameters": sum(p.numel() for p in denoiser.parameters()),
        "loss_per_tenth": [round(loss, 5) for loss in losses],
        "classifier_test_accuracy": round(classifier_test_accuracy, 4),
        "train_wall_seconds": round(wall_seconds, 1),
        "train_cpu_seconds": round(cpu_seconds, 1),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "git_sha": git_sha(),
    }
    save_fidelity_model(args.out, denoiser.unet, denoiser.conditioner, classifier, record)

    # The check samples what was saved (fp16 UNet weights), i.e. exactly what the benchmark loads.
    model = load_fidelity_model(args.out)
    check_labels = torch.arange(NUM_CLASSES).repeat_interleave(10)
    check_samples = sample_digits(model, check_labels, seeds=list(range(10_000, 10_000 + len(check_labels))))
    record["sample_accuracy_ddim25_cfg2"] = round(classifier_accuracy(model, check_samples, check_labels), 4)
    save_record(args.out, record)
    print(f"samples: {record['sample_accuracy_ddim25_cfg2']:.3f} of 100 DDIM-25 samples classified as their label")
    print(f"saved to {args.out} (training took {wall_seconds / 60:.1f} min wall, {cpu_seconds / 60:.1f} min CPU)")


if __name__ == "__main__":
    main()

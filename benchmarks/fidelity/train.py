"""Train a fidelity model on this CPU: an SDXL-shaped UNet denoiser and a classifier of its images.

    python -m benchmarks.fidelity.train                  # digits: one thread, ~22 min CPU; writes model/
    python -m benchmarks.fidelity.train --model scenes --steps 2000 --max-minutes 82 --resume
                                                         # scenes: at most ~90 min wall; writes scenes_model/
    python -m benchmarks.fidelity.train --model scenes --steps 50 --check-samples-per-class 1 \
        --out /tmp/scenes-model --checkpoint /tmp/scenes.pt                                # a smoke run

What it does (see ``model.py`` for the architectures and data, ``scenes.py`` for the scenes):

1. a small CNN classifier: digits on 80% of the upsampled digits (random shifts and noise as
   augmentation, so it also reads generated digits), scored on the other 20%; scenes on freshly drawn
   training scenes (noise as augmentation), scored on 1000 held-out scenes;
2. the UNet and the label conditioner together as an epsilon-prediction denoiser: DDPM noising
   (diffusers' DDPMScheduler, linear betas, 1000 steps), uniform timesteps, MSE on the noise, the
   label dropped to the null label 10% of the time so classifier-free guidance works; AdamW with
   warm-up and cosine decay; the saved weights are an exponential moving average;
3. a check of what was saved (the UNet in fp16): 10 samples per class (DDIM 25 steps, CFG 2) scored
   by the classifier.

Seeded and single-threaded, so a rerun on the same machine and versions gives the same weights.

Interruptions: every ``--checkpoint-minutes`` (and when it stops) the whole training state (UNet and
conditioner, EMA, optimiser, step, losses, the data generator's and torch's RNG states, the trained
classifier) goes to ``checkpoints/<model>.pt`` (ignored by git). ``--resume`` continues from it with
the same loss sequence as an uninterrupted run. ``--max-minutes`` bounds this invocation's wall time:
when it runs out, training stops at a checkpoint and the model is written as it stands (its record says
so); ``--resume`` later finishes the schedule. The record (settings, losses, wall and CPU time over all
invocations, scores, versions, git SHA) goes to ``training.json`` beside the weights.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel

from benchmarks.common import git_sha

from . import scenes
from .model import (
    CHECKPOINT_DIR,
    IMAGE_SIZE,
    MODELS,
    ImageClassifier,
    LabelConditioner,
    ModelSpec,
    classifier_split,
    load_digit_images,
    load_fidelity_model,
    reference_images,
    save_fidelity_model,
    save_record,
    scheduler_config,
    unet_config,
)
from .sampling import classifier_accuracy, sample_images

# Settings that only say how this invocation runs; any other setting differing from a checkpoint's
# would change the training, so --resume refuses it.
RUN_ONLY_SETTINGS = ("resume", "max_minutes", "checkpoint_minutes", "threads", "out", "checkpoint",
                     "check_samples_per_class")


def shifted(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by up to ``max_shift`` pixels in x and y, the border filled with background (-1)."""
    size = images.shape[-1]
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + size, dx:dx + size] for i, (dy, dx) in enumerate(offsets)])


def with_random_noise(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Noise of a random strength up to 0.3: generated images keep some grain, real ones have none.
    noise_scale = 0.3 * torch.rand(len(images), 1, 1, 1, generator=generator)
    return images + noise_scale * torch.randn(images.shape, generator=generator)


def train_digit_classifier(spec: ModelSpec, args, generator) -> tuple[ImageClassifier, float]:
    """The classifier, trained on a seeded 80% split; returns it with its accuracy on the other 20%."""
    images, labels = load_digit_images()
    train, test = classifier_split(len(images), generator)
    classifier = ImageClassifier(spec)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=2e-3)
    for epoch in range(args.classifier_epochs):
        for batch in torch.randperm(len(train), generator=generator).split(64):
            batch_images = with_random_noise(shifted(images[train[batch]], 2, generator), generator)
            loss = F.cross_entropy(classifier(batch_images), labels[train[batch]])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    classifier.eval()
    with torch.no_grad():
        accuracy = (classifier(images[test]).argmax(1) == labels[test]).float().mean().item()
    return classifier, accuracy


def training_scene_seeds(count: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, scenes.HELD_OUT_FIRST_SEED, (count,), generator=generator)


def train_scene_classifier(spec: ModelSpec, args, generator) -> tuple[ImageClassifier, float]:
    """The classifier, trained on fresh scenes; returns it with its accuracy on 1000 held-out scenes."""
    classifier = ImageClassifier(spec)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=2e-3)
    # Fresh scenes never repeat, so the rate can decay to zero without overfitting: a constant 2e-3
    # left it at 70% held-out accuracy after 1000 steps.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.classifier_steps)
    for step in range(args.classifier_steps):
        images, labels, _ = scenes.render_scenes(training_scene_seeds(64, generator).tolist(), IMAGE_SIZE)
        loss = F.cross_entropy(classifier(with_random_noise(images, generator)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    classifier.eval()
    images, labels, _ = reference_images(spec)
    with torch.no_grad():
        accuracy = (classifier(images).argmax(1) == labels).float().mean().item()
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

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.unet = UNet2DConditionModel.from_config(unet_config(spec))
        self.conditioner = LabelConditioner(spec)

    def forward(self, noisy, timesteps, labels):
        return self.unet(noisy, timesteps, encoder_hidden_states=self.conditioner(labels)).sample


def learning_rate(step: int, args) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


class DenoiserTraining:
    """The denoiser phase: all of its state, one optimiser step at a time, and its checkpoint.

    ``generator`` draws everything random in a step (the batch, label dropout, noise, timesteps), so
    its state plus the modules' and the optimiser's is all a resumed run needs to continue exactly.
    """

    def __init__(self, spec: ModelSpec, args, generator: torch.Generator):
        self.spec, self.args, self.generator = spec, args, generator
        self.denoiser = Denoiser(spec).train()
        self.ema = EMA(self.denoiser, args.ema_decay)
        self.noising = DDPMScheduler.from_config(scheduler_config())
        self.optimizer = torch.optim.AdamW(self.denoiser.parameters(), lr=args.lr, weight_decay=0.0)
        self.step = 0
        self.step_losses: list[float] = []
        if spec.name == "digits":
            self.digit_images, self.digit_labels = load_digit_images()

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.spec.name == "digits":
            index = torch.randint(len(self.digit_images), (self.args.batch_size,), generator=self.generator)
            return self.digit_images[index], self.digit_labels[index].clone()
        seeds = training_scene_seeds(self.args.batch_size, self.generator).tolist()
        images, labels, _ = scenes.render_scenes(seeds, IMAGE_SIZE)
        return images, labels

    def train_step(self) -> float:
        args = self.args
        clean, labels = self.batch()
        dropped = torch.rand(args.batch_size, generator=self.generator) < args.label_dropout
        labels[dropped] = self.spec.null_label
        noise = torch.randn(clean.shape, generator=self.generator)
        timesteps = torch.randint(0, self.noising.config.num_train_timesteps, (args.batch_size,),
                                  generator=self.generator)
        loss = F.mse_loss(self.denoiser(self.noising.add_noise(clean, noise, timesteps), timesteps, labels), noise)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, args)
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.denoiser.parameters(), 1.0)
        self.optimizer.step()
        self.ema.update(self.denoiser)
        self.step += 1
        self.step_losses.append(loss.item())
        return self.step_losses[-1]

    def state_dict(self) -> dict:
        return {
            "denoiser": self.denoiser.state_dict(),
            "ema": self.ema.average.state_dict(),
            "ema_updates": self.ema.updates,
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "step_losses": list(self.step_losses),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.denoiser.load_state_dict(state["denoiser"])
        self.ema.average.load_state_dict(state["ema"])
        self.ema.updates = state["ema_updates"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.step_losses = list(state["step_losses"])
        self.generator.set_state(state["generator"])


def save_checkpoint(path: Path, training: DenoiserTraining, extra: dict) -> None:
    """The training state plus ``extra`` (classifier, settings, time spent), written atomically so an
    interruption mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(training.state_dict() | {"torch_rng": torch.get_rng_state()} | extra, partial)
    os.replace(partial, path)


def restore_training(spec: ModelSpec, args, path: Path) -> tuple[DenoiserTraining, dict]:
    """The training saved at ``path``, ready to continue, and the checkpoint's other entries; exits
    with a message when ``args`` would train differently from the checkpoint's settings."""
    state = torch.load(path, weights_only=True)
    changed = {name: (state["settings"].get(name), value) for name, value in training_settings(args).items()
               if state["settings"].get(name) != value}
    if changed:
        raise SystemExit(f"{path} was trained with other settings (checkpoint, now): {changed}; "
                         "drop --resume to start afresh, or resume with the checkpoint's settings")
    training = DenoiserTraining(spec, args, torch.Generator())  # its fresh weights are overwritten next
    training.load_state_dict(state)
    torch.set_rng_state(state["torch_rng"])
    return training, state


def training_settings(args) -> dict:
    return {name: value for name, value in vars(args).items() if name not in RUN_ONLY_SETTINGS}


def loss_per_tenth(step_losses: list[float]) -> list[float]:
    """Mean loss over each tenth of the steps run (the last tenth takes the remainder)."""
    size = max(1, len(step_losses) // 10)
    chunks = [step_losses[start:start + size] for start in range(0, size * 9, size)] + [step_losses[size * 9:]]
    return [round(sum(chunk) / len(chunk), 5) for chunk in chunks if chunk]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="digits")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps of the denoiser")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--label-dropout", type=float, default=0.1, help="share of labels replaced by the null label")
    parser.add_argument("--classifier-epochs", type=int, default=30, help="digits: passes over the 80%% split")
    parser.add_argument("--classifier-steps", type=int, default=2000, help="scenes: batches of 64 fresh scenes")
    parser.add_argument("--check-samples-per-class", type=int, default=10,
                        help="samples per label of the final check (DDIM 25, CFG 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--out", default=None, help="where the model goes (default: the model's folder)")
    parser.add_argument("--checkpoint", default=None, help="training state file (default: checkpoints/<model>.pt)")
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0, help="wall time between checkpoints")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="wall-time budget of this invocation; at its end training stops and the model is written")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint when there is one")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    spec = MODELS[args.model]
    out = Path(args.out) if args.out else spec.directory
    checkpoint = Path(args.checkpoint) if args.checkpoint else CHECKPOINT_DIR / f"{spec.name}.pt"
    torch.set_num_threads(args.threads)
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    deadline = wall_start + 60 * args.max_minutes if args.max_minutes else math.inf

    if args.resume and checkpoint.exists():
        training, state = restore_training(spec, args, checkpoint)
        classifier = ImageClassifier(spec)
        classifier.load_state_dict(state["classifier"])
        classifier_test_accuracy = state["classifier_test_accuracy"]
        spent_wall, spent_cpu, invocations = state["wall_seconds"], state["cpu_seconds"], state["invocations"] + 1
        print(f"resumed from {checkpoint} at step {training.step}/{args.steps}")
    else:
        # Global seed first: the classifier's and the UNet's initial weights come from torch's generator.
        torch.manual_seed(args.seed)
        generator = torch.Generator().manual_seed(args.seed)
        train_classifier = train_digit_classifier if spec.name == "digits" else train_scene_classifier
        classifier, classifier_test_accuracy = train_classifier(spec, args, generator)
        print(f"classifier: {classifier_test_accuracy:.3f} accuracy on held-out {spec.name} "
              f"({time.perf_counter() - wall_start:.0f} s)")
        training = DenoiserTraining(spec, args, generator)
        spent_wall, spent_cpu, invocations = 0.0, 0.0, 1

    def checkpoint_now() -> None:
        save_checkpoint(checkpoint, training, {
            "classifier": classifier.state_dict(),
            "classifier_test_accuracy": classifier_test_accuracy,
            "settings": training_settings(args),
            "wall_seconds": spent_wall + time.perf_counter() - wall_start,
            "cpu_seconds": spent_cpu + time.process_time() - cpu_start,
            "invocations": invocations,
        })

    print(f"denoiser: {args.steps} steps of batch {args.batch_size}; checkpoints to {checkpoint}")
    last_checkpoint = time.perf_counter()
    report_every = max(1, args.steps // 20)
    while training.step < args.steps and time.perf_counter() < deadline:
        training.train_step()
        if training.step % report_every == 0 or training.step == args.steps:
            recent = training.step_losses[-report_every:]
            print(f"  step {training.step:5d}/{args.steps}  loss {sum(recent) / len(recent):.4f}  "
                  f"{time.perf_counter() - wall_start:7.1f} s", flush=True)
        if time.perf_counter() - last_checkpoint > 60 * args.checkpoint_minutes:
            checkpoint_now()
            last_checkpoint = time.perf_counter()
    checkpoint_now()
    stopped_early = training.step < args.steps
    if stopped_early:
        print(f"time budget spent at step {training.step}/{args.steps}: writing the model as it stands; "
              f"rerun with --resume to finish")
    wall_seconds = spent_wall + time.perf_counter() - wall_start
    cpu_seconds = spent_cpu + time.process_time() - cpu_start

    record = {
        "model": spec.name,
        "settings": training_settings(args),
        "data": spec.data,
        "steps_done": training.step,
        "stopped_by_time_budget": stopped_early,
        "invocations": invocations,
        "denoiser_parameters": sum(p.numel() for p in training.ema.average.parameters()),
        "loss_per_tenth": loss_per_tenth(training.step_losses),
        "classifier_test_accuracy": round(classifier_test_accuracy, 4),
        "train_wall_seconds": round(wall_seconds, 1),
        "train_cpu_seconds": round(cpu_seconds, 1),
        "threads": args.threads,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "git_sha": git_sha(),
    }
    save_fidelity_model(out, training.ema.average.unet, training.ema.average.conditioner, classifier, record)

    # The check samples what was saved (fp16 UNet weights), i.e. exactly what the benchmark loads.
    model = load_fidelity_model(out)
    check_labels = torch.arange(spec.num_classes).repeat_interleave(args.check_samples_per_class)
    check_samples = sample_images(model, check_labels, seeds=list(range(10_000, 10_000 + len(check_labels))))
    record["sample_accuracy_samples"] = len(check_labels)
    record["sample_accuracy_ddim25_cfg2"] = round(classifier_accuracy(model, check_samples, check_labels), 4)
    save_record(out, record)
    print(f"samples: {record['sample_accuracy_ddim25_cfg2']:.3f} of {len(check_labels)} DDIM-25 samples "
          f"classified as their label")
    print(f"saved to {out} (training took {wall_seconds / 60:.1f} min wall, {cpu_seconds / 60:.1f} min CPU)")


if __name__ == "__main__":
    main()

"""The fidelity model: an SDXL-shaped UNet denoiser of digits, its label conditioning and a digit classifier.

Random weights attend almost uniformly, so they cannot tell a good token ranking from a bad one. This
module defines a model small enough to train on one CPU thread whose attention is learned (how peaked
it became is measured in benchmarks/RESULTS.md):

* data: scikit-learn's 8x8 digits (1797 images, no download), scaled to [-1, 1] and upsampled
  bilinearly to 32x32, one channel. The image is the "latent" (no VAE), so its 32x32 grid gives SDXL's
  three levels 32x32 / 16x16 / 8x8: 256 tokens at level 2 and 64 at level 3.
* ``unet_config()``: SDXL-base's own config (shipped with atedm) with small widths. Same block types
  (DownBlock2D, CrossAttnDownBlock2D x2, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D x2, UpBlock2D),
  layers_per_block 2, linear projections, so the four DSAP blocks of SDXL exist; 2 transformer layers
  per block at level 2 and 3 at level 3, so every block prunes after its first layer and later layers
  run pruned. No text-time embedding (``addition_embed_type=None``).
* ``LabelConditioner``: the class label as cross-attention context, a learned embedding giving
  ``CONTEXT_TOKENS`` tokens. Label ``NULL_LABEL`` is the empty condition of classifier-free guidance
  (trained with label dropout).
* ``DigitClassifier``: a small CNN on the 32x32 images; its logits score sample accuracy and its
  penultimate features the Frechet distance to real digits.

Everything is saved under ``MODEL_DIR`` as safetensors plus JSON (``save_fidelity_model``) and read back
with ``load_fidelity_model``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn

from atedm.unets import default_unet_config

MODEL_DIR = Path(__file__).resolve().parent / "model"
IMAGE_SIZE = 32
NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES  # the unconditional "label" of classifier-free guidance
CONTEXT_TOKENS = 4
CROSS_ATTENTION_DIM = 64
CLASSIFIER_FEATURES = 64


def unet_config() -> dict:
    """SDXL-base's UNet config with small widths; every structural field stays SDXL's."""
    config = default_unet_config()
    config.update(
        in_channels=1,
        out_channels=1,
        sample_size=IMAGE_SIZE,
        block_out_channels=[16, 32, 64],
        # diffusers reads SDXL's "attention_head_dim" as the number of heads: heads of width 32 at both
        # levels (1 at level 2, 2 at level 3). Width-16 heads kept near-uniform maps in a 600-step pilot
        # (row entropy above 0.96 of uniform's); width 32 sharpened level 3 (per-head 0.87-0.92), not
        # level 2 (0.97-0.99; see benchmarks/RESULTS.md).
        attention_head_dim=[1, 1, 2],
        transformer_layers_per_block=[1, 2, 3],
        cross_attention_dim=CROSS_ATTENTION_DIM,
        # 16 channels at level 1 cannot form SDXL's 32 groups.
        norm_num_groups=8,
        addition_embed_type=None,
        addition_time_embed_dim=None,
        projection_class_embeddings_input_dim=None,
    )
    return config


def scheduler_config() -> dict:
    """The noising process of training: DDPM's linear betas over 1000 steps, epsilon prediction."""
    return dict(DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon").config)


def load_digit_images(image_size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All of scikit-learn's digits as (1797, 1, size, size) floats in [-1, 1] and their int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # pixel values 0..16
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images, torch.tensor(digits.target, dtype=torch.int64)


def classifier_split(num_images: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) indices, 80 / 20. Training draws it first from its freshly seeded generator, so
    ``classifier_split(n, torch.Generator().manual_seed(seed))`` gives the held-out digits again."""
    order = torch.randperm(num_images, generator=generator)
    num_held_out = num_images // 5
    return order[num_held_out:], order[:num_held_out]


class LabelConditioner(nn.Module):
    """Class label -> ``CONTEXT_TOKENS`` cross-attention tokens (the SDXL text encoder's stand-in)."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(NUM_CLASSES + 1, CONTEXT_TOKENS * CROSS_ATTENTION_DIM)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(labels).view(labels.shape[0], CONTEXT_TOKENS, CROSS_ATTENTION_DIM)


class DigitClassifier(nn.Module):
    """Three conv stages and a global average: ``features`` (B, 64) for Frechet distance, ``forward`` logits."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, CLASSIFIER_FEATURES, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(CLASSIFIER_FEATURES, NUM_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


@dataclass
class FidelityModel:
    """The trained pieces, in eval mode on the CPU, plus the record of how they were trained."""

    unet: UNet2DConditionModel
    conditioner: LabelConditioner
    classifier: DigitClassifier
    scheduler_config: dict
    record: dict

    def context(self, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.conditioner(labels)


def save_fidelity_model(directory: Path, unet: UNet2DConditionModel, conditioner: LabelConditioner,
                        classifier: DigitClassifier, record: dict) -> None:
    """Write the UNet (diffusers layout), conditioner and classifier as safetensors, and the record as JSON."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # fp16 halves the file (5 MB); the rounding is far below what the benchmark measures, and the
    # benchmark and tests load these rounded weights, so they are the model.
    unet.save_config(directory / "unet")
    save_file({name: t.to(torch.float16).contiguous() for name, t in unet.state_dict().items()},
              directory / "unet" / "diffusion_pytorch_model.safetensors")
    DDPMScheduler.from_config(scheduler_config()).save_pretrained(directory / "scheduler")
    for name, module in (("conditioner", conditioner), ("classifier", classifier)):
        save_file({key: t.contiguous() for key, t in module.state_dict().items()}, directory / f"{name}.safetensors")
    save_record(directory, record)


def save_record(directory: Path, record: dict) -> None:
    (Path(directory) / "training.json").write_text(json.dumps(record, indent=1) + "\n")


def load_fidelity_model(directory: Path | str = MODEL_DIR) -> FidelityModel:
    """Read what ``save_fidelity_model`` wrote; raises FileNotFoundError naming the training command."""
    directory = Path(directory)
    if not (directory / "training.json").exists():
        raise FileNotFoundError(f"no fidelity model in {directory}; train it with python -m benchmarks.fidelity.train")
    unet = UNet2DConditionModel.from_pretrained(directory / "unet", torch_dtype=torch.float32,
                                                low_cpu_mem_usage=False).eval()
    conditioner = LabelConditioner()
    conditioner.load_state_dict(load_file(directory / "conditioner.safetensors"))
    classifier = DigitClassifier()
    classifier.load_state_dict(load_file(directory / "classifier.safetensors"))
    scheduler = DDPMScheduler.from_pretrained(directory / "scheduler")
    record = json.loads((directory / "training.json").read_text())
    return FidelityModel(unet, conditioner.eval(), classifier.eval(), dict(scheduler.config), record)

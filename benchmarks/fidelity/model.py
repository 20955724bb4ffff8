"""The fidelity models: SDXL-shaped UNet denoisers, their label conditioning and their classifiers.

Random weights attend almost uniformly, so they cannot tell a good token ranking from a bad one. This
module defines two models small enough to train on a CPU, whose attention is learned (how peaked it
became is measured in benchmarks/RESULTS.md). Each is a ``ModelSpec`` (``MODELS``):

* ``digits`` (``DIGITS``, saved in ``model/``): scikit-learn's 8x8 digits (1797 images, no
  download), scaled to [-1, 1] and upsampled bilinearly to 32x32, one channel; 10 labels. Its
  attention stayed near-uniform at the 256-token level.
* ``scenes`` (``SCENES``, saved in ``scenes_model/``): procedural colour scenes (``scenes.py``),
  3 channels at 32x32, labelled by the foreground object's shape and colour (16 labels); wider
  channels and two heads at both attention levels, so that tokens can attend to their object.

Common to both:

* the image is the "latent" (no VAE), so its 32x32 grid gives SDXL's three levels 32x32 / 16x16 /
  8x8: 256 tokens at level 2 and 64 at level 3.
* ``unet_config(spec)``: SDXL-base's own config (shipped with atedm) with small widths. Same block
  types (DownBlock2D, CrossAttnDownBlock2D x2, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D x2,
  UpBlock2D), layers_per_block 2, linear projections, so the four DSAP blocks of SDXL exist; 2
  transformer layers per block at level 2 and 3 at level 3, so every block prunes after its first
  layer and later layers run pruned. No text-time embedding (``addition_embed_type=None``).
* ``LabelConditioner``: the class label as cross-attention context, a learned embedding giving
  ``context_tokens`` tokens. Label ``spec.null_label`` is the empty condition of classifier-free
  guidance (trained with label dropout).
* ``ImageClassifier``: a small CNN on the 32x32 images; its logits score sample accuracy and its
  penultimate features the Frechet distance to real images.

Everything is saved under ``spec.directory`` as safetensors plus JSON (``save_fidelity_model``) and
read back with ``load_fidelity_model``; the record names its model (the digits record predates the
field, so a record without one is the digits model's).
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

from . import scenes

FIDELITY_DIR = Path(__file__).resolve().parent
IMAGE_SIZE = 32
CHECKPOINT_DIR = FIDELITY_DIR / "checkpoints"  # ignored by git: training state for --resume


@dataclass(frozen=True)
class ModelSpec:
    """What differs between the fidelity models; everything else is shared."""

    name: str
    directory: Path
    image_channels: int
    num_classes: int
    block_out_channels: tuple[int, ...]
    # diffusers reads SDXL's "attention_head_dim" as the number of heads per level.
    heads: tuple[int, ...]
    classifier_widths: tuple[int, ...]
    data: str
    context_tokens: int = 4
    cross_attention_dim: int = 64

    @property
    def null_label(self) -> int:
        """The unconditional "label" of classifier-free guidance."""
        return self.num_classes


DIGITS = ModelSpec(
    name="digits",
    directory=FIDELITY_DIR / "model",
    image_channels=1,
    num_classes=10,
    block_out_channels=(16, 32, 64),
    # Heads of width 32 at both levels (1 at level 2, 2 at level 3). Width-16 heads kept near-uniform
    # maps in a 600-step pilot (row entropy above 0.96 of uniform's); width 32 sharpened level 3
    # (per-head 0.87-0.92), not level 2 (0.97-0.99; see benchmarks/RESULTS.md).
    heads=(1, 1, 2),
    classifier_widths=(16, 32, 64),
    data="sklearn load_digits (1797 images), /8 - 1, bilinear 8x8 -> 32x32",
)
SCENES = ModelSpec(
    name="scenes",
    directory=FIDELITY_DIR / "scenes_model",
    image_channels=3,
    num_classes=scenes.NUM_CLASSES,
    # Heads stay 32 wide (the width that sharpened the digits model's level 3), two of them at each
    # pruned level so a block can attend both to its object and to its surroundings. Widths 32/64/96
    # or 32/64/128 cost 1.3x / 1.8x the step time for 1.7x / 2.6x the parameters, which would leave
    # too few steps in a 90-minute CPU budget.
    block_out_channels=(32, 64, 64),
    heads=(1, 2, 2),
    classifier_widths=(32, 64, 64),
    data=("procedural colour scenes (benchmarks/fidelity/scenes.py), drawn fresh from seeds < 2**31; "
          "label = shape x colour of the foreground object (16 classes)"),
)
MODELS = {spec.name: spec for spec in (DIGITS, SCENES)}
MODEL_DIR = DIGITS.directory


def unet_config(spec: ModelSpec = DIGITS) -> dict:
    """SDXL-base's UNet config with small widths; every structural field stays SDXL's."""
    config = default_unet_config()
    config.update(
        in_channels=spec.image_channels,
        out_channels=spec.image_channels,
        sample_size=IMAGE_SIZE,
        block_out_channels=list(spec.block_out_channels),
        attention_head_dim=list(spec.heads),
        transformer_layers_per_block=[1, 2, 3],
        cross_attention_dim=spec.cross_attention_dim,
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


def reference_images(spec: ModelSpec, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Real images of the model's data with labels and a foreground map (> 0 on the object: a digit's
    strokes, a scene's label object), for the Frechet distance and the attention probes. Digits: all
    of them (the first ``count``); scenes: ``count`` (default 1000) held-out scenes."""
    if spec.name == "digits":
        images, labels = load_digit_images()
        images, labels = images[:count], labels[:count]
        return images, labels, images
    images, labels, masks = scenes.render_scenes(scenes.held_out_seeds(count or 1000), IMAGE_SIZE)
    return images, labels, masks.unsqueeze(1).float() * 2.0 - 1.0


class LabelConditioner(nn.Module):
    """Class label -> ``context_tokens`` cross-attention tokens (the SDXL text encoder's stand-in)."""

    def __init__(self, spec: ModelSpec = DIGITS):
        super().__init__()
        self.context_tokens, self.dim = spec.context_tokens, spec.cross_attention_dim
        self.embedding = nn.Embedding(spec.num_classes + 1, spec.context_tokens * spec.cross_attention_dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(labels).view(labels.shape[0], self.context_tokens, self.dim)


class ImageClassifier(nn.Module):
    """Three conv stages and a global average: ``features`` (B, widths[-1]) for Frechet distance,
    ``forward`` logits."""

    def __init__(self, spec: ModelSpec = DIGITS):
        super().__init__()
        first, second, third = spec.classifier_widths
        self.trunk = nn.Sequential(
            nn.Conv2d(spec.image_channels, first, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(first, second, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(second, third, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(third, spec.num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


@dataclass
class FidelityModel:
    """The trained pieces, in eval mode on the CPU, plus the record of how they were trained."""

    unet: UNet2DConditionModel
    conditioner: LabelConditioner
    classifier: ImageClassifier
    scheduler_config: dict
    record: dict
    spec: ModelSpec = DIGITS

    def context(self, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.conditioner(labels)


def save_fidelity_model(directory: Path, unet: UNet2DConditionModel, conditioner: LabelConditioner,
                        classifier: ImageClassifier, record: dict) -> None:
    """Write the UNet (diffusers layout), conditioner and classifier as safetensors, and the record as JSON."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # fp16 halves the file (5 MB for digits, 8 MB for scenes); the rounding is far below what the
    # benchmark measures, and the benchmark and tests load these rounded weights, so they are the model.
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
    record = json.loads((directory / "training.json").read_text())
    spec = MODELS[record.get("model", DIGITS.name)]
    unet = UNet2DConditionModel.from_pretrained(directory / "unet", torch_dtype=torch.float32,
                                                low_cpu_mem_usage=False).eval()
    conditioner = LabelConditioner(spec)
    conditioner.load_state_dict(load_file(directory / "conditioner.safetensors"))
    classifier = ImageClassifier(spec)
    classifier.load_state_dict(load_file(directory / "classifier.safetensors"))
    scheduler = DDPMScheduler.from_pretrained(directory / "scheduler")
    return FidelityModel(unet, conditioner.eval(), classifier.eval(), dict(scheduler.config), record, spec)

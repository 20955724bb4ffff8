"""Procedural colour scenes for the second fidelity model: objects in front of a textured background.

Why: the digits model's images are mostly flat areas, and its attention stayed near-uniform. A scene of
distinctly coloured objects gives a token something to attend to (the other tokens of its object).

Each scene is drawn from its own seed (``render_scene(seed)``), so a scene never depends on what else
is in its batch, and training can draw fresh scenes on the fly:

* background, one of three kinds in muted colours (every channel in [-0.8, 0.2]): a linear gradient
  between two colours at a random angle, stripes of two colours (random period and angle), or smooth
  noise (a bilinearly upsampled 4x4 grid) with per-pixel grain;
* 2 to 4 distractor objects of half-size 2.5-5 px, in saturated colours distinct from each other and
  from the foreground's, anywhere (they may be clipped at the border);
* the foreground object, half-size 6.5-9.5 px, wholly inside the image and drawn last, so it occludes
  whatever it overlaps and is never occluded itself.

Objects are circles, squares, triangles and bars (horizontal or vertical, 3:1), with hard edges so that
every pixel of an object holds exactly its colour. The label is the foreground's (shape, colour):
``label = shape * len(LABEL_COLOURS) + colour``, 16 classes. Training scenes come from seeds below
``HELD_OUT_FIRST_SEED``; held-out scenes (the classifier's test set, the benchmark's probes) from
seeds at and above it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SHAPES = ("circle", "square", "triangle", "bar")
# Saturated colours in [-1, 1] RGB; the first four are the label colours, all eight serve distractors.
PALETTE = {
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
    "cyan": (-1.0, 1.0, 1.0),
    "magenta": (1.0, -1.0, 1.0),
    "orange": (1.0, 0.0, -1.0),
    "white": (1.0, 1.0, 1.0),
}
LABEL_COLOURS = tuple(PALETTE)[:4]
NUM_CLASSES = len(SHAPES) * len(LABEL_COLOURS)
BACKGROUNDS = ("gradient", "stripes", "noise")
HELD_OUT_FIRST_SEED = 2**31
FOREGROUND_HALF_SIZE = (6.5, 9.5)
DISTRACTOR_HALF_SIZE = (2.5, 5.0)
BAR_ASPECT = 3.0


@dataclass(frozen=True)
class Scene:
    image: torch.Tensor  # (3, size, size) in [-1, 1]
    label: int
    label_mask: torch.Tensor  # (size, size) bool: the pixels of the foreground object
    shape: str
    colour: str
    background: str


def label_of(shape: str, colour: str) -> int:
    return SHAPES.index(shape) * len(LABEL_COLOURS) + LABEL_COLOURS.index(colour)


def shape_mask(shape: str, centre_y: float, centre_x: float, half_size: float, vertical: bool,
               size: int) -> torch.Tensor:
    """(size, size) bool mask of one object, tested at pixel centres (hard edges: exact colours)."""
    coordinates = torch.arange(size, dtype=torch.float32) + 0.5
    dy = coordinates.view(-1, 1) - centre_y
    dx = coordinates.view(1, -1) - centre_x
    if shape == "circle":
        return dx.square() + dy.square() <= half_size**2
    if shape == "square":
        # 0.9 of the half-size: a square of the same half-size as a circle would cover 27% more area.
        return (dx.abs() <= 0.9 * half_size) & (dy.abs() <= 0.9 * half_size)
    if shape == "triangle":  # apex up, base as wide as it is tall
        return (dy >= -half_size) & (dy <= half_size) & (dx.abs() <= (dy + half_size) / 2)
    if shape == "bar":
        long, short = (dy, dx) if vertical else (dx, dy)
        return (long.abs() <= half_size) & (short.abs() <= half_size / BAR_ASPECT)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _choice(generator: torch.Generator, count: int) -> int:
    return int(torch.randint(count, (), generator=generator))


def _background(kind: str, size: int, generator: torch.Generator) -> torch.Tensor:
    def muted_colour():
        return (-0.8 + torch.rand(3, generator=generator)).view(3, 1, 1)

    if kind == "noise":
        coarse = -0.8 + torch.rand(1, 3, 4, 4, generator=generator)
        smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0]
        return (smooth + 0.08 * torch.randn(3, size, size, generator=generator)).clamp(-1.0, 1.0)
    first, second = muted_colour(), muted_colour()
    angle = _uniform(generator, 0.0, math.pi)
    coordinates = torch.arange(size, dtype=torch.float32) + 0.5
    along = math.cos(angle) * coordinates.view(1, -1) + math.sin(angle) * coordinates.view(-1, 1)
    if kind == "gradient":
        weight = (along - along.min()) / (along.max() - along.min())
    else:  # stripes
        period = _uniform(generator, 4.0, 10.0)
        weight = (torch.sin(2 * math.pi * along / period) > 0).float()
    return first + (second - first) * weight


def render_scene(seed: int, size: int = 32) -> Scene:
    """The scene of ``seed`` (module docstring); the same seed always gives the same scene."""
    generator = torch.Generator().manual_seed(seed)
    background = BACKGROUNDS[_choice(generator, len(BACKGROUNDS))]
    image = _background(background, size, generator)

    shape = SHAPES[_choice(generator, len(SHAPES))]
    colour = LABEL_COLOURS[_choice(generator, len(LABEL_COLOURS))]
    other_colours = [name for name in PALETTE if name != colour]
    distractor_colours = torch.randperm(len(other_colours), generator=generator).tolist()
    for index in range(2 + _choice(generator, 3)):
        mask = shape_mask(SHAPES[_choice(generator, len(SHAPES))], _uniform(generator, 0, size),
                          _uniform(generator, 0, size), _uniform(generator, *DISTRACTOR_HALF_SIZE),
                          bool(_choice(generator, 2)), size)
        image[:, mask] = torch.tensor(PALETTE[other_colours[distractor_colours[index]]]).view(3, 1)

    half_size = _uniform(generator, *FOREGROUND_HALF_SIZE)
    margin = half_size + 1.0  # the whole foreground inside the image, so its shape is all visible
    label_mask = shape_mask(shape, _uniform(generator, margin, size - margin), _uniform(generator, margin, size - margin),
                            half_size, bool(_choice(generator, 2)), size)
    image[:, label_mask] = torch.tensor(PALETTE[colour]).view(3, 1)
    return Scene(image, label_of(shape, colour), label_mask, shape, colour, background)


def render_scenes(seeds, size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, 3, size, size) images, (B,) int64 labels and (B, size, size) foreground masks of ``seeds``."""
    scenes = [render_scene(int(seed), size) for seed in seeds]
    return (torch.stack([scene.image for scene in scenes]), torch.tensor([scene.label for scene in scenes]),
            torch.stack([scene.label_mask for scene in scenes]))


def held_out_seeds(count: int, offset: int = 0) -> list[int]:
    """Seeds of scenes that training never draws."""
    return [HELD_OUT_FIRST_SEED + offset + i for i in range(count)]

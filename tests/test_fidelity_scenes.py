"""The second fidelity model's code (benchmarks/fidelity/scenes.py, model.py, train.py): its scenes are
a pure function of their seed and carry their label in their pixels, and its training resumes from a
checkpoint exactly where an uninterrupted run would be.

CPU-cheap (the training test takes a few 2-image steps of the real scenes UNet); the trained model
itself is checked by the benchmark, not here.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.fidelity import scenes
from benchmarks.fidelity.model import IMAGE_SIZE, SCENES, unet_config
from benchmarks.fidelity.train import (DenoiserTraining, build_parser, restore_training, save_checkpoint,
                                       training_settings)

SEEDS = list(range(100, 164))


# One thread: small matmuls on a busy machine run faster, and the loss sequence is reproducible (conftest).
pytestmark = pytest.mark.usefixtures("one_thread")


def test_scene_is_a_function_of_its_seed_alone():
    images, labels, masks = scenes.render_scenes(SEEDS, IMAGE_SIZE)
    again = scenes.render_scenes(list(reversed(SEEDS)), IMAGE_SIZE)
    for first, second in zip((images, labels, masks), again):
        assert torch.equal(first, second.flip(0))  # same seed, same scene, whatever the batch order
    assert images.shape == (len(SEEDS), 3, IMAGE_SIZE, IMAGE_SIZE) and images.abs().max() <= 1.0
    different = (images[:-1] != images[1:]).flatten(1).any(1)
    assert bool(different.all())


def _shape_from_mask(mask: torch.Tensor) -> str:
    """The shape a mask's bounding box shows: a bar is long, a square fills its box, a circle fills
    pi/4 of it and a triangle half."""
    rows, cols = mask.nonzero(as_tuple=True)
    height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
    fill = mask.sum().item() / (height * width)
    if max(height, width) >= 2 * min(height, width):
        return "bar"
    if fill > 0.95:
        return "square"
    return "circle" if fill > 0.68 else "triangle"


def test_label_is_the_object_in_the_mask():
    """The label object is exactly the pixels of its colour (distractors and background never take it),
    lies wholly inside the image, and its shape and colour give the label."""
    images, labels, masks = scenes.render_scenes(SEEDS, IMAGE_SIZE)
    for image, label, mask in zip(images, labels.tolist(), masks):
        shape_index, colour_index = divmod(label, len(scenes.LABEL_COLOURS))
        shape, colour = scenes.SHAPES[shape_index], scenes.LABEL_COLOURS[colour_index]
        has_colour = (image == torch.tensor(scenes.PALETTE[colour]).view(3, 1, 1)).all(0)
        assert torch.equal(has_colour, mask), (label, "the label colour off the object, or the object occluded")
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
        assert _shape_from_mask(mask) == shape
    assert set(labels.tolist()) == set(range(scenes.NUM_CLASSES))  # 64 scenes draw every one of the 16 labels


def _training_args(steps: int):
    return build_parser().parse_args(["--model", "scenes", "--steps", str(steps), "--batch-size", "2",
                                      "--warmup-steps", "2"])


def _fresh_training(args) -> DenoiserTraining:
    torch.manual_seed(0)
    return DenoiserTraining(SCENES, args, torch.Generator().manual_seed(0))


def test_saved_architecture_is_sdxl_shaped_with_more_heads_than_digits():
    config = unet_config(SCENES)
    assert config["in_channels"] == 3 and config["transformer_layers_per_block"] == [1, 2, 3]
    widths, heads = config["block_out_channels"], config["attention_head_dim"]
    assert [width // count for width, count in zip(widths[1:], heads[1:])] == [32, 32]  # head width 32
    assert heads[1:] == [2, 2]


def test_resumed_training_repeats_the_uninterrupted_run(tmp_path):
    """Two steps, a checkpoint, a fresh process's worth of objects (and a disturbed global RNG), two
    more steps: the same losses and weights as four steps in one go, to the bit."""
    args = _training_args(steps=4)
    uninterrupted = _fresh_training(args)
    for _ in range(4):
        uninterrupted.train_step()

    interrupted = _fresh_training(args)
    for _ in range(2):
        interrupted.train_step()
    checkpoint = tmp_path / "scenes.pt"
    save_checkpoint(checkpoint, interrupted, {"settings": training_settings(args)})
    del interrupted
    torch.manual_seed(12345)
    resumed, _ = restore_training(SCENES, args, checkpoint)
    assert resumed.step == 2
    for _ in range(2):
        resumed.train_step()

    assert resumed.step_losses == uninterrupted.step_losses
    assert len(set(resumed.step_losses)) == 4  # distinct batches, not one repeated
    for got, want in ((resumed.denoiser, uninterrupted.denoiser), (resumed.ema.average, uninterrupted.ema.average)):
        wanted = want.state_dict()
        for key, value in got.state_dict().items():
            assert torch.equal(value, wanted[key]), key


def test_resume_refuses_other_settings(tmp_path):
    args = _training_args(steps=4)
    training = _fresh_training(args)
    checkpoint = tmp_path / "scenes.pt"
    save_checkpoint(checkpoint, training, {"settings": training_settings(args)})
    with pytest.raises(SystemExit, match="lr"):
        restore_training(SCENES, build_parser().parse_args(["--model", "scenes", "--steps", "4", "--batch-size", "2",
                                                            "--warmup-steps", "2", "--lr", "2e-3"]), checkpoint)

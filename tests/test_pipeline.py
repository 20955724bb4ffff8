"""A real StableDiffusionXLPipeline (tiny random components): apply/remove on the pipeline, DSAP over a
whole generation with CFG batched, and the ``atedm generate`` command on a pipeline saved to disk."""

import numpy as np
import pytest
import torch
from PIL import Image

import atedm
from atedm.cli import main
from tiny_models import tiny_sdxl_pipeline

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    pipe = tiny_sdxl_pipeline()
    pipe.save_pretrained(folder / "pipeline")
    return pipe, folder / "pipeline"


def generate(pipe, steps=6, guidance=5.0):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def test_pipeline_apply_dsap_and_remove(saved_pipeline):
    pipe, _ = saved_pipeline
    expected = generate(pipe)
    atedm.apply(pipe, "c", dsap_fraction=0.5)
    pruned = generate(pipe)
    state = atedm.get_state(pipe)
    assert state.phase_calls == {"early": 3, "late": 3}  # one UNet call per step: CFG is batched
    assert state.blocks["down_blocks.1.attentions.0"].pruned_calls == 3  # a DSAP block: late steps only
    assert state.blocks["down_blocks.1.attentions.1"].pruned_calls == 6
    assert not np.array_equal(pruned, expected)
    atedm.remove(pipe)
    np.testing.assert_array_equal(generate(pipe), expected)


def test_guidance_one_runs_a_single_half(saved_pipeline):
    pipe, _ = saved_pipeline
    unpruned = generate(pipe, steps=3, guidance=1.0)
    atedm.apply(pipe, "c", cfg_mask_mode="per_sample", dsap_fraction=0.0)
    try:
        images = generate(pipe, steps=3, guidance=1.0)
        state = atedm.get_state(pipe)
        assert state.pruned_calls == 3 * len(state.blocks) == 33
    finally:
        atedm.remove(pipe)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    assert not np.array_equal(images, unpruned)


def _generate_command(folder, out, preset):
    main(["generate", "--model", str(folder), "--prompt", PROMPT, "--preset", preset, "--steps", "3",
          "--height", "32", "--width", "32", "--out", str(out)])
    with Image.open(out) as image:
        return np.asarray(image)


def test_generate_command_writes_the_preset_image(saved_pipeline, tmp_path, capsys):
    """The command's image is the one the same pipeline gives in-process with the same preset and seed,
    and differs from the unpruned one."""
    pipe, folder = saved_pipeline
    written = _generate_command(folder, tmp_path / "cat.png", "c")
    assert "saved" in capsys.readouterr().out and written.shape == (32, 32, 3)
    atedm.apply(pipe, "c")
    try:
        pipe.set_progress_bar_config(disable=True)
        expected = pipe(PROMPT, num_inference_steps=3, guidance_scale=7.0, height=32, width=32,
                        generator=torch.Generator().manual_seed(0)).images[0]
    finally:
        atedm.remove(pipe)
    np.testing.assert_array_equal(written, np.asarray(expected))
    assert not np.array_equal(written, _generate_command(folder, tmp_path / "full.png", "none"))


def test_several_images_per_prompt(saved_pipeline):
    pipe, _ = saved_pipeline
    pipe.set_progress_bar_config(disable=True)
    atedm.apply(pipe, "c", dsap_fraction=0.0)
    try:
        images = pipe(PROMPT, num_images_per_prompt=3, num_inference_steps=2, guidance_scale=5.0, height=32,
                      width=32, generator=torch.Generator().manual_seed(0), output_type="np").images
        assert atedm.get_state(pipe).pruned_calls == 2 * 11  # one batched call of 6 per step
    finally:
        atedm.remove(pipe)
    assert images.shape == (3, 32, 32, 3) and np.isfinite(images).all()

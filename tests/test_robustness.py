"""Inputs users throw at an accelerator: dtypes, NaN latents, other token-reduction patches, several
patched models in one process, img2img and inpainting pipelines."""

import numpy as np
import pytest
import torch

import atedm
from atedm_kernels import num_kept_tokens
from tiny_models import run_unet, tiny_sdxl_pipeline, tiny_sdxl_unet, unet_inputs
from tolerances import tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_unets_run_pruned(dtype):
    """The whole pruned path in half precision: at ratio 0 its error against the fp32 model is at most
    twice the unpatched half model's own (FlashAttention's criterion) plus the dtype's atol; at 0.63 every
    block keeps exactly k tokens and the output changes but stays finite."""
    unet = tiny_sdxl_unet()
    inputs = unet_inputs(batch=2)
    reference = run_unet(unet, inputs)
    unet = unet.to(dtype)
    inputs = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
    inputs["added_cond_kwargs"] = {k: v.to(dtype) for k, v in inputs["added_cond_kwargs"].items()}
    unpatched_error = (run_unet(unet, inputs).float() - reference).abs().max()
    atedm.apply(unet, prune_ratio=0.0, dsap_fraction=0.0)
    got = run_unet(unet, inputs)
    assert got.dtype == dtype and atedm.get_state(unet).pruned_calls == 11
    assert (got.float() - reference).abs().max() <= 2 * unpatched_error + tol(dtype)["atol"]
    atedm.apply(unet, prune_ratio=0.63, dsap_fraction=0.0)
    pruned = run_unet(unet, inputs)
    state = atedm.get_state(unet)
    grids = {1: 0, 2: 8 * 8, 3: 4 * 4}  # tokens per level at a 16x16 latent (level 1 has no attention)
    assert {name: block.kept_tokens for name, block in state.blocks.items()} == {
        name: (num_kept_tokens(grids[block.level], 0.63),) for name, block in state.blocks.items()}
    assert pruned.dtype == dtype and torch.isfinite(pruned).all() and not torch.equal(pruned, got)


def test_nan_latents_propagate_like_the_unpruned_model():
    """Deliberate: NaN in, NaN out, no exception. k depends on the grid only, never on the data, so
    non-finite scores still select exactly k tokens (NaN ranks first, as in torch.sort)."""
    unet = tiny_sdxl_unet()
    inputs = unet_inputs(batch=2)
    inputs["sample"][0, :, 3, 5] = float("nan")
    expected_nan = torch.isnan(run_unet(unet, inputs))
    atedm.apply(unet, "c", dsap_fraction=0.0)
    got = run_unet(unet, inputs)
    state = atedm.get_state(unet)
    assert state.pruned_calls == 11 and state.blocks["mid_block.attentions.0"].kept_tokens == (6,)
    assert torch.isnan(got[0]).any() and torch.isfinite(got[1]).all()  # the clean image stays clean
    assert expected_nan[0].any() and not expected_nan[1].any()


def test_tomesd_and_atedm_refuse_to_stack():
    import tomesd

    unet = tiny_sdxl_unet()
    tomesd.apply_patch(unet, ratio=0.5, max_downsample=2)
    with pytest.raises(ValueError, match="tomesd"):
        atedm.apply(unet)
    assert atedm.get_state(unet) is None
    tomesd.remove_patch(unet)
    atedm.apply(unet, dsap_fraction=0.0)  # fine once ToMe is gone
    tomesd.apply_patch(unet, ratio=0.5, max_downsample=2)  # ToMe patched on top of AT-EDM
    inputs = unet_inputs(batch=2)
    sample, timestep = inputs.pop("sample"), inputs.pop("timestep")
    with pytest.raises(RuntimeError, match="token count"), torch.no_grad():
        unet(sample, timestep, **inputs)  # positional: tomesd's hook reads the latent from args[0]


def test_two_models_with_different_configs_in_one_process():
    first, second = tiny_sdxl_unet(seed=0), tiny_sdxl_unet(seed=0)
    atedm.apply(first, "c", dsap_fraction=0.0)
    atedm.apply(second, "dagger", dsap_fraction=0.0)
    inputs = unet_inputs(batch=2)
    run_unet(first, inputs)
    run_unet(second, inputs)
    assert atedm.get_state(first).pruned_calls == 11 and atedm.get_state(second).pruned_calls == 6
    assert atedm.get_state(first).config.prune_ratio != atedm.get_state(second).config.prune_ratio


@pytest.fixture(scope="module")
def pipe():
    return tiny_sdxl_pipeline()


def test_img2img_pipeline_runs_the_late_part_of_the_schedule(pipe):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    img2img = StableDiffusionXLImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = np.random.default_rng(0).random((1, 32, 32, 3)).astype(np.float32)
    atedm.apply(img2img, "c", dsap_fraction=0.3)
    try:
        out = img2img("a cat", image=image, strength=0.5, num_inference_steps=10, guidance_scale=5.0,
                      generator=torch.Generator().manual_seed(0), output_type="np").images
        state = atedm.get_state(img2img)
        # strength 0.5 starts halfway down the 10-step schedule: only late steps run.
        assert state.phase_calls == {"early": 0, "late": 5}
        assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
    finally:
        atedm.remove(img2img)


def test_inpainting_pipeline_runs_pruned(pipe):
    from diffusers import StableDiffusionXLInpaintPipeline

    inpaint = StableDiffusionXLInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    image = rng.random((1, 32, 32, 3)).astype(np.float32)
    mask = np.zeros((1, 32, 32, 1), dtype=np.float32)
    mask[:, 8:24, 8:24] = 1.0
    atedm.apply(inpaint, "c", dsap_fraction=0.0)
    try:
        out = inpaint("a cat", image=image, mask_image=mask, strength=1.0, num_inference_steps=3, guidance_scale=5.0,
                      generator=torch.Generator().manual_seed(0), output_type="np").images
        assert atedm.get_state(inpaint).pruned_calls == 3 * 11
        assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
    finally:
        atedm.remove(inpaint)


def test_sd15_style_unets_with_single_layer_blocks_are_refused_clearly():
    """SD 1.5/2.x attention blocks have one transformer layer: pruning after it saves nothing, so the
    default mode refuses them and names the mode that prunes them (tests/test_single_layer_blocks.py)."""
    sd15_like = tiny_sdxl_unet(transformer_layers_per_block=1)
    with pytest.raises(ValueError, match=r"at least 2 transformer layer.*prune_after='first_self_attention'"):
        atedm.apply(sd15_like)
    assert atedm.get_state(sd15_like) is None


def test_mixed_devices_give_a_clear_error_and_leave_the_model_usable():
    """No second device here, so the meta device stands in for one: inputs on another device than each
    other or than the weights are refused before any kernel runs; the next correct call works."""
    unet = tiny_sdxl_unet()
    inputs = unet_inputs(batch=2)
    atedm.apply(unet, "c", dsap_fraction=0.0)
    expected = run_unet(unet, inputs)
    for name in ("sample", "encoder_hidden_states"):
        moved = dict(inputs, **{name: inputs[name].to("meta")})
        with pytest.raises(ValueError, match=rf"{name} on meta.*one device|one device.*{name} on meta"):
            run_unet(unet, moved)
    moved_cond = dict(inputs, added_cond_kwargs={**inputs["added_cond_kwargs"], "time_ids": inputs["added_cond_kwargs"]["time_ids"].to("meta")})
    with pytest.raises(ValueError, match="time_ids"):
        run_unet(unet, moved_cond)
    everything_on_meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    everything_on_meta["added_cond_kwargs"] = {k: v.to("meta") for k, v in inputs["added_cond_kwargs"].items()}
    with pytest.raises(ValueError, match="the UNet's weights on cpu"):
        run_unet(unet, everything_on_meta)
    assert torch.equal(run_unet(unet, inputs), expected)
    atedm.remove(unet)

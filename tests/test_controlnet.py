"""Conditioned SDXL pipelines: ControlNet (one, or several through a MultiControlNetModel), AT-EDM on the
ControlNet itself (the opt-in), its counted FLOPs, and the T2I-Adapter.

Both kinds of control reach the UNet as extra residuals: a ControlNet's are added to the UNet's skip
connections and mid-block output (``down_block_additional_residuals``, ``mid_block_additional_residual``), a
T2I-Adapter's inside its down blocks (``down_intrablock_additional_residuals``). ``atedm.apply(pipe, ...)``
prunes the UNet; the tests check that the residuals still steer the pruned UNet (the output follows the control
image and the conditioning scale, and scale 0 gives exactly the plain SDXL pipeline's pruned output) and that
the pruned path really ran (block statistics).
"""

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionXLAdapterPipeline,
    StableDiffusionXLControlNetPipeline,
    T2IAdapter,
)
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from torch.utils.flop_counter import FlopCounterMode

import atedm
from atedm.flops import build_meta_unet, example_inputs
from atedm.unets import default_unet_config, tiny_unet_config
from benchmarks.controlnet_flops import build_meta_controlnet, controlnet_flops_by_config, controlnet_inputs
from conftest import fresh_seed
from tiny_models import tiny_sdxl_pipeline, tiny_sdxl_unet, unet_inputs
from tolerances import tol

PROMPT = "a photo of a cat"
IMAGE_SIZE = 32  # pixels; the tiny VAE downsamples by 2, so the latent grid is 16 x 16
UNET_BLOCKS = 11  # pruning blocks of the tiny UNet under preset "c"
# The ControlNet's pruning blocks: the UNet's down-path and mid attention blocks it copies.
CONTROLNET_BLOCKS = {
    "down_blocks.1.attentions.0", "down_blocks.1.attentions.1",
    "down_blocks.2.attentions.0", "down_blocks.2.attentions.1", "mid_block.attentions.0",
}
# The ControlNet's residuals computed before its first attention block: conv_in, down_blocks.0's two resnets and
# its downsampler. Pruning cannot touch them.
RESIDUALS_BEFORE_ATTENTION = 4
ATOL_F32 = tol(torch.float32)


# Tiny models: intra-op threads only add contention on a busy 2-core CI (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_controlnet(unet, seed: int) -> ControlNetModel:
    """A ControlNet copied from the tiny UNet, whose conditioning embedding downsamples by 2 (one stride-2 conv),
    the tiny VAE's factor, so a control image at the image size lands on the latent grid."""
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32)).eval()
    # from_unet zero-initialises the embedding's last conv and every residual's 1x1 conv (an untrained ControlNet
    # adds nothing); random weights there give non-zero residuals, as a trained one does.
    generator = torch.Generator().manual_seed(seed)
    zero_initialised = (controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks,
                        controlnet.controlnet_mid_block)
    with torch.no_grad():
        for module in zero_initialised:
            for param in module.parameters():
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return controlnet


def control_image(seed: int) -> torch.Tensor:
    return torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def controlnet_pipeline(base, controlnet):
    """A ControlNet pipeline sharing every component of ``base`` (its UNet too, so one apply patches both)."""
    return StableDiffusionXLControlNetPipeline(**base.components, controlnet=controlnet)


def generate(pipe, steps=3, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=5.0, height=IMAGE_SIZE, width=IMAGE_SIZE,
                generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


def expected_pruned_calls(state) -> int:
    """Every pruning block prunes once per call, except DSAP's blocks in early-phase calls (unpruned there)."""
    dsap_blocks = len(state.dsap.blocks & state.blocks.keys())
    return sum(state.phase_calls.values()) * len(state.blocks) - state.phase_calls["early"] * dsap_blocks


def assert_differs(a, b, at_least=1e-3):
    assert np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max() > at_least


# --------------------------------------------------------------------------------------------------------------
# ControlNet: the UNet pruned, the control residuals added
# --------------------------------------------------------------------------------------------------------------


def test_pruned_unet_follows_the_control_image_and_scale():
    seed = fresh_seed()
    base = tiny_sdxl_pipeline(seed)
    pipe = controlnet_pipeline(base, tiny_controlnet(base.unet, seed + 1))
    image, other_image = control_image(seed + 2), control_image(seed + 3)
    plain = generate(pipe, image=image)

    atedm.apply(pipe, "c")
    pruned = generate(pipe, image=image)
    state = atedm.get_state(pipe)
    assert sum(state.phase_calls.values()) == 3 and len(state.blocks) == UNET_BLOCKS
    assert state.pruned_calls == expected_pruned_calls(state) > 0
    assert atedm.get_state(pipe.controlnet) is None  # the ControlNet is pruned only when asked for
    assert np.isfinite(pruned).all()
    assert_differs(pruned, plain)
    assert_differs(generate(pipe, image=other_image), pruned)
    assert_differs(generate(pipe, image=image, controlnet_conditioning_scale=0.5), pruned)
    # Scale 0 makes every residual exactly zero: the plain SDXL pipeline's pruned output, bit for bit.
    np.testing.assert_array_equal(generate(pipe, image=image, controlnet_conditioning_scale=0.0), generate(base))

    atedm.remove(pipe)
    np.testing.assert_array_equal(generate(pipe, image=image), plain)


def test_control_residuals_reach_the_pruned_unet():
    """Each step's UNet call receives the ControlNet's residuals, and replaying that call on the pruned UNet
    gives the pipeline's noise prediction exactly with them and a different one without them."""
    seed = fresh_seed()
    base = tiny_sdxl_pipeline(seed)
    pipe = controlnet_pipeline(base, tiny_controlnet(base.unet, seed + 1))
    atedm.apply(pipe, "c")
    residuals, unet_calls, noise_predictions = [], [], []
    hooks = [
        pipe.controlnet.register_forward_hook(lambda module, args, output: residuals.append(output)),
        pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: unet_calls.append((args, dict(kwargs))),
                                            with_kwargs=True),
        pipe.unet.register_forward_hook(lambda module, args, output: noise_predictions.append(output[0])),
    ]
    try:
        generate(pipe, steps=2, image=control_image(seed + 2))
    finally:
        for hook in hooks:
            hook.remove()
    assert len(residuals) == len(unet_calls) == 2

    down, mid = residuals[-1]
    args, kwargs = unet_calls[-1]
    received = kwargs["down_block_additional_residuals"]
    assert len(received) == len(down) and all(torch.equal(got, sent) for got, sent in zip(received, down))
    assert torch.equal(kwargs["mid_block_additional_residual"], mid)

    state = atedm.get_state(pipe)
    calls_before = state.pruned_calls
    with torch.no_grad():
        replayed = pipe.unet(*args, **kwargs)[0]
        without_control = pipe.unet(*args, **{**kwargs, "down_block_additional_residuals": None,
                                              "mid_block_additional_residual": None})[0]
    assert state.pruned_calls == calls_before + 2 * len(state.blocks)  # both replays of the late step ran pruned
    torch.testing.assert_close(replayed, noise_predictions[-1], rtol=0, atol=0)
    assert_differs(without_control, replayed, at_least=1e-2)


def test_multi_controlnet_sums_both_nets_into_the_pruned_unet():
    """Each net's scale weighs its own residuals: with the other net at scale 0 the multi pipeline gives
    exactly the single-net pipeline's pruned output."""
    seed = fresh_seed()
    base = tiny_sdxl_pipeline(seed)
    first, second = tiny_controlnet(base.unet, seed + 1), tiny_controlnet(base.unet, seed + 2)
    multi = controlnet_pipeline(base, [first, second])
    assert isinstance(multi.controlnet, MultiControlNetModel)
    images = [control_image(seed + 3), control_image(seed + 4)]

    atedm.apply(multi, "c")
    both = generate(multi, image=images, controlnet_conditioning_scale=[1.0, 1.0])
    state = atedm.get_state(multi)
    assert sum(state.phase_calls.values()) == 3 and state.pruned_calls == expected_pruned_calls(state) > 0
    assert np.isfinite(both).all()
    first_only = generate(multi, image=images, controlnet_conditioning_scale=[1.0, 0.0])
    second_only = generate(multi, image=images, controlnet_conditioning_scale=[0.0, 1.0])
    # The single-net pipelines share the patched UNet.
    np.testing.assert_array_equal(first_only, generate(controlnet_pipeline(base, first), image=images[0]))
    np.testing.assert_array_equal(second_only, generate(controlnet_pipeline(base, second), image=images[1]))
    assert_differs(both, first_only)
    assert_differs(both, second_only)


# --------------------------------------------------------------------------------------------------------------
# Opt-in: AT-EDM on the ControlNet's own attention blocks
# --------------------------------------------------------------------------------------------------------------


def controlnet_residuals(controlnet, inputs) -> list[torch.Tensor]:
    """The ControlNet's residuals, the down blocks' in order and the mid block's last."""
    with torch.no_grad():
        down, mid = controlnet(**inputs, return_dict=False)
    return [*down, mid]


def test_controlnet_pruning_keeps_every_token_at_ratio_zero_and_removes_exactly():
    seed = fresh_seed()
    controlnet = tiny_controlnet(tiny_sdxl_unet(seed), seed + 1)
    control = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed + 3))
    inputs = {**unet_inputs(batch=2, seed=seed + 2), "controlnet_cond": control}
    plain = controlnet_residuals(controlnet, inputs)
    processors = dict(controlnet.attn_processors)

    atedm.apply(controlnet, "c", prune_ratio=0.0, dsap_fraction=0.0)
    state = atedm.get_state(controlnet)
    assert set(state.blocks) == CONTROLNET_BLOCKS
    # DSAP's rule on the ControlNet: the first attention block of each down stage, as in the UNet's down path.
    assert state.dsap.blocks == {"down_blocks.1.attentions.0", "down_blocks.2.attentions.0"}
    kept_all = controlnet_residuals(controlnet, inputs)
    assert state.pruned_calls == len(CONTROLNET_BLOCKS)  # the whole pruning path ran, keeping every token
    for got, expected in zip(kept_all, plain, strict=True):
        torch.testing.assert_close(got, expected, **ATOL_F32)

    atedm.apply(controlnet, "c", dsap_fraction=0.0)
    pruned = controlnet_residuals(controlnet, inputs)
    assert atedm.get_state(controlnet).pruned_calls == len(CONTROLNET_BLOCKS)
    # Pruning changes exactly the residuals computed at or after the first pruned block: the reason it is
    # opt-in (they steer the UNet directly).
    for got, expected in zip(pruned[:RESIDUALS_BEFORE_ATTENTION], plain[:RESIDUALS_BEFORE_ATTENTION], strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for got, expected in zip(pruned[RESIDUALS_BEFORE_ATTENTION:], plain[RESIDUALS_BEFORE_ATTENTION:], strict=True):
        assert_differs(got, expected)

    atedm.remove(controlnet)
    assert atedm.get_state(controlnet) is None
    assert all(controlnet.attn_processors[name] is processor for name, processor in processors.items())
    for got, expected in zip(controlnet_residuals(controlnet, inputs), plain, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_multi_controlnet_model_is_refused_and_each_net_prunes():
    seed = fresh_seed()
    base = tiny_sdxl_pipeline(seed)
    pipe = controlnet_pipeline(base, [tiny_controlnet(base.unet, seed + 1), tiny_controlnet(base.unet, seed + 2)])
    images = [control_image(seed + 3), control_image(seed + 4)]
    atedm.apply(pipe, "c")
    unet_only = generate(pipe, steps=2, image=images)

    with pytest.raises(TypeError, match=r"\.nets"):
        atedm.apply(pipe.controlnet, "c")
    assert all(atedm.get_state(net) is None for net in pipe.controlnet.nets)  # the refusal patched nothing

    for net in pipe.controlnet.nets:
        atedm.apply(net, "c")
    atedm.get_state(pipe).reset()
    both_pruned = generate(pipe, steps=2, image=images)
    for model in (pipe, *pipe.controlnet.nets):
        state = atedm.get_state(model)
        assert sum(state.phase_calls.values()) == 2 and state.pruned_calls == expected_pruned_calls(state) > 0
    assert all(set(atedm.get_state(net).blocks) == CONTROLNET_BLOCKS for net in pipe.controlnet.nets)
    assert np.isfinite(both_pruned).all()
    assert_differs(both_pruned, unet_only)

    for net in pipe.controlnet.nets:
        atedm.remove(net)
    np.testing.assert_array_equal(generate(pipe, steps=2, image=images), unet_only)


@pytest.mark.parametrize("multi", [False, True], ids=["one_net", "multi"])
def test_prune_controlnet_through_the_pipeline_follows_the_unets_dsap_phases(multi):
    """``atedm.apply(pipe, ..., prune_controlnet=True)`` patches the ControlNet(s) with the pipeline as their
    DSAP owner, so each step's ControlNet call is in the same phase as that step's UNet call (the ControlNet
    feeds the UNet of the same step). A ControlNet patched on its own reads the bare timestep against 0.9 T,
    which on SDXL's "leading" schedule disagrees with the schedule at most step counts; 4 steps (751, 501,
    251, 1) is one of them, so the bare rule would fail this test."""
    seed = fresh_seed()
    base = tiny_sdxl_pipeline(seed)
    nets = [tiny_controlnet(base.unet, seed + 1), tiny_controlnet(base.unet, seed + 3)] if multi else tiny_controlnet(base.unet, seed + 1)
    pipe = controlnet_pipeline(base, nets)
    image = [control_image(seed + 2)] * 2 if multi else control_image(seed + 2)
    atedm.apply(pipe, "c", prune_controlnet=True)
    controlnets = list(pipe.controlnet.nets) if multi else [pipe.controlnet]
    generate(pipe, steps=4, image=image)
    unet_phases = atedm.get_state(pipe).phase_calls
    assert unet_phases == {"early": 1, "late": 3}
    for net in controlnets:
        state = atedm.get_state(net)
        assert state.phase_calls == unet_phases
        assert state.pruned_calls == 4 * len(CONTROLNET_BLOCKS) - len(state.dsap.blocks)  # DSAP blocks skip the early call
    # Re-applying without the switch, or removing through the pipeline, unpatches the ControlNets it patched.
    atedm.apply(pipe, "c")
    assert all(atedm.get_state(net) is None for net in controlnets) and atedm.get_state(pipe) is not None
    atedm.apply(pipe, "c", prune_controlnet=True)
    atedm.remove(pipe)
    assert all(atedm.get_state(net) is None for net in controlnets) and atedm.get_state(pipe) is None
    with pytest.raises(ValueError, match="no ControlNet"):
        atedm.apply(base, "c", prune_controlnet=True)


# --------------------------------------------------------------------------------------------------------------
# FLOPs of the ControlNet (SDXL architecture, meta device, 1024 px): benchmarks/controlnet_flops.py
# --------------------------------------------------------------------------------------------------------------


def test_controlnet_flops_fall_with_each_preset():
    reports = controlnet_flops_by_config(default_unet_config(), {"full": None, **{name: name for name in "acd"},
                                                                  "dagger": "dagger"})
    full = reports.pop("full").unet_tflops
    assert full == pytest.approx(3.02, rel=0.01)  # 45% of the UNet's 6.76: its down and mid blocks, and the embedding
    late = {name: report.late_unet_tflops for name, report in reports.items()}
    assert late["a"] < late["c"] < late["d"] < full
    assert late["c"] < late["dagger"] < full  # dagger leaves level 2 unpruned
    for report in reports.values():
        # DSAP leaves two ControlNet blocks unpruned in the first 5 of 50 steps.
        assert report.late_unet_tflops < report.early_unet_tflops < full
        assert report.early_steps == 5
        assert report.unet_tflops == pytest.approx((5 * report.early_unet_tflops + 45 * report.late_unet_tflops) / 50,
                                                   rel=1e-9)
        assert 0 < report.overhead_tflops < 0.05 * report.unet_tflops


def flops_by_block(model, inputs) -> dict[str, int]:
    """Counted FLOPs of each down block and the mid block of a UNet or ControlNet pass, by block name."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs)
    prefix = type(model).__name__ + "."
    names = [f"down_blocks.{index}" for index in range(len(model.down_blocks))] + ["mid_block"]
    counts = counter.get_flop_counts()
    return {name: sum(counts[prefix + name].values()) for name in names}


def test_controlnet_blocks_cost_what_the_unets_same_blocks_cost():
    """The ControlNet's down and mid blocks are the UNet's: full and pruned with "c" (late phase), each costs
    exactly what the same UNet block costs, so its blocks prune at the same levels and ratios. The tiny
    architecture (same block structure as SDXL's) keeps the four counted passes cheap."""
    unet_config = tiny_unet_config()
    unet, controlnet = build_meta_unet(unet_config), build_meta_controlnet(unet_config)
    unet_args, controlnet_args = example_inputs(unet_config, 1, 256, 256), controlnet_inputs(unet_config, 256, 256)
    full = flops_by_block(controlnet, controlnet_args)
    assert full == flops_by_block(unet, unet_args)
    for model in (unet, controlnet):
        atedm.apply(model, "c", backend="torch")
        atedm.set_phase(model, "late")
    pruned = flops_by_block(controlnet, controlnet_args)
    assert pruned == flops_by_block(unet, unet_args)
    assert pruned["down_blocks.0"] == full["down_blocks.0"]  # no attention at level 1
    assert all(pruned[name] < full[name] for name in ("down_blocks.1", "down_blocks.2", "mid_block"))


# --------------------------------------------------------------------------------------------------------------
# T2I-Adapter
# --------------------------------------------------------------------------------------------------------------


def tiny_adapter(seed: int) -> T2IAdapter:
    """An SDXL T2I-Adapter for the tiny UNet. Its four features must match what the UNet adds them to: the output
    of down_blocks.0 (32 channels, 8 x 8 at 32 px), inside down_blocks.1 (64, 8 x 8) and down_blocks.2 (64, 4 x 4),
    and the mid block's output (64, 4 x 4). The XL adapter halves the grid once, after its second feature, so it
    starts at 8 x 8: a pixel unshuffle by 4 of the 32 px control image."""
    torch.manual_seed(seed)
    return T2IAdapter(in_channels=3, channels=[32, 64, 64, 64], num_res_blocks=1, downscale_factor=4,
                      adapter_type="full_adapter_xl").eval()


def test_t2i_adapter_residuals_steer_the_pruned_unet():
    seed = fresh_seed()
    base = tiny_sdxl_pipeline(seed)
    pipe = StableDiffusionXLAdapterPipeline(**base.components, adapter=tiny_adapter(seed + 1))
    image = control_image(seed + 2)
    # The UNet pops each feature it adds, and skips the mid-block one silently when its shape does not match:
    # every call through the adapter must use all four.
    features_left = []

    def record_unused_features(module, args, kwargs, output):
        features = kwargs.get("down_intrablock_additional_residuals")
        if features is not None:  # None from the plain SDXL pipeline
            features_left.append(len(features))

    pipe.unet.register_forward_hook(record_unused_features, with_kwargs=True)

    plain = generate(pipe, image=image)
    atedm.apply(pipe, "c")
    pruned = generate(pipe, image=image)
    state = atedm.get_state(pipe)
    assert sum(state.phase_calls.values()) == 3 and state.pruned_calls == expected_pruned_calls(state) > 0
    assert np.isfinite(pruned).all()
    assert_differs(pruned, plain)
    assert_differs(generate(pipe, image=image, adapter_conditioning_scale=0.5), pruned)
    # Scale 0: every feature is exactly zero, so the plain SDXL pipeline's pruned output, bit for bit.
    np.testing.assert_array_equal(generate(pipe, image=image, adapter_conditioning_scale=0.0), generate(base))
    assert features_left == [0] * 12  # four generations through the adapter pipeline, 3 UNet calls each

    atedm.remove(pipe)
    np.testing.assert_array_equal(generate(pipe, image=image), plain)

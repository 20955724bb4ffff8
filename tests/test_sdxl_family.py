"""The SDXL family by structure: the shipped UNet configs (SSD-1B, Segmind-Vega, refiner, inpainting,
Playground-v2.5), their counted FLOPs and the ``flops --unet-config`` command, the rule that blocks of one
transformer layer run unpatched on the distilled UNets, and the 9-channel inpainting UNet in its pipeline.

The expected depths are transcribed from the published layouts (ComfyUI's model_detection lists, the
refiner's sgm config), not derived from the shipped files, so a wrong file fails here.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import atedm
from atedm.cli import main
from atedm.dsap import dsap_block_names
from atedm.flops import build_meta_unet, example_inputs, flops_per_step_by_config, text_time_sizes
from atedm.presets import PRESETS
from atedm.unets import UNET_LAYOUTS, default_unet_config, load_unet_config, same_architecture, unet_config
from conftest import fresh_seed
from tiny_models import run_unet, tiny_sdxl_pipeline, tiny_sdxl_unet, unet_inputs
from tolerances import tol


def _depths(down: dict, up: dict, mid: int | None) -> dict[str, int]:
    """{attention block name: transformer layers} from per-stage lists, one entry per block."""
    names = {f"down_blocks.{stage}.attentions.{i}": d for stage, ds in down.items() for i, d in enumerate(ds)}
    names.update({f"up_blocks.{stage}.attentions.{i}": d for stage, ds in up.items() for i, d in enumerate(ds)})
    if mid is not None:
        names["mid_block.attentions.0"] = mid
    return names


SDXL_BASE_DEPTHS = _depths(down={1: [2, 2], 2: [10, 10]}, up={0: [10, 10, 10], 1: [2, 2, 2]}, mid=10)
EXPECTED_DEPTHS = {
    "sdxl-base": SDXL_BASE_DEPTHS,
    "sdxl-inpainting": SDXL_BASE_DEPTHS,
    "playground-v2.5": SDXL_BASE_DEPTHS,
    # ComfyUI: transformer_depth [0,0,2,2,4,4], transformer_depth_output [0,0,0,1,1,2,10,4,4] (read from the
    # end: the first up block's attentions get 4, 4, 10), no mid attention.
    "ssd-1b": _depths(down={1: [2, 2], 2: [4, 4]}, up={0: [4, 4, 10], 1: [2, 1, 1]}, mid=None),
    "segmind-vega": _depths(down={1: [1, 1], 2: [2, 2]}, up={0: [2, 2, 2], 1: [1, 1, 1]}, mid=None),
    # Four levels, attention at the middle two (up_blocks 1 and 2), depth 4 everywhere.
    "sdxl-refiner": _depths(down={1: [4, 4], 2: [4, 4]}, up={1: [4, 4, 4], 2: [4, 4, 4]}, mid=4),
}
DISTILLED = ["ssd-1b", "segmind-vega"]


# Tiny models: intra-op threads only add contention on a busy 2-core CI (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def attention_depths(unet) -> dict[str, int]:
    return {name: len(module.transformer_blocks) for name, module in unet.named_modules()
            if type(module).__name__ == "Transformer2DModel"}


# ----------------------------------------------------------------------------------------------------------
# The shipped configs
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(UNET_LAYOUTS))
def test_layout_builds_on_meta_with_its_published_depths(layout):
    config = unet_config(layout)
    unet = build_meta_unet(config)
    assert attention_depths(unet) == EXPECTED_DEPTHS[layout]
    assert unet.conv_in.in_channels == (9 if layout == "sdxl-inpainting" else 4)
    assert same_architecture(config, default_unet_config()) == (layout in ("sdxl-base", "playground-v2.5"))


def test_distilled_layouts_have_their_published_parameter_counts():
    """SSD-1B: 1.3B parameters (model card). Vega: 247M down, 31M mid, 460M up (Segmind's deep dive)."""
    def parameters(module):
        return sum(p.numel() for p in module.parameters())

    ssd = build_meta_unet(unet_config("ssd-1b"))
    assert parameters(ssd) == pytest.approx(1.3e9, rel=0.03)
    vega = build_meta_unet(unet_config("segmind-vega"))
    for part, published in (("down_blocks", 247e6), ("mid_block", 31e6), ("up_blocks", 460e6)):
        assert parameters(getattr(vega, part)) == pytest.approx(published, rel=0.01), part


def test_layout_names_and_paths(tmp_path):
    assert unet_config("SSD-1B") == unet_config("ssd-1b")
    with pytest.raises(ValueError, match="known layouts: sdxl-base, .*segmind-vega"):
        unet_config("ssd1b")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(unet_config("segmind-vega")))
    assert load_unet_config(str(path)) == unet_config("segmind-vega") == load_unet_config("segmind-vega")
    with pytest.raises(ValueError, match="neither a UNet config file nor a known layout"):
        load_unet_config(str(tmp_path / "missing.json"))


def test_example_inputs_follow_each_layouts_conditioning():
    refiner = example_inputs(unet_config("sdxl-refiner"), 2, 1024, 1024)
    assert refiner["added_cond_kwargs"]["time_ids"].shape == (2, 5)  # original size, crop, aesthetic score
    assert refiner["added_cond_kwargs"]["text_embeds"].shape == (2, 1280)
    assert refiner["encoder_hidden_states"].shape == (2, 77, 1280)
    assert text_time_sizes(default_unet_config()) == (1280, 6)
    assert example_inputs(unet_config("sdxl-inpainting"), 1, 1024, 768)["sample"].shape == (1, 9, 128, 96)


# ----------------------------------------------------------------------------------------------------------
# Counted FLOPs at native size (1024 px, 50 steps)
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def counted():
    """Each layout counted once (a few seconds per pass on two cores): the full UNet, and preset "c" where
    the attention blocks differ from SDXL-base's (whose presets tests/test_flops.py checks; Playground-v2.5
    and the inpainting UNet share them)."""
    full_only = ("sdxl-base", "playground-v2.5", "sdxl-inpainting")
    return {
        layout: flops_per_step_by_config(unet_config(layout), {"full": None} if layout in full_only
                                         else {"full": None, "c": "c"})
        for layout in UNET_LAYOUTS
    }


def test_every_layout_prunes_and_the_distilled_ones_start_smaller(counted):
    base = counted["sdxl-base"]["full"].unet_tflops
    for layout, reports in counted.items():
        if "c" in reports:
            assert 0 < reports["c"].unet_tflops < reports["full"].unet_tflops, layout
            assert reports["c"].overhead_tflops > 0, layout
    assert counted["segmind-vega"]["full"].unet_tflops < counted["ssd-1b"]["full"].unet_tflops < 0.7 * base
    assert counted["playground-v2.5"]["full"].unet_tflops == base


def test_inpainting_costs_exactly_its_wider_conv_in(counted):
    """Five more input channels into conv_in (3x3, 320 out, 128x128 latent) and nothing else."""
    difference = counted["sdxl-inpainting"]["full"].unet_tflops - counted["sdxl-base"]["full"].unet_tflops
    assert difference * 1e12 == pytest.approx(2 * 5 * 320 * 9 * 128 * 128, abs=1.0)


def test_flops_command_prints_the_counts_of_a_shipped_layout(counted, capsys, monkeypatch):
    # One preset keeps the command to three counted passes; every preset's row was checked by hand
    # (benchmarks/RESULTS.md, "The SDXL family").
    monkeypatch.setattr("atedm.cli.PRESETS", {"c": PRESETS["c"]})
    main(["flops", "--unet-config", "segmind-vega"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("segmind-vega UNet: counted FLOPs per image per UNet pass, 1024x1024")
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert list(rows) == ["full", "c"]
    for name in ("full", "c"):
        assert rows[name][1] == f"{counted['segmind-vega'][name].unet_tflops:.3f}"
        assert rows[name][2] == "-"  # the paper's budgets are SDXL-base's


def test_flops_command_columns_line_up_under_a_long_preset_name(counted, capsys, monkeypatch):
    # The same config under a name longer than the header's "config": counted once (the count is memoised).
    monkeypatch.setattr("atedm.cli.PRESETS", {"c": PRESETS["c"], "a_long_preset_name": PRESETS["c"]})
    main(["flops", "--unet-config", "segmind-vega"])
    header, *rows = capsys.readouterr().out.splitlines()[1:]
    column_end = header.index("UNet TFLOPs") + len("UNet TFLOPs")
    for row in rows:
        number = f"{counted['segmind-vega']['c' if row.split()[0] != 'full' else 'full'].unet_tflops:.3f}"
        assert row.index(number) + len(number) == column_end, row


def test_flops_command_refuses_an_unknown_layout(capsys):
    with pytest.raises(SystemExit, match="known layouts: sdxl-base"):
        main(["flops", "--unet-config", "vega"])


# ----------------------------------------------------------------------------------------------------------
# Depth-1 blocks on tiny distilled UNets (the real depth lists, tiny channels)
# ----------------------------------------------------------------------------------------------------------


def tiny_layout_unet(layout: str, seed: int):
    real = unet_config(layout)
    return tiny_sdxl_unet(seed, transformer_layers_per_block=real["transformer_layers_per_block"],
                          reverse_transformer_layers_per_block=real.get("reverse_transformer_layers_per_block"),
                          mid_block_type=real["mid_block_type"])


@pytest.mark.parametrize("layout", DISTILLED)
def test_only_blocks_of_two_or_more_layers_prune_and_depth_one_blocks_run_unpatched(layout):
    seed = fresh_seed()
    unpatched, patched = tiny_layout_unet(layout, seed), tiny_layout_unet(layout, seed)
    assert attention_depths(patched) == EXPECTED_DEPTHS[layout]
    atedm.apply(patched, "c", dsap_fraction=0.0)
    state = atedm.get_state(patched)
    deep = {name: depth for name, depth in EXPECTED_DEPTHS[layout].items() if depth >= 2}
    shallow = sorted(set(EXPECTED_DEPTHS[layout]) - set(deep))
    assert {name: block.depth for name, block in state.blocks.items()} == deep

    # Each depth-1 block's call in the patched UNet is replayed on the unpatched twin's block with the same
    # weights and the very same inputs: it must give the same output bit for bit. (Its inputs differ from
    # the unpatched UNet's own run wherever a pruned block ran upstream; the replay takes that out.)
    calls = {}

    def record(module, args, kwargs, output):
        calls[module_names[module]] = (args, kwargs, output)

    module_names = {patched.get_submodule(name): name for name in shallow}
    for module, name in module_names.items():
        assert type(module.transformer_blocks[0].attn1.processor) is type(
            unpatched.get_submodule(name).transformer_blocks[0].attn1.processor)
        module.register_forward_hook(record, with_kwargs=True)
    inputs = unet_inputs(batch=2, seed=fresh_seed())
    output = run_unet(patched, inputs)
    reference = run_unet(unpatched, inputs)

    assert sorted(calls) == shallow
    with torch.no_grad():
        for name, (args, kwargs, out) in calls.items():
            assert torch.equal(unpatched.get_submodule(name)(*args, **kwargs)[0], out[0]), name
    assert all(block.pruned_calls == 1 for block in state.blocks.values())
    assert torch.isfinite(output).all()
    assert not torch.allclose(output, reference, **tol(torch.float32))


@pytest.mark.parametrize("layout", DISTILLED)
def test_a_depth_one_block_in_the_dsap_rule_changes_nothing(layout):
    """The published DSAP rule names up_blocks.1.attentions.2 (depth 1 on both) and, on Vega,
    down_blocks.1.attentions.0 (depth 1): they stay unpruned in both phases, the rule's deeper blocks wait
    for the late phase, and an explicit list of only depth-1 blocks holds no pruning block back."""
    unet = tiny_layout_unet(layout, fresh_seed())
    inputs = unet_inputs(batch=2, seed=fresh_seed())
    depths = EXPECTED_DEPTHS[layout]
    rule = set(dsap_block_names(unet))
    assert "up_blocks.1.attentions.2" in rule and depths["up_blocks.1.attentions.2"] == 1

    atedm.apply(unet, "c", dsap_fraction=0.5)
    state = atedm.get_state(unet)
    for phase in ("early", "late"):
        atedm.set_phase(unet, phase)
        assert torch.isfinite(run_unet(unet, inputs)).all()
    held_back = {name for name in state.blocks if name in rule}
    assert {name: block.pruned_calls for name, block in state.blocks.items()} == {
        name: 1 if name in held_back else 2 for name in state.blocks}

    shallow = tuple(name for name, depth in depths.items() if depth == 1)
    atedm.remove(unet)
    atedm.apply(unet, "c", dsap_fraction=0.5, dsap_blocks=shallow)
    atedm.set_phase(unet, "early")
    assert torch.isfinite(run_unet(unet, inputs)).all()
    assert all(block.pruned_calls == 1 for block in atedm.get_state(unet).blocks.values())
    atedm.remove(unet)


# ----------------------------------------------------------------------------------------------------------
# The 9-channel inpainting UNet in StableDiffusionXLInpaintPipeline
# ----------------------------------------------------------------------------------------------------------


def test_inpainting_pipeline_with_a_nine_channel_unet_prunes():
    from diffusers import StableDiffusionXLInpaintPipeline

    seed = fresh_seed()
    components = tiny_sdxl_pipeline(seed).components
    components["unet"] = tiny_sdxl_unet(seed, in_channels=9)
    pipe = StableDiffusionXLInpaintPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy()
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 4:28] = 255
    generator_seed = fresh_seed()

    def inpaint():
        return pipe("a photo of a cat", image=Image.fromarray(pixels), mask_image=Image.fromarray(mask),
                    num_inference_steps=4, guidance_scale=5.0, height=32, width=32, output_type="latent",
                    generator=torch.Generator().manual_seed(generator_seed)).images

    unpruned = inpaint()
    atedm.apply(pipe, "c")
    pruned = inpaint()
    state = atedm.get_state(pipe)
    unet_calls = sum(state.phase_calls.values())
    atedm.remove(pipe)
    assert unet_calls >= 3 and state.pruned_calls == unet_calls * len(state.blocks) == unet_calls * 11
    assert torch.isfinite(pruned).all()
    assert not torch.allclose(pruned, unpruned, **tol(torch.float32))

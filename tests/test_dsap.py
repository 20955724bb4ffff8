"""DSAP: the phase of every UNet call follows the sampler, for pipelines and bare UNets alike."""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

import atedm
from tiny_models import run_unet, tiny_sdxl_unet, unet_inputs

DSAP_BLOCKS = ("down_blocks.1.attentions.0", "down_blocks.2.attentions.0", "up_blocks.0.attentions.2", "up_blocks.1.attentions.2")

SCHEDULERS = {
    "euler": lambda: EulerDiscreteScheduler(timestep_spacing="leading", steps_offset=1),
    "ddim": lambda: DDIMScheduler(timestep_spacing="trailing"),
    "dpm_karras": lambda: DPMSolverMultistepScheduler(use_karras_sigmas=True),
}


class FakePipeline:
    """Just what atedm reads from a pipeline: its UNet and its scheduler."""

    def __init__(self, unet, scheduler):
        self.unet, self.scheduler = unet, scheduler


@pytest.fixture(scope="module")
def unet():
    return tiny_sdxl_unet()


@pytest.fixture(autouse=True)
def _unpatch(unet):
    yield
    atedm.remove(unet)


@pytest.mark.parametrize("scheduler_name", sorted(SCHEDULERS))
@pytest.mark.parametrize("num_steps,fraction", [(10, 0.3), (7, 0.5), (50, 0.1)])
def test_phase_follows_the_pipeline_schedule(unet, scheduler_name, num_steps, fraction):
    scheduler = SCHEDULERS[scheduler_name]()
    scheduler.set_timesteps(num_steps)
    pipe = FakePipeline(unet, scheduler)
    atedm.apply(pipe, dsap_fraction=fraction)
    state = atedm.get_state(pipe)
    early = round(fraction * num_steps)
    phases = [state.dsap.resolve_phase(t) for t in scheduler.timesteps]
    assert phases == ["early"] * early + ["late"] * (num_steps - early)


def test_phase_decides_which_blocks_prune_in_real_unet_calls(unet):
    scheduler = EulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    pipe = FakePipeline(unet, scheduler)
    atedm.apply(pipe, dsap_fraction=0.5)
    state = atedm.get_state(pipe)
    for t in scheduler.timesteps:  # CFG batched into one call, as the pipelines do
        inputs = unet_inputs(batch=2)
        inputs["timestep"] = t
        run_unet(unet, inputs)
    assert state.phase_calls == {"early": 2, "late": 2}
    for name, block in state.blocks.items():
        assert block.pruned_calls == (2 if name in DSAP_BLOCKS else 4), name


def test_dsap_early_ratio_prunes_the_dsap_blocks_less(unet):
    atedm.apply(unet, prune_ratio=0.75, dsap_fraction=0.5, dsap_early_ratio=0.25)
    atedm.set_phase(unet, "early")
    run_unet(unet, unet_inputs(batch=2, height=16, width=16))
    blocks = atedm.get_state(unet).blocks
    assert blocks["down_blocks.1.attentions.0"].kept_tokens == (48,)  # 64 tokens, 25% pruned
    assert blocks["down_blocks.1.attentions.1"].kept_tokens == (16,)  # 75% pruned


def test_default_dsap_blocks_are_the_published_four_on_sdxl(unet):
    from atedm.dsap import SDXL_DSAP_BLOCKS

    atedm.apply(unet)
    assert atedm.get_state(unet).dsap.blocks == frozenset(SDXL_DSAP_BLOCKS) == frozenset(DSAP_BLOCKS)


def test_bare_unet_uses_the_timestep_alone(unet):
    atedm.apply(unet, dsap_fraction=0.2)
    state = atedm.get_state(unet)
    assert state.dsap.resolve_phase(torch.tensor(999)) == "early"
    assert state.dsap.resolve_phase(torch.tensor([801.0, 801.0])) == "early"
    assert state.dsap.resolve_phase(799) == "late"
    atedm.set_timesteps(unet, torch.linspace(999, 0, 10))
    assert [state.dsap.resolve_phase(t) for t in torch.linspace(999, 0, 10)] == ["early"] * 2 + ["late"] * 8
    atedm.set_phase(unet, "early")
    assert state.dsap.resolve_phase(0) == "early"
    with pytest.raises(ValueError, match="phase"):
        atedm.set_phase(unet, "middle")


def test_new_generation_starts_clean_after_an_interrupted_one(unet):
    atedm.apply(unet, dsap_fraction=0.0)
    inputs = unet_inputs(batch=2)
    expected = run_unet(unet, inputs)
    bad = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"][:, :, :5])
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        run_unet(unet, bad)  # dies in the first block's cross-attention, after the plan was made
    assert any(block.keep for block in atedm.get_state(unet).blocks.values())  # a stale plan is left behind
    assert torch.equal(run_unet(unet, inputs), expected)
    atedm.get_state(unet).reset()
    assert atedm.get_state(unet).pruned_calls == 0


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8, 10, 25, 50])
@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.1, 0.15, 0.25, 0.5, 1.0])
def test_early_steps_is_the_fraction_rounded_half_up_and_at_least_one_while_on(num_steps, fraction):
    from fractions import Fraction

    from atedm.dsap import early_steps

    exact = Fraction(fraction).limit_denominator(1000) * num_steps  # the fraction as written, no float error
    rounded = int(exact) + (1 if exact - int(exact) >= Fraction(1, 2) else 0)
    expected = 0 if fraction == 0 else max(1, rounded)  # few-step models keep their pure-noise step early
    assert early_steps(fraction, num_steps) == expected
    assert atedm.ATEDMConfig(dsap_fraction=fraction).early_steps(num_steps) == expected


def test_dsap_rule_on_a_unet_with_one_attention_stage_per_side():
    """The published rule reads the UNet's own layout: first attention block of each down stage, last of
    each up stage; stages without attention contribute nothing."""
    from atedm.dsap import dsap_block_names

    unet = tiny_sdxl_unet(
        block_out_channels=[32, 64],
        attention_head_dim=[1, 2],
        transformer_layers_per_block=[1, 2],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    )
    assert dsap_block_names(unet) == ("down_blocks.1.attentions.0", "up_blocks.0.attentions.2")


def test_dsap_blocks_that_are_not_attention_blocks_are_refused_and_the_old_patch_stays(unet):
    atedm.apply(unet, "c")
    before = atedm.get_state(unet)
    with pytest.raises(ValueError, match=r"dsap_blocks \['up_blocks.9.attentions.0'\]"):
        atedm.apply(unet, "c", dsap_blocks=("up_blocks.9.attentions.0",))
    assert atedm.get_state(unet) is before
    atedm.apply(unet, "c", dsap_blocks=("up_blocks.9.attentions.0",), dsap_fraction=0.0)  # DSAP off: allowed
    assert atedm.get_state(unet).dsap.blocks == {"up_blocks.9.attentions.0"}

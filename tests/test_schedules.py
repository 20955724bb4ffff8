"""DSAP under the schedules SDXL-family models ship with: few-step models (SDXL-Turbo, Lightning, LCM,
Hyper-SD: 1-8 steps, CFG off, trailing spacing), the base + refiner hand-off, and EDM schedules
(Playground v2.5), whose timesteps are 0.25 * log(sigma) rather than integers 0-999.

Every generation runs on tiny random SDXL-shaped pipelines and is checked call by call: the DSAP phase of
each UNet call and the ratio every pruning block ran at (the DSAP blocks in full exactly in the early
calls, every other block pruned in every call).
"""

import numpy as np
import pytest
import torch
from diffusers import (
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionXLImg2ImgPipeline,
)

import atedm
from atedm.presets import PAPER_PRESETS
from atedm.unets import TINY_TEXT_EMBED_DIM, TINY_TIME_EMBED_DIM, default_unet_config
from conftest import fresh_seed
from tiny_models import run_unet, tiny_sdxl_pipeline, tiny_sdxl_unet, unet_inputs

PROMPT = "a photo of a cat"
FEW_STEPS = (1, 2, 4, 8)

FEW_STEP_SCHEDULERS = {
    # SDXL-Lightning and Hyper-SD sample with Euler on trailing timesteps, SDXL-Turbo with Euler ancestral.
    "euler_trailing": lambda config: EulerDiscreteScheduler.from_config(config, timestep_spacing="trailing"),
    "euler_ancestral_trailing": lambda config: EulerAncestralDiscreteScheduler.from_config(config, timestep_spacing="trailing"),
    "lcm": lambda config: LCMScheduler.from_config(config),
}
EDM_SCHEDULERS = {
    "edm_dpm_solver": lambda config: EDMDPMSolverMultistepScheduler(),  # Playground v2.5's
    "edm_euler": lambda config: EDMEulerScheduler(),
}


# Tiny models: intra-op threads only add contention on a busy 2-core CI (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def record_calls(unet, state) -> list[dict]:
    """Per UNet call: its DSAP phase and the ratio each pruning block runs at (None = in full), read by
    hooks registered after atedm's, so they see what atedm decided for the call."""
    calls = []
    unet.register_forward_pre_hook(lambda module, args: calls.append({"phase": state.dsap.phase}))
    for name, block in state.blocks.items():
        unet.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name, block=block: calls[-1].__setitem__(name, block.active_ratio))
    return calls


def assert_dsap_ran(calls: list[dict], state, early: int) -> None:
    """The first ``early`` calls are early and only they run the DSAP blocks in full; every other block
    prunes at the config's ratio in every call, and every pruning pass completed."""
    assert len(state.dsap.blocks) == 4
    assert [call["phase"] for call in calls] == ["early"] * early + ["late"] * (len(calls) - early)
    assert state.phase_calls == {"early": early, "late": len(calls) - early}
    for index, call in enumerate(calls):
        for name in state.blocks:
            in_full = call["phase"] == "early" and name in state.dsap.blocks
            assert call[name] == (None if in_full else state.config.prune_ratio), (index, name)
    for name, block in state.blocks.items():
        assert block.pruned_calls == len(calls) - (early if name in state.dsap.blocks else 0), name


def generate(pipe, steps, guidance, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                generator=torch.Generator().manual_seed(0), **kwargs).images


def patched_tiny_pipeline(make_scheduler, dsap_fraction):
    pipe = tiny_sdxl_pipeline(fresh_seed())
    pipe.scheduler = make_scheduler(pipe.scheduler.config)
    atedm.apply(pipe, "c", dsap_fraction=dsap_fraction)
    state = atedm.get_state(pipe)
    return pipe, state, record_calls(pipe.unet, state)


# --------------------------------------------------------------------------------------------------------------
# Few-step models: DSAP keeps the pure-noise first step early, however few the steps
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler_name,steps,fraction,early", [
    *[("euler_trailing", steps, 0.1, 1) for steps in FEW_STEPS],  # 10% rounds to 0 below 5 steps: still 1
    ("euler_trailing", 8, 0.3, 2),
    ("euler_ancestral_trailing", 1, 0.1, 1),
    ("lcm", 1, 0.1, 1),
    ("lcm", 4, 0.1, 1),
    ("lcm", 8, 0.5, 4),
])
def test_few_step_generation_without_cfg_runs_the_early_steps_in_full(scheduler_name, steps, fraction, early):
    pipe, state, calls = patched_tiny_pipeline(FEW_STEP_SCHEDULERS[scheduler_name], fraction)
    latents = generate(pipe, steps, guidance=0.0, output_type="latent")  # CFG off: one single-image call per step
    assert len(calls) == steps and torch.isfinite(latents).all()
    assert_dsap_ran(calls, state, early)


@pytest.mark.parametrize("scheduler_name", ["euler_trailing", "lcm"])
@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5])
def test_bare_unet_reads_few_step_schedules_like_the_step_rule(scheduler_name, fraction):
    """Without a schedule the timestep alone decides; on these schedules it agrees with the step rule,
    including the pure-noise t = 999 that is early even when fraction * steps rounds to zero."""
    from atedm.dsap import early_steps

    unet = tiny_sdxl_unet(fresh_seed())
    atedm.apply(unet, "c", dsap_fraction=fraction)
    state = atedm.get_state(unet)
    scheduler = FEW_STEP_SCHEDULERS[scheduler_name](EulerDiscreteScheduler().config)
    for steps in FEW_STEPS:
        scheduler.set_timesteps(steps)
        early = early_steps(fraction, steps)
        assert early >= 1
        phases = [state.dsap.resolve_phase(t) for t in scheduler.timesteps]
        assert phases == ["early"] * early + ["late"] * (steps - early), (steps, scheduler.timesteps.tolist())


@pytest.fixture(scope="module")
def preset_flops():
    """``flops_per_step`` of every preset at 1, 2, 4 and 8 steps, SDXL-base at 1024 px. A pass's count depends
    on the config and the phase, not on the step count, and atedm.flops counts each distinct pass once per
    process: the 20 reports cost 11 counted passes (or none, when other tests counted them already)."""
    from atedm import flops

    sdxl = default_unet_config()
    return {(name, steps): flops.flops_per_step(sdxl, name, num_inference_steps=steps)
            for name in PAPER_PRESETS for steps in FEW_STEPS}


@pytest.mark.parametrize("steps", FEW_STEPS)
def test_presets_save_flops_and_keep_their_order_at_few_steps(preset_flops, steps):
    reports = {name: preset_flops[name, steps] for name in PAPER_PRESETS}
    for name, report in reports.items():
        assert report.early_steps == 1, name  # the first step, in full at the DSAP blocks
        assert report.unet_tflops < report.full_tflops, name
    tflops = [reports[name].unet_tflops for name in ("a", "b", "c", "d")]
    assert tflops == sorted(tflops) and len(set(tflops)) == 4, tflops
    if steps == 1:  # one step is all early phase
        assert all(report.unet_tflops == report.early_unet_tflops for report in reports.values())


# --------------------------------------------------------------------------------------------------------------
# Base + refiner: one trajectory, the refiner's steps continue the base's
# --------------------------------------------------------------------------------------------------------------

def tiny_refiner_pipeline(base, seed):
    """An SDXL-refiner-shaped img2img pipeline sharing the tiny base's VAE and second text encoder: four
    levels with attention at the middle two, conditioned on text_encoder_2 alone (its hidden states are the
    cross-attention input) and on 5 time ids, the aesthetic score among them (SDXL-refiner's
    projection_class_embeddings_input_dim is 1280 + 5 * 256)."""
    unet = tiny_sdxl_unet(
        seed,
        block_out_channels=[32, 64, 64, 64],
        attention_head_dim=[1, 2, 4, 4],
        transformer_layers_per_block=2,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        cross_attention_dim=base.text_encoder_2.config.hidden_size,
        projection_class_embeddings_input_dim=TINY_TEXT_EMBED_DIM + 5 * TINY_TIME_EMBED_DIM,
    )
    return StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2, tokenizer=None,
        tokenizer_2=base.tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler.from_config(base.scheduler.config),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
    )


def hand_off(fraction, base_steps, refiner_steps, switch=0.8):
    """Base to ``switch`` of the schedule, refiner from there (diffusers' ensemble of expert denoisers),
    both patched with preset c; returns each side's state and per-call record, and the image."""
    base = tiny_sdxl_pipeline(fresh_seed())
    refiner = tiny_refiner_pipeline(base, fresh_seed())
    sides = {}
    for side, pipe in (("base", base), ("refiner", refiner)):
        atedm.apply(pipe, "c", dsap_fraction=fraction)
        state = atedm.get_state(pipe)
        sides[side] = state, record_calls(pipe.unet, state)
    latents = generate(base, base_steps, guidance=5.0, denoising_end=switch, output_type="latent")
    refiner.set_progress_bar_config(disable=True)
    images = refiner(PROMPT, num_inference_steps=refiner_steps, guidance_scale=5.0, denoising_start=switch,
                     image=latents, generator=torch.Generator().manual_seed(0), output_type="np").images
    return sides, images


@pytest.mark.parametrize("fraction,base_early,refiner_early", [
    (0.9, 8, 1),  # the early phase ends inside the refiner's part: its first call early, its second late
    (0.1, 1, 0),  # the default: only the base's first step; the refiner's first call is no first step
])
def test_refiner_continues_the_base_models_steps(fraction, base_early, refiner_early):
    """10 steps handed off at 0.8: base calls are steps 0-7, the refiner's steps 8 and 9 of the same
    generation, as diffusers keeps the whole schedule in both schedulers."""
    sides, images = hand_off(fraction, base_steps=10, refiner_steps=10)
    (base, base_calls), (refiner, refiner_calls) = sides["base"], sides["refiner"]
    assert (len(base_calls), len(refiner_calls)) == (8, 2)
    assert [c["phase"] for c in base_calls + refiner_calls] == ["early"] * (base_early + refiner_early) + \
        ["late"] * (10 - base_early - refiner_early)
    assert_dsap_ran(base_calls, base, base_early)
    assert_dsap_ran(refiner_calls, refiner, refiner_early)
    assert base.pruned_calls > 0 and refiner.pruned_calls > 0 and np.isfinite(images).all()


def test_refiner_with_its_own_step_count_places_its_steps_in_its_own_schedule():
    """Base 10 steps to 0.8, refiner 20 steps from 0.8: the refiner runs steps 16-19 of its 20, and DSAP's
    early phase is the first 90% of that schedule (steps 0-17), so its first two calls are early. The
    phase is decided by where a step lies in the whole denoising, whichever pipeline runs it."""
    sides, _ = hand_off(0.9, base_steps=10, refiner_steps=20)
    (base, base_calls), (refiner, refiner_calls) = sides["base"], sides["refiner"]
    assert_dsap_ran(base_calls, base, 8)
    assert len(refiner_calls) == 4
    assert_dsap_ran(refiner_calls, refiner, 2)


# --------------------------------------------------------------------------------------------------------------
# EDM schedules (Playground v2.5): timesteps 0.25 * log(sigma)
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler_name,steps,fraction,early", [
    ("edm_dpm_solver", 1, 0.1, 1),
    ("edm_dpm_solver", 8, 0.5, 4),
    ("edm_euler", 6, 0.3, 2),
])
def test_edm_schedule_in_a_pipeline_is_read_by_position(scheduler_name, steps, fraction, early):
    pipe, state, calls = patched_tiny_pipeline(EDM_SCHEDULERS[scheduler_name], fraction)
    latents = generate(pipe, steps, guidance=3.0, output_type="latent")  # CFG batched: one call per step
    assert len(calls) == steps and torch.isfinite(latents).all()
    assert_dsap_ran(calls, state, early)


def test_bare_unet_refuses_timesteps_it_cannot_place_and_follows_a_given_schedule():
    unet = tiny_sdxl_unet(fresh_seed())
    atedm.apply(unet, "c")
    state = atedm.get_state(unet)
    scheduler = EDMDPMSolverMultistepScheduler()
    scheduler.set_timesteps(8)
    edm_timesteps = scheduler.timesteps  # 1.10 down to -1.55
    assert edm_timesteps.max() < 2 and edm_timesteps.min() < 0
    for t in [*edm_timesteps, 1000.5, -3.0]:
        with pytest.raises(ValueError, match=r"atedm\.set_timesteps\(unet, scheduler\.timesteps\)"):
            state.dsap.resolve_phase(t)
    # A refused call stops in atedm's hook, before any block ran or any phase was counted.
    inputs = unet_inputs(batch=2, timestep=float(edm_timesteps[0]), seed=fresh_seed())
    with pytest.raises(ValueError, match="0.25 \\* log\\(sigma\\)"):
        run_unet(unet, inputs)
    assert state.phase_calls == {"early": 0, "late": 0} and state.pruned_calls == 0
    # Integer timesteps at the foot of the DDPM range are the last steps of leading / linspace schedules.
    assert [state.dsap.resolve_phase(t) for t in (1, 0, torch.tensor(999))] == ["late", "late", "early"]

    atedm.set_timesteps(unet, edm_timesteps)
    calls = record_calls(unet, state)
    for t in edm_timesteps:
        run_unet(unet, dict(inputs, timestep=t))
    assert_dsap_ran(calls, state, early=1)

    atedm.set_timesteps(unet, None)
    atedm.set_phase(unet, "late")  # an explicit phase needs no reading of the timestep
    assert state.dsap.resolve_phase(edm_timesteps[-1]) == "late"


def test_bare_unet_without_dsap_takes_any_timestep():
    unet = tiny_sdxl_unet(fresh_seed())
    atedm.apply(unet, "c", dsap_fraction=0.0)
    run_unet(unet, unet_inputs(batch=2, timestep=-1.2, seed=fresh_seed()))
    assert atedm.get_state(unet).phase_calls == {"early": 0, "late": 1}


def test_bare_unet_on_a_long_karras_schedule_must_be_given_it():
    """A 50-step Karras-sigma Euler schedule ends with a non-integer timestep below 2, which EDM's scale
    could also give: refused, and exact once the schedule is given."""
    from atedm.dsap import early_steps

    unet = tiny_sdxl_unet(fresh_seed())
    atedm.apply(unet, "c")
    state = atedm.get_state(unet)
    scheduler = EulerDiscreteScheduler(use_karras_sigmas=True)
    scheduler.set_timesteps(50)
    ambiguous = [float(t) for t in scheduler.timesteps if t < 2 and t != t.floor()]
    assert ambiguous
    with pytest.raises(ValueError, match="non-integer below 2"):
        state.dsap.resolve_phase(ambiguous[0])
    atedm.set_timesteps(unet, scheduler.timesteps)
    early = early_steps(0.1, 50)
    assert [state.dsap.resolve_phase(t) for t in scheduler.timesteps] == ["early"] * early + ["late"] * (50 - early)

"""DSAP, denoising-steps-aware pruning: the first steps of a generation prune less in some blocks.

AT-EDM's attention maps are still noisy in the first denoising steps, so the paper keeps a few blocks
unpruned there. Everything about that lives here (its switches are ``ATEDMConfig.dsap_fraction``,
``dsap_blocks`` and ``dsap_early_ratio``; see docs/method.md, "DSAP"):

* which blocks: the published rule, ``dsap_block_names`` (the first attention block of every down
  stage and the last of every up stage), or the config's explicit list;
* which steps: the first ``early_steps(dsap_fraction, num_steps)`` UNet calls of a generation, at least
  one while DSAP is on, so that few-step models (1-8 steps) keep it;
* which phase a UNet call is in: ``DSAPState.resolve_phase`` reads the step from the timestep the UNet
  receives, so it follows any sampler without a counter that a second generation could desynchronise,
  and a refiner that continues a base model's schedule picks up where the base stopped;
* what a block prunes at in that phase: ``DSAPState.ratio_for``;
* the UNet forward pre-hook that sets the phase of each call: ``install_phase_hook``.
"""

from __future__ import annotations

import weakref

import torch

PHASES = ("early", "late")

# The published early-phase list for SDXL. ``dsap_blocks=None`` applies the same rule to whatever UNet
# is patched (``dsap_block_names``), which gives exactly these four on SDXL.
SDXL_DSAP_BLOCKS = (
    "down_blocks.1.attentions.0",
    "down_blocks.2.attentions.0",
    "up_blocks.0.attentions.2",
    "up_blocks.1.attentions.2",
)

# EDM's timestep 0.25 * log(sigma) stays below this for any sigma_max up to e^8 (about 3000; Playground v2.5
# and the EDM paper use 80, SVD 700). DDPM schedules come this low only in their last steps and on integers,
# except the Karras-sigma ones of Euler and LMS (from 33 steps), Heun (21) and KDPM2 (11) in diffusers 0.42:
# their uneven spacing also puts about twice the intended share of steps above the bare-UNet threshold, so
# such a bare UNet is better given its schedule anyway.
EDM_TIMESTEP_CEILING = 2.0


def early_steps(fraction: float, num_steps: int) -> int:
    """How many of ``num_steps`` UNet evaluations form the early phase: ``fraction * num_steps`` rounded to
    nearest, halves up, and at least one while DSAP is on (``fraction > 0``).

    The floor of one is for few-step models (SDXL-Turbo, Lightning, LCM, Hyper-SD: 1-8 steps), where 10% of
    the steps rounds to none: their first step starts from pure noise, whose attention maps are the
    noisiest of the generation, which is the paper's reason for DSAP in the first place.
    """
    if fraction == 0 or num_steps == 0:
        return 0
    return max(1, int(fraction * num_steps + 0.5))


def check_switches(fraction, blocks) -> tuple[str, ...] | None:
    """Validate ``dsap_fraction`` and ``dsap_blocks`` (``dsap_early_ratio`` is checked with the other
    ratios in ``ATEDMConfig``); returns the blocks as a tuple, or None."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"dsap_fraction must be a number in [0, 1]; got {fraction!r}")
    if blocks is None:
        return None
    if isinstance(blocks, str) or not all(isinstance(name, str) for name in blocks):
        raise ValueError(f"dsap_blocks must be None or a sequence of module names; got {blocks!r}")
    return tuple(blocks)


def dsap_block_names(unet) -> tuple[str, ...]:
    """The published rule on any UNet: the first attention block of every down stage and the last of
    every up stage (SDXL: down_blocks.1/2.attentions.0, up_blocks.0/1.attentions.2)."""
    names = []
    for stage_list, pick_last in (("down_blocks", False), ("up_blocks", True)):
        for index, stage in enumerate(getattr(unet, stage_list, ())):  # a ControlNet has no up blocks
            attentions = getattr(stage, "attentions", None)
            if attentions:
                names.append(f"{stage_list}.{index}.attentions.{len(attentions) - 1 if pick_last else 0}")
    return tuple(names)


def resolve_blocks(unet, configured: tuple[str, ...] | None, fraction: float,
                   attention_blocks: set[str]) -> frozenset[str]:
    """The DSAP blocks of this UNet: the configured names, or the published rule when None. Names that
    are not attention blocks of the UNet are refused while DSAP is on (they would silently do nothing)."""
    if configured is None:
        return frozenset(dsap_block_names(unet))
    unknown = sorted(set(configured) - attention_blocks)
    if unknown and fraction > 0:
        raise ValueError(f"dsap_blocks {unknown} are not attention blocks of this UNet; it has {sorted(attention_blocks)}")
    return frozenset(configured)


class DSAPState:
    """The DSAP side of one patched UNet: its blocks, the phase of the current call and where the step
    index comes from, best first: an explicit phase (``set_phase``), an explicit schedule
    (``set_timesteps``), the scheduler of the pipeline that owns the UNet, the timestep alone."""

    __slots__ = ("fraction", "blocks", "early_ratio", "num_train_timesteps", "phase_override", "timesteps",
                 "_pipeline_ref", "phase", "phase_calls")

    def __init__(self, fraction: float, blocks: frozenset[str], early_ratio: float | None, *,
                 num_train_timesteps: int = 1000, pipeline=None):
        self.fraction = fraction
        self.blocks = blocks
        self.early_ratio = early_ratio
        self.num_train_timesteps = num_train_timesteps
        self.phase_override: str | None = None
        self.timesteps: torch.Tensor | None = None
        self.pipeline = pipeline
        self.phase = "late"
        self.phase_calls = {phase: 0 for phase in PHASES}

    @classmethod
    def for_unet(cls, unet, config, attention_blocks: set[str], pipeline=None) -> "DSAPState":
        """The state of ``config``'s DSAP on ``unet``; a pipeline's scheduler gives the training horizon
        that a bare timestep is read against."""
        scheduler_config = getattr(getattr(pipeline, "scheduler", None), "config", None)
        return cls(
            config.dsap_fraction,
            resolve_blocks(unet, config.dsap_blocks, config.dsap_fraction, attention_blocks),
            config.dsap_early_ratio,
            num_train_timesteps=int(getattr(scheduler_config, "num_train_timesteps", 1000) or 1000),
            pipeline=pipeline,
        )

    @property
    def pipeline(self):
        return self._pipeline_ref() if self._pipeline_ref is not None else None

    @pipeline.setter
    def pipeline(self, pipe) -> None:
        # A weak reference: the pipeline owns the UNet, which owns this state; a strong one would keep a
        # deleted pipeline alive through its own UNet.
        self._pipeline_ref = weakref.ref(pipe) if pipe is not None else None

    def reset(self) -> None:
        self.phase = "late"
        self.phase_calls = {phase: 0 for phase in PHASES}

    def set_phase(self, phase: str | None) -> None:
        if phase is not None and phase not in PHASES:
            raise ValueError(f"phase must be 'early', 'late' or None; got {phase!r}")
        self.phase_override = phase

    def set_timesteps(self, timesteps) -> None:
        self.timesteps = None if timesteps is None else torch.as_tensor(timesteps).detach().float().cpu().flatten()

    def schedule(self) -> torch.Tensor | None:
        """The timesteps of the current generation, if known: set explicitly, or the pipeline's scheduler's."""
        if self.timesteps is not None:
            return self.timesteps
        timesteps = getattr(getattr(self.pipeline, "scheduler", None), "timesteps", None)
        if isinstance(timesteps, torch.Tensor) and timesteps.numel() > 0:
            return timesteps
        return None

    def resolve_phase(self, timestep) -> str:
        """DSAP phase of a UNet call, from the timestep it receives (stateless, so it follows any sampler).

        With a known schedule the step index is the position of the timestep in it, and the first
        ``early_steps(fraction, len(schedule))`` positions are early. diffusers keeps the whole schedule in
        ``scheduler.timesteps`` even when a pipeline runs only part of it (``denoising_end`` of a base
        model, ``denoising_start`` or ``strength`` of img2img and the refiner), so the position is the
        step of the whole generation and the refiner's steps continue the base's. With no schedule (a bare
        UNet), ``phase_from_training_timestep`` reads the timestep alone.
        """
        if self.phase_override is not None:
            return self.phase_override
        if self.fraction == 0 or timestep is None:
            return "late"
        value = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        schedule = self.schedule()
        if schedule is not None:
            index = int(torch.argmin((schedule.detach().float().cpu() - value).abs()))
            return "early" if index < early_steps(self.fraction, len(schedule)) else "late"
        return self.phase_from_training_timestep(value)

    def phase_from_training_timestep(self, value: float) -> str:
        """The phase of a bare UNet's call from its timestep, read on the DDPM training scale [0, T]: above
        ``(1 - fraction) * T`` is early, which matches the step-index rule for evenly spaced schedules, and
        so is the pure-noise timestep T - 1 that trailing and linspace schedules start from, as
        ``early_steps`` makes the first step early at any step count.

        EDM schedules (Playground v2.5's) pass ``0.25 * log(sigma)`` instead, which says nothing about the
        step without the schedule: rather than guess, a timestep that cannot be a DDPM one raises. That is
        one outside [0, T], or a non-integer below ``EDM_TIMESTEP_CEILING``, where the two scales overlap.
        """
        horizon = self.num_train_timesteps
        outside = not 0.0 <= value <= horizon
        if outside or (value < EDM_TIMESTEP_CEILING and value != int(value)):
            where = (f"outside the DDPM training range [0, {horizon}]" if outside else
                     f"a non-integer below {EDM_TIMESTEP_CEILING:g}, where EDM's scale overlaps the DDPM one")
            raise ValueError(
                f"AT-EDM's DSAP cannot tell the denoising step from timestep {value:g} alone: it is {where} "
                "(EDM schedulers, e.g. Playground v2.5's, pass 0.25 * log(sigma), about -1.55 to 1.10). Patch the "
                "pipeline instead of its UNet, give the schedule with atedm.set_timesteps(unet, scheduler.timesteps) "
                "before the loop, or fix the phase with atedm.set_phase(unet, 'early' | 'late')."
            )
        if self.fraction == 1 or value >= horizon - 1 or value > (1.0 - self.fraction) * horizon:
            return "early"
        return "late"

    def begin_call(self, timestep) -> None:
        """Enter the phase of a new UNet call and count it."""
        self.phase = self.resolve_phase(timestep)
        self.phase_calls[self.phase] += 1

    def ratio_for(self, block_name: str, prune_ratio: float) -> float | None:
        """The prune ratio of a block in the current phase, or None when it runs in full."""
        if self.phase == "early" and block_name in self.blocks:
            return self.early_ratio
        return prune_ratio


def install_phase_hook(unet: torch.nn.Module, state: DSAPState):
    """Register the UNet forward pre-hook that sets each call's phase; returns the hook's remover."""

    def phase_pre_hook(module, args, kwargs):
        state.begin_call(args[1] if len(args) > 1 else kwargs.get("timestep"))

    return unet.register_forward_pre_hook(phase_pre_hook, with_kwargs=True).remove

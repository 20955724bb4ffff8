"""Interleaved timing of configs side by side, and a step's time averaged over the schedule like its FLOPs.

Every config is measured once per round, round after round, so that drift (clocks, heat, other load)
hits all of them alike; round 0 warms up (Triton autotuning, torch.compile, the allocator) and is not
recorded. An AT-EDM config with DSAP runs two kinds of UNet step, the early phase (the DSAP blocks
unpruned) and the late one; both are timed, and ``schedule_average`` weighs them as
``atedm.flops_per_step`` weighs their FLOPs: ``early_steps`` early steps, the rest late.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence, TypeVar

import torch

from .patch import set_phase

Config = TypeVar("Config")


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_unet(unet, inputs: dict):
    # Positional sample and timestep: tomesd's hook reads the latent size from args[0].
    rest = {k: v for k, v in inputs.items() if k not in ("sample", "timestep")}
    return unet(inputs["sample"], inputs["timestep"], **rest)


def unet_step_ms(model, inputs: dict, device: torch.device | str) -> float:
    """ms of one UNet call, with the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        call_unet(model, inputs)
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def unet_step_timer(unet, inputs: dict, device: torch.device | str, model=None) -> Callable[[object, str | None], float]:
    """A ``measure`` for ``time_interleaved``: sets ``unet`` to the phase (None: leaves it) and times one
    step of ``model``, a compiled module around ``unet`` (default: ``unet`` itself)."""
    def measure(config, phase: str | None) -> float:
        if phase is not None:
            set_phase(unet, phase)
        return unet_step_ms(unet if model is None else model, inputs, device)

    return measure


def time_interleaved(
    configs: Sequence[Config],
    configure: Callable[[Config], None],
    measure: Callable[[Config, str | None], float],
    repeats: int,
    phases: Callable[[Config], tuple] = lambda config: (None,),
    report: Callable[[int, Config, str | None, float], None] | None = None,
    warm_up: Sequence[Config] | None = None,
) -> list[dict]:
    """Per config, in order, ``{phase: [its times in rounds 1..repeats]}``. Each round configures each
    config once, then measures each of its ``phases``; ``report`` sees every time, round 0's too.
    ``warm_up``: the configs round 0 runs (default: all), for runs too long to warm every config up."""
    times = [{phase: [] for phase in phases(config)} for config in configs]
    for round_index in range(repeats + 1):
        for config, config_times in zip(configs, times):
            if round_index == 0 and warm_up is not None and config not in warm_up:
                continue
            configure(config)
            for phase in phases(config):
                elapsed = measure(config, phase)
                if round_index:
                    config_times[phase].append(elapsed)
                if report is not None:
                    report(round_index, config, phase, elapsed)
    return times


def dsap_phases(early_steps: int) -> tuple[str, ...]:
    """The phases an AT-EDM config is timed in: the late one, and the early one where DSAP has steps."""
    return ("late", "early") if early_steps else ("late",)


def schedule_average(times: dict, early_steps: int, steps: int, pick=statistics.median) -> float:
    """A step's time over a schedule of ``steps``: ``pick`` of each phase's times (``time_interleaved``'s
    dict for one config), ``early_steps`` of them at the early phase's and the rest at the late one's; a
    config timed in one phase only takes that phase's."""
    if "early" not in times:
        [samples] = times.values()
        return pick(samples)
    return (early_steps * pick(times["early"]) + (steps - early_steps) * pick(times["late"])) / steps

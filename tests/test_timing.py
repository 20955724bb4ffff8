"""Interleaved timing and the schedule average (``atedm.timing``), on made-up clocks."""

import random
import statistics

import pytest

from atedm.timing import dsap_phases, schedule_average, time_interleaved


def test_rounds_interleave_every_config_and_drop_the_warm_up():
    configs = ["full", "c", "dagger"]
    phases = {"full": (None,), "c": dsap_phases(5), "dagger": dsap_phases(0)}
    events, reported = [], []
    samples = iter(random.Random(7).sample(range(10_000), 100))

    def measure(config, phase):
        events.append(("measure", config, phase))
        return float(next(samples))

    times = time_interleaved(configs, lambda config: events.append(("configure", config)), measure, 3,
                             phases=phases.__getitem__, report=lambda *seen: reported.append(seen))
    one_round = [("configure", "full"), ("measure", "full", None), ("configure", "c"), ("measure", "c", "late"),
                 ("measure", "c", "early"), ("configure", "dagger"), ("measure", "dagger", "late")]
    assert events == 4 * one_round
    assert [(round_index, config, phase) for round_index, config, phase, _ in reported] == [
        (round_index, *event[1:]) for round_index in range(4) for event in one_round if event[0] == "measure"]
    recorded = {(config, phase): [] for _, config, phase, _ in reported}
    for round_index, config, phase, elapsed in reported:
        if round_index:
            recorded[config, phase].append(elapsed)
    assert times == [{phase: recorded[config, phase] for phase in phases[config]} for config in configs]


@pytest.mark.parametrize("early_steps, steps", [(5, 50), (1, 4), (0, 30)])
def test_schedule_average_weighs_the_phases_like_the_flops(early_steps, steps):
    rng = random.Random(early_steps * 100 + steps)
    late, early = ([rng.uniform(1.0, 100.0) for _ in range(5)] for _ in range(2))
    both = {"late": late, "early": early}
    expected = (early_steps * statistics.median(early) + (steps - early_steps) * statistics.median(late)) / steps
    assert schedule_average(both, early_steps, steps) == expected
    assert schedule_average(both, early_steps, steps, pick=min) == (early_steps * min(early) + (steps - early_steps) * min(late)) / steps
    assert schedule_average({"late": late}, 0, steps) == statistics.median(late)
    assert schedule_average({None: early}, 0, steps, pick=max) == max(early)


def test_warm_up_runs_only_the_configs_it_names_then_every_round_runs_all():
    configs = ["full", "c", "dagger", "d"]
    rng = random.Random(11)
    warm = rng.sample(configs, 2)
    configured = []
    times = time_interleaved(configs, configured.append, lambda config, phase: rng.random(), 2, warm_up=warm)
    assert configured == [config for config in configs if config in warm] + configs + configs
    assert all(len(samples) == 2 for config_times in times for samples in config_times.values())

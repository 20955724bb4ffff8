"""The frontier's machinery (benchmarks/frontier/, benchmarks/fidelity/frontier.py): setting names, putting
each setting on a UNet and taking it off bit-exactly, DeepCache's step reuse alone and around AT-EDM, the
speed script's accounting, and the report's picks against a brute-force reading of random results.
What the frontier found is asserted by the fidelity tests; these check that its plumbing cannot mislead."""

from __future__ import annotations

import csv
import random
import re

import pytest
import torch
from diffusers import EulerDiscreteScheduler

import atedm
from benchmarks.frontier import report, speed
from benchmarks.frontier.settings import SETTINGS, Setting, all_settings, apply_setting, select
from conftest import fresh_seed
from tiny_models import run_unet, tiny_sdxl_unet, unet_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

ONE_PER_FAMILY = ["atedm-c-copy-attention-gwpr", "atedm-a-delta-key_cosine-random", "tomesd-0.5", "todo-2",
                  "deepcache-2", "atedm-c+deepcache-3"]


def test_setting_names_spell_out_their_configs():
    settings = all_settings()
    assert settings[0].name == "full" and len({s.name for s in settings}) == len(settings)
    for setting in settings:
        if setting.family != "atedm":
            continue
        _, preset, recovery, similarity, ranking = setting.name.split("-")
        config = setting.atedm_config()
        assert config.prune_ratio == atedm.get_preset(preset).prune_ratio
        assert (config.recovery, config.similarity, config.ranking) == (recovery, similarity, ranking)
        assert setting.published == ((recovery, similarity, ranking) == ("copy", "attention", "gwpr"))
    assert sum(s.family == "atedm" for s in settings) == 5 * 2 * 2 * 2
    assert [s.name for s in select("deepcache")] == ["deepcache-2", "deepcache-3", "deepcache-5"]
    assert [s.name for s in select("todo-4,full")] == ["full", "todo-4"]  # the frontier's order, not the list's
    with pytest.raises(ValueError, match="family"):
        select("atedm-c-copy-attention")


def _scheduler(steps: int) -> EulerDiscreteScheduler:
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    return scheduler


def _at(inputs: dict, timestep) -> dict:
    return {**inputs, "timestep": timestep}


def _call(unet, inputs: dict) -> torch.Tensor:
    # Positional timestep: DeepCache's helper reads the step from args[1].
    rest = {key: value for key, value in inputs.items() if key not in ("sample", "timestep")}
    with torch.no_grad():
        return unet(inputs["sample"], inputs["timestep"], **rest).sample


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_setting_changes_the_output_and_comes_off_bit_exactly(name):
    unet = tiny_sdxl_unet(seed=fresh_seed())
    scheduler = _scheduler(3)
    inputs = unet_inputs(seed=fresh_seed(), )
    processors = unet.attn_processors
    before = [_call(unet, _at(inputs, t)) for t in scheduler.timesteps]

    remove = apply_setting(unet, SETTINGS[name], scheduler, backend="torch")
    if atedm.get_state(unet) is not None:
        atedm.set_timesteps(unet, scheduler.timesteps)
    during = [_call(unet, _at(inputs, t)) for t in scheduler.timesteps]
    remove()

    assert any(not torch.equal(a, b) for a, b in zip(before, during)), f"{name} changed nothing"
    assert "forward" not in unet.__dict__ and atedm.get_state(unet) is None
    assert all(unet.attn_processors[key] is value for key, value in processors.items())
    for t, want in zip(scheduler.timesteps, before):
        assert torch.equal(_call(unet, _at(inputs, t)), want)


def test_deepcache_needs_the_schedule():
    with pytest.raises(ValueError, match="scheduler"):
        apply_setting(tiny_sdxl_unet(), SETTINGS["deepcache-3"])


def test_deepcache_runs_the_whole_unet_on_its_interval_and_reuses_deep_features_between():
    """Interval 2 over 4 steps: steps 0 and 2 are whole passes (what the plain UNet gives); steps 1 and 3
    recompute only the shallow branch, so the deep features are step 0's and step 2's: a step-1 call
    gives the same output whatever the deep blocks see at step 1 (here: other text embeddings)."""
    unet = tiny_sdxl_unet(seed=fresh_seed())
    scheduler = _scheduler(4)
    steps = [unet_inputs(seed=fresh_seed(), ) for _ in range(4)]
    plain = [_call(unet, _at(inputs, t)) for inputs, t in zip(steps, scheduler.timesteps)]
    remove = apply_setting(unet, SETTINGS["deepcache-2"], scheduler)
    try:
        cached = [_call(unet, _at(inputs, t)) for inputs, t in zip(steps, scheduler.timesteps)]
        assert torch.equal(cached[0], plain[0]) and torch.equal(cached[2], plain[2])
        assert not torch.equal(cached[1], plain[1]) and not torch.equal(cached[3], plain[3])
        other_text = {**steps[3], "encoder_hidden_states": torch.randn_like(steps[3]["encoder_hidden_states"])}
        assert torch.equal(_call(unet, _at(other_text, scheduler.timesteps[3])), cached[3])
    finally:
        remove()


def test_atedm_inside_deepcache_prunes_the_whole_passes():
    """AT-EDM c with DeepCache: a whole pass (step 0) is exactly AT-EDM c's pass."""
    unet = tiny_sdxl_unet(seed=fresh_seed())
    scheduler = _scheduler(3)
    inputs = _at(unet_inputs(seed=fresh_seed(), ), scheduler.timesteps[0])
    remove = apply_setting(unet, SETTINGS["atedm-c-copy-attention-gwpr"], scheduler, backend="torch")
    atedm.set_timesteps(unet, scheduler.timesteps)
    pruned = _call(unet, inputs)
    remove()
    remove = apply_setting(unet, SETTINGS["atedm-c+deepcache-3"], scheduler, backend="torch")
    atedm.set_timesteps(unet, scheduler.timesteps)
    both = _call(unet, inputs)
    remove()
    assert torch.equal(both, pruned) and not torch.equal(pruned, run_unet(unet, inputs))


def test_speed_script_accounts_steps_and_generations(tmp_path, monkeypatch):
    out = tmp_path / "speed.csv"
    monkeypatch.setattr("sys.argv", ["speed", "--tiny", "--dtype", "float32", "--steps", "3", "--height", "128",
                                     "--width", "128", "--settings", "atedm-c-copy-attention-gwpr,todo-2,deepcache-2",
                                     "--out", str(out)])
    speed.main()
    rows = list(csv.DictReader(out.open()))
    assert [(row["setting"], row["measure"]) for row in rows] == [
        ("full", "step"), ("atedm-c-copy-attention-gwpr", "step"), ("todo-2", "step"),
        ("full", "generation"), ("deepcache-2", "generation")]
    by_measure = {}
    for row in rows:
        by_measure.setdefault(row["measure"], {})[row["setting"]] = row
    for measure, named in by_measure.items():
        assert float(named["full"]["speedup"]) == 1.0
        for row in named.values():
            ratio = float(named["full"]["seconds_per_generation"]) / float(row["seconds_per_generation"])
            assert float(row["speedup"]) == pytest.approx(ratio, rel=1e-9)
    # DSAP: c prunes its DSAP blocks less in round(0.1 * 3) = 1 early step of the 3, timed apart.
    assert int(by_measure["step"]["atedm-c-copy-attention-gwpr"]["early_steps"]) == 1
    log = out.with_suffix(".log.jsonl").read_text().splitlines()
    assert sum('"phase": "early"' in line for line in log) == 2  # one warm-up, one measured round


def _random_results(rng: random.Random) -> tuple[dict, dict]:
    speeds = {name: rng.uniform(0.9, 3.0) for name in SETTINGS}
    scores = {name: {"psnr_db": rng.uniform(10, 50), "psnr_sem": rng.uniform(0.1, 1), "feature_distance": rng.random(),
                     "accuracy": rng.random(), "psnr_unrelated_db": 15.0, "feature_distance_unrelated": 1.0}
              for name in SETTINGS if rng.random() < 0.9}
    return speeds, scores


def test_report_picks_the_best_fidelity_among_settings_fast_enough():
    rng = random.Random(fresh_seed())
    speeds, scores = _random_results(rng)
    lines = report.pick_table(speeds, {"m": scores})[2:]
    assert len(lines) == len(report.TARGETS)
    for target, line in zip(report.TARGETS, lines):
        fast = [name for name in scores if speeds[name] >= target]
        want = max(fast, key=lambda name: scores[name]["psnr_db"])
        assert line.split(" | ")[2].split(" (")[0] == want
        others = [n for n in fast if SETTINGS[n].family != SETTINGS[want].family]
        if others:
            runner_up = max(others, key=lambda name: scores[name]["psnr_db"])
            lead = float(re.search(r"\+([\d.]+) dB over (\S+)", line.split(" | ")[5]).group(1))
            assert lead == pytest.approx(scores[want]["psnr_db"] - scores[runner_up]["psnr_db"], abs=0.051)


def test_report_counts_gwpr_against_random_pair_by_pair():
    rng = random.Random(fresh_seed())
    _, scores = _random_results(rng)
    last = report.ranking_table({"m": scores})[-1]
    pairs = [(name, name.removesuffix("-gwpr") + "-random") for name, s in SETTINGS.items()
             if s.family == "atedm" and s.ranking == "gwpr"]
    pairs = [(g, r) for g, r in pairs if g in scores and r in scores]
    won = sum(scores[g]["psnr_db"] > scores[r]["psnr_db"] for g, r in pairs)
    assert last == f"| G-WPR ahead in | {won} of {len(pairs)} |"


def test_setting_dataclass_knows_what_works_across_steps():
    assert Setting("x", "deepcache", deepcache_interval=2).across_steps
    assert not SETTINGS["atedm-c-copy-attention-gwpr"].across_steps and SETTINGS["atedm-c+deepcache-3"].across_steps

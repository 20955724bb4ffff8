"""Counted FLOPs on the full SDXL-base architecture (meta device): the baseline and every preset."""

import pytest

import atedm
from atedm.presets import PRESET_BUDGETS_TFLOPS
from atedm.unets import default_unet_config


@pytest.fixture(scope="module")
def sdxl_config():
    return default_unet_config()


def test_full_sdxl_counts_6_7_tflops_at_1024(sdxl_config):
    report = atedm.flops_per_step(sdxl_config)
    assert report.unet_tflops == pytest.approx(6.7, rel=0.02)
    assert report.overhead_tflops == 0.0


@pytest.mark.parametrize("name", sorted(PRESET_BUDGETS_TFLOPS))
def test_presets_hit_the_paper_budgets(sdxl_config, name):
    report = atedm.flops_per_step(sdxl_config, name)
    assert report.unet_tflops == pytest.approx(PRESET_BUDGETS_TFLOPS[name], rel=0.03)
    assert 0 < report.overhead_tflops < 0.05 * report.unet_tflops  # scoring work is reported apart


def test_pruning_once_at_all_blocks_matches_the_analytic_count(sdxl_config):
    # method.md: rho = 0.63 once per block at all 11 blocks is about 4.06 TFLOPs, dagger about 4.44,
    # and with the four DSAP blocks unpruned about 4.99.
    late = atedm.flops_per_step(sdxl_config, atedm.ATEDMConfig(prune_ratio=0.63, dsap_fraction=0.0))
    assert late.unet_tflops == pytest.approx(4.06, rel=0.01)
    dagger = atedm.flops_per_step(sdxl_config, atedm.ATEDMConfig(prune_ratio=0.63, dsap_fraction=0.0, prune_levels=(3,)))
    assert dagger.unet_tflops == pytest.approx(4.44, rel=0.01)
    assert late.early_unet_tflops == pytest.approx(4.99, rel=0.01)


def test_dsap_average_weights_the_two_phases(sdxl_config):
    report = atedm.flops_per_step(sdxl_config, atedm.ATEDMConfig(dsap_fraction=0.2), num_inference_steps=10)
    assert report.early_steps == 2
    expected = (2 * report.early_unet_tflops + 8 * report.late_unet_tflops) / 10
    assert report.unet_tflops == pytest.approx(expected, rel=1e-9)


def test_flops_reject_sizes_off_the_vae_grid(sdxl_config):
    with pytest.raises(ValueError, match="multiples of 8"):
        atedm.flops_per_step(sdxl_config, height=1020)

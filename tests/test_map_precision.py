"""fp32 models keep an fp32 head-averaged map on the Triton path.

An fp16 map rounds probabilities to 11 bits; under fp32 inputs the reference ranks and matches by
differences finer than that, so the plans of the two backends parted (issue 10: kept sets differed in 3
of 11 blocks of the tiny SDXL-shaped UNet at K = 3; here a recovery source flipped in block 1 and every
later block's input then differed). Each block's plan is recomputed here from the Q and K that its pruning
layer saw in a real forward pass, so a difference in one block cannot cascade into the next.
"""

import pytest
import torch
from op_inputs import row_lse
from tiny_models import run_unet, tiny_sdxl_unet, unet_inputs

import atedm
import atedm.patch as patch
import atedm_kernels.prune_plan as prune_plan
from atedm_kernels import plan_token_pruning


@pytest.fixture(scope="module")
def pruning_layer_inputs():
    """(q, k, lse, num_keep, scale) of every pruning block of a 24 x 24 latent, fp32, K = 3. Four heads at
    level 2 as well, so that the map is materialized there too (materialize_attention_map builds it from
    four heads on) and level 2's 144 tokens make near-ties finer than fp16 likely."""
    unet = tiny_sdxl_unet(attention_head_dim=[1, 4, 4])
    captured = []
    original = patch.plan_token_pruning

    def spy(q, k, lse, num_keep, **kwargs):
        captured.append((q.detach().clone(), k.detach().clone(), num_keep, kwargs["scale"]))
        return original(q, k, lse, num_keep, **kwargs)

    patch.plan_token_pruning = spy
    try:
        atedm.apply(unet, prune_ratio=0.63, gwpr_iterations=3, dsap_fraction=0.0, backend="torch")
        run_unet(unet, unet_inputs(batch=2, height=24, width=24))
    finally:
        patch.plan_token_pruning = original
    return [(q, k, row_lse(q, k, scale), num_keep, scale) for q, k, num_keep, scale in captured]


def _plans(blocks, backend):
    """Per block, the kept indices and the recovery sources concatenated (both discrete, compared exactly)."""
    return [torch.cat(plan_token_pruning(q, k, lse, num_keep, iterations=3, scale=scale, backend=backend), dim=1)
            for q, k, lse, num_keep, scale in blocks]


def test_fp32_model_plans_the_same_on_both_backends(pruning_layer_inputs):
    assert len(pruning_layer_inputs) == 11 and all(q.dtype == torch.float32 for q, *_ in pruning_layer_inputs)
    expected = _plans(pruning_layer_inputs, "torch")
    got = _plans(pruning_layer_inputs, "triton")
    assert [torch.equal(a, b) for a, b in zip(got, expected)] == [True] * 11


def test_an_fp16_map_would_change_the_kept_tokens(pruning_layer_inputs, monkeypatch):
    """The inputs above are sensitive enough to catch the old fp16 map: forced back, blocks part."""
    build_map = prune_plan.head_mean_attention_map
    monkeypatch.setattr(prune_plan, "head_mean_attention_map", lambda q, k, lse, scale, out_dtype, backend: build_map(
        q, k, lse, scale, torch.float16 if backend == "triton" else out_dtype, backend))
    expected = _plans(pruning_layer_inputs, "torch")
    got = _plans(pruning_layer_inputs, "triton")
    assert sum(not torch.equal(a, b) for a, b in zip(got, expected)) >= 1

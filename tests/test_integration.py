"""atedm.apply / remove on a tiny SDXL-shaped UNet: the patched path runs, is exact where it must be,
reverses bit for bit, and refuses bad input with a clear error."""

import math

import pytest
import torch
from diffusers import UNet2DConditionModel

import atedm
from atedm.compat import check_diffusers_version
from atedm_kernels import num_kept_tokens
from tiny_models import run_unet, tiny_sdxl_unet, unet_inputs

LEVEL2 = ["down_blocks.1.attentions.0", "down_blocks.1.attentions.1", "up_blocks.1.attentions.0",
          "up_blocks.1.attentions.1", "up_blocks.1.attentions.2"]
LEVEL3 = ["down_blocks.2.attentions.0", "down_blocks.2.attentions.1", "mid_block.attentions.0",
          "up_blocks.0.attentions.0", "up_blocks.0.attentions.1", "up_blocks.0.attentions.2"]


@pytest.fixture(scope="module")
def unet():
    return tiny_sdxl_unet()


@pytest.fixture(autouse=True)
def _unpatch(unet):
    yield
    atedm.remove(unet)


def test_patched_path_runs_in_every_block_with_the_expected_token_counts(unet):
    atedm.apply(unet, prune_ratio=0.63, dsap_fraction=0.0)
    inputs = unet_inputs(batch=2, height=16, width=16)
    run_unet(unet, inputs)
    state = atedm.get_state(unet)
    assert sorted(state.blocks) == sorted(LEVEL2 + LEVEL3)
    for name, block in state.blocks.items():
        n = 8 * 8 if name in LEVEL2 else 4 * 4  # latent 16 -> 8 at level 2, 4 at level 3
        assert block.pruned_calls == 1, name
        assert block.kept_tokens == (math.ceil(0.37 * n),), name
    assert state.pruned_calls == 11


def test_prune_ratio_zero_reproduces_the_unpatched_output(unet):
    inputs = unet_inputs(batch=2)
    reference = run_unet(unet, inputs)
    atedm.apply(unet, prune_ratio=0.0, dsap_fraction=0.0)
    pruned = run_unet(unet, inputs)
    assert atedm.get_state(unet).pruned_calls == 11
    torch.testing.assert_close(pruned, reference, atol=2e-5, rtol=1e-4)


def test_pruning_changes_the_output(unet):
    inputs = unet_inputs(batch=2)
    reference = run_unet(unet, inputs)
    atedm.apply(unet, prune_ratio=0.8, dsap_fraction=0.0)
    assert not torch.allclose(run_unet(unet, inputs), reference, atol=1e-4)


def test_remove_restores_bit_identical_outputs(unet):
    inputs = unet_inputs(batch=3, height=16, width=24)
    fresh = tiny_sdxl_unet()  # same seed: identical weights, never patched
    expected = run_unet(fresh, inputs)
    atedm.apply(unet, "c")
    run_unet(unet, inputs)
    atedm.remove(unet)
    assert torch.equal(run_unet(unet, inputs), expected)
    assert atedm.get_state(unet) is None
    processors = {k: type(v) for k, v in unet.attn_processors.items()}
    assert processors == {k: type(v) for k, v in fresh.attn_processors.items()}
    assert not unet._forward_pre_hooks and not unet._forward_hooks


def test_apply_is_idempotent_and_reapply_replaces_the_config(unet):
    atedm.apply(unet, "c")
    state = atedm.get_state(unet)
    hooks = len(unet.get_submodule(LEVEL2[0])._forward_pre_hooks)
    atedm.apply(unet, "c")
    assert atedm.get_state(unet) is state
    assert len(unet.get_submodule(LEVEL2[0])._forward_pre_hooks) == hooks
    atedm.apply(unet, "dagger")
    assert atedm.get_state(unet).config == atedm.get_preset("dagger")
    assert len(unet.get_submodule(LEVEL3[0])._forward_pre_hooks) == hooks
    atedm.remove(unet)
    atedm.remove(unet)  # removing twice, or without apply, is a no-op


def test_dagger_leaves_level_two_unpruned(unet):
    atedm.apply(unet, "dagger", dsap_fraction=0.0)
    run_unet(unet, unet_inputs())
    state = atedm.get_state(unet)
    assert sorted(state.blocks) == sorted(LEVEL3)
    assert state.pruned_calls == len(LEVEL3)


@pytest.mark.parametrize("batch,height,width", [(1, 16, 16), (3, 16, 16), (2, 24, 16), (1, 8, 24)])
def test_batch_sizes_and_non_square_latents(unet, batch, height, width):
    atedm.apply(unet, prune_ratio=0.5, dsap_fraction=0.0)
    out = run_unet(unet, unet_inputs(batch=batch, height=height, width=width))
    assert out.shape == (batch, 4, height, width) and torch.isfinite(out).all()
    level2 = atedm.get_state(unet).blocks[LEVEL2[0]]
    assert level2.kept_tokens == (num_kept_tokens((height // 2) * (width // 2), 0.5),)


def test_tiny_grid_keeps_at_least_one_token(unet):
    atedm.apply(unet, prune_ratio=0.99, dsap_fraction=0.0)
    run_unet(unet, unet_inputs(batch=1, height=8, width=8))  # level 3 grid is 2 x 2
    assert atedm.get_state(unet).blocks[LEVEL3[0]].kept_tokens == (1,)


def test_every_layer_mode_prunes_after_each_layer_but_the_last(unet):
    atedm.apply(unet, prune_ratio=0.5, prune_mode="every_layer", dsap_fraction=0.0)
    out = run_unet(unet, unet_inputs(batch=2, height=16, width=16))
    assert torch.isfinite(out).all()
    state = atedm.get_state(unet)
    assert state.blocks[LEVEL3[0]].kept_tokens == (8, 4)  # 16 -> 8 -> 4 tokens over depth 3
    assert state.blocks[LEVEL2[0]].kept_tokens == (32,)


@pytest.mark.parametrize(
    "overrides",
    [dict(head_reduction="rms"), dict(similarity="attention_transposed"), dict(similarity="symmetric"),
     dict(similarity="key_cosine"), dict(cfg_mask_mode="shared_cond"), dict(gwpr_iterations=1),
     dict(ranking="random")],
)
def test_every_switch_runs_the_pruned_path(unet, overrides, monkeypatch):
    """Each switch reaches the plan of every block and changes what the model computes."""
    import atedm.patch as patch

    inputs = unet_inputs(batch=2)
    atedm.apply(unet, prune_ratio=0.63, dsap_fraction=0.0)
    default = run_unet(unet, inputs)
    seen = []
    original_plan = patch.plan_token_pruning

    def plan_spy(*args, **kwargs):
        seen.append({name: kwargs["iterations" if name == "gwpr_iterations" else name] for name in overrides})
        return original_plan(*args, **kwargs)

    monkeypatch.setattr(patch, "plan_token_pruning", plan_spy)
    atedm.apply(unet, prune_ratio=0.63, dsap_fraction=0.0, **overrides)
    out = run_unet(unet, inputs)
    assert seen == [overrides] * 11 and atedm.get_state(unet).pruned_calls == 11
    assert torch.isfinite(out).all() and not torch.equal(out, default)


def test_shared_cond_mask_needs_an_even_batch(unet):
    atedm.apply(unet, cfg_mask_mode="shared_cond", dsap_fraction=0.0)
    with pytest.raises(ValueError, match="even"):
        run_unet(unet, unet_inputs(batch=3))
    run_unet(unet, unet_inputs(batch=2))  # the error left nothing behind
    assert atedm.get_state(unet).blocks[LEVEL2[0]].pruned_calls == 1


def test_bad_input_raises_clear_errors(unet):
    with pytest.raises(TypeError, match="pipeline"):
        atedm.apply(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="prune_ratio"):
        atedm.apply(unet, prune_ratio=1.0)
    with pytest.raises(ValueError, match="prune_ratio"):
        atedm.apply(unet, prune_ratio=-0.1)
    with pytest.raises(KeyError, match="preset"):
        atedm.apply(unet, "e")
    with pytest.raises(ValueError, match="similarity"):
        atedm.apply(unet, similarity="euclid")
    with pytest.raises(ValueError, match="ranking"):
        atedm.apply(unet, ranking="pagerank")
    with pytest.raises(ValueError, match="head_reduction"):
        atedm.apply(unet, head_reduction="max")
    with pytest.raises(ValueError, match="backend"):
        atedm.apply(unet, backend="cuda")
    with pytest.raises(TypeError, match="unknown ATEDMConfig field"):
        atedm.apply(unet, prune_rate=0.5)
    with pytest.raises(ValueError, match="dsap_blocks"):
        atedm.apply(unet, dsap_blocks=("down_blocks.9.attentions.0",))
    with pytest.raises(ValueError, match="no attention block to prune"):
        atedm.apply(unet, prune_levels=(1,))
    assert atedm.get_state(unet) is None  # nothing half-patched


def test_a_unet_without_attention_blocks_is_refused():
    plain = UNet2DConditionModel(
        block_out_channels=(32, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type=None, cross_attention_dim=8,
        layers_per_block=1, sample_size=8,
    )
    with pytest.raises(ValueError, match="no attention block to prune"):
        atedm.apply(plain)


def test_custom_attention_processors_are_refused_not_overwritten(unet):
    class Custom:
        def __call__(self, attn, hidden_states, *args, **kwargs):
            return hidden_states

    layer = unet.get_submodule(LEVEL2[0]).transformer_blocks[0]
    original = layer.attn1.processor
    layer.attn1.set_processor(Custom())
    try:
        with pytest.raises(ValueError, match="custom attention processor"):
            atedm.apply(unet)
        assert isinstance(layer.attn1.processor, Custom) and atedm.get_state(unet) is None
    finally:
        layer.attn1.set_processor(original)


def test_diffusers_version_range_is_enforced():
    check_diffusers_version("0.42.1")
    with pytest.raises(RuntimeError, match="supports diffusers"):
        check_diffusers_version("0.29.2")
    with pytest.raises(RuntimeError, match="supports diffusers"):
        check_diffusers_version("0.50.0")


TRITON_ENTRY_POINTS = [
    ("atedm_kernels.attention_lse", "_attention_with_lse_triton"),
    ("atedm_kernels.attention_map", "_head_mean_attention_map_triton"),
    ("atedm_kernels.gwpr", "_gwpr_scores_triton"),
    ("atedm_kernels.topk_gather", "_topk_keep_indices_triton"),
    ("atedm_kernels.topk_gather", "_gather_tokens_triton"),
    ("atedm_kernels.recovery", "_recovery_source_triton"),
    ("atedm_kernels.recovery", "_scatter_recover_triton"),
]


def test_triton_backend_matches_torch_backend_end_to_end(unet, monkeypatch):
    import importlib

    inputs = unet_inputs(batch=2)
    atedm.apply(unet, prune_ratio=0.63, dsap_fraction=0.0, backend="torch")
    expected = run_unet(unet, inputs)

    launches = {}
    for module_name, function_name in TRITON_ENTRY_POINTS:
        module = importlib.import_module(module_name)
        original = getattr(module, function_name)

        def spy(*args, _original=original, _name=function_name, **kwargs):
            launches[_name] = launches.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, function_name, spy)
    atedm.apply(unet, prune_ratio=0.63, dsap_fraction=0.0, backend="triton")
    got = run_unet(unet, inputs)
    assert atedm.get_state(unet).pruned_calls == 11
    # Every kernel ran in every block, but the map build, which materialize_attention_map skips where
    # recomputing is cheaper (the 2-head level-2 blocks here).
    built = launches.pop("_head_mean_attention_map_triton", 0)
    assert built == len(LEVEL3)
    assert launches == {name: 11 for _, name in TRITON_ENTRY_POINTS if name != "_head_mean_attention_map_triton"}
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3)


def test_patched_unet_compiles_to_one_graph(unet):
    """With the phase fixed (atedm.set_phase), nothing in the patch breaks a torch.compile graph: the
    hooks only touch Python state and the kernels are opaque custom ops. (The PyTorch backend compiles
    with fullgraph=True in tests/test_diffusers_ops.py, with fused QKV and channels_last.)"""
    atedm.apply(unet, "c", backend="triton")
    atedm.set_phase(unet, "late")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(unet)(**unet_inputs(batch=2))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert atedm.get_state(unet).pruned_calls == 11


def test_refiner_shaped_unet_derives_its_dsap_blocks_and_prunes():
    """The SDXL refiner's layout (four levels, attention at the middle two, no attention in the first
    up stage): the default config must work there too, with the published DSAP rule applied."""
    refiner = tiny_sdxl_unet(
        block_out_channels=[32, 64, 64, 64],
        attention_head_dim=[1, 2, 4, 4],
        transformer_layers_per_block=2,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    )
    atedm.apply(refiner, "c")
    state = atedm.get_state(refiner)
    assert state.dsap.blocks == {"down_blocks.1.attentions.0", "down_blocks.2.attentions.0",
                                 "up_blocks.1.attentions.2", "up_blocks.2.attentions.2"}
    assert state.blocks["up_blocks.1.attentions.0"].level == 3 and state.blocks["up_blocks.2.attentions.0"].level == 2
    out = run_unet(refiner, unet_inputs(batch=2, height=16, width=16))
    assert torch.isfinite(out).all() and state.pruned_calls == len(state.blocks)


def test_cpu_one_pass_route_matches_the_two_pass_route(unet, monkeypatch):
    """On the CPU the pruning layer gets Abar from attention_with_map; forcing the two-pass route
    (attention_with_lse, then the map from lse) must keep the same tokens and give the same output."""
    import atedm.patch as patch

    inputs = unet_inputs(batch=2)
    routes, kept = [], []
    original_one_pass, original_plan = patch.attention_with_map, patch.plan_token_pruning

    def one_pass_spy(*args, **kwargs):
        routes.append("one_pass")
        return original_one_pass(*args, **kwargs)

    def plan_spy(*args, **kwargs):
        keep, src = original_plan(*args, **kwargs)
        kept.append(keep)
        return keep, src

    monkeypatch.setattr(patch, "attention_with_map", one_pass_spy)
    monkeypatch.setattr(patch, "plan_token_pruning", plan_spy)
    atedm.apply(unet, "c", dsap_fraction=0.0)
    one_pass = run_unet(unet, inputs)
    one_pass_kept, kept[:] = list(kept), []
    # The tiny UNet's 2-head level-2 blocks recompute instead of building a map; the level-3 ones build one.
    assert len(routes) == len(LEVEL3) and len(one_pass_kept) == 11
    monkeypatch.setattr(patch, "one_pass_map_applies", lambda *args, **kwargs: False)
    two_pass = run_unet(unet, inputs)
    assert len(routes) == len(LEVEL3) and len(kept) == 11  # no one-pass call this time
    assert all(torch.equal(a, b) for a, b in zip(one_pass_kept, kept))
    torch.testing.assert_close(one_pass, two_pass, atol=1e-4, rtol=1e-3)


def fail_third_processor_install(monkeypatch, of_state=None) -> list:
    """Make the third PruningSelfAttnProcessor installation raise (only those of a state other than
    ``of_state``, when given); returns the list of processors whose installation was attempted."""
    from diffusers.models.attention_processor import Attention

    from atedm.patch import PruningSelfAttnProcessor

    original_set_processor = Attention.set_processor
    attempted = []

    def third_fails(self, processor):
        if isinstance(processor, PruningSelfAttnProcessor) and processor.state is not of_state:
            attempted.append(processor)
            if len(attempted) == 3:
                monkeypatch.setattr(Attention, "set_processor", original_set_processor)  # rollback may install
                raise RuntimeError("injected: third processor installation fails")
        return original_set_processor(self, processor)

    monkeypatch.setattr(Attention, "set_processor", third_fails)
    return attempted


def test_a_failed_apply_rolls_back_every_hook_and_processor(unet, monkeypatch):
    """apply's promise "on any error the model is left as it was": the third processor installation
    raises, and nothing of atedm stays behind (hooks, processors, state), so outputs stay bit-identical."""
    inputs = unet_inputs(batch=2)
    before = run_unet(unet, inputs)
    processors = {name: type(proc) for name, proc in unet.attn_processors.items()}

    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())

    hooks_before = hooks()
    attempted = fail_third_processor_install(monkeypatch)
    with pytest.raises(RuntimeError, match="third processor"):
        atedm.apply(unet, prune_ratio=0.63, dsap_fraction=0.0)
    assert len(attempted) == 3  # two were in place when the third failed
    assert atedm.get_state(unet) is None
    assert {name: type(proc) for name, proc in unet.attn_processors.items()} == processors
    assert hooks() == hooks_before
    assert torch.equal(run_unet(unet, inputs), before)


def test_a_failed_reapply_puts_the_previous_patch_back(unet, monkeypatch):
    """Re-applying with another config removes the old patch first; when the new one fails halfway, the
    old one must be back in place, pruning exactly as before."""
    from atedm.patch import PruningSelfAttnProcessor

    inputs = unet_inputs(batch=2)
    atedm.apply(unet, "c", dsap_fraction=0.0)
    state = atedm.get_state(unet)
    before = run_unet(unet, inputs)
    fail_third_processor_install(monkeypatch, of_state=state)
    with pytest.raises(RuntimeError, match="third processor"):
        atedm.apply(unet, "a", dsap_fraction=0.0)
    assert atedm.get_state(unet) is state
    pruned = state.pruned_calls
    assert torch.equal(run_unet(unet, inputs), before)
    assert state.pruned_calls == pruned + len(state.blocks)
    atedm.remove(unet)
    # .processor itself: while patched, unet.attn_processors shows the processors atedm wraps.
    assert not any(isinstance(getattr(m, "processor", None), PruningSelfAttnProcessor) for m in unet.modules())

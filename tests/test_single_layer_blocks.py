"""prune_after="first_self_attention": AT-EDM on SD 1.5/2.x-style UNets, whose blocks have one layer.

The tokens are cut right after the first layer's self-attention (and its residual add), so that layer's
cross-attention and feed-forward already run on the kept tokens. Checked on a tiny SD 1.5-shaped UNet
(conv projections, no added conditioning) against a from-scratch reimplementation of the definition, and
on the tiny SDXL-shaped UNet, where it prunes deeper than the paper's mode.
"""

import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from tolerances import tol

import atedm
from atedm.cli import default_unet_config
from atedm.flops import flops_per_step
from atedm_kernels import num_kept_tokens
from tiny_models import run_unet, tiny_sdxl_unet, unet_inputs

CROSS_DIM = 24
MODE = dict(prune_after="first_self_attention")


def tiny_sd15_unet(seed: int = 0) -> UNet2DConditionModel:
    """SD 1.5's layout (three cross-attention stages of one layer each, conv proj_in/proj_out), tiny."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=1,
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()


def sd15_inputs(batch=2, height=16, width=16, seed=1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, height, width, generator=generator),
        "timestep": torch.tensor(400.0),
        "encoder_hidden_states": torch.randn(batch, 5, CROSS_DIM, generator=generator),
    }


@pytest.fixture(scope="module")
def unet():
    return tiny_sd15_unet()


@pytest.fixture(autouse=True)
def _unpatch(unet):
    yield
    atedm.remove(unet)


def _attention_blocks(unet):
    return [name for name, module in unet.named_modules() if type(module).__name__ == "Transformer2DModel"]


def test_every_single_layer_block_prunes_to_k_tokens(unet):
    inputs = sd15_inputs(height=16, width=12)
    expected = run_unet(unet, inputs)
    atedm.apply(unet, prune_ratio=0.6, dsap_fraction=0.0, **MODE)
    grid_tokens = {}  # block name -> tokens of the latent grid it received

    def recorder(name):
        def record(module, args):
            grid_tokens[name] = args[0].shape[-2] * args[0].shape[-1]  # (B, C, H, W) input
        return record

    hooks = [unet.get_submodule(name).register_forward_pre_hook(recorder(name)) for name in _attention_blocks(unet)]
    try:
        got = run_unet(unet, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    state = atedm.get_state(unet)
    assert sorted(state.blocks) == sorted(grid_tokens) == sorted(_attention_blocks(unet))  # every block, every level
    assert sorted(set(grid_tokens.values())) == [4, 12, 48, 192]  # 16 x 12 down to the mid block's 2 x 2
    for name, block in state.blocks.items():
        assert block.pruned_calls == 1, name
        assert block.kept_tokens == (num_kept_tokens(grid_tokens[name], 0.6),), (name, grid_tokens[name])
    assert got.shape == expected.shape and torch.isfinite(got).all()
    assert (got - expected).abs().max() > 1e-3  # pruning changed the output
    atedm.remove(unet)
    assert torch.equal(run_unet(unet, inputs), expected)  # and remove undoes it bit for bit


def test_prune_ratio_zero_reproduces_the_unpatched_output(unet):
    inputs = sd15_inputs(batch=3)
    expected = run_unet(unet, inputs)
    atedm.apply(unet, prune_ratio=0.0, dsap_fraction=0.0, **MODE)
    got = run_unet(unet, inputs)
    assert all(block.pruned_calls == 1 for block in atedm.get_state(unet).blocks.values())
    torch.testing.assert_close(got, expected, **tol(torch.float32))


def naive_single_layer_block(block, x, encoder_hidden_states, prune_ratio, iterations, recovery="copy"):
    """AT-EDM cut after self-attention, from its definition: float64 maps, loops, sorted tuples."""
    batch, channels, height, width = x.shape
    n = height * width
    hidden = block.proj_in(block.norm(x))  # SD 1.5: conv projection before the reshape
    inner = hidden.shape[1]
    hidden = hidden.permute(0, 2, 3, 1).reshape(batch, n, inner)
    layer = block.transformer_blocks[0]
    attn = layer.attn1
    normed = layer.norm1(hidden)
    q = attn.to_q(normed).double().view(batch, n, attn.heads, -1).transpose(1, 2)
    k = attn.to_k(normed).double().view(batch, n, attn.heads, -1).transpose(1, 2)
    amap = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1).mean(dim=1)
    scores = torch.full((batch, n), 1.0 / n, dtype=torch.float64)
    for _ in range(iterations):
        scores = torch.einsum("bij,bi->bj", amap, scores)
    num_keep = math.ceil((1 - prune_ratio) * n)
    keep = [sorted(sorted(range(n), key=lambda j: (-scores[b, j].item(), j))[:num_keep]) for b in range(batch)]

    after_self_attention = hidden + attn(normed)
    kept = torch.stack([after_self_attention[b, keep[b]] for b in range(batch)])
    kept = kept + layer.attn2(layer.norm2(kept), encoder_hidden_states=encoder_hidden_states)
    kept = kept + layer.ff(layer.norm3(kept))
    full = torch.empty(batch, n, inner)
    for b in range(batch):
        for i in range(n):
            if i in keep[b]:
                full[b, i] = kept[b, keep[b].index(i)]
            else:
                best = max(range(num_keep), key=lambda r: (amap[b, i, keep[b][r]].item(), -r))
                full[b, i] = kept[b, best]
                if recovery == "delta":  # own state at the cut + the match's change since
                    full[b, i] += after_self_attention[b, i] - after_self_attention[b, keep[b][best]]
    out = block.proj_out(full.reshape(batch, height, width, inner).permute(0, 3, 1, 2))
    return out + x


@pytest.mark.parametrize("block_name, recovery", [("down_blocks.0.attentions.0", "copy"),
                                                   ("up_blocks.2.attentions.1", "delta")])
def test_patched_block_matches_the_naive_definition(unet, block_name, recovery):
    block = unet.get_submodule(block_name)
    captured = {}

    def capture(module, args, kwargs, output):
        captured.update(x=args[0], ehs=kwargs["encoder_hidden_states"], out=output[0])

    atedm.apply(unet, prune_ratio=0.55, gwpr_iterations=2, dsap_fraction=0.0, backend="torch", recovery=recovery, **MODE)
    handle = block.register_forward_hook(capture, with_kwargs=True)
    try:
        run_unet(unet, sd15_inputs(seed=torch.randint(0, 2**31, ()).item()))
    finally:
        handle.remove()
    with torch.no_grad():
        expected = naive_single_layer_block(block, captured["x"], captured["ehs"], 0.55, 2, recovery)
    torch.testing.assert_close(captured["out"], expected, **tol(torch.float32))


# The real SD 1.5 UNet architecture (runwayml/stable-diffusion-v1-5, unet/config.json), counted on meta.
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    layers_per_block=2, cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)


def test_counted_flops_on_the_real_sd15_and_sdxl_architectures():
    """SD 1.5 at 512 px saves a little (one layer's cross-attention and feed-forward per block); at its
    4096-token level the map costs about what it saves, hence prune_levels=(2, 3) there. On SDXL the mode
    prunes deeper than the paper's (the first layer's cross-attention and feed-forward too)."""
    sd15_full = flops_per_step(SD15_UNET_CONFIG, None, 512, 512).full_tflops
    totals = {}
    for levels in (None, (2, 3)):
        report = flops_per_step(SD15_UNET_CONFIG, atedm.ATEDMConfig(prune_levels=levels, **MODE), 512, 512)
        totals[levels] = report.unet_tflops + report.overhead_tflops
    assert totals[(2, 3)] < totals[None] < sd15_full, (totals, sd15_full)

    sdxl = default_unet_config()
    counted = {pa: flops_per_step(sdxl, atedm.ATEDMConfig(prune_ratio=0.645, prune_after=pa)) for pa in
               ("first_layer", "first_self_attention")}
    assert counted["first_layer"].overhead_tflops == counted["first_self_attention"].overhead_tflops
    assert counted["first_self_attention"].unet_tflops < counted["first_layer"].unet_tflops


def test_the_mode_compiles_without_graph_breaks(unet):
    atedm.apply(unet, prune_ratio=0.5, **MODE)
    atedm.set_phase(unet, "late")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(unet)(**sd15_inputs())
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    state = atedm.get_state(unet)
    assert sum(block.pruned_calls for block in state.blocks.values()) == len(state.blocks)  # each block once


def test_bad_combinations_are_refused_and_leave_the_model_unpatched(unet, monkeypatch):
    with pytest.raises(ValueError, match="prune_mode='once'"):
        atedm.ATEDMConfig(prune_mode="every_layer", **MODE)
    with pytest.raises(ValueError, match="prune_after"):
        atedm.ATEDMConfig(prune_after="second_layer")
    with pytest.raises(ValueError, match="recovery"):
        atedm.ATEDMConfig(recovery="average")
    with pytest.raises(ValueError, match="prune_mode='once'"):
        atedm.ATEDMConfig(recovery="delta", prune_mode="every_layer")
    layer = unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0")
    monkeypatch.setattr(layer, "norm_type", "ada_norm_zero")
    processors = dict(unet.attn_processors)
    with pytest.raises(ValueError, match="not a plain pre-norm transformer layer"):
        atedm.apply(unet, **MODE)
    assert atedm.get_state(unet) is None
    assert all(unet.attn_processors[name] is processor for name, processor in processors.items())

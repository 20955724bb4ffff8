"""ToDo (benchmarks/todo.py), the token-downsampling baseline: its processor against the definition written out
with plain torch ops, its installation on the tiny UNet (exactly the highest-resolution level's self-attention,
removed bit-exactly), its refusals, and its counted FLOPs against the closed form."""

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch.utils.flop_counter import FlopCounterMode

import atedm
from atedm.flops import build_meta_unet, example_inputs
from atedm.unets import tiny_unet_config
from benchmarks.todo import ToDoAttnProcessor, ToDoState, apply_todo, get_todo_state, remove_todo, todo_flops
from conftest import fresh_seed
from tiny_models import run_unet, tiny_sdxl_unet, unet_inputs
from tolerances import tol

F32 = tol(torch.float32)
# The tiny UNet's highest-resolution attention level (level 2: down_blocks.1 with 2 blocks of 2 layers,
# up_blocks.1 with 3 blocks of 2 layers).
HIGHEST_LEVEL_PREFIXES = ("down_blocks.1.", "up_blocks.1.")
HIGHEST_LEVEL_LAYERS = 10


# Tiny models: intra-op threads only add contention on a busy 2-core CI (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def todo_naive(attn: Attention, tokens: torch.Tensor, grid: tuple[int, int], factor: int, method: str) -> torch.Tensor:
    """ToDo by its definition, in float64: the (B, C, H, W) image of the tokens downsampled by torch's own
    resampling ops, keys and values projected from it, softmax attention for every query, per head."""
    attn = copy.deepcopy(attn).double()
    tokens = tokens.double()
    batch, num_tokens, channels = tokens.shape
    height, width = grid
    image = tokens.transpose(1, 2).reshape(batch, channels, height, width)
    if method == "nearest":
        small = F.interpolate(image, size=(height // factor, width // factor), mode="nearest")
    else:
        small = F.avg_pool2d(image, factor)
    kv_tokens = small.flatten(2).transpose(1, 2)
    heads = attn.heads
    head_dim = channels // heads

    def split(x):
        return x.reshape(batch, -1, heads, head_dim).permute(0, 2, 1, 3)

    query, key, value = split(attn.to_q(tokens)), split(attn.to_k(kv_tokens)), split(attn.to_v(kv_tokens))
    weights = torch.softmax(query @ key.transpose(-1, -2) / head_dim**0.5, dim=-1)
    out = (weights @ value).permute(0, 2, 1, 3).reshape(batch, num_tokens, channels)
    return attn.to_out[0](out).float()


def self_attention(channels: int = 32, heads: int = 4) -> Attention:
    # Biased projections: a bias is where downsampling before the projection could differ from after it.
    return Attention(query_dim=channels, heads=heads, dim_head=channels // heads, bias=True, out_bias=True).eval()


def todo_output(attn: Attention, tokens: torch.Tensor, grid: tuple[int, int], factor: int, method: str) -> torch.Tensor:
    processor = ToDoAttnProcessor(factor, method, ToDoState(latent_size=grid))
    attn.set_processor(processor)
    with torch.no_grad():
        out = attn(tokens)
    assert processor.state.calls == 1
    return out


@pytest.mark.parametrize("method", ["nearest", "avg_pool"])
@pytest.mark.parametrize("grid", [(8, 8), (8, 12), (4, 16)])
@pytest.mark.parametrize("factor", [1, 2, 4])
def test_processor_matches_naive_definition(factor, grid, method):
    attn = self_attention()
    tokens = torch.randn(3, grid[0] * grid[1], 32)
    torch.testing.assert_close(todo_output(attn, tokens, grid, factor, method),
                               todo_naive(attn, tokens, grid, factor, method), **F32)


@pytest.mark.parametrize("grid", [(8, 8), (6, 10)])
def test_factor_one_is_plain_attention(grid):
    attn = self_attention()
    tokens = torch.randn(2, grid[0] * grid[1], 32)
    attn.set_processor(AttnProcessor2_0())
    with torch.no_grad():
        plain = attn(tokens)
    torch.testing.assert_close(todo_output(attn, tokens, grid, 1, "nearest"), plain, **F32)


def test_methods_differ():
    """The two methods keep different keys: a check that each test above can tell them apart."""
    attn = self_attention()
    tokens = torch.randn(2, 64, 32)
    nearest, pooled = (todo_output(attn, tokens, (8, 8), 2, method) for method in ("nearest", "avg_pool"))
    assert (nearest - pooled).abs().max() > 1e-3


def test_apply_patches_exactly_the_highest_resolution_self_attention_and_remove_restores():
    unet = tiny_sdxl_unet(fresh_seed())
    inputs = unet_inputs(height=16, width=24, seed=fresh_seed())
    before = dict(unet.attn_processors)
    plain = run_unet(unet, inputs)

    apply_todo(unet, downsample_factor=2)
    after = unet.attn_processors
    changed = {name for name in before if after[name] is not before[name]}
    expected = {name for name in before
                if name.startswith(HIGHEST_LEVEL_PREFIXES) and name.endswith(".attn1.processor")}
    assert changed == expected and len(expected) == HIGHEST_LEVEL_LAYERS
    assert all(isinstance(after[name], ToDoAttnProcessor) for name in changed)
    patched = run_unet(unet, inputs)
    assert get_todo_state(unet).calls == HIGHEST_LEVEL_LAYERS  # every patched layer ran, once per call
    assert (patched - plain).abs().max() > 1e-3

    apply_todo(unet, downsample_factor=4, method="avg_pool")  # idempotent: replaces the first patch
    remove_todo(unet)
    assert all(unet.attn_processors[name] is processor for name, processor in before.items())
    assert get_todo_state(unet) is None and not unet._forward_pre_hooks
    assert torch.equal(run_unet(unet, inputs), plain)
    remove_todo(unet)  # a no-op when unpatched


@pytest.mark.parametrize("latent", [(16, 16), (16, 24), (24, 8), (15, 19)])
def test_patched_layers_see_their_grid(latent):
    """Inside the UNet each patched layer computes ToDo on the grid the hook derives (latent / 2 at level 2,
    odd sides rounded up as the UNet's downsampler does): a transposed or wrong grid would keep other tokens
    and miss the naive definition."""
    unet = tiny_sdxl_unet(fresh_seed())
    inputs = unet_inputs(batch=1, height=latent[0], width=latent[1], seed=fresh_seed())
    apply_todo(unet, downsample_factor=2, method="nearest")
    seen = {}
    modules = {name: module for name, module in unet.named_modules()
               if isinstance(module, Attention) and isinstance(module.processor, ToDoAttnProcessor)}
    hooks = [module.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, (args[0], out)))
             for name, module in modules.items()]
    try:
        run_unet(unet, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    grid = ((latent[0] + 1) // 2, (latent[1] + 1) // 2)
    assert set(seen) == set(modules)
    for name, (tokens, out) in seen.items():
        expected = todo_naive(modules[name], tokens, grid, 2, "nearest")
        torch.testing.assert_close(out, expected, **F32, msg=name)


def test_levels_choose_the_layers():
    unet = tiny_sdxl_unet(fresh_seed())
    apply_todo(unet, 2, levels=(2, 3))
    patched = {name for name, processor in unet.attn_processors.items() if isinstance(processor, ToDoAttnProcessor)}
    assert patched == {name for name in unet.attn_processors if name.endswith(".attn1.processor")}
    with pytest.raises(ValueError, match=r"levels \[1\] have no self-attention"):
        apply_todo(unet, 2, levels=(1,))
    remove_todo(unet)


@pytest.mark.parametrize("factor", [0, -2, 1.5, True, "2"])
def test_bad_factor_refused(factor):
    with pytest.raises(ValueError, match="downsample_factor must be an int >= 1"):
        ToDoAttnProcessor(factor)
    unet = tiny_sdxl_unet(fresh_seed())
    with pytest.raises(ValueError, match="downsample_factor"):
        apply_todo(unet, factor)
    assert get_todo_state(unet) is None


def test_bad_method_refused():
    with pytest.raises(ValueError, match="method must be one of nearest, avg_pool"):
        ToDoAttnProcessor(2, "bilinear")


def test_grids_it_cannot_downsample_are_refused():
    attn = self_attention()
    with pytest.raises(ValueError, match="cannot downsample a 6x6 token grid by 4"):
        todo_output(attn, torch.randn(1, 36, 32), (6, 6), 4, "nearest")
    # 60 tokens are no level of an 8x8 latent (64, 16, 4, 1 tokens): their layout is unknown.
    with pytest.raises(ValueError, match="60 tokens are no level's grid of the 8x8 latent"):
        todo_output(attn, torch.randn(1, 60, 32), (8, 8), 2, "nearest")
    attn.set_processor(ToDoAttnProcessor(2))
    with pytest.raises(RuntimeError, match="needs the token grid"):
        attn(torch.randn(1, 64, 32))
    attn.set_processor(ToDoAttnProcessor(2, state=ToDoState(latent_size=(8, 8))))
    with pytest.raises(ValueError, match="cross-attention|encoder_hidden_states"):
        attn(torch.randn(1, 64, 32), encoder_hidden_states=torch.randn(1, 7, 32))
    # In the UNet: a 12x12 latent puts 6x6 tokens at level 2, which factor 4 cannot divide.
    unet = apply_todo(tiny_sdxl_unet(fresh_seed()), downsample_factor=4)
    with pytest.raises(ValueError, match="cannot downsample a 6x6 token grid by 4"):
        run_unet(unet, unet_inputs(batch=1, height=12, width=12, seed=fresh_seed()))
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        apply_todo(torch.nn.Linear(2, 2))


def test_atedm_pruning_layers_refuse_todo_and_nothing_changes():
    """ToDo is a baseline on its own: AT-EDM's pruning layers refuse its processor (atedm.processors), and a
    refused apply_todo leaves every processor as it was."""
    unet = tiny_sdxl_unet(fresh_seed())
    atedm.apply(unet, "c")
    before = dict(unet.attn_processors)
    with pytest.raises(ValueError, match="pruning layer of AT-EDM"):
        apply_todo(unet, 2)
    assert all(unet.attn_processors[name] is processor for name, processor in before.items())
    assert get_todo_state(unet) is None
    atedm.remove(unet)


def test_counted_flops_fall_with_the_factor_by_the_closed_form():
    """Each patched layer of N tokens and C channels saves (1 - 1/f^2) of its key and value projections
    (2 x 2 N C^2) and of its two attention matmuls (2 x 2 N^2 C); nothing else changes."""
    config = tiny_unet_config()
    image_size = 64
    counted = {factor: todo_flops(config, image_size, image_size, factor) for factor in (1, 2, 4)}
    with FlopCounterMode(display=False) as plain, torch.no_grad():
        build_meta_unet(config)(**example_inputs(config, 1, image_size, image_size))
    assert counted[1] == plain.get_total_flops()
    tokens = (image_size // 8 // 2) ** 2  # level 2 of an 8x8 latent
    channels = config["block_out_channels"][1]
    saved_at_full_factor = HIGHEST_LEVEL_LAYERS * (4 * tokens * channels**2 + 4 * tokens**2 * channels)
    for factor in (2, 4):
        assert counted[1] - counted[factor] == saved_at_full_factor * (1 - 1 / factor**2)
    assert counted[1] > counted[2] > counted[4]

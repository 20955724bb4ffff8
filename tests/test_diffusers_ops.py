"""diffusers' own operations on a patched UNet, tried as a user would (issue 12, item 9; items 2 and 6).

Each operation either keeps pruning (the pruning layers' processor API reads and replaces the processor atedm
wraps: ``atedm.processors``) or is refused at the moment of the change with a ``ValueError`` that changes
nothing. "Keeps pruning" is checked the same way everywhere (``assert_prunes_like``): every pruning block
runs pruned again, the output matches the pruned output of an identically built model, and it differs from
the unpruned one.
"""

import copy
import functools

import pytest
import torch
from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    CustomDiffusionAttnProcessor2_0,
    FusedAttnProcessor2_0,
    IPAdapterAttnProcessor2_0,
)

import atedm
from atedm.patch import PruningSelfAttnProcessor
from conftest import fresh_seed
from tiny_models import run_unet, tiny_sdxl_pipeline, tiny_sdxl_unet, unet_inputs
from tolerances import tol

# The configuration of the reproductions: single-cut pruning right after the first self-attention,
# DSAP off so that every call prunes.
SETTINGS = dict(prune_after="first_self_attention", dsap_fraction=0.0)
ATOL_F32 = tol(torch.float32)
CLIP_EMBED_DIM = 12  # the tiny IP-Adapter's image-embedding width


# Tiny models: intra-op threads only add contention on a busy 2-core CI (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["first_self_attention", "first_layer"])
def settings(request):
    return dict(SETTINGS, prune_after=request.param)


def pruning_attention(unet) -> dict:
    return {name: module for name, module in unet.named_modules()
            if isinstance(getattr(module, "processor", None), PruningSelfAttnProcessor)}


def processor_objects(unet) -> dict:
    """Every Attention module's processor attribute itself (not what attn_processors reports)."""
    return {name: module.processor for name, module in unet.named_modules() if hasattr(module, "set_processor")}


def assert_prunes_like(unet, inputs, pruned_reference, unpruned_reference):
    state = atedm.get_state(unet)
    before = state.pruned_calls
    out = run_unet(unet, inputs)
    assert state.pruned_calls == before + len(state.blocks)
    torch.testing.assert_close(out, pruned_reference, **ATOL_F32)
    assert (out - unpruned_reference).abs().max() > 100 * ATOL_F32["atol"]
    return out


@pytest.fixture
def twins():
    """Two UNets with the same random weights: one stays unpatched as the reference."""
    seed = fresh_seed()
    return tiny_sdxl_unet(seed), tiny_sdxl_unet(seed), unet_inputs(batch=2, seed=seed)


# --------------------------------------------------------------------------------------------------------------
# Processors set after apply: kept under the pruning wrapper, or refused on the spot
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["set_attn_processor", "set_attn_processor_dict", "set_default_attn_processor",
                                       "attention_slicing", "custom_diffusion_without_q_out"])
def test_a_plain_processor_set_after_apply_keeps_pruning_and_survives_remove(twins, settings, operation):
    unet, reference, inputs = twins
    unpruned = run_unet(reference, inputs)
    atedm.apply(unet, **settings)
    pruned = run_unet(unet, inputs)
    if operation == "set_attn_processor":
        unet.set_attn_processor(AttnProcessor())
    elif operation == "set_attn_processor_dict":
        unet.set_attn_processor({name: AttnProcessor() for name in unet.attn_processors})
    elif operation == "set_default_attn_processor":
        unet.set_default_attn_processor()  # raised diffusers' "Cannot call ..." before: it saw atedm's class
    elif operation == "attention_slicing":
        unet.set_attention_slice(1)
    else:
        unet.set_attn_processor(CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False))
    wrapped = {name: module.processor.original for name, module in pruning_attention(unet).items()}
    assert len(wrapped) == len(atedm.get_state(unet).blocks)
    # diffusers' API sees the user's processors everywhere, the wrappers only where they are
    assert all(proc is unet.attn_processors[f"{name}.processor"] for name, proc in wrapped.items())
    assert_prunes_like(unet, inputs, pruned, unpruned)

    atedm.remove(unet)
    # remove restores what the user set after apply, not what was there at apply
    assert all(unet.get_submodule(name).processor is proc for name, proc in wrapped.items())
    # every processor above computes the same attention, so the unpatched output is back
    torch.testing.assert_close(run_unet(unet, inputs), unpruned, **ATOL_F32)


class ReturnsInput:
    """A user's processor that is not softmax attention: AT-EDM cannot prune under it."""

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return hidden_states


@pytest.mark.parametrize("processor", [ReturnsInput(),
                                       CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=True, hidden_size=64),
                                       CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=False, hidden_size=64,
                                                                       cross_attention_dim=64)],
                         ids=["custom", "custom_diffusion_q_out", "custom_diffusion_kv"])
def test_a_processor_that_cannot_be_wrapped_is_refused_when_set_and_changes_nothing(twins, processor):
    unet, _, inputs = twins
    atedm.apply(unet, **SETTINGS)
    pruned = run_unet(unet, inputs)
    before = processor_objects(unet)
    layer_name = next(iter(pruning_attention(unet)))
    with pytest.raises(ValueError, match="pruning layer of AT-EDM"):
        unet.set_attn_processor(processor)
    with pytest.raises(ValueError, match="pruning layer of AT-EDM"):
        unet.set_attn_processor({name: (processor if name == f"{layer_name}.processor" else AttnProcessor())
                                 for name in unet.attn_processors})
    with pytest.raises(ValueError, match=layer_name.replace(".", r"\.")):
        unet.get_submodule(layer_name).set_processor(processor)  # one module directly
    assert processor_objects(unet) == before  # checked before any processor changed
    assert torch.equal(run_unet(unet, inputs), pruned)
    # a processor on a layer that does not prune stays the user's business
    other = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    unet.get_submodule(other).set_processor(ReturnsInput())
    assert unet.get_submodule(other).processor.__class__ is ReturnsInput


# --------------------------------------------------------------------------------------------------------------
# diffusers' speed recipe: fused QKV projections, channels_last, torch.compile(fullgraph=True)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["fuse_then_apply", "apply_then_fuse"])
def test_fused_qkv_projections_prune_through_the_fused_matmul(twins, order):
    unet, reference, inputs = twins
    unpruned = run_unet(reference, inputs)
    atedm.apply(reference, **SETTINGS)
    pruned = run_unet(reference, inputs)  # unfused, same weights
    if order == "fuse_then_apply":
        unet.fuse_qkv_projections()
        atedm.apply(unet, **SETTINGS)
    else:
        atedm.apply(unet, **SETTINGS)
        unet.fuse_qkv_projections()
    layers = pruning_attention(unet)
    assert all(isinstance(module.processor.original, FusedAttnProcessor2_0) for module in layers.values())
    # The pruning path reads q, k, v from the fused projection, as the processor it wraps does: poison the
    # unfused ones and the output must not change.
    for module in layers.values():
        for projection in (module.to_q, module.to_k, module.to_v):
            projection.weight.data.fill_(float("nan"))
    assert_prunes_like(unet, inputs, pruned, unpruned)
    assert unet.original_attn_processors  # unfuse restores these: the plain processors, still wrapped
    unet.unfuse_qkv_projections()
    assert all(isinstance(module.processor.original, AttnProcessor2_0) for module in pruning_attention(unet).values())


def test_channels_last_prunes_like_contiguous(twins):
    unet, reference, inputs = twins
    unpruned = run_unet(reference, inputs)
    atedm.apply(reference, **SETTINGS)
    pruned = run_unet(reference, inputs)
    unet.to(memory_format=torch.channels_last)
    atedm.apply(unet, **SETTINGS)
    inputs = dict(inputs, sample=inputs["sample"].contiguous(memory_format=torch.channels_last))
    assert_prunes_like(unet, inputs, pruned, unpruned)


def test_the_speed_recipe_compiles_as_one_graph_after_set_phase(twins):
    """diffusers' recipe on a patched UNet: fused QKV, channels_last, torch.compile(fullgraph=True) once the
    phase is fixed. fullgraph=True raises on any graph break; the eager backend keeps the test to Dynamo's
    tracing (Inductor's code generation is not what is checked here)."""
    unet, reference, inputs = twins
    atedm.apply(reference, **SETTINGS)
    pruned = run_unet(reference, inputs)
    unet.fuse_qkv_projections()
    unet.to(memory_format=torch.channels_last)
    atedm.apply(unet, **SETTINGS)
    atedm.set_phase(unet, "late")
    torch._dynamo.reset()
    compiled = torch.compile(unet, fullgraph=True, backend="eager")
    state = atedm.get_state(unet)
    with torch.no_grad():
        out = compiled(**inputs).sample
    assert state.pruned_calls == len(state.blocks)
    torch.testing.assert_close(out, pruned, **ATOL_F32)


# --------------------------------------------------------------------------------------------------------------
# copy.deepcopy
# --------------------------------------------------------------------------------------------------------------


def test_deepcopy_of_a_patched_unet_is_patched_on_its_own(twins):
    unet, reference, inputs = twins
    unpruned = run_unet(reference, inputs)
    atedm.apply(unet, "c", **SETTINGS)
    atedm.set_phase(unet, "late")
    pruned = run_unet(unet, inputs)
    clone = copy.deepcopy(unet)
    original_state, clone_state = atedm.get_state(unet), atedm.get_state(clone)
    assert clone_state is not original_state and clone_state.config == original_state.config
    assert clone_state.dsap.phase_override == "late"
    calls = original_state.pruned_calls
    assert_prunes_like(clone, inputs, pruned, unpruned)
    assert original_state.pruned_calls == calls  # the copy's hooks drive the copy's state only
    atedm.remove(clone)
    torch.testing.assert_close(run_unet(clone, inputs), unpruned, **ATOL_F32)
    assert_prunes_like(unet, inputs, pruned, unpruned)  # the original is still patched
    # and the copy's weights are its own
    clone.conv_in.weight.data.zero_()
    assert_prunes_like(unet, inputs, pruned, unpruned)


def test_deepcopy_of_a_patched_pipeline_follows_the_copied_scheduler():
    pipe = tiny_sdxl_pipeline(fresh_seed())
    atedm.apply(pipe, "c")
    clone = copy.deepcopy(pipe)
    assert atedm.get_state(clone.unet).dsap.pipeline is clone
    assert atedm.get_state(pipe.unet).dsap.pipeline is pipe


# --------------------------------------------------------------------------------------------------------------
# Training through pruning: gradients, with and without gradient checkpointing
# --------------------------------------------------------------------------------------------------------------


def loss_and_gradients(unet, inputs, weights):
    unet.zero_grad(set_to_none=True)
    loss = (unet(**inputs).sample * weights).sum()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in unet.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", ["none", "non_reentrant", "reentrant"])
def test_gradients_through_pruning_are_the_pruned_model_s_own(settings, checkpointing):
    """Before: CheckpointError (non-reentrant), or gradients about 1e-1 off (reentrant): the recomputed layer
    ran unpruned; without checkpointing, backward raised (no autograd formula for the kernels). Now: the
    gradient of the pruned forward, checked against finite differences in float64."""
    seed = fresh_seed()
    unet = tiny_sdxl_unet(seed).double()
    inputs = unet_inputs(batch=2, seed=seed)
    inputs = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() and k != "timestep" else v
              for k, v in inputs.items()}
    inputs["added_cond_kwargs"] = {k: v.double() for k, v in inputs["added_cond_kwargs"].items()}
    atedm.apply(unet, "c", **settings)
    weights = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    loss, plain = loss_and_gradients(unet, inputs, weights)
    if checkpointing != "none":
        unet.enable_gradient_checkpointing(
            None if checkpointing == "non_reentrant"
            else lambda module, *args: torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=True))
        inputs["sample"].requires_grad_(True)  # a reentrant checkpoint needs an input that requires grad
        checkpointed_loss, checkpointed = loss_and_gradients(unet, inputs, weights)
        assert checkpointed.keys() == plain.keys()
        torch.testing.assert_close(checkpointed_loss, loss, **tol(torch.float64))
        for name in plain:
            torch.testing.assert_close(checkpointed[name], plain[name], **tol(torch.float64), msg=name)
    state = atedm.get_state(unet)
    # a weight inside a pruned layer, and one of the pruning layer's own projections
    block = next(iter(state.blocks))
    for name in (f"{block}.transformer_blocks.1.ff.net.2.weight", f"{block}.transformer_blocks.0.attn1.to_k.weight"):
        weight = unet.get_parameter(name)
        direction = torch.randn_like(weight)
        eps = 1e-6
        with torch.no_grad():
            weight += eps * direction
            up = (unet(**inputs).sample * weights).sum()
            weight -= 2 * eps * direction
            down = (unet(**inputs).sample * weights).sum()
            weight += eps * direction
        numeric = (up - down) / (2 * eps)
        analytic = (plain[name] * direction).sum()
        torch.testing.assert_close(analytic, numeric, atol=1e-6, rtol=1e-5, msg=name)
    assert plain[f"{block}.transformer_blocks.0.attn1.to_k.weight"].abs().max() > 0  # the ranking's layer learns too


# --------------------------------------------------------------------------------------------------------------
# IP-Adapter: load before or after apply, unload, image tokens in the pruned layers' cross-attention
# --------------------------------------------------------------------------------------------------------------


def ip_adapter_state_dict(unet) -> dict:
    """A small IP-Adapter in the layout diffusers' loader reads ("image_proj" + "ip_adapter"), random weights."""
    config = unet.config
    cross_dim, channels = config.cross_attention_dim, config.block_out_channels
    image_proj = {"proj.weight": torch.randn(4 * cross_dim, CLIP_EMBED_DIM) * 0.1, "proj.bias": torch.zeros(4 * cross_dim),
                  "norm.weight": torch.ones(cross_dim), "norm.bias": torch.zeros(cross_dim)}
    ip_layers, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        stage = name.split(".")[0]
        index = int(name.split(".")[1]) if stage != "mid_block" else None
        hidden = (channels[-1] if stage == "mid_block" else
                  list(reversed(channels))[index] if stage == "up_blocks" else channels[index])
        for kind in ("to_k_ip", "to_v_ip"):
            ip_layers[f"{key_id}.{kind}.weight"] = torch.randn(hidden, cross_dim) * 0.3
        key_id += 2
    return {"image_proj": image_proj, "ip_adapter": ip_layers}


def ip_inputs(batch: int, seed: int) -> dict:
    inputs = unet_inputs(batch=batch, seed=seed)
    inputs["added_cond_kwargs"]["image_embeds"] = [torch.randn(batch, 1, CLIP_EMBED_DIM)]
    return inputs


@pytest.mark.parametrize("order", ["load_then_apply", "apply_then_load"])
def test_ip_adapter_loads_and_unloads_on_a_patched_pipeline(order, settings):
    seed = fresh_seed()
    pipe, reference = tiny_sdxl_pipeline(seed), tiny_sdxl_pipeline(seed)
    adapter = ip_adapter_state_dict(pipe.unet)
    inputs = ip_inputs(2, seed)
    reference.load_ip_adapter(copy.deepcopy(adapter), subfolder="", weight_name="", image_encoder_folder=None)
    unpruned = run_unet(reference.unet, inputs)
    atedm.apply(reference, **settings)
    pruned = run_unet(reference.unet, inputs)

    if order == "apply_then_load":
        atedm.apply(pipe, **settings)
    # Before: TypeError (the loader rebuilds every processor as type(processor)(), and atedm's needs arguments).
    pipe.load_ip_adapter(copy.deepcopy(adapter), subfolder="", weight_name="", image_encoder_folder=None)
    if order == "load_then_apply":
        atedm.apply(pipe, **settings)
    unet = pipe.unet
    assert any(isinstance(p, IPAdapterAttnProcessor2_0) for p in unet.attn_processors.values())
    assert_prunes_like(unet, inputs, pruned, unpruned)

    # The image tokens reach the cross-attention of the layers that run on the kept tokens.
    block = atedm.get_state(unet).blocks[next(iter(atedm.get_state(unet).blocks))]
    cross_attention = unet.get_submodule(f"{block.name}.transformer_blocks.1.attn2")
    seen = []
    handle = cross_attention.register_forward_hook(lambda m, args, kwargs, out: seen.append((args[0].shape[1], out)),
                                                   with_kwargs=True)
    try:
        run_unet(unet, inputs)
        pipe.set_ip_adapter_scale(0.0)
        run_unet(unet, inputs)
    finally:
        handle.remove()
    (kept, with_image), (_, without_image) = seen
    assert kept == block.kept_tokens[0] < 16 * 16 // 4  # pruned tokens (level-2 grid of 8 x 8 here)
    assert (with_image - without_image).abs().max() > 100 * ATOL_F32["atol"]

    # Before: TypeError after encoder_hid_proj was already cleared (half unloaded).
    pipe.unload_ip_adapter()
    assert unet.encoder_hid_proj is None
    assert not any(isinstance(p, IPAdapterAttnProcessor2_0) for p in unet.attn_processors.values())
    plain_inputs = unet_inputs(batch=2, seed=seed)
    reference.unload_ip_adapter()
    assert_prunes_like(unet, plain_inputs, run_unet(reference.unet, plain_inputs), run_unet(tiny_sdxl_unet(seed), plain_inputs))


def test_ip_adapter_image_embeds_through_the_patched_pipeline():
    """End to end: the pipeline's own ip_adapter_image_embeds path, with CFG, on a patched UNet."""
    pipe = tiny_sdxl_pipeline(fresh_seed())
    pipe.load_ip_adapter(ip_adapter_state_dict(pipe.unet), subfolder="", weight_name="", image_encoder_folder=None)
    atedm.apply(pipe, "c")
    pipe.set_progress_bar_config(disable=True)
    embeds = [torch.randn(2, 1, CLIP_EMBED_DIM)]  # [negative, positive] for CFG
    run = functools.partial(pipe, "a cat", num_inference_steps=2, guidance_scale=5.0, height=32, width=32,
                            ip_adapter_image_embeds=embeds, output_type="np")
    images = run(generator=torch.Generator().manual_seed(0)).images
    pipe.set_ip_adapter_scale(0.0)
    without = run(generator=torch.Generator().manual_seed(0)).images
    assert atedm.get_state(pipe).pruned_calls > 0
    assert abs(images - without).max() > 1e-3

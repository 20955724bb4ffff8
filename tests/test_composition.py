"""What users stack on a pipeline together with atedm: accelerate's CPU offload, LoRA adapters (peft, added
in place or saved and loaded through the pipeline), DeepCache.

atedm only uses torch module hooks and attention processors; accelerate replaces ``module.forward`` of whole
components, peft replaces the projection ``Linear`` layers, DeepCache replaces ``forward`` of UNet blocks. The
tests check that each pair keeps both effects: the pruning path really runs (block statistics), the other
tool's effect is really there (the output changes where it should and matches where it should), and removing
either one leaves exactly the output of the other.
"""

import copy

import numpy as np
import pytest
import torch
from accelerate import cpu_offload
from accelerate.hooks import CpuOffload
from DeepCache import DeepCacheSDHelper
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

import atedm
from conftest import fresh_seed, requires_cuda
from tiny_models import run_unet, tiny_sdxl_pipeline, tiny_sdxl_unet, unet_inputs
from tolerances import tol

PROMPT = "a photo of a cat"
BLOCKS = 11  # pruning blocks of the tiny UNet under preset "c": one pruned pass each per UNet call
ATOL_F32 = tol(torch.float32)


# Tiny models: intra-op threads only add contention on a busy 2-core CI (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def generate(pipe, steps=3, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=5.0, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


def assert_differs(a, b, at_least=1e-3):
    assert np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max() > at_least


# --------------------------------------------------------------------------------------------------------------
# accelerate: model CPU offload
# --------------------------------------------------------------------------------------------------------------
# diffusers 0.42.1's enable_model_cpu_offload() raises "requires accelerator, but not found" on a machine
# without one, but enable_model_cpu_offload(device="cpu") installs the real accelerate CpuOffload hooks (with
# "cpu:0" as execution device) and runs the same code path: hooks on every component, re-installed by
# maybe_free_model_hooks at the end of every call. Only the device copies are no-ops.


@pytest.mark.parametrize("order", ["offload_then_apply", "apply_then_offload"])
def test_model_cpu_offload_keeps_pruning_across_calls(order):
    reference = tiny_sdxl_pipeline()
    plain = generate(reference)
    atedm.apply(reference, "c", dsap_fraction=0.5)
    pruned = generate(reference)

    pipe = tiny_sdxl_pipeline()
    if order == "apply_then_offload":
        atedm.apply(pipe, "c", dsap_fraction=0.5)
    pipe.enable_model_cpu_offload(device="cpu")
    hook, hooks = pipe.unet._hf_hook, list(pipe._all_hooks)
    assert isinstance(hook, CpuOffload) and pipe._execution_device == torch.device("cpu:0")
    if order == "offload_then_apply":
        atedm.apply(pipe, "c", dsap_fraction=0.5)
    # apply leaves accelerate's hooks and its forward wrapper in place.
    assert pipe.unet._hf_hook is hook and pipe._all_hooks == hooks and hasattr(pipe.unet, "_old_forward")

    # Two generations: after the first, maybe_free_model_hooks strips accelerate's hooks from every module
    # (remove_hook_from_module, recurse=True) and installs new ones; atedm's hooks must survive that.
    for generation in (1, 2):
        np.testing.assert_array_equal(generate(pipe), pruned)
        state = atedm.get_state(pipe)
        assert state.phase_calls == {"early": 2 * generation, "late": generation}
        assert state.pruned_calls == generation * atedm.get_state(reference).pruned_calls > 0
        assert isinstance(pipe.unet._hf_hook, CpuOffload)

    hook = pipe.unet._hf_hook
    atedm.remove(pipe)
    assert pipe.unet._hf_hook is hook and hasattr(pipe.unet, "_old_forward")
    np.testing.assert_array_equal(generate(pipe), plain)  # offloaded, unpatched: the plain output exactly
    pipe.remove_all_hooks()
    np.testing.assert_array_equal(generate(pipe), plain)


def test_sequential_offload_of_the_unet_runs_pruned_from_meta_weights():
    """accelerate.cpu_offload: every weight lives on the meta device and each leaf module loads its own
    weights around its forward. The pruning processor calls attn.to_q/to_k/to_v/to_out as modules, so it
    works on offloaded weights. (pipe.enable_sequential_cpu_offload(device="cpu") fails inside the CLIP text
    encoder with accelerate 1.15 / transformers 5.24 before the UNet runs, with or without atedm.)"""
    inputs = unet_inputs(batch=2, seed=fresh_seed())
    reference = tiny_sdxl_unet()
    plain = run_unet(reference, inputs)
    atedm.apply(reference, "c", dsap_fraction=0.0)
    pruned = run_unet(reference, inputs)

    unet = tiny_sdxl_unet()
    cpu_offload(unet, execution_device=torch.device("cpu"))
    assert unet.conv_in.weight.device.type == "meta"
    atedm.apply(unet, "c", dsap_fraction=0.0)
    torch.testing.assert_close(run_unet(unet, inputs), pruned, rtol=0, atol=0)
    assert atedm.get_state(unet).pruned_calls == BLOCKS
    atedm.remove(unet)
    torch.testing.assert_close(run_unet(unet, inputs), plain, rtol=0, atol=0)
    assert unet.conv_in.weight.device.type == "meta"  # still offloaded


@requires_cuda
def test_enable_model_cpu_offload_on_cuda_matches_the_pipeline_on_cuda():
    """The real path: components wait on the CPU and move to the GPU only for their forward."""
    reference = tiny_sdxl_pipeline().to("cuda")
    offloaded = tiny_sdxl_pipeline()
    offloaded.enable_model_cpu_offload()
    assert offloaded._execution_device.type == "cuda"
    plain = generate(reference, steps=4)
    np.testing.assert_allclose(generate(offloaded, steps=4), plain, **ATOL_F32)
    for pipe in (reference, offloaded):
        atedm.apply(pipe, "c", dsap_fraction=0.5)
    expected = generate(reference, steps=4)
    got = generate(offloaded, steps=4)
    np.testing.assert_allclose(got, expected, **ATOL_F32)
    assert_differs(got, plain)
    state = atedm.get_state(offloaded)
    assert state.phase_calls == {"early": 2, "late": 2}
    assert state.pruned_calls == atedm.get_state(reference).pruned_calls > 0
    assert offloaded.unet.device.type == "cpu"  # offloaded again after the call
    atedm.remove(offloaded)
    np.testing.assert_allclose(generate(offloaded, steps=4), plain, **ATOL_F32)
    assert isinstance(offloaded.unet._hf_hook, CpuOffload)


# --------------------------------------------------------------------------------------------------------------
# LoRA (peft)
# --------------------------------------------------------------------------------------------------------------
ALL_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]
# Only the self-attention of the first layer of every pruning block, whose processor AT-EDM replaces: a LoRA
# there changes the pruned output only through PruningSelfAttnProcessor's projections.
PRUNING_LAYERS_ONLY = r".*attentions\.\d+\.transformer_blocks\.0\.attn1\.(to_q|to_k|to_v|to_out\.0)"


def add_random_lora(unet, seed, target_modules=ALL_PROJECTIONS, adapter_name="default"):
    """A rank-4 LoRA with random A and B (peft starts B at zero, which would change nothing)."""
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=target_modules), adapter_name=adapter_name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return unet


def merged_copy(unet):
    """The same model with every LoRA folded into its base weights (no adapter left to bypass)."""
    merged = copy.deepcopy(unet)
    for module in merged.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    return merged


@pytest.mark.parametrize("targets", [ALL_PROJECTIONS, PRUNING_LAYERS_ONLY], ids=["all_projections", "pruning_layers"])
def test_pruning_a_peft_lora_unet(targets):
    seed = fresh_seed()
    inputs = unet_inputs(batch=2, seed=seed)
    unet = tiny_sdxl_unet()
    plain = run_unet(unet, inputs)
    atedm.apply(unet, "c", dsap_fraction=0.0)
    plain_pruned = run_unet(unet, inputs)
    atedm.remove(unet)

    add_random_lora(unet, seed + 1, targets)
    processor = unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1").processor
    lora = run_unet(unet, inputs)
    assert_differs(lora, plain, 1e-2)
    merged = merged_copy(unet)

    atedm.apply(unet, "c", dsap_fraction=0.0)
    lora_pruned = run_unet(unet, inputs)
    assert atedm.get_state(unet).pruned_calls == BLOCKS
    # The LoRA is not bypassed on the pruned path (with "pruning_layers" it lives only in the replaced
    # processors' projections), and it is applied exactly: same as the merged weights, pruned.
    assert_differs(lora_pruned, plain_pruned, 1e-2)
    atedm.apply(merged, "c", dsap_fraction=0.0)
    torch.testing.assert_close(lora_pruned, run_unet(merged, inputs), **ATOL_F32)
    # The LoRA scale users pass at call time reaches the pruned path too: scale 0 is the model without LoRA.
    with torch.no_grad():
        scale_zero = unet(**inputs, cross_attention_kwargs={"scale": 0.0}).sample
    torch.testing.assert_close(scale_zero, plain_pruned, **ATOL_F32)
    unet.disable_adapters()
    torch.testing.assert_close(run_unet(unet, inputs), plain_pruned, **ATOL_F32)
    unet.enable_adapters()

    atedm.apply(unet, "c", prune_ratio=0.0, dsap_fraction=0.0)  # keep every token: the LoRA model's output
    torch.testing.assert_close(run_unet(unet, inputs), lora, **ATOL_F32)
    assert atedm.get_state(unet).pruned_calls == BLOCKS

    atedm.remove(unet)
    torch.testing.assert_close(run_unet(unet, inputs), lora, rtol=0, atol=0)
    assert unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1").processor is processor


@pytest.fixture
def saved_lora(tmp_path):
    """A random UNet LoRA saved in diffusers' format by the pipeline's own save_lora_weights."""
    source = tiny_sdxl_pipeline()
    add_random_lora(source.unet, fresh_seed())
    source.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(source.unet))
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    return tmp_path


def test_lora_loaded_before_or_after_apply(saved_lora):
    first = tiny_sdxl_pipeline()
    plain = generate(first, steps=2)
    first.load_lora_weights(saved_lora, adapter_name="cat")
    lora = generate(first, steps=2)
    assert_differs(lora, plain)
    atedm.apply(first, "c", dsap_fraction=0.0)  # load, then apply
    lora_pruned = generate(first, steps=2)
    assert atedm.get_state(first).pruned_calls == 2 * BLOCKS
    assert np.isfinite(lora_pruned).all()
    atedm.remove(first)
    np.testing.assert_array_equal(generate(first, steps=2), lora)
    atedm.apply(first, "c", dsap_fraction=0.0)
    first.fuse_lora()  # LoRA folded into the weights while patched: same pruned output
    np.testing.assert_allclose(generate(first, steps=2), lora_pruned, **ATOL_F32)

    second = tiny_sdxl_pipeline()
    atedm.apply(second, "c", dsap_fraction=0.0)
    plain_pruned = generate(second, steps=2)
    assert_differs(lora_pruned, plain_pruned)
    second.load_lora_weights(saved_lora, adapter_name="cat")  # apply, then load: peft swaps the Linear layers
    np.testing.assert_array_equal(generate(second, steps=2), lora_pruned)
    assert atedm.get_state(second).pruned_calls == 4 * BLOCKS
    second.unload_lora_weights()  # and unloading while patched gives the plain pruned model back
    np.testing.assert_array_equal(generate(second, steps=2), plain_pruned)
    atedm.remove(second)
    np.testing.assert_array_equal(generate(second, steps=2), plain)


# --------------------------------------------------------------------------------------------------------------
# DeepCache
# --------------------------------------------------------------------------------------------------------------
# DeepCacheSDHelper replaces ``forward`` of the UNet and of its down/mid/up blocks, attentions and resnets by
# wrappers that return the previous step's output on cached steps. torch hooks still fire around a cached
# attention block (they live in Module.__call__), but its layers do not run, so AT-EDM prunes exactly the
# blocks that really compute.


def count_block_runs(pipe) -> dict:
    """Independent count of the passes that really ran each pruning block's last layer."""
    runs = {name: 0 for name in atedm.get_state(pipe).blocks}
    for name in runs:
        def hook(module, args, output, name=name):
            runs[name] += 1
        pipe.unet.get_submodule(name).transformer_blocks[-1].register_forward_hook(hook)
    return runs


@pytest.mark.parametrize("branch", [0, 4], ids=["shallow_branch", "deeper_branch"])
def test_deepcache_and_atedm_together(branch):
    steps = 4
    pipe = tiny_sdxl_pipeline()
    plain = generate(pipe, steps)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=2, cache_branch_id=branch)
    helper.enable()
    try:
        cached = generate(pipe, steps)
    finally:
        helper.disable()
    atedm.apply(pipe, "c", dsap_fraction=0.0)
    pruned = generate(pipe, steps)
    atedm.get_state(pipe).reset()
    runs = count_block_runs(pipe)

    helper.enable()
    try:
        both = generate(pipe, steps)
        state = atedm.get_state(pipe)
        assert np.isfinite(both).all()
        assert_differs(both, cached)
        assert_differs(both, pruned)
        assert sum(state.phase_calls.values()) == steps  # the UNet is called every step, cached or not
        pruned_per_block = {name: block.pruned_calls for name, block in state.blocks.items()}
        assert pruned_per_block == runs  # pruned whenever a block computes, never on a cached block
        # Every block computes on the uncached steps (1 and 3); with the deeper branch some also on cached ones.
        expected_counts = {steps // 2} if branch == 0 else {steps // 2, steps}
        assert set(pruned_per_block.values()) == expected_counts

        atedm.remove(pipe)  # removing AT-EDM under DeepCache: DeepCache's output exactly
        np.testing.assert_array_equal(generate(pipe, steps), cached)
        atedm.apply(pipe, "c", dsap_fraction=0.0)  # and applying on top of DeepCache: the same combination
        np.testing.assert_array_equal(generate(pipe, steps), both)
    finally:
        helper.disable()
    np.testing.assert_array_equal(generate(pipe, steps), pruned)
    atedm.remove(pipe)
    np.testing.assert_array_equal(generate(pipe, steps), plain)

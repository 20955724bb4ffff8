"""``apply`` / ``remove``: hook AT-EDM into a diffusers SDXL UNet without copying any ``forward``.

Per pruning block (a ``Transformer2DModel`` with at least two transformer layers), using only diffusers'
extension points:

* a forward pre-hook on the block decides whether it prunes in this call (level, DSAP phase);
* the first layer's self-attention gets ``PruningSelfAttnProcessor``: it computes the attention output
  together with the row log-sum-exp, then the pruning plan (G-WPR scores, kept indices, recovery sources);
* a forward hook on the first layer returns only the kept rows, so later layers run on k tokens
  (with ``prune_after="first_self_attention"`` a forward pre-hook on the first layer runs its
  self-attention and residual add instead and passes the kept rows on, so even the first layer's
  cross-attention and feed-forward run on k tokens: the mode for SD 1.5/2.x's single-layer blocks);
* a forward hook on the last layer rebuilds the full (B, N, C) stream by similarity-based copy, so the
  block's ``proj_out``, reshape and residual add see the whole grid again;
* a forward pre-hook on the UNet sets the DSAP phase from the timestep it receives (``atedm.dsap``).

``remove`` restores the original processors and drops every hook: the UNet is then bit-identical to one
that was never patched.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from atedm_kernels import (
    attention_with_lse,
    attention_with_map,
    compose_sources,
    gather_tokens,
    num_kept_tokens,
    one_pass_map_applies,
    plan_token_pruning,
    scatter_recover,
    scatter_recover_delta,
)

from .compat import check_diffusers_version
from .config import ATEDMConfig
from .dsap import DSAPState, install_phase_hook
from .presets import resolve_config
from .processors import (
    ProcessorWrapper,
    guard_attention,
    guard_set_attn_processor,
    uses_fused_projections,
    why_not_wrappable,
)
from .state import ATEDMState, BlockState

_STATE_ATTR = "_atedm_state"


class PruningSelfAttnProcessor(ProcessorWrapper):
    """Self-attention of a pruning layer: attention output plus the pruning plan of its block.

    When the block does not prune in this call the processor it wraps (``original``) runs unchanged. While
    patched, diffusers' processor API reads and replaces ``original`` (``atedm.processors``).
    """

    def __init__(self, state: ATEDMState, block: BlockState, original: Any, layer_name: str):
        self.state = state
        self.block = block
        self.original = original
        self.layer_name = layer_name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        block, config = self.block, self.state.config
        if block.active_ratio is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if block.self_attention_done:
            # prune_after="first_self_attention": this self-attention already ran on every token in the
            # layer's pre-hook and its residual sum is the kept rows the layer now sees; add nothing.
            block.self_attention_done = False
            return hidden_states.new_zeros(*hidden_states.shape[:-1], attn.out_dim)
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.dim() != 3:
            raise RuntimeError(
                f"AT-EDM prunes from plain self-attention on (B, N, C) tokens; block {block.name} got "
                f"encoder_hidden_states={encoder_hidden_states is not None}, attention_mask="
                f"{attention_mask is not None}, hidden_states of shape {tuple(hidden_states.shape)}"
            )
        residual = hidden_states
        batch, num_tokens, _ = hidden_states.shape
        expected = block.grid_tokens if not block.keep else block.keep[-1].shape[1]
        if expected is not None and num_tokens != expected:
            raise RuntimeError(
                f"{block.name}: self-attention saw {num_tokens} tokens where AT-EDM expects {expected}; another "
                "patch changes the token count inside the block (tomesd?). Use one token-reduction method at a time."
            )
        if uses_fused_projections(self.original):  # fuse_qkv_projections(): one matmul, as the wrapped processor does
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # Training through pruning (a LoRA trained with atedm on): the plan is discrete (kept indices and
        # recovery sources) and needs no gradient, but the kernels have no backward, so the attention output
        # is taken from PyTorch's differentiable attention instead of theirs.
        differentiable = needs_gradients(query, key, value)
        plan_switches = dict(iterations=config.gwpr_iterations, head_reduction=config.head_reduction,
                             similarity=config.similarity, ranking=config.ranking, backend=config.backend)
        with torch.no_grad() if differentiable else contextlib.nullcontext():
            if one_pass_map_applies(query, **plan_switches):
                # CPU: attention and Abar from the same probabilities (a second pass would cost a whole
                # attention again); Abar then carries everything the plan reads.
                out, attention_map = attention_with_map(query, key, value, scale=attn.scale)
                lse = None
            else:
                out, lse = attention_with_lse(query, key, value, scale=attn.scale, backend=config.backend)
                attention_map = None
            with self.state.overhead_scope():
                keep, src = plan_token_pruning(
                    query,
                    key,
                    lse,
                    num_kept_tokens(num_tokens, block.active_ratio),
                    attention_map=attention_map,
                    cfg_mask_mode=config.cfg_mask_mode,
                    scale=attn.scale,
                    **plan_switches,
                )
        if differentiable:
            out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
        block.keep.append(keep)
        block.src.append(src)

        out = out.transpose(1, 2).reshape(batch, num_tokens, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _resolve_unet(pipe_or_unet) -> tuple[UNet2DConditionModel | ControlNetModel, Any]:
    """The model to patch and the pipeline that owns it (None for a bare model).

    A pipeline means its UNet; a ``ControlNetModel`` given on its own is patched as well (the opt-in for
    pruning a ControlNet's attention blocks: it has the UNet's down and mid blocks, so the same hooks apply).
    """
    if isinstance(pipe_or_unet, (UNet2DConditionModel, ControlNetModel)):
        return pipe_or_unet, None
    if isinstance(pipe_or_unet, MultiControlNetModel):
        raise TypeError("a MultiControlNetModel holds several ControlNets; patch each one: "
                        "for net in pipe.controlnet.nets: atedm.apply(net, ...)")
    unet = getattr(pipe_or_unet, "unet", None)
    if isinstance(unet, UNet2DConditionModel):
        return unet, pipe_or_unet
    raise TypeError(
        "atedm.apply/remove expect a diffusers SDXL pipeline (with a .unet), a UNet2DConditionModel or a "
        f"ControlNetModel; got {type(pipe_or_unet).__name__}"
    )


def block_level(name: str, unet: UNet2DConditionModel | ControlNetModel) -> int:
    """Resolution level of an attention block, 1 = full latent resolution (see ATEDMConfig.prune_levels)."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1]) + 1
    if parts[0] == "up_blocks":
        return len(unet.up_blocks) - int(parts[1])
    return len(unet.down_blocks)  # the mid block sits at the deepest level (a ControlNet has no up blocks)


def _attention_blocks(unet: UNet2DConditionModel) -> dict[str, Transformer2DModel]:
    """Every spatial attention block of the UNet (a Transformer2DModel on a (B, C, H, W) input), by name."""
    return {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, Transformer2DModel) and module.is_input_continuous
    }


def _find_blocks(unet: UNet2DConditionModel, config: ATEDMConfig,
                 attention_blocks: dict[str, Transformer2DModel]) -> dict[str, BlockState]:
    blocks = {}
    after_self_attention = config.prune_after == "first_self_attention"
    min_depth = 1 if after_self_attention else 2
    for name, module in attention_blocks.items():
        depth = len(module.transformer_blocks)
        level = block_level(name, unet)
        if depth < min_depth or (config.prune_levels is not None and level not in config.prune_levels):
            continue
        if after_self_attention:
            _check_cuttable_after_self_attention(f"{name}.transformer_blocks.0", module.transformer_blocks[0])
        pruning_layers = (0,) if config.prune_mode == "once" else tuple(range(depth - 1))
        for index in pruning_layers:
            attn = module.transformer_blocks[index].attn1
            processor = attn.processor
            if isinstance(processor, PruningSelfAttnProcessor):  # re-applying: judge what we wrap
                processor = processor.original
            reason = why_not_wrappable(processor)
            if reason is not None:
                raise ValueError(
                    f"{name}.transformer_blocks.{index}.attn1 uses a custom attention processor ({reason}); "
                    "AT-EDM prunes only under processors that compute plain softmax attention. Restore them "
                    "(unet.set_default_attn_processor()) or remove the other patch first."
                )
            if attn.spatial_norm is not None or attn.group_norm is not None or attn.is_cross_attention:
                raise ValueError(f"{name}.transformer_blocks.{index}.attn1 is not a plain self-attention")
        blocks[name] = BlockState(name=name, level=level, depth=depth, pruning_layers=pruning_layers)
    if not blocks:
        hint = ("; single-layer blocks (SD 1.5/2.x) can prune with prune_after='first_self_attention'"
                if not after_self_attention and any(len(m.transformer_blocks) == 1 for m in attention_blocks.values())
                else "")
        raise ValueError(
            f"found no attention block to prune: AT-EDM needs Transformer2DModel blocks with at least {min_depth} "
            f"transformer layer(s) (at prune_levels={config.prune_levels}); this UNet has "
            f"{ {n: len(m.transformer_blocks) for n, m in attention_blocks.items()} or 'none'}{hint}"
        )
    return blocks


def _check_cuttable_after_self_attention(name: str, layer: torch.nn.Module) -> None:
    """prune_after="first_self_attention" runs the layer's norm1 + attn1 + residual in a pre-hook, as
    diffusers' BasicTransformerBlock does for its plain pre-norm layout; refuse any other layout."""
    plain = (
        isinstance(layer, BasicTransformerBlock)
        and getattr(layer, "norm_type", None) == "layer_norm"
        and not getattr(layer, "only_cross_attention", False)
        and getattr(layer, "pos_embed", None) is None
    )
    if not plain:
        raise ValueError(
            f"{name} is not a plain pre-norm transformer layer ({type(layer).__name__}, norm_type="
            f"{getattr(layer, 'norm_type', None)!r}); prune_after='first_self_attention' supports "
            "BasicTransformerBlock with norm_type='layer_norm' (SDXL, SD 1.5/2.x)"
        )


def _check_input_devices(unet: UNet2DConditionModel, args: tuple, kwargs: dict) -> None:
    """Mixed devices would otherwise fail deep inside a convolution or, worse, inside a pruning kernel."""
    names = ("sample", "timestep", "encoder_hidden_states")
    inputs = {name: value for name, value in zip(names, args)}
    inputs.update((name, kwargs[name]) for name in names if name in kwargs)
    inputs.pop("timestep", None)  # diffusers moves the timestep to the sample's device itself
    for name, value in (kwargs.get("added_cond_kwargs") or {}).items():
        inputs[f"added_cond_kwargs[{name!r}]"] = value
    devices = {name: value.device for name, value in inputs.items() if isinstance(value, torch.Tensor)}
    # accelerate's offload hooks (model-level on the UNet, sequential on its leaves) move the weights to the
    # inputs' device inside forward, after this hook: then the weights' device says nothing yet.
    if not hasattr(unet, "_hf_hook") and not hasattr(unet.conv_in, "_hf_hook"):
        devices["the UNet's weights"] = unet.conv_in.weight.device
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"AT-EDM: the UNet's inputs and weights must be on one device; got {listing}")


def needs_gradients(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records this call (training through pruning)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _stream_backend(backend: str, *tensors: torch.Tensor | None) -> str:
    """The backend of an op on the token stream (gather, recovery): its PyTorch path while autograd records,
    since the Triton kernels have no backward and the PyTorch ops do."""
    return "torch" if needs_gradients(*tensors) else backend


class _ReplayingCheckpoint:
    """A pruning block's gradient-checkpointing function, wrapped so that each transformer layer it runs
    again in the backward pass sees the block's pruning plan as it stood when the layer first ran.

    diffusers checkpoints a Transformer2DModel layer by layer. Without this, the recomputation happens after
    the block's call has ended and its plan is gone: the first layer would recompute unpruned (a different
    graph: torch's CheckpointError, or with a reentrant checkpoint silently wrong gradients), the last layer
    could not recover. The plan is recomputed from the same inputs, so it is the same plan; the snapshot
    gives each layer the state around it (the ratio, earlier layers' kept indices and sources).
    """

    def __init__(self, inner, block: BlockState):
        self.inner = inner
        self.block = block

    def __call__(self, layer, *args, **kwargs):
        block, snapshot, runs = self.block, self.block.snapshot_call(), []

        def run(*layer_args, **layer_kwargs):
            if not runs:  # the forward pass: the plan is live
                runs.append(True)
                return layer(*layer_args, **layer_kwargs)
            # the backward pass's recomputation: replay the plan, without counting the block pass twice
            pruned_calls, kept_tokens = block.pruned_calls, block.kept_tokens
            block.restore_call(snapshot)
            try:
                return layer(*layer_args, **layer_kwargs)
            finally:
                block.pruned_calls, block.kept_tokens = pruned_calls, kept_tokens
                block.clear_call()

        return self.inner(run, *args, **kwargs)


def _wrap_checkpointing(module: torch.nn.Module, block: BlockState) -> None:
    """Called before each block call: ``enable_gradient_checkpointing`` may have (re)set the function."""
    inner = getattr(module, "_gradient_checkpointing_func", None)
    if getattr(module, "gradient_checkpointing", False) and inner is not None and not isinstance(inner, _ReplayingCheckpoint):
        module._gradient_checkpointing_func = _ReplayingCheckpoint(inner, block)


def _unwrap_checkpointing(module: torch.nn.Module) -> None:
    func = getattr(module, "_gradient_checkpointing_func", None)
    if isinstance(func, _ReplayingCheckpoint):
        module._gradient_checkpointing_func = func.inner


def _restore_wrapped_processor(attn) -> None:
    """Undo of one pruning processor: whatever processor it wraps now (the user may have set one since
    ``apply``) becomes the module's processor again."""
    processor = attn.processor
    attn.set_processor(processor.original if isinstance(processor, PruningSelfAttnProcessor) else processor)


def _install(unet: UNet2DConditionModel, state: ATEDMState) -> None:
    """Register every hook and processor, appending each one's undo action to ``state.undo`` as soon as
    it is in place, so that a failure halfway leaves ``apply`` a complete list to roll back."""
    backend, undo = state.config.backend, state.undo

    def device_check_hook(module, args, kwargs):
        _check_input_devices(module, args, kwargs)

    undo.append(unet.register_forward_pre_hook(device_check_hook, with_kwargs=True).remove)
    undo.append(install_phase_hook(unet, state.dsap))
    pruning_attention = {}

    for name, block in state.blocks.items():
        module = unet.get_submodule(name)

        def block_pre_hook(mod, args, block=block):
            block.clear_call()
            block.active_ratio = state.ratio_for(block)
            block.grid_tokens = args[0].shape[-2] * args[0].shape[-1] if args and args[0].dim() == 4 else None
            _wrap_checkpointing(mod, block)

        def block_post_hook(mod, args, output, block=block):
            block.clear_call()

        undo.append(module.register_forward_pre_hook(block_pre_hook).remove)
        undo.append(module.register_forward_hook(block_post_hook).remove)
        undo.append(lambda module=module: _unwrap_checkpointing(module))

        for position, index in enumerate(block.pruning_layers):
            layer = module.transformer_blocks[index]
            layer_name = f"{name}.transformer_blocks.{index}.attn1"
            # Undone newest first: the module's own processor API back, then the wrapped processor in place.
            undo.append(lambda attn=layer.attn1: _restore_wrapped_processor(attn))
            undo.append(guard_attention(layer.attn1))
            layer.attn1.set_processor(PruningSelfAttnProcessor(state, block, layer.attn1.processor, layer_name))
            pruning_attention[layer_name] = layer.attn1

            if state.config.prune_after == "first_self_attention":
                undo.append(layer.register_forward_pre_hook(_cut_after_self_attention_hook(state, block), with_kwargs=True).remove)
                continue

            def gather_hook(mod, args, output, block=block, position=position):
                if block.active_ratio is None:
                    return None
                if len(block.keep) <= position:
                    raise RuntimeError(f"AT-EDM's processor did not run in {block.name}; was attn1's processor replaced?")
                with state.overhead_scope():
                    kept = gather_tokens(output, block.keep[position], backend=_stream_backend(backend, output))
                if state.config.recovery == "delta":
                    block.cut_state, block.cut_kept = output, kept
                return kept

            undo.append(layer.register_forward_hook(gather_hook).remove)

        def recover_hook(mod, args, output, block=block):
            if block.active_ratio is None:
                return None
            with state.overhead_scope():
                src = compose_sources(block.src)  # every_layer: full grid -> ... -> the last layer's kept rows
                op_backend = _stream_backend(backend, output, block.cut_state, block.cut_kept)
                if state.config.recovery == "delta":
                    full = scatter_recover_delta(output, block.cut_state, block.cut_kept, src, backend=op_backend)
                else:
                    full = scatter_recover(output, src, backend=op_backend)
            block.pruned_calls += 1
            block.kept_tokens = tuple(keep.shape[1] for keep in block.keep)
            return full

        undo.append(module.transformer_blocks[-1].register_forward_hook(recover_hook).remove)

    undo.append(guard_set_attn_processor(unet, pruning_attention))
    # copy.deepcopy looks __deepcopy__ up on the instance: the copy gets a patch of its own (module hooks are
    # copied by reference and would still drive this model's state).
    unet.__deepcopy__ = lambda memo: _deepcopy_patched(unet, memo)
    undo.append(lambda: unet.__dict__.pop("__deepcopy__", None))


def _deepcopy_patched(model, memo: dict):
    """``copy.deepcopy`` of a patched model: the unpatched model copied, then patched with the same config
    and phase control, so the copy prunes on its own and ``atedm.remove(copy)`` touches only the copy."""
    state = getattr(model, _STATE_ATTR)
    _undo_all(state)
    delattr(model, _STATE_ATTR)
    try:
        clone = copy.deepcopy(model, memo)
    finally:
        _install(model, state)
        setattr(model, _STATE_ATTR, state)
    pipeline = state.dsap.pipeline
    _apply_model(clone, None, state.config)
    clone_state = getattr(clone, _STATE_ATTR)
    # Copying a whole pipeline: the copy's UNet follows the copied pipeline's scheduler (deepcopy's memo
    # already holds the new pipeline object when its components are copied).
    clone_state.dsap.pipeline = memo.get(id(pipeline)) if pipeline is not None else None
    clone_state.dsap.set_phase(state.dsap.phase_override)
    clone_state.dsap.set_timesteps(state.dsap.timesteps)
    return clone


def _cut_after_self_attention_hook(state: ATEDMState, block: BlockState):
    """Pre-hook of a block's first layer for prune_after="first_self_attention".

    It runs the layer's first step itself, h + attn1(norm1(h)), exactly as BasicTransformerBlock does
    (our processor computes the pruning plan there), and hands the layer only the kept rows of that sum;
    the layer's own attn1 call then adds zero, and its cross-attention and feed-forward run on k tokens.
    """

    def hook(layer, args, kwargs):
        if block.active_ratio is None:
            return None
        # diffusers calls the layer with keywords, but positionally under gradient checkpointing.
        hidden = _layer_argument(args, kwargs, "hidden_states")
        if hidden.dim() != 3:
            raise RuntimeError(f"{block.name}: prune_after='first_self_attention' expects (B, N, C) tokens; got "
                               f"{tuple(hidden.shape)}")
        cross_attention_kwargs = dict(_layer_argument(args, kwargs, "cross_attention_kwargs") or {})
        if cross_attention_kwargs.pop("gligen", None) is not None:
            raise RuntimeError(f"{block.name}: GLIGEN inputs are not supported with prune_after='first_self_attention'")
        attention_output = layer.attn1(layer.norm1(hidden), encoder_hidden_states=None,
                                       attention_mask=_layer_argument(args, kwargs, "attention_mask"),
                                       **cross_attention_kwargs)
        if not block.keep:
            raise RuntimeError(f"AT-EDM's processor did not run in {block.name}; was attn1's processor replaced?")
        summed = attention_output + hidden
        with state.overhead_scope():
            kept = gather_tokens(summed, block.keep[0], backend=_stream_backend(state.config.backend, summed))
        if state.config.recovery == "delta":
            block.cut_state, block.cut_kept = summed, kept
        block.self_attention_done = True
        if args:
            return (kept, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kept}

    return hook


# BasicTransformerBlock.forward's parameters in order, for reading a call made positionally.
_LAYER_PARAMETERS = ("hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask", "timestep",
                     "cross_attention_kwargs", "class_labels", "added_cond_kwargs")


def _layer_argument(args: tuple, kwargs: dict, name: str):
    position = _LAYER_PARAMETERS.index(name)
    return args[position] if len(args) > position else kwargs.get(name)


def apply(pipe_or_unet, config: ATEDMConfig | str | None = None, **overrides):
    """Patch a diffusers SDXL pipeline or UNet with AT-EDM token pruning; returns the object given.

    ``config`` is an ``ATEDMConfig``, a preset name (see ``atedm.presets``) or None for the defaults;
    keyword overrides replace single fields. Applying again with the same config does nothing; with a
    different config the old patch is removed first. On any error the model is left as it was.
    With ``prune_controlnet=True`` a ControlNet pipeline's ControlNet(s) are patched too.
    """
    check_diffusers_version()
    unet, pipe = _resolve_unet(pipe_or_unet)
    config = resolve_config(config, **overrides)
    controlnets = _pipeline_controlnets(pipe)
    if config.prune_controlnet and pipe is not None and not controlnets:
        raise ValueError(f"prune_controlnet=True, but this {type(pipe).__name__} has no ControlNet to prune")
    if config.prune_controlnet:
        for net in controlnets:  # refuse before anything is patched
            _find_blocks(net, config, _attention_blocks(net))
    _apply_model(unet, pipe, config)
    for net in controlnets:
        if config.prune_controlnet:
            _apply_model(net, pipe, config)
        elif _patched_through_pipeline(net):  # an earlier apply(pipe, prune_controlnet=True)
            remove(net)
    return pipe_or_unet


def _pipeline_controlnets(pipe) -> list:
    """The ControlNets a pipeline drives (the nets of a multi-ControlNet), or []."""
    controlnet = getattr(pipe, "controlnet", None)
    nets = controlnet.nets if isinstance(controlnet, MultiControlNetModel) else [controlnet]
    return [net for net in nets if isinstance(net, ControlNetModel)]


def _patched_through_pipeline(model) -> bool:
    state = getattr(model, _STATE_ATTR, None)
    return state is not None and isinstance(model, ControlNetModel) and state.config.prune_controlnet


def _apply_model(unet: UNet2DConditionModel | ControlNetModel, pipe, config: ATEDMConfig) -> None:
    current = getattr(unet, _STATE_ATTR, None)
    if current is not None and current.config == config:
        if pipe is not None:
            current.dsap.pipeline = pipe
        return
    if any(type(module).__name__ == "ToMeBlock" for module in unet.modules()):
        raise ValueError("this UNet is patched with tomesd; AT-EDM and ToMe both reduce tokens inside the same "
                         "blocks and cannot be combined. Call tomesd.remove_patch first.")
    attention_blocks = _attention_blocks(unet)
    blocks = _find_blocks(unet, config, attention_blocks)
    dsap = DSAPState.for_unet(unet, config, set(attention_blocks), pipeline=pipe)
    if current is not None:
        remove(unet)
    state = ATEDMState(config, blocks, dsap, undo=[])
    try:
        _install(unet, state)
    except BaseException:
        _undo_all(state)
        if current is not None:  # put the previous patch back, as it was
            _install(unet, current)
            setattr(unet, _STATE_ATTR, current)
        raise
    setattr(unet, _STATE_ATTR, state)


def remove(pipe_or_unet):
    """Undo ``apply``: original processors back, every hook gone (on a pipeline: its UNet's patch and the
    ControlNets it patched). Safe to call on an unpatched model."""
    unet, pipe = _resolve_unet(pipe_or_unet)
    for net in _pipeline_controlnets(pipe):
        if _patched_through_pipeline(net):
            remove(net)
    state = getattr(unet, _STATE_ATTR, None)
    if state is None:
        return pipe_or_unet
    _undo_all(state)
    delattr(unet, _STATE_ATTR)
    return pipe_or_unet


def _undo_all(state: ATEDMState) -> None:
    """Run the undo actions newest first and forget them, so the state could be installed again."""
    while state.undo:
        state.undo.pop()()


def get_state(pipe_or_unet) -> ATEDMState | None:
    """The ``ATEDMState`` of a patched model (statistics, phase control), or None when unpatched."""
    unet, _ = _resolve_unet(pipe_or_unet)
    return getattr(unet, _STATE_ATTR, None)


def _require_state(pipe_or_unet) -> ATEDMState:
    state = get_state(pipe_or_unet)
    if state is None:
        raise RuntimeError("this model is not patched with atedm.apply")
    return state


def set_phase(pipe_or_unet, phase: str | None) -> None:
    """Fix the DSAP phase (``"early"`` / ``"late"``) for the following UNet calls; None follows the timestep.

    Use it with a compiled UNet, where reading the timestep inside the model would break the graph.
    """
    _require_state(pipe_or_unet).dsap.set_phase(phase)


def set_timesteps(pipe_or_unet, timesteps) -> None:
    """Give a bare UNet the schedule of the coming generation, so DSAP counts steps exactly."""
    _require_state(pipe_or_unet).dsap.set_timesteps(timesteps)

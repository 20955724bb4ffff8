"""How atedm's pruning processor lives beside diffusers' attention-processor API.

AT-EDM replaces the processor of each pruning layer's self-attention (``attn1``) with a wrapper
(``patch.PruningSelfAttnProcessor``) that holds the processor it replaced, ``wrapper.original``, and runs it
whenever the block does not prune. diffusers, and the users and loaders built on it, read and replace
processors all the time: ``unet.set_attn_processor``, ``set_default_attn_processor``, attention slicing,
``fuse_qkv_projections`` / ``unfuse_qkv_projections``, ``load_ip_adapter`` / ``unload_ip_adapter`` (which
rebuild every processor as ``type(processor)()``), Custom Diffusion. The rule here:

* while patched, a pruning ``attn1`` module's ``get_processor`` (hence ``unet.attn_processors``) returns
  the processor atedm wraps, and its ``set_processor`` replaces that processor *inside* the wrapper. So every
  one of the operations above keeps pruning, and ``atedm.remove`` puts back whatever processor is current,
  not the one that was there at ``apply``;
* a processor whose math is not plain softmax attention over the module's own projections cannot sit under
  the pruning path (the pruned path recomputes that attention itself). It is refused the moment it is set,
  with a ``ValueError`` naming the layer, and ``set_attn_processor`` checks every pruning layer before it
  changes any processor, so a refused call changes nothing.

The interception is a subclass of the module's class, swapped in by ``guard_attention`` and swapped back
by the undo action it returns, the way diffusers' own objects stay instances of their classes
(``isinstance(attn, Attention)`` holds throughout).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    CustomDiffusionAttnProcessor,
    CustomDiffusionAttnProcessor2_0,
    FusedAttnProcessor2_0,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
)


class ProcessorWrapper:
    """Base of atedm's processors that wrap another one (``original``), which diffusers' API sees instead."""

    original: Any


# Processors that compute softmax(q k^T * scale) v from the module's to_q/to_k/to_v (or, fused, its to_qkv)
# on a plain self-attention: exactly what the pruned path computes, so atedm can wrap them. Sliced and
# xFormers attention only change how that is computed (memory, kernels); the pruning layer's own pass
# computes it unsliced, since the pruning plan needs its row statistics.
_PLAIN_ATTENTION = (AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0, SlicedAttnProcessor, XFormersAttnProcessor)
_CUSTOM_DIFFUSION = (CustomDiffusionAttnProcessor, CustomDiffusionAttnProcessor2_0)


def why_not_wrappable(processor) -> str | None:
    """None when AT-EDM can prune under ``processor`` on a self-attention layer, else the reason it cannot."""
    if isinstance(processor, _PLAIN_ATTENTION):
        return None
    if isinstance(processor, _CUSTOM_DIFFUSION):
        # Custom Diffusion's loader gives self-attention layers a processor that trains nothing (plain
        # attention); one that learns projections there computes something else, with weights of its own.
        if not processor.train_kv and not processor.train_q_out:
            return None
        return f"{type(processor).__name__} with trained projections (train_kv / train_q_out)"
    return f"{type(processor).__name__} is not one of diffusers' plain attention processors"


def check_wrappable(processor, layer_name: str) -> None:
    reason = why_not_wrappable(processor)
    if reason is not None:
        raise ValueError(
            f"{layer_name} is a pruning layer of AT-EDM: {reason}, and AT-EDM computes this self-attention itself "
            f"when it prunes. Supported there: {', '.join(cls.__name__ for cls in _PLAIN_ATTENTION)}, and Custom "
            "Diffusion without train_q_out. Call atedm.remove(...) first to use another processor on this layer."
        )


def uses_fused_projections(processor) -> bool:
    """Whether ``processor`` reads q, k, v from the module's fused ``to_qkv`` (diffusers' fuse_qkv_projections)."""
    return isinstance(processor, FusedAttnProcessor2_0)


@functools.cache
def _guarded_class(attention_class: type) -> type:
    """``attention_class`` whose processor API reads and replaces the processor under atedm's wrapper."""

    def set_processor(self, processor) -> None:
        current = self.__dict__.get("processor")
        if isinstance(processor, ProcessorWrapper) or not isinstance(current, ProcessorWrapper):
            attention_class.set_processor(self, processor)  # atedm itself installing or restoring
            return
        check_wrappable(processor, getattr(current, "layer_name", type(self).__name__))
        current.original = processor

    def get_processor(self, return_deprecated_lora: bool = False):
        processor = attention_class.get_processor(self, return_deprecated_lora)
        return processor.original if isinstance(processor, ProcessorWrapper) else processor

    # Same name, so reprs, logs and name-based checks read as the class it is.
    return type(attention_class.__name__, (attention_class,),
                {"set_processor": set_processor, "get_processor": get_processor,
                 "__module__": attention_class.__module__, "__qualname__": attention_class.__qualname__})


def guard_attention(attn) -> Callable[[], None]:
    """Route ``attn``'s processor API through atedm's wrapper; returns the undo action."""
    original_class = type(attn)
    attn.__class__ = _guarded_class(original_class)

    def undo() -> None:
        attn.__class__ = original_class

    return undo


def guard_set_attn_processor(model, pruning_attention: dict[str, Any]) -> Callable[[], None]:
    """Make ``model.set_attn_processor`` check every pruning layer's new processor before it changes any.

    ``pruning_attention`` maps each wrapped ``attn1``'s module path to the module. Returns the undo action.
    """

    def set_attn_processor(processor) -> None:
        for name in pruning_attention:
            new = processor.get(f"{name}.processor") if isinstance(processor, dict) else processor
            if new is not None:  # a dict that misses a layer is refused by diffusers itself, by count
                check_wrappable(new, name)
        type(model).set_attn_processor(model, processor)

    # An instance attribute shadows the class's method for every caller: users, loaders, fuse_qkv_projections.
    model.set_attn_processor = set_attn_processor

    def undo() -> None:
        model.__dict__.pop("set_attn_processor", None)

    return undo

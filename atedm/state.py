"""All of AT-EDM's run-time state for one patched UNet, in one object.

``ATEDMState`` lives on the UNet while it is patched. It knows the config, which blocks prune, the DSAP
state (``atedm.dsap``), and the per-call pruning plan of each block (kept indices and recovery
sources), which exists only between the block's first layer and its last. ``reset()`` returns it to the
state of a new generation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .config import ATEDMConfig
from .dsap import DSAPState


@dataclass
class BlockState:
    """One attention block (a ``Transformer2DModel``) that AT-EDM prunes."""

    name: str
    level: int
    depth: int
    pruning_layers: tuple[int, ...]
    # Set by the block's pre-hook for the current call: the ratio it prunes at, or None (runs in full).
    active_ratio: float | None = None
    # Token count of the block's input grid in this call, to catch another patch changing it.
    grid_tokens: int | None = None
    # Filled layer by layer during the call: kept indices and recovery sources per pruning layer.
    keep: list[torch.Tensor] = field(default_factory=list)
    src: list[torch.Tensor] = field(default_factory=list)
    # prune_after="first_self_attention": the first layer's self-attention already ran (in the layer's
    # pre-hook); its next call inside that layer must add nothing.
    self_attention_done: bool = False
    # recovery="delta": the full (B, N, C) stream at the cut, which pruned tokens start from, and its
    # kept rows (B, k, C) as handed to the later layers.
    cut_state: torch.Tensor | None = None
    cut_kept: torch.Tensor | None = None
    # Statistics, for tests and reports.
    pruned_calls: int = 0
    kept_tokens: tuple[int, ...] = ()

    def clear_call(self) -> None:
        self.active_ratio = None
        self.self_attention_done = False
        self.cut_state = None
        self.cut_kept = None
        self.keep.clear()
        self.src.clear()

    def snapshot_call(self) -> tuple:
        """The per-call plan as it stands now (for a layer that gradient checkpointing will run again)."""
        return (self.active_ratio, self.self_attention_done, self.cut_state, self.cut_kept,
                tuple(self.keep), tuple(self.src))

    def restore_call(self, snapshot: tuple) -> None:
        """Put back a ``snapshot_call()``: a recomputed layer then sees the plan its first run saw."""
        (self.active_ratio, self.self_attention_done, self.cut_state, self.cut_kept, keep, src) = snapshot
        self.keep[:] = keep
        self.src[:] = src


class ATEDMState:
    """Per-UNet state: config, blocks, DSAP (``dsap``), the undo actions of ``apply`` and the statistics
    of the patched path."""

    # Fixed attributes: assigning a misspelt or retired one (say ``state.phase_override``) raises instead of
    # silently doing nothing.
    __slots__ = ("config", "blocks", "dsap", "undo", "overhead_scope")

    def __init__(self, config: ATEDMConfig, blocks: dict[str, BlockState], dsap: DSAPState, undo: list):
        self.config = config
        self.blocks = blocks
        self.dsap = dsap
        # Filled by ``apply`` while it installs hooks and processors, each action appended as soon as its
        # change is in place; ``remove`` (or a failed ``apply``) runs them in reverse.
        self.undo = undo
        # When set (by the FLOPs counter), AT-EDM's own work runs inside this context manager factory.
        self.overhead_scope = contextlib.nullcontext

    def reset(self) -> None:
        """Forget everything of the current generation (phase, per-call plans, statistics)."""
        self.dsap.reset()
        for block in self.blocks.values():
            block.clear_call()
            block.pruned_calls = 0
            block.kept_tokens = ()

    @property
    def phase_calls(self) -> dict[str, int]:
        """UNet calls per DSAP phase since the last reset."""
        return self.dsap.phase_calls

    @property
    def pruned_calls(self) -> int:
        """Block passes that ran pruned since the last reset (the proof that the patched path runs)."""
        return sum(block.pruned_calls for block in self.blocks.values())

    def ratio_for(self, block: BlockState) -> float | None:
        """The prune ratio of ``block`` in the current UNet call, or None when it runs in full."""
        return self.dsap.ratio_for(block.name, self.config.prune_ratio)

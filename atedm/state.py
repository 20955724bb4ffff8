"""All of AT-EDM's run-time state for one patched UNet, in one object.

``ATEDMState`` lives on the UNet while it is patched. It knows the config, which blocks prune, the DSAP
phase of the current UNet call, and the per-call pruning plan of each block (kept indices and recovery
sources), which exists only between the block's first layer and its last. ``reset()`` returns it to the
state of a new generation.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch

from .config import ATEDMConfig

PHASES = ("early", "late")


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


class ATEDMState:
    """Per-UNet state: config, blocks, the DSAP phase and the statistics of the patched path."""

    def __init__(self, config: ATEDMConfig, blocks: dict[str, BlockState], dsap_blocks: tuple[str, ...] = ()):
        self.config = config
        self.blocks = blocks
        self.dsap_blocks = frozenset(dsap_blocks)  # resolved for this UNet (config.dsap_blocks may be None)
        # Where the step index comes from, best first: an explicit phase, an explicit schedule, the
        # scheduler of the pipeline that owns the UNet, the timestep alone (see ``resolve_phase``).
        self.phase_override: str | None = None
        self.timesteps: torch.Tensor | None = None
        self.num_train_timesteps: int = 1000
        self._pipeline_ref: weakref.ReferenceType | None = None
        self.phase: str = "late"
        self.phase_calls = {phase: 0 for phase in PHASES}
        # When set (by the FLOPs counter), AT-EDM's own work runs inside this context manager factory.
        self.overhead_scope = contextlib.nullcontext

    def reset(self) -> None:
        """Forget everything of the current generation (phase, per-call plans, statistics)."""
        self.phase = "late"
        self.phase_calls = {phase: 0 for phase in PHASES}
        for block in self.blocks.values():
            block.clear_call()
            block.pruned_calls = 0
            block.kept_tokens = ()

    @property
    def pipeline(self):
        return self._pipeline_ref() if self._pipeline_ref is not None else None

    @pipeline.setter
    def pipeline(self, pipe) -> None:
        self._pipeline_ref = weakref.ref(pipe) if pipe is not None else None

    @property
    def pruned_calls(self) -> int:
        """Block passes that ran pruned since the last reset (the proof that the patched path runs)."""
        return sum(block.pruned_calls for block in self.blocks.values())

    def schedule(self) -> torch.Tensor | None:
        """The timesteps of the current generation, if known: set explicitly, or the pipeline's scheduler's."""
        if self.timesteps is not None:
            return self.timesteps
        pipe = self.pipeline
        scheduler = getattr(pipe, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if isinstance(timesteps, torch.Tensor) and timesteps.numel() > 0:
            return timesteps
        return None

    def resolve_phase(self, timestep) -> str:
        """DSAP phase of a UNet call, from the timestep it receives (stateless, so it follows any sampler).

        With a known schedule (a pipeline's scheduler, or ``set_timesteps``) the step index is the
        position of the timestep in it, and the first ``early_steps(len(schedule))`` positions are early.
        With none (a bare UNet), a timestep above ``(1 - dsap_fraction) * num_train_timesteps`` is early,
        which matches the step-index rule for evenly spaced schedules.
        """
        if self.phase_override is not None:
            return self.phase_override
        if self.config.dsap_fraction == 0 or timestep is None:
            return "late"
        value = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        schedule = self.schedule()
        if schedule is not None:
            index = int(torch.argmin((schedule.detach().float().cpu() - value).abs()))
            return "early" if index < self.config.early_steps(len(schedule)) else "late"
        threshold = (1.0 - self.config.dsap_fraction) * self.num_train_timesteps
        return "early" if value > threshold else "late"

    def ratio_for(self, block: BlockState) -> float | None:
        """The prune ratio of ``block`` in the current phase, or None when it runs in full."""
        if self.phase == "early" and block.name in self.dsap_blocks:
            return self.config.dsap_early_ratio
        return self.config.prune_ratio

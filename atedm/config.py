"""ATEDMConfig: every switch of AT-EDM in one documented, validated dataclass.

Defaults follow the paper where it is explicit; where the implementation had to choose, see
docs/method.md ("What the paper fixes and what atedm chose").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from atedm_kernels import BACKENDS, CFG_MASK_MODES, HEAD_REDUCTIONS, SIMILARITY_RULES
from atedm_kernels.prune_plan import RANKINGS

from . import dsap

PRUNE_MODES = ("once", "every_layer")
# Where in a block the tokens are cut: after the first transformer layer (the paper's, for SDXL's deep
# blocks) or right after the first layer's self-attention, so that its cross-attention and feed-forward
# already run on the kept tokens (SD 1.5/2.x, whose blocks have one layer, save nothing otherwise).
PRUNE_POINTS = ("first_layer", "first_self_attention")
# How a pruned token is refilled before the convolutions: the paper copies its match's output ("copy");
# "delta" keeps the token's own state from the cut and adds the change its match went through since.
RECOVERY_MODES = ("copy", "delta")

@dataclass(frozen=True)
class ATEDMConfig:
    """How AT-EDM prunes an SDXL UNet.

    Attributes:
        prune_ratio: rho, the share of tokens pruned after the first layer of a pruning block;
            k = max(1, ceil((1 - rho) * N)) tokens are kept. In [0, 1). 0 keeps every token but still
            runs the whole pruning path (useful to check it).
        gwpr_iterations: K, the number of G-WPR power steps s <- A^T s (>= 1; 1 = column sums).
        head_reduction: ``"mean"`` walks the head-averaged map; ``"rms"`` walks each head's map and
            combines sqrt(mean_h s_h^2) (Zero-TPrune).
        cfg_mask_mode: ``"per_sample"`` ranks each image of the batch on its own map;
            ``"shared_cond"`` applies the conditional half's mask to both CFG halves (needs an even
            batch laid out [uncond, cond], as diffusers' pipelines do).
        ranking: ``"gwpr"`` (AT-EDM) or ``"random"``: uniform noise instead of G-WPR, the ablation
            baseline that measures what the ranking is worth at the same FLOPs.
        similarity: how a pruned token picks the kept token it copies before the convolutions:
            ``"attention"`` (Abar[i, j], the paper's), ``"attention_transposed"`` (Abar[j, i]),
            ``"symmetric"`` (their sum) or ``"key_cosine"`` (cosine of the layer's keys).
        recovery: ``"copy"`` (the paper's) refills a pruned token with the output of the kept token its
            similarity rule picks; ``"delta"`` keeps the pruned token's own hidden state from the cut and
            adds that kept token's change through the pruned layers (out_j - cut_j), so a pruned token
            keeps its identity and only borrows the later layers' update. Same kept tokens, same FLOPs
            up to one elementwise pass; needs ``prune_mode="once"``. Not in the paper: see the fidelity
            results in benchmarks/RESULTS.md.
        prune_levels: UNet resolution levels whose attention blocks prune, numbered from 1 at full
            latent resolution (SDXL: level 2 = 64x64 latent at 1024 px, level 3 = 32x32). ``None``
            prunes every level; ``(3,)`` is AT-EDM-dagger (no pruning at the 4096-token level).
        prune_mode: ``"once"`` prunes after the first layer of a block only (the paper's operating
            points); ``"every_layer"`` prunes again after every later layer but the last, each time
            ``prune_ratio`` of the tokens still present, and recovery composes the copies.
        prune_after: ``"first_layer"`` (the paper's) cuts the tokens after a block's first transformer
            layer and needs blocks of two or more layers (SDXL); ``"first_self_attention"`` cuts them
            right after the first layer's self-attention (its residual add included), so that layer's
            cross-attention and feed-forward and all later layers run on the kept tokens. That reaches
            SD 1.5/2.x-style UNets, whose blocks have a single layer, and prunes SDXL deeper. Needs
            ``prune_mode="once"``; not a published operating point.
        dsap_fraction: the share of denoising steps that form DSAP's early phase (0 disables DSAP).
        dsap_blocks: attention blocks (module names inside the UNet) that prune less in the early phase;
            ``None`` (default) takes the published rule: the first attention block of every down stage
            and the last of every up stage (on SDXL: ``atedm.dsap.SDXL_DSAP_BLOCKS``).
        dsap_early_ratio: the prune ratio of ``dsap_blocks`` in the early phase; ``None`` leaves them
            unpruned, as published.
        backend: ``"auto"`` (Triton kernels on CUDA, PyTorch references elsewhere), ``"torch"`` or
            ``"triton"``.
        prune_controlnet: with ``atedm.apply(pipeline, ...)`` on a ControlNet pipeline, also prune the
            attention blocks of its ControlNet(s) (each of a multi-ControlNet), with this same config and
            DSAP following the pipeline's schedule. Off by default: the ControlNet's residuals steer the
            UNet, so pruning it trades control fidelity for its FLOPs (see the README's limits table).
    """

    prune_ratio: float = 0.63
    gwpr_iterations: int = 3
    head_reduction: str = "mean"
    cfg_mask_mode: str = "per_sample"
    similarity: str = "attention"
    recovery: str = "copy"
    ranking: str = "gwpr"
    prune_levels: tuple[int, ...] | None = None
    prune_mode: str = "once"
    prune_after: str = "first_layer"
    dsap_fraction: float = 0.1
    dsap_blocks: tuple[str, ...] | None = None
    dsap_early_ratio: float | None = None
    backend: str = "auto"
    prune_controlnet: bool = False

    def __post_init__(self) -> None:
        _check_ratio("prune_ratio", self.prune_ratio)
        if self.dsap_early_ratio is not None:
            _check_ratio("dsap_early_ratio", self.dsap_early_ratio)
        if isinstance(self.gwpr_iterations, bool) or not isinstance(self.gwpr_iterations, int) or self.gwpr_iterations < 1:
            raise ValueError(f"gwpr_iterations must be an int >= 1; got {self.gwpr_iterations!r}")
        _check_choice("head_reduction", self.head_reduction, HEAD_REDUCTIONS)
        _check_choice("cfg_mask_mode", self.cfg_mask_mode, CFG_MASK_MODES)
        _check_choice("similarity", self.similarity, SIMILARITY_RULES)
        _check_choice("ranking", self.ranking, RANKINGS)
        _check_choice("prune_mode", self.prune_mode, PRUNE_MODES)
        _check_choice("prune_after", self.prune_after, PRUNE_POINTS)
        _check_choice("recovery", self.recovery, RECOVERY_MODES)
        if self.recovery == "delta" and self.prune_mode != "once":
            raise ValueError(f"recovery='delta' refills from one cut per block; it needs prune_mode='once' (got {self.prune_mode!r})")
        if self.prune_after == "first_self_attention" and self.prune_mode != "once":
            raise ValueError("prune_after='first_self_attention' prunes once per block; it needs prune_mode='once' "
                             f"(got {self.prune_mode!r})")
        _check_choice("backend", self.backend, BACKENDS)
        if not isinstance(self.prune_controlnet, bool):
            raise ValueError(f"prune_controlnet must be True or False; got {self.prune_controlnet!r}")
        if self.prune_levels is not None:
            levels = tuple(self.prune_levels)
            if not all(isinstance(level, int) and level >= 1 for level in levels):
                raise ValueError(f"prune_levels must be None or positive ints (1 = full resolution); got {self.prune_levels!r}")
            object.__setattr__(self, "prune_levels", levels)
        object.__setattr__(self, "dsap_blocks", dsap.check_switches(self.dsap_fraction, self.dsap_blocks))

    def replace(self, **overrides) -> "ATEDMConfig":
        """A copy with some fields changed; unknown field names raise a TypeError naming them."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown ATEDMConfig field(s) {unknown}; known fields: {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    def early_steps(self, num_steps: int) -> int:
        """How many of ``num_steps`` UNet evaluations form the DSAP early phase (``atedm.dsap.early_steps``)."""
        return dsap.early_steps(self.dsap_fraction, num_steps)


def _check_ratio(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1); got {value!r}")


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")

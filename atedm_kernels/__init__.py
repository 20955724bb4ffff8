"""atedm_kernels: the token-pruning ops of AT-EDM, each a PyTorch reference plus a fused Triton kernel.

This package never imports diffusers; ``atedm`` wires these ops into SDXL's transformer blocks.
"""

from ._dispatch import BACKENDS, resolve_backend
from .attention_lse import attention_with_lse, attention_with_lse_ref
from .attention_map import attention_with_map, head_mean_attention_map, head_mean_attention_map_ref
from .gwpr import HEAD_REDUCTIONS, gwpr_power_iteration, gwpr_power_iteration_ref, gwpr_scores, gwpr_scores_ref
from .prune_plan import one_pass_map_applies, plan_token_pruning
from .recovery import (
    SIMILARITY_RULES,
    compose_sources,
    compose_sources_ref,
    recovery_source,
    recovery_source_ref,
    scatter_recover,
    scatter_recover_delta,
    scatter_recover_delta_ref,
    scatter_recover_ref,
)
from .topk_gather import (
    CFG_MASK_MODES,
    gather_tokens,
    gather_tokens_ref,
    num_kept_tokens,
    share_cfg_scores,
    topk_keep_indices,
    topk_keep_indices_ref,
)

__all__ = [
    "BACKENDS",
    "CFG_MASK_MODES",
    "HEAD_REDUCTIONS",
    "SIMILARITY_RULES",
    "attention_with_lse",
    "attention_with_lse_ref",
    "attention_with_map",
    "compose_sources",
    "compose_sources_ref",
    "gather_tokens",
    "gather_tokens_ref",
    "gwpr_power_iteration",
    "gwpr_power_iteration_ref",
    "gwpr_scores",
    "gwpr_scores_ref",
    "head_mean_attention_map",
    "head_mean_attention_map_ref",
    "num_kept_tokens",
    "one_pass_map_applies",
    "plan_token_pruning",
    "recovery_source",
    "recovery_source_ref",
    "resolve_backend",
    "scatter_recover",
    "scatter_recover_delta",
    "scatter_recover_delta_ref",
    "scatter_recover_ref",
    "share_cfg_scores",
    "topk_keep_indices",
    "topk_keep_indices_ref",
]

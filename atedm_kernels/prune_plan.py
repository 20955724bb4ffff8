"""The per-block pruning plan: from the first layer's Q, K and row log-sum-exp to (keep, src).

This chains the ops of this package in the order AT-EDM applies them inside one attention block:

    Abar      = head_mean_attention_map(q, k, lse)          when G-WPR or recovery reads it and it pays
    scores    = gwpr_scores(q, k, lse, K, head_reduction)   (B, N) fp32
    scores    = share_cfg_scores(scores, cfg_mask_mode)
    keep      = topk_keep_indices(scores, k)                (B, k) int64 ascending
    src       = recovery_source(keep, N, similarity, Abar)  (B, N) int64 slots into the kept list

Whether Abar is written at all follows ``gwpr.materialize_attention_map`` (by N, H, K and a memory
budget): at 1024 px it is (67 MB at level 2 in fp16); at 2048 px level 2 it would be 1 GB, so G-WPR and
the recovery match recompute their map entries from Q, K and lse instead, tile by tile. The map is
fp16 on the Triton path for fp16/bf16 models (values in [0, 1], far from fp16's range limits; bf16 would
keep too few bits to rank close scores), and fp32 for fp32 models and in the PyTorch reference: an fp16
map under fp32 inputs rounds away score differences that the fp32 reference ranks by, and kept sets then
differ (seen: 3 of 11 blocks of the tiny SDXL-shaped UNet at K = 3).

The hidden-state work (gather of the kept rows, scatter-recovery of the full stream) happens later in the
block, where those tensors exist; it only needs ``keep`` and ``src``. Abar is dropped on return, so no
N x N tensor outlives the pruning layer.
"""

from __future__ import annotations

import torch

from ._dispatch import resolve_backend
from .attention_map import head_mean_attention_map
from .gwpr import gwpr_power_iteration, gwpr_scores, materialize_attention_map
from .recovery import recovery_source
from .topk_gather import share_cfg_scores, topk_keep_indices

MAP_SIMILARITY_RULES = ("attention", "attention_transposed", "symmetric")
# "random" ranks tokens by uniform noise from torch's global generator: the ablation baseline that tells
# what G-WPR's ranking is worth at the same budget (recovery still uses the chosen similarity).
RANKINGS = ("gwpr", "random")


def _map_reads(ranking: str, head_reduction: str, similarity: str) -> tuple[bool, bool, bool]:
    """What a plan with these switches reads: (walks Abar, reads Abar at all, needs lse beyond Abar)."""
    walks_map = ranking == "gwpr" and head_reduction == "mean"
    reads_map = walks_map or similarity in MAP_SIMILARITY_RULES
    needs_lse = ranking == "gwpr" and not walks_map  # the rms walk rebuilds each head's map
    return walks_map, reads_map, needs_lse


def one_pass_map_applies(
    q: torch.Tensor,
    *,
    iterations: int = 3,
    head_reduction: str = "mean",
    similarity: str = "attention",
    ranking: str = "gwpr",
    backend: str = "auto",
) -> bool:
    """Whether the pruning layer should run ``attention_with_map`` (attention and Abar from one pass).

    True on the PyTorch path of real (non-meta) CPU tensors when the plan reads Abar, needs nothing but
    Abar (the ``rms`` walk needs each head's map, hence lse) and Abar would be materialized anyway. On
    CUDA the Triton kernels rebuild the map from lse instead; meta tensors (the FLOPs counter) keep the
    two-pass route, so counted overheads stay those of the published method.
    """
    if q.device.type != "cpu" or resolve_backend(backend, q) != "torch":
        return False
    _, reads_map, needs_lse = _map_reads(ranking, head_reduction, similarity)
    if needs_lse or not reads_map:
        return False
    batch, num_heads, num_tokens, _ = q.shape
    return num_tokens > 0 and materialize_attention_map(batch, num_heads, num_tokens, iterations)


def plan_token_pruning(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor | None,
    num_keep: int,
    *,
    iterations: int = 3,
    head_reduction: str = "mean",
    cfg_mask_mode: str = "per_sample",
    similarity: str = "attention",
    ranking: str = "gwpr",
    scale: float | None = None,
    backend: str = "auto",
    attention_map: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(keep_idx (B, k), src (B, N))`` for one block; q, k (B, H, N, d), lse (B, H, N).

    ``attention_map`` is an Abar (B, N, N) already built (``attention_with_map``); with it ``lse`` may be
    None as long as the plan reads nothing else (``one_pass_map_applies``).
    """
    if ranking not in RANKINGS:
        raise ValueError(f"unknown ranking {ranking!r}; expected one of {RANKINGS}")
    batch, num_heads, num_tokens, _ = q.shape
    _, reads_map, needs_lse = _map_reads(ranking, head_reduction, similarity)
    if lse is None:
        if attention_map is None or needs_lse:
            raise ValueError("plan_token_pruning needs lse unless a prebuilt attention_map carries everything the "
                             f"plan reads; got attention_map={attention_map is not None}, ranking={ranking!r}, "
                             f"head_reduction={head_reduction!r}")
        if attention_map.shape != (batch, num_tokens, num_tokens):
            raise ValueError(f"attention_map must be (B, N, N) = {(batch, num_tokens, num_tokens)}; "
                             f"got {tuple(attention_map.shape)}")
    elif attention_map is None and reads_map and materialize_attention_map(batch, num_heads, num_tokens, iterations):
        half_map = q.dtype != torch.float32 and resolve_backend(backend, q, k, lse, dot_operands=(q, k)) == "triton"
        map_dtype = torch.float16 if half_map else torch.float32
        attention_map = head_mean_attention_map(q, k, lse, scale, out_dtype=map_dtype, backend=backend)
    if ranking == "gwpr" and lse is None:
        scores = gwpr_power_iteration(attention_map, iterations)
    elif ranking == "gwpr":
        scores = gwpr_scores(q, k, lse, iterations, head_reduction, scale, attention_map, backend=backend)
    else:
        scores = torch.rand(batch, num_tokens, device=q.device)
    scores = share_cfg_scores(scores, cfg_mask_mode)
    keep_idx = topk_keep_indices(scores, num_keep, backend=backend)
    src = recovery_source(
        keep_idx, num_tokens, similarity, attention_map=attention_map, keys=k, backend=backend,
        queries=q, lse=lse, scale=scale,
    )
    return keep_idx, src

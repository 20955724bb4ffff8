"""Token selection: the k best tokens per image, kept in spatial order, and the gather of their rows.

Math. For each image b, keep the k tokens with the highest score; a tie goes to the lower token index.
The kept indices are returned in ascending order, so the pruned stream stays in raster order::

    keep[b] = sort_ascending(top_k(scores[b]))            (B, k) int64
    gathered[b, r, :] = x[b, keep[b, r], :]              (B, k, C)

Classifier-free guidance: a batch ``[uncond..., cond...]`` can use per-sample masks (the default) or one
mask shared by both halves and taken from the conditional half (``share_cfg_scores``).
"""

from __future__ import annotations

import math

import torch

from ._dispatch import check_same_device, resolve_backend

CFG_MASK_MODES = ("per_sample", "shared_cond")


def num_kept_tokens(num_tokens: int, prune_ratio: float) -> int:
    """k = ceil((1 - rho) * N), at least 1. Depends on the config and the grid only, never on data."""
    if not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"prune_ratio must lie in [0, 1); got {prune_ratio!r}")
    # The epsilon keeps float noise such as (1 - 0.75) * 4096 = 1024.0000000001 from adding a token.
    return max(1, min(num_tokens, math.ceil((1.0 - prune_ratio) * num_tokens - 1e-9)))


def share_cfg_scores(scores: torch.Tensor, cfg_mask_mode: str) -> torch.Tensor:
    """Apply the CFG mask mode to (B, N) scores: ``shared_cond`` copies the conditional half's scores
    (the second half of the batch, as diffusers lays out CFG) onto the unconditional half."""
    if cfg_mask_mode not in CFG_MASK_MODES:
        raise ValueError(f"unknown cfg_mask_mode {cfg_mask_mode!r}; expected one of {CFG_MASK_MODES}")
    if cfg_mask_mode == "per_sample":
        return scores
    batch = scores.shape[0]
    if batch % 2:
        raise ValueError(
            f"cfg_mask_mode='shared_cond' needs a CFG batch [uncond, cond] of even size; got batch {batch}. "
            "Use cfg_mask_mode='per_sample' when the UNet runs without batched classifier-free guidance."
        )
    cond = scores[batch // 2 :]
    return torch.cat([cond, cond], dim=0)


def topk_keep_indices_ref(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: a stable descending sort puts the lower index first among equal scores."""
    best = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    return torch.sort(best, dim=-1).values


def gather_tokens_ref(x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """Reference: rows of x (B, N, C) at keep_idx (B, k) -> (B, k, C)."""
    return torch.gather(x, 1, keep_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _topk_keep_indices_triton(scores, k):
    raise NotImplementedError("the Triton top-k kernel is not built yet; use backend='torch'")


def _gather_tokens_triton(x, keep_idx):
    raise NotImplementedError("the Triton gather kernel is not built yet; use backend='torch'")


def topk_keep_indices(scores: torch.Tensor, k: int, backend: str = "auto") -> torch.Tensor:
    """Ascending indices (B, k) int64 of the k highest scores per row of (B, N) ``scores``."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, N); got shape {tuple(scores.shape)}")
    if not isinstance(k, int) or not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must be an int in [1, N={scores.shape[1]}]; got {k!r}")
    if resolve_backend(backend, scores) == "triton":
        return _topk_keep_indices_triton(scores, k)
    return topk_keep_indices_ref(scores, k)


def gather_tokens(x: torch.Tensor, keep_idx: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """The kept rows of the token stream: x (B, N, C), keep_idx (B, k) -> (B, k, C)."""
    if x.dim() != 3 or keep_idx.dim() != 2 or keep_idx.shape[0] != x.shape[0]:
        raise ValueError(f"expected x (B, N, C) and keep_idx (B, k); got {tuple(x.shape)} and {tuple(keep_idx.shape)}")
    check_same_device(x=x, keep_idx=keep_idx)
    if resolve_backend(backend, x, keep_idx) == "triton":
        return _gather_tokens_triton(x, keep_idx)
    return gather_tokens_ref(x, keep_idx)

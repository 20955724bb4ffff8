"""Similarity-based copy: refill every pruned token with the final value of its best-matching kept token.

Math. With kept indices keep (B, k) ascending and a similarity sim[i, j] between tokens::

    src[b, i] = r                      if i = keep[b, r]          (a kept token takes its own value)
    src[b, i] = argmax_r sim[i, keep[b, r]]   otherwise           (first maximum wins a tie)
    full[b, i, :] = kept[b, src[b, i], :]                          (B, N, C)

Similarity rules (AT-EDM's default is the first):

* ``"attention"``            sim[i, j] = Abar[i, j]  (the kept token that pruned token i attended to most)
* ``"attention_transposed"`` sim[i, j] = Abar[j, i]
* ``"symmetric"``            sim[i, j] = Abar[i, j] + Abar[j, i]
* ``"key_cosine"``           sim[i, j] = cos(key_i, key_j), keys concatenated over heads

Shapes: keep_idx (B, k) int64, Abar (B, N, N) or keys (B, H, N, d) -> src (B, N) int64 in [0, k).
"""

from __future__ import annotations

import torch

from ._chunking import rows_per_chunk
from ._dispatch import check_same_device, resolve_backend

SIMILARITY_RULES = ("attention", "attention_transposed", "symmetric", "key_cosine")


def _similarity_to_kept(
    rows: slice, keep_idx: torch.Tensor, rule: str, attention_map: torch.Tensor | None, keys: torch.Tensor | None
) -> torch.Tensor:
    """sim[b, i, r] for the token rows ``rows`` against the kept tokens, fp32 (B, rows, k)."""
    cols = keep_idx.unsqueeze(1)
    if rule == "key_cosine":
        flat = keys.transpose(1, 2).flatten(2).float()  # (B, N, H*d)
        unit = torch.nn.functional.normalize(flat, dim=-1)
        kept = torch.gather(unit, 1, keep_idx.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))
        return torch.matmul(unit[:, rows], kept.transpose(1, 2))
    forward = attention_map[:, rows].float()
    if rule == "attention":
        return torch.gather(forward, 2, cols.expand(-1, forward.shape[1], -1))
    backward = torch.gather(attention_map.float().transpose(1, 2)[:, rows], 2, cols.expand(-1, forward.shape[1], -1))
    if rule == "attention_transposed":
        return backward
    return torch.gather(forward, 2, cols.expand(-1, forward.shape[1], -1)) + backward


def recovery_source_ref(
    keep_idx: torch.Tensor,
    num_tokens: int,
    rule: str = "attention",
    attention_map: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: argmax over kept columns of the chosen similarity, chunked over rows."""
    batch, k = keep_idx.shape
    src = torch.empty(batch, num_tokens, dtype=torch.int64, device=keep_idx.device)
    step = rows_per_chunk(batch, num_tokens, k)
    for r0 in range(0, num_tokens, step):
        rows = slice(r0, min(num_tokens, r0 + step))
        src[:, rows] = _similarity_to_kept(rows, keep_idx, rule, attention_map, keys).argmax(dim=-1)
    own_rank = torch.arange(k, device=keep_idx.device).expand(batch, k)
    return src.scatter(1, keep_idx, own_rank)


def scatter_recover_ref(kept: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Reference: full[b, i] = kept[b, src[b, i]] -> (B, N, C)."""
    return torch.gather(kept, 1, src.unsqueeze(-1).expand(-1, -1, kept.shape[-1]))


def _recovery_source_triton(keep_idx, num_tokens, rule, attention_map, keys):
    raise NotImplementedError("the Triton recovery-match kernel is not built yet; use backend='torch'")


def _scatter_recover_triton(kept, src):
    raise NotImplementedError("the Triton scatter-recovery kernel is not built yet; use backend='torch'")


def recovery_source(
    keep_idx: torch.Tensor,
    num_tokens: int,
    rule: str = "attention",
    attention_map: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """For every token, the slot in the kept list whose value it takes (B, N) int64; see the docstring."""
    if rule not in SIMILARITY_RULES:
        raise ValueError(f"unknown similarity rule {rule!r}; expected one of {SIMILARITY_RULES}")
    if keep_idx.dim() != 2 or not 1 <= keep_idx.shape[1] <= num_tokens:
        raise ValueError(f"keep_idx must be (B, k) with 1 <= k <= N={num_tokens}; got {tuple(keep_idx.shape)}")
    batch = keep_idx.shape[0]
    if rule == "key_cosine":
        if keys is None or keys.dim() != 4 or keys.shape[0] != batch or keys.shape[2] != num_tokens:
            raise ValueError(f"rule 'key_cosine' needs keys (B={batch}, H, N={num_tokens}, d)")
        operand = keys
    else:
        if attention_map is None or attention_map.shape != (batch, num_tokens, num_tokens):
            raise ValueError(f"rule {rule!r} needs attention_map (B, N, N) = {(batch, num_tokens, num_tokens)}")
        operand = attention_map
    check_same_device(keep_idx=keep_idx, similarity=operand)
    if resolve_backend(backend, keep_idx, operand) == "triton":
        return _recovery_source_triton(keep_idx, num_tokens, rule, attention_map, keys)
    return recovery_source_ref(keep_idx, num_tokens, rule, attention_map, keys)


def scatter_recover(kept: torch.Tensor, src: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Rebuild the full (B, N, C) stream from kept rows (B, k, C) and the source slots (B, N)."""
    if kept.dim() != 3 or src.dim() != 2 or src.shape[0] != kept.shape[0]:
        raise ValueError(f"expected kept (B, k, C) and src (B, N); got {tuple(kept.shape)} and {tuple(src.shape)}")
    check_same_device(kept=kept, src=src)
    if resolve_backend(backend, kept, src) == "triton":
        return _scatter_recover_triton(kept, src)
    return scatter_recover_ref(kept, src)

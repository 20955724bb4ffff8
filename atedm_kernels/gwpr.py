"""Generalized Weighted PageRank (G-WPR) token importance over the self-attention map.

Math (AT-EDM, after Zero-TPrune's WPR). A row-stochastic map A (rows = queries) is the weighted
adjacency matrix of a complete directed graph over the N tokens. Scores start uniform and flow along
attention: a token is important if important tokens attend to it::

    s_0 = 1 / N,      s_{t+1}[j] = sum_i A[i, j] * s_t[i]      (s_{t+1} = A^T s_t),  t < K

Since A is row-stochastic the total of s stays 1. Head combination:

* ``"mean"``: one walk over the head-averaged map Abar = mean_h A_h (``attention_map.py``).
* ``"rms"``:  one walk per head over A_h, then s = sqrt(mean_h s_h^2) (Zero-TPrune's choice).

K = 1 is the plain column sum of the map (divided by N); larger K approaches the principal left
eigenvector of A (the stationary distribution of the attention random walk).

Shapes: q, k (B, H, N, d), lse (B, H, N) fp32, optional Abar (B, N, N) -> scores (B, N) fp32.
"""

from __future__ import annotations

import torch

from ._chunking import heads_per_chunk
from ._dispatch import check_same_device, resolve_backend
from .attention_map import _check_qk_lse, head_mean_attention_map, head_probabilities

HEAD_REDUCTIONS = ("mean", "rms")


def gwpr_power_iteration_ref(attention_map: torch.Tensor, iterations: int) -> torch.Tensor:
    """K steps of s <- A^T s from s_0 = 1/N over a batch of maps (..., N, N); returns fp32 (..., N)."""
    n = attention_map.shape[-1]
    amap = attention_map.float()
    scores = torch.full(amap.shape[:-1], 1.0 / n, dtype=torch.float32, device=amap.device)
    for _ in range(iterations):
        scores = torch.matmul(scores.unsqueeze(-2), amap).squeeze(-2)
    return scores


def gwpr_scores_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    iterations: int,
    head_reduction: str = "mean",
    scale: float | None = None,
    attention_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference G-WPR scores; ``rms`` rebuilds each head's map one head chunk at a time."""
    if head_reduction == "mean":
        if attention_map is None:
            attention_map = head_mean_attention_map(q, k, lse, scale, backend="torch")
        return gwpr_power_iteration_ref(attention_map, iterations)
    batch, num_heads, n, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    sum_squares = torch.zeros(batch, n, dtype=torch.float32, device=q.device)
    step = heads_per_chunk(batch, num_heads, n, n)
    for h0 in range(0, num_heads, step):
        heads = slice(h0, h0 + step)
        per_head = gwpr_power_iteration_ref(head_probabilities(q[:, heads], k[:, heads], lse[:, heads], scale), iterations)
        sum_squares += per_head.square().sum(dim=1)
    return torch.sqrt(sum_squares / num_heads)


def _gwpr_scores_triton(q, k, lse, iterations, head_reduction, scale, attention_map):
    raise NotImplementedError("the Triton G-WPR kernel is not built yet; use backend='torch'")


def gwpr_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    iterations: int,
    head_reduction: str = "mean",
    scale: float | None = None,
    attention_map: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """G-WPR importance (B, N) after ``iterations`` power steps; see the module docstring.

    ``attention_map`` (the head-averaged Abar) may be passed to reuse one already built for recovery;
    it is only read by the ``mean`` reduction.
    """
    _check_qk_lse(q, k, lse)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"G-WPR needs a square self-attention map; got {q.shape[2]} queries and {k.shape[2]} keys")
    if head_reduction not in HEAD_REDUCTIONS:
        raise ValueError(f"unknown head_reduction {head_reduction!r}; expected one of {HEAD_REDUCTIONS}")
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1; got {iterations!r}")
    n = q.shape[2]
    if attention_map is not None and attention_map.shape != (q.shape[0], n, n):
        raise ValueError(f"attention_map must be (B, N, N) = {(q.shape[0], n, n)}; got {tuple(attention_map.shape)}")
    if resolve_backend(backend, q, k, lse) == "triton":
        return _gwpr_scores_triton(q, k, lse, iterations, head_reduction, scale, attention_map)
    return gwpr_scores_ref(q, k, lse, iterations, head_reduction, scale, attention_map)

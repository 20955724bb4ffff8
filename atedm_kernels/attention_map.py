"""Head-averaged self-attention map rebuilt from Q, K and the row log-sum-exp.

Math (``scale`` = 1 / sqrt(d) by default)::

    A_h[i, j] = exp(scale * <q_hi, k_hj> - lse_h[i])      (row-stochastic: sum_j A_h[i, j] = 1)
    Abar[i, j] = (1 / H) * sum_h A_h[i, j]

Shapes: q (B, H, Nq, d), k (B, H, Nk, d), lse (B, H, Nq) fp32 -> Abar (B, Nq, Nk) in ``out_dtype``.

Abar is the weighted adjacency matrix of the token graph that G-WPR walks (``gwpr.py``) and the default
similarity that recovery reads (``recovery.py``). Only the head *average* is ever stored; per-head maps
exist one head chunk at a time in the reference.
"""

from __future__ import annotations

import torch

from ._chunking import heads_per_chunk
from ._dispatch import check_same_device, resolve_backend


def _check_qk_lse(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must be (B, H, N, d) with matching B, H, d; got {tuple(q.shape)}, {tuple(k.shape)}")
    if lse.shape != q.shape[:3]:
        raise ValueError(f"lse must be (B, H, Nq) = {tuple(q.shape[:3])}; got {tuple(lse.shape)}")
    check_same_device(q=q, k=k, lse=lse)


def head_probabilities(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 per-head probabilities exp(scale * q k^T - lse) for the (already chunked) heads given."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    return torch.exp(scores - lse.float().unsqueeze(-1))


def head_mean_attention_map_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    scale: float | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference: Abar accumulated in fp32 one head chunk at a time."""
    batch, num_heads, n_q, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    total = torch.zeros(batch, n_q, k.shape[2], dtype=torch.float32, device=q.device)
    step = heads_per_chunk(batch, num_heads, n_q, k.shape[2])
    for h0 in range(0, num_heads, step):
        heads = slice(h0, h0 + step)
        total += head_probabilities(q[:, heads], k[:, heads], lse[:, heads], scale).sum(dim=1)
    return (total / num_heads).to(out_dtype)


def _head_mean_attention_map_triton(q, k, lse, scale, out_dtype):
    raise NotImplementedError("the Triton attention-map kernel is not built yet; use backend='torch'")


def head_mean_attention_map(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    scale: float | None = None,
    out_dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> torch.Tensor:
    """Abar = mean over heads of softmax(q k^T * scale), from q, k and lse; see the module docstring."""
    _check_qk_lse(q, k, lse)
    if resolve_backend(backend, q, k, lse) == "triton":
        return _head_mean_attention_map_triton(q, k, lse, scale, out_dtype)
    return head_mean_attention_map_ref(q, k, lse, scale, out_dtype)

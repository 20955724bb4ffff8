"""Attention output plus the row log-sum-exp, for the pruning layer's self-attention.

Math (per batch b, head h, query row i; ``d`` = head dim, ``scale`` = 1 / sqrt(d) by default)::

    S[i, j]  = scale * <q_i, k_j>
    lse[i]   = log(sum_j exp(S[i, j]))
    out[i]   = sum_j exp(S[i, j] - lse[i]) * v_j

Shapes: q (B, H, Nq, d), k and v (B, H, Nk, d) -> out (B, H, Nq, d) in q's dtype, lse (B, H, Nq) in fp32.

Why the log-sum-exp: fused attention never forms the probability map, but with ``lse`` any tile of it
can be rebuilt later as ``exp(S - lse)`` from Q and K alone. Every G-WPR quantity atedm needs is computed
that way (see ``attention_map.py`` and ``gwpr.py``), so the pruning layer pays for attention once, plus
one exp-bound pass for the scores.
"""

from __future__ import annotations

import torch

from ._chunking import heads_per_chunk
from ._dispatch import check_same_device, resolve_backend


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, N, d); got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"incompatible q, k, v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(q=q, k=k, v=v)


def attention_with_lse_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: softmax attention in fp32, chunked over heads, returning (out, lse)."""
    batch, num_heads, n_q, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    out = torch.empty_like(q)
    lse = torch.empty(batch, num_heads, n_q, dtype=torch.float32, device=q.device)
    step = heads_per_chunk(batch, num_heads, n_q, k.shape[2])
    for h0 in range(0, num_heads, step):
        heads = slice(h0, h0 + step)
        scores = torch.matmul(q[:, heads].float(), k[:, heads].float().transpose(-1, -2)) * scale
        row_lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - row_lse.unsqueeze(-1))
        out[:, heads] = torch.matmul(probs, v[:, heads].float()).to(q.dtype)
        lse[:, heads] = row_lse
    return out, lse


def _attention_with_lse_triton(q, k, v, scale):
    raise NotImplementedError("the Triton attention-with-lse kernel is not built yet; use backend='torch'")


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and fp32 row log-sum-exp; see the module docstring for the math and shapes."""
    _check_qkv(q, k, v)
    if resolve_backend(backend, q, k, v) == "triton":
        return _attention_with_lse_triton(q, k, v, scale)
    return attention_with_lse_ref(q, k, v, scale)

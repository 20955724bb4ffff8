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

Kernels (no per-head map is ever stored; no atomics, so scores are bitwise reproducible):

* ``_map_power_step_kernel``: one step s <- Abar^T s over a given map for the whole batch. One program
  owns BLOCK_N columns of one image and walks all rows in BLOCK_M tiles, accumulating in fp32. One launch
  per iteration; memory-bound (the compact fp16 map is read once per step).
* ``_weighted_column_sums_kernel``: p_h[j] = sum_i s_h[i] * exp(scale q_hi.k_hj - lse_hi), straight from
  Q, K and lse. One program owns BLOCK_N keys of one (image, head) and walks all query tiles; grid
  (cdiv(N, BLOCK_N), H, B), so even level 3 (N = 1024) fills the GPU. ``rms`` walks per head
  (s_h <- p_h); ``mean`` feeds the same s to every head (head stride 0) and averages p_h over heads.
  Exp-bound: one full softmax rebuild per iteration.

``mean`` without a map: ``materialize_attention_map`` decides between building Abar once (with the
column-sum by-product of ``attention_map.py`` as step 1) and then K - 1 memory-bound steps, or K
recompute steps that store nothing.

Floor (docs/performance.md, H100, level 2 B=2 H=10 N=4096): one step over the fp16 map reads 67 MB, about
22 us; one recompute step costs the exp floor, 336 M exps, about 86 us.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._chunking import heads_per_chunk
from ._dispatch import check_same_device, guarded_launch, resolve_backend
from ._triton import autotune, dot_precision, head_dim_block, jit, load_head_rows, tl, triton
from .attention_map import _check_qk_lse, _head_mean_attention_map_launch, head_mean_attention_map, head_probabilities

HEAD_REDUCTIONS = ("mean", "rms")

# Largest head-averaged map G-WPR builds for itself. SDXL at 1024 px with CFG (B = 2) needs 67 MB at
# level 2, and B = 8 still fits (268 MB); at 2048 px level 2 (N = 16384) the fp16 map is 1 GiB per
# B = 2, about what a whole consumer GPU has to spare beside the UNet, so G-WPR recomputes there.
ATTENTION_MAP_BYTES_BUDGET = 512 * 1024 * 1024
# H100 rates (docs/performance.md): seconds per exp (special-function units) and per byte of map traffic.
_SECONDS_PER_EXP = 1 / 3.9e12
_SECONDS_PER_MAP_BYTE = 1 / 3.0e12


def materialize_attention_map(
    batch: int, num_heads: int, num_tokens: int, iterations: int, bytes_per_elem: int = 2
) -> bool:
    """Whether the ``mean`` walk should write the head-averaged map once and iterate over it.

    Cost per B N^2 (both paths are bound by exps or by map bytes, the matmuls hide under the exps):
    recomputing costs K passes of H exps; building costs one pass of H exps, the map write, and K - 1
    reads (step 1 comes from the build's column sums). At SDXL's H = 10 and 20 building wins for every
    K >= 2 (at K = 2 and H = 10: 5.1 against 3.9 ps per B N^2); at K = 1 it only adds the write. A map
    larger than ``ATTENTION_MAP_BYTES_BUDGET`` is never built. The integration should use the same test
    to decide whether to keep a map for recovery at all.
    """
    recompute = iterations * num_heads * _SECONDS_PER_EXP
    build_then_read = num_heads * _SECONDS_PER_EXP + iterations * bytes_per_elem * _SECONDS_PER_MAP_BYTE
    fits = batch * num_tokens * num_tokens * bytes_per_elem <= ATTENTION_MAP_BYTES_BUDGET
    return fits and build_then_read < recompute


def gwpr_power_iteration_ref(attention_map: torch.Tensor, iterations: int) -> torch.Tensor:
    """K steps of s <- A^T s from s_0 = 1/N over a batch of maps (..., N, N); returns fp32 (..., N)."""
    n = attention_map.shape[-1]
    amap = attention_map.float()
    scores = torch.full(amap.shape[:-1], 1.0 / n, dtype=torch.float32, device=amap.device)
    for _ in range(iterations):
        scores = torch.matmul(scores.unsqueeze(-2), amap).squeeze(-2)
    return scores


def gwpr_power_iteration(attention_map: torch.Tensor, iterations: int) -> torch.Tensor:
    """G-WPR (``mean`` reduction) over an Abar that is already built, e.g. by ``attention_with_map``.

    K matrix-vector products over the map: memory-bound BLAS calls on the CPU, where the one-pass path
    uses it. (On CUDA ``gwpr_scores`` with ``attention_map`` runs the Triton power step.)
    """
    if attention_map.dim() != 3 or attention_map.shape[1] != attention_map.shape[2] or attention_map.shape[2] == 0:
        raise ValueError(f"attention_map must be (B, N, N) with N >= 1; got {tuple(attention_map.shape)}")
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1; got {iterations!r}")
    return gwpr_power_iteration_ref(attention_map, iterations)


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


@autotune(
    cuda_configs=[
        dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3),
        dict(BLOCK_M=256, BLOCK_N=32, num_warps=8, num_stages=3),
        dict(BLOCK_M=512, BLOCK_N=32, num_warps=8, num_stages=1),
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=4),
    ],
    interpreter_config=dict(BLOCK_M=64, BLOCK_N=32),
    key=["N"],
)
@jit
def _map_power_step_kernel(
    Abar, S_in, S_out,
    stride_ab, stride_ai, stride_aj,
    stride_ib, stride_in,
    stride_ob, stride_on,
    N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """S_out[b, j] = sum_i S_in[b, i] * Abar[b, i, j].

    Abar: (B, N, N) head-averaged map, any float dtype, any strides; S_in, S_out: (B, N) fp32.
    stride_*: element strides (Abar batch, row, column; S batch, token). N: tokens.
    BLOCK_M: rows per loop step; BLOCK_N: columns per program (autotuned: narrow column blocks give
    level 2's 2 x 4096 columns enough programs, and tall row blocks enough bytes per load, to keep every
    SM's loads in flight; Triton does not software-pipeline loads that feed no dot).
    """
    # One program owns BLOCK_N columns of one image and loops over all rows.
    pid_n = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    cols_ok = offs_n < N

    a_ptrs = Abar + batch * stride_ab + offs_m[:, None].to(tl.int64) * stride_ai + offs_n[None, :] * stride_aj
    s_ptrs = S_in + batch * stride_ib + offs_m * stride_in
    # A 2-D accumulator defers the cross-thread reduction over rows to one tl.sum after the loop.
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows_ok = start_m + offs_m < N
        tile = tl.load(a_ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
        s = tl.load(s_ptrs, mask=rows_ok, other=0.0)
        acc += tile.to(tl.float32) * s[:, None]
        a_ptrs += BLOCK_M * stride_ai
        s_ptrs += BLOCK_M * stride_in
    tl.store(S_out + batch * stride_ob + offs_n * stride_on, tl.sum(acc, 0), mask=cols_ok)


@autotune(
    cuda_configs=[
        dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=256, num_warps=8, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4),
    ],
    interpreter_config=dict(BLOCK_M=32, BLOCK_N=32),
    key=["N", "HEAD_DIM"],
)
@jit
def _weighted_column_sums_kernel(
    Q, K, Lse, S_in, S_out,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_lb, stride_lh, stride_ln,
    stride_ib, stride_ih, stride_in,
    stride_ob, stride_oh, stride_on,
    N,
    qk_scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """S_out[b, h, j] = sum_i S_in[b, h, i] * exp(scale q_hi.k_hj - lse_hi), i.e. one step A_h^T s_h.

    Q, K: (B, H, N, d), any strides; Lse: (B, H, N) fp32. S_in: (B, H, N) fp32 walk state (head stride 0
    when every head reads the same ``mean`` state); S_out: (B, H, N) fp32 per-head result.
    stride_*: element strides (batch, head, token, dim). N: tokens. qk_scale_log2: scale * log2(e).
    HEAD_DIM, BLOCK_D: d and its power-of-two padding (constexpr: they size tiles and ``tl.dot``).
    DOT_PRECISION: "ieee" for fp32 inputs. BLOCK_M: query rows per loop step; BLOCK_N: keys per program
    (autotuned; every program streams its (image, head)'s whole Q through L2, so wider key blocks cut that
    traffic, narrower ones add programs at level 3).
    """
    # One program owns BLOCK_N keys of one (image, head) and loops over all query tiles.
    pid_n = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    k_ptrs = K + batch * stride_kb + head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    k = load_head_rows(k_ptrs, offs_n, N, offs_d, HEAD_DIM, BLOCK_D, True)
    q_ptrs = Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    lse_ptrs = Lse + batch * stride_lb + head * stride_lh + offs_m * stride_ln
    s_ptrs = S_in + batch * stride_ib + head * stride_ih + offs_m * stride_in
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + offs_m
        q = load_head_rows(q_ptrs, rows, N, offs_d, HEAD_DIM, BLOCK_D, True)
        # Rows past N read lse = +inf and s = 0: their probabilities are exactly 0, never NaN.
        lse_log2 = tl.load(lse_ptrs, mask=rows < N, other=float("inf")) * 1.4426950408889634
        s = tl.load(s_ptrs, mask=rows < N, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        acc += tl.exp2(scores - lse_log2[:, None]) * s[:, None]
        q_ptrs += BLOCK_M * stride_qn
        lse_ptrs += BLOCK_M * stride_ln
        s_ptrs += BLOCK_M * stride_in
    out_ptrs = S_out + batch * stride_ob + head * stride_oh + offs_n * stride_on
    tl.store(out_ptrs, tl.sum(acc, 0), mask=offs_n < N)


def _map_power_step(attention_map: torch.Tensor, scores: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """One launch of s <- Abar^T s for the whole batch; ``out`` may be preallocated (poisoned in tests)."""
    batch, n, _ = attention_map.shape
    out = torch.empty_like(scores) if out is None else out

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), batch)

    _map_power_step_kernel[grid](
        attention_map, scores, out, *attention_map.stride(), *scores.stride(), *out.stride(), n,
    )
    return out


def _weighted_column_sums(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scores: torch.Tensor, scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One launch of p_h = A_h^T s_h for every (image, head); ``scores`` is (B, H, N), maybe expanded."""
    batch, num_heads, n, head_dim = q.shape
    out = torch.empty(batch, num_heads, n, dtype=torch.float32, device=q.device) if out is None else out

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), num_heads, batch)

    _weighted_column_sums_kernel[grid](
        q, k, lse, scores, out,
        *q.stride(), *k.stride(), *lse.stride(), *scores.stride(), *out.stride(),
        n, scale * math.log2(math.e),
        HEAD_DIM=head_dim, BLOCK_D=head_dim_block(head_dim), DOT_PRECISION=dot_precision(q.dtype),
    )
    return out


def _gwpr_scores_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    iterations: int,
    head_reduction: str,
    scale: float,
    attention_map: torch.Tensor | None,
) -> torch.Tensor:
    batch, num_heads, n, _ = q.shape
    uniform = torch.full((batch, n), 1.0 / n, dtype=torch.float32, device=q.device)
    if head_reduction == "rms":
        per_head = uniform.unsqueeze(1).expand(batch, num_heads, n)
        for _ in range(iterations):
            per_head = _weighted_column_sums(q, k, lse, per_head, scale)
        return per_head.square().mean(dim=1).sqrt()

    scores, steps_left = uniform, iterations
    map_dtype = torch.float32 if q.dtype == torch.float32 else torch.float16
    if attention_map is None and materialize_attention_map(batch, num_heads, n, iterations, map_dtype.itemsize):
        attention_map, partials = _head_mean_attention_map_launch(q, k, lse, scale, map_dtype, column_sums=True)
        scores, steps_left = partials.sum(dim=1) / n, iterations - 1
    if attention_map is None:
        for _ in range(steps_left):
            shared_state = scores.unsqueeze(1).expand(batch, num_heads, n)
            scores = _weighted_column_sums(q, k, lse, shared_state, scale).mean(dim=1)
        return scores
    for _ in range(steps_left):
        scores = _map_power_step(attention_map, scores)
    return scores


@torch.library.custom_op("atedm::gwpr_scores", mutates_args=())
def _gwpr_scores_op(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    iterations: int,
    head_reduction: str,
    scale: float,
    attention_map: Optional[torch.Tensor],
    fallback: bool = False,
) -> torch.Tensor:
    """Opaque to torch.compile: the graph around the pruning layer stays whole."""
    return guarded_launch(
        "gwpr_scores", q.device, fallback,
        lambda: _gwpr_scores_launch(q, k, lse, iterations, head_reduction, scale, attention_map),
        lambda: gwpr_scores_ref(q, k, lse, iterations, head_reduction, scale, attention_map),
    )


@_gwpr_scores_op.register_fake
def _gwpr_scores_fake(q, k, lse, iterations, head_reduction, scale, attention_map, fallback=False):
    return q.new_empty(q.shape[0], q.shape[2], dtype=torch.float32)


def _gwpr_scores_triton(q, k, lse, iterations, head_reduction, scale, attention_map, fallback):
    # The kernels read the map through raw pointers, so a map on another device must fail here.
    check_same_device(q=q, attention_map=attention_map)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _gwpr_scores_op(q, k, lse, iterations, head_reduction, scale, attention_map, fallback)


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
    if q.shape[2] == 0:  # the walk starts from 1 / N
        raise ValueError("G-WPR needs at least one token")
    if head_reduction not in HEAD_REDUCTIONS:
        raise ValueError(f"unknown head_reduction {head_reduction!r}; expected one of {HEAD_REDUCTIONS}")
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1; got {iterations!r}")
    n = q.shape[2]
    if attention_map is not None and attention_map.shape != (q.shape[0], n, n):
        raise ValueError(f"attention_map must be (B, N, N) = {(q.shape[0], n, n)}; got {tuple(attention_map.shape)}")
    # Only the walk over a given map runs without tl.dot (the map build and the recompute steps multiply).
    dot_operands = (q, k) if attention_map is None or head_reduction == "rms" else ()
    if resolve_backend(backend, q, k, lse, dot_operands=dot_operands) == "triton":
        return _gwpr_scores_triton(q, k, lse, iterations, head_reduction, scale, attention_map, backend == "auto")
    return gwpr_scores_ref(q, k, lse, iterations, head_reduction, scale, attention_map)

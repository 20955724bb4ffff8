"""Head-averaged self-attention map rebuilt from Q, K and the row log-sum-exp.

Math (``scale`` = 1 / sqrt(d) by default)::

    A_h[i, j] = exp(scale * <q_hi, k_hj> - lse_h[i])      (row-stochastic: sum_j A_h[i, j] = 1)
    Abar[i, j] = (1 / H) * sum_h A_h[i, j]

Shapes: q (B, H, Nq, d), k (B, H, Nk, d), lse (B, H, Nq) fp32 -> Abar (B, Nq, Nk) in ``out_dtype``.

Abar is the weighted adjacency matrix of the token graph that G-WPR walks (``gwpr.py``) and the default
similarity that recovery reads (``recovery.py``). Only the head *average* is ever stored; per-head maps
exist one head chunk at a time in the reference.

Kernel. One program owns a BLOCK_M x BLOCK_N tile (queries x keys) of one image's Abar and loops over the
H heads, rebuilding each head's probabilities from a Q tile, a K tile and the Q rows' lse and adding them
into fp32 registers; the tile is written once, in ``out_dtype`` (fp16 for the integration: probabilities
lie in [0, 1], where fp16 keeps 3 more mantissa bits than bf16). No per-head map is ever stored. Grid:
(cdiv(Nk, BLOCK_N), cdiv(Nq, BLOCK_M), B); the key axis varies fastest, so programs in flight share one Q
tile and one image's K (5 MB at level 2) stays in L2.

By-product: the tile's column sums (fp32, before rounding to ``out_dtype``), one row per query block,
(B, cdiv(Nq, BLOCK_M), Nk). Summed over query blocks and divided by N they are the first G-WPR iteration
s_1 = Abar^T (1/N), which saves ``gwpr.py`` one full read of the map when it builds the map itself. They
cost BLOCK_N fp32 stores per tile against the tile's H * BLOCK_M * BLOCK_N exps; no atomics, so the sums
are deterministic (a reordered sum could flip a near-tie in the top-k mask between runs).

Floor (docs/performance.md, H100, level 2 B=2 H=10 N=4096): B H N^2 = 336 M exps, about 86 us (binding), over
the 2 B H N^2 d = 43 GFLOP of QK^T (about 54 us) and the 67 MB fp16 map written once (about 22 us).
"""

from __future__ import annotations

import math

import torch

from ._chunking import heads_per_chunk
from ._dispatch import check_same_device, guarded_launch, resolve_backend, triton_interpreter_on
from ._triton import autotune, dot_precision, head_dim_block, jit, load_head_rows, tl, triton


def _check_qk_lse(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must be (B, H, N, d) with matching B, H, d; got {tuple(q.shape)}, {tuple(k.shape)}")
    if lse.shape != q.shape[:3]:
        raise ValueError(f"lse must be (B, H, Nq) = {tuple(q.shape[:3])}; got {tuple(lse.shape)}")
    # A mean over zero heads is undefined (the Triton launcher divided by zero, the reference gave NaN),
    # and d = 0 has no default scale 1 / sqrt(d).
    if q.shape[1] == 0 or q.shape[-1] == 0:
        raise ValueError(f"q and k need at least one head and a head dim >= 1; got {tuple(q.shape)}")
    check_same_device(q=q, k=k, lse=lse)


def head_probabilities(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 per-head probabilities exp(scale * q k^T - lse) for the (already chunked) heads given."""
    # Scale folded into q and the exp done in place: two fewer passes over the N x N chunk, which is
    # what this costs on the CPU (the matmul is small next to the exp and the memory traffic).
    scores = torch.matmul(q.float() * scale, k.float().transpose(-1, -2))
    return scores.sub_(lse.float().unsqueeze(-1)).exp_()


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


@autotune(
    cuda_configs=[
        dict(BLOCK_N=64, num_warps=4, num_stages=2),
        dict(BLOCK_N=64, num_warps=8, num_stages=3),
        dict(BLOCK_N=128, num_warps=8, num_stages=2),
        dict(BLOCK_N=128, num_warps=8, num_stages=3),
    ],
    interpreter_config=dict(BLOCK_N=32),
    key=["N_Q", "N_K", "HEAD_DIM"],
)
@jit
def _head_mean_map_kernel(
    Q, K, Lse, Abar, ColSums,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_lb, stride_lh, stride_ln,
    stride_ab, stride_ai, stride_aj,
    stride_cb, stride_cm, stride_cj,
    num_heads, N_Q, N_K,
    qk_scale_log2, inv_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    WRITE_COLUMN_SUMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Abar tile = mean over heads of exp(scale q k^T - lse), plus optional column sums.

    Q: (B, H, Nq, d), K: (B, H, Nk, d), any strides; Lse: (B, H, Nq) fp32 row log-sum-exp of the
    attention that produced it. Abar: (B, Nq, Nk) output in its own dtype. ColSums: (B, cdiv(Nq, BLOCK_M),
    Nk) fp32, written only when WRITE_COLUMN_SUMS. stride_*: element strides (batch, head, token, dim;
    for Abar batch, query, key; for ColSums batch, query block, key). num_heads: H, the loop length;
    N_Q, N_K: query and key counts. qk_scale_log2: scale * log2(e); inv_heads: 1 / H.
    HEAD_DIM, BLOCK_D: d and its power-of-two padding (constexpr: they size tiles and ``tl.dot``).
    DOT_PRECISION: "ieee" for fp32 inputs. BLOCK_M: query tile, fixed by the launcher because it shapes
    ColSums; BLOCK_N: key tile (autotuned).
    """
    # One program owns a BLOCK_M x BLOCK_N tile of one image's Abar and loops over all heads.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    # Pointers advance by one head stride per step: 64-bit pointer arithmetic, no int32 head offset.
    q_ptrs = Q + batch * stride_qb + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    k_ptrs = K + batch * stride_kb + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    lse_ptrs = Lse + batch * stride_lb + offs_m * stride_ln
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(num_heads):
        q = load_head_rows(q_ptrs, offs_m, N_Q, offs_d, HEAD_DIM, BLOCK_D, True)
        k = load_head_rows(k_ptrs, offs_n, N_K, offs_d, HEAD_DIM, BLOCK_D, True)
        # +inf for query rows past N_Q makes their probabilities exactly 0, so the column sums stay clean.
        lse_log2 = tl.load(lse_ptrs, mask=offs_m < N_Q, other=float("inf")) * 1.4426950408889634
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        acc += tl.exp2(scores - lse_log2[:, None])
        q_ptrs += stride_qh
        k_ptrs += stride_kh
        lse_ptrs += stride_lh
    acc = acc * inv_heads

    cols_ok = offs_n < N_K
    abar_ptrs = Abar + batch * stride_ab + offs_m[:, None].to(tl.int64) * stride_ai + offs_n[None, :] * stride_aj
    tl.store(abar_ptrs, acc.to(Abar.dtype.element_ty), mask=(offs_m[:, None] < N_Q) & cols_ok[None, :])
    if WRITE_COLUMN_SUMS:
        col_ptrs = ColSums + batch * stride_cb + pid_m * stride_cm + offs_n * stride_cj
        tl.store(col_ptrs, tl.sum(acc, 0), mask=cols_ok)


def map_query_block() -> int:
    """Query tile of the map kernel; not autotuned because it fixes the column-sum buffer's shape.

    Every program re-reads one K tile per head, so K crosses L2 cdiv(N, BLOCK_M) times: at level 2,
    128 rows make that 168 MB per call (64 rows: 335 MB, enough L2 traffic to rival the 86 us exp
    floor), and a 128 x 128 fp32 tile still fits in registers at 8 warps. The interpreter takes 32 so
    small test shapes span several query blocks."""
    return 32 if triton_interpreter_on() else 128


def _head_mean_attention_map_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    out_dtype: torch.dtype,
    column_sums: bool = False,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the kernel; returns (Abar, column-sum partials (B, cdiv(Nq, BLOCK_M), Nk) or None).

    ``out`` may be a preallocated Abar (the tests pass a poisoned one)."""
    batch, num_heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    block_m = map_query_block()
    abar = torch.empty(batch, n_q, n_k, dtype=out_dtype, device=q.device) if out is None else out
    partials = torch.empty(batch, triton.cdiv(n_q, block_m), n_k, dtype=torch.float32, device=q.device) \
        if column_sums else abar.new_empty(0, 0, 0, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(n_k, meta["BLOCK_N"]), triton.cdiv(n_q, block_m), batch)

    _head_mean_map_kernel[grid](
        q, k, lse, abar, partials,
        *q.stride(), *k.stride(), *lse.stride(), *abar.stride(), *partials.stride(),
        num_heads, n_q, n_k,
        scale * math.log2(math.e), 1.0 / num_heads,
        HEAD_DIM=head_dim, BLOCK_D=head_dim_block(head_dim), DOT_PRECISION=dot_precision(q.dtype),
        WRITE_COLUMN_SUMS=column_sums, BLOCK_M=block_m,
    )
    return abar, (partials if column_sums else None)


@torch.library.custom_op("atedm::head_mean_attention_map", mutates_args=())
def _head_mean_attention_map_op(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float, out_dtype: torch.dtype, fallback: bool = False
) -> torch.Tensor:
    """Opaque to torch.compile: the graph around the pruning layer stays whole."""
    return guarded_launch("head_mean_attention_map", q.device, fallback,
                          lambda: _head_mean_attention_map_launch(q, k, lse, scale, out_dtype)[0],
                          lambda: head_mean_attention_map_ref(q, k, lse, scale, out_dtype))


@_head_mean_attention_map_op.register_fake
def _head_mean_attention_map_fake(q, k, lse, scale, out_dtype, fallback=False):
    return q.new_empty(q.shape[0], q.shape[2], k.shape[2], dtype=out_dtype)


def _head_mean_attention_map_triton(q, k, lse, scale, out_dtype, fallback):
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _head_mean_attention_map_op(q, k, lse, scale, out_dtype, fallback)


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
    if resolve_backend(backend, q, k, lse, dot_operands=(q, k)) == "triton":
        return _head_mean_attention_map_triton(q, k, lse, scale, out_dtype, backend == "auto")
    return head_mean_attention_map_ref(q, k, lse, scale, out_dtype)


# One (B, H, rows, Nk) probability chunk of about this many bytes: measured on a 2-core EPYC (bf16,
# SDXL level 2 at 1024 px), 4-8 MB chunks run the pass as fast as PyTorch's fused CPU attention, while
# 64 MB chunks (what a plain chunked reference uses) run it 1.5-2x slower: the chunk must stay in cache
# between the softmax, the P V product and the head sum.
_ONE_PASS_CHUNK_BYTES = 6 * 1024 * 1024


def attention_with_map(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output (B, H, Nq, d) and Abar (B, Nq, Nk) fp32 from one pass over the probabilities.

    The CPU production path of a pruning layer. Plain SDPA cannot hand out its probabilities, so the
    two-pass route (``attention_with_lse`` then ``head_mean_attention_map``) pays for every exp twice;
    on the CPU the second pass in fp32 cost about twice the attention itself at 1024 px. Here each chunk
    of query rows goes softmax(q k^T) -> (P V, sum over heads of P) while it is in cache, in the model's
    dtype with fp32 head sums, so the map costs a few percent over attention (see RESULTS.md).

    No lse is returned: the integration takes this path only when nothing downstream needs it (the mean
    walk and the map-based recovery rules read Abar; ``prune_plan.one_pass_map_applies``).
    """
    _check_one_pass_operands(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _attention_with_map_op(q, k, v, scale)


def _check_one_pass_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q, k, v must be (B, H, N, d) with matching B, H, d and k, v alike; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[1] == 0 or q.shape[-1] == 0 or k.shape[2] == 0:
        raise ValueError(f"attention_with_map needs at least one head, key and head dim; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    check_same_device(q=q, k=k, v=v)


@torch.library.custom_op("atedm::attention_with_map", mutates_args=())
def _attention_with_map_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Opaque to torch.compile: inductor calls the eager chunk loop as one extern kernel (tracing into
    it unrolled the loop and regenerated its softmax and head sums: 8% slower steps than eager)."""
    return _attention_with_map_impl(q, k, v, scale)


@_attention_with_map_op.register_fake
def _attention_with_map_fake(q, k, v, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        q.shape[0], q.shape[2], k.shape[2], dtype=torch.float32)


def _attention_with_map_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    batch, num_heads, n_q, _ = q.shape
    n_k = k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    attention_map = torch.empty(batch, n_q, n_k, dtype=torch.float32, device=q.device)
    rows = max(1, _ONE_PASS_CHUNK_BYTES // max(1, batch * num_heads * n_k * q.element_size()))
    # fp16 logits of magnitude L carry a relative error of about L * 2^-11 into every probability (0.3%
    # at SDXL's logits), beyond what fp16 attention kernels give; the CPU has no fast fp16 matmul to lose,
    # so fp16 scores are formed in fp32. bf16 stays bf16: that is the CPU's fast path.
    compute_dtype = torch.float32 if q.dtype == torch.float16 else q.dtype
    # K and V once in (B, H, N, d) row-major order: the processor hands views of (B, N, H, d) storage, and
    # a matmul on those copied the whole K (or V) again for every row chunk (2x slower at 1024 px).
    keys_t = k.to(compute_dtype).contiguous().transpose(-1, -2)
    v = v.contiguous()
    for r0 in range(0, n_q, rows):
        r1 = min(n_q, r0 + rows)
        probs = torch.softmax(torch.matmul(q[:, :, r0:r1].to(compute_dtype) * scale, keys_t), dim=-1)
        out[:, :, r0:r1] = torch.matmul(probs.to(v.dtype), v)
        # Head sum as H - 1 adds into the fp32 rows: torch.sum over the head dim of a bf16 chunk took a
        # slow strided path on some chunk sizes (10x slower at 128 rows than at 64).
        acc = attention_map[:, r0:r1]
        acc.copy_(probs[:, 0])
        for head in range(1, num_heads):
            acc.add_(probs[:, head])
    return out, attention_map.mul_(1.0 / num_heads)

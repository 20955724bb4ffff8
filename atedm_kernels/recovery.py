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

Abar is read from a materialized map, or, when there is none (very large N), recomputed for the kept
columns only from the first layer's queries, keys and row log-sum-exp (``scale`` = 1 / sqrt(d) by default)::

    Abar[i, j] = (1 / H) * sum_h exp(scale * <q_hi, k_hj> - lse_h[i])

Shapes: keep_idx (B, k) int64, Abar (B, N, N) any float dtype, or queries and keys (B, H, N, d) with lse
(B, H, N) fp32, or keys alone for ``key_cosine`` -> src (B, N) int64 in [0, k). kept (B, k, C), src -> (B, N, C).

Kernels. The match kernels give one program BLOCK_M rows of one image; it walks the k kept columns in
BLOCK_K tiles and keeps a running fp32 (max, argmax) per row, so no similarity row is ever stored:

* map rules gather Abar[i, keep] (row i's kept columns) and/or Abar[keep, i] (kept rows, read along i);
* recompute rules rebuild those entries head by head with a (BLOCK_M x d) @ (d x BLOCK_K) dot, the
  exp and the lse, never holding more than one tile; the 1 / H is dropped (it cannot move an argmax);
* ``key_cosine`` accumulates key dot products over heads and divides by both norms, the column norms
  computed from the tiles already loaded for the dot.
Kept rows then take their own rank by one scatter. The copy (``scatter_recover``) is the row gather of
``topk_gather``: every full row reads its source kept row, so each output element is written once.

Floor, SDXL level 2 at batch 2 and rho = 0.63 (N = 4096, k = 1516, d = 64, fp16), at the H100's
3.0 TB/s (H200: 4.3 TB/s). All but the recompute path are memory-bound:

* ``attention``: reads B * N * k map entries, but with 37% of columns kept almost every 32-byte sector
  holds one, so the traffic is the whole map, 67 MB: 22 us (16 us);
* ``attention_transposed``: the k kept rows, read whole, 25 MB: 8.3 us (5.8 us); ``symmetric`` both;
* recompute: exp-bound, B * H * N * k = 124 M exps per direction at about 3.9 T/s: 32 us, plus
  15.9 GFLOP of dots (20 us at 800 TFLOP/s, overlappable); worth it only when the map does not exist
  (at 2048 px one level-2 map is 1.07 GB);
* ``key_cosine``: 15.9 GFLOP of dots over 10.5 MB of keys: about 20 us, matmul-bound;
* copy: writes B * N * C and reads at most B * k * C, 10.5 + 3.9 MB: 4.8 us (3.4 us).
"""

from __future__ import annotations

import torch

from ._chunking import rows_per_chunk
from ._dispatch import check_same_device, guarded_launch, resolve_backend, triton_interpreter_on
from ._triton import head_dim_block, jit, tl, triton
from .attention_map import head_probabilities
from .topk_gather import _gather_rows_into

SIMILARITY_RULES = ("attention", "attention_transposed", "symmetric", "key_cosine")
_READS_FORWARD = ("attention", "symmetric")
_READS_BACKWARD = ("attention_transposed", "symmetric")


def _attention_to_kept(
    rows: slice,
    keep_idx: torch.Tensor,
    transposed: bool,
    attention_map: torch.Tensor | None,
    queries: torch.Tensor | None,
    keys: torch.Tensor | None,
    lse: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """Abar[i, keep[r]] (or Abar[keep[r], i] when ``transposed``) for i in ``rows``, fp32 (B, rows, k)."""
    num_rows = rows.stop - rows.start
    if attention_map is not None:
        if not transposed:
            return torch.gather(attention_map[:, rows], 2, keep_idx.unsqueeze(1).expand(-1, num_rows, -1)).float()
        kept_rows = torch.gather(attention_map[:, :, rows], 1, keep_idx.unsqueeze(-1).expand(-1, -1, num_rows))
        return kept_rows.transpose(1, 2).float()
    num_heads, head_dim = queries.shape[1], queries.shape[3]
    scale = head_dim**-0.5 if scale is None else scale
    at_kept = keep_idx[:, None, :, None].expand(-1, num_heads, -1, head_dim)
    if not transposed:
        probs = head_probabilities(queries[:, :, rows], keys.gather(2, at_kept), lse[:, :, rows], scale)
        return probs.sum(dim=1) / num_heads
    kept_lse = lse.gather(2, keep_idx[:, None, :].expand(-1, num_heads, -1))
    probs = head_probabilities(queries.gather(2, at_kept), keys[:, :, rows], kept_lse, scale)
    return (probs.sum(dim=1) / num_heads).transpose(1, 2)


def _similarity_to_kept(
    rows: slice,
    keep_idx: torch.Tensor,
    rule: str,
    attention_map: torch.Tensor | None,
    keys: torch.Tensor | None,
    queries: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """sim[b, i, r] for the token rows ``rows`` against the kept tokens, fp32 (B, rows, k)."""
    if rule == "key_cosine":
        flat = keys.transpose(1, 2).flatten(2).float()  # (B, N, H*d)
        unit = torch.nn.functional.normalize(flat, dim=-1)
        kept = torch.gather(unit, 1, keep_idx.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))
        return torch.matmul(unit[:, rows], kept.transpose(1, 2))
    operands = (attention_map, queries, keys, lse, scale)
    if rule == "attention":
        return _attention_to_kept(rows, keep_idx, False, *operands)
    if rule == "attention_transposed":
        return _attention_to_kept(rows, keep_idx, True, *operands)
    return _attention_to_kept(rows, keep_idx, False, *operands) + _attention_to_kept(rows, keep_idx, True, *operands)


def recovery_source_ref(
    keep_idx: torch.Tensor,
    num_tokens: int,
    rule: str = "attention",
    attention_map: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
    *,
    queries: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference: argmax over kept columns of the chosen similarity, chunked over rows.

    The attention rules read ``attention_map`` when given, else recompute its kept columns from
    ``queries``, ``keys`` and ``lse`` (one (B, H, rows, k) fp32 chunk at a time).
    """
    batch, k = keep_idx.shape
    src = torch.empty(batch, num_tokens, dtype=torch.int64, device=keep_idx.device)
    recompute = rule != "key_cosine" and attention_map is None
    bytes_per_entry = 4 * queries.shape[1] * (2 if rule == "symmetric" else 1) if recompute else 4
    step = rows_per_chunk(batch, num_tokens, k, bytes_per_entry)
    for r0 in range(0, num_tokens, step):
        rows = slice(r0, min(num_tokens, r0 + step))
        sim = _similarity_to_kept(rows, keep_idx, rule, attention_map, keys, queries, lse, scale)
        src[:, rows] = sim.argmax(dim=-1)
    own_rank = torch.arange(k, device=keep_idx.device).expand(batch, k)
    return src.scatter(1, keep_idx, own_rank)


def scatter_recover_ref(kept: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Reference: full[b, i] = kept[b, src[b, i]] -> (B, N, C)."""
    return torch.gather(kept, 1, src.unsqueeze(-1).expand(-1, -1, kept.shape[-1]))


@jit
def _fold_running_argmax(best_sim, best_rank, sim, first_rank):
    """Fold a (BLOCK_M, BLOCK_K) similarity tile, column c = kept rank first_rank + c, into the row maxima.

    The first maximum wins, as in torch.argmax: inside a tile by the reduction's left tie-break, across
    tiles (visited in rank order) because only a strictly larger value replaces the running one.
    """
    tile_best, tile_arg = tl.max(sim, axis=1, return_indices=True, return_indices_tie_break_left=True)
    better = tile_best > best_sim
    return tl.where(better, tile_best, best_sim), tl.where(better, first_rank + tile_arg, best_rank)


@jit
def _match_from_map_kernel(
    map_ptr,  # (B, N, N) head-averaged attention Abar, any float dtype
    keep_ptr,  # (B, k) int64 kept token indices
    src_ptr,  # (B, N) int64 out: for every row, the kept rank of its best match
    stride_map_b,
    stride_map_i,
    stride_map_j,
    stride_keep_b,
    stride_keep_r,
    stride_src_b,
    stride_src_n,
    num_tokens,  # N
    num_kept,  # k
    USE_FORWARD: tl.constexpr,  # similarity includes Abar[i, j]
    USE_BACKWARD: tl.constexpr,  # similarity includes Abar[j, i]
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program owns BLOCK_M rows of one image and scans all of its kept columns.
    image = tl.program_id(1).to(tl.int64)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < num_tokens
    map_image = map_ptr + image * stride_map_b
    best_sim = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    best_rank = tl.zeros((BLOCK_M,), tl.int32)
    for first_rank in range(0, num_kept, BLOCK_K):
        ranks = first_rank + tl.arange(0, BLOCK_K)
        rank_ok = ranks < num_kept
        cols = tl.load(keep_ptr + image * stride_keep_b + ranks.to(tl.int64) * stride_keep_r, mask=rank_ok, other=0)
        tile_ok = row_ok[:, None] & rank_ok[None, :]
        sim = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
        if USE_FORWARD:
            forward = tl.load(map_image + rows[:, None] * stride_map_i + cols[None, :] * stride_map_j, mask=tile_ok, other=0.0)
            sim += forward.to(tl.float32)
        if USE_BACKWARD:
            backward = tl.load(map_image + cols[None, :] * stride_map_i + rows[:, None] * stride_map_j, mask=tile_ok, other=0.0)
            sim += backward.to(tl.float32)
        sim = tl.where(rank_ok[None, :], sim, float("-inf"))
        best_sim, best_rank = _fold_running_argmax(best_sim, best_rank, sim, first_rank)
    tl.store(src_ptr + image * stride_src_b + rows * stride_src_n, best_rank.to(tl.int64), mask=row_ok)


@jit
def _match_from_qk_kernel(
    q_ptr,  # (B, H, N, d) queries of the layer whose map Abar is
    k_ptr,  # (B, H, N, d) keys, same dtype as q
    lse_ptr,  # (B, H, N) fp32 row log-sum-exp of that attention
    keep_ptr,  # (B, k) int64 kept token indices
    src_ptr,  # (B, N) int64 out: for every row, the kept rank of its best match
    stride_q_b,
    stride_q_h,
    stride_q_n,
    stride_q_d,
    stride_k_b,
    stride_k_h,
    stride_k_n,
    stride_k_d,
    stride_lse_b,
    stride_lse_h,
    stride_lse_n,
    stride_keep_b,
    stride_keep_r,
    stride_src_b,
    stride_src_n,
    num_tokens,  # N
    num_kept,  # k
    num_heads,  # H
    head_dim,  # d
    scale,  # softmax scale of the logits
    USE_FORWARD: tl.constexpr,  # similarity includes Abar[i, j] = mean_h exp(scale q_hi.k_hj - lse_hi)
    USE_BACKWARD: tl.constexpr,  # similarity includes Abar[j, i] = mean_h exp(scale q_hj.k_hi - lse_hj)
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,  # head_dim rounded up to a power of 2, at least 16 for tl.dot
):
    # One program owns BLOCK_M rows of one image; per kept tile it rebuilds Abar head by head.
    image = tl.program_id(1).to(tl.int64)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < num_tokens
    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    dim_ok = dims < head_dim
    best_sim = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    best_rank = tl.zeros((BLOCK_M,), tl.int32)
    for first_rank in range(0, num_kept, BLOCK_K):
        ranks = first_rank + tl.arange(0, BLOCK_K)
        rank_ok = ranks < num_kept
        cols = tl.load(keep_ptr + image * stride_keep_b + ranks.to(tl.int64) * stride_keep_r, mask=rank_ok, other=0)
        row_tile_ok = row_ok[:, None] & dim_ok[None, :]
        col_tile_ok = rank_ok[:, None] & dim_ok[None, :]
        # Head-summed probabilities; the mean's 1/H is a positive constant and cannot move an argmax.
        sim = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
        q_head = q_ptr + image * stride_q_b
        k_head = k_ptr + image * stride_k_b
        lse_head = lse_ptr + image * stride_lse_b
        for _ in range(num_heads):
            if USE_FORWARD:
                q_rows = tl.load(q_head + rows[:, None] * stride_q_n + dims[None, :] * stride_q_d, mask=row_tile_ok, other=0.0)
                k_cols = tl.load(k_head + cols[:, None] * stride_k_n + dims[None, :] * stride_k_d, mask=col_tile_ok, other=0.0)
                lse_rows = tl.load(lse_head + rows * stride_lse_n, mask=row_ok, other=0.0).to(tl.float32)
                logits = tl.dot(q_rows, tl.trans(k_cols), input_precision="ieee")
                sim += tl.exp(logits * scale - lse_rows[:, None])
            if USE_BACKWARD:
                k_rows = tl.load(k_head + rows[:, None] * stride_k_n + dims[None, :] * stride_k_d, mask=row_tile_ok, other=0.0)
                q_cols = tl.load(q_head + cols[:, None] * stride_q_n + dims[None, :] * stride_q_d, mask=col_tile_ok, other=0.0)
                lse_cols = tl.load(lse_head + cols * stride_lse_n, mask=rank_ok, other=0.0).to(tl.float32)
                logits = tl.dot(k_rows, tl.trans(q_cols), input_precision="ieee")
                sim += tl.exp(logits * scale - lse_cols[None, :])
            q_head += stride_q_h
            k_head += stride_k_h
            lse_head += stride_lse_h
        sim = tl.where(rank_ok[None, :], sim, float("-inf"))
        best_sim, best_rank = _fold_running_argmax(best_sim, best_rank, sim, first_rank)
    tl.store(src_ptr + image * stride_src_b + rows * stride_src_n, best_rank.to(tl.int64), mask=row_ok)


@jit
def _match_key_cosine_kernel(
    keys_ptr,  # (B, H, N, d) keys; a token's vector is its keys concatenated over heads
    keep_ptr,  # (B, k) int64 kept token indices
    src_ptr,  # (B, N) int64 out: for every row, the kept rank of its most similar kept token
    stride_keys_b,
    stride_keys_h,
    stride_keys_n,
    stride_keys_d,
    stride_keep_b,
    stride_keep_r,
    stride_src_b,
    stride_src_n,
    num_tokens,  # N
    num_kept,  # k
    num_heads,  # H
    head_dim,  # d
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,  # head_dim rounded up to a power of 2, at least 16 for tl.dot
):
    # One program owns BLOCK_M rows of one image; per kept tile it sums key dot products over heads.
    image = tl.program_id(1).to(tl.int64)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < num_tokens
    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    dim_ok = dims < head_dim
    row_tile_ok = row_ok[:, None] & dim_ok[None, :]
    keys_image = keys_ptr + image * stride_keys_b

    row_square = tl.zeros((BLOCK_M,), tl.float32)
    keys_head = keys_image
    for _ in range(num_heads):
        k_rows = tl.load(keys_head + rows[:, None] * stride_keys_n + dims[None, :] * stride_keys_d, mask=row_tile_ok, other=0.0)
        k_rows = k_rows.to(tl.float32)
        row_square += tl.sum(k_rows * k_rows, axis=1)
        keys_head += stride_keys_h
    # The floor of torch.nn.functional.normalize, so that a zero key gets similarity 0 everywhere.
    row_norm = tl.maximum(tl.sqrt(row_square), 1e-12)

    best_sim = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    best_rank = tl.zeros((BLOCK_M,), tl.int32)
    for first_rank in range(0, num_kept, BLOCK_K):
        ranks = first_rank + tl.arange(0, BLOCK_K)
        rank_ok = ranks < num_kept
        cols = tl.load(keep_ptr + image * stride_keep_b + ranks.to(tl.int64) * stride_keep_r, mask=rank_ok, other=0)
        col_tile_ok = rank_ok[:, None] & dim_ok[None, :]
        dots = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
        col_square = tl.zeros((BLOCK_K,), tl.float32)
        keys_head = keys_image
        for _ in range(num_heads):
            k_rows = tl.load(keys_head + rows[:, None] * stride_keys_n + dims[None, :] * stride_keys_d, mask=row_tile_ok, other=0.0)
            k_cols = tl.load(keys_head + cols[:, None] * stride_keys_n + dims[None, :] * stride_keys_d, mask=col_tile_ok, other=0.0)
            dots = tl.dot(k_rows, tl.trans(k_cols), dots, input_precision="ieee")
            k_cols = k_cols.to(tl.float32)
            col_square += tl.sum(k_cols * k_cols, axis=1)
            keys_head += stride_keys_h
        col_norm = tl.maximum(tl.sqrt(col_square), 1e-12)
        sim = dots / (row_norm[:, None] * col_norm[None, :])
        sim = tl.where(rank_ok[None, :], sim, float("-inf"))
        best_sim, best_rank = _fold_running_argmax(best_sim, best_rank, sim, first_rank)
    tl.store(src_ptr + image * stride_src_b + rows * stride_src_n, best_rank.to(tl.int64), mask=row_ok)


def _match_blocks(reads_map: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps) of the match kernels.

    Chosen from ptxas -v on offline sm_80 and sm_90 builds at SDXL's shapes (``atedm_kernels.aot``,
    docs/aot_compile.md), as the largest tiles with no register spills: a map scan gathers 32 x 128
    entries per step at 8 warps (at 4 warps the 64-bit pointers of the forward gather take 230 registers)
    and B * N / 32 = 256 programs cover the SMs at level 2; dot tiles (recompute, cosine) are 32 x 64 at 8
    warps: 64 x 64 spilled 16 bytes on sm_80 for the transposed recompute rule (triton 3.9), and 32 rows
    also double the programs of the 2048 px recompute path. fp32 inputs (whose exact dot is FMA-based) run
    these kernels only under the interpreter (see ``_dispatch``). The interpreter pays per step, so it
    takes wider tiles.
    """
    if triton_interpreter_on():
        return 64, 256 if reads_map else 128, 4
    if reads_map:
        return 32, 128, 8
    return 32, 64, 8


def _recovery_source_into(
    src: torch.Tensor,
    keep_idx: torch.Tensor,
    num_tokens: int,
    rule: str,
    attention_map: torch.Tensor | None,
    keys: torch.Tensor | None,
    queries: torch.Tensor | None,
    lse: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """Launch the match kernel for ``rule`` writing into ``src`` (B, N) int64, then give kept rows their rank."""
    batch, num_kept = keep_idx.shape
    flags = dict(USE_FORWARD=rule in _READS_FORWARD, USE_BACKWARD=rule in _READS_BACKWARD)
    index_args = (*keep_idx.stride(), *src.stride(), num_tokens, num_kept)
    if rule == "key_cosine":
        block_m, block_k, num_warps = _match_blocks(False)
        _match_key_cosine_kernel[(triton.cdiv(num_tokens, block_m), batch)](
            keys, keep_idx, src, *keys.stride(), *index_args, keys.shape[1], keys.shape[3],
            BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_D=head_dim_block(keys.shape[3]), num_warps=num_warps,
        )
    elif attention_map is not None:
        block_m, block_k, num_warps = _match_blocks(True)
        _match_from_map_kernel[(triton.cdiv(num_tokens, block_m), batch)](
            attention_map, keep_idx, src, *attention_map.stride(), *index_args,
            **flags, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=num_warps,
        )
    else:
        head_dim = queries.shape[3]
        block_m, block_k, num_warps = _match_blocks(False)
        _match_from_qk_kernel[(triton.cdiv(num_tokens, block_m), batch)](
            queries, keys, lse, keep_idx, src, *queries.stride(), *keys.stride(), *lse.stride(), *index_args,
            queries.shape[1], head_dim, head_dim**-0.5 if scale is None else scale,
            **flags, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_D=head_dim_block(head_dim), num_warps=num_warps,
        )
    own_rank = torch.arange(num_kept, device=keep_idx.device).expand(batch, num_kept)
    return src.scatter_(1, keep_idx, own_rank)


@torch.library.custom_op("atedm::recovery_source", mutates_args=())
def _recovery_source_triton(
    keep_idx: torch.Tensor,
    num_tokens: int,
    rule: str,
    attention_map: torch.Tensor | None,
    keys: torch.Tensor | None,
    queries: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    scale: float | None = None,
    fallback: bool = False,
) -> torch.Tensor:
    """Triton recovery match as an opaque op, so a compiled caller keeps one graph around the launch."""
    def launch():
        src = torch.empty(keep_idx.shape[0], num_tokens, dtype=torch.int64, device=keep_idx.device)
        return _recovery_source_into(src, keep_idx, num_tokens, rule, attention_map, keys, queries, lse, scale)

    recompute = dict(queries=queries, lse=lse, scale=scale) if lse is not None else {}
    return guarded_launch("recovery_source", keep_idx.device, fallback, launch,
                          lambda: recovery_source_ref(keep_idx, num_tokens, rule, attention_map, keys, **recompute))


@_recovery_source_triton.register_fake
def _(keep_idx, num_tokens, rule, attention_map, keys, queries=None, lse=None, scale=None, fallback=False):
    return keep_idx.new_empty(keep_idx.shape[0], num_tokens, dtype=torch.int64)


@torch.library.custom_op("atedm::scatter_recover", mutates_args=())
def _scatter_recover_triton(kept: torch.Tensor, src: torch.Tensor, fallback: bool = False) -> torch.Tensor:
    """Triton refill of the full stream as an opaque op: the row gather full[b, i] = kept[b, src[b, i]]."""
    def launch():
        full = kept.new_empty(kept.shape[0], src.shape[1], kept.shape[2])
        return _gather_rows_into(full, kept, src)

    return guarded_launch("scatter_recover", kept.device, fallback, launch, lambda: scatter_recover_ref(kept, src))


@_scatter_recover_triton.register_fake
def _(kept, src, fallback=False):
    return kept.new_empty(kept.shape[0], src.shape[1], kept.shape[2])


def _check_recompute_operands(batch: int, num_tokens: int, queries, keys, lse) -> None:
    expected = f"queries and keys (B={batch}, H, N={num_tokens}, d) of one dtype and lse (B, H, N)"
    if queries is None or keys is None or lse is None:
        raise ValueError(f"recomputing the attention map needs {expected}; missing "
                         + ", ".join(n for n, t in (("queries", queries), ("keys", keys), ("lse", lse)) if t is None))
    # d = 0 has no default scale 1 / sqrt(d).
    if (queries.dim() != 4 or queries.shape[0] != batch or queries.shape[2] != num_tokens or queries.shape[3] == 0
            or keys.shape != queries.shape or queries.dtype != keys.dtype or lse.shape != queries.shape[:3]):
        raise ValueError(f"recomputing the attention map needs {expected}; got queries {tuple(queries.shape)} "
                         f"{queries.dtype}, keys {tuple(keys.shape)} {keys.dtype}, lse {tuple(lse.shape)}")


def recovery_source(
    keep_idx: torch.Tensor,
    num_tokens: int,
    rule: str = "attention",
    attention_map: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
    backend: str = "auto",
    *,
    queries: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """For every token, the slot in the kept list whose value it takes (B, N) int64; see the docstring.

    The attention rules read ``attention_map`` when it is given. Without it they recompute the kept
    columns of Abar from ``queries``, ``keys`` (B, H, N, d) and ``lse`` (B, H, N) with softmax ``scale``
    (default 1 / sqrt(d)): for large N, where the map is never materialized.
    """
    if rule not in SIMILARITY_RULES:
        raise ValueError(f"unknown similarity rule {rule!r}; expected one of {SIMILARITY_RULES}")
    if keep_idx.dim() != 2 or not 1 <= keep_idx.shape[1] <= num_tokens:
        raise ValueError(f"keep_idx must be (B, k) with 1 <= k <= N={num_tokens}; got {tuple(keep_idx.shape)}")
    batch = keep_idx.shape[0]
    if rule == "key_cosine":
        if keys is None or keys.dim() != 4 or keys.shape[0] != batch or keys.shape[2] != num_tokens:
            raise ValueError(f"rule 'key_cosine' needs keys (B={batch}, H, N={num_tokens}, d)")
        operands = {"keys": keys}
    elif attention_map is not None:
        if attention_map.shape != (batch, num_tokens, num_tokens):
            raise ValueError(f"rule {rule!r} needs attention_map (B, N, N) = {(batch, num_tokens, num_tokens)}; "
                             f"got {tuple(attention_map.shape)}")
        operands = {"attention_map": attention_map}
    elif queries is None and lse is None:
        raise ValueError(f"rule {rule!r} needs attention_map (B, N, N) = {(batch, num_tokens, num_tokens)}, "
                         "or queries, keys and lse to recompute it")
    else:
        _check_recompute_operands(batch, num_tokens, queries, keys, lse)
        operands = {"queries": queries, "keys": keys, "lse": lse}
    check_same_device(keep_idx=keep_idx, **operands)
    recompute = dict(queries=queries, lse=lse, scale=scale) if "lse" in operands else {}
    # Reading a given map needs no tl.dot; key cosine and the recompute rules multiply tiles.
    uses_dot = "attention_map" not in operands
    if resolve_backend(backend, keep_idx, *operands.values(), uses_dot=uses_dot) == "triton":
        return _recovery_source_triton(keep_idx, num_tokens, rule, attention_map, keys, **recompute,
                                       fallback=backend == "auto")
    return recovery_source_ref(keep_idx, num_tokens, rule, attention_map, keys, **recompute)


def scatter_recover(kept: torch.Tensor, src: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Rebuild the full (B, N, C) stream from kept rows (B, k, C) and the source slots (B, N)."""
    if kept.dim() != 3 or src.dim() != 2 or src.shape[0] != kept.shape[0]:
        raise ValueError(f"expected kept (B, k, C) and src (B, N); got {tuple(kept.shape)} and {tuple(src.shape)}")
    # With no kept rows every source slot is out of range: the Triton copy read out of bounds (segfault).
    if kept.shape[1] == 0 and src.shape[1] > 0:
        raise ValueError(f"kept holds no rows to refill {src.shape[1]} tokens from; got kept {tuple(kept.shape)}")
    check_same_device(kept=kept, src=src)
    if resolve_backend(backend, kept, src) == "triton":
        return _scatter_recover_triton(kept, src, backend == "auto")
    return scatter_recover_ref(kept, src)

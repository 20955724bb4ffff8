"""Similarity-based copy: refill every pruned token with the final value of its best-matching kept token.

Math. With kept indices keep (B, k) ascending and a similarity sim[i, j] between tokens::

    src[b, i] = r                      if i = keep[b, r]          (a kept token takes its own value)
    src[b, i] = argmax_r sim[i, keep[b, r]]   otherwise           (first maximum wins a tie)
    full[b, i, :] = kept[b, src[b, i], :]                          (B, N, C)

Across layers (``compose_sources``). A block that prunes in L layers records one source per layer:
sources[0] (B, N) into the first layer's k_0 kept tokens, sources[l] (B, k_{l-1}) into layer l's k_l kept
tokens. A token of the full grid follows its chain to the last layer's kept tokens::

    src[b, i] = sources[L-1][b, ... sources[1][b, sources[0][b, i]] ...]      (B, N) in [0, k_{L-1})

Delta refill (``scatter_recover_delta``). With the stream at the cut, cut_state (B, N, C), its kept rows
then, cut_kept (B, k, C), and the kept rows at the end, kept_out (B, k, C), a token keeps its own state at
the cut plus the change its source underwent since (a kept token, cut_state[i] = cut_kept[src[i]], gets
kept_out[src[i]] up to rounding)::

    full[b, i, :] = cut_state[b, i, :] + (kept_out - cut_kept)[b, src[b, i], :]    (B, N, C)

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

Kernels. The match kernels give one program BLOCK_M rows of one image; one loop (``_best_kept_rank``)
walks the k kept columns in BLOCK_K tiles and keeps a running fp32 (max, argmax) per row, so no similarity
row is ever stored. Each rule hands the loop its similarity tile:

* map rules gather Abar[i, keep] (row i's kept columns) and/or Abar[keep, i] (kept rows, read along i);
* recompute rules rebuild those entries head by head with a (BLOCK_M x d) @ (d x BLOCK_K) dot, the
  exp and the lse, never holding more than one tile; the 1 / H is dropped (it cannot move an argmax);
* ``key_cosine`` accumulates key dot products over heads and divides by both norms, the column norms
  computed from the tiles already loaded for the dot.
Kept rows then take their own rank by one scatter. The copy (``scatter_recover``) is the row gather of
``topk_gather``: every full row reads its source kept row, so each output element is written once. The
delta refill subtracts on the k kept rows, then copies and adds; composing sources is a chain of int64
gathers (B * N each), too small for a kernel of its own.

Floor (docs/performance.md), SDXL level 2 at batch 2 and rho = 0.63 (N = 4096, k = 1516, d = 64, fp16), at the H100's
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

from typing import Sequence

import torch

from ._chunking import rows_per_chunk
from ._dispatch import check_same_device, guarded_launch, resolve_backend, triton_interpreter_on
from ._triton import dot_precision, head_dim_block, jit, load_head_rows, tl, triton
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
    keys: torch.Tensor | None,
    queries: torch.Tensor | None,
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
    operands = (attention_map, keys, queries, lse, scale)
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


def compose_sources_ref(sources: Sequence[torch.Tensor]) -> torch.Tensor:
    """Reference: src[b, i] <- sources[l][b, src[b, i]] for each later layer l -> (B, N) int64."""
    src = sources[0]
    for later in sources[1:]:
        src = torch.gather(later, 1, src)
    return src


def scatter_recover_delta_ref(
    kept_out: torch.Tensor, cut_state: torch.Tensor, cut_kept: torch.Tensor, src: torch.Tensor
) -> torch.Tensor:
    """Reference: full[b, i] = cut_state[b, i] + (kept_out - cut_kept)[b, src[b, i]] -> (B, N, C)."""
    return cut_state + scatter_recover_ref(kept_out - cut_kept, src)


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
def _best_kept_rank(
    similarity_tile: tl.constexpr,  # the rule's @jit tile function, called as below
    operands,  # tuple of the rule's pointers, strides, sizes and flags, unpacked after the tile's arguments
    rows,  # (BLOCK_M,) int64 token indices of the program's rows
    num_tokens,  # N
    keep_image,  # the image's (k,) kept token indices
    stride_keep_r,
    num_kept,  # k
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Each row's kept rank of highest similarity, int32 (BLOCK_M,), first maximum on a tie.

    Walks the kept tokens in rank order, BLOCK_K at a time: ``similarity_tile(rows, num_tokens, cols,
    ranks, num_kept, *operands)`` gives the (BLOCK_M, BLOCK_K) fp32 similarities of the rows (valid below
    num_tokens) to the kept tokens ``cols`` of ranks ``ranks`` (valid below num_kept), and only a running
    (max, argmax) per row survives a tile. The operands travel as a tuple literal built in the call: a
    tuple bound to a name would turn its constexpr flags into tensors.
    """
    best_sim = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    best_rank = tl.zeros((BLOCK_M,), tl.int32)
    for first_rank in range(0, num_kept, BLOCK_K):
        ranks = first_rank + tl.arange(0, BLOCK_K)
        rank_ok = ranks < num_kept
        cols = tl.load(keep_image + ranks.to(tl.int64) * stride_keep_r, mask=rank_ok, other=0)
        sim = similarity_tile(rows, num_tokens, cols, ranks, num_kept, *operands)
        sim = tl.where(rank_ok[None, :], sim, float("-inf"))
        best_sim, best_rank = _fold_running_argmax(best_sim, best_rank, sim, first_rank)
    return best_rank


@jit
def _map_tile(
    rows, num_tokens, cols, ranks, num_kept,  # the tile, as _best_kept_rank hands it over
    map_image,  # the image's (N, N) head-averaged attention Abar, any float dtype
    stride_map_i,
    stride_map_j,
    USE_FORWARD: tl.constexpr,  # similarity includes Abar[i, j]
    USE_BACKWARD: tl.constexpr,  # similarity includes Abar[j, i]
):
    """Similarity read from the map: row i's kept columns and/or the kept rows' entries in column i."""
    tile_ok = (rows < num_tokens)[:, None] & (ranks < num_kept)[None, :]
    sim = tl.zeros((rows.shape[0], ranks.shape[0]), tl.float32)
    if USE_FORWARD:
        forward = tl.load(map_image + rows[:, None] * stride_map_i + cols[None, :] * stride_map_j,
                          mask=tile_ok, other=0.0)
        sim += forward.to(tl.float32)
    if USE_BACKWARD:
        backward = tl.load(map_image + cols[None, :] * stride_map_i + rows[:, None] * stride_map_j,
                           mask=tile_ok, other=0.0)
        sim += backward.to(tl.float32)
    return sim


@jit
def _head_dots(
    row_head, stride_row_n, stride_row_d,  # one head's (N, d) tensor, read at the tile's rows
    kept_head, stride_kept_n, stride_kept_d,  # one head's (N, d) tensor, read at the tile's kept tokens
    rows, num_tokens, cols, ranks, num_kept,  # the tile, as _best_kept_rank hands it over
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """<row_head[i], kept_head[j]> for the tile's rows i and kept tokens j, fp32 (BLOCK_M, BLOCK_K)."""
    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    at_rows = load_head_rows(row_head + rows[:, None] * stride_row_n + dims[None, :] * stride_row_d,
                             rows, num_tokens, dims, HEAD_DIM, BLOCK_D, True)
    at_kept = load_head_rows(kept_head + cols[:, None] * stride_kept_n + dims[None, :] * stride_kept_d,
                             ranks, num_kept, dims, HEAD_DIM, BLOCK_D, True)
    return tl.dot(at_rows, tl.trans(at_kept), input_precision=DOT_PRECISION)


@jit
def _recomputed_attention_tile(
    rows, num_tokens, cols, ranks, num_kept,  # the tile, as _best_kept_rank hands it over
    q_image,  # the image's (H, N, d) queries of the layer whose map Abar is
    k_image,  # its (H, N, d) keys, same dtype as q
    lse_image,  # its (H, N) fp32 row log-sum-exp of that attention
    stride_q_h,
    stride_q_n,
    stride_q_d,
    stride_k_h,
    stride_k_n,
    stride_k_d,
    stride_lse_h,
    stride_lse_n,
    num_heads,  # H
    scale,  # softmax scale of the logits
    USE_FORWARD: tl.constexpr,  # similarity includes Abar[i, j] = mean_h exp(scale q_hi.k_hj - lse_hi)
    USE_BACKWARD: tl.constexpr,  # similarity includes Abar[j, i] = mean_h exp(scale q_hj.k_hi - lse_hj)
    HEAD_DIM: tl.constexpr,  # d
    BLOCK_D: tl.constexpr,  # d rounded up to a power of 2, at least 16 for tl.dot
    DOT_PRECISION: tl.constexpr,  # dot_precision(q.dtype): IEEE for fp32, where TF32 would move argmaxes
):
    """Similarity rebuilt head by head from q, k and the lse: head-summed probabilities, since the mean's
    1/H is a positive constant and cannot move an argmax. Tiles of kept tokens are masked by rank."""
    row_ok = rows < num_tokens
    rank_ok = ranks < num_kept
    sim = tl.zeros((rows.shape[0], ranks.shape[0]), tl.float32)
    q_head = q_image
    k_head = k_image
    lse_head = lse_image
    for _ in range(num_heads):
        if USE_FORWARD:
            logits = _head_dots(q_head, stride_q_n, stride_q_d, k_head, stride_k_n, stride_k_d,
                                rows, num_tokens, cols, ranks, num_kept, HEAD_DIM, BLOCK_D, DOT_PRECISION)
            lse_rows = tl.load(lse_head + rows * stride_lse_n, mask=row_ok, other=0.0).to(tl.float32)
            sim += tl.exp(logits * scale - lse_rows[:, None])
        if USE_BACKWARD:
            logits = _head_dots(k_head, stride_k_n, stride_k_d, q_head, stride_q_n, stride_q_d,
                                rows, num_tokens, cols, ranks, num_kept, HEAD_DIM, BLOCK_D, DOT_PRECISION)
            lse_cols = tl.load(lse_head + cols * stride_lse_n, mask=rank_ok, other=0.0).to(tl.float32)
            sim += tl.exp(logits * scale - lse_cols[None, :])
        q_head += stride_q_h
        k_head += stride_k_h
        lse_head += stride_lse_h
    return sim


@jit
def _key_cosine_tile(
    rows, num_tokens, cols, ranks, num_kept,  # the tile, as _best_kept_rank hands it over
    keys_image,  # the image's (H, N, d) keys
    stride_keys_h,
    stride_keys_n,
    stride_keys_d,
    row_norm,  # (BLOCK_M,) norms of the rows' keys concatenated over heads, floored at 1e-12
    num_heads,  # H
    HEAD_DIM: tl.constexpr,  # d
    BLOCK_D: tl.constexpr,  # d rounded up to a power of 2, at least 16 for tl.dot
    DOT_PRECISION: tl.constexpr,  # dot_precision(keys.dtype): IEEE for fp32, where TF32 would move argmaxes
):
    """Cosine of the keys concatenated over heads; the kept columns' norms come from the tiles already
    loaded for the dot. Tiles of kept tokens are masked by rank."""
    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    dots = tl.zeros((rows.shape[0], ranks.shape[0]), tl.float32)
    col_square = tl.zeros((ranks.shape[0],), tl.float32)
    keys_head = keys_image
    for _ in range(num_heads):
        k_rows = load_head_rows(keys_head + rows[:, None] * stride_keys_n + dims[None, :] * stride_keys_d,
                                rows, num_tokens, dims, HEAD_DIM, BLOCK_D, True)
        k_cols = load_head_rows(keys_head + cols[:, None] * stride_keys_n + dims[None, :] * stride_keys_d,
                                ranks, num_kept, dims, HEAD_DIM, BLOCK_D, True)
        dots = tl.dot(k_rows, tl.trans(k_cols), dots, input_precision=DOT_PRECISION)
        k_cols = k_cols.to(tl.float32)
        col_square += tl.sum(k_cols * k_cols, axis=1)
        keys_head += stride_keys_h
    col_norm = tl.maximum(tl.sqrt(col_square), 1e-12)
    return dots / (row_norm[:, None] * col_norm[None, :])


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
    best_rank = _best_kept_rank(
        _map_tile, (map_ptr + image * stride_map_b, stride_map_i, stride_map_j, USE_FORWARD, USE_BACKWARD),
        rows, num_tokens, keep_ptr + image * stride_keep_b, stride_keep_r, num_kept, BLOCK_M, BLOCK_K,
    )
    tl.store(src_ptr + image * stride_src_b + rows * stride_src_n, best_rank.to(tl.int64), mask=rows < num_tokens)


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
    scale,  # softmax scale of the logits
    USE_FORWARD: tl.constexpr,  # similarity includes Abar[i, j] = mean_h exp(scale q_hi.k_hj - lse_hi)
    USE_BACKWARD: tl.constexpr,  # similarity includes Abar[j, i] = mean_h exp(scale q_hj.k_hi - lse_hj)
    HEAD_DIM: tl.constexpr,  # d, fixed by the model
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,  # d rounded up to a power of 2, at least 16 for tl.dot
    DOT_PRECISION: tl.constexpr,  # dot_precision(q.dtype)
):
    # One program owns BLOCK_M rows of one image; per kept tile it rebuilds Abar head by head.
    image = tl.program_id(1).to(tl.int64)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    best_rank = _best_kept_rank(
        _recomputed_attention_tile,
        (q_ptr + image * stride_q_b, k_ptr + image * stride_k_b, lse_ptr + image * stride_lse_b,
         stride_q_h, stride_q_n, stride_q_d, stride_k_h, stride_k_n, stride_k_d, stride_lse_h, stride_lse_n,
         num_heads, scale, USE_FORWARD, USE_BACKWARD, HEAD_DIM, BLOCK_D, DOT_PRECISION),
        rows, num_tokens, keep_ptr + image * stride_keep_b, stride_keep_r, num_kept, BLOCK_M, BLOCK_K,
    )
    tl.store(src_ptr + image * stride_src_b + rows * stride_src_n, best_rank.to(tl.int64), mask=rows < num_tokens)


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
    HEAD_DIM: tl.constexpr,  # d, fixed by the model
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,  # d rounded up to a power of 2, at least 16 for tl.dot
    DOT_PRECISION: tl.constexpr,  # dot_precision(keys.dtype)
):
    # One program owns BLOCK_M rows of one image; per kept tile it sums key dot products over heads.
    image = tl.program_id(1).to(tl.int64)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    keys_image = keys_ptr + image * stride_keys_b
    row_square = tl.zeros((BLOCK_M,), tl.float32)
    keys_head = keys_image
    for _ in range(num_heads):
        k_rows = load_head_rows(keys_head + rows[:, None] * stride_keys_n + dims[None, :] * stride_keys_d,
                                rows, num_tokens, dims, HEAD_DIM, BLOCK_D, True).to(tl.float32)
        row_square += tl.sum(k_rows * k_rows, axis=1)
        keys_head += stride_keys_h
    # The floor of torch.nn.functional.normalize, so that a zero key gets similarity 0 everywhere.
    row_norm = tl.maximum(tl.sqrt(row_square), 1e-12)
    best_rank = _best_kept_rank(
        _key_cosine_tile,
        (keys_image, stride_keys_h, stride_keys_n, stride_keys_d, row_norm, num_heads,
         HEAD_DIM, BLOCK_D, DOT_PRECISION),
        rows, num_tokens, keep_ptr + image * stride_keep_b, stride_keep_r, num_kept, BLOCK_M, BLOCK_K,
    )
    tl.store(src_ptr + image * stride_src_b + rows * stride_src_n, best_rank.to(tl.int64), mask=rows < num_tokens)


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
            keys, keep_idx, src, *keys.stride(), *index_args, keys.shape[1],
            HEAD_DIM=keys.shape[3], BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_D=head_dim_block(keys.shape[3]),
            DOT_PRECISION=dot_precision(keys.dtype), num_warps=num_warps,
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
            queries.shape[1], head_dim**-0.5 if scale is None else scale,
            **flags, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_D=head_dim_block(head_dim),
            DOT_PRECISION=dot_precision(queries.dtype), num_warps=num_warps,
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
    # Reading a given map needs no tl.dot; key cosine and the recompute rules multiply key (and query) tiles.
    dot_operands = tuple(t for name, t in operands.items() if name in ("queries", "keys"))
    if resolve_backend(backend, keep_idx, *operands.values(), dot_operands=dot_operands) == "triton":
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


def compose_sources(sources: Sequence[torch.Tensor]) -> torch.Tensor:
    """The full grid's source slots into the last pruning layer's kept tokens, (B, N) int64; see the docstring.

    ``sources[0]`` is (B, N) into the first layer's k_0 kept tokens, ``sources[l]`` (B, k_{l-1}) into layer
    l's kept tokens. A layer keeps at most the tokens it receives, so the widths N >= k_0 >= k_1 ... never
    grow. The index values are not range-checked here: that would cost a device sync per call (torch.gather
    checks them on the CPU).
    """
    if len(sources) == 0:
        raise ValueError("compose_sources needs the sources of at least one pruning layer; got none")
    batch = sources[0].shape[0] if sources[0].dim() == 2 else None
    for layer, src in enumerate(sources):
        if src.dim() != 2 or src.dtype != torch.int64 or src.shape[0] != batch:
            raise ValueError(f"sources[{layer}] must be (B, width) int64 with the batch B of sources[0]; got "
                             f"{tuple(src.shape)} {src.dtype}" + ("" if batch is None else f" for B={batch}"))
    for layer in range(1, len(sources)):
        received, kept = sources[layer - 1].shape[1], sources[layer].shape[1]
        if not 1 <= kept <= received:
            raise ValueError(f"sources[{layer}] has a column per token pruning layer {layer - 1} kept, which must "
                             f"be 1 to the {received} tokens it received; got {kept}")
    check_same_device(**{f"sources[{layer}]": src for layer, src in enumerate(sources)})
    return compose_sources_ref(sources)


def scatter_recover_delta(
    kept_out: torch.Tensor,
    cut_state: torch.Tensor,
    cut_kept: torch.Tensor,
    src: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Delta refill (B, N, C) from the kept rows at the end ``kept_out`` (B, k, C), the stream at the cut
    ``cut_state`` (B, N, C), its kept rows then ``cut_kept`` (B, k, C) and the source slots ``src`` (B, N)."""
    if (kept_out.dim() != 3 or cut_kept.shape != kept_out.shape or src.dim() != 2 or src.shape[0] != kept_out.shape[0]
            or cut_state.shape != (kept_out.shape[0], src.shape[1], kept_out.shape[2])):
        raise ValueError(f"expected kept_out and cut_kept (B, k, C), cut_state (B, N, C) and src (B, N); got kept_out "
                         f"{tuple(kept_out.shape)}, cut_state {tuple(cut_state.shape)}, cut_kept "
                         f"{tuple(cut_kept.shape)}, src {tuple(src.shape)}")
    check_same_device(kept_out=kept_out, cut_state=cut_state, cut_kept=cut_kept, src=src)
    # The difference on the k kept rows, then one copy: k * C subtractions instead of N * C.
    return cut_state + scatter_recover(kept_out - cut_kept, src, backend=backend)

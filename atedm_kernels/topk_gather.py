"""Token selection: the k best tokens per image, kept in spatial order, and the gather of their rows.

Math. For each image b, keep the k tokens with the highest score; a tie goes to the lower token index.
The kept indices are returned in ascending order, so the pruned stream stays in raster order::

    keep[b] = sort_ascending(top_k(scores[b]))            (B, k) int64
    gathered[b, r, :] = x[b, keep[b, r], :]              (B, k, C)

Classifier-free guidance: a batch ``[uncond..., cond...]`` can use per-sample masks (the default) or one
mask shared by both halves and taken from the conditional half (``share_cfg_scores``).

Shapes: scores (B, N) float -> keep (B, k) int64; x (B, N, C) any dtype, keep (B, k) -> (B, k, C).

Kernels.

* Top-k, one program per image, in three steps over its score row (the row is 4 * N bytes, 64 KB at
  N = 16384, so after the first pass every pass reads it from L1/L2):
  1. each fp32 score becomes an int32 key whose signed order is the float order (flip the magnitude bits
     of negatives; NaN above +inf and -0.0 equal to +0.0, as ``torch.sort`` orders them);
  2. a 32-step bisection over the key range finds the k-th largest key T: the largest t with
     #{key >= t} >= k. Each step is one counting pass; the count at the upper end gives #{key > T};
  3. one compaction pass in index order keeps every key > T and the first k - #{key > T} keys equal to
     T (ties go to the lower index), writing each kept index at its running prefix count, so the output
     comes out ascending with no sort.
  Why not sort: a bitonic ``tl.sort`` of N = 16384 (index, key) pairs is ~105 compare-exchange stages over
  the whole padded row, and a second sort would be needed to put the kept indices back in index order;
  the select is 32 counting passes plus one scan pass, handles any N and any k, and never pads the row.
* Gather, program per (block of kept rows, block of channels, image): load the row indices once, then
  copy a (BLOCK_R, BLOCK_C) tile. ``recovery.scatter_recover`` is the same row gather (a full row reads
  its source kept row), so it launches this kernel too.
* No fused top-k + gather: the gather runs later in the block, on the first layer's feed-forward output,
  which does not exist when the mask is chosen; and fused, the copy would run on B programs only.

Floor (docs/performance.md). Both ops are memory-bound. The gather moves 2 * k * C * bytes per image: SDXL level 2 at batch 2,
rho = 0.63 (k = 1516, C = 640, fp16) is 7.8 MB, 2.6 us at the H100's 3.0 TB/s copy rate, 1.8 us at the
H200's 4.3 TB/s; level 3 (k = 379, C = 1280) 3.9 MB, 1.3 us; level 2 at 2048 px (N = 16384, k = 6063)
31 MB, 10 us. Top-k reads only 4 * B * N bytes (32 KB at level 2, ~10 ns of bandwidth): it is bound by
the latency of its 33 dependent passes in one program per image, a few microseconds, like a launch.
"""

from __future__ import annotations

import math

import torch

from ._dispatch import check_same_device, guarded_launch, resolve_backend, triton_interpreter_on
from ._triton import jit, tl, triton

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


@jit
def _order_key(x):
    """int32 keys whose signed order is the order ``torch.sort`` gives the fp32 values x."""
    # -0.0 and +0.0 compare equal, so they must tie (lower index first) rather than order by sign bit.
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    # A negative float's magnitude bits grow as it falls: flip them so signed int order = float order.
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    # torch.sort ranks every NaN above +inf (key 0x7F800000), whatever its sign and payload.
    return tl.where(x != x, 0x7FFFFFFF, key)


@jit
def _topk_keep_kernel(
    scores_ptr,  # (B, N) fp32 scores
    keep_ptr,  # (B, k) int64 out: kept token indices, ascending
    stride_scores_b,
    stride_scores_n,
    stride_keep_b,
    stride_keep_r,
    num_tokens,  # N
    num_keep,  # k, 1 <= k <= N
    BLOCK_N: tl.constexpr,  # tokens per pass step; a power of 2 (see _topk_block)
):
    # One program owns one image: its whole score row and all k outputs.
    image = tl.program_id(0).to(tl.int64)
    row_ptr = scores_ptr + image * stride_scores_b
    lanes = tl.arange(0, BLOCK_N)

    # Invariant: #{key >= lo} >= k > #{key >= hi} = above_hi. Keys are int32, so 32 halvings of
    # [-2^31, 2^31] leave hi = lo + 1, lo = T (the k-th largest key) and above_hi = #{key > T}.
    lo = tl.full((), -2147483648, tl.int64)
    hi = tl.full((), 2147483648, tl.int64)
    above_hi = tl.full((), 0, tl.int32)
    for _ in range(32):
        mid = (lo + hi) >> 1
        at_least_mid = tl.full((), 0, tl.int32)
        for start in range(0, num_tokens, BLOCK_N):
            tokens = start + lanes
            valid = tokens < num_tokens
            key = _order_key(tl.load(row_ptr + tokens.to(tl.int64) * stride_scores_n, mask=valid, other=0.0))
            at_least_mid += tl.sum(((key >= mid) & valid).to(tl.int32), axis=0)
        enough = at_least_mid >= num_keep
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
        above_hi = tl.where(enough, above_hi, at_least_mid)
    threshold = lo
    ties_to_keep = num_keep - above_hi

    # Compaction in index order: the output slot of a kept token is the number kept before it.
    kept_before = tl.full((), 0, tl.int32)
    ties_before = tl.full((), 0, tl.int32)
    for start in range(0, num_tokens, BLOCK_N):
        tokens = start + lanes
        valid = tokens < num_tokens
        key = _order_key(tl.load(row_ptr + tokens.to(tl.int64) * stride_scores_n, mask=valid, other=0.0))
        is_tie = ((key == threshold) & valid).to(tl.int32)
        tie_rank = ties_before + tl.cumsum(is_tie, axis=0) - is_tie
        keep = ((key > threshold) & valid) | ((is_tie != 0) & (tie_rank < ties_to_keep))
        keep_i = keep.to(tl.int32)
        slot = kept_before + tl.cumsum(keep_i, axis=0) - keep_i
        tl.store(
            keep_ptr + image * stride_keep_b + slot.to(tl.int64) * stride_keep_r, tokens.to(tl.int64), mask=keep
        )
        kept_before += tl.sum(keep_i, axis=0)
        ties_before += tl.sum(is_tie, axis=0)


@jit
def _gather_rows_kernel(
    src_ptr,  # (B, N_src, C) rows to read
    index_ptr,  # (B, R) int64: source row of every output row
    out_ptr,  # (B, R, C) out
    stride_src_b,
    stride_src_n,
    stride_src_c,
    stride_index_b,
    stride_index_r,
    stride_out_b,
    stride_out_r,
    stride_out_c,
    num_out_rows,  # R
    num_channels,  # C
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # One program owns a (BLOCK_R rows, BLOCK_C channels) tile of one image's output.
    image = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    channels = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    row_ok = rows < num_out_rows
    source_rows = tl.load(index_ptr + image * stride_index_b + rows.to(tl.int64) * stride_index_r, mask=row_ok, other=0)
    tile_ok = row_ok[:, None] & (channels < num_channels)[None, :]
    values = tl.load(
        src_ptr
        + image * stride_src_b
        + source_rows.to(tl.int64)[:, None] * stride_src_n
        + channels[None, :] * stride_src_c,
        mask=tile_ok,
    )
    tl.store(
        out_ptr + image * stride_out_b + rows.to(tl.int64)[:, None] * stride_out_r + channels[None, :] * stride_out_c,
        values,
        mask=tile_ok,
    )


def _topk_block(num_tokens: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) of the top-k kernel.

    On a GPU a 4096-key step is 16 keys per thread at 8 warps: the whole SDXL level-2 row in one step,
    four steps at 2048 px. The interpreter's cost is per step, so there it takes the row in one step up to
    16384 (numpy handles the wide vectors cheaply).
    """
    cap = 16384 if triton_interpreter_on() else 4096
    block = min(triton.next_power_of_2(num_tokens), cap)
    return block, 8 if block >= 2048 else 4


def _topk_keep_indices_into(keep: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """Launch the top-k kernel writing into ``keep`` (B, k) int64 (the tests hand in a poisoned one)."""
    scores = scores.float()  # fp16/bf16 -> fp32 is exact and keeps the order
    block, num_warps = _topk_block(scores.shape[1])
    _topk_keep_kernel[(scores.shape[0],)](
        scores, keep, scores.stride(0), scores.stride(1), keep.stride(0), keep.stride(1),
        scores.shape[1], k, BLOCK_N=block, num_warps=num_warps,
    )
    return keep


@torch.library.custom_op("atedm::topk_keep_indices", mutates_args=())
def _topk_keep_indices_triton(scores: torch.Tensor, k: int, fallback: bool = False) -> torch.Tensor:
    """Triton top-k as an opaque op, so a compiled caller keeps one graph around the launch."""
    def launch():
        keep = torch.empty(scores.shape[0], k, dtype=torch.int64, device=scores.device)
        return _topk_keep_indices_into(keep, scores, k)

    return guarded_launch("topk_keep_indices", scores.device, fallback, launch,
                          lambda: topk_keep_indices_ref(scores, k))


@_topk_keep_indices_triton.register_fake
def _(scores: torch.Tensor, k: int, fallback: bool = False) -> torch.Tensor:
    return scores.new_empty(scores.shape[0], k, dtype=torch.int64)


def _row_copy_blocks(num_channels: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) of a row gather.

    GPU: 128 channels divide all of SDXL's widths (320, 640, 1280), so no lane idles, and 32 rows make a
    4096-element tile: 8 KB of fp16 per program, 32 elements per thread at 4 warps in 16-byte vectors,
    and 480 programs for the level-2 gather (1280 for its refill) over 132 SMs. The interpreter pays per
    program, so it copies 64 rows of up to 2048 channels at once.
    """
    if triton_interpreter_on():
        return 64, min(triton.next_power_of_2(num_channels), 2048), 4
    return 32, min(triton.next_power_of_2(num_channels), 128), 4


def _gather_rows_into(out: torch.Tensor, src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out[b, r, :] = src[b, index[b, r], :] for out (B, R, C); shared by gather_tokens and scatter_recover."""
    batch, rows, channels = out.shape
    if out.numel() == 0:  # C = 0 would make a zero-wide channel block (and a division by zero in the grid)
        return out
    block_r, block_c, num_warps = _row_copy_blocks(channels)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(channels, block_c), batch)
    _gather_rows_kernel[grid](
        src, index, out,
        src.stride(0), src.stride(1), src.stride(2),
        index.stride(0), index.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        rows, channels, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
    )
    return out


@torch.library.custom_op("atedm::gather_tokens", mutates_args=())
def _gather_tokens_triton(x: torch.Tensor, keep_idx: torch.Tensor, fallback: bool = False) -> torch.Tensor:
    """Triton gather of the kept rows as an opaque op (see ``_topk_keep_indices_triton``)."""
    def launch():
        out = x.new_empty(x.shape[0], keep_idx.shape[1], x.shape[2])
        return _gather_rows_into(out, x, keep_idx)

    return guarded_launch("gather_tokens", x.device, fallback, launch, lambda: gather_tokens_ref(x, keep_idx))


@_gather_tokens_triton.register_fake
def _(x: torch.Tensor, keep_idx: torch.Tensor, fallback: bool = False) -> torch.Tensor:
    return x.new_empty(x.shape[0], keep_idx.shape[1], x.shape[2])


def topk_keep_indices(scores: torch.Tensor, k: int, backend: str = "auto") -> torch.Tensor:
    """Ascending indices (B, k) int64 of the k highest scores per row of (B, N) ``scores``."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, N); got shape {tuple(scores.shape)}")
    if not isinstance(k, int) or not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must be an int in [1, N={scores.shape[1]}]; got {k!r}")
    if resolve_backend(backend, scores) == "triton":
        return _topk_keep_indices_triton(scores, k, backend == "auto")
    return topk_keep_indices_ref(scores, k)


def gather_tokens(x: torch.Tensor, keep_idx: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """The kept rows of the token stream: x (B, N, C), keep_idx (B, k) -> (B, k, C)."""
    if x.dim() != 3 or keep_idx.dim() != 2 or keep_idx.shape[0] != x.shape[0]:
        raise ValueError(f"expected x (B, N, C) and keep_idx (B, k); got {tuple(x.shape)} and {tuple(keep_idx.shape)}")
    # k distinct tokens out of N: from an empty stream (N = 0) the Triton copy read out of bounds (segfault).
    if keep_idx.shape[1] > x.shape[1]:
        raise ValueError(f"keep_idx keeps {keep_idx.shape[1]} tokens of a stream of N={x.shape[1]}")
    check_same_device(x=x, keep_idx=keep_idx)
    if resolve_backend(backend, x, keep_idx) == "triton":
        return _gather_tokens_triton(x, keep_idx, backend == "auto")
    return gather_tokens_ref(x, keep_idx)

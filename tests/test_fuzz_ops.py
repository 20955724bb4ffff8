"""Kernels under fuzzing: every op's Triton path against its PyTorch reference, on inputs hypothesis draws.

What varies. Shapes (batch 1..3, heads 1..4, N from 1 to 300 with the tile edges 31/32/33, 63/64/65, ...,
head dims 16/32/40/64, channels, k from 1 to N); memory layouts of every input and of the poisoned outputs
the launchers accept (permuted storage such as diffusers' (B, N, H, d).transpose(1, 2), slices with a step
and an offset, batch or head dims expanded to stride 0); dtypes fp32 and fp16, plus bf16 on CUDA only (the
interpreter computes garbage in bf16); the softmax scale and the query magnitude (peaky softmaxes); G-WPR
iterations 1..4 with both head reductions, over a given map, building one, or recomputing; every recovery
similarity rule, from a map and recomputed from Q, K and lse; the tile sizes that launchers choose in
Python (top-k, gather, recovery match); CFG mask modes, through top-k and through the whole
``plan_token_pruning`` chain. Also: ``num_kept_tokens`` (k in [1, N], monotone), bad shapes (the op's own
ValueError on both backends, with every launcher rigged to fail), empty dims (that ValueError before any
launch, or the reference's result, never a crash), and the CPU ``backend="torch"`` attention (aten's fused
kernel) against the reference.

How a property fails. Discrete outputs (indices, copies) must be equal. Top-k compares exact fp32 keys and
the map match adds the same fp32 values as the reference, so both must agree even on ties; the recompute
and key-cosine matches round differently from the reference, so they are compared on the rows whose best
kept match beats the runner-up by a safe relative margin (the rest are near ties, counted as an event),
and the whole plan (fp16 map against the reference's fp32) moves the keep count off near ties of the
reference scores. Floating outputs use ``tests/tolerances.py``, scaled to O(1) numbers where the op's
values are ~1/N. Outputs written through ``out=`` start poisoned (NaN, or -1 for indices), must be fully
written, and the storage around a strided output view must stay untouched. Input storage gaps hold NaN, so
a read outside a view shows up as a wrong result. A public op whose kernel multiplies with ``tl.dot`` must
have launched it, except for fp32 on a compiled GPU run, where it must not have (the documented routing to
PyTorch): such a case then checks the routing, not a kernel.

Budget. Every property runs ``ATEDM_FUZZ_EXAMPLES`` examples (default 15), derandomized so CI sees the same
examples on every run; an interpreter cost model (``WORK_CAP``) bounds the shapes so that the file runs in
under a minute on 2 CPU cores. By hand, a larger budget, a fresh stream, or a chosen reproducible one::

    ATEDM_FUZZ_EXAMPLES=500 python -m pytest tests/test_fuzz_ops.py --hypothesis-show-statistics
    ATEDM_FUZZ_SEED=random ATEDM_FUZZ_EXAMPLES=200 python -m pytest tests/test_fuzz_ops.py
    ATEDM_FUZZ_SEED=1234 ATEDM_FUZZ_EXAMPLES=200 python -m pytest tests/test_fuzz_ops.py

(200 examples per property take about 6 minutes here.) A failure prints the shrunk example and a
``@reproduce_failure`` blob. On a GPU run ``TRITON_INTERPRET=0`` so the compiled kernels and bf16 are fuzzed.
"""

from __future__ import annotations

import math
import os
import re
from contextlib import ExitStack, contextmanager, nullcontext
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, event, given, note, seed, settings
from hypothesis import strategies as st
from op_inputs import (
    DEVICE,
    FLOAT_DTYPES,
    MAP_RULES,
    ON_CUDA,
    Layout,
    assert_dot_routing,
    laid_out,
    layouts,
    place,
    poisoned_row_copy,
    poisoned_source,
    poisoned_topk,
    random_keep,
    random_normal,
    random_q_k_lse,
    random_qkv,
    random_row_stochastic,
    spy,
    tie_free_scores,
    tie_safe_keep_count,
    tie_safe_rows,
)
from tolerances import assert_scores_close, map_tol, tol

from atedm_kernels import (
    CFG_MASK_MODES,
    HEAD_REDUCTIONS,
    SIMILARITY_RULES,
    attention_with_lse,
    attention_with_lse_ref,
    gather_tokens,
    gather_tokens_ref,
    gwpr_scores,
    gwpr_scores_ref,
    head_mean_attention_map,
    head_mean_attention_map_ref,
    num_kept_tokens,
    plan_token_pruning,
    recovery_source,
    recovery_source_ref,
    scatter_recover,
    scatter_recover_ref,
    share_cfg_scores,
    topk_keep_indices,
    topk_keep_indices_ref,
)
from atedm_kernels import attention_lse, attention_map, gwpr, recovery, topk_gather
from atedm_kernels.attention_lse import _attention_with_lse_launch
from atedm_kernels.attention_map import _head_mean_attention_map_launch, head_probabilities, map_query_block
from atedm_kernels.gwpr import _map_power_step, _weighted_column_sums

HEAD_DIMS = (16, 32, 40, 64)

# ---------------------------------------------------------------- hypothesis settings

FUZZ_EXAMPLES = int(os.environ.get("ATEDM_FUZZ_EXAMPLES", "15"))
# Unset: derandomized (the same examples every run, for CI). "random": a fresh stream. An integer: that stream.
FUZZ_SEED = os.environ.get("ATEDM_FUZZ_SEED", "")


def fuzz(test):
    """Bounded, deadline-free (the interpreter is slow; on a GPU a first launch compiles), reproducible."""
    test = settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        derandomize=not FUZZ_SEED,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )(test)
    if FUZZ_SEED not in ("", "random"):
        test = seed(int(FUZZ_SEED))(test)
    return test


# ---------------------------------------------------------------- cost model and shapes

# Under the interpreter an attention-like kernel costs about 5 ms per 32 x 32 tile of (query, key) scores
# per head, whatever d. One example may take WORK_CAP tile steps (B * H * query tiles * key tiles * passes,
# ~0.3 s); one pass of a single (image, head) may take MAX_PASS_TILES (N = 300 against N = 300), which bounds
# N when the kernel makes several passes (G-WPR iterations).
TILE = 32
WORK_CAP = 48
MAX_PASS_TILES = 100
EDGE_TOKEN_COUNTS = (1, 2, 3, 31, 32, 33, 63, 64, 65, 96, 127, 128, 129, 255, 256, 257, 300)

seeds = st.integers(0, 2**31 - 1)


def tiles(n: int) -> int:
    return -(-n // TILE)


def max_tokens(passes: int) -> int:
    """Largest N whose square map, walked ``passes`` times, stays within MAX_PASS_TILES tile steps."""
    return min(300, TILE * math.isqrt(MAX_PASS_TILES // max(1, passes)))


def token_counts(max_n: int = 300):
    """N from 1 to max_n, weighted towards small N (cheap) and tile edges (where masks matter)."""
    edges = [n for n in EDGE_TOKEN_COUNTS if n <= max_n]
    return st.one_of(st.integers(1, min(max_n, 48)), st.integers(1, max_n), st.sampled_from(edges))


@st.composite
def qk_shapes(draw, square=True, passes=1, max_n=300, max_batch=3, max_heads=4):
    """(B, H, Nq, Nk, d) with B * H cut so the example stays within WORK_CAP tile steps."""
    max_n = min(max_n, max_tokens(passes))
    n_q = draw(token_counts(max_n))
    n_k = n_q if square else draw(token_counts(max_n))
    budget = max(1, WORK_CAP // (tiles(n_q) * tiles(n_k) * max(1, passes)))
    batch = draw(st.integers(1, max(1, min(max_batch, budget))))
    heads = draw(st.integers(1, max(1, min(max_heads, budget // batch))))
    return batch, heads, n_q, n_k, draw(st.sampled_from(HEAD_DIMS))


scales = st.one_of(st.none(), st.floats(0.05, 0.5))
# The map, G-WPR and recovery kernels exponentiate scale * q.k - lse directly, so any sign must work there.
signed_scales = st.one_of(st.none(), st.floats(0.05, 0.5), st.floats(-0.5, -0.05))
# Query magnitude: 4 makes the softmax peaky (logits up to ~30), where online-softmax rescaling and fp16
# rounding of probabilities near 1 are tested.
sharpness = st.sampled_from((1.0, 1.0, 4.0))

# ---------------------------------------------------------------- tile choices and score tolerance


def tile_sizes(module, name: str, value):
    """Patch a launcher's Python-side tile choice (None: keep the interpreter's own)."""
    return nullcontext() if value is None else mock.patch.object(module, name, lambda *args, **kwargs: value)


# ---------------------------------------------------------------- attention_with_lse


@fuzz
@given(
    shape=qk_shapes(square=False),
    dtype=st.sampled_from(FLOAT_DTYPES),
    scale=scales,
    q_layout=layouts(4, expandable=(0, 1)),
    k_layout=layouts(4, expandable=(0, 1)),
    v_layout=layouts(4, expandable=(0, 1)),
    poisoned=st.booleans(),
    out_layout=layouts(4),
    lse_layout=layouts(3),
    sharp=sharpness,
    seed=seeds,
)
def test_attention_with_lse(
    shape, dtype, scale, q_layout, k_layout, v_layout, poisoned, out_layout, lse_layout, sharp, seed
):
    batch, heads, n_q, n_k, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = random_qkv(batch, heads, n_q, n_k, head_dim, dtype, generator=gen, sharp=sharp,
                         q_layout=q_layout, k_layout=k_layout, v_layout=v_layout)
    ref_out, ref_lse = attention_with_lse_ref(q, k, v, scale)
    if poisoned:
        out = place(torch.full_like(ref_out, float("nan")), out_layout)
        lse = place(torch.full_like(ref_lse, float("nan")), lse_layout)
        _attention_with_lse_launch(q, k, v, head_dim**-0.5 if scale is None else scale, out=out.view, lse=lse.view)
        out.assert_outside_untouched(float("nan"))
        lse.assert_outside_untouched(float("nan"))
        got_out, got_lse = out.view, lse.view
        assert torch.isfinite(got_out).all() and torch.isfinite(got_lse).all(), "kernel left poisoned elements"
    else:
        with spy(attention_lse, "_attention_with_lse_launch") as launches:
            got_out, got_lse = attention_with_lse(q, k, v, scale, backend="triton")
        assert_dot_routing(launches, dtype)
    assert got_out.shape == q.shape and got_out.dtype == dtype and got_lse.dtype == torch.float32
    torch.testing.assert_close(got_out.float(), ref_out.float(), **tol(dtype))
    torch.testing.assert_close(got_lse, ref_lse, **tol(dtype))


@pytest.mark.skipif(ON_CUDA, reason="on CUDA backend='torch' is the reference itself")
@fuzz
@given(
    shape=qk_shapes(square=False, max_batch=3, max_heads=4),
    dtype=st.sampled_from((torch.float32, torch.float16, torch.bfloat16)),
    scale=scales,
    q_layout=layouts(4, expandable=(0, 1)),
    k_layout=layouts(4, expandable=(0, 1)),
    v_layout=layouts(4, expandable=(0, 1)),
    sharp=sharpness,
    seed=seeds,
)
def test_attention_torch_backend_on_cpu(shape, dtype, scale, q_layout, k_layout, v_layout, sharp, seed):
    """backend='torch' on CPU runs aten's fused CPU attention in the inputs' dtype (bf16 included, no
    interpreter involved): it must meet the same tolerances against the fp32 reference as the kernel."""
    batch, heads, n_q, n_k, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = random_qkv(batch, heads, n_q, n_k, head_dim, dtype, generator=gen, sharp=sharp,
                         q_layout=q_layout, k_layout=k_layout, v_layout=v_layout)
    out, lse = attention_with_lse(q, k, v, scale, backend="torch")
    ref_out, ref_lse = attention_with_lse_ref(q, k, v, scale)
    assert out.shape == q.shape and out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out.float(), **tol(dtype))
    torch.testing.assert_close(lse, ref_lse, **tol(dtype))


# ---------------------------------------------------------------- head_mean_attention_map


@fuzz
@given(
    shape=qk_shapes(square=False),
    dtype=st.sampled_from(FLOAT_DTYPES),
    out_dtype=st.sampled_from((torch.float32, torch.float16)),
    scale=signed_scales,
    q_layout=layouts(4, expandable=(0, 1)),
    k_layout=layouts(4, expandable=(0, 1)),
    lse_layout=layouts(3),
    poisoned=st.booleans(),
    out_layout=layouts(3),
    sharp=sharpness,
    seed=seeds,
)
def test_head_mean_attention_map(
    shape, dtype, out_dtype, scale, q_layout, k_layout, lse_layout, poisoned, out_layout, sharp, seed
):
    batch, heads, n_q, n_k, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, lse = random_q_k_lse(batch, heads, n_q, n_k, head_dim, dtype, scale, generator=gen, sharp=sharp,
                               q_layout=q_layout, k_layout=k_layout, lse_layout=lse_layout)
    ref = head_mean_attention_map_ref(q, k, lse, scale, out_dtype)
    if poisoned:
        abar = place(torch.full_like(ref, float("nan")), out_layout)
        scale_value = head_dim**-0.5 if scale is None else scale
        _, partials = _head_mean_attention_map_launch(
            q, k, lse, scale_value, out_dtype, column_sums=True, out=abar.view
        )
        abar.assert_outside_untouched(float("nan"))
        got = abar.view
        assert torch.isfinite(got).all(), "kernel left poisoned elements"
        # The by-product: per query block column sums that add up to Abar's column sums (~Nq / Nk each).
        assert partials.shape == (batch, -(-n_q // map_query_block()), n_k)
        ref_column_sums = head_mean_attention_map_ref(q, k, lse, scale).sum(dim=1)
        torch.testing.assert_close(partials.sum(dim=1) * n_k / n_q, ref_column_sums * n_k / n_q, **tol(dtype))
    else:
        with spy(attention_map, "_head_mean_attention_map_launch") as launches:
            got = head_mean_attention_map(q, k, lse, scale, out_dtype, backend="triton")
        assert_dot_routing(launches, dtype)
    assert got.shape == (batch, n_q, n_k) and got.dtype == out_dtype
    # Map entries are ~1/Nk: compare Nk * Abar under the coarser of the input and the storage tolerance.
    torch.testing.assert_close(got.float() * n_k, ref.float() * n_k, **map_tol(dtype, out_dtype))


# ---------------------------------------------------------------- gwpr_scores


@st.composite
def gwpr_cases(draw, passes_per_iteration: int):
    """(iterations, (B, H, N, N, d)) with N bounded by the passes the walk makes."""
    iterations = draw(st.integers(1, 4))
    return iterations, draw(qk_shapes(square=True, passes=iterations * passes_per_iteration))


@fuzz
@given(
    case=gwpr_cases(passes_per_iteration=0),  # the map walk reads the map and computes no scores
    dtype=st.sampled_from(FLOAT_DTYPES),
    map_kind=st.sampled_from(("attention", "row_stochastic")),
    map_dtype=st.sampled_from(FLOAT_DTYPES),
    map_layout=layouts(3, expandable=(0,)),
    seed=seeds,
)
def test_gwpr_mean_over_a_given_map(case, dtype, map_kind, map_dtype, map_layout, seed):
    iterations, (batch, heads, n, _, head_dim) = case
    gen = torch.Generator().manual_seed(seed)
    q, k, lse = random_q_k_lse(batch, heads, n, n, head_dim, dtype, generator=gen)
    if map_kind == "attention":
        amap = head_mean_attention_map_ref(q, k, lse, out_dtype=map_dtype)
    else:
        amap = random_row_stochastic(batch, n, generator=gen).to(map_dtype)
    amap = laid_out(amap, map_layout)
    got = gwpr_scores(q, k, lse, iterations, "mean", attention_map=amap, backend="triton")
    # Both sides walk the same map in fp32; only the summation order differs.
    assert_scores_close(got, gwpr_scores_ref(q, k, lse, iterations, "mean", attention_map=amap), torch.float32)


@fuzz
@given(
    case=gwpr_cases(passes_per_iteration=1),
    materialize=st.booleans(),
    dtype=st.sampled_from(FLOAT_DTYPES),
    scale=signed_scales,
    q_layout=layouts(4, expandable=(0, 1)),
    k_layout=layouts(4, expandable=(0, 1)),
    lse_layout=layouts(3),
    sharp=sharpness,
    seed=seeds,
)
def test_gwpr_mean_without_a_map(case, materialize, dtype, scale, q_layout, k_layout, lse_layout, sharp, seed):
    """Both sides of ``materialize_attention_map``: build Abar (step 1 from its column sums) or recompute."""
    iterations, (batch, heads, n, _, head_dim) = case
    gen = torch.Generator().manual_seed(seed)
    q, k, lse = random_q_k_lse(batch, heads, n, n, head_dim, dtype, scale, generator=gen, sharp=sharp,
                               q_layout=q_layout, k_layout=k_layout, lse_layout=lse_layout)
    with mock.patch.object(gwpr, "materialize_attention_map", lambda *args, **kwargs: materialize), \
            spy(gwpr, "_gwpr_scores_launch") as launches:
        got = gwpr_scores(q, k, lse, iterations, "mean", scale, backend="triton")
    assert_dot_routing(launches, dtype)
    assert_scores_close(got, gwpr_scores_ref(q, k, lse, iterations, "mean", scale), dtype)


@fuzz
@given(
    case=gwpr_cases(passes_per_iteration=1),
    dtype=st.sampled_from(FLOAT_DTYPES),
    scale=signed_scales,
    q_layout=layouts(4, expandable=(0, 1)),
    k_layout=layouts(4, expandable=(0, 1)),
    lse_layout=layouts(3),
    sharp=sharpness,
    seed=seeds,
)
def test_gwpr_rms(case, dtype, scale, q_layout, k_layout, lse_layout, sharp, seed):
    iterations, (batch, heads, n, _, head_dim) = case
    gen = torch.Generator().manual_seed(seed)
    q, k, lse = random_q_k_lse(batch, heads, n, n, head_dim, dtype, scale, generator=gen, sharp=sharp,
                               q_layout=q_layout, k_layout=k_layout, lse_layout=lse_layout)
    with spy(gwpr, "_gwpr_scores_launch") as launches:
        got = gwpr_scores(q, k, lse, iterations, "rms", scale, backend="triton")
    assert_dot_routing(launches, dtype)
    assert_scores_close(got, gwpr_scores_ref(q, k, lse, iterations, "rms", scale), dtype)


@fuzz
@given(
    shape=qk_shapes(square=True),
    kernel=st.sampled_from(("map_power_step", "weighted_column_sums")),
    dtype=st.sampled_from(FLOAT_DTYPES),
    operand_layouts=st.tuples(
        layouts(4, expandable=(0, 1)), layouts(4, expandable=(0, 1)), layouts(3), layouts(3, expandable=(0,))
    ),
    state_layout=layouts(3, expandable=(0, 1)),
    out_layout=layouts(3),
    seed=seeds,
)
def test_gwpr_step_kernels_write_every_score(shape, kernel, dtype, operand_layouts, state_layout, out_layout, seed):
    """One power step with a random walk state (shared over heads when expanded) into a poisoned output."""
    batch, heads, n, _, head_dim = shape
    q_layout, k_layout, lse_layout, map_layout = operand_layouts
    gen = torch.Generator().manual_seed(seed)
    if kernel == "map_power_step":
        amap = laid_out(random_row_stochastic(batch, n, generator=gen).to(dtype), map_layout)
        state = laid_out(torch.rand(batch, 1, n, generator=gen).to(DEVICE), state_layout)[:, 0]
        expected = torch.einsum("bi,bij->bj", state, amap.float())
        out = place(torch.full((batch, 1, n), float("nan"), device=DEVICE), out_layout)
        _map_power_step(amap, state, out=out.view[:, 0])
        check_dtype = torch.float32  # the same map values summed in another order
    else:
        q, k, lse = random_q_k_lse(batch, heads, n, n, head_dim, dtype, generator=gen,
                                   q_layout=q_layout, k_layout=k_layout, lse_layout=lse_layout)
        state = laid_out(torch.rand(batch, heads, n, generator=gen).to(DEVICE), state_layout)
        expected = torch.einsum("bhi,bhij->bhj", state, head_probabilities(q, k, lse, head_dim**-0.5))
        out = place(torch.full((batch, heads, n), float("nan"), device=DEVICE), out_layout)
        _weighted_column_sums(q, k, lse, state, head_dim**-0.5, out=out.view)
        check_dtype = dtype
    out.assert_outside_untouched(float("nan"))
    got = out.view.reshape(expected.shape)
    assert torch.isfinite(got).all(), "kernel left poisoned elements"
    # Map rows sum to 1, so the outputs average sum(state) / N: scaled by N / sum(state) they are O(1).
    norm = n / state.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    torch.testing.assert_close(got * norm, expected * norm, **tol(check_dtype))


# ---------------------------------------------------------------- topk_keep_indices and the CFG mask modes

# Zeros of both signs (they must tie), NaNs of both signs (above +inf), infinities, subnormals, extremes.
SPECIAL_SCORES = (
    float("nan"), -float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 0.0, -0.0, 1.0, -1.0, 1e-40, -1e-40, 3e38
)


@st.composite
def score_rows(draw, batch: int, n: int, gen: torch.Generator):
    """(B, N) scores: tie-free permutations (exact in fp16 and fp32), heavy ties, gaussians, or special values."""
    kind = draw(st.sampled_from(("permutation", "permutation", "ties", "gaussian", "special", "special")))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    if kind == "permutation":
        scores = tie_free_scores(batch, n, generator=gen) + draw(st.sampled_from((0.0, 100.0, -1000.0)))
        dtype = torch.float32 if scores.abs().max() > 64 else dtype  # keep the shifted rows exact
    elif kind == "ties":
        scores = torch.randint(-2, 3, (batch, n), generator=gen).float()
    elif kind == "gaussian":
        scores = torch.randn(batch, n, generator=gen)
    else:
        pick = torch.randint(0, len(SPECIAL_SCORES), (batch, n), generator=gen)
        scores = torch.tensor(SPECIAL_SCORES)[pick]
        dtype = torch.float32  # 1e-40 and 3e38 are fp32 values
    event(f"top-k scores: {kind}")
    return scores.to(DEVICE, dtype)


@fuzz
@given(
    n=token_counts(),
    batch=st.integers(1, 3),
    data=st.data(),
    scores_layout=layouts(2, expandable=(0, 1)),
    block=st.sampled_from((None, 16, 32, 64, 128)),
    cfg_mode=st.sampled_from(CFG_MASK_MODES),
    poisoned=st.booleans(),
    keep_layout=layouts(2),
    seed=seeds,
)
def test_topk_keep_indices(n, batch, data, scores_layout, block, cfg_mode, poisoned, keep_layout, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = laid_out(data.draw(score_rows(batch, n, gen)), scores_layout)
    k = data.draw(st.integers(1, n), label="k")
    if cfg_mode == "shared_cond" and batch % 2:
        with pytest.raises(ValueError, match="even size"):
            share_cfg_scores(scores, cfg_mode)
    else:
        scores = share_cfg_scores(scores, cfg_mode)
    expected = topk_keep_indices_ref(scores, k)
    # A block below N runs the GPU's multi-step path (counts, tie ranks and slots carried between steps);
    # the interpreter pays ~4 ms per step and image for each of the 33 passes, so at most 8 steps in all.
    block = block if block is not None and batch * -(-n // block) <= 8 else None
    with tile_sizes(topk_gather, "_topk_block", None if block is None else (block, 4)):
        if poisoned:
            keep = poisoned_topk(scores, k, keep_layout)
        else:
            keep = topk_keep_indices(scores, k, backend="triton")
    assert torch.equal(keep, expected)
    if cfg_mode == "shared_cond" and batch % 2 == 0:
        assert torch.equal(keep[: batch // 2], keep[batch // 2 :])


# ---------------------------------------------------------------- gather_tokens and scatter_recover

COPY_DTYPES = FLOAT_DTYPES + (torch.int32, torch.bool)
channel_counts = st.one_of(st.integers(1, 96), st.sampled_from((3, 320, 640, 1280, 2049)))
row_copy_blocks = st.sampled_from((None, (16, 16, 4), (16, 64, 4), (64, 32, 4)))


def affordable_copy_blocks(blocks, batch: int, rows: int, channels: int):
    """The interpreter pays per program: keep patched copy tiles to grids of at most 32 programs."""
    if blocks is None or batch * -(-rows // blocks[0]) * -(-channels // blocks[1]) <= 32:
        return blocks
    return None


def random_rows(gen, shape, dtype) -> torch.Tensor:
    values = torch.randn(shape, generator=gen) * 100
    return (values > 0 if dtype == torch.bool else values.to(dtype)).to(DEVICE)


@fuzz
@given(
    n=token_counts(),
    batch=st.integers(1, 3),
    channels=channel_counts,
    dtype=st.sampled_from(COPY_DTYPES),
    data=st.data(),
    x_layout=layouts(3, expandable=(0,)),
    keep_layout=layouts(2, expandable=(0,)),
    poisoned=st.booleans(),
    out_layout=layouts(3),
    blocks=row_copy_blocks,
    seed=seeds,
)
def test_gather_tokens(n, batch, channels, dtype, data, x_layout, keep_layout, poisoned, out_layout, blocks, seed):
    gen = torch.Generator().manual_seed(seed)
    k = data.draw(st.integers(1, n), label="k")
    x = laid_out(random_rows(gen, (batch, n, channels), dtype), x_layout)
    keep = place(random_keep(batch, n, k, generator=gen), keep_layout, fill=0).view
    expected = gather_tokens_ref(x, keep)
    with tile_sizes(topk_gather, "_row_copy_blocks", affordable_copy_blocks(blocks, batch, k, channels)):
        if poisoned:
            got = poisoned_row_copy(x, keep, out_layout)
        else:
            got = gather_tokens(x, keep, backend="triton")
    assert torch.equal(got, expected)  # a NaN left anywhere fails equality


@fuzz
@given(
    n=token_counts(),
    batch=st.integers(1, 3),
    channels=channel_counts,
    dtype=st.sampled_from(COPY_DTYPES),
    data=st.data(),
    kept_layout=layouts(3, expandable=(0,)),
    src_layout=layouts(2, expandable=(0, 1)),
    poisoned=st.booleans(),
    out_layout=layouts(3),
    blocks=row_copy_blocks,
    seed=seeds,
)
def test_scatter_recover(n, batch, channels, dtype, data, kept_layout, src_layout, poisoned, out_layout, blocks, seed):
    gen = torch.Generator().manual_seed(seed)
    k = data.draw(st.integers(1, n), label="k")
    kept = laid_out(random_rows(gen, (batch, k, channels), dtype), kept_layout)
    src = place(torch.randint(0, k, (batch, n), generator=gen).to(DEVICE), src_layout, fill=0).view
    expected = scatter_recover_ref(kept, src)
    with tile_sizes(topk_gather, "_row_copy_blocks", affordable_copy_blocks(blocks, batch, n, channels)):
        if poisoned:
            got = poisoned_row_copy(kept, src, out_layout)
        else:
            got = scatter_recover(kept, src, backend="triton")
    assert torch.equal(got, expected)


# ---------------------------------------------------------------- recovery_source

def assert_same_source(got: torch.Tensor, expected: torch.Tensor, safe: torch.Tensor, k: int) -> None:
    assert got.shape == expected.shape and got.dtype == torch.int64
    assert ((got >= 0) & (got < k)).all(), "a source slot outside [0, k): unwritten or garbage"
    assert torch.equal(got[safe], expected[safe])
    skipped = int((~safe).sum())
    event("recovery rows: all compared" if skipped == 0 else "recovery rows: some skipped as near ties")
    note(f"near-tie rows skipped: {skipped} of {safe.numel()}")


def match(poisoned: bool, src_layout: Layout, keep, n: int, rule: str, **operands) -> torch.Tensor:
    """The Triton match, through the public op or into a poisoned source buffer laid out as given. The
    poisoned launch always runs the kernel; the public op runs it as the backend routing documents (the
    recompute and key-cosine matches multiply with tl.dot, so fp32 takes the PyTorch path on a GPU)."""
    if poisoned:
        return poisoned_source(keep, n, rule, layout=src_layout, **operands)
    with spy(recovery, "_recovery_source_into") as launches:
        src = recovery_source(keep, n, rule, backend="triton", **operands)
    if operands.get("attention_map") is None:
        assert_dot_routing(launches, operands["keys"].dtype)
    else:
        assert len(launches) == 1  # reading a map needs no tl.dot: the kernel runs for every dtype
    return src


match_blocks = st.sampled_from((None, (16, 16, 4), (16, 64, 4), (32, 16, 4), (64, 32, 4)))


def affordable_match_blocks(blocks, n: int, k: int):
    """Small match tiles make the interpreter slow: keep them to grids of at most 64 tiles."""
    if blocks is None or -(-n // blocks[0]) * -(-k // blocks[1]) <= 64:
        return blocks
    return None


@fuzz
@given(
    n=token_counts(),
    batch=st.integers(1, 3),
    rule=st.sampled_from(MAP_RULES),
    map_kind=st.sampled_from(("attention", "uniform", "ties")),
    map_dtype=st.sampled_from(FLOAT_DTYPES),
    data=st.data(),
    map_layout=layouts(3, expandable=(0,)),
    keep_layout=layouts(2),
    poisoned=st.booleans(),
    src_layout=layouts(2),
    blocks=match_blocks,
    seed=seeds,
)
def test_recovery_source_from_a_map(
    n, batch, rule, map_kind, map_dtype, data, map_layout, keep_layout, poisoned, src_layout, blocks, seed
):
    """The map match adds the same fp32 values as the reference: equal on every row, ties included."""
    gen = torch.Generator().manual_seed(seed)
    k = data.draw(st.integers(1, n), label="k")
    if map_kind == "attention":
        q, k_, lse = random_q_k_lse(batch, 2, n, n, 16, generator=gen)
        amap = head_mean_attention_map_ref(q, k_, lse, out_dtype=map_dtype)
    elif map_kind == "uniform":
        amap = torch.rand(batch, n, n, generator=gen).to(DEVICE, map_dtype)
    else:
        amap = torch.randint(0, 3, (batch, n, n), generator=gen).to(DEVICE, map_dtype)
    amap = laid_out(amap, map_layout)
    keep = place(random_keep(batch, n, k, generator=gen), keep_layout, fill=0).view
    expected = recovery_source_ref(keep, n, rule, attention_map=amap)
    with tile_sizes(recovery, "_match_blocks", affordable_match_blocks(blocks, n, k)):
        got = match(poisoned, src_layout, keep, n, rule, attention_map=amap)
    assert_same_source(got, expected, torch.ones_like(expected, dtype=torch.bool), k)


@st.composite
def match_cases(draw, directions: int):
    """(B, H, N, k, d): N, then k, then B * H within WORK_CAP tile steps of (rows x kept) per direction."""
    n = draw(token_counts())
    k = draw(st.integers(1, n), label="k")
    budget = max(1, WORK_CAP // (tiles(n) * tiles(k) * directions))
    batch = draw(st.integers(1, max(1, min(3, budget))))
    heads = draw(st.integers(1, max(1, min(4, budget // batch))))
    return batch, heads, n, k, draw(st.sampled_from(HEAD_DIMS))


@fuzz
@given(
    rule=st.sampled_from(MAP_RULES),
    data=st.data(),
    dtype=st.sampled_from(FLOAT_DTYPES),
    scale=signed_scales,
    q_layout=layouts(4, expandable=(0, 1)),
    k_layout=layouts(4, expandable=(0, 1)),
    lse_layout=layouts(3),
    keep_layout=layouts(2),
    poisoned=st.booleans(),
    src_layout=layouts(2),
    blocks=match_blocks,
    sharp=sharpness,
    seed=seeds,
)
def test_recovery_source_recomputed(
    rule, data, dtype, scale, q_layout, k_layout, lse_layout, keep_layout, poisoned, src_layout, blocks,
    sharp, seed
):
    """The map-free mode: kept columns of Abar rebuilt from Q, K and lse."""
    batch, heads, n, k, head_dim = data.draw(match_cases(2 if rule == "symmetric" else 1))
    gen = torch.Generator().manual_seed(seed)
    q, keys, lse = random_q_k_lse(batch, heads, n, n, head_dim, dtype, scale, generator=gen, sharp=sharp,
                                  q_layout=q_layout, k_layout=k_layout, lse_layout=lse_layout)
    keep = place(random_keep(batch, n, k, generator=gen), keep_layout, fill=0).view
    operands = dict(queries=q, keys=keys, lse=lse, scale=scale)
    expected = recovery_source_ref(keep, n, rule, **operands)
    safe = tie_safe_rows(keep, n, rule, **operands)
    with tile_sizes(recovery, "_match_blocks", affordable_match_blocks(blocks, n, k)):
        got = match(poisoned, src_layout, keep, n, rule, **operands)
    assert_same_source(got, expected, safe, k)


@fuzz
@given(
    data=st.data(),
    dtype=st.sampled_from(FLOAT_DTYPES),
    keys_layout=layouts(4, expandable=(0, 1)),
    keep_layout=layouts(2),
    poisoned=st.booleans(),
    src_layout=layouts(2),
    blocks=match_blocks,
    seed=seeds,
)
def test_recovery_source_key_cosine(data, dtype, keys_layout, keep_layout, poisoned, src_layout, blocks, seed):
    batch, heads, n, k, head_dim = data.draw(match_cases(1))
    gen = torch.Generator().manual_seed(seed)
    keys = laid_out(random_normal((batch, heads, n, head_dim), dtype, generator=gen), keys_layout)
    keep = place(random_keep(batch, n, k, generator=gen), keep_layout, fill=0).view
    expected = recovery_source_ref(keep, n, "key_cosine", keys=keys)
    safe = tie_safe_rows(keep, n, "key_cosine", keys=keys)
    with tile_sizes(recovery, "_match_blocks", affordable_match_blocks(blocks, n, k)):
        got = match(poisoned, src_layout, keep, n, "key_cosine", keys=keys)
    assert_same_source(got, expected, safe, k)


# ---------------------------------------------------------------- plan_token_pruning: the ops chained


@st.composite
def plan_shapes(draw, cfg_mode: str, iterations: int):
    """(B, H, N, d) for a whole plan: up to K + 2 passes over the map (its build or K recompute steps, and a
    recompute match in both directions), B from the CFG mode, N and then H within the tile budgets."""
    batch = 2 if cfg_mode == "shared_cond" else draw(st.integers(1, 2))
    passes = batch * (iterations + 2)
    n = draw(token_counts(min(128, max_tokens(passes))))
    heads = draw(st.integers(1, max(1, min(4, WORK_CAP // (tiles(n) ** 2 * passes)))))
    return batch, heads, n, draw(st.sampled_from(HEAD_DIMS))


@fuzz
@given(
    cfg_mode=st.sampled_from(CFG_MASK_MODES),
    head_reduction=st.sampled_from(HEAD_REDUCTIONS),
    similarity=st.sampled_from(SIMILARITY_RULES),
    iterations=st.integers(1, 4),
    dtype=st.sampled_from(FLOAT_DTYPES),
    data=st.data(),
    prune_ratio=st.floats(0.0, 0.95),
    layout=layouts(4),
    seed=seeds,
)
def test_plan_token_pruning(cfg_mode, head_reduction, similarity, iterations, dtype, data, prune_ratio, layout, seed):
    """The Triton plan against the PyTorch plan. The Triton plan keeps an fp16 map (the reference an fp32
    one), so the keep count is moved off near ties of the reference scores and recovery rows are compared
    where the best match beats the runner-up by more than fp16's rounding can move them."""
    batch, heads, n, head_dim = data.draw(plan_shapes(cfg_mode, iterations))
    gen = torch.Generator().manual_seed(seed)
    q, k, lse = random_q_k_lse(batch, heads, n, n, head_dim, dtype, generator=gen, q_layout=layout, k_layout=layout)
    ref_scores = share_cfg_scores(gwpr_scores_ref(q, k, lse, iterations, head_reduction), cfg_mode)
    fp16 = tol(torch.float16)  # the Triton plan's map is fp16 whatever the inputs' dtype
    wanted = num_kept_tokens(n, prune_ratio)
    num_keep = tie_safe_keep_count(ref_scores * n, wanted, lambda s: fp16["atol"] + fp16["rtol"] * s.abs())
    event("plan: keep count moved off a near tie" if num_keep != wanted else "plan: keep count as drawn")
    options = dict(iterations=iterations, head_reduction=head_reduction, cfg_mask_mode=cfg_mode, similarity=similarity)
    keep, src = plan_token_pruning(q, k, lse, num_keep, backend="triton", **options)
    ref_keep, ref_src = plan_token_pruning(q, k, lse, num_keep, backend="torch", **options)
    assert torch.equal(keep, ref_keep)
    if cfg_mode == "shared_cond":
        assert torch.equal(keep[: batch // 2], keep[batch // 2 :])
    amap = head_mean_attention_map_ref(q, k, lse) if similarity != "key_cosine" else None
    # fp16 map entries carry a relative error up to 2^-11; 4x that cannot flip a row's argmax.
    safe = tie_safe_rows(ref_keep, n, similarity, 4 * 2.0**-11, attention_map=amap, keys=k)
    assert_same_source(src, ref_src, safe, num_keep)


# ---------------------------------------------------------------- num_kept_tokens

ratios = st.floats(0.0, 1.0, exclude_max=True)


@fuzz
@given(n=st.integers(1, 10**6), n_other=st.integers(1, 10**6), ratio=ratios, ratio_other=ratios)
def test_num_kept_tokens(n, n_other, ratio, ratio_other):
    kept = num_kept_tokens(n, ratio)
    assert isinstance(kept, int) and 1 <= kept <= n
    exact = (1.0 - ratio) * n
    # ceil((1 - rho) N), up to the 1e-9 that absorbs float noise.
    assert kept == 1 or exact - 1e-6 <= kept < exact + 1
    # Monotone: a higher ratio never keeps more tokens, a larger grid never keeps fewer.
    low, high = sorted((ratio, ratio_other))
    assert num_kept_tokens(n, low) >= num_kept_tokens(n, high)
    small, large = sorted((n, n_other))
    assert num_kept_tokens(small, ratio) <= num_kept_tokens(large, ratio)


@fuzz
@given(
    n=st.integers(1, 10**6),
    ratio=st.one_of(st.floats(max_value=-math.ulp(0.0)), st.floats(min_value=1.0), st.just(float("nan"))),
)
def test_num_kept_tokens_rejects_ratios_outside_unit_interval(n, ratio):
    with pytest.raises(ValueError, match="prune_ratio must lie in"):
        num_kept_tokens(n, ratio)


# ---------------------------------------------------------------- validation: bad shapes raise ValueError

# The messages of each op's own checks. A ValueError from elsewhere (a reference unpacking a shape of the
# wrong rank raises one too) matches none of them.
QK_LSE_ERRORS = r"q and k must be \(B, H, N, d\)|lse must be \(B, H, Nq\)|q and k need at least one head"
RECOVERY_OPERAND_ERRORS = {
    "keys": r"rule 'key_cosine' needs keys \(B=",
    "map": r"needs attention_map \(B, N, N\)",
    "recompute": r"recomputing the attention map needs",
}
OP_ERRORS = {
    "attention": r"q, k, v must be \(B, H, N, d\)|incompatible q, k, v shapes|attention needs at least one key",
    "map": QK_LSE_ERRORS,
    "gwpr": QK_LSE_ERRORS + r"|G-WPR needs a square|G-WPR needs at least one token|unknown head_reduction"
                            r"|iterations must be an int|attention_map must be \(B, N, N\)",
    "topk": r"scores must be \(B, N\)|k must be an int in \[1, N=",
    "gather": r"expected x \(B, N, C\) and keep_idx \(B, k\)|keep_idx keeps \d+ tokens of a stream",
    "scatter": r"expected kept \(B, k, C\) and src \(B, N\)|kept holds no rows",
    "recovery": r"keep_idx must be \(B, k\)|" + "|".join(RECOVERY_OPERAND_ERRORS.values()),
}
# Every function that starts a kernel: ours, and on a GPU PyTorch's fused attention providers.
LAUNCHERS = (
    (attention_lse, "_attention_with_lse_launch"),
    (attention_lse, "_attention_with_lse_on_cuda"),
    (attention_map, "_head_mean_attention_map_launch"),
    (gwpr, "_gwpr_scores_launch"),
    (topk_gather, "_topk_keep_indices_into"),
    (topk_gather, "_gather_rows_into"),
    (recovery, "_gather_rows_into"),
    (recovery, "_recovery_source_into"),
)


@contextmanager
def kernel_launches(forbidden: bool):
    """The names of the launchers called while the block runs; where ``forbidden``, a call raises
    AssertionError instead (which no ``pytest.raises(ValueError)`` swallows)."""
    launched = []
    with ExitStack() as patches:
        for module, name in LAUNCHERS:
            def launcher(*args, _real=getattr(module, name), _name=name, **kwargs):
                launched.append(_name)
                if forbidden:
                    raise AssertionError(f"{_name} was called before the op rejected its inputs")
                return _real(*args, **kwargs)

            patches.enter_context(mock.patch.object(module, name, launcher))
        yield launched


@st.composite
def broken_shape(draw, shape: tuple, dims: tuple):
    """``shape`` made invalid: one dim dropped or added, or one of the constrained ``dims`` changed."""
    how = draw(st.sampled_from(("drop", "add", "change") if dims else ("drop", "add")))
    shape = list(shape)
    if how == "drop":
        del shape[draw(st.integers(0, len(shape) - 1))]
    elif how == "add":
        shape.insert(draw(st.integers(0, len(shape))), draw(st.integers(1, 3)))
    else:
        d = draw(st.sampled_from(dims))
        shape[d] = draw(st.integers(0, shape[d] + 3).filter(lambda size, old=shape[d]: size != old))
    return tuple(shape)


def _tensors(shapes: dict) -> dict:
    return {name: torch.rand(shape, device=DEVICE) for name, shape in shapes.items()}


@st.composite
def invalid_calls(draw):
    """(op name, call(backend), the message it must raise) for a call with one operand's shape broken, or a
    bad argument; every op checks before launching."""
    op = draw(st.sampled_from(("attention", "map", "gwpr", "topk", "gather", "recovery", "scatter")))
    b, h, n, n2 = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    d = draw(st.sampled_from((16, 40)))

    def breaking(shapes: dict, constrained: dict):
        name = draw(st.sampled_from(sorted(constrained)))
        return shapes | {name: draw(broken_shape(shapes[name], constrained[name]))}

    if op == "attention":
        shapes = breaking(dict(q=(b, h, n, d), k=(b, h, n2, d), v=(b, h, n2, d)),
                          dict(q=(0, 1, 3), k=(0, 1, 2, 3), v=(0, 1, 2, 3)))
        t = _tensors(shapes)
        return op, lambda backend: attention_with_lse(t["q"], t["k"], t["v"], backend=backend), OP_ERRORS[op]
    if op == "map":
        shapes = breaking(dict(q=(b, h, n, d), k=(b, h, n2, d), lse=(b, h, n)),
                          dict(q=(0, 1, 2, 3), k=(0, 1, 3), lse=(0, 1, 2)))
        t = _tensors(shapes)
        return op, lambda backend: head_mean_attention_map(t["q"], t["k"], t["lse"], backend=backend), OP_ERRORS[op]
    if op == "gwpr":
        reduction = draw(st.sampled_from(HEAD_REDUCTIONS))
        shapes = dict(q=(b, h, n, d), k=(b, h, n, d), lse=(b, h, n), attention_map=(b, n, n))
        constrained = dict(q=(0, 1, 2, 3), k=(0, 1, 2, 3), lse=(0, 1, 2), attention_map=(0, 1, 2))
        iterations, message = 2, OP_ERRORS[op]
        if draw(st.booleans()):
            shapes = breaking(shapes, constrained)
        else:  # a bad argument instead of a bad shape
            bad = draw(st.sampled_from(("iterations", "head_reduction")))
            iterations = draw(st.sampled_from((0, -1, 2.0, None))) if bad == "iterations" else iterations
            reduction = "max" if bad == "head_reduction" else reduction
            message = "iterations must be an int" if bad == "iterations" else "unknown head_reduction"
        t = _tensors(shapes)
        return op, lambda backend: gwpr_scores(t["q"], t["k"], t["lse"], iterations, reduction,
                                                attention_map=t["attention_map"], backend=backend), message
    if op == "topk":
        if draw(st.booleans()):
            scores, k = torch.rand(draw(broken_shape((b, n), ())), device=DEVICE), 1
            message = r"scores must be \(B, N\)"
        else:
            scores, k = torch.rand(b, n, device=DEVICE), draw(st.sampled_from((0, -1, n + 1, 1.0, None)))
            message = r"k must be an int in \[1, N="
        return op, lambda backend: topk_keep_indices(scores, k, backend=backend), message
    if op == "gather":
        if draw(st.booleans()):
            shapes = breaking(dict(x=(b, n, n2), keep_idx=(b, 1)), dict(x=(0,), keep_idx=(0,)))
            message = r"expected x \(B, N, C\) and keep_idx \(B, k\)"
        else:  # more kept rows than the stream has tokens (an empty stream included)
            n = draw(st.integers(0, 3))
            shapes = dict(x=(b, n, n2), keep_idx=(b, n + draw(st.integers(1, 3))))
            message = "keep_idx keeps"
        x = torch.rand(shapes["x"], device=DEVICE)
        keep = torch.zeros(shapes["keep_idx"], dtype=torch.int64, device=DEVICE)
        return op, lambda backend: gather_tokens(x, keep, backend=backend), message
    if op == "scatter":
        if draw(st.booleans()):
            shapes = breaking(dict(kept=(b, 1, n2), src=(b, n)), dict(kept=(0,), src=(0,)))
            message = r"expected kept \(B, k, C\) and src \(B, N\)"
        else:  # no kept rows to refill N >= 1 tokens from
            shapes = dict(kept=(b, 0, n2), src=(b, n))
            message = "kept holds no rows"
        kept = torch.rand(shapes["kept"], device=DEVICE)
        src = torch.zeros(shapes["src"], dtype=torch.int64, device=DEVICE)
        return op, lambda backend: scatter_recover(kept, src, backend=backend), message
    rule = draw(st.sampled_from(SIMILARITY_RULES))
    k = draw(st.integers(1, n))
    mode = "keys" if rule == "key_cosine" else draw(st.sampled_from(("map", "recompute")))
    if mode == "keys":
        shapes, constrained = dict(keys=(b, h, n, d)), dict(keys=(0, 2))
    elif mode == "map":
        shapes, constrained = dict(attention_map=(b, n, n)), dict(attention_map=(0, 1, 2))
    else:
        shapes = dict(queries=(b, h, n, d), keys=(b, h, n, d), lse=(b, h, n))
        constrained = dict(queries=(0, 1, 2, 3), keys=(0, 1, 2, 3), lse=(0, 1, 2))
    keep_shape = (b, k)
    broken = draw(st.sampled_from(("operand", "keep_rank", "keep_batch", "keep_count")))
    # A keep list of another batch passes its own check and then fails the operands' (B, ...) check.
    message = RECOVERY_OPERAND_ERRORS[mode] if broken in ("operand", "keep_batch") else r"keep_idx must be \(B, k\)"
    if broken == "operand":
        shapes = breaking(shapes, constrained)
    elif broken == "keep_rank":
        keep_shape = draw(broken_shape(keep_shape, ()))
    elif broken == "keep_batch":
        keep_shape = (draw(st.integers(0, b + 3).filter(lambda size: size != b)), k)
    else:  # k outside [1, N]
        keep_shape = (b, draw(st.sampled_from((0, n + 1, n + 3))))
    t = _tensors(shapes)
    keep = torch.zeros(keep_shape, dtype=torch.int64, device=DEVICE)
    return op, lambda backend: recovery_source(keep, n, rule, backend=backend, **t), message


@fuzz
@given(case=invalid_calls())
def test_bad_shapes_raise_value_error(case):
    """Every public op rejects a broken shape with its own ValueError on both backends, before any launch (an
    out-of-bounds read under the interpreter or on a GPU would crash the process or return garbage): here a
    launch raises AssertionError."""
    op, call, message = case
    event(f"invalid call: {op}")
    for backend in ("torch", "triton"):
        with kernel_launches(forbidden=True), pytest.raises(ValueError, match=message):
            call(backend)


# ---------------------------------------------------------------- degenerate shapes: a ValueError or the reference

sizes = st.sampled_from((0, 1, 2, 5))


def _valid_indices(shape: tuple, high: int) -> torch.Tensor:
    """Indices in [0, high) of the given shape (zeros when no index is valid: the op must refuse them)."""
    if high == 0:
        return torch.zeros(shape, dtype=torch.int64, device=DEVICE)
    return torch.randint(0, high, shape).to(DEVICE)


@st.composite
def degenerate_calls(draw):
    """(op, call(backend), reference()) with zero-size dims among B, H, N, d, C and k."""
    op = draw(st.sampled_from(("attention", "map", "gwpr", "topk", "gather", "scatter", "recovery")))
    b, h, n, n2, c, k = (draw(sizes) for _ in range(6))
    d = draw(st.sampled_from((0, 16)))
    q, keys = torch.randn(b, h, n, d, device=DEVICE), torch.randn(b, h, n2, d, device=DEVICE)
    lse = torch.randn(b, h, n, device=DEVICE)
    if op == "attention":
        return op, lambda backend: attention_with_lse(q, keys, keys, 0.3, backend=backend), \
            lambda: attention_with_lse_ref(q, keys, keys, 0.3)
    if op == "map":
        return op, lambda backend: head_mean_attention_map(q, keys, lse, 0.3, backend=backend), \
            lambda: head_mean_attention_map_ref(q, keys, lse, 0.3)
    if op == "gwpr":
        reduction, iterations = draw(st.sampled_from(HEAD_REDUCTIONS)), draw(st.integers(1, 2))
        return op, lambda backend: gwpr_scores(q, q, lse, iterations, reduction, 0.3, backend=backend), \
            lambda: gwpr_scores_ref(q, q, lse, iterations, reduction, 0.3)
    if op == "topk":
        scores = torch.randn(b, n, device=DEVICE)
        return op, lambda backend: topk_keep_indices(scores, k, backend=backend), \
            lambda: topk_keep_indices_ref(scores, k)
    if op == "gather":
        x, keep = torch.randn(b, n, c, device=DEVICE), _valid_indices((b, k), n)
        return op, lambda backend: gather_tokens(x, keep, backend=backend), lambda: gather_tokens_ref(x, keep)
    if op == "scatter":
        kept, src = torch.randn(b, k, c, device=DEVICE), _valid_indices((b, n), k)
        return op, lambda backend: scatter_recover(kept, src, backend=backend), lambda: scatter_recover_ref(kept, src)
    rule = draw(st.sampled_from(SIMILARITY_RULES))
    if 1 <= k <= n:
        keep = random_keep(b, n, k, generator=torch.Generator().manual_seed(0))
    else:
        keep = _valid_indices((b, k), n)
    mode = "keys" if rule == "key_cosine" else draw(st.sampled_from(("map", "recompute")))
    operands = {
        "keys": dict(keys=q),
        "map": dict(attention_map=torch.rand(b, n, n, device=DEVICE)),
        "recompute": dict(queries=q, keys=q, lse=lse, scale=0.3),
    }[mode]
    return op, lambda backend: recovery_source(keep, n, rule, backend=backend, **operands), \
        lambda: recovery_source_ref(keep, n, rule, **operands)


@fuzz
@given(case=degenerate_calls())
def test_degenerate_shapes_raise_value_error_or_match_the_reference(case):
    """Empty dims (B, H, N, d, C or k = 0): both backends refuse the call with the op's own ValueError before
    any launch, or both give the reference's result; never another exception, never a crash."""
    op, call, reference = case
    try:
        with kernel_launches(forbidden=False) as launched:
            got = call("triton")
    except ValueError as error:
        event(f"degenerate {op}: ValueError")
        assert re.search(OP_ERRORS[op], str(error)), error
        assert launched == []
        with kernel_launches(forbidden=True), pytest.raises(ValueError, match=OP_ERRORS[op]):
            call("torch")
        return
    event(f"degenerate {op}: computed")
    expected = reference()
    for backend_result in (got, call("torch")):
        for value, want in zip(backend_result if isinstance(got, tuple) else (backend_result,),
                               expected if isinstance(expected, tuple) else (expected,)):
            assert value.shape == want.shape and value.dtype == want.dtype
            torch.testing.assert_close(value, want, equal_nan=True, **tol(torch.float32))

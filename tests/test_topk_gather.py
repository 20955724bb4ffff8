"""Token selection and gather: references against naive formulas, Triton kernels against the references."""

import math
import warnings

import pytest
import torch
from conftest import requires_cuda
from op_inputs import DEVICE, poisoned_row_copy, poisoned_topk, random_keep, random_normal, tie_free_scores

from atedm_kernels import gather_tokens, num_kept_tokens, share_cfg_scores, topk_keep_indices, topk_keep_indices_ref
from atedm_kernels import topk_gather

# (B, N, k): a single token, batch 1, k = 1, k = N - 1, k = N, N not a power of 2, N = 1024 + 17, and
# SDXL level 2 at rho = 0.63.
TOPK_SHAPES = [(1, 1, 1), (2, 7, 3), (1, 64, 1), (3, 100, 99), (2, 300, 300), (2, 1041, 385), (2, 4096, 1516)]


def naive_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """k rounds of 'take the largest remaining score', a strict > so the lower index wins a tie."""
    rows = []
    for row in scores.tolist():
        chosen = set()
        for _ in range(k):
            best = None
            for j, value in enumerate(row):
                if j not in chosen and (best is None or value > row[best]):
                    best = j
            chosen.add(best)
        rows.append(sorted(chosen))
    return torch.tensor(rows, dtype=torch.int64)


# ---------------------------------------------------------------- references against naive formulas


@pytest.mark.parametrize("k", [1, 5, 36, 37])
def test_topk_ref_matches_naive_with_ties(k):
    scores = torch.randint(0, 4, (3, 37)).float()  # four distinct values: ties everywhere
    assert torch.equal(topk_keep_indices_ref(scores, k), naive_topk(scores, k))


def test_topk_ref_matches_naive_on_random_scores():
    scores = torch.randn(2, 50)
    assert torch.equal(topk_keep_indices_ref(scores, 20), naive_topk(scores, 20))


@pytest.mark.parametrize(
    "num_tokens, prune_ratio, expected",
    [
        (4096, 0.63, 1516),  # ceil(1515.52)
        (1024, 0.63, 379),  # ceil(378.88)
        (4096, 0.75, 1024),  # float noise must not add a token
        (10, 0.55, 5),  # ceil(4.5)
        (10, 0.0, 10),
        (4, 0.9, 1),  # ceil(0.4)
        (1, 0.99, 1),  # k >= 1 on a tiny grid
        (3, 0.999, 1),
    ],
)
def test_num_kept_tokens(num_tokens, prune_ratio, expected):
    assert num_kept_tokens(num_tokens, prune_ratio) == expected
    assert expected == max(1, math.ceil(round((1 - prune_ratio) * num_tokens, 9)))


@pytest.mark.parametrize("prune_ratio", [1.0, -0.1, 1.5])
def test_num_kept_tokens_rejects_ratio_outside_unit_interval(prune_ratio):
    with pytest.raises(ValueError, match="prune_ratio must lie in"):
        num_kept_tokens(100, prune_ratio)


def test_share_cfg_scores_copies_the_conditional_half():
    scores = torch.randn(4, 9)
    shared = share_cfg_scores(scores, "shared_cond")
    assert torch.equal(shared[:2], scores[2:]) and torch.equal(shared[2:], scores[2:])
    assert share_cfg_scores(scores, "per_sample") is scores


def test_share_cfg_scores_errors():
    with pytest.raises(ValueError, match="even size"):
        share_cfg_scores(torch.randn(3, 9), "shared_cond")
    with pytest.raises(ValueError, match="unknown cfg_mask_mode"):
        share_cfg_scores(torch.randn(2, 9), "cond")


# ---------------------------------------------------------------- top-k kernel against the reference


@pytest.mark.parametrize("batch, num_tokens, k", TOPK_SHAPES)
def test_topk_kernel_matches_reference(batch, num_tokens, k):
    scores = tie_free_scores(batch, num_tokens)
    expected = topk_keep_indices(scores, k, backend="torch")
    assert torch.equal(poisoned_topk(scores, k), expected)
    assert torch.equal(topk_keep_indices(scores, k, backend="triton"), expected)


@pytest.mark.parametrize("k", [1, 4, 17, 30, 31])
def test_topk_kernel_breaks_ties_like_the_reference(k):
    scores = torch.randint(-2, 3, (2, 31), device=DEVICE).float()  # five values: ties at every threshold
    assert torch.equal(poisoned_topk(scores, k), topk_keep_indices_ref(scores, k))


def test_topk_kernel_orders_special_values_like_torch_sort():
    # A bit-level key gets these wrong without care: -0.0 must tie with +0.0 (lower index first), every
    # NaN ranks above +inf whatever its sign bit, -inf sits at the bottom. Every k crosses another boundary.
    nan, inf = float("nan"), float("inf")
    row = [-0.0, 0.0, -0.0, 1.0, nan, -1.0, -nan, inf, 0.0, -inf, -0.0, 0.0]
    scores = torch.tensor([row, row[::-1]], device=DEVICE)
    for k in range(1, len(row) + 1):
        assert torch.equal(poisoned_topk(scores, k), topk_keep_indices_ref(scores, k)), k


@pytest.mark.parametrize("k", [1, 200, 700, 1040])
def test_topk_kernel_across_many_steps(monkeypatch, k):
    # The interpreter takes a whole row per step; a 64-key step exercises the GPU's multi-step path
    # (counts, tie ranks and output slots carried from step to step), with ties spanning steps.
    monkeypatch.setattr(topk_gather, "_topk_block", lambda num_tokens: (64, 4))
    scores = torch.randint(0, 6, (2, 1041), device=DEVICE).float()
    assert torch.equal(poisoned_topk(scores, k), topk_keep_indices_ref(scores, k))


def test_topk_kernel_on_strided_half_scores():
    scores = tie_free_scores(90, 3).t()  # (3, 90) with a row stride of 1
    assert not scores.is_contiguous()
    expected = topk_keep_indices_ref(scores, 33)
    assert torch.equal(topk_keep_indices(scores, 33, backend="triton"), expected)
    halves = tie_free_scores(2, 200).half()
    assert torch.equal(topk_keep_indices(halves, 50, backend="triton"), topk_keep_indices_ref(halves.float(), 50))


def test_topk_validation_errors():
    scores = torch.randn(2, 10)
    with pytest.raises(ValueError, match=r"scores must be \(B, N\)"):
        topk_keep_indices(scores[0], 3)
    for bad_k in (0, 11, 2.0):
        with pytest.raises(ValueError, match="k must be an int"):
            topk_keep_indices(scores, bad_k)


# ---------------------------------------------------------------- gather kernel against the reference

# (B, N, k, C): channels not a multiple of the block, N = 1024 + 17, batch 1, k = 1, k = N, SDXL widths.
GATHER_SHAPES = [(1, 1041, 385, 80), (2, 64, 1, 640), (2, 33, 33, 3), (2, 300, 111, 1280)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch, num_tokens, k, channels", GATHER_SHAPES)
def test_gather_kernel_matches_reference(batch, num_tokens, k, channels, dtype):
    x = random_normal((batch, num_tokens, channels), dtype)
    keep = random_keep(batch, num_tokens, k)
    expected = gather_tokens(x, keep, backend="torch")
    assert torch.equal(poisoned_row_copy(x, keep), expected)  # NaN left anywhere fails equality
    assert torch.equal(gather_tokens(x, keep, backend="triton"), expected)


def test_gather_kernel_on_strided_input():
    wide = torch.randn(2, 70, 96, device=DEVICE)
    x = wide[:, :, 16:80]  # a channel window: row stride 96, not 64
    keep = random_keep(2, 70, 20)
    assert torch.equal(gather_tokens(x, keep, backend="triton"), gather_tokens(x, keep, backend="torch"))


def test_gather_validation_errors():
    x, keep = torch.randn(2, 10, 4), torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"expected x \(B, N, C\)"):
        gather_tokens(x[0], keep)
    with pytest.raises(ValueError, match=r"expected x \(B, N, C\)"):
        gather_tokens(x, keep[:1])


def test_gather_rejects_more_kept_rows_than_tokens():
    """Found by fuzzing: gathering from an empty stream (N = 0) read out of bounds and killed the process."""
    keep = torch.zeros(2, 3, dtype=torch.int64, device=DEVICE)
    for x in (torch.randn(2, 0, 4, device=DEVICE), torch.randn(2, 2, 4, device=DEVICE)):
        for backend in ("torch", "triton"):
            with pytest.raises(ValueError, match="keeps 3 tokens of a stream of N="):
                gather_tokens(x, keep, backend=backend)


def test_gather_kernel_with_zero_channels():
    """Found by fuzzing: C = 0 made a zero-wide channel block, a ZeroDivisionError in the launch grid."""
    x, keep = torch.randn(2, 10, 0, device=DEVICE), random_keep(2, 10, 4)
    assert gather_tokens(x, keep, backend="triton").shape == (2, 4, 0)


@requires_cuda
def test_gather_kernel_bf16_on_cuda():
    x = torch.randn(2, 4096, 640, device="cuda", dtype=torch.bfloat16)
    scores = tie_free_scores(2, 4096)
    keep = topk_keep_indices(scores, 1516, backend="triton")
    assert torch.equal(keep, topk_keep_indices_ref(scores, 1516))
    assert torch.equal(gather_tokens(x, keep, backend="triton"), gather_tokens(x, keep, backend="torch"))


# ---------------------------------------------------------------- opaque to torch.compile


def test_fake_impls_give_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        scores = torch.empty(3, 50)
        x = torch.empty(3, 50, 8, dtype=torch.float16)
        keep = torch.ops.atedm.topk_keep_indices(scores, 20)
        kept = torch.ops.atedm.gather_tokens(x, keep)
    assert keep.shape == (3, 20) and keep.dtype == torch.int64
    assert kept.shape == (3, 20, 8) and kept.dtype == torch.float16


def test_no_graph_breaks_around_the_kernels():
    def select_and_gather(scores, x):
        keep = topk_keep_indices(scores, 9, backend="triton")
        return gather_tokens(x * 2, keep, backend="triton") + 1

    scores, x = tie_free_scores(2, 40), torch.randn(2, 40, 16, device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's note about tracing through an lru_cache
        explanation = torch._dynamo.explain(select_and_gather)(scores, x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert torch.equal(select_and_gather(scores, x), gather_tokens(x * 2, topk_keep_indices_ref(scores, 9)) + 1)

"""The per-block chain: the map-free path at large N equals the map path, CFG sharing, Triton vs torch."""

import pytest
import torch
from conftest import requires_cuda
from op_inputs import (
    DOT_KERNEL_DTYPE,
    NEAR_TIE_MARGIN,
    random_q_k_lse,
    random_qkv,
    row_lse,
    spy,
    tie_safe_keep_count,
    tie_safe_rows,
)
from tolerances import tol

import atedm_kernels.prune_plan as prune_plan
from atedm_kernels import (
    SIMILARITY_RULES,
    attention_with_map,
    gwpr_scores_ref,
    head_mean_attention_map_ref,
    one_pass_map_applies,
    plan_token_pruning,
)
from atedm_kernels import gwpr, recovery


def off_near_ties(q, k, lse, wanted: int, iterations: int) -> int:
    """The keep count nearest ``wanted`` whose top-k boundary is no near tie of the reference G-WPR scores,
    so that plans computing those scores with another rounding must keep the same tokens."""
    n = q.shape[2]
    return tie_safe_keep_count(gwpr_scores_ref(q, k, lse, iterations) * n, wanted, lambda s: NEAR_TIE_MARGIN * s.abs())


def similarity_operands(similarity: str, q, k, lse) -> dict:
    """What ``tie_safe_rows`` reads for a rule: the fp32 map for the map rules, the keys for key cosine."""
    return dict(keys=k) if similarity == "key_cosine" else dict(attention_map=head_mean_attention_map_ref(q, k, lse))


@pytest.mark.parametrize("similarity", SIMILARITY_RULES)
def test_recompute_path_matches_the_map_path(monkeypatch, similarity):
    """The map-free kernels (G-WPR's recompute steps, the recompute or key-cosine match) against the PyTorch
    plan over a materialized fp32 map: the same kept tokens (the count is moved off near ties of the scores)
    and the same sources on every row whose best match is no near tie."""
    n, iterations = 96, 2
    q, k, lse = random_q_k_lse(2, 2, n, n, 16, DOT_KERNEL_DTYPE)  # fp32 would skip the kernels on a GPU
    num_keep = off_near_ties(q, k, lse, 30, iterations)
    options = dict(iterations=iterations, similarity=similarity)
    # Each path forced, and proven taken: at these shapes the heuristic alone would pick the same one twice.
    monkeypatch.setattr(prune_plan, "materialize_attention_map", lambda *args: True)
    with spy(prune_plan, "head_mean_attention_map") as maps_built:
        with_map = plan_token_pruning(q, k, lse, num_keep, backend="torch", **options)
    assert len(maps_built) == 1
    monkeypatch.setattr(prune_plan, "materialize_attention_map", lambda *args: False)
    monkeypatch.setattr(gwpr, "materialize_attention_map", lambda *args, **kwargs: False)
    with spy(prune_plan, "head_mean_attention_map") as maps_built, \
            spy(gwpr, "_head_mean_attention_map_launch") as maps_launched, \
            spy(gwpr, "_weighted_column_sums") as recompute_steps, \
            spy(recovery, "_recovery_source_into") as matches:
        without_map = plan_token_pruning(q, k, lse, num_keep, backend="triton", **options)
    assert maps_built == [] and maps_launched == []
    assert len(recompute_steps) == iterations
    assert len(matches) == 1
    match_args = matches[0][0]  # (src, keep, N, rule, attention_map, keys, queries, lse, scale)
    assert match_args[3] == similarity and match_args[4] is None
    assert match_args[6] is (None if similarity == "key_cosine" else q)  # the attention rules recompute from Q
    assert torch.equal(without_map[0], with_map[0])
    safe = tie_safe_rows(with_map[0], n, similarity, **similarity_operands(similarity, q, k, lse))
    assert torch.equal(without_map[1][safe], with_map[1][safe])


def test_shared_cond_mask_is_the_conditional_half_for_both():
    q, k, lse = random_q_k_lse(4, 2, 96, 96, 16, device="cpu")
    keep, src = plan_token_pruning(q, k, lse, 20, cfg_mask_mode="shared_cond", backend="torch")
    own, _ = plan_token_pruning(q, k, lse, 20, backend="torch")
    assert torch.equal(keep[:2], keep[2:]) and torch.equal(keep[2:], own[2:])
    assert not torch.equal(keep[:2], own[:2])
    assert ((src >= 0) & (src < 20)).all()


@pytest.mark.parametrize("head_reduction", ["mean", "rms"])
def test_triton_chain_matches_torch_chain(head_reduction):
    q, k, lse = random_q_k_lse(1, 2, 80, 80, 16)  # on DEVICE: compiled, backend="triton" refuses CPU tensors
    expected = plan_token_pruning(q, k, lse, 25, head_reduction=head_reduction, backend="torch")
    got = plan_token_pruning(q, k, lse, 25, head_reduction=head_reduction, backend="triton")
    assert torch.equal(got[0], expected[0])
    assert (got[1] == expected[1]).float().mean() > 0.99  # fp16 map vs fp32: rare argmax near-ties


SDXL_SHAPES = {"level2_1024px": (2, 10, 4096, 64), "level3_1024px": (2, 20, 1024, 64)}


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", sorted(SDXL_SHAPES))
def test_triton_chain_at_real_sdxl_shapes(shape, dtype):
    """The whole chain on CUDA at SDXL's 1024 px shapes. The Triton map is fp16 and the reference's
    fp32, so a near-tie may swap a token at the top-k boundary: nearly all must agree."""
    from atedm_kernels import attention_with_lse

    batch, heads, n, head_dim = SDXL_SHAPES[shape]
    q, k, v = (torch.randn(batch, heads, n, head_dim, device="cuda", dtype=dtype) for _ in range(3))
    out, lse = attention_with_lse(q, k, v, backend="triton")
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out.float(), sdpa.float(), **tol(dtype))
    num_keep = round(0.37 * n)
    keep, src = plan_token_pruning(q, k, lse, num_keep, backend="triton")
    ref_keep, ref_src = plan_token_pruning(q, k, lse, num_keep, backend="torch")
    same_keep = torch.zeros(batch, n, dtype=torch.bool, device="cuda")
    same_keep.scatter_(1, keep, True)
    ref_mask = torch.zeros_like(same_keep).scatter_(1, ref_keep, True)
    assert (same_keep == ref_mask).float().mean() > 0.99
    assert (keep.diff(dim=1) > 0).all()
    agree = keep.eq(ref_keep).all(dim=1)  # src slots are comparable where the kept lists are equal
    if agree.any():
        assert (src[agree] == ref_src[agree]).float().mean() > 0.99


# --- the one-pass CPU route: Abar from attention_with_map, no lse --------------------------------


@pytest.mark.parametrize("similarity", SIMILARITY_RULES)
@pytest.mark.parametrize("ranking", ["gwpr", "random"])
def test_plan_from_a_prebuilt_map_needs_no_lse(similarity, ranking):
    """The plan from the one-pass map without lse against the two-pass plan from the same Q and K with lse,
    which builds (or recomputes) its own map: the same kept tokens at fp32 precision (the count moved off
    near ties of the scores), the same sources on every row whose best match is no near tie."""
    n, iterations = 72, 2
    q, k, v = random_qkv(2, 3, n, n, 16, device="cpu")
    _, attention_map = attention_with_map(q, k, v)
    lse = row_lse(q, k)
    num_keep = off_near_ties(q, k, lse, 25, iterations) if ranking == "gwpr" else 25
    switches = dict(iterations=iterations, similarity=similarity, ranking=ranking, backend="torch")
    torch.manual_seed(7)
    one_pass = plan_token_pruning(q, k, None, num_keep, attention_map=attention_map, **switches)
    torch.manual_seed(7)  # the random ranking draws the same scores in both calls
    two_pass = plan_token_pruning(q, k, lse, num_keep, **switches)
    assert torch.equal(one_pass[0], two_pass[0])
    safe = tie_safe_rows(two_pass[0], n, similarity, **similarity_operands(similarity, q, k, lse))
    assert torch.equal(one_pass[1][safe], two_pass[1][safe])


def test_plan_without_lse_refuses_what_needs_it():
    q, k, v = random_qkv(1, 2, 20, 20, 8, device="cpu")
    _, attention_map = attention_with_map(q, k, v)
    with pytest.raises(ValueError, match="needs lse"):
        plan_token_pruning(q, k, None, 5, backend="torch")
    with pytest.raises(ValueError, match="needs lse"):
        plan_token_pruning(q, k, None, 5, attention_map=attention_map, head_reduction="rms", backend="torch")
    with pytest.raises(ValueError, match=r"\(B, N, N\)"):
        plan_token_pruning(q, k, None, 5, attention_map=attention_map[:, :4], backend="torch")


def test_one_pass_route_is_taken_exactly_where_only_the_map_is_read(monkeypatch):
    q = torch.randn(2, 10, 256, 8)
    assert one_pass_map_applies(q)
    assert one_pass_map_applies(q, ranking="random", similarity="symmetric")
    assert not one_pass_map_applies(q, head_reduction="rms")  # per-head maps need lse
    assert not one_pass_map_applies(q, ranking="random", similarity="key_cosine")  # reads no map
    assert not one_pass_map_applies(q.to("meta"))  # the FLOPs counter keeps the published two-pass cost
    monkeypatch.setattr(prune_plan, "materialize_attention_map", lambda *args: False)
    assert not one_pass_map_applies(q)  # a map over budget is never built

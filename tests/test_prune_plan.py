"""The per-block chain: the map-free path at large N equals the map path, CFG sharing, Triton vs torch."""

import pytest
import torch
from conftest import requires_cuda
from op_inputs import random_q_k_lse, random_qkv, row_lse
from tolerances import tol

import atedm_kernels.prune_plan as prune_plan
from atedm_kernels import attention_with_map, one_pass_map_applies, plan_token_pruning


@pytest.mark.parametrize("similarity", ["attention", "attention_transposed", "symmetric", "key_cosine"])
def test_recompute_path_matches_the_map_path(monkeypatch, similarity):
    q, k, lse = random_q_k_lse(2, 2, 96, 96, 16, device="cpu")
    maps_built = []
    build_map = prune_plan.head_mean_attention_map
    monkeypatch.setattr(prune_plan, "head_mean_attention_map",
                        lambda *args, **kwargs: maps_built.append(1) or build_map(*args, **kwargs))
    # Each path forced, and proven taken: at these shapes the heuristic alone would pick the same one twice.
    monkeypatch.setattr(prune_plan, "materialize_attention_map", lambda *args: True)
    with_map = plan_token_pruning(q, k, lse, 30, iterations=2, similarity=similarity, backend="torch")
    assert maps_built == [1]
    monkeypatch.setattr(prune_plan, "materialize_attention_map", lambda *args: False)
    without_map = plan_token_pruning(q, k, lse, 30, iterations=2, similarity=similarity, backend="torch")
    assert maps_built == [1]
    assert torch.equal(with_map[0], without_map[0])
    assert (with_map[1] == without_map[1]).float().mean() > 0.99  # argmax near-ties may flip in fp32


def test_shared_cond_mask_is_the_conditional_half_for_both():
    q, k, lse = random_q_k_lse(4, 2, 96, 96, 16, device="cpu")
    keep, src = plan_token_pruning(q, k, lse, 20, cfg_mask_mode="shared_cond", backend="torch")
    own, _ = plan_token_pruning(q, k, lse, 20, backend="torch")
    assert torch.equal(keep[:2], keep[2:]) and torch.equal(keep[2:], own[2:])
    assert not torch.equal(keep[:2], own[:2])
    assert ((src >= 0) & (src < 20)).all()


@pytest.mark.parametrize("head_reduction", ["mean", "rms"])
def test_triton_chain_matches_torch_chain(head_reduction):
    q, k, lse = random_q_k_lse(1, 2, 80, 80, 16, device="cpu")
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


@pytest.mark.parametrize("similarity", ["attention", "attention_transposed", "symmetric", "key_cosine"])
@pytest.mark.parametrize("ranking", ["gwpr", "random"])
def test_plan_from_a_prebuilt_map_needs_no_lse(similarity, ranking):
    q, k, v = random_qkv(2, 3, 72, 72, 16, device="cpu")
    _, attention_map = attention_with_map(q, k, v)
    lse = row_lse(q, k)
    switches = dict(iterations=2, similarity=similarity, ranking=ranking, backend="torch")
    torch.manual_seed(7)
    got = plan_token_pruning(q, k, None, 25, attention_map=attention_map, **switches)
    torch.manual_seed(7)  # the random ranking draws the same scores in both calls
    expected = plan_token_pruning(q, k, lse, 25, attention_map=attention_map, **switches)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    # and the one-pass map ranks like the two-pass fp32 map: same kept set at fp32 precision.
    if ranking == "gwpr":
        two_pass = plan_token_pruning(q, k, lse, 25, **switches)
        assert torch.equal(got[0], two_pass[0])


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

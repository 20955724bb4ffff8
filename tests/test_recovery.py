"""Recovery match and refill: references against naive loops, Triton kernels against the references."""

import warnings

import pytest
import torch
from conftest import requires_cuda
from op_inputs import (
    DEVICE,
    DOT_KERNEL_DTYPE,
    MAP_RULES,
    poisoned_row_copy,
    poisoned_source,
    random_keep,
    random_normal,
    random_permutations,
    random_q_k_lse,
    spy,
    tie_safe_rows,
)

from atedm_kernels import (
    head_mean_attention_map_ref,
    recovery_source,
    recovery_source_ref,
    scatter_recover,
    topk_keep_indices_ref,
)
from atedm_kernels import recovery

# (B, N, k): N = 1024 + 17, batch 1, k = 1, k = N - 1, k = N.
MATCH_SHAPES = [(1, 1041, 385), (2, 100, 1), (2, 100, 99), (2, 70, 70)]


def distinct_map(batch: int, num_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """A map whose values cannot tie: one permutation per image in fp32 (exact up to 2^24 entries); in
    fp16 one permutation per row scaled by 1/N, distinct within a row (spacing above fp16's 2^-11)."""
    if dtype == torch.float32:
        perms = random_permutations(batch, num_tokens * num_tokens)
        return (perms.float() / num_tokens**2).reshape(batch, num_tokens, num_tokens).to(DEVICE)
    rows = random_permutations(batch * num_tokens, num_tokens)
    return (rows.float() / num_tokens).reshape(batch, num_tokens, num_tokens).to(DEVICE, dtype)


def assert_tie_free(keep, num_tokens, rule, **operands):
    """Guard for inputs that kernels compute with another rounding: every row's best kept match must beat
    the runner-up by a safe margin, or the comparison would test rounding, not the kernel."""
    assert tie_safe_rows(keep, num_tokens, rule, **operands).all(), "test input has a near tie; pick other shapes"


def naive_source(keep: torch.Tensor, num_tokens: int, similarity) -> torch.Tensor:
    """Python loops: kept tokens map to their rank, the others to the first kept rank of maximal similarity."""
    out = torch.empty(keep.shape[0], num_tokens, dtype=torch.int64)
    for b, kept in enumerate(keep.tolist()):
        for i in range(num_tokens):
            if i in kept:
                out[b, i] = kept.index(i)
                continue
            best = 0
            for r, j in enumerate(kept):
                if similarity(b, i, j) > similarity(b, i, kept[best]):
                    best = r
            out[b, i] = best
    return out


# ---------------------------------------------------------------- references against naive loops


@pytest.mark.parametrize("rule", MAP_RULES)
def test_reference_matches_naive_loops_with_ties(rule):
    amap = torch.randint(0, 3, (2, 13, 13)).float()  # three values: ties in almost every row
    keep = topk_keep_indices_ref(torch.randn(2, 13), 5)
    forms = {
        "attention": lambda b, i, j: amap[b, i, j].item(),
        "attention_transposed": lambda b, i, j: amap[b, j, i].item(),
        "symmetric": lambda b, i, j: amap[b, i, j].item() + amap[b, j, i].item(),
    }
    expected = naive_source(keep, 13, forms[rule])
    assert torch.equal(recovery_source_ref(keep, 13, rule, attention_map=amap), expected)


def test_reference_key_cosine_matches_naive_loops():
    keys = torch.randn(2, 3, 15, 4, dtype=torch.float64)
    keep = topk_keep_indices_ref(torch.randn(2, 15), 6)
    flat = keys.transpose(1, 2).flatten(2)  # a token's keys concatenated over heads

    def cosine(b, i, j):
        return (flat[b, i] @ flat[b, j] / (flat[b, i].norm() * flat[b, j].norm())).item()

    assert torch.equal(recovery_source_ref(keep, 15, "key_cosine", keys=keys), naive_source(keep, 15, cosine))


@pytest.mark.parametrize("rule", MAP_RULES)
def test_reference_recompute_matches_dense_formula(rule):
    q, k, lse = random_q_k_lse(2, 3, 20, 20, 8, torch.float64, scale=0.3)
    # Abar[b, i, j] = mean_h exp(scale q_hi.k_hj - lse_hi), written out densely in float64.
    dense = torch.exp(0.3 * torch.einsum("bhid,bhjd->bhij", q, k) - lse[..., None].double()).mean(1)
    keep = topk_keep_indices_ref(torch.randn(2, 20), 7)
    assert_tie_free(keep, 20, rule, attention_map=dense)
    recomputed = recovery_source_ref(keep, 20, rule, keys=k, queries=q, lse=lse, scale=0.3)
    assert torch.equal(recomputed, recovery_source_ref(keep, 20, rule, attention_map=dense))


def test_scatter_reference_matches_naive_loops():
    kept, src = torch.randn(2, 4, 3), torch.randint(0, 4, (2, 9))
    expected = torch.stack([torch.stack([kept[b, src[b, i]] for i in range(9)]) for b in range(2)])
    assert torch.equal(scatter_recover(kept, src, backend="torch"), expected)


# ---------------------------------------------------------------- match kernels against the reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rule", MAP_RULES)
@pytest.mark.parametrize("batch, num_tokens, k", MATCH_SHAPES)
def test_map_kernel_matches_reference(batch, num_tokens, k, rule, dtype):
    amap = distinct_map(batch, num_tokens, dtype)
    keep = random_keep(batch, num_tokens, k)
    expected = recovery_source(keep, num_tokens, rule, attention_map=amap, backend="torch")
    assert torch.equal(poisoned_source(keep, num_tokens, rule, attention_map=amap), expected)
    assert torch.equal(recovery_source(keep, num_tokens, rule, attention_map=amap, backend="triton"), expected)


@pytest.mark.parametrize("rule", MAP_RULES)
def test_map_kernel_breaks_ties_like_the_reference(rule):
    # The kernel adds the same fp32 values as the reference, so even ties must resolve identically.
    amap = torch.randint(0, 3, (2, 90, 90), device=DEVICE).half()
    keep = random_keep(2, 90, 40)
    assert torch.equal(poisoned_source(keep, 90, rule, attention_map=amap), recovery_source_ref(keep, 90, rule, amap))


def test_map_kernel_on_a_strided_map():
    amap = distinct_map(2, 80, torch.float32).transpose(1, 2)  # column-major view
    keep = random_keep(2, 80, 30)
    for rule in MAP_RULES:
        expected = recovery_source_ref(keep, 80, rule, attention_map=amap)
        assert torch.equal(recovery_source(keep, 80, rule, attention_map=amap, backend="triton"), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch, num_tokens, k, heads, head_dim", [(2, 150, 57, 2, 16), (1, 77, 1, 3, 24), (1, 64, 63, 1, 64)])
def test_key_cosine_kernel_matches_reference(batch, num_tokens, k, heads, head_dim, dtype):
    keys = random_normal((batch, heads, num_tokens, head_dim), dtype)
    keep = random_keep(batch, num_tokens, k)
    assert_tie_free(keep, num_tokens, "key_cosine", keys=keys)
    expected = recovery_source(keep, num_tokens, "key_cosine", keys=keys, backend="torch")
    assert torch.equal(poisoned_source(keep, num_tokens, "key_cosine", keys=keys), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rule", MAP_RULES)
def test_recompute_kernel_matches_reference(rule, dtype):
    q, k, lse = random_q_k_lse(2, 2, 130, 130, 16, dtype)
    keep = random_keep(2, 130, 49)
    recompute = dict(queries=q, keys=k, lse=lse)
    assert_tie_free(keep, 130, rule, **recompute)
    expected = recovery_source(keep, 130, rule, backend="torch", **recompute)
    assert torch.equal(poisoned_source(keep, 130, rule, **recompute), expected)


@pytest.mark.parametrize("rule", MAP_RULES)
def test_recompute_mode_agrees_with_map_mode(rule):
    scale = 0.2
    q, k, lse = random_q_k_lse(1, 3, 97, 97, 24, DOT_KERNEL_DTYPE, scale=scale)  # fp32 skips the kernel on a GPU
    amap = head_mean_attention_map_ref(q, k, lse, scale)
    keep = random_keep(1, 97, 30)
    assert_tie_free(keep, 97, rule, attention_map=amap)
    from_map = recovery_source(keep, 97, rule, attention_map=amap, backend="torch")
    recompute = dict(keys=k, queries=q, lse=lse, scale=scale)
    assert torch.equal(recovery_source(keep, 97, rule, backend="torch", **recompute), from_map)
    with spy(recovery, "_recovery_source_into") as launches:
        from_kernel = recovery_source(keep, 97, rule, backend="triton", **recompute)
    assert len(launches) == 1 and launches[0][0][6] is q  # the recompute kernel ran, on these queries
    assert torch.equal(from_kernel, from_map)


def test_match_kernels_at_sdxl_level3_width():
    # The real level-3 layout, 20 heads of 64, on a shortened grid to keep the interpreter fast.
    q, k, lse = random_q_k_lse(2, 20, 64, 64, 64, torch.float16)
    keep = random_keep(2, 64, 24)
    for rule, operands in (("attention", dict(queries=q, keys=k, lse=lse)), ("key_cosine", dict(keys=k))):
        assert_tie_free(keep, 64, rule, **operands)
        expected = recovery_source(keep, 64, rule, backend="torch", **operands)
        assert torch.equal(recovery_source(keep, 64, rule, backend="triton", **operands), expected)


def test_match_kernels_with_small_tiles(monkeypatch):
    # The interpreter's wide tiles hold all kept columns of these shapes at once; 16 x 16 tiles exercise
    # the running argmax across kept tiles (first maximum wins across a tile boundary) and many row blocks.
    monkeypatch.setattr(recovery, "_match_blocks", lambda reads_map: (16, 16, 4))
    keep = random_keep(2, 90, 40)
    tied_map = torch.randint(0, 3, (2, 90, 90), device=DEVICE).half()
    for rule in MAP_RULES:
        assert torch.equal(poisoned_source(keep, 90, rule, attention_map=tied_map), recovery_source_ref(keep, 90, rule, tied_map))
    q, k, lse = random_q_k_lse(2, 2, 90, 90, 16)
    for rule, operands in (("symmetric", dict(queries=q, keys=k, lse=lse)), ("key_cosine", dict(keys=k))):
        assert_tie_free(keep, 90, rule, **operands)
        assert torch.equal(poisoned_source(keep, 90, rule, **operands), recovery_source_ref(keep, 90, rule, **operands))


# ---------------------------------------------------------------- refill kernel against the reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch, num_tokens, k, channels", [(1, 1041, 385, 80), (2, 64, 1, 640), (2, 50, 50, 3)])
def test_scatter_kernel_matches_reference(batch, num_tokens, k, channels, dtype):
    kept = random_normal((batch, k, channels), dtype)
    src = torch.randint(0, k, (batch, num_tokens), device=DEVICE)
    expected = scatter_recover(kept, src, backend="torch")
    assert torch.equal(poisoned_row_copy(kept, src), expected)  # NaN left anywhere fails equality
    assert torch.equal(scatter_recover(kept, src, backend="triton"), expected)


@requires_cuda
def test_kernels_bf16_on_cuda():
    q, k, lse = random_q_k_lse(2, 10, 4096, 4096, 64, torch.bfloat16)
    amap = head_mean_attention_map_ref(q, k, lse, out_dtype=torch.bfloat16)
    keep = random_keep(2, 4096, 1516)
    for rule in MAP_RULES:
        expected = recovery_source(keep, 4096, rule, attention_map=amap, backend="torch")
        assert torch.equal(recovery_source(keep, 4096, rule, attention_map=amap, backend="triton"), expected)
    kept = torch.randn(2, 1516, 640, device="cuda", dtype=torch.bfloat16)
    src = recovery_source(keep, 4096, "attention", attention_map=amap, backend="triton")
    assert torch.equal(scatter_recover(kept, src, backend="triton"), scatter_recover(kept, src, backend="torch"))


# ---------------------------------------------------------------- validation


def test_validation_errors():
    keep = torch.tensor([[0, 3]])
    amap, keys = torch.rand(1, 5, 5), torch.randn(1, 2, 5, 4)
    q, lse = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5)
    cases = [
        (dict(rule="cosine", attention_map=amap), "unknown similarity rule"),
        (dict(keep_idx=keep[0], attention_map=amap), r"keep_idx must be \(B, k\)"),
        (dict(keep_idx=torch.zeros(1, 6, dtype=torch.int64), attention_map=amap), "1 <= k <= N=5"),
        (dict(rule="key_cosine"), "needs keys"),
        (dict(attention_map=amap[:, :4]), r"needs attention_map \(B, N, N\)"),
        (dict(), "or queries, keys and lse to recompute it"),
        (dict(queries=q, keys=keys), "missing lse"),
        (dict(queries=q, lse=lse), "missing keys"),
        (dict(queries=q, keys=keys, lse=lse[:, :1]), "recomputing the attention map needs"),
        (dict(queries=q.half(), keys=keys, lse=lse), "of one dtype"),
    ]
    for overrides, message in cases:
        args = dict(keep_idx=keep, num_tokens=5, rule="attention") | overrides
        with pytest.raises(ValueError, match=message):
            recovery_source(**args)
    with pytest.raises(ValueError, match=r"expected kept \(B, k, C\)"):
        scatter_recover(torch.randn(1, 2, 3), torch.zeros(2, 5, dtype=torch.int64))


def test_scatter_rejects_an_empty_kept_list():
    """Found by fuzzing: refilling N > 0 tokens from k = 0 kept rows read out of bounds (segfault)."""
    kept, src = torch.randn(2, 0, 8, device=DEVICE), torch.zeros(2, 5, dtype=torch.int64, device=DEVICE)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="kept holds no rows"):
            scatter_recover(kept, src, backend=backend)


def test_scatter_kernel_with_zero_channels():
    """Found by fuzzing: C = 0 made a zero-wide channel block, a ZeroDivisionError in the launch grid."""
    kept, src = torch.randn(2, 3, 0, device=DEVICE), torch.randint(0, 3, (2, 9), device=DEVICE)
    assert scatter_recover(kept, src, backend="triton").shape == (2, 9, 0)


def test_recompute_rejects_zero_head_dim():
    """Found by fuzzing: d = 0 divided by zero in the default scale 1 / sqrt(d) on both backends."""
    keep, lse = torch.tensor([[0, 3]], device=DEVICE), torch.zeros(1, 2, 5, device=DEVICE)
    q = torch.randn(1, 2, 5, 0, device=DEVICE)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="recomputing the attention map needs"):
            recovery_source(keep, 5, "attention", queries=q, keys=q, lse=lse, backend=backend)


# ---------------------------------------------------------------- opaque to torch.compile


def test_fake_impls_give_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        keep = torch.empty(2, 7, dtype=torch.int64)
        src = torch.ops.atedm.recovery_source(keep, 30, "attention", torch.empty(2, 30, 30), None)
        src_qk = torch.ops.atedm.recovery_source(
            keep, 30, "symmetric", None, torch.empty(2, 3, 30, 8), torch.empty(2, 3, 30, 8), torch.empty(2, 3, 30), 0.5
        )
        full = torch.ops.atedm.scatter_recover(torch.empty(2, 7, 5, dtype=torch.float16), src)
    assert src.shape == src_qk.shape == (2, 30) and src.dtype == src_qk.dtype == torch.int64
    assert full.shape == (2, 30, 5) and full.dtype == torch.float16


def test_no_graph_breaks_around_the_kernels():
    q, k, lse = random_q_k_lse(2, 2, 48, 48, 16)
    amap = distinct_map(2, 48, torch.float32)
    keep = random_keep(2, 48, 17)

    def recover(keep, amap, q, k, lse, kept):
        src = recovery_source(keep, 48, "attention", attention_map=amap, backend="triton")
        src_qk = recovery_source(keep, 48, "symmetric", keys=k, queries=q, lse=lse, backend="triton")
        src_cos = recovery_source(keep, 48, "key_cosine", keys=k, backend="triton")
        return scatter_recover(kept * 2, src, backend="triton"), src_qk + src_cos

    kept = torch.randn(2, 17, 8, device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's note about tracing through an lru_cache
        explanation = torch._dynamo.explain(recover)(keep, amap, q, k, lse, kept)
    assert explanation.graph_break_count == 0, explanation.break_reasons

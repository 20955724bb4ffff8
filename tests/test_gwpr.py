"""G-WPR scores: the reference against explicit power iterations and the eigenvector they converge to,
the Triton kernels against the reference.

Scores are a distribution over N tokens (about 1/N each), so comparisons scale them by N and the dtype
tolerances apply to O(1) numbers. On a GPU run ``TRITON_INTERPRET=0``.
"""

import pytest
import torch
from conftest import assert_one_graph
from op_inputs import DEVICE, DTYPES, assert_dot_routing, random_q_k_lse, random_row_stochastic, spy
from tolerances import assert_scores_close, tol

from atedm_kernels import (
    gwpr_power_iteration_ref,
    gwpr_scores,
    gwpr_scores_ref,
    head_mean_attention_map_ref,
)
from atedm_kernels import gwpr
from atedm_kernels.gwpr import _map_power_step, _weighted_column_sums, materialize_attention_map

def _dense_walk(amap, iterations):
    """The definition, one token at a time: s_{t+1}[j] = sum_i A[i, j] s_t[i]."""
    n = amap.shape[-1]
    scores = [1.0 / n] * n
    for _ in range(iterations):
        scores = [sum(float(amap[i, j]) * scores[i] for i in range(n)) for j in range(n)]
    return torch.tensor(scores, dtype=torch.float64)


def test_reference_power_iteration_matches_the_definition():
    amap = random_row_stochastic(2, 9)
    scores = gwpr_power_iteration_ref(amap, 3)
    for b in range(2):
        torch.testing.assert_close(scores[b].double().cpu(), _dense_walk(amap[b].cpu(), 3), **tol(torch.float32))
    torch.testing.assert_close(scores.sum(dim=-1), torch.ones(2, device=DEVICE), **tol(torch.float32))


def test_many_iterations_converge_to_the_principal_left_eigenvector():
    amap = random_row_stochastic(1, 12)[0].double().cpu()
    eigenvalues, eigenvectors = torch.linalg.eig(amap.T)
    principal = eigenvectors[:, eigenvalues.real.argmax()].real
    principal = principal / principal.sum()
    torch.testing.assert_close(gwpr_power_iteration_ref(amap.float(), 200).double(), principal, atol=1e-6, rtol=1e-5)


def test_reference_rms_matches_a_per_head_loop():
    q, k, lse = random_q_k_lse(2, 3, 17, 17, 16)
    scores = gwpr_scores_ref(q, k, lse, 3, "rms")
    per_head = []
    for h in range(3):
        probs = torch.softmax(torch.matmul(q[:, h].double(), k[:, h].double().transpose(-1, -2)) * 16**-0.5, dim=-1)
        walk = torch.full((2, 17), 1.0 / 17, dtype=torch.float64, device=DEVICE)
        for _ in range(3):
            walk = torch.einsum("bi,bij->bj", walk, probs)
        per_head.append(walk)
    expected = torch.stack(per_head).square().mean(dim=0).sqrt()
    torch.testing.assert_close(scores.double() * 17, expected * 17, **tol(torch.float32))


@pytest.mark.parametrize(
    "map_dtype, batch, n, iterations",
    [
        (torch.float32, 1, 1, 1),
        (torch.float16, 2, 50, 1),
        (torch.float32, 2, 77, 4),
        (torch.float16, 2, 77, 4),
        (torch.float16, 1, 1024 + 17, 2),  # many ragged row and column blocks
    ],
)
def test_power_step_kernel_over_a_given_map(map_dtype, batch, n, iterations):
    amap = random_row_stochastic(batch, n).to(map_dtype)
    scores = torch.full((batch, n), 1.0 / n, device=DEVICE)
    for _ in range(iterations):
        out = torch.full_like(scores, float("nan"))
        scores = _map_power_step(amap, scores, out=out)
        assert torch.isfinite(out).all(), "kernel left poisoned elements unwritten"
    torch.testing.assert_close(scores * n, gwpr_power_iteration_ref(amap, iterations) * n, **tol(torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared_state", [True, False])
def test_weighted_column_sums_kernel(dtype, shared_state):
    batch, heads, n, head_dim = 2, 3, 45, 16
    q, k, lse = random_q_k_lse(batch, heads, n, n, head_dim, dtype)
    state = torch.rand(batch, 1 if shared_state else heads, n, device=DEVICE).expand(batch, heads, n)
    out = torch.full((batch, heads, n), float("nan"), device=DEVICE)
    _weighted_column_sums(q, k, lse, state, head_dim**-0.5, out=out)
    assert torch.isfinite(out).all(), "kernel left poisoned elements unwritten"
    probs = torch.exp(torch.matmul(q.float(), k.float().transpose(-1, -2)) * head_dim**-0.5 - lse.unsqueeze(-1))
    torch.testing.assert_close(out, torch.einsum("bhi,bhij->bhj", state, probs), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, heads, n, head_dim, iterations", [(1, 2, 33, 16, 1), (2, 3, 70, 32, 3)])
def test_triton_mean_over_a_given_map(dtype, batch, heads, n, head_dim, iterations):
    q, k, lse = random_q_k_lse(batch, heads, n, n, head_dim, dtype)
    amap = head_mean_attention_map_ref(q, k, lse, out_dtype=torch.float16)
    scores = gwpr_scores(q, k, lse, iterations, "mean", attention_map=amap, backend="triton")
    assert_scores_close(scores, gwpr_scores_ref(q, k, lse, iterations, "mean", attention_map=amap), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("materialize", [True, False])
@pytest.mark.parametrize("batch, heads, n, head_dim, iterations", [(1, 2, 33, 16, 1), (2, 3, 70, 40, 3)])
def test_triton_mean_without_a_map(monkeypatch, dtype, materialize, batch, heads, n, head_dim, iterations):
    """Both sides of ``materialize_attention_map``: build Abar once (step 1 from its column sums) or run one
    recompute step per iteration, each proven taken (fp32 on a GPU takes the PyTorch path instead)."""
    monkeypatch.setattr(gwpr, "materialize_attention_map", lambda *args, **kwargs: materialize)
    q, k, lse = random_q_k_lse(batch, heads, n, n, head_dim, dtype, scale=0.15)
    kernel = "_head_mean_attention_map_launch" if materialize else "_weighted_column_sums"
    with spy(gwpr, kernel) as launches:
        scores = gwpr_scores(q, k, lse, iterations, "mean", scale=0.15, backend="triton")
    assert_dot_routing(launches, dtype, 1 if materialize else iterations)
    ref = gwpr_scores_ref(q, k, lse, iterations, "mean", scale=0.15)
    assert_scores_close(scores, ref, dtype)
    torch.testing.assert_close(scores.sum(dim=-1), torch.ones(batch, device=DEVICE), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch, heads, n, head_dim, iterations", [(1, 1, 1, 16, 2), (1, 2, 33, 16, 1), (2, 3, 70, 32, 3)]
)
def test_triton_rms(dtype, batch, heads, n, head_dim, iterations):
    q, k, lse = random_q_k_lse(batch, heads, n, n, head_dim, dtype)
    with spy(gwpr, "_weighted_column_sums") as launches:
        scores = gwpr_scores(q, k, lse, iterations, "rms", backend="triton")
    assert_dot_routing(launches, dtype, iterations)  # one step per iteration, or fp32's PyTorch path on a GPU
    assert_scores_close(scores, gwpr_scores_ref(q, k, lse, iterations, "rms"), dtype)


def test_materialize_heuristic_at_sdxl_shapes():
    assert materialize_attention_map(2, 10, 4096, 3)  # 1024 px level 2: 67 MB
    assert materialize_attention_map(2, 20, 1024, 2)  # level 3
    assert materialize_attention_map(8, 10, 4096, 3)  # four CFG images at 1024 px: 268 MB
    assert not materialize_attention_map(2, 10, 4096, 1)  # one step: recomputing needs no map at all
    assert not materialize_attention_map(2, 10, 16384, 3)  # 2048 px level 2: 1 GiB
    assert not materialize_attention_map(2, 2, 4096, 2)  # few heads: two exp passes beat two map passes


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(iterations=0), "iterations must be"),
        (dict(iterations=2.0), "iterations must be"),
        (dict(iterations=1, head_reduction="max"), "unknown head_reduction"),
        (dict(iterations=1, attention_map=torch.zeros(1, 8, 9)), "attention_map must be"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    q, k, lse = random_q_k_lse(1, 2, 8, 8, 16)
    if "attention_map" in kwargs:
        kwargs["attention_map"] = kwargs["attention_map"].to(DEVICE)
    with pytest.raises(ValueError, match=match):
        gwpr_scores(q, k, lse, backend="triton", **kwargs)


def test_non_square_map_raises():
    q, k, lse = random_q_k_lse(1, 2, 8, 9, 16)
    with pytest.raises(ValueError, match="square"):
        gwpr_scores(q, k, lse, 1, backend="triton")


@pytest.mark.parametrize("head_reduction", ["mean", "rms"])
def test_zero_tokens_raise(head_reduction):
    """Found by fuzzing: N = 0 divided by zero in the uniform start 1 / N on both backends."""
    q, lse = torch.randn(1, 2, 0, 16, device=DEVICE), torch.zeros(1, 2, 0, device=DEVICE)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="at least one token"):
            gwpr_scores(q, q, lse, 2, head_reduction, backend=backend)


def test_custom_op_keeps_a_compiled_caller_in_one_graph():
    def rank(q, k, lse):
        return gwpr_scores(q, k, lse, 2, "mean", backend="triton") + gwpr_scores(q, k, lse, 2, "rms", backend="triton")

    q, k, lse = random_q_k_lse(1, 2, 20, 20, 16)
    assert_one_graph(rank, q, k, lse)


def test_fake_impl_gives_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = k = torch.empty(2, 3, 10, 16, dtype=torch.float16)
        lse = torch.empty(2, 3, 10)
        scores = torch.ops.atedm.gwpr_scores(q, k, lse, 3, "rms", 0.25, None)
    assert scores.shape == (2, 10) and scores.dtype == torch.float32

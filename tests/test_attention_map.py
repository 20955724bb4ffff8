"""head_mean_attention_map: the reference against per-head softmax, the Triton kernel against the reference.

Map entries are probabilities of size about 1/Nk, so comparisons scale them by Nk: the dtype tolerances
then apply to O(1) numbers, as they do for the other ops. On a GPU run ``TRITON_INTERPRET=0``.
"""

import pytest
import torch
from conftest import assert_one_graph
from op_inputs import DEVICE, DTYPES, assert_dot_routing, random_normal, random_q_k_lse, row_lse, spy
from tolerances import map_tol, tol

from atedm_kernels import attention_with_lse_ref, attention_with_map, head_mean_attention_map, head_mean_attention_map_ref
from atedm_kernels import attention_map as attention_map_module
from atedm_kernels.attention_map import _head_mean_attention_map_launch, map_query_block

def test_reference_is_the_head_mean_of_softmax():
    q, k, lse = random_q_k_lse(2, 3, 21, 34, 16, scale=0.4)
    abar = head_mean_attention_map_ref(q, k, lse, scale=0.4)
    per_head = torch.softmax(torch.matmul(q.double(), k.double().transpose(-1, -2)) * 0.4, dim=-1)
    torch.testing.assert_close(abar.double(), per_head.mean(dim=1), **tol(torch.float32))
    torch.testing.assert_close(abar.sum(dim=-1), torch.ones(2, 21, device=DEVICE), **tol(torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "batch, heads, n_q, n_k, head_dim",
    [
        (1, 1, 1, 1, 16),
        (2, 3, 50, 70, 64),  # ragged tiles on both axes, Nq != Nk
        (1, 2, 64, 96, 32),  # whole tiles only
        (2, 2, 33, 45, 40),  # padded head dim
    ],
)
def test_triton_matches_reference(dtype, out_dtype, batch, heads, n_q, n_k, head_dim):
    q, k, lse = random_q_k_lse(batch, heads, n_q, n_k, head_dim, dtype)
    abar = torch.full((batch, n_q, n_k), float("nan"), dtype=out_dtype, device=DEVICE)
    _, partials = _head_mean_attention_map_launch(q, k, lse, head_dim**-0.5, out_dtype, column_sums=True, out=abar)
    assert torch.isfinite(abar).all(), "kernel left poisoned elements unwritten"
    ref = head_mean_attention_map_ref(q, k, lse, out_dtype=out_dtype)
    torch.testing.assert_close(abar.float() * n_k, ref.float() * n_k, **map_tol(dtype, out_dtype))

    # The by-product: one row of column sums per query block, summing to Abar's column sums.
    assert partials.shape == (batch, -(-n_q // map_query_block()), n_k)
    ref_column_sums = head_mean_attention_map_ref(q, k, lse).sum(dim=1)
    torch.testing.assert_close(partials.sum(dim=1) * n_k / n_q, ref_column_sums * n_k / n_q, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_triton_path_with_diffusers_layout_and_scale(dtype):
    batch, n, heads, head_dim = 2, 41, 3, 16
    q, k = (random_normal((batch, n, heads, head_dim), dtype).transpose(1, 2) for _ in range(2))
    lse = row_lse(q, k, scale=0.3)
    with spy(attention_map_module, "_head_mean_attention_map_launch") as launches:
        abar = head_mean_attention_map(q, k, lse, scale=0.3, out_dtype=torch.float16, backend="triton")
    assert_dot_routing(launches, dtype)  # the kernel, or fp32's PyTorch path on a GPU
    ref = head_mean_attention_map_ref(q, k, lse, scale=0.3, out_dtype=torch.float16)
    assert abar.shape == (batch, n, n) and abar.dtype == torch.float16
    torch.testing.assert_close(abar.float() * n, ref.float() * n, **map_tol(dtype, torch.float16))


def test_bad_shapes_raise():
    q, k, lse = random_q_k_lse(1, 2, 8, 8, 16)
    with pytest.raises(ValueError, match="lse must be"):
        head_mean_attention_map(q, k, lse[:, :1], backend="triton")
    with pytest.raises(ValueError, match="q and k must be"):
        head_mean_attention_map(q, k[..., :8], lse, backend="triton")
    with pytest.raises(ValueError, match="q and k must be"):
        head_mean_attention_map(q[0], k[0], lse[0], backend="triton")


@pytest.mark.parametrize("heads, head_dim", [(0, 16), (2, 0)])
def test_zero_heads_or_zero_head_dim_raise(heads, head_dim):
    """Found by fuzzing: H = 0 divided by zero in the Triton launcher (the reference gave NaN), d = 0 in
    the default scale on both backends."""
    q = torch.randn(1, heads, 8, head_dim, device=DEVICE)
    lse = torch.zeros(1, heads, 8, device=DEVICE)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="at least one head and a head dim"):
            head_mean_attention_map(q, q, lse, backend=backend)


def test_custom_op_keeps_a_compiled_caller_in_one_graph():
    def most_attended(q, k, lse):
        return head_mean_attention_map(q, k, lse, out_dtype=torch.float16, backend="triton").float().sum(dim=1)

    q, k, lse = random_q_k_lse(1, 2, 20, 20, 16)
    assert_one_graph(most_attended, q, k, lse)


def test_fake_impl_gives_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 3, 10, 16, dtype=torch.bfloat16)
        k = torch.empty(2, 3, 12, 16, dtype=torch.bfloat16)
        lse = torch.empty(2, 3, 10)
        abar = torch.ops.atedm.head_mean_attention_map(q, k, lse, 0.25, torch.float16)
    assert abar.shape == (2, 10, 12) and abar.dtype == torch.float16


# --- attention_with_map: attention and Abar from one pass (the CPU path of a pruning layer) ---------

ONE_PASS_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", ONE_PASS_DTYPES)
@pytest.mark.parametrize("chunk_bytes", [1, 3000, 1 << 30])  # one row per chunk, ragged chunks, one chunk
@pytest.mark.parametrize("batch, heads, n_q, n_k, head_dim", [(1, 1, 1, 1, 8), (2, 3, 37, 53, 16), (2, 5, 64, 64, 40)])
def test_attention_with_map_matches_two_pass_reference(monkeypatch, dtype, chunk_bytes, batch, heads, n_q, n_k, head_dim):
    monkeypatch.setattr(attention_map_module, "_ONE_PASS_CHUNK_BYTES", chunk_bytes)
    # Strided views, as the processor passes them: (B, N, H, d) storage seen as (B, H, N, d).
    q = random_normal((batch, n_q, heads, head_dim), dtype).transpose(1, 2)
    k, v = (random_normal((batch, n_k, heads, head_dim), dtype).transpose(1, 2) for _ in range(2))
    scale = 0.3
    out, abar = attention_with_map(q, k, v, scale)
    ref_out, ref_lse = attention_with_lse_ref(q, k, v, scale)
    ref_map = head_mean_attention_map_ref(q, k, ref_lse, scale)
    assert out.dtype == dtype and abar.dtype == torch.float32 and abar.shape == (batch, n_q, n_k)
    torch.testing.assert_close(out.float(), ref_out.float(), **tol(dtype))
    torch.testing.assert_close(abar * n_k, ref_map * n_k, **tol(dtype))


def test_attention_with_map_rejects_bad_operands():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="dtype"):
        attention_with_map(q, q.double(), q.double())
    with pytest.raises(ValueError, match=r"\(B, H, N, d\)"):
        attention_with_map(q, q[:, :1], q[:, :1])
    with pytest.raises(ValueError, match="one device"):
        attention_with_map(q, q.to("meta"), q)
    with pytest.raises(ValueError, match="at least one head"):
        attention_with_map(q[:, :0], q[:, :0], q[:, :0])

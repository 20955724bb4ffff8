"""attention_with_lse: the reference against the softmax formula, the Triton kernel against the reference.

On the CPU the kernel runs under the Triton interpreter (conftest sets TRITON_INTERPRET=1); on a GPU run
``TRITON_INTERPRET=0 python -m pytest`` so the compiled kernel (and bf16) is what gets tested.
"""

import pytest
import torch
from conftest import assert_one_graph
from op_inputs import DEVICE, DIFFUSERS_LAYOUT, DTYPES, laid_out, random_normal, random_qkv
from tolerances import tol

from atedm_kernels import attention_with_lse, attention_with_lse_ref
from atedm_kernels.attention_lse import _attention_with_lse_launch


def test_reference_matches_softmax_formula():
    q, k, v = random_qkv(2, 3, 37, 29, 16)
    scale = 0.3
    out, lse = attention_with_lse_ref(q, k, v, scale)
    scores = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
    expected = torch.matmul(torch.softmax(scores, dim=-1), v.double())
    torch.testing.assert_close(out.double(), expected, **tol(torch.float32))
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, dim=-1), **tol(torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch, heads, n_q, n_k, head_dim",
    [
        (1, 1, 1, 1, 16),  # a single token: one ragged tile on both axes
        (2, 2, 50, 70, 64),  # Nq != Nk, neither a multiple of the block
        (1, 3, 96, 96, 32),  # whole tiles only: the unmasked key loop alone
        (2, 1, 33, 45, 40),  # SD 1.5's head dim, padded to 64 lanes
        (1, 1, 40, 64, 128),
    ],
)
def test_triton_matches_reference(dtype, batch, heads, n_q, n_k, head_dim):
    q, k, v = random_qkv(batch, heads, n_q, n_k, head_dim, dtype)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((batch, heads, n_q), float("nan"), device=DEVICE)
    _attention_with_lse_launch(q, k, v, head_dim**-0.5, out=out, lse=lse)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all(), "kernel left poisoned elements unwritten"
    ref_out, ref_lse = attention_with_lse_ref(q, k, v)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out.float(), **tol(dtype))
    torch.testing.assert_close(lse, ref_lse, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_triton_path_with_diffusers_layout_and_scale(dtype):
    """diffusers hands over (B, N, H, d) views transposed to (B, H, N, d): non-contiguous strides."""
    batch, n, heads, head_dim = 2, 45, 2, 32
    q, k, v = (random_normal((batch, n, heads, head_dim), dtype).transpose(1, 2) for _ in range(3))
    out, lse = attention_with_lse(q, k, v, scale=0.2, backend="triton")
    ref_out, ref_lse = attention_with_lse_ref(q, k, v, scale=0.2)
    torch.testing.assert_close(out.float(), ref_out.float(), **tol(dtype))
    torch.testing.assert_close(lse, ref_lse, **tol(dtype))


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((2, 8, 16), (2, 8, 16), (2, 8, 16)), "must be"),
        (((1, 2, 8, 16), (1, 3, 8, 16), (1, 3, 8, 16)), "incompatible"),
        (((1, 2, 8, 16), (1, 2, 8, 32), (1, 2, 8, 32)), "incompatible"),
        (((1, 2, 8, 16), (1, 2, 9, 16), (1, 2, 8, 16)), "incompatible"),
    ],
)
def test_bad_shapes_raise(shapes, match):
    q, k, v = (torch.randn(shape) for shape in shapes)
    with pytest.raises(ValueError, match=match):
        attention_with_lse(q, k, v, backend="triton")


def test_mixed_dtypes_raise():
    q, k, v = random_qkv(1, 1, 8, 8, 16)
    with pytest.raises(ValueError, match="share a dtype"):
        attention_with_lse(q.half(), k, v, backend="triton")


@pytest.mark.parametrize("n_k, head_dim", [(0, 16), (8, 0)])
def test_no_keys_or_zero_head_dim_raise(n_k, head_dim):
    """Found by fuzzing: with no keys the kernel gave NaN, the reference 0 and the CPU flash path SIGFPE;
    d = 0 divided by zero in the default scale on both backends."""
    q, k, v = random_qkv(1, 2, 5, n_k, head_dim)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="at least one key and a head dim"):
            attention_with_lse(q, k, v, backend=backend)


@pytest.mark.parametrize("heads, n_q", [(0, 5), (2, 0)])
def test_empty_heads_or_queries_give_empty_results(heads, n_q):
    """Found by fuzzing: aten's CPU flash kernel (backend='torch' on CPU) died with SIGFPE on these."""
    q, k, v = random_qkv(1, heads, n_q, 7, 16)
    for backend in ("torch", "triton"):
        out, lse = attention_with_lse(q, k, v, backend=backend)
        assert out.shape == q.shape and lse.shape == q.shape[:3]


@pytest.mark.parametrize("scale", [0.0, -0.125])
def test_triton_path_rejects_a_non_positive_scale(scale):
    q, k, v = random_qkv(1, 1, 8, 8, 16)
    with pytest.raises(ValueError, match="positive softmax scale"):
        attention_with_lse(q, k, v, scale=scale, backend="triton")


def test_custom_op_keeps_a_compiled_caller_in_one_graph():
    def attend(q, k, v):
        out, lse = attention_with_lse(q, k, v, backend="triton")
        return out * 2, lse + 1

    q, k, v = random_qkv(1, 2, 20, 20, 16)
    assert_one_graph(attend, q, k, v)


def test_fake_impl_gives_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 3, 10, 16, dtype=torch.float16)
        k = v = torch.empty(2, 3, 12, 16, dtype=torch.float16)
        out, lse = torch.ops.atedm.attention_with_lse(q, k, v, 0.25)
    assert out.shape == (2, 3, 10, 16) and out.dtype == torch.float16
    assert lse.shape == (2, 3, 10) and lse.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_on_cpu_matches_the_reference(dtype):
    """backend='torch' on CPU tensors runs PyTorch's fused CPU attention; it must agree with the spec."""
    q, k, v = (laid_out(torch.randn(2, 3, 77, 32).to(dtype), DIFFUSERS_LAYOUT) for _ in range(3))
    out, lse = attention_with_lse(q, k, v, scale=0.2, backend="torch")
    ref_out, ref_lse = attention_with_lse_ref(q, k, v, scale=0.2)
    torch.testing.assert_close(out.float(), ref_out.float(), **tol(dtype))
    torch.testing.assert_close(lse, ref_lse, **tol(torch.float32))


def test_torch_backend_on_cpu_with_a_strided_head_dim():
    """Found by fuzzing: aten's fused CPU attention assumes a unit stride along d, so q, k, v sliced with a
    step along d, or stored d-major, gave wrong outputs and lse."""
    q = torch.randn(2, 3, 21, 64)[..., ::2]
    k = torch.randn(2, 32, 21, 3).permute(0, 3, 2, 1)
    v = torch.randn(2, 3, 32, 21).transpose(2, 3)
    assert q.stride(-1) != 1 and k.stride(-1) != 1 and v.stride(-1) != 1
    out, lse = attention_with_lse(q, k, v, backend="torch")
    ref_out, ref_lse = attention_with_lse_ref(q, k, v)
    torch.testing.assert_close(out, ref_out, **tol(torch.float32))
    torch.testing.assert_close(lse, ref_lse, **tol(torch.float32))

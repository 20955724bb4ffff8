"""The one tolerance table for comparing a kernel (or a fused path) with its fp32 reference, keyed by the
dtype of the inputs. It lives in ``atedm_kernels.selfcheck``, where ``python -m atedm doctor`` applies the
same table on a user's machine. Beside it, the two comparisons that scale or combine its entries.
"""

import torch

from atedm_kernels.selfcheck import TOLERANCES


# Beside the kernels' table: float64, for whole patched models checked in double precision (gradients
# against finite differences, checkpointed against plain backward); no kernel runs in it.
_FLOAT64 = dict(atol=1e-9, rtol=1e-7)


def tol(dtype: torch.dtype) -> dict:
    return _FLOAT64 if dtype == torch.float64 else TOLERANCES[dtype]


def map_tol(dtype: torch.dtype, out_dtype: torch.dtype) -> dict:
    """For an attention map stored as ``out_dtype`` from inputs of ``dtype``: the coarser of the two
    entries (fp16 storage alone flips last bits, 1e-3 relative)."""
    return max(tol(dtype), tol(out_dtype), key=lambda t: t["atol"])


def assert_scores_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """G-WPR scores are a distribution (~1/N each): fp32 (B, N), compared as N * scores so the tolerances
    see O(1) numbers."""
    n = ref.shape[-1]
    assert got.shape == ref.shape and got.dtype == torch.float32
    torch.testing.assert_close(got * n, ref * n, **tol(dtype))

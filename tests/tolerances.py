"""The one tolerance table for comparing a kernel (or a fused path) with its fp32 reference.

Keyed by the dtype of the inputs. fp16 and bf16 rows follow the FlashAttention habit: a few times
PyTorch's own error in that dtype against an fp32 reference, plus a small absolute floor.
"""

import torch

TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def tol(dtype: torch.dtype) -> dict:
    return TOLERANCES[dtype]

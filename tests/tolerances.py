"""The one tolerance table for comparing a kernel (or a fused path) with its fp32 reference, keyed by the
dtype of the inputs. It lives in ``atedm_kernels.selfcheck``, where ``python -m atedm doctor`` applies the
same table on a user's machine.
"""

import torch

from atedm_kernels.selfcheck import TOLERANCES


def tol(dtype: torch.dtype) -> dict:
    return TOLERANCES[dtype]

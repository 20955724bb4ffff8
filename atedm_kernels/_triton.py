"""Triton where it is installed, and the package's one autotuning convention.

``atedm_kernels`` must import where Triton is absent (macOS, Windows, a bare CPU install); there
``_dispatch.resolve_backend`` never picks ``"triton"``, so the kernels stay plain functions that are never
launched and the decorators below leave them untouched. Kernel modules declare ``from __future__ import
annotations``, which keeps ``tl.constexpr`` annotations as strings (Triton reads those) and lets the
kernels be defined without Triton.
"""

from __future__ import annotations

import torch

from ._dispatch import triton_interpreter_on

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

_LAUNCH_OPTIONS = ("num_warps", "num_stages")


def jit(fn):
    """``triton.jit``, or the plain function where Triton is absent."""
    return fn if triton is None else triton.jit(fn)


def autotune(cuda_configs: list[dict], interpreter_config: dict, key: list[str]):
    """``triton.autotune`` over ``cuda_configs`` on a GPU, over ``interpreter_config`` alone under
    ``TRITON_INTERPRET=1`` (the interpreter fails with two or more configs, and small blocks there only
    cost Python loop trips). Each dict holds meta-parameters plus optional ``num_warps``/``num_stages``;
    ``key`` names the size arguments whose change triggers a new search."""
    if triton is None:  # pragma: no cover - depends on the install
        return lambda fn: fn
    chosen = [interpreter_config] if triton_interpreter_on() else cuda_configs
    configs = [
        triton.Config(
            {name: value for name, value in config.items() if name not in _LAUNCH_OPTIONS},
            num_warps=config.get("num_warps", 4),
            num_stages=config.get("num_stages", 2),
        )
        for config in chosen
    ]
    return triton.autotune(configs=configs, key=key)


def head_dim_block(head_dim: int) -> int:
    """Register width of the head dimension: ``tl.arange`` needs a power of two and ``tl.dot`` at least
    16, so other head dims (SD 1.5's 40, say) are padded with masked lanes."""
    return max(16, triton.next_power_of_2(head_dim))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get IEEE fp32 products, as ``torch.matmul`` does by default, instead of TF32 (about
    1e-3 relative error, far outside the fp32 tolerance); fp16/bf16 inputs ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


@jit
def load_head_rows(
    ptrs, rows, num_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr,
):
    """A (rows, BLOCK_D) tile of Q, K or V; rows >= num_rows and padded head-dim lanes read 0.

    ptrs: (rows, BLOCK_D) pointers; rows: token indices of the tile; num_rows: valid tokens;
    offs_d: 0..BLOCK_D-1; MASK_ROWS: False for tiles known to lie inside the sequence, so the hot loop
    of full tiles issues unmasked (vectorized) loads.
    """
    if MASK_ROWS:
        if BLOCK_D == HEAD_DIM:
            tile = tl.load(ptrs, mask=rows[:, None] < num_rows, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows[:, None] < num_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return tile

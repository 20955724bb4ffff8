"""Benchmark of ``attention_with_lse`` (atedm_kernels/attention_lse.py) at SDXL's shapes.

Providers: plain PyTorch SDPA (``F.scaled_dot_product_attention`` with its default backend choice: what
every unpruned layer runs), each lse provider available here (``lse_flash``, ``lse_efficient``,
``lse_cudnn``, ``lse_triton``: PyTorch's fused kernels through their aten ops, and the Triton FA2 kernel),
the PyTorch reference, and with ``--compile-ref`` torch.compile of the reference. Per shape it prints each
lse provider's time over plain SDPA: the pruning layer's attention should cost what SDPA costs, and the
fastest provider is the one ``backend="auto"`` should pick first. Work counted: 4 B H N^2 d FLOPs (QK^T
and PV) and B H N^2 exps; the floor is the slower of the two at the GPU's ceilings (docs/performance.md).

    python -m benchmarks.bench_attention_lse [--quick | --tiny] [--compile-ref] [--out PATH] [--dtype float16]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import atedm_kernels.attention_lse as attention_lse
from atedm_kernels import attention_with_lse, attention_with_lse_ref
from benchmarks.common import (
    bench_shapes,
    kernel_bench_args,
    markdown_table,
    rotating,
    time_providers,
    write_rows,
)

# (B, H, N, d): SDXL's two attention levels at 1024 px with CFG, and level 2 at 2048 px (last: a kill
# at the time limit loses the least).
SHAPES = {
    "level2_1024px": (2, 10, 4096, 64),
    "level3_1024px": (2, 20, 1024, 64),
    "level2_2048px": (2, 10, 16384, 64),
}
QUICK_SHAPES = {"quick": (1, 2, 512, 64)}
TINY_SHAPES = {"tiny": (2, 2, 64, 32)}
# Input sets cycled through while timing: 3 x 126 MB at 2048 px, beyond the 50 MB L2.
INPUT_SETS = 3


def lse_providers(q: torch.Tensor, with_triton: bool) -> list[str]:
    """The lse providers to time for inputs like ``q``: those the op reports usable here, or the Triton
    kernel alone where the op predates provider choice (or under the interpreter, where it is the only one)."""
    listed = getattr(attention_lse, "available_lse_providers", lambda _: [])(q)
    if "triton" not in listed and with_triton:
        listed.append("triton")
    return listed


def providers(args, next_inputs, lse_names: list[str]) -> dict:
    chosen = {
        "sdpa": lambda: F.scaled_dot_product_attention(*next_inputs()),
        "torch_ref": lambda: attention_with_lse_ref(*next_inputs()),
    }
    for name in lse_names:
        # backend="triton" is our kernel on CUDA and under the interpreter alike; provider= takes CUDA tensors only.
        call = {"backend": "triton"} if name == "triton" else {"provider": name}
        chosen[f"lse_{name}"] = lambda call=call: attention_with_lse(*next_inputs(), **call)
    if args.compile_ref:
        # A fresh cache per shape: past dynamo's recompile limit the compiled provider would silently run eagerly.
        torch._dynamo.reset()
        compiled_ref = torch.compile(attention_with_lse_ref)
        chosen["torch_compile_ref"] = lambda: compiled_ref(*next_inputs())
    return chosen


def print_ratios_to_sdpa(label: str, rows: list[dict]) -> None:
    by_provider = {row["provider"]: row["ms"] for row in rows}
    if not by_provider.get("sdpa"):
        return
    for provider, ms in by_provider.items():
        if provider.startswith("lse_") and ms:
            print(f"{label}: {provider} / sdpa = {ms / by_provider['sdpa']:.2f}x")


def main() -> None:
    args = kernel_bench_args(__doc__.splitlines()[0], "attention_lse.csv")
    rows = []
    for label, (batch, heads, n, head_dim) in bench_shapes(args, SHAPES, QUICK_SHAPES, TINY_SHAPES).items():
        input_sets = [
            tuple(torch.randn(batch, heads, n, head_dim, device=args.device, dtype=args.dtype) for _ in range(3))
            for _ in range(INPUT_SETS)
        ]
        lse_names = lse_providers(input_sets[0][0], args.triton)
        print(f"{label}: B={batch} H={heads} N={n} d={head_dim} {args.dtype}; lse providers: {lse_names}")
        shape_rows = time_providers(
            providers(args, rotating(input_sets), lse_names), args.device,
            flops=4.0 * batch * heads * n * n * head_dim, exps=float(batch * heads * n * n), repeats=args.repeats,
            op="attention_with_lse", variant="", shape=label, batch=batch, heads=heads, tokens=n,
            head_dim=head_dim, dtype=str(args.dtype).removeprefix("torch."),
        )
        write_rows(args.out, shape_rows)
        print_ratios_to_sdpa(label, shape_rows)
        rows += shape_rows
        del input_sets
    print(markdown_table(rows, ["shape", "provider", "ms", "tflops", "texps", "floor_ms", "pct_of_floor", "error"]))
    print(f"rows appended to {args.out}")


if __name__ == "__main__":
    main()

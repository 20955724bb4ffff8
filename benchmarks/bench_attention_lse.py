"""Benchmark of ``attention_with_lse`` (atedm_kernels/attention_lse.py) at SDXL's shapes.

Providers: the Triton kernel, the PyTorch reference, torch.compile of the reference, and the target:
PyTorch SDPA with the flash backend (which computes the same lse internally but does not return it through
the public API); the kernel should stay within 1.15x of it on an H100. Work counted: 4 B H N^2 d FLOPs
(QK^T and PV) and B H N^2 exps; the floor is the slower of the two at the GPU's ceilings (performance.md).

    python -m benchmarks.bench_attention_lse [--quick] [--out PATH] [--dtype float16]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from atedm_kernels import attention_with_lse, attention_with_lse_ref
from benchmarks.common import kernel_bench_args, markdown_table, rotating, time_providers, write_rows

# (B, H, N, d): SDXL's two attention levels at 1024 px with CFG, and level 2 at 2048 px.
SHAPES = {
    "level2_1024px": (2, 10, 4096, 64),
    "level3_1024px": (2, 20, 1024, 64),
    "level2_2048px": (2, 10, 16384, 64),
}
QUICK_SHAPES = {"quick": (1, 2, 512, 64)}
# Input sets cycled through while timing: 3 x 126 MB at 2048 px, beyond the 50 MB L2.
INPUT_SETS = 3


def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def providers(device: torch.device, next_inputs) -> dict:
    # A fresh cache per shape and variant: past dynamo's recompile limit the compiled provider would
    # silently run eagerly.
    torch._dynamo.reset()
    compiled_ref = torch.compile(attention_with_lse_ref)
    chosen = {
        "torch_ref": lambda: attention_with_lse_ref(*next_inputs()),
        "torch_compile_ref": lambda: compiled_ref(*next_inputs()),
    }
    if device.type == "cuda":
        chosen["triton"] = lambda: attention_with_lse(*next_inputs(), backend="triton")
        chosen["sdpa_flash"] = lambda: sdpa_flash(*next_inputs())
    return chosen


def main() -> None:
    args = kernel_bench_args(__doc__.splitlines()[0], "attention_lse.csv")
    rows = []
    for label, (batch, heads, n, head_dim) in (QUICK_SHAPES if args.quick else SHAPES).items():
        input_sets = [
            tuple(torch.randn(batch, heads, n, head_dim, device=args.device, dtype=args.dtype) for _ in range(3))
            for _ in range(INPUT_SETS)
        ]
        print(f"{label}: B={batch} H={heads} N={n} d={head_dim} {args.dtype}")
        rows += time_providers(
            providers(args.device, rotating(input_sets)), args.device,
            flops=4.0 * batch * heads * n * n * head_dim, exps=float(batch * heads * n * n),
            op="attention_with_lse", variant="", shape=label, batch=batch, heads=heads, tokens=n,
            head_dim=head_dim, dtype=str(args.dtype).removeprefix("torch."),
        )
    path = write_rows(args.out, rows)
    print(markdown_table(rows, ["shape", "provider", "ms", "tflops", "floor_ms", "pct_of_floor", "error"]))
    for label in {row["shape"] for row in rows}:
        by_provider = {row["provider"]: row["ms"] for row in rows if row["shape"] == label}
        if by_provider.get("triton") and by_provider.get("sdpa_flash"):
            ratio = by_provider["triton"] / by_provider["sdpa_flash"]
            print(f"{label}: triton / sdpa_flash = {ratio:.2f}x (target <= 1.15x)")
    print(f"rows appended to {path}")


if __name__ == "__main__":
    main()

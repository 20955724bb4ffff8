"""Benchmark of ``head_mean_attention_map`` (atedm_kernels/attention_map.py) at SDXL's shapes.

Providers: the Triton kernel, the PyTorch reference, and with ``--compile-ref`` torch.compile of the
reference. The map is written in fp16, as the integration asks for it. Work counted: 2 B H N^2 d FLOPs
(QK^T), B H N^2 exps and the B N^2 x 2 bytes of the map written once; the floor is the slowest of the
three (docs/performance.md: about 86 us at level 2 on an H100, exp-bound). Achieved GB/s counts the map write only.

    python -m benchmarks.bench_attention_map [--quick | --tiny] [--compile-ref] [--out PATH] [--dtype float16]
"""

from __future__ import annotations

import torch

from atedm_kernels import attention_with_lse_ref, head_mean_attention_map, head_mean_attention_map_ref
from benchmarks.bench_attention_lse import INPUT_SETS, QUICK_SHAPES, SHAPES, TINY_SHAPES
from benchmarks.common import (
    bench_shapes,
    kernel_bench_args,
    markdown_table,
    rotating,
    time_providers,
    write_rows,
)

MAP_DTYPE = torch.float16


def providers(args, next_inputs) -> dict:
    chosen = {"torch_ref": lambda: head_mean_attention_map_ref(*next_inputs(), out_dtype=MAP_DTYPE)}
    if args.triton:
        chosen["triton"] = lambda: head_mean_attention_map(*next_inputs(), out_dtype=MAP_DTYPE, backend="triton")
    if args.compile_ref:
        # A fresh cache per shape: past dynamo's recompile limit the compiled provider would silently run eagerly.
        torch._dynamo.reset()
        compiled_ref = torch.compile(head_mean_attention_map_ref)
        chosen["torch_compile_ref"] = lambda: compiled_ref(*next_inputs(), out_dtype=MAP_DTYPE)
    return chosen


def q_k_lse(batch, heads, n, head_dim, device, dtype):
    q = torch.randn(batch, heads, n, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, heads, n, head_dim, device=device, dtype=dtype)
    # The lse only has to be consistent; one head at a time keeps the 2048 px reference within memory.
    heads_lse = [attention_with_lse_ref(q[:, h : h + 1], k[:, h : h + 1], k[:, h : h + 1])[1] for h in range(heads)]
    lse = torch.cat(heads_lse, dim=1)
    return q, k, lse


def main() -> None:
    args = kernel_bench_args(__doc__.splitlines()[0], "attention_map.csv")
    rows = []
    for label, (batch, heads, n, head_dim) in bench_shapes(args, SHAPES, QUICK_SHAPES, TINY_SHAPES).items():
        input_sets = [q_k_lse(batch, heads, n, head_dim, args.device, args.dtype) for _ in range(INPUT_SETS)]
        print(f"{label}: B={batch} H={heads} N={n} d={head_dim} {args.dtype} -> Abar in {MAP_DTYPE}")
        shape_rows = time_providers(
            providers(args, rotating(input_sets)), args.device,
            flops=2.0 * batch * heads * n * n * head_dim, exps=float(batch * heads * n * n),
            bytes_moved=float(batch * n * n * MAP_DTYPE.itemsize), repeats=args.repeats,
            op="head_mean_attention_map", variant="fp16_map", shape=label, batch=batch, heads=heads, tokens=n,
            head_dim=head_dim, dtype=str(args.dtype).removeprefix("torch."),
        )
        write_rows(args.out, shape_rows)
        rows += shape_rows
        del input_sets
    print(markdown_table(rows, ["shape", "provider", "ms", "tflops", "gbps", "texps", "floor_ms", "pct_of_floor",
                                "error"]))
    print(f"rows appended to {args.out}")


if __name__ == "__main__":
    main()

"""Benchmark of ``topk_keep_indices`` and ``gather_tokens`` (atedm_kernels/topk_gather.py) at SDXL's shapes.

Providers: the Triton kernel, the PyTorch reference, and with ``--compile-ref`` torch.compile of the
reference. k = ceil(0.37 N)
(rho = 0.63). Work counted as bytes moved: the gather reads and writes B k C elements plus the indices,
so its floor is a copy at the GPU's bandwidth (docs/performance.md: 3.0 TB/s H100, 4.3 TB/s H200). Top-k reads
B N fp32 scores and writes B k indices: its "floor" is nanoseconds, the kernel is latency-bound (33
dependent passes in one program per image), so read its ms against the launch, not its % of floor.

    python -m benchmarks.bench_topk_gather [--quick | --tiny] [--compile-ref] [--out PATH] [--dtype float16]
"""

from __future__ import annotations

import torch

from atedm_kernels import gather_tokens, gather_tokens_ref, num_kept_tokens, topk_keep_indices, topk_keep_indices_ref
from benchmarks.common import (
    bench_shapes,
    kernel_bench_args,
    markdown_table,
    op_providers,
    rotating,
    time_providers,
    write_rows,
)

PRUNE_RATIO = 0.63
# (B, N, C): SDXL's two attention levels at 1024 px with CFG, and level 2 at 2048 px.
SHAPES = {
    "level2_1024px": (2, 4096, 640),
    "level3_1024px": (2, 1024, 1280),
    "level2_2048px": (2, 16384, 640),
}
QUICK_SHAPES = {"quick_level3_512px": (2, 256, 1280)}
TINY_SHAPES = {"tiny": (2, 64, 32)}
# Input sets cycled through while timing: 4 x 42 MB of hidden states at 2048 px, beyond the 50 MB L2.
INPUT_SETS = 4


def providers(args, op: str, next_inputs, k: int) -> dict:
    if op == "topk_keep_indices":
        reference, kernel = topk_keep_indices_ref, topk_keep_indices

        def call(fn, **kwargs):
            return fn(next_inputs()[0], k, **kwargs)
    else:
        reference, kernel = gather_tokens_ref, gather_tokens

        def call(fn, **kwargs):
            return fn(*next_inputs()[1:], **kwargs)

    return op_providers(args, call, reference, kernel)


def main() -> None:
    args = kernel_bench_args(__doc__.splitlines()[0], "topk_gather.csv")
    rows = []
    for label, (batch, n, channels) in bench_shapes(args, SHAPES, QUICK_SHAPES, TINY_SHAPES).items():
        k = num_kept_tokens(n, PRUNE_RATIO)
        input_sets = []
        for _ in range(INPUT_SETS):
            scores = torch.rand(batch, n, device=args.device)
            x = torch.randn(batch, n, channels, device=args.device, dtype=args.dtype)
            input_sets.append((scores, x, topk_keep_indices_ref(scores, k)))
        print(f"{label}: B={batch} N={n} k={k} C={channels} {args.dtype}")
        work = {
            "topk_keep_indices": batch * n * 4 + batch * k * 8,
            "gather_tokens": 2 * batch * k * channels * args.dtype.itemsize + batch * k * 8,
        }
        for op, bytes_moved in work.items():
            op_rows = time_providers(
                providers(args, op, rotating(input_sets), k), args.device,
                bytes_moved=float(bytes_moved), repeats=args.repeats,
                op=op, shape=label, batch=batch, tokens=n, kept=k, channels=channels,
                dtype=str(args.dtype).removeprefix("torch."),
            )
            write_rows(args.out, op_rows)
            rows += op_rows
        del input_sets
    print(markdown_table(rows, ["op", "shape", "provider", "ms", "gbps", "floor_ms", "pct_of_floor", "error"]))
    print(f"rows appended to {args.out}")


if __name__ == "__main__":
    main()

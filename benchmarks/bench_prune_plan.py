"""Benchmark of the whole per-block pruning pipeline: map reduction + G-WPR + top-k + gather + recovery.

What one pruning block adds to SDXL on top of its first layer's attention (which it reuses through the
log-sum-exp): ``plan_token_pruning`` (head-averaged map from Q, K and lse, K power iterations, top-k,
recovery match), then the gather of the kept hidden rows and the scatter-recovery of the full stream.
Targets on an H100 at level 2 (B = 2, K = 3): at most 0.3 ms (floor about 0.2 ms: one exp-bound pass
plus about five passes over the 67 MB averaged map), at least 10x faster than the PyTorch reference, and
at most 80 MB of extra memory per block.

Providers: the Triton kernels, the PyTorch reference path, and with ``--compile-ref`` torch.compile of it.

    python -m benchmarks.bench_prune_plan [--quick | --tiny] [--compile-ref] [--out PATH] [--dtype float16]
"""

from __future__ import annotations

import torch

from atedm_kernels import attention_with_lse, gather_tokens, num_kept_tokens, plan_token_pruning, scatter_recover
from benchmarks.common import (
    bench_shapes,
    kernel_bench_args,
    markdown_table,
    rotating,
    time_providers,
    write_rows,
)

# (B, H, N, d, C): SDXL's attention levels at 1024 px with CFG, and level 2 at 2048 px.
SHAPES = {
    "level2_1024px": (2, 10, 4096, 64, 640),
    "level3_1024px": (2, 20, 1024, 64, 1280),
    "level2_2048px": (2, 10, 16384, 64, 640),
}
QUICK_SHAPES = {"quick": (2, 2, 256, 32, 64)}
TINY_SHAPES = {"tiny": (2, 2, 64, 32, 32)}
PRUNE_RATIO = 0.63
ITERATIONS = 3
INPUT_SETS = 2


def block_pipeline(q, k, lse, hidden, backend):
    num_keep = num_kept_tokens(q.shape[2], PRUNE_RATIO)
    keep, src = plan_token_pruning(q, k, lse, num_keep, iterations=ITERATIONS, backend=backend)
    return scatter_recover(gather_tokens(hidden, keep, backend=backend), src, backend=backend)


def extra_memory_mb(fn, device: torch.device) -> float | None:
    """Peak memory the pipeline allocates beyond its inputs, in MB (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 1e6


def main() -> None:
    args = kernel_bench_args(__doc__.splitlines()[0], "prune_plan.csv")
    rows = []
    for label, (batch, heads, n, head_dim, channels) in bench_shapes(args, SHAPES, QUICK_SHAPES, TINY_SHAPES).items():
        input_sets = []
        for _ in range(INPUT_SETS):
            q, k, v = (torch.randn(batch, heads, n, head_dim, device=args.device, dtype=args.dtype) for _ in range(3))
            _, lse = attention_with_lse(q, k, v)
            hidden = torch.randn(batch, n, channels, device=args.device, dtype=args.dtype)
            input_sets.append((q, k, lse, hidden))
        next_inputs = rotating(input_sets)
        providers = {"torch_ref": lambda: block_pipeline(*next_inputs(), "torch")}
        if args.triton:
            providers["triton"] = lambda: block_pipeline(*next_inputs(), "triton")
        if args.compile_ref:
            torch._dynamo.reset()
            compiled = torch.compile(block_pipeline)
            providers["torch_compile_ref"] = lambda: compiled(*next_inputs(), "torch")
        print(f"{label}: B={batch} H={heads} N={n} d={head_dim} C={channels} {args.dtype}")
        map_bytes = batch * n * n * 2  # the fp16 head-averaged map
        shape_rows = time_providers(
            providers, args.device,
            phases=[dict(exps=float(batch * heads * n * n), flops=2.0 * batch * heads * n * n * head_dim),
                    dict(bytes_moved=5.0 * map_bytes)], repeats=args.repeats,
            op="prune_plan", variant=f"rho={PRUNE_RATIO},K={ITERATIONS}", shape=label, batch=batch, heads=heads,
            tokens=n, head_dim=head_dim, dtype=str(args.dtype).removeprefix("torch."),
        )
        for row in shape_rows:
            fn = providers.get(row["provider"])
            row["extra_mb"] = extra_memory_mb(fn, args.device) if fn and not row["error"] else None
        write_rows(args.out, shape_rows)
        by_provider = {row["provider"]: row["ms"] for row in shape_rows}
        if by_provider.get("triton") and by_provider.get("torch_ref"):
            print(f"{label}: reference / triton = {by_provider['torch_ref'] / by_provider['triton']:.1f}x (target >= 10x)")
        rows += shape_rows
        del input_sets
    print(markdown_table(rows, ["shape", "provider", "ms", "floor_ms", "pct_of_floor", "extra_mb", "error"]))
    print(f"rows appended to {args.out}")


if __name__ == "__main__":
    main()

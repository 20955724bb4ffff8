"""Benchmark of ``gwpr_scores`` (atedm_kernels/gwpr.py) at SDXL's shapes.

Providers: the Triton path, the PyTorch reference, and with ``--compile-ref`` torch.compile of the
reference. Variants:

* ``mean_map``: K steps over a given fp16 head-averaged map (what the integration does when recovery
  also reads the map). Memory-bound: K reads of B N^2 x 2 bytes (about 22 us per step at level 2).
* ``mean_no_map``: no map given; the kernel path builds one (exp floor, write, step 1 from its column
  sums, then K - 1 reads) or recomputes K times, as ``materialize_attention_map`` decides.
* ``rms``: per-head walks recomputed from Q, K and lse: K exp-bound passes (about 86 us each at level 2).

    python -m benchmarks.bench_gwpr [--quick | --tiny] [--compile-ref] [--out PATH] [--dtype float16]
"""

from __future__ import annotations

from atedm_kernels import gwpr_scores, gwpr_scores_ref, head_mean_attention_map_ref
from atedm_kernels.gwpr import materialize_attention_map
from benchmarks.bench_attention_lse import INPUT_SETS, QUICK_SHAPES, SHAPES, TINY_SHAPES
from benchmarks.bench_attention_map import MAP_DTYPE, q_k_lse
from benchmarks.common import (
    bench_shapes,
    kernel_bench_args,
    markdown_table,
    op_providers,
    rotating,
    time_providers,
    write_rows,
)

# K = 1 is Zero-TPrune's deep-layer setting; K = 3 is atedm's default.
ITERATIONS = (1, 3)
VARIANTS = ("mean_map", "mean_no_map", "rms")


def phases(variant: str, iterations: int, batch: int, heads: int, n: int, head_dim: int) -> list[dict]:
    """The work of one call, phase after phase, for the floor (the kernel path's algorithm)."""
    map_bytes = float(batch * n * n * MAP_DTYPE.itemsize)
    recompute = dict(flops=2.0 * batch * heads * n * n * head_dim, exps=float(batch * heads * n * n))
    if variant == "mean_map":
        return [dict(bytes_moved=map_bytes)] * iterations
    if variant == "mean_no_map" and materialize_attention_map(batch, heads, n, iterations):
        return [dict(recompute, bytes_moved=map_bytes)] + [dict(bytes_moved=map_bytes)] * (iterations - 1)
    return [recompute] * iterations


def providers(args, next_inputs, variant: str, iterations: int) -> dict:
    reduction = "rms" if variant == "rms" else "mean"

    def call(fn, **kwargs):
        q, k, lse, amap = next_inputs()
        return fn(q, k, lse, iterations, reduction, attention_map=amap if variant == "mean_map" else None, **kwargs)

    return op_providers(args, call, gwpr_scores_ref, gwpr_scores)


def main() -> None:
    args = kernel_bench_args(__doc__.splitlines()[0], "gwpr.csv")
    rows = []
    for label, (batch, heads, n, head_dim) in bench_shapes(args, SHAPES, QUICK_SHAPES, TINY_SHAPES).items():
        input_sets = []
        for _ in range(INPUT_SETS):
            q, k, lse = q_k_lse(batch, heads, n, head_dim, args.device, args.dtype)
            input_sets.append((q, k, lse, head_mean_attention_map_ref(q, k, lse, out_dtype=MAP_DTYPE)))
        for variant in VARIANTS:
            for iterations in ITERATIONS:
                print(f"{label}: B={batch} H={heads} N={n} d={head_dim} {args.dtype} {variant} K={iterations}")
                variant_rows = time_providers(
                    providers(args, rotating(input_sets), variant, iterations), args.device,
                    phases=phases(variant, iterations, batch, heads, n, head_dim), repeats=args.repeats,
                    op="gwpr_scores", variant=f"{variant}_k{iterations}", shape=label, batch=batch, heads=heads,
                    tokens=n, head_dim=head_dim, dtype=str(args.dtype).removeprefix("torch."),
                )
                write_rows(args.out, variant_rows)
                rows += variant_rows
        del input_sets
    print(markdown_table(rows, ["shape", "variant", "provider", "ms", "tflops", "gbps", "texps", "floor_ms",
                                "pct_of_floor", "error"]))
    print(f"rows appended to {args.out}")


if __name__ == "__main__":
    main()

"""Benchmark of ``recovery_source`` and ``scatter_recover`` (atedm_kernels/recovery.py) at SDXL's shapes.

Providers: the Triton kernel, the PyTorch reference, and with ``--compile-ref`` torch.compile of the
reference. k = ceil(0.37 N).
Variants of the match: the three map rules reading a materialized Abar, the recompute of the default
rule from Q, K and the lse (no map), and the key cosine; then the refill copy. Work counted (see the
docstring of recovery.py for the floors):

* map ``attention``: the whole map (with 37% of columns kept nearly every 32-byte sector is read);
  ``attention_transposed``: the k kept rows; ``symmetric``: both;
* recompute: 2 B H N k d FLOPs, B H N k exps and Q, K read once; the floor is the slowest of the three;
* key cosine: 2 B N k H d FLOPs and the keys read once;
* refill: B N C written, B k C read.
Level 2 at 2048 px (a 1.07 GB map per image pair) runs the default rule, its recompute and the refill.

    python -m benchmarks.bench_recovery [--quick | --tiny] [--compile-ref] [--out PATH] [--dtype float16]
"""

from __future__ import annotations

import torch

from atedm_kernels import (
    attention_with_lse_ref,
    num_kept_tokens,
    recovery_source,
    recovery_source_ref,
    scatter_recover,
    scatter_recover_ref,
    topk_keep_indices_ref,
)
from benchmarks.common import (
    bench_shapes,
    kernel_bench_args,
    markdown_table,
    rotating,
    time_providers,
    write_rows,
)

PRUNE_RATIO = 0.63
# (B, H, N, d, C): SDXL's two attention levels at 1024 px with CFG, and level 2 at 2048 px.
SHAPES = {
    "level2_1024px": (2, 10, 4096, 64, 640),
    "level3_1024px": (2, 20, 1024, 64, 1280),
    "level2_2048px": (2, 10, 16384, 64, 640),
}
QUICK_SHAPES = {"quick_level3_512px": (2, 20, 256, 64, 1280)}
TINY_SHAPES = {"tiny": (2, 2, 64, 32, 32)}
ALL_VARIANTS = ("map_attention", "map_attention_transposed", "map_symmetric", "recompute_attention", "key_cosine", "refill")
# At 2048 px the map-reading variants other than the default cost GBs of reference temporaries and
# add nothing the 1024 px rows do not show.
VARIANTS = {"level2_2048px": ("map_attention", "recompute_attention", "refill")}
# Input sets cycled through while timing: 3 x 67 MB maps at level 2, beyond the 50 MB L2.
INPUT_SETS = 3


def make_inputs(batch, heads, n, head_dim, channels, k, device, dtype) -> dict:
    q = torch.randn(batch, heads, n, head_dim, device=device, dtype=dtype)
    keys = torch.randn(batch, heads, n, head_dim, device=device, dtype=dtype)
    # The lse only has to be consistent with q and k; one head at a time bounds the reference's memory.
    lse = torch.cat([attention_with_lse_ref(q[:, h : h + 1], keys[:, h : h + 1], keys[:, h : h + 1])[1] for h in range(heads)], 1)
    keep = topk_keep_indices_ref(torch.rand(batch, n, device=device), k)
    return {
        "keep": keep,
        "map": torch.rand(batch, n, n, device=device, dtype=dtype),  # the match reads values, not their meaning
        "queries": q,
        "keys": keys,
        "lse": lse,
        "kept": torch.randn(batch, k, channels, device=device, dtype=dtype),
        "src": torch.randint(0, k, (batch, n), device=device),
    }


def call(variant: str, backend: str | None, n: int, inputs: dict):
    """One run of ``variant``; backend None means the reference function itself."""
    if variant == "refill":
        args = (inputs["kept"], inputs["src"])
        return scatter_recover_ref(*args) if backend is None else scatter_recover(*args, backend=backend)
    if variant.startswith("map_"):
        rule, operands = variant.removeprefix("map_"), {"attention_map": inputs["map"]}
    elif variant == "recompute_attention":
        rule, operands = "attention", {"keys": inputs["keys"], "queries": inputs["queries"], "lse": inputs["lse"]}
    else:
        rule, operands = "key_cosine", {"keys": inputs["keys"]}
    if backend is None:
        return recovery_source_ref(inputs["keep"], n, rule, **operands)
    return recovery_source(inputs["keep"], n, rule, backend=backend, **operands)


def providers(args, variant: str, n: int, next_inputs) -> dict:
    chosen = {"torch_ref": lambda: call(variant, None, n, next_inputs())}
    if args.triton:
        chosen["triton"] = lambda: call(variant, "triton", n, next_inputs())
    if args.compile_ref:
        # A fresh cache per shape and variant: past dynamo's recompile limit the compiled provider would
        # silently run eagerly.
        torch._dynamo.reset()
        compiled_call = torch.compile(call)
        chosen["torch_compile_ref"] = lambda: compiled_call(variant, None, n, next_inputs())
    return chosen


def work(variant: str, batch, heads, n, head_dim, channels, k, itemsize) -> dict:
    """FLOPs, exps and bytes of one run (the refill and the matches write int64 / dtype outputs)."""
    indices = batch * (k + n) * 8
    map_rows = {"map_attention": batch * n * n, "map_attention_transposed": batch * k * n}
    map_rows["map_symmetric"] = map_rows["map_attention"] + map_rows["map_attention_transposed"]
    if variant in map_rows:
        return {"bytes_moved": float(map_rows[variant] * itemsize + indices)}
    token_bytes = batch * heads * n * head_dim * itemsize
    if variant == "recompute_attention":
        return {"flops": 2.0 * batch * heads * n * k * head_dim, "exps": float(batch * heads * n * k),
                "bytes_moved": float(2 * token_bytes + batch * heads * n * 4 + indices)}
    if variant == "key_cosine":
        return {"flops": 2.0 * batch * n * k * heads * head_dim, "bytes_moved": float(token_bytes + indices)}
    return {"bytes_moved": float(batch * (n + k) * channels * itemsize + batch * n * 8)}


def main() -> None:
    args = kernel_bench_args(__doc__.splitlines()[0], "recovery.csv")
    rows = []
    for label, (batch, heads, n, head_dim, channels) in bench_shapes(args, SHAPES, QUICK_SHAPES, TINY_SHAPES).items():
        k = num_kept_tokens(n, PRUNE_RATIO)
        shape = (batch, heads, n, head_dim, channels, k)
        input_sets = [make_inputs(*shape, args.device, args.dtype) for _ in range(INPUT_SETS)]
        print(f"{label}: B={batch} H={heads} N={n} d={head_dim} C={channels} k={k} {args.dtype}")
        for variant in VARIANTS.get(label, ALL_VARIANTS):
            variant_rows = time_providers(
                providers(args, variant, n, rotating(input_sets)), args.device,
                **work(variant, *shape, args.dtype.itemsize), repeats=args.repeats,
                op="scatter_recover" if variant == "refill" else "recovery_source", variant=variant, shape=label,
                batch=batch, heads=heads, tokens=n, head_dim=head_dim, channels=channels, kept=k,
                dtype=str(args.dtype).removeprefix("torch."),
            )
            write_rows(args.out, variant_rows)
            rows += variant_rows
        del input_sets
    print(markdown_table(rows, ["variant", "shape", "provider", "ms", "tflops", "gbps", "texps", "floor_ms",
                                "pct_of_floor", "error"]))
    print(f"rows appended to {args.out}")


if __name__ == "__main__":
    main()

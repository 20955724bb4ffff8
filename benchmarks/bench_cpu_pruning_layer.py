"""The pruning layer's self-attention on the CPU: what AT-EDM adds over the attention an unpruned layer runs.

At SDXL's pruning-layer shapes (CFG batch 2), per call, interleaved round by round:

* ``sdpa``      -- ``F.scaled_dot_product_attention``: what the same layer costs in an unpruned model;
* ``two_pass``  -- attention with the row log-sum-exp (PyTorch's fused CPU kernel), then Abar rebuilt
                   from Q, K and lse in fp32 head chunks, then the plan (G-WPR, top-k, recovery match):
                   the route every published implementation takes, and this package's until the one-pass op;
* ``one_pass``  -- ``attention_with_map`` (attention and Abar from the same probabilities, in cache-sized
                   row chunks), then the plan from that map: what ``backend="auto"`` runs on the CPU now.

The overhead column is each route's time beyond ``sdpa``: the whole cost of AT-EDM's scoring in that
layer. Which route a block takes follows ``one_pass_map_applies`` (both levels at 512 and 1024 px).

    python -m benchmarks.bench_cpu_pruning_layer [--sizes 512,1024] [--dtype bfloat16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from atedm_kernels import attention_with_lse, attention_with_map, head_mean_attention_map, num_kept_tokens
from atedm_kernels import plan_token_pruning
from benchmarks.common import RESULTS_DIR, environment_info, markdown_table, write_rows

# (heads, head dim) of SDXL-base's attention levels; tokens = (size / 8 / 2^(level - 1))^2.
LEVELS = {2: (10, 64), 3: (20, 64)}
PRESET_C_RATIO = 0.645  # preset c's prune ratio at both levels


def routes(q, k, v, scale, num_keep):
    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    def two_pass():
        out, lse = attention_with_lse(q, k, v, scale)
        attention_map = head_mean_attention_map(q, k, lse, scale, out_dtype=torch.float32)
        return out, plan_token_pruning(q, k, lse, num_keep, scale=scale, attention_map=attention_map)

    def one_pass():
        out, attention_map = attention_with_map(q, k, v, scale)
        return out, plan_token_pruning(q, k, None, num_keep, scale=scale, attention_map=attention_map)

    return {"sdpa": sdpa, "two_pass": two_pass, "one_pass": one_pass}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="512,1024", help="image sizes (px)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--batch", type=int, default=2, help="2 = one image with CFG")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS_DIR / "cpu" / "pruning_layer.csv"))
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for level, (heads, head_dim) in LEVELS.items():
            tokens = (size // 8 // 2 ** (level - 1)) ** 2
            q, k, v = (torch.randn(args.batch, heads, tokens, head_dim, dtype=dtype) for _ in range(3))
            scale = head_dim**-0.5
            timed = routes(q, k, v, scale, num_kept_tokens(tokens, PRESET_C_RATIO))
            samples = {name: [] for name in timed}
            for fn in timed.values():  # warm-up
                fn()
            for _ in range(args.repeats):  # interleaved rounds: drift hits every route alike
                for name, fn in timed.items():
                    start = time.perf_counter()
                    fn()
                    samples[name].append((time.perf_counter() - start) * 1e3)
            sdpa_ms = statistics.median(samples["sdpa"])
            for name, values in samples.items():
                ms = statistics.median(values)
                rows.append(dict(
                    size=size, level=level, batch=args.batch, heads=heads, tokens=tokens, dtype=args.dtype,
                    route=name, ms=ms, ms_min=min(values), ms_max=max(values),
                    overhead_ms=ms - sdpa_ms, overhead_vs_sdpa=ms / sdpa_ms - 1.0, threads=torch.get_num_threads(),
                    **environment_info("cpu"),
                ))
            print(f"{size} px level {level}: " + ", ".join(f"{r['route']} {r['ms']:.1f} ms" for r in rows[-3:]))
    path = write_rows(args.out, rows)
    print(markdown_table(rows, ["size", "level", "tokens", "route", "ms", "overhead_ms", "overhead_vs_sdpa"]))
    print(f"rows appended to {path}")


if __name__ == "__main__":
    main()

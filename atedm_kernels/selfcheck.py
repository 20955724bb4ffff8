"""Self-check of the ops at SDXL's shapes: each kernel against its reference, the whole per-block chain,
and the timing of the per-block pipeline. ``python -m atedm doctor`` runs it; it imports no diffusers.

The kernels under test (``kernel_backend``): the Triton kernels on CUDA, and on the CPU under
``TRITON_INTERPRET=1`` (sensible at small shapes only); elsewhere the CPU production path (PyTorch's fused
CPU attention, the one-pass ``attention_with_map``, the PyTorch references). The
reference is each op's ``*_ref`` in fp32 on the same inputs upcast. Every check draws fresh random inputs
from one seeded generator; Triton outputs are written into NaN- or -1-poisoned buffers, so an element a
kernel never writes fails the comparison.

Comparisons:

* floating outputs: ``|kernel - ref| <= atol * unit + rtol * |ref|`` with the dtype's ``TOLERANCES``,
  where ``unit`` is 1 for attention outputs and the log-sum-exp and 1 / N for maps and G-WPR scores
  (their entries average 1 / N, so the tolerances apply to O(1) numbers, as in the tests); a map also
  passes within twice the error of PyTorch's own computation in its dtype (FlashAttention's criterion);
* discrete outputs from identical inputs (top-k indices, gathered and refilled rows, recovery sources
  from the kernel's own map) must be exactly equal.

"Kept sets exact" for a low-precision chain. The chain (pruning-layer attention, then
``plan_token_pruning``) runs on the kernel path in the model's dtype and on the reference path in fp32
(``backend="torch"``). Let t_k be the k-th largest of the *reference's* G-WPR scores of an image and
``band = atol / N + rtol * |t_k|`` the score tolerance of the dtype. The kernel's kept set must equal the
reference's, except that a token may be swapped in or out when its reference score lies within ``band``
of t_k: such a token is a provable near-tie, which a computation carrying that dtype's error cannot
decide. Every token of the symmetric difference outside the band is a failure. Recovery sources are
compared on the images whose kept lists agree, by the same rule: a pruned token may pick another kept
token than the reference only when the reference similarity of that pick is within ``atol / N + rtol *
best`` of the reference's best; a kept token must always take its own slot.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import attention_lse, attention_map, recovery, topk_gather
from ._dispatch import triton_interpreter_on
from .attention_lse import attention_with_lse, attention_with_lse_ref
from .attention_map import attention_with_map, head_mean_attention_map, head_mean_attention_map_ref
from .gwpr import gwpr_power_iteration_ref, gwpr_scores, gwpr_scores_ref, materialize_attention_map
from .prune_plan import one_pass_map_applies, plan_token_pruning
from .recovery import recovery_source, recovery_source_ref, scatter_recover, scatter_recover_ref
from .topk_gather import gather_tokens, gather_tokens_ref, num_kept_tokens, topk_keep_indices, topk_keep_indices_ref

# The one dtype -> tolerance table for a kernel (or a fused path) against its fp32 reference; the tests
# read it too (tests/tolerances.py). fp16 and bf16 follow the FlashAttention habit: a few times PyTorch's
# own error in that dtype against an fp32 reference, plus a small absolute floor.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
ROW_FIELDS = ("section", "item", "dtype", "shape", "result", "ms", "note")
SIMILARITY = "attention"  # the paper's recovery rule, the one every preset uses
# q and k entries of variance LOGIT_STD, so logits q.k / sqrt(d) have standard deviation LOGIT_STD and
# reach about 7 over 4096 keys, the size attention_map.py assumes for SDXL's. Unit-variance inputs give a
# nearly flat map whose G-WPR scores spread by 3%: the bf16 near-tie band would hold most tokens.
LOGIT_STD = 2.0
INTERPRETER_LACKS_BF16 = "the Triton interpreter has no bf16 (it computes on the raw bits)"
# Two input sets, alternated while timing, so that a repeated call does not find its inputs in L2.
TIMING_INPUT_SETS = 2


@dataclass(frozen=True)
class BlockShape:
    """The first layer of a pruning block: batch (2 = one image with CFG), heads, tokens, head dim."""

    level: int
    batch: int
    heads: int
    tokens: int
    head_dim: int

    @property
    def channels(self) -> int:
        return self.heads * self.head_dim

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.heads}x{self.tokens}x{self.head_dim}"


def sdxl_block_shapes(resolution: int, tiny: bool = False) -> list[BlockShape]:
    """SDXL's two attention levels at ``resolution`` px with CFG: level 2 has 10 heads on the 1/16 grid,
    level 3 20 heads on the 1/32 grid, d = 64. ``tiny`` keeps the grids but takes 2 and 4 heads of d = 16."""
    if resolution <= 0 or resolution % 32:
        raise ValueError(f"resolution must be a positive multiple of 32 (the level-3 grid is 1/32); got {resolution}")
    heads = (2, 4) if tiny else (10, 20)
    head_dim = 16 if tiny else 64
    return [BlockShape(level, 2, level_heads, (resolution // 2 ** (level + 2)) ** 2, head_dim)
            for level, level_heads in zip((2, 3), heads)]


def kernel_backend(requested: str, device: torch.device) -> str:
    """The backend whose kernels are under test: ``auto`` becomes ``triton`` on CUDA and under the
    interpreter, and stays ``auto`` (the CPU production path) elsewhere."""
    if requested == "auto" and (device.type == "cuda" or triton_interpreter_on()):
        return "triton"
    return requested


def describe_backend(backend: str, device: torch.device) -> str:
    """What ``backend`` runs on ``device``, in words."""
    if backend == "triton" or (backend == "auto" and device.type == "cuda"):
        return f"{backend}: Triton kernels" + (" (interpreter)" if triton_interpreter_on() else "")
    if device.type == "cpu":
        return f"{backend}: CPU production path (PyTorch fused CPU attention, one-pass map, PyTorch references)"
    return f"{backend}: PyTorch references"


def row(section: str, item: str, dtype: str, shape: str, result: str, ms: float | None = None, note: str = "") -> dict:
    return dict(section=section, item=item, dtype=dtype, shape=shape, result=result, ms=ms, note=note)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- environment -----------------------------------------------------------------------------------

def git_sha() -> str:
    """Short SHA of the checkout this package runs from; ``ATEDM_GIT_SHA`` where the tree travelled without
    its .git (the GPU machine gets a copy of the working tree only); else "not a checkout"."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return os.environ.get("ATEDM_GIT_SHA", "not a checkout")
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def environment_info(device: torch.device | str) -> dict:
    """Device, versions and git SHA as CSV columns: the same keys as ``benchmarks.common.environment_info``."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "git_sha": git_sha(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }


# --- timing ----------------------------------------------------------------------------------------

def call_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Time of one call in ms: CUDA events around it on a GPU, the wall clock on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(call_ms(fn, device) for _ in range(repeats))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- inputs and the kernels under test -------------------------------------------------------------

def attention_inputs(shape: BlockShape, dtype: torch.dtype, device: torch.device, generator: torch.Generator):
    """q, k, v (B, H, N, d) of the pruning layer, with logits of standard deviation ``LOGIT_STD``."""
    size = (shape.batch, shape.heads, shape.tokens, shape.head_dim)
    spread = LOGIT_STD**0.5
    q, k, v = (torch.randn(size, device=device, generator=generator) for _ in range(3))
    return (q * spread).to(dtype), (k * spread).to(dtype), v.to(dtype)


def _nan_like(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _minus_ones(shape, device) -> torch.Tensor:
    return torch.full(shape, -1, dtype=torch.int64, device=device)


def _kernel_attention(q, k, v, backend):
    """(out, lse) of the kernel; Triton writes into poisoned buffers."""
    if backend != "triton":
        return attention_with_lse(q, k, v, backend=backend)
    out, lse = _nan_like(q.shape, q.dtype, q.device), _nan_like(q.shape[:3], torch.float32, q.device)
    return attention_lse._attention_with_lse_launch(q, k, v, q.shape[-1] ** -0.5, out=out, lse=lse)


def _kernel_map(q, k, v, lse, backend, iterations):
    """The head-averaged map the pruning layer builds: the one-pass map where the integration takes that
    route (``one_pass_map_applies``), else ``head_mean_attention_map`` in the plan's map dtype."""
    if one_pass_map_applies(q, iterations=iterations, similarity=SIMILARITY, backend=backend):
        return attention_with_map(q, k, v)[1]
    if backend != "triton":
        return head_mean_attention_map(q, k, lse, out_dtype=torch.float32, backend=backend)
    batch, _, tokens, _ = q.shape
    out = _nan_like((batch, tokens, k.shape[2]), torch.float16, q.device)
    return attention_map._head_mean_attention_map_launch(q, k, lse, q.shape[-1] ** -0.5, torch.float16, out=out)[0]


def _kernel_topk(scores, num_keep, backend):
    if backend != "triton":
        return topk_keep_indices(scores, num_keep, backend=backend)
    return topk_gather._topk_keep_indices_into(_minus_ones((scores.shape[0], num_keep), scores.device), scores, num_keep)


def _kernel_row_gather(rows, index, backend, op):
    """gather_tokens (``op="gather"``) or scatter_recover (``op="scatter"``): both are one row gather."""
    if backend != "triton":
        return gather_tokens(rows, index, backend=backend) if op == "gather" else scatter_recover(rows, index, backend=backend)
    out = _nan_like((rows.shape[0], index.shape[1], rows.shape[2]), rows.dtype, rows.device)
    return topk_gather._gather_rows_into(out, rows, index)


def _kernel_recovery_source(keep, num_tokens, layer_map, backend):
    if backend != "triton":
        return recovery_source(keep, num_tokens, SIMILARITY, attention_map=layer_map, backend=backend)
    src = _minus_ones((keep.shape[0], num_tokens), keep.device)
    return recovery._recovery_source_into(src, keep, num_tokens, SIMILARITY, layer_map, None, None, None, None)


def pruning_layer(q, k, v, backend: str, iterations: int):
    """The pruning layer's attention as ``atedm.patch`` runs it: (out, lse or None, prebuilt map or None)."""
    if one_pass_map_applies(q, iterations=iterations, similarity=SIMILARITY, backend=backend):
        out, layer_map = attention_with_map(q, k, v)
        return out, None, layer_map
    out, lse = attention_with_lse(q, k, v, backend=backend)
    return out, lse, None


# --- comparisons -----------------------------------------------------------------------------------

def tolerance_ratio(actual: torch.Tensor, expected: torch.Tensor, tolerance: dict, unit: float = 1.0) -> float:
    """max |actual - expected| / (atol * unit + rtol * |expected|); NaN or inf anywhere gives inf."""
    actual, expected = actual.double(), expected.double()
    if actual.shape != expected.shape:
        raise ValueError(f"shape {tuple(actual.shape)} where the reference has {tuple(expected.shape)}")
    allowed = tolerance["atol"] * unit + tolerance["rtol"] * expected.abs()
    ratio = (actual - expected).abs() / allowed
    ratio = torch.where(torch.isfinite(ratio), ratio, torch.full_like(ratio, float("inf")))
    return float(ratio.max()) if ratio.numel() else 0.0


def _within(ratio: float) -> tuple[str | None, str]:
    note = f"max err {ratio:.2g} x tol"
    return (None if ratio <= 1.0 else f"error {ratio:.3g} x the tolerance"), note


def _count_differences(actual: torch.Tensor, expected: torch.Tensor) -> tuple[str | None, str]:
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} where the reference has {tuple(expected.shape)}", ""
    if torch.equal(actual, expected):
        return None, "exact"
    differing = int((actual != expected).sum())  # NaN != NaN: an unwritten poisoned element counts
    return f"{differing} of {expected.numel()} elements differ", ""


def keep_list_problem(keep: torch.Tensor, num_tokens: int, num_keep: int) -> str | None:
    """Why ``keep`` is not a valid kept list (B, k) of distinct ascending token indices, or None."""
    if keep.dim() != 2 or keep.shape[1] != num_keep:
        return f"kept list of shape {tuple(keep.shape)}, expected (B, {num_keep})"
    if keep.numel() and (keep.min() < 0 or keep.max() >= num_tokens):
        return f"kept index outside [0, {num_tokens})"
    if not bool((keep.diff(dim=1) > 0).all()):
        return "kept list not strictly ascending"
    return None


def kept_set_swaps(kernel_keep: torch.Tensor, ref_keep: torch.Tensor, ref_scores: torch.Tensor,
                   tolerance: dict) -> tuple[int, int]:
    """(tokens swapped inside the near-tie band, tokens swapped outside it), by the module docstring's rule.

    kernel_keep, ref_keep: valid kept lists (B, k); ref_scores: the reference's scores (B, N). A swap of
    one kept token for another counts once in each direction: a kept set that differs by one near-tie
    swap gives (2, 0).
    """
    batch, num_tokens = ref_scores.shape
    kernel_mask = torch.zeros(batch, num_tokens, dtype=torch.bool, device=ref_scores.device)
    kernel_mask.scatter_(1, kernel_keep, True)
    ref_mask = torch.zeros_like(kernel_mask).scatter_(1, ref_keep, True)
    swapped = kernel_mask ^ ref_mask
    kth_score = ref_scores.gather(1, ref_keep).min(dim=1, keepdim=True).values
    band = tolerance["atol"] / num_tokens + tolerance["rtol"] * kth_score.abs()
    near_tie = (ref_scores - kth_score).abs() <= band
    return int((swapped & near_tie).sum()), int((swapped & ~near_tie).sum())


def near_tie_band_size(ref_keep: torch.Tensor, ref_scores: torch.Tensor, tolerance: dict) -> int:
    """How many tokens of the batch lie inside the near-tie band: how much the kept-set check allows."""
    kth_score = ref_scores.gather(1, ref_keep).min(dim=1, keepdim=True).values
    band = tolerance["atol"] / ref_scores.shape[1] + tolerance["rtol"] * kth_score.abs()
    return int(((ref_scores - kth_score).abs() <= band).sum())


def recovery_differences(kernel_src: torch.Tensor, ref_src: torch.Tensor, keep: torch.Tensor,
                         ref_map: torch.Tensor, tolerance: dict) -> tuple[int, int]:
    """(sources that differ within the similarity margin, sources that differ outside it) for images that
    share the kept list ``keep`` (B, k); sim[i, j] = ref_map[i, j] (the ``attention`` rule)."""
    num_kept, num_tokens = keep.shape[1], ref_src.shape[1]
    if ref_src.numel() == 0:
        return 0, 0
    if kernel_src.shape != ref_src.shape or kernel_src.min() < 0 or kernel_src.max() >= num_kept:
        return 0, ref_src.numel()

    def similarity_to_pick(src):
        return ref_map.float().gather(2, keep.gather(1, src).unsqueeze(-1)).squeeze(-1)

    kernel_sim, best_sim = similarity_to_pick(kernel_src), similarity_to_pick(ref_src)
    differ = kernel_src != ref_src
    kept_token = torch.zeros_like(differ).scatter_(1, keep, True)
    within_margin = kernel_sim >= best_sim - (tolerance["atol"] / num_tokens + tolerance["rtol"] * best_sim.abs())
    outside = differ & (kept_token | ~within_margin)
    return int((differ & ~outside).sum()), int(outside.sum())


# --- the checks ------------------------------------------------------------------------------------

def _timed_row(section: str, item: str, dtype: str, shape: str, device: torch.device,
               check: Callable[[], tuple[str | None, str]]) -> dict:
    """Run one check; a failure or an exception becomes a FAIL row and never stops the other checks."""
    start = time.perf_counter()
    try:
        failure, note = check()
        _synchronize(device)
    except Exception as exc:  # noqa: BLE001 - reported in the row
        failure, note = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}", ""
    ms = (time.perf_counter() - start) * 1e3
    return row(section, item, dtype, shape, "ok" if failure is None else f"FAIL: {failure}", ms, note)


def check_rows(
    shapes: list[BlockShape],
    dtypes: list[torch.dtype],
    device: torch.device | str,
    backend: str,
    *,
    prune_ratio: float,
    iterations: int,
    seed: int,
) -> Iterator[dict]:
    """Every op check and the chain check at each shape and dtype, one row each as it finishes.

    ``backend`` is the one under test (``kernel_backend``); ``prune_ratio`` and ``iterations`` set k and
    K as a preset does. ``ms`` is the check's wall time, compiles and reference included.
    """
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for shape in shapes:
        num_keep = num_kept_tokens(shape.tokens, prune_ratio)
        yield _timed_row("checks", "topk_keep_indices", "float32", f"{shape.batch}x{shape.tokens}", device,
                         lambda: _check_topk(shape, num_keep, device, backend, generator))
        for dtype in dtypes:
            # The scores carry the map's rounding too: fp16 on the Triton path, whatever the inputs.
            score_tolerance = _map_tolerance(dtype, torch.float16 if backend == "triton" else torch.float32)
            checks = {
                "attention_with_lse": lambda: _check_attention(shape, dtype, device, backend, generator),
                "head_mean_attention_map": lambda: _check_map(shape, dtype, device, backend, iterations, generator),
                "gwpr_scores": lambda: _check_gwpr(shape, dtype, device, backend, iterations, generator),
                "recovery_source": lambda: _check_recovery(shape, num_keep, dtype, device, backend, iterations, generator),
                "gather_tokens": lambda: _check_gather(shape, num_keep, dtype, device, backend, generator),
                "scatter_recover": lambda: _check_scatter(shape, num_keep, dtype, device, backend, generator),
                "chain": lambda: _check_chain(shape, num_keep, dtype, device, backend, iterations, score_tolerance,
                                              generator),
            }
            for item, check in checks.items():
                if _interpreter_lacks(dtype, device, backend):
                    yield row("checks", item, dtype_name(dtype), shape.label, f"skipped: {INTERPRETER_LACKS_BF16}")
                else:
                    yield _timed_row("checks", item, dtype_name(dtype), shape.label, device, check)


def _interpreter_lacks(dtype: torch.dtype, device: torch.device, backend: str) -> bool:
    return backend == "triton" and device.type == "cpu" and dtype == torch.bfloat16


def _check_attention(shape, dtype, device, backend, generator):
    q, k, v = attention_inputs(shape, dtype, device, generator)
    out, lse = _kernel_attention(q, k, v, backend)
    ref_out, ref_lse = attention_with_lse_ref(q.float(), k.float(), v.float())
    tolerance = TOLERANCES[dtype]
    return _within(max(tolerance_ratio(out, ref_out, tolerance), tolerance_ratio(lse, ref_lse, tolerance)))


def _map_tolerance(dtype: torch.dtype, map_dtype: torch.dtype) -> dict:
    """The coarser of the input dtype's and the map storage dtype's tolerance (an fp16 map of fp32 inputs
    carries fp16 rounding)."""
    return max(TOLERANCES[dtype], TOLERANCES[map_dtype], key=lambda tolerance: tolerance["atol"])


def eager_map(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Abar as plain PyTorch computes it in the inputs' dtype (softmax of a q k^T in that dtype), head by
    head into fp32: the error a kernel is allowed twice of."""
    total = torch.zeros(q.shape[0], q.shape[2], k.shape[2], dtype=torch.float32, device=q.device)
    for head in range(q.shape[1]):
        logits = torch.matmul(q[:, head] * q.shape[-1] ** -0.5, k[:, head].transpose(-1, -2))
        total += torch.softmax(logits, dim=-1).float()
    return total / q.shape[1]


def _check_map(shape, dtype, device, backend, iterations, generator):
    """Within the tolerance, or within twice the error of PyTorch's own computation in the dtype (the
    FlashAttention criterion): at SDXL-like logits a bf16 q k^T alone is off by up to 1.6x the bf16
    tolerance, and the CPU's one-pass map is exactly that computation."""
    q, k, v = attention_inputs(shape, dtype, device, generator)
    ref_lse = attention_with_lse_ref(q.float(), k.float(), v.float())[1]
    layer_map = _kernel_map(q, k, v, ref_lse, backend, iterations)
    ref_map = head_mean_attention_map_ref(q.float(), k.float(), ref_lse)
    tolerance = _map_tolerance(dtype, layer_map.dtype)
    ratio = tolerance_ratio(layer_map, ref_map, tolerance, 1 / shape.tokens)
    note = f"max err {ratio:.2g} x tol; {dtype_name(layer_map.dtype)} map"
    if ratio <= 1.0:
        return None, note
    own_ratio = tolerance_ratio(eager_map(q, k), ref_map, tolerance, 1 / shape.tokens)
    note += f"; PyTorch's own {dtype_name(dtype)} map: {own_ratio:.2g} x tol"
    return (None if ratio <= 2 * own_ratio else f"error {ratio:.3g} x the tolerance, over 2x PyTorch's own"), note


def _check_gwpr(shape, dtype, device, backend, iterations, generator):
    q, k, v = attention_inputs(shape, dtype, device, generator)
    ref_lse = attention_with_lse_ref(q.float(), k.float(), v.float())[1]
    layer_map = _kernel_map(q, k, v, ref_lse, backend, iterations)
    scores = gwpr_scores(q, k, ref_lse, iterations, attention_map=layer_map, backend=backend)
    ref_scores = gwpr_scores_ref(q.float(), k.float(), ref_lse, iterations)
    failure, note = _within(tolerance_ratio(scores, ref_scores, _map_tolerance(dtype, layer_map.dtype), 1 / shape.tokens))
    return failure, f"{note}; K={iterations} over the layer's map"


def _random_scores(shape, device, generator):
    # Rounded through bf16 so that exact ties occur: both sides must break them toward the lower index.
    return torch.rand(shape.batch, shape.tokens, device=device, generator=generator).to(torch.bfloat16).float()


def _check_topk(shape, num_keep, device, backend, generator):
    scores = _random_scores(shape, device, generator)
    failure, note = _count_differences(_kernel_topk(scores, num_keep, backend), topk_keep_indices_ref(scores, num_keep))
    return failure, f"{note}; k={num_keep}, tied scores"


def _random_keep(shape, num_keep, device, generator):
    return topk_keep_indices_ref(_random_scores(shape, device, generator), num_keep)


def _check_recovery(shape, num_keep, dtype, device, backend, iterations, generator):
    q, k, v = attention_inputs(shape, dtype, device, generator)
    ref_lse = attention_with_lse_ref(q.float(), k.float(), v.float())[1]
    layer_map = _kernel_map(q, k, v, ref_lse, backend, iterations)
    keep = _random_keep(shape, num_keep, device, generator)
    expected = recovery_source_ref(keep, shape.tokens, SIMILARITY, layer_map)
    failure, note = _count_differences(_kernel_recovery_source(keep, shape.tokens, layer_map, backend), expected)
    return failure, f"{note}; over the layer's own {dtype_name(layer_map.dtype)} map"


def _check_gather(shape, num_keep, dtype, device, backend, generator):
    hidden = torch.randn(shape.batch, shape.tokens, shape.channels, device=device, generator=generator).to(dtype)
    keep = _random_keep(shape, num_keep, device, generator)
    failure, note = _count_differences(_kernel_row_gather(hidden, keep, backend, "gather"), gather_tokens_ref(hidden, keep))
    return failure, f"{note}; {num_keep} of {shape.tokens} rows, C={shape.channels}"


def _check_scatter(shape, num_keep, dtype, device, backend, generator):
    kept = torch.randn(shape.batch, num_keep, shape.channels, device=device, generator=generator).to(dtype)
    src = torch.randint(0, num_keep, (shape.batch, shape.tokens), device=device, generator=generator)
    failure, note = _count_differences(_kernel_row_gather(kept, src, backend, "scatter"), scatter_recover_ref(kept, src))
    return failure, f"{note}; {shape.tokens} rows from {num_keep}, C={shape.channels}"


def _check_chain(shape, num_keep, dtype, device, backend, iterations, tolerance, generator):
    """Pruning-layer attention + plan on the kernel path against the fp32 reference chain."""
    q, k, v = attention_inputs(shape, dtype, device, generator)
    _, lse, layer_map = pruning_layer(q, k, v, backend, iterations)
    keep, src = plan_token_pruning(q, k, lse, num_keep, iterations=iterations, similarity=SIMILARITY,
                                   attention_map=layer_map, backend=backend)
    q32, k32 = q.float(), k.float()
    ref_lse = attention_with_lse_ref(q32, k32, v.float())[1]
    ref_map = head_mean_attention_map_ref(q32, k32, ref_lse)
    ref_keep, ref_src = plan_token_pruning(q32, k32, ref_lse, num_keep, iterations=iterations, similarity=SIMILARITY,
                                           attention_map=ref_map, backend="torch")
    problem = keep_list_problem(keep, shape.tokens, num_keep)
    if problem:
        return problem, ""
    ref_scores = gwpr_power_iteration_ref(ref_map, iterations)
    near_swaps, far_swaps = kept_set_swaps(keep, ref_keep, ref_scores, tolerance)
    note = (f"k={num_keep}: {near_swaps // 2} near-tie swaps (band holds "
            f"{near_tie_band_size(ref_keep, ref_scores, tolerance)} tokens)")
    if far_swaps:
        return f"{far_swaps} tokens swapped outside the near-tie band", note
    agree = keep.eq(ref_keep).all(dim=1)
    near_sources, far_sources = recovery_differences(src[agree], ref_src[agree], ref_keep[agree], ref_map[agree], tolerance)
    note += f"; sources on {int(agree.sum())}/{shape.batch} images: {near_sources} near-tie picks"
    if far_sources:
        return f"{far_sources} recovery sources outside the similarity margin", note
    return None, note


# --- per-block pipeline timing ---------------------------------------------------------------------

def block_rows(
    shapes: list[BlockShape],
    dtypes: list[torch.dtype],
    device: torch.device | str,
    backend: str,
    *,
    prune_ratio: float,
    iterations: int,
    seed: int,
) -> Iterator[dict]:
    """ms of each stage of one pruning block (median after warm-up, ``timing_rounds``), and AT-EDM's
    overhead: the pruning layer's attention beyond plain SDPA, plus plan, gather and copy."""
    device = torch.device(device)
    warmup, repeats = timing_rounds(device, backend)
    generator = torch.Generator(device=device).manual_seed(seed)
    for shape in shapes:
        for dtype in dtypes:
            name = dtype_name(dtype)
            if _interpreter_lacks(dtype, device, backend):
                yield row("block", "pipeline", name, shape.label, f"skipped: {INTERPRETER_LACKS_BF16}")
                continue
            try:
                stages = _block_stages(shape, dtype, device, backend, prune_ratio, iterations, generator)
            except Exception as exc:  # noqa: BLE001 - reported in the row
                yield row("block", "pipeline", name, shape.label, f"FAIL: {type(exc).__name__}: {exc}")
                continue
            timed = {}
            for item, (fn, note) in stages.items():
                try:
                    timed[item] = median_ms(fn, device, warmup, repeats)
                except Exception as exc:  # noqa: BLE001 - reported in the row
                    yield row("block", item, name, shape.label, f"FAIL: {type(exc).__name__}: {exc}", note=note)
                    continue
                yield row("block", item, name, shape.label, "ok", timed[item], note)
            yield _overhead_row(timed, name, shape)


def timing_rounds(device: torch.device, backend: str) -> tuple[int, int]:
    """(warm-up calls, timed calls) per stage. A GPU stage takes well under a millisecond at 1024 px, so
    20 calls cost nothing; a CPU stage at 512 px up to a second; under the interpreter the time measures
    nothing but that the code runs, and one call of the plan takes over a second at tiny shapes."""
    if device.type == "cuda":
        return 5, 20
    return (0, 1) if backend == "triton" else (1, 5)


def _block_stages(shape, dtype, device, backend, prune_ratio, iterations, generator) -> dict:
    """{item: (callable, note)} over ``TIMING_INPUT_SETS`` alternating input sets."""
    num_keep = num_kept_tokens(shape.tokens, prune_ratio)
    sets = []
    for _ in range(TIMING_INPUT_SETS):
        q, k, v = attention_inputs(shape, dtype, device, generator)
        _, lse, layer_map = pruning_layer(q, k, v, backend, iterations)
        keep, src = plan_token_pruning(q, k, lse, num_keep, iterations=iterations, similarity=SIMILARITY,
                                       attention_map=layer_map, backend=backend)
        if layer_map is None and materialize_attention_map(shape.batch, shape.heads, shape.tokens, iterations):
            map_dtype = torch.float16 if backend == "triton" else torch.float32
            layer_map = head_mean_attention_map(q, k, lse, out_dtype=map_dtype, backend=backend)
        hidden = torch.randn(shape.batch, shape.tokens, shape.channels, device=device, generator=generator).to(dtype)
        sets.append(dict(q=q, k=k, v=v, lse=lse, map=layer_map, keep=keep, src=src, hidden=hidden,
                         kept=hidden[:, :num_keep].contiguous()))
    calls = {"count": -1}

    def inputs() -> dict:
        calls["count"] += 1
        return sets[calls["count"] % len(sets)]

    one_pass = sets[0]["lse"] is None
    attention_item = "attention_with_map" if one_pass else "attention_with_lse"

    def layer_attention():
        s = inputs()
        return attention_with_map(s["q"], s["k"], s["v"]) if one_pass else attention_with_lse(s["q"], s["k"], s["v"], backend=backend)

    def plan():
        s = inputs()
        return plan_token_pruning(s["q"], s["k"], s["lse"], num_keep, iterations=iterations, similarity=SIMILARITY,
                                  attention_map=s["map"] if one_pass else None, backend=backend)

    def match():
        s = inputs()
        recompute = {} if s["map"] is not None else dict(keys=s["k"], queries=s["q"], lse=s["lse"])
        return recovery_source(s["keep"], shape.tokens, SIMILARITY, attention_map=s["map"], backend=backend, **recompute)

    def sdpa():
        s = inputs()
        return torch.nn.functional.scaled_dot_product_attention(s["q"], s["k"], s["v"])

    def gather():
        s = inputs()
        return gather_tokens(s["hidden"], s["keep"], backend=backend)

    def copy():
        s = inputs()
        return scatter_recover(s["kept"], s["src"], backend=backend)

    return {
        "sdpa": (sdpa, "plain attention: what the layer costs unpruned"),
        attention_item: (layer_attention, "the pruning layer's attention" + (" + its map (one pass)" if one_pass else " + lse")),
        "plan_token_pruning": (plan, f"map + G-WPR K={iterations} + top-k + recovery match, k={num_keep}"),
        "recovery_source": (match, "the recovery match alone (inside the plan)"),
        "gather_tokens": (gather, f"{num_keep} of {shape.tokens} rows, C={shape.channels}"),
        "scatter_recover": (copy, f"{shape.tokens} rows from {num_keep}"),
    }


def _overhead_row(timed: dict, dtype: str, shape: BlockShape) -> dict:
    attention_item = "attention_with_map" if "attention_with_map" in timed else "attention_with_lse"
    needed = ("sdpa", attention_item, "plan_token_pruning", "gather_tokens", "scatter_recover")
    if not all(item in timed for item in needed):
        return row("block", "overhead", dtype, shape.label, "skipped: a stage failed")
    overhead = (max(0.0, timed[attention_item] - timed["sdpa"]) + timed["plan_token_pruning"]
                + timed["gather_tokens"] + timed["scatter_recover"])
    return row("block", "overhead", dtype, shape.label, "ok", overhead,
               f"{100 * overhead / timed['sdpa']:.1f}% of SDPA: attention excess + plan + gather + copy")

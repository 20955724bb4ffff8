"""Inputs of the op tests, in one place: the device and dtypes, random Q/K/V and their lse, kept indices,
tie-free scores and the near-tie guards of the recovery match and of a top-k boundary, memory layouts
(permuted, strided and expanded views over NaN-filled storage), outputs that start poisoned, and spies on
the launchers (which kernels a call reached).

Random values come from ``generator`` where one is given (the fuzz tests draw a seed; a CPU generator gives
the same values on every device) and otherwise from the global RNG of the device the tensor lives on (the
unit tests, seeded per test by conftest).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from conftest import requires_cuda
from hypothesis import strategies as st

from atedm_kernels import attention_with_lse_ref, topk_keep_indices_ref
from atedm_kernels.recovery import _recovery_source_into, _similarity_to_kept
from atedm_kernels.topk_gather import _gather_rows_into, _topk_keep_indices_into

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
# bf16 on CUDA only: the interpreter computes garbage in bf16. FLOAT_DTYPES for hypothesis to draw from,
# DTYPES for pytest.mark.parametrize (off CUDA the bf16 cases show up as skipped).
FLOAT_DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if ON_CUDA else ())
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=requires_cuda)]
MAP_RULES = ("attention", "attention_transposed", "symmetric")
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # conftest sets it off CUDA


def dot_kernel_runs(dtype: torch.dtype) -> bool:
    """Whether backend="triton" launches the kernels that multiply tiles with tl.dot (attention, the map,
    G-WPR without a map or per head, the recompute and key-cosine matches) for inputs of ``dtype``. The
    documented routing (atedm_kernels._dispatch): compiled for a GPU, fp32 takes the PyTorch path; the
    interpreter runs every dtype. Tests that draw fp32 assert this instead of comparing the reference with
    itself."""
    return not (ON_CUDA and not INTERPRETED and dtype == torch.float32)


# For a test of one dtype that must reach those kernels: fp32 where it does, else fp16.
DOT_KERNEL_DTYPE = torch.float32 if dot_kernel_runs(torch.float32) else torch.float16

# ---------------------------------------------------------------- random values


def _draw(sampler, shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """``sampler(shape)`` from ``generator`` where it lives, else from ``device``'s global RNG; on ``device``."""
    return sampler(shape, generator=generator, device=device if generator is None else generator.device).to(device)


def random_normal(shape, dtype=torch.float32, *, generator=None, amplitude=1.0, device=DEVICE) -> torch.Tensor:
    """Standard normal values times ``amplitude``, drawn in fp32 and then cast to ``dtype``."""
    return (_draw(torch.randn, shape, generator, device) * amplitude).to(dtype)


def random_row_stochastic(batch: int, n: int, *, generator=None, device=DEVICE) -> torch.Tensor:
    """(B, N, N) fp32 rows of positive entries (at least 0.05 before normalizing) that sum to 1."""
    amap = _draw(torch.rand, (batch, n, n), generator, device) + 0.05
    return amap / amap.sum(dim=-1, keepdim=True)


def random_permutations(rows: int, n: int, *, generator=None) -> torch.Tensor:
    """(rows, n) int64 on the CPU: each row a random permutation of 0..n-1."""
    return torch.stack([torch.randperm(n, generator=generator) for _ in range(rows)])


def row_lse(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The fp32 row log-sum-exp of softmax(scale q k^T): what a self-attention layer hands to the pruning ops."""
    return attention_with_lse_ref(q, k, k, scale)[1]


def _random_qk(batch, heads, n_q, n_k, head_dim, dtype, generator, sharp, device, q_layout, k_layout):
    q = random_normal((batch, heads, n_q, head_dim), dtype, generator=generator, amplitude=sharp, device=device)
    k = random_normal((batch, heads, n_k, head_dim), dtype, generator=generator, device=device)
    return laid_out(q, q_layout), laid_out(k, k_layout)


def random_qkv(batch, heads, n_q, n_k, head_dim, dtype=torch.float32, *, generator=None, sharp=1.0, device=DEVICE,
               q_layout=None, k_layout=None, v_layout=None):
    """Standard normal (B, H, N, d) queries (times ``sharp``: 4 makes the softmax peaky, logits up to ~30),
    keys and values, each laid out as given (None: contiguous)."""
    q, k = _random_qk(batch, heads, n_q, n_k, head_dim, dtype, generator, sharp, device, q_layout, k_layout)
    v = random_normal((batch, heads, n_k, head_dim), dtype, generator=generator, device=device)
    return q, k, laid_out(v, v_layout)


def random_q_k_lse(batch, heads, n_q, n_k, head_dim, dtype=torch.float32, scale=None, *, generator=None, sharp=1.0,
                   device=DEVICE, q_layout=None, k_layout=None, lse_layout=None):
    """Queries and keys as ``random_qkv`` draws them (no values), and the lse of their attention."""
    q, k = _random_qk(batch, heads, n_q, n_k, head_dim, dtype, generator, sharp, device, q_layout, k_layout)
    return q, k, laid_out(row_lse(q, k, scale), lse_layout)


def random_keep(batch: int, n: int, k: int, *, generator=None) -> torch.Tensor:
    """(B, k) ascending kept indices, as top-k hands them over: a uniformly random k-subset per image."""
    return topk_keep_indices_ref(_draw(torch.randn, (batch, n), generator, DEVICE), k)


def tie_free_scores(batch: int, n: int, *, generator=None) -> torch.Tensor:
    """(B, N) fp32: each row a random permutation of distinct multiples of 1/8 centred on 0, exact in fp32
    and, while N <= 4096 (|x| <= 256), in fp16."""
    return ((random_permutations(batch, n, generator=generator).float() - n / 2) * 0.125).to(DEVICE)


# ---------------------------------------------------------------- near ties of the recovery match

# Relative gap between a row's best and second-best kept similarity below which a match that rounds
# differently from the reference (the recompute and cosine kernels: fp32 dots summed in another order, ~1e-6)
# may legitimately pick the other one.
NEAR_TIE_MARGIN = 1e-4


def tie_safe_rows(keep, num_tokens: int, rule: str, margin=NEAR_TIE_MARGIN, attention_map=None, keys=None,
                  **recompute) -> torch.Tensor:
    """(B, N) bool: rows whose reference match cannot flip under relative errors below ``margin``. Kept rows
    take their own rank whatever the similarity; with one kept token every row is safe."""
    sim = _similarity_to_kept(slice(0, num_tokens), keep, rule, attention_map, keys, **recompute)
    safe = torch.ones(sim.shape[:2], dtype=torch.bool, device=sim.device)
    if sim.shape[-1] >= 2:
        top2 = sim.topk(2, dim=-1).values
        safe = (top2[..., 0] - top2[..., 1]) > margin * top2[..., 0].abs().clamp_min(1e-30)
    return safe.scatter(1, keep, True)


def tie_safe_keep_count(scores: torch.Tensor, wanted: int, band) -> int:
    """The keep count nearest ``wanted`` at which no image's top-k boundary is a near tie: the k-th and
    (k+1)-th reference scores differ by more than twice ``band(score)``, the error each side may carry.
    N (keep everything) is always safe."""
    ordered = scores.sort(dim=-1, descending=True).values.double()
    n = ordered.shape[-1]
    gaps = ordered[:, :-1] - ordered[:, 1:]  # gaps[:, j]: between the (j+1)-th and (j+2)-th best
    safe = (gaps > 2 * band(ordered[:, :-1])).all(dim=0).tolist() + [True]  # safe[c - 1]: keep count c
    return min((c for c in range(1, n + 1) if safe[c - 1]), key=lambda c: (abs(c - wanted), c))


# ---------------------------------------------------------------- memory layouts


@dataclass(frozen=True)
class Layout:
    """Where a logical tensor lives: storage dim i holds logical dim ``order[i]``; logical dim d is taken
    from ``offsets[d]`` with a step of ``steps[d]``; the dims in ``expanded`` broadcast one slice (stride 0)."""

    order: tuple
    steps: tuple
    offsets: tuple
    expanded: tuple = ()

    @staticmethod
    def contiguous(ndim: int) -> Layout:
        return Layout(tuple(range(ndim)), (1,) * ndim, (0,) * ndim)


DIFFUSERS_LAYOUT = Layout((0, 2, 1, 3), (1,) * 4, (0,) * 4)  # (B, N, H, d) storage seen as (B, H, N, d)


@st.composite
def layouts(draw, ndim: int, expandable: tuple = ()):
    identity = tuple(range(ndim))
    kinds = ("contiguous", "diffusers", "strided", "strided") if ndim == 4 else ("contiguous", "strided", "strided")
    kind = draw(st.sampled_from(kinds))
    if kind == "contiguous":
        return Layout.contiguous(ndim)
    if kind == "diffusers":
        return DIFFUSERS_LAYOUT
    order = tuple(draw(st.permutations(identity)))
    steps = tuple(draw(st.lists(st.sampled_from((1, 1, 2, 3)), min_size=ndim, max_size=ndim)))
    offsets = tuple(draw(st.lists(st.integers(0, 2), min_size=ndim, max_size=ndim)))
    expanded = tuple(d for d in expandable if draw(st.integers(0, 3)) == 0)
    return Layout(order, steps, offsets, expanded)


def gap_fill(dtype: torch.dtype):
    """The poison of storage gaps and outputs. bool has no value outside the data (True it is): unwritten
    rows show up in the float and int cases of the same kernel."""
    return float("nan") if dtype.is_floating_point else (-7 if dtype != torch.bool else True)


@dataclass
class Placed:
    """A view laid out as a Layout says, with the storage around it and the view's footprint in it."""

    view: torch.Tensor
    storage: torch.Tensor
    footprint: torch.Tensor

    def assert_outside_untouched(self, fill) -> None:
        outside = self.storage[~self.footprint]
        untouched = outside.isnan() if isinstance(fill, float) and math.isnan(fill) else outside == fill
        assert untouched.all(), "a kernel wrote outside its output view"


def place(values: torch.Tensor, layout: Layout | None = None, fill=None) -> Placed:
    """``values`` (logical shape) copied into a view with ``layout`` (None: contiguous); the rest of the
    storage holds ``fill`` (NaN for floats by default). Expanded dims keep values' first slice along them."""
    layout = Layout.contiguous(values.dim()) if layout is None else layout
    fill = gap_fill(values.dtype) if fill is None else fill
    shape = values.shape
    for d in layout.expanded:
        values = values.narrow(d, 0, 1)
    padded = [values.shape[d] * layout.steps[d] + layout.offsets[d] for d in range(values.dim())]
    inverse = [layout.order.index(d) for d in range(values.dim())]
    storage = torch.full([padded[d] for d in layout.order], fill, dtype=values.dtype, device=values.device)
    footprint = torch.zeros(storage.shape, dtype=torch.bool, device=values.device)
    window = tuple(slice(o, o + n * s, s) for o, n, s in zip(layout.offsets, values.shape, layout.steps))
    view = storage.permute(inverse)[window]
    view.copy_(values)
    footprint.permute(inverse)[window] = True
    return Placed(view.expand(shape), storage, footprint)


def laid_out(values: torch.Tensor, layout: Layout | None) -> torch.Tensor:
    """``values`` in ``layout``; None leaves them as they are."""
    return values if layout is None else place(values, layout).view


# ---------------------------------------------------------------- launches into poisoned outputs
# The launcher writes into an output that starts as -1 (indices) or the gap fill (copies) and is laid out
# as given, so an element it leaves unwritten, or one it writes outside the view, fails the test.


def poisoned_topk(scores: torch.Tensor, k: int, layout: Layout | None = None) -> torch.Tensor:
    out = place(torch.full((scores.shape[0], k), -1, dtype=torch.int64, device=scores.device), layout, fill=-7)
    _topk_keep_indices_into(out.view, scores, k)
    out.assert_outside_untouched(-7)
    return out.view


def poisoned_row_copy(rows: torch.Tensor, index: torch.Tensor, layout: Layout | None = None) -> torch.Tensor:
    """out[b, r] = rows[b, index[b, r]]: the gather's and the refill's kernel."""
    fill = gap_fill(rows.dtype)
    shape = (*index.shape, rows.shape[-1])
    out = place(torch.full(shape, fill, dtype=rows.dtype, device=rows.device), layout, fill=fill)
    _gather_rows_into(out.view, rows, index)
    out.assert_outside_untouched(fill)
    return out.view


def poisoned_source(keep, num_tokens: int, rule: str, attention_map=None, keys=None, queries=None, lse=None,
                    scale=None, layout: Layout | None = None) -> torch.Tensor:
    src = place(torch.full((keep.shape[0], num_tokens), -1, dtype=torch.int64, device=keep.device), layout, fill=-7)
    _recovery_source_into(src.view, keep, num_tokens, rule, attention_map, keys, queries, lse, scale)
    src.assert_outside_untouched(-7)
    return src.view


# ---------------------------------------------------------------- spies on the launchers


@contextmanager
def spy(module, name: str):
    """Record each call of ``module.name`` as (args, kwargs) while the block runs; the call still happens.
    Patches the module's global, so calls made through that name (inside custom ops too) are seen."""
    calls = []
    real = getattr(module, name)

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    with mock.patch.object(module, name, recording):
        yield calls


def assert_dot_routing(launches: list, dtype: torch.dtype, expected: int = 1) -> None:
    """A tl.dot op called with backend="triton" (its launcher spied on) launched its kernel ``expected``
    times, or not at all where fp32 takes the PyTorch path (``dot_kernel_runs``): on a GPU an fp32 case
    then checks that routing, not a kernel."""
    assert len(launches) == (expected if dot_kernel_runs(dtype) else 0), (len(launches), dtype)

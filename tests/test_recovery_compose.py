"""Recovery across pruning layers: composing the per-layer sources and the delta refill, against naive loops."""

import pytest
import torch
from op_inputs import DEVICE, DTYPES
from tolerances import tol

from atedm_kernels import (
    compose_sources,
    compose_sources_ref,
    recovery_source_ref,
    scatter_recover,
    scatter_recover_delta,
    scatter_recover_delta_ref,
    topk_keep_indices_ref,
)
from atedm_kernels import recovery

# (B, widths): a stream of N = widths[0] tokens that pruning layer l cuts from widths[l] to widths[l + 1].
CHAINS = [(1, (37, 20, 11, 4)), (2, (101, 64, 64, 9, 1)), (2, (45, 17)), (1, (1, 1, 1))]


def _case(dtype_entry, backend: str):
    """(dtype, backend) from a dtype or a DTYPES entry, keeping that entry's marks."""
    dtype, marks = (dtype_entry.values[0], dtype_entry.marks) if hasattr(dtype_entry, "values") else (dtype_entry, ())
    return pytest.param(dtype, backend, marks=marks, id=f"{str(dtype)[6:]}-{backend}")


# The PyTorch path in every float dtype, the kernel in op_inputs' DTYPES (bf16 needs CUDA there).
DELTA_CASES = ([_case(dtype, "torch") for dtype in (torch.float32, torch.float16, torch.bfloat16)]
               + [_case(entry, "triton") for entry in DTYPES])


def random_chain(batch: int, widths: tuple[int, ...]) -> list[torch.Tensor]:
    """sources[l] (B, widths[l]) int64 in [0, widths[l + 1]): one source per pruning layer."""
    return [torch.randint(0, kept, (batch, received), device=DEVICE) for received, kept in zip(widths, widths[1:])]


def naive_compose(sources: list[torch.Tensor]) -> torch.Tensor:
    """Python loops: each token follows its source slot from layer to layer."""
    chain = [src.tolist() for src in sources]
    out = torch.empty(sources[0].shape, dtype=torch.int64)
    for b in range(out.shape[0]):
        for i in range(out.shape[1]):
            slot = chain[0][b][i]
            for later in chain[1:]:
                slot = later[b][slot]
            out[b, i] = slot
    return out


def naive_delta(kept_out, cut_state, cut_kept, src) -> torch.Tensor:
    """Python loops in float64: full[b, i] = cut_state[b, i] + kept_out[b, s] - cut_kept[b, s], s = src[b, i]."""
    kept_out, cut_state, cut_kept = kept_out.double().cpu(), cut_state.double().cpu(), cut_kept.double().cpu()
    out = torch.empty(cut_state.shape, dtype=torch.float64)
    for b in range(out.shape[0]):
        for i, slot in enumerate(src[b].tolist()):
            out[b, i] = cut_state[b, i] + (kept_out[b, slot] - cut_kept[b, slot])
    return out


def assert_within_tolerance(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """|actual - expected| <= atol + rtol |expected| elementwise, from the one tolerance table; NaN fails."""
    bound = tol(dtype)["atol"] + tol(dtype)["rtol"] * expected.abs()
    error = (actual.double().cpu() - expected).abs()
    assert bool((error <= bound).all()), f"worst excess over the tolerance: {(error - bound).nan_to_num(1e9).max()}"


def uniform(shape, dtype) -> torch.Tensor:
    """Entries in [-1, 1): |kept_out - cut_kept| <= 2 keeps two roundings in the dtype inside its tolerance."""
    return (torch.rand(shape, device=DEVICE) * 2 - 1).to(dtype)


# ---------------------------------------------------------------- compose_sources


@pytest.mark.parametrize("batch, widths", CHAINS)
def test_compose_matches_naive_loops(batch, widths):
    sources = random_chain(batch, widths)
    expected = naive_compose(sources)
    composed = compose_sources(sources)
    assert composed.dtype == torch.int64 and composed.shape == (batch, widths[0])
    assert torch.equal(composed.cpu(), expected)
    assert torch.equal(compose_sources_ref(sources).cpu(), expected)


def test_compose_of_real_matches_sends_kept_tokens_to_their_last_rank():
    """Sources from the recovery match of three pruning layers: a token kept by every layer must land on its
    own rank in the last layer's kept list, and every other token on some kept token of the last layer."""
    batch, widths = 2, (61, 33, 19, 7)
    sources, survivors = [], torch.arange(widths[0], device=DEVICE).expand(batch, -1)
    for received, kept in zip(widths, widths[1:]):
        keep = topk_keep_indices_ref(torch.randn(batch, received, device=DEVICE), kept)
        attention_map = torch.rand(batch, received, received, device=DEVICE)
        sources.append(recovery_source_ref(keep, received, attention_map=attention_map))
        survivors = torch.gather(survivors, 1, keep)  # full-grid index of each kept token, in rank order
    composed = compose_sources(sources)
    last_rank = torch.arange(widths[-1], device=DEVICE).expand(batch, -1)
    assert torch.equal(torch.gather(composed, 1, survivors), last_rank)
    assert torch.equal(composed.cpu(), naive_compose(sources))


def test_compose_validation_errors():
    good = random_chain(2, (9, 5, 3))
    cases = [
        ([], "at least one pruning layer"),
        ([good[0][0], good[1]], r"sources\[0\] must be \(B, width\) int64"),
        ([good[0], good[1].int()], r"sources\[1\] must be \(B, width\) int64"),
        ([good[0], good[1][:1]], r"sources\[1\] must be \(B, width\) int64 with the batch B of sources\[0\]"),
        ([good[0], torch.zeros(2, 10, dtype=torch.int64, device=DEVICE)], "be 1 to the 9 tokens it received; got 10"),
        ([good[0], torch.zeros(2, 0, dtype=torch.int64, device=DEVICE)], "be 1 to the 9 tokens it received; got 0"),
        ([good[0], good[1].to("meta")], "all tensors must be on one device"),
    ]
    for sources, message in cases:
        with pytest.raises(ValueError, match=message):
            compose_sources(sources)


# ---------------------------------------------------------------- scatter_recover_delta


@pytest.mark.parametrize("dtype, backend", DELTA_CASES)
@pytest.mark.parametrize("batch, num_tokens, k, channels", [(1, 37, 13, 5), (2, 101, 40, 33), (2, 9, 9, 1)])
def test_delta_matches_naive_loops(batch, num_tokens, k, channels, dtype, backend, monkeypatch):
    kept_out, cut_kept = uniform((batch, k, channels), dtype), uniform((batch, k, channels), dtype)
    cut_state = uniform((batch, num_tokens, channels), dtype)
    src = torch.randint(0, k, (batch, num_tokens), device=DEVICE)
    copies = []

    def poisoned_copy(full, kept, index):
        copies.append(full.shape)
        return real_copy(full.fill_(float("nan")), kept, index)  # a row the kernel skips stays NaN

    real_copy = recovery._gather_rows_into
    monkeypatch.setattr(recovery, "_gather_rows_into", poisoned_copy)
    full = scatter_recover_delta(kept_out, cut_state, cut_kept, src, backend=backend)
    assert copies == ([(batch, num_tokens, channels)] if backend == "triton" else [])
    assert full.dtype == dtype and full.shape == (batch, num_tokens, channels)
    assert_within_tolerance(full, naive_delta(kept_out, cut_state, cut_kept, src), dtype)
    # The spec, and the expression the integration computed inline before this op existed, to the bit.
    assert torch.equal(full, scatter_recover_delta_ref(kept_out, cut_state, cut_kept, src))
    assert torch.equal(full, cut_state + scatter_recover(kept_out - cut_kept, src, backend=backend))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_delta_gives_kept_tokens_their_final_value(backend):
    """At a real cut, cut_kept = cut_state[keep]: a kept token's own state cancels and it gets kept_out."""
    batch, num_tokens, k, channels = 2, 53, 20, 7
    keep = topk_keep_indices_ref(torch.randn(batch, num_tokens, device=DEVICE), k)
    cut_state = uniform((batch, num_tokens, channels), torch.float32)
    cut_kept = torch.gather(cut_state, 1, keep.unsqueeze(-1).expand(-1, -1, channels))
    kept_out = uniform((batch, k, channels), torch.float32)
    src = recovery_source_ref(keep, num_tokens, attention_map=torch.rand(batch, num_tokens, num_tokens, device=DEVICE))
    full = scatter_recover_delta(kept_out, cut_state, cut_kept, src, backend=backend)
    at_kept = torch.gather(full, 1, keep.unsqueeze(-1).expand(-1, -1, channels))
    assert_within_tolerance(at_kept, kept_out.double().cpu(), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_delta_validation_errors(backend):
    kept_out, cut_kept = torch.randn(2, 4, 3, device=DEVICE), torch.randn(2, 4, 3, device=DEVICE)
    cut_state, src = torch.randn(2, 7, 3, device=DEVICE), torch.randint(0, 4, (2, 7), device=DEVICE)
    shape_error = r"expected kept_out and cut_kept \(B, k, C\), cut_state \(B, N, C\) and src \(B, N\)"
    cases = [
        ((kept_out[0], cut_state, cut_kept[0], src), shape_error),
        ((kept_out, cut_state, cut_kept[:1], src), shape_error),  # would broadcast over the batch
        ((kept_out, cut_state[:, :6], cut_kept, src), shape_error),
        ((kept_out, cut_state[..., :2], cut_kept, src), shape_error),
        ((kept_out, cut_state, cut_kept, src[:1]), shape_error),
        ((kept_out, cut_state, cut_kept, src[0]), shape_error),
        ((kept_out, cut_state, cut_kept, src.to("meta")), "all tensors must be on one device"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            scatter_recover_delta(*args, backend=backend)


def test_no_graph_breaks_around_compose_and_delta():
    sources = random_chain(2, (40, 21, 9))
    kept_out, cut_kept = torch.randn(2, 9, 6, device=DEVICE), torch.randn(2, 9, 6, device=DEVICE)
    cut_state = torch.randn(2, 40, 6, device=DEVICE)

    def recover(sources, kept_out, cut_state, cut_kept):
        return scatter_recover_delta(kept_out, cut_state, cut_kept, compose_sources(sources), backend="triton")

    explanation = torch._dynamo.explain(recover)(sources, kept_out, cut_state, cut_kept)
    assert explanation.graph_break_count == 0, explanation.break_reasons

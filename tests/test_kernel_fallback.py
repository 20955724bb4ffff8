"""A kernel that fails on the user's GPU must not break a generation (backend="auto" warns once and runs the
op's PyTorch path), must raise under backend="triton", and fp32 must never reach the spilling exact-dot kernels.

On the CPU, "auto" resolves to PyTorch; these tests make it pick the Triton kernels under the interpreter
(``_dispatch.auto_picks_triton``) and inject a failure into one kernel launcher at a time.
"""

import warnings

import pytest
import torch
from conftest import requires_cuda
from op_inputs import random_qkv, row_lse
from tiny_models import run_unet, tiny_sdxl_unet, unet_inputs

import atedm
import atedm_kernels._dispatch as dispatch
import atedm_kernels.attention_lse as attention_lse
from atedm_kernels import (
    attention_with_lse,
    attention_with_lse_ref,
    gather_tokens,
    gather_tokens_ref,
    gwpr_scores,
    gwpr_scores_ref,
    head_mean_attention_map,
    head_mean_attention_map_ref,
    recovery_source,
    recovery_source_ref,
    scatter_recover,
    scatter_recover_ref,
    topk_keep_indices,
    topk_keep_indices_ref,
)

INJECTED = "injected: ptxas fatal: out of shared memory"


@pytest.fixture(autouse=True)
def fresh_failure_memory():
    dispatch._FAILED_KERNELS.clear()
    yield
    dispatch._FAILED_KERNELS.clear()


@pytest.fixture
def auto_picks_the_interpreter(monkeypatch):
    monkeypatch.setattr(dispatch, "auto_picks_triton", lambda tensors: True)


def _inject_failure(monkeypatch, module_name: str, launcher: str) -> dict:
    import importlib

    calls = {"n": 0}

    def broken(*args, **kwargs):
        calls["n"] += 1
        raise RuntimeError(INJECTED)

    monkeypatch.setattr(importlib.import_module(module_name), launcher, broken)
    return calls


def _operands():
    q, k, v = random_qkv(2, 3, 40, 40, 16, device="cpu")
    lse = row_lse(q, k)
    amap = head_mean_attention_map_ref(q, k, lse)
    scores = torch.randn(2, 40)
    keep = topk_keep_indices_ref(scores, 13)
    x = torch.randn(2, 40, 24)
    return dict(q=q, k=k, v=v, lse=lse, amap=amap, scores=scores, keep=keep, x=x,
                src=recovery_source_ref(keep, 40, "attention", amap))


# (op name in the warning, module and launcher to break, the op under a backend, its reference)
CASES = {
    "attention_with_lse": ("atedm_kernels.attention_lse", "_attention_with_lse_launch",
                           lambda t, b: attention_with_lse(t["q"], t["k"], t["v"], backend=b),
                           lambda t: attention_with_lse_ref(t["q"], t["k"], t["v"])),
    "head_mean_attention_map": ("atedm_kernels.attention_map", "_head_mean_attention_map_launch",
                                lambda t, b: head_mean_attention_map(t["q"], t["k"], t["lse"], backend=b),
                                lambda t: head_mean_attention_map_ref(t["q"], t["k"], t["lse"])),
    "gwpr_scores": ("atedm_kernels.gwpr", "_gwpr_scores_launch",
                    lambda t, b: gwpr_scores(t["q"], t["k"], t["lse"], 3, backend=b),
                    lambda t: gwpr_scores_ref(t["q"], t["k"], t["lse"], 3)),
    "topk_keep_indices": ("atedm_kernels.topk_gather", "_topk_keep_indices_into",
                          lambda t, b: topk_keep_indices(t["scores"], 13, backend=b),
                          lambda t: topk_keep_indices_ref(t["scores"], 13)),
    "gather_tokens": ("atedm_kernels.topk_gather", "_gather_rows_into",
                      lambda t, b: gather_tokens(t["x"], t["keep"], backend=b),
                      lambda t: gather_tokens_ref(t["x"], t["keep"])),
    "recovery_source": ("atedm_kernels.recovery", "_recovery_source_into",
                        lambda t, b: recovery_source(t["keep"], 40, "attention", t["amap"], backend=b),
                        lambda t: recovery_source_ref(t["keep"], 40, "attention", t["amap"])),
    "scatter_recover": ("atedm_kernels.recovery", "_gather_rows_into",
                        lambda t, b: scatter_recover(t["x"][:, :13], t["src"], backend=b),
                        lambda t: scatter_recover_ref(t["x"][:, :13], t["src"])),
}


@pytest.mark.parametrize("op", sorted(CASES))
def test_auto_falls_back_to_pytorch_and_warns_once(op, monkeypatch, auto_picks_the_interpreter):
    module_name, launcher, run, reference = CASES[op]
    operands = _operands()
    calls = _inject_failure(monkeypatch, module_name, launcher)
    with pytest.warns(RuntimeWarning) as caught:
        first = run(operands, "auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        second = run(operands, "auto")
    messages = [str(w.message) for w in caught if "atedm" in str(w.message)]
    assert len(messages) == 1
    assert op in messages[0] and INJECTED in messages[0] and "triton" in messages[0]
    assert calls["n"] == 1  # the broken kernel is not compiled again on every call
    expected = reference(operands)
    for got in (first, second):
        for got_part, expected_part in zip(got if isinstance(got, tuple) else (got,),
                                           expected if isinstance(expected, tuple) else (expected,)):
            assert torch.equal(got_part, expected_part)  # the fallback is the reference itself
    assert any(key[0].startswith(op) for key in dispatch.failed_kernels())


@pytest.mark.parametrize("op", sorted(CASES))
def test_triton_backend_raises_the_kernel_error(op, monkeypatch):
    module_name, launcher, run, _ = CASES[op]
    operands = _operands()
    _inject_failure(monkeypatch, module_name, launcher)
    with pytest.raises(RuntimeError, match="injected"):
        run(operands, "triton")
    assert not dispatch.failed_kernels()


def test_a_generation_survives_a_broken_kernel(monkeypatch, auto_picks_the_interpreter):
    """The tiny SDXL-shaped UNet under backend="auto" with a top-k kernel that cannot compile: it still
    prunes in every block, warns once, and gives what the PyTorch backend gives."""
    unet = tiny_sdxl_unet()
    inputs = unet_inputs(batch=2)
    atedm.apply(unet, prune_ratio=0.63, dsap_fraction=0.0, backend="torch")
    expected = run_unet(unet, inputs)

    _inject_failure(monkeypatch, "atedm_kernels.topk_gather", "_topk_keep_indices_into")
    atedm.apply(unet, prune_ratio=0.63, dsap_fraction=0.0, backend="auto")
    with pytest.warns(RuntimeWarning, match="topk_keep_indices") as caught:
        got = run_unet(unet, inputs)
    assert sum("atedm" in str(w.message) for w in caught) == 1  # one warning for 11 blocks' top-k
    assert atedm.get_state(unet).pruned_calls == 11
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3)

    atedm.apply(unet, prune_ratio=0.63, dsap_fraction=0.0, backend="triton")
    with pytest.raises(RuntimeError, match="injected"):
        run_unet(unet, inputs)


# --- fp32 on a GPU: never the spilling exact-dot kernels ------------------------------------------


def test_fp32_gpu_inputs_route_dot_kernels_to_pytorch(monkeypatch):
    """The routing rule itself; the CUDA test below checks that no dot kernel launches."""
    x = torch.randn(2, 3)
    assert not dispatch.exact_fp32_dot_on_gpu((x,))  # CPU tensors (and the interpreter) keep the kernels
    monkeypatch.setattr(dispatch, "exact_fp32_dot_on_gpu", lambda tensors: any(t.dtype == torch.float32 for t in tensors))
    monkeypatch.setattr(dispatch, "auto_picks_triton", lambda tensors: True)
    lse = torch.randn(2, 3)  # fp32 in every dtype: an input of the op, never a tl.dot operand
    for backend in ("auto", "triton"):
        assert dispatch.resolve_backend(backend, x, lse, dot_operands=(x,)) == "torch"
        assert dispatch.resolve_backend(backend, x, lse) == "triton"  # memory-bound kernels keep Triton
        assert dispatch.resolve_backend(backend, x.half(), lse, dot_operands=(x.half(),)) == "triton"


@pytest.mark.parametrize("op", ["map", "gwpr", "recompute_match", "cosine_match"])
def test_half_inputs_with_an_fp32_lse_reach_the_dot_kernels(op, monkeypatch):
    """The fp32 rule looks at the tl.dot operands only: the lse is fp32 for every dtype, and judging it
    would send every fp16/bf16 map, walk and match of a GPU to PyTorch. GPU routing simulated here."""
    import importlib

    from atedm_kernels import gwpr_scores, head_mean_attention_map, recovery_source

    monkeypatch.setattr(dispatch, "exact_fp32_dot_on_gpu", lambda tensors: any(t.dtype == torch.float32 for t in tensors))
    q, k = torch.randn(1, 2, 16, 8).half(), torch.randn(1, 2, 16, 8).half()
    lse = torch.logsumexp(q.float() @ k.float().transpose(-1, -2) * 8 ** -0.5, dim=-1)
    keep = torch.arange(0, 16, 2).unsqueeze(0)
    entry = {"map": ("atedm_kernels.attention_map", "_head_mean_attention_map_triton"),
             "gwpr": ("atedm_kernels.gwpr", "_gwpr_scores_triton"),
             "recompute_match": ("atedm_kernels.recovery", "_recovery_source_triton"),
             "cosine_match": ("atedm_kernels.recovery", "_recovery_source_triton")}[op]
    module = importlib.import_module(entry[0])
    launched = []
    original = getattr(module, entry[1])
    monkeypatch.setattr(module, entry[1], lambda *a, **kw: launched.append(1) or original(*a, **kw))
    if op == "map":
        head_mean_attention_map(q, k, lse, backend="triton")
    elif op == "gwpr":
        gwpr_scores(q, k, lse, iterations=2, backend="triton")
    elif op == "recompute_match":
        recovery_source(keep, 16, "attention", keys=k, queries=q, lse=lse, backend="triton")
    else:
        recovery_source(keep, 16, "key_cosine", keys=k, backend="triton")
    assert launched == [1]


@requires_cuda
def test_fp32_on_cuda_never_launches_a_dot_kernel(monkeypatch):
    import importlib

    from atedm_kernels import plan_token_pruning

    launched = []
    for module_name, launcher in [("atedm_kernels.attention_lse", "_attention_with_lse_launch"),
                                  ("atedm_kernels.attention_map", "_head_mean_attention_map_launch"),
                                  ("atedm_kernels.gwpr", "_weighted_column_sums")]:
        module = importlib.import_module(module_name)
        original = getattr(module, launcher)
        monkeypatch.setattr(module, launcher, lambda *a, _o=original, _n=launcher, **kw: launched.append(_n) or _o(*a, **kw))
    q, k, v = random_qkv(2, 4, 256, 256, 64)
    for backend in ("auto", "triton"):
        out, lse = attention_with_lse(q, k, v, backend=backend)
        ref_out, ref_lse = attention_with_lse_ref(q, k, v)
        torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
        keep, _ = plan_token_pruning(q, k, lse, 90, backend=backend)
        ref_keep, _ = plan_token_pruning(q, k, ref_lse, 90, backend="torch")
        assert torch.equal(keep, ref_keep)
    assert launched == []


# --- attention with lse from PyTorch's own fused kernels -----------------------------------------


def test_lse_providers_are_cuda_only_and_named():
    q = torch.randn(1, 2, 8, 16)
    assert attention_lse.available_lse_providers(q) == []
    with pytest.raises(ValueError, match="cannot run"):
        attention_with_lse(q, q, q, provider="flash")
    with pytest.raises(ValueError, match="unknown lse provider"):
        attention_with_lse(q, q, q, provider="xformers")


def test_a_provider_is_trusted_only_after_matching_the_reference(monkeypatch):
    """The first-use check: a provider whose lse is off (a changed layout or base in some torch release)
    is not used; a correct one is. Exercised with the CPU's fused kernel standing in for a CUDA one."""
    q = torch.randn(1, 2, 8, 32)
    monkeypatch.setattr(attention_lse, "_VALIDATED", {})
    monkeypatch.setitem(attention_lse._TORCH_FUSED, "flash", attention_lse._attention_with_lse_cpu_flash)
    assert attention_lse._provider_validated("flash", q)

    def log2_lse(q, k, v, scale):
        out, lse = attention_lse._attention_with_lse_cpu_flash(q, k, v, scale)
        return out, lse / 0.6931471805599453

    monkeypatch.setattr(attention_lse, "_VALIDATED", {})
    monkeypatch.setitem(attention_lse._TORCH_FUSED, "flash", log2_lse)
    assert not attention_lse._provider_validated("flash", q)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_available_provider_matches_the_reference(dtype):
    from tolerances import tol

    q, k, v = (torch.randn(2, 10, 4096 + 17, 64, device="cuda", dtype=dtype) for _ in range(3))
    ref_out, ref_lse = attention_with_lse_ref(q, k, v)
    providers = attention_lse.available_lse_providers(q)
    assert "triton" in providers
    for provider in providers:
        out, lse = attention_with_lse(q, k, v, provider=provider)
        assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
        torch.testing.assert_close(out.float(), ref_out.float(), **tol(dtype))
        torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=0)

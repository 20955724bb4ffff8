"""Attention output plus the row log-sum-exp, for the pruning layer's self-attention.

Math (per batch b, head h, query row i; ``d`` = head dim, ``scale`` = 1 / sqrt(d) by default)::

    S[i, j]  = scale * <q_i, k_j>
    lse[i]   = log(sum_j exp(S[i, j]))
    out[i]   = sum_j exp(S[i, j] - lse[i]) * v_j

Shapes: q (B, H, Nq, d), k and v (B, H, Nk, d) -> out (B, H, Nq, d) in q's dtype, lse (B, H, Nq) in fp32.

Why the log-sum-exp: fused attention never forms the probability map, but with ``lse`` any tile of it
can be rebuilt later as ``exp(S - lse)`` from Q and K alone. Every G-WPR quantity atedm needs is computed
that way (see ``attention_map.py`` and ``gwpr.py``), so the pruning layer pays for attention once, plus
one exp-bound pass for the scores.

Kernel (FlashAttention-2 forward). One program owns BLOCK_M query rows of one (batch, head) and walks the
keys in tiles of BLOCK_N with an online softmax in base 2 (running max ``m``, running sum ``l``, fp32
accumulator), so no N x N tensor ever exists; ``lse = ln2 * (m + log2 l)``. Grid: (cdiv(Nq, BLOCK_M),
B * H). Full key tiles run unmasked; a ragged last tile is masked with -inf scores, so any N works.

Providers on CUDA (``LSE_PROVIDERS``). PyTorch's own fused attention kernels (flash, memory-efficient,
cuDNN) compute the lse anyway and hand it out through their aten ops; on Hopper they beat a hand-written
FA2, so ``backend="auto"`` takes the first usable one of ``DEFAULT_CUDA_LSE_ORDER`` and keeps the Triton
kernel below as the fallback (and as the only provider under the interpreter). Each PyTorch provider is
checked once against the reference before first use (they are private ops whose output layout has moved
between releases), and one that fails at run time is skipped with a warning (``_dispatch.guarded_launch``).

Floor (docs/performance.md, H100, level 2 B=2 H=10 N=4096 d=64): 4 B H N^2 d = 86 GFLOP of matmul (about
107 us at 800 TFLOP/s) and B H N^2 = 336 M exps (about 86 us): about 0.11 ms. The Triton kernel's target
is PyTorch's SDPA flash backend within 1.15x (``benchmarks/bench_attention_lse.py``).
"""

from __future__ import annotations

import math

import torch

from ._chunking import heads_per_chunk
from ._dispatch import check_same_device, guarded_launch, resolve_backend
from ._triton import autotune, dot_precision, head_dim_block, jit, load_head_rows, tl, triton


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, N, d); got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"incompatible q, k, v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    # A softmax over no keys has no value (the kernel gave NaN, the reference 0, aten's CPU flash kernel
    # died with SIGFPE) and d = 0 has no default scale 1 / sqrt(d).
    if k.shape[2] == 0 or q.shape[-1] == 0:
        raise ValueError(
            f"attention needs at least one key and a head dim >= 1; got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(q=q, k=k, v=v)


def attention_with_lse_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: softmax attention in fp32, chunked over heads, returning (out, lse)."""
    batch, num_heads, n_q, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    out = torch.empty_like(q)
    lse = torch.empty(batch, num_heads, n_q, dtype=torch.float32, device=q.device)
    step = heads_per_chunk(batch, num_heads, n_q, k.shape[2])
    for h0 in range(0, num_heads, step):
        heads = slice(h0, h0 + step)
        scores = torch.matmul(q[:, heads].float(), k[:, heads].float().transpose(-1, -2)) * scale
        row_lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - row_lse.unsqueeze(-1))
        out[:, heads] = torch.matmul(probs, v[:, heads].float()).to(q.dtype)
        lse[:, heads] = row_lse
    return out, lse


@jit
def _online_softmax_tile(
    acc, m_i, l_i, q, k_ptrs, v_ptrs, start_n, offs_n, offs_d, N_K, qk_scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_KEYS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold keys [start_n, start_n + BLOCK_N) into the running (acc, m_i, l_i) of BLOCK_M query rows.

    k_ptrs, v_ptrs point at the tile's first key; MASK_KEYS only for the ragged last tile.
    """
    keys = start_n + offs_n
    k = load_head_rows(k_ptrs, keys, N_K, offs_d, HEAD_DIM, BLOCK_D, MASK_KEYS)
    v = load_head_rows(v_ptrs, keys, N_K, offs_d, HEAD_DIM, BLOCK_D, MASK_KEYS)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASK_KEYS:
        qk = tl.where(keys[None, :] < N_K, qk, float("-inf"))
    # Scaling the row max instead of the tile (valid for scale > 0) leaves one FMA per score before exp2.
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale_log2)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk * qk_scale_log2 - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@autotune(
    cuda_configs=[
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    ],
    interpreter_config=dict(BLOCK_M=32, BLOCK_N=32),
    key=["N_Q", "N_K", "HEAD_DIM"],
)
@jit
def _attention_lse_kernel(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    num_heads, N_Q, N_K,
    qk_scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Attention output and row log-sum-exp.

    Q, K, V: (B, H, Nq|Nk, d) inputs, any strides; Out: (B, H, Nq, d) in Q's dtype; Lse: (B, H, Nq) fp32.
    stride_*: element strides of those tensors (batch, head, token, dim). num_heads: H, to split the
    second grid axis; N_Q, N_K: query and key counts. qk_scale_log2: scale * log2(e), so exp2 replaces exp.
    qk_scale_log2 must be positive (the row max is scaled after the reduction).
    HEAD_DIM: d; BLOCK_D: d padded to a power of two >= 16 (see ``head_dim_block``); both constexpr because
    they size the register tiles and ``tl.dot`` (one compile per head dim, and SDXL has one).
    DOT_PRECISION: "ieee" for fp32 inputs, else ignored. BLOCK_M, BLOCK_N: query and key tile (autotuned).
    """
    # One program owns BLOCK_M query rows of one (batch, head) and loops over every key tile.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q_ptrs = Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    k_ptrs = K + batch * stride_kb + head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + batch * stride_vb + head * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    q = load_head_rows(q_ptrs, offs_m, N_Q, offs_d, HEAD_DIM, BLOCK_D, True)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full = (N_K // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _online_softmax_tile(
            acc, m_i, l_i, q, k_ptrs + start_n * stride_kn, v_ptrs + start_n * stride_vn, start_n, offs_n, offs_d,
            N_K, qk_scale_log2, HEAD_DIM, BLOCK_D, False, DOT_PRECISION,
        )
    if n_full < N_K:
        acc, m_i, l_i = _online_softmax_tile(
            acc, m_i, l_i, q, k_ptrs + n_full * stride_kn, v_ptrs + n_full * stride_vn, n_full, offs_n, offs_d,
            N_K, qk_scale_log2, HEAD_DIM, BLOCK_D, True, DOT_PRECISION,
        )

    row_ok = offs_m < N_Q
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(Lse + batch * stride_lb + head * stride_lh + offs_m * stride_ln, lse, mask=row_ok)
    out = acc / l_i[:, None]
    out_ptrs = Out + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


def _attention_with_lse_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel; ``out``/``lse`` may be preallocated (the tests pass poisoned buffers)."""
    batch, num_heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(batch, num_heads, n_q, dtype=torch.float32, device=q.device) if lse is None else lse

    def grid(meta):
        return (triton.cdiv(n_q, meta["BLOCK_M"]), batch * num_heads)

    _attention_lse_kernel[grid](
        q, k, v, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        num_heads, n_q, n_k,
        scale * math.log2(math.e),
        HEAD_DIM=head_dim, BLOCK_D=head_dim_block(head_dim), DOT_PRECISION=dot_precision(q.dtype),
    )
    return out, lse


# PyTorch's own fused CUDA attention kernels that hand out the row log-sum-exp, best first by default
# (``DEFAULT_CUDA_LSE_ORDER``), and our Triton FA2 as the fallback. Each is called through its aten op:
# the public SDPA returns no lse. They compute softmax(q k^T * scale) v exactly like the Triton kernel,
# so for the pruning layer the lse costs nothing beyond the attention every layer pays anyway.
LSE_PROVIDERS = ("flash", "efficient", "cudnn", "triton")
# Until a GPU run times them side by side (benchmarks/gpu_run.py, step d), flash first: it is what SDPA
# itself picks for SDXL's fp16 d = 64 attention on sm_80 and sm_90. fp32 inputs can only use "efficient".
DEFAULT_CUDA_LSE_ORDER = ("flash", "efficient", "cudnn", "triton")
# The torch release from which each aten op has the signature called below.
_PROVIDER_MIN_TORCH = {"flash": (2, 2), "efficient": (2, 2), "cudnn": (2, 5)}
_PROVIDER_DTYPES = {
    "flash": (torch.float16, torch.bfloat16),
    "efficient": (torch.float16, torch.bfloat16, torch.float32),
    "cudnn": (torch.float16, torch.bfloat16),
    "triton": (torch.float16, torch.bfloat16),  # fp32 would take the spilling exact-dot kernel (_dispatch)
}


def _torch_release() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _flash(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
    return out, lse


def _efficient(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)[:2]
    return out, lse


def _cudnn(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, False, False, scale=scale)[:2]
    return out, lse


_TORCH_FUSED = {"flash": _flash, "efficient": _efficient, "cudnn": _cudnn}


def _run_provider(provider: str, q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, Nq, d), lse (B, H, Nq) fp32) from one provider. The memory-efficient kernel pads its lse
    to a multiple of 32 rows and cuDNN returns (B, H, Nq, 1): both are brought to (B, H, Nq)."""
    if provider == "triton":
        return _attention_with_lse_launch(q, k, v, scale)
    out, lse = _TORCH_FUSED[provider](q, k, v, scale)
    batch, num_heads, n_q, _ = q.shape
    return out, lse.reshape(batch, num_heads, -1)[:, :, :n_q].float()


def _provider_supported(provider: str, q: torch.Tensor) -> bool:
    if provider not in LSE_PROVIDERS:
        raise ValueError(f"unknown lse provider {provider!r}; expected one of {LSE_PROVIDERS}")
    if not q.is_cuda or q.dtype not in _PROVIDER_DTYPES[provider]:
        return False
    if provider == "triton":
        return triton is not None
    return (_torch_release() >= _PROVIDER_MIN_TORCH[provider]
            and hasattr(torch.ops.aten, f"_scaled_dot_product_{provider}_attention"))


# (provider, device, dtype, head dim) -> whether the provider passed its first-use check.
_VALIDATED: dict[tuple, bool] = {}


def _provider_validated(provider: str, q: torch.Tensor) -> bool:
    """Run a provider once per (device, dtype, head dim) on a small random input against the fp32
    reference before trusting it: these are private aten ops, and a release that changed an lse's layout
    or base would otherwise rank tokens silently wrong. A provider that raises or disagrees is not used."""
    key = (provider, str(q.device), q.dtype, q.shape[-1])
    if key not in _VALIDATED:
        generator = torch.Generator(device=q.device).manual_seed(0)
        probe = [torch.randn(1, 2, 80, q.shape[-1], device=q.device, dtype=q.dtype, generator=generator)
                 for _ in range(3)]
        scale = q.shape[-1] ** -0.5
        try:
            out, lse = _run_provider(provider, *probe, scale)
            ref_out, ref_lse = attention_with_lse_ref(*probe, scale)
            atol = 1e-4 if q.dtype == torch.float32 else 2e-2
            _VALIDATED[key] = bool(lse.shape == ref_lse.shape and torch.allclose(lse, ref_lse, atol=atol, rtol=0)
                                   and torch.allclose(out.float(), ref_out.float(), atol=atol, rtol=atol))
        except Exception:  # noqa: BLE001 - an unusable provider is simply skipped
            _VALIDATED[key] = False
    return _VALIDATED[key]


def available_lse_providers(q: torch.Tensor) -> list[str]:
    """The providers that can compute attention with lse for tensors like ``q`` on this machine, in the
    default order (checked once per device, dtype and head dim against the reference)."""
    return [p for p in DEFAULT_CUDA_LSE_ORDER if _provider_supported(p, q) and _provider_validated(p, q)]


def _attention_with_lse_on_cuda(q, k, v, scale: float, provider: str, fallback: bool):
    """Eager body of the op on a GPU: a named provider, or (``"auto"``) the first usable one, each failure
    handled like a failed kernel (``guarded_launch``); the fp32 reference when none is left."""
    order = DEFAULT_CUDA_LSE_ORDER if provider == "auto" else (provider,)
    candidates = [p for p in order if _provider_supported(p, q) and (provider != "auto" or _provider_validated(p, q))]

    def attempt(remaining: list[str]):
        if not remaining:
            return attention_with_lse_ref(q, k, v, scale)
        first, rest = remaining[0], remaining[1:]
        return guarded_launch(f"attention_with_lse[{first}]", q.device, fallback,
                              lambda: _run_provider(first, q, k, v, scale), lambda: attempt(rest))

    return attempt(candidates if fallback else candidates[:1])


@torch.library.custom_op("atedm::attention_with_lse", mutates_args=())
def _attention_with_lse_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, provider: str = "triton", fallback: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Opaque to torch.compile: the graph around the pruning layer stays whole, and the provider choice
    (with its first-use check) and the fallback run eagerly."""
    if not q.is_cuda:  # the interpreter (tests): our kernel is the only provider there
        return guarded_launch("attention_with_lse[triton]", q.device, fallback,
                              lambda: _attention_with_lse_launch(q, k, v, scale),
                              lambda: attention_with_lse_ref(q, k, v, scale))
    return _attention_with_lse_on_cuda(q, k, v, scale, provider, fallback)


@_attention_with_lse_op.register_fake
def _attention_with_lse_fake(q, k, v, scale, provider="triton", fallback=False):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    backend: str = "auto",
    provider: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and fp32 row log-sum-exp; see the module docstring for the math and shapes.

    On CUDA, ``backend="auto"`` takes the first usable provider of ``DEFAULT_CUDA_LSE_ORDER`` (PyTorch's
    flash, memory-efficient or cuDNN attention, then our Triton kernel), falling back past any that fails;
    ``backend="triton"`` runs our kernel and raises if it fails. ``provider`` forces one (ValueError when
    it cannot run here). fp32 CUDA inputs never take the Triton kernel (see ``_dispatch``).
    """
    _check_qkv(q, k, v)
    if provider is not None:
        if not _provider_supported(provider, q):
            raise ValueError(f"lse provider {provider!r} cannot run {q.dtype} attention on {q.device} with torch "
                             f"{torch.__version__}; available: {available_lse_providers(q)}")
        return _attention_with_lse_triton(q, k, v, scale, provider, False)
    route = resolve_backend(backend, q, k, v)
    if route == "triton":
        if q.is_cuda and q.dtype == torch.float32:
            # PyTorch's memory-efficient attention takes fp32 (our kernel's exact fp32 dot spills), else
            # the reference.
            return _attention_with_lse_triton(q, k, v, scale, "efficient", True)
        return _attention_with_lse_triton(q, k, v, scale, "auto" if backend == "auto" else "triton", backend == "auto")
    # aten's CPU flash kernel dies with SIGFPE on zero heads or zero queries; the reference returns the
    # empty result.
    if q.device.type == "cpu" and q.shape[1] > 0 and q.shape[2] > 0:
        return _attention_with_lse_cpu_flash(q, k, v, scale)
    return attention_with_lse_ref(q, k, v, scale)


def _attention_with_lse_triton(q, k, v, scale: float | None, provider: str, fallback: bool):
    """The fused route (our kernel or a PyTorch fused kernel, see ``attention_with_lse``)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not scale > 0:
        raise ValueError(f"the fused attention kernels need a positive softmax scale; got {scale!r}")
    return _attention_with_lse_op(q, k, v, scale, provider, fallback)


def _attention_with_lse_cpu_flash(q, k, v, scale):
    """PyTorch's own fused CPU attention, which returns the fp32 log-sum-exp beside the output.

    It is the kernel plain SDPA runs on the CPU, in the model's dtype, so the pruning layer costs what
    an unpruned one does; the fp32 reference above is several times slower (seen: 5x at SDXL level 2,
    512 px, bf16). Meta tensors (the FLOPs counter) take the reference, which the counter can see.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    # The kernel assumes a unit stride along d (SDPA checks that before it dispatches here): a strided d
    # (a slice with a step, d-major storage) read the wrong elements. Copy only such inputs.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)[:2]
    return out, lse

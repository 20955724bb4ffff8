"""Backend selection shared by every op in ``atedm_kernels``.

Each public op takes ``backend`` = ``"auto" | "torch" | "triton"``:

* ``"torch"``  -- the plain PyTorch reference (``*_ref``), which is the spec of the op.
* ``"triton"`` -- the fused Triton kernel. Runs on CUDA tensors, and on CPU tensors only when the Triton
  interpreter is on (``TRITON_INTERPRET=1``, used by the tests).
* ``"auto"``   -- Triton for CUDA tensors when Triton is importable, the reference everywhere else
  (on the CPU the interpreter is far too slow to be a production path).
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton")


def _import_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


# Decided once at import: a plain constant keeps torch.compile from tracing an import or a cache.
TRITON_AVAILABLE = _import_triton()


def triton_available() -> bool:
    return TRITON_AVAILABLE


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    return backend


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Turn ``backend`` into ``"torch"`` or ``"triton"`` for these tensors, or raise a clear error."""
    check_backend(backend)
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package; install it or use backend='torch'")
    if not on_cuda and not triton_interpreter_on():
        raise RuntimeError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported, "
            "for testing on the CPU); use backend='auto' or 'torch' on the CPU"
        )
    return "triton"


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")

"""Backend selection shared by every op in ``atedm_kernels``, and the guard around every kernel launch.

Each public op takes ``backend`` = ``"auto" | "torch" | "triton"``:

* ``"torch"``  -- the plain PyTorch path (``*_ref``, or PyTorch's own fused kernel where one exists).
* ``"triton"`` -- the fused Triton kernel. Runs on CUDA tensors, and on CPU tensors only when the Triton
  interpreter is on (``TRITON_INTERPRET=1``, used by the tests). A kernel that fails to compile or launch
  raises.
* ``"auto"``   -- Triton for CUDA tensors when Triton is importable, PyTorch everywhere else (on the CPU
  the interpreter is far too slow to be a production path). A kernel that fails to compile or launch on
  the user's GPU does not break the generation: ``guarded_launch`` warns once (op, GPU, Triton version,
  the error) and that op runs its PyTorch path from then on.

fp32 on CUDA: ops whose kernel multiplies tiles with ``tl.dot`` (attention, the map, the recompute walk and
match, key cosine) need exact fp32 products there (TF32 is ~1e-3 off), and Triton lowers an exact fp32
``tl.dot`` to FMA code that spills registers and compiles for 3-40 s per config. So fp32 CUDA inputs of
those ops take the PyTorch path (cuBLAS fp32 GEMMs, or PyTorch's memory-efficient attention), under
``"auto"`` and ``"triton"`` alike; the memory-bound kernels (power step over a map, top-k, gather, the
map-reading match, the copy) have no dot and keep running Triton. The interpreter (CPU tests) still runs
the fp32 dot kernels: there they are exact and cheap.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, TypeVar

import torch

BACKENDS = ("auto", "torch", "triton")
Result = TypeVar("Result")


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


def auto_picks_triton(tensors: tuple[torch.Tensor, ...]) -> bool:
    """What ``backend="auto"`` does with these tensors: Triton exactly when they are all on CUDA.
    (A single predicate, so that the tests can make "auto" pick the interpreter on the CPU.)"""
    return TRITON_AVAILABLE and len(tensors) > 0 and all(t.is_cuda for t in tensors)


def exact_fp32_dot_on_gpu(tensors: tuple[torch.Tensor, ...]) -> bool:
    """True where a kernel's exact fp32 ``tl.dot`` would be compiled for a GPU (see the module docstring)."""
    return (not triton_interpreter_on()) and any(t.dtype == torch.float32 and t.is_cuda for t in tensors)


def resolve_backend(backend: str, *tensors: torch.Tensor, dot_operands: tuple[torch.Tensor, ...] = ()) -> str:
    """Turn ``backend`` into ``"torch"`` or ``"triton"`` for these tensors, or raise a clear error.

    ``dot_operands``: the inputs whose tiles the op's kernel multiplies with ``tl.dot`` (q and k, say;
    never the fp32 lse, which every caller passes); when one of them is fp32 on CUDA the op takes the
    PyTorch path (module docstring).
    """
    check_backend(backend)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        picked = "triton" if auto_picks_triton(tensors) else "torch"
    else:
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package; install it or use backend='torch'")
        if not all(t.is_cuda for t in tensors) and not triton_interpreter_on():
            raise RuntimeError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported, "
                "for testing on the CPU); use backend='auto' or 'torch' on the CPU"
            )
        picked = "triton"
    if picked == "triton" and exact_fp32_dot_on_gpu(dot_operands):
        return "torch"
    return picked


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


# (op, device) pairs whose kernel failed under backend="auto": they run their PyTorch path from then on,
# so a broken kernel costs one failed compile per process, not one per call.
_FAILED_KERNELS: dict[tuple[str, str], str] = {}


def failed_kernels() -> dict[tuple[str, str], str]:
    """The kernels that fell back to PyTorch in this process: {(op, device): error}. For reports."""
    return dict(_FAILED_KERNELS)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            return torch.cuda.get_device_name(device)
        except Exception:  # noqa: BLE001 - a name for a message only
            return str(device)
    return f"{device} (Triton interpreter)" if triton_interpreter_on() else str(device)


def guarded_launch(
    op: str,
    device: torch.device,
    fallback: bool,
    launch: Callable[[], Result],
    reference: Callable[[], Result],
) -> Result:
    """Run ``launch`` (a Triton kernel); if it fails to compile or launch and ``fallback`` is set
    (``backend="auto"``), warn once and return ``reference()`` instead, now and for the rest of the process.

    Called inside each op's ``torch.library.custom_op`` body, so it runs eagerly even in a compiled graph.
    Input validation happens before this point: what fails here is the kernel itself (a Triton or ptxas
    error, too little shared memory on this GPU, a driver refusing the launch).
    """
    key = (op, str(device))
    if fallback and key in _FAILED_KERNELS:
        return reference()
    try:
        return launch()
    except Exception as error:  # noqa: BLE001 - any kernel failure; input errors were raised before
        if not fallback:
            raise
        import triton

        message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        _FAILED_KERNELS[key] = message
        warnings.warn(
            f"atedm: the Triton kernel of {op} failed on {_device_name(device)} with triton {triton.__version__} "
            f"({message}); running its PyTorch path from now on. backend='triton' raises instead of falling back.",
            RuntimeWarning,
            stacklevel=2,
        )
        return reference()

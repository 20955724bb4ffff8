"""Ahead-of-time compile check of every Triton kernel, for sm_80 and sm_90, on a machine without a GPU.

Why: the CPU tests run the kernels through the Triton interpreter, which never builds GPU code, and GPU
time is short. Triton's compiler and the ptxas bundled in its wheel build the real binary for any
target offline, so a kernel (or autotune config) that fails to compile, spills registers to local memory
or needs more shared memory than the GPU grants one block is found here, on the CPU, in CI.

What is compiled: exactly what the launchers launch. ``registry`` calls every launcher of the package on
``meta`` tensors of SDXL's shapes (see ``SHAPES``), the way one pruning block would (attention with lse,
the head-averaged map when ``gwpr.materialize_attention_map`` builds one, both G-WPR head reductions,
top-k, every recovery rule, the gather and the refill), with each kernel swapped for a recorder while
the launcher runs. The recorded arguments go through Triton's own launch binder, so strides, sizes and
pointers specialize as in a real launch (integers on divisibility by 16 and 1, pointers on 16-byte
alignment), and the launch heuristics (``_topk_block``, ``_match_blocks``, ``map_query_block``...) and
every autotune config a GPU would try are the launchers' own. Identical compiles (same Triton cache
key) across shapes and dtypes are merged into one row.

Each compile reports the registers per thread and the spill stores/loads from ptxas's ``-v`` log of the
very ptxas run that built the binary, and Triton's shared-memory need, against the per-block opt-in limit
(``SHARED_MEMORY_LIMIT``).

Cache: a result is stored with Triton's own cache key of its binary (a hash of the Triton build, the
kernel's source and the source of every @jit helper it calls, the signature, specialization, constexprs,
compile options, target arch and ptxas version); ``--cache`` reuses a previous JSON's rows whose key is
unchanged, so only kernels that changed are recompiled. A reused row describes the very binary Triton
would build now, and every fresh compile checks that Triton's binary hash equals the key it is filed
under. (The key does not cover this module: regenerate with ``--no-cache`` after changing how results
are read.)

    python -m atedm_kernels.aot --markdown docs/aot_compile.md --json docs/aot_compile.json
    python -m atedm_kernels.aot --arch 90 --trial 'gwpr._map_power_step_kernel:BLOCK_M=1024,num_warps=4'

The second form compiles a candidate variant of a registered launch (block sizes, num_warps,
num_stages, maxnreg) to see its registers, spills and shared memory before adopting it.

Needs ``TRITON_INTERPRET=0`` (the default): under the interpreter the kernels are not compilable objects.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import hashlib
import importlib
import io
import json
import os
import pkgutil
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

import torch

from . import attention_lse, attention_map, gwpr, recovery, topk_gather
from ._dispatch import triton_interpreter_on

ARCHS = (80, 90)
# cudaDevAttrMaxSharedMemoryPerBlockOptin, the bound Triton checks a kernel's shared memory against when
# it loads it: A100 163 KiB, H100/H200 227 KiB.
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}
_WARP_SIZE = 32


@dataclasses.dataclass(frozen=True)
class Shape:
    """One SDXL attention block's sizes: batch 2 (one image with CFG), H heads of d = 64, N tokens, C channels."""

    name: str
    batch: int
    heads: int
    tokens: int
    head_dim: int
    channels: int


SHAPES = (
    Shape("L2 1024px", 2, 10, 4096, 64, 640),
    Shape("L3 1024px", 2, 20, 1024, 64, 1280),
    Shape("L2 2048px", 2, 10, 16384, 64, 640),
)
DTYPES = (torch.float16, torch.bfloat16)
# ATEDMConfig's defaults (atedm/config.py). Only what reaches a binary matters: whether k is a multiple
# of 16, and whether G-WPR builds the map (from the iteration count).
PRUNE_RATIO = 0.63
GWPR_ITERATIONS = 3


# ----------------------------------------------------------------------------------------------------
# Kernels and their launches


def _jit_function(kernel):
    """The JITFunction under an autotuner (or any other wrapper with ``.fn``)."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _kernel_modules() -> list:
    package = importlib.import_module(__package__)
    # Dunder modules (a future __main__) would run on import.
    return [importlib.import_module(f"{__package__}.{info.name}") for info in pkgutil.iter_modules(package.__path__)
            if not info.name.startswith("__")]


def discover_kernels() -> dict[str, Any]:
    """Every Triton kernel defined in this package, by ``module.name``: each @jit function (autotuned or
    not) that no other @jit function calls. The ones called by others are device helpers, compiled
    inside the kernels that call them."""
    from triton.runtime.jit import KernelInterface

    if triton_interpreter_on():
        raise RuntimeError("the AOT check compiles real GPU code: run it with TRITON_INTERPRET=0")
    jitted = {}
    for module in _kernel_modules():
        for value in vars(module).values():
            if isinstance(value, KernelInterface):
                python_fn = _jit_function(value).fn
                if python_fn.__module__.startswith(__package__ + "."):
                    jitted[id(python_fn)] = (value, python_fn)
    called = {name for _, python_fn in jitted.values() for name in python_fn.__code__.co_names}
    return {
        f"{python_fn.__module__.rsplit('.', 1)[1]}.{python_fn.__name__}": kernel
        for kernel, python_fn in jitted.values()
        if python_fn.__name__ not in called
    }


@dataclasses.dataclass
class _Launch:
    kernel_name: str
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a kernel while a launcher runs: ``kernel[grid](*args, **kwargs)`` is recorded."""

    def __init__(self, kernel_name: str, launches: list[_Launch]):
        self.kernel_name = kernel_name
        self.launches = launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(_Launch(self.kernel_name, args, kwargs))


@contextlib.contextmanager
def _recording(kernels: dict[str, Any]):
    """Swap every module-level reference to a kernel for a recorder, and put them back on exit."""
    launches: list[_Launch] = []
    by_identity = {id(kernel): name for name, kernel in kernels.items()}
    swapped = []
    for module in _kernel_modules():
        for attribute, value in list(vars(module).items()):
            if id(value) in by_identity:
                swapped.append((module, attribute, value))
                setattr(module, attribute, _Recorder(by_identity[id(value)], launches))
    try:
        yield launches
    finally:
        for module, attribute, value in swapped:
            setattr(module, attribute, value)


def _processor_view(shape: Shape, dtype: torch.dtype) -> torch.Tensor:
    """Q, K or V as the attention processor hands them: (B, N, H, d) storage viewed as (B, H, N, d)."""
    storage = torch.empty(shape.batch, shape.tokens, shape.heads, shape.head_dim, device="meta", dtype=dtype)
    return storage.transpose(1, 2)


def _pruning_block_launches(shape: Shape, dtype: torch.dtype) -> None:
    """Call every launcher a pruning block at ``shape`` can run, over every config switch that changes
    which kernel runs or how: both G-WPR head reductions, every similarity rule, gather and refill."""
    batch, tokens = shape.batch, shape.tokens
    q, k, v = (_processor_view(shape, dtype) for _ in range(3))
    scale = shape.head_dim**-0.5
    _, lse = attention_lse._attention_with_lse_launch(q, k, v, scale)

    map_built = gwpr.materialize_attention_map(batch, shape.heads, tokens, GWPR_ITERATIONS)
    # The plan's map is fp16 for fp16/bf16 models (prune_plan.py).
    abar = attention_map._head_mean_attention_map_launch(q, k, lse, scale, torch.float16)[0] if map_built else None
    for head_reduction in gwpr.HEAD_REDUCTIONS:
        gwpr._gwpr_scores_launch(q, k, lse, GWPR_ITERATIONS, head_reduction, scale, None)

    num_keep = topk_gather.num_kept_tokens(tokens, PRUNE_RATIO)
    scores = torch.empty(batch, tokens, device="meta", dtype=torch.float32)
    keep = torch.empty(batch, num_keep, device="meta", dtype=torch.int64)
    topk_gather._topk_keep_indices_into(keep, scores, num_keep)

    src = torch.empty(batch, tokens, device="meta", dtype=torch.int64)
    for rule in recovery.SIMILARITY_RULES:
        recovery._recovery_source_into(src, keep, tokens, rule, abar, k, q, lse, scale)

    hidden = torch.empty(batch, tokens, shape.channels, device="meta", dtype=dtype)
    kept = torch.empty(batch, num_keep, shape.channels, device="meta", dtype=dtype)
    topk_gather._gather_rows_into(kept, hidden, keep)
    topk_gather._gather_rows_into(torch.empty_like(hidden), kept, src)


# ----------------------------------------------------------------------------------------------------
# Compile entries


@dataclasses.dataclass
class CompileEntry:
    """One binary to build: a kernel's specialized signature, constexprs and options for one arch.

    ``key`` is Triton's cache key of that binary (``CompiledKernel.hash``). ``shapes`` and ``dtypes``
    list every shape and model dtype whose launches specialize to it."""

    kernel: str
    config: str
    not_divisible: list[str]
    arch: int
    key: str
    module: str
    attribute: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    shapes: list[str]
    dtypes: list[str]


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def _config_label(fn, constexprs: dict, options) -> str:
    """The kernel's declared meta-parameters and launch options, e.g. ``BLOCK_M=128 BLOCK_N=64 w4 s3``."""
    declared = [param.name for param in fn.params if param.is_constexpr]
    by_name = {fn.arg_names[path[0]]: value for path, value in constexprs.items()}
    meta = " ".join(f"{name}={by_name[name]}" for name in declared)
    register_cap = "" if options.maxnreg is None else f" maxnreg={options.maxnreg}"
    return f"{meta} w{options.num_warps} s{options.num_stages}{register_cap}"


@functools.lru_cache(maxsize=None)
def _launch_binder(fn, arch: int):
    """Triton's backend for ``arch`` and the argument binder ``JITFunction.run`` builds for that backend."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, _WARP_SIZE))
    return backend, create_function_from_signature(fn.signature, fn.params, backend)


def _specialize(kernel_name: str, kernel, args: tuple, kwargs: dict, arch: int) -> CompileEntry:
    """Bind a launch the way ``JITFunction.run`` does on a GPU of ``arch`` and key it like Triton's cache."""
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.compiler.compiler import ASTSource
    from triton.runtime.cache import get_cache_key

    fn = _jit_function(kernel)
    backend, binder = _launch_binder(fn, arch)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    cache_key = get_cache_key(src, backend, options, env_vars=get_cache_invalidating_env_vars())
    module, attribute = kernel_name.rsplit(".", 1)
    not_divisible = [
        fn.arg_names[path[0]] for path, attr in attrs.items()
        if signature[fn.arg_names[path[0]]] not in ("constexpr", "fp32") and ["tt.divisibility", 16] not in attr
    ]
    return CompileEntry(
        kernel=kernel_name, config=_config_label(fn, constexprs, options), not_divisible=not_divisible, arch=arch,
        key=hashlib.sha256(cache_key.encode("utf-8")).hexdigest(),
        module=f"{__package__}.{module}", attribute=attribute, signature=signature, constexprs=constexprs,
        attrs=attrs, options=dict(options.__dict__), shapes=[], dtypes=[],
    )


def _launch_variants(kernel, kwargs: dict) -> list[dict]:
    """The launch keyword arguments a GPU compiles: one per autotune config, or the launch as made."""
    configs = getattr(kernel, "configs", None)
    if configs is None:
        return [kwargs]
    return [{**kwargs, **config.all_kwargs()} for config in configs]


def recorded_launches(shapes=SHAPES, dtypes=DTYPES) -> list[tuple[Shape, torch.dtype, _Launch]]:
    """Every kernel launch the package's launchers make for a pruning block at these shapes and dtypes."""
    kernels = discover_kernels()
    recorded = []
    for shape in shapes:
        for dtype in dtypes:
            with _recording(kernels) as launches:
                _pruning_block_launches(shape, dtype)
            recorded += [(shape, dtype, launch) for launch in launches]
    return recorded


def registry(archs=ARCHS, shapes=SHAPES, dtypes=DTYPES) -> list[CompileEntry]:
    """One entry per distinct binary over all recorded launches, autotune configs and ``archs``."""
    kernels = discover_kernels()
    entries: dict[str, CompileEntry] = {}
    for shape, dtype, launch in recorded_launches(shapes, dtypes):
        kernel = kernels[launch.kernel_name]
        for kwargs in _launch_variants(kernel, launch.kwargs):
            for arch in archs:
                entry = _specialize(launch.kernel_name, kernel, launch.args, kwargs, arch)
                entry = entries.setdefault(entry.key, entry)
                for label, labels in ((shape.name, entry.shapes), (_dtype_name(dtype), entry.dtypes)):
                    if label not in labels:
                        labels.append(label)
    # Stable sort: within a kernel and arch, rows keep launch order and autotune-config order.
    return sorted(entries.values(), key=lambda e: (e.kernel, e.arch))


def unregistered_kernels(entries: list[CompileEntry]) -> list[str]:
    """Kernels of the package that no recorded launch reaches: each needs a launch in
    ``_pruning_block_launches`` (or its launcher has stopped launching it)."""
    return sorted(set(discover_kernels()) - {entry.kernel for entry in entries})


def trial_entries(trials: list[tuple[str, dict]], archs=ARCHS) -> list[CompileEntry]:
    """Variants of registered launches: for each (kernel name, overrides), the kernel's first recorded
    launch with some meta-parameters or launch options replaced, e.g. ``("gwpr._map_power_step_kernel",
    {"BLOCK_M": 1024, "num_warps": 4})``. To check a candidate block size or autotune config for spills
    and shared memory before adopting it."""
    kernels = discover_kernels()
    first_launch = {}
    for shape, dtype, launch in recorded_launches(dtypes=DTYPES[:1]):
        first_launch.setdefault(launch.kernel_name, (shape, dtype, launch))
    entries = []
    for kernel_name, overrides in trials:
        if kernel_name not in first_launch:
            raise KeyError(f"no recorded launch of {kernel_name!r}; kernels: {sorted(first_launch)}")
        shape, dtype, launch = first_launch[kernel_name]
        kernel = kernels[kernel_name]
        kwargs = {**_launch_variants(kernel, launch.kwargs)[0], **overrides}
        for arch in archs:
            entry = _specialize(kernel_name, kernel, launch.args, kwargs, arch)
            entry.shapes, entry.dtypes = [shape.name], [_dtype_name(dtype)]
            entries.append(entry)
    return entries


# ----------------------------------------------------------------------------------------------------
# Compiling and reading ptxas's report


@dataclasses.dataclass
class CompileResult:
    kernel: str
    config: str
    not_divisible: str
    dtype: str
    shape: str
    arch: int
    registers: int | None
    spill_store_bytes: int | None
    spill_load_bytes: int | None
    shared_bytes: int | None
    shared_limit: int
    compile_seconds: float
    error: str | None
    key: str
    cached: bool = False

    @property
    def failures(self) -> list[str]:
        """Why this binary fails the check: a compile error, register spills, shared memory over the limit."""
        if self.error is not None:
            return ["compile error"]
        spills = ["spills"] if self.spill_store_bytes or self.spill_load_bytes else []
        return spills + (["shared memory"] if self.shared_bytes > self.shared_limit else [])

    @property
    def passed(self) -> bool:
        return not self.failures


_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(log: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v`` output for one kernel."""
    registers, spills = _REGISTERS.search(log), _SPILLS.search(log)
    if registers is None or spills is None:
        raise ValueError(f"ptxas log without a register or spill report:\n{log}")
    return int(registers.group(1)), int(spills.group(1)), int(spills.group(2))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _entry_labels(entry: CompileEntry) -> dict:
    return dict(kernel=entry.kernel, config=entry.config, not_divisible=", ".join(entry.not_divisible),
                dtype=", ".join(entry.dtypes), shape=", ".join(entry.shapes), arch=entry.arch)


def compile_entry(entry: CompileEntry) -> CompileResult:
    """Build one entry for its arch with Triton and the bundled ptxas, and report its resources."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    fn = _jit_function(vars(importlib.import_module(entry.module))[entry.attribute])
    src = ASTSource(fn, entry.signature, entry.constexprs, entry.attrs)
    ptxas_log = io.StringIO()
    registers = spill_stores = spill_loads = shared = error = None
    start = time.perf_counter()
    try:
        # Always run ptxas (even when Triton's own cache holds the binary) and have Triton print its -v log.
        with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(ptxas_log):
            knobs.nvidia.dump_ptxas_log = True
            knobs.compilation.always_compile = True
            compiled = triton.compile(src, target=GPUTarget("cuda", entry.arch, _WARP_SIZE), options=entry.options)
        if compiled.hash != entry.key:
            raise RuntimeError(f"Triton built binary {compiled.hash} for an entry keyed {entry.key}: the cache key "
                               "derivation no longer matches this Triton version")
        registers, spill_stores, spill_loads = parse_ptxas_log(ptxas_log.getvalue())
        shared = compiled.metadata.shared
    except Exception as caught:  # noqa: BLE001 - a failed compile is a result of the check, not a crash
        error = _first_line(caught)
    return CompileResult(
        **_entry_labels(entry), registers=registers, spill_store_bytes=spill_stores, spill_load_bytes=spill_loads,
        shared_bytes=shared, shared_limit=SHARED_MEMORY_LIMIT[entry.arch],
        compile_seconds=round(time.perf_counter() - start, 2), error=error, key=entry.key,
    )


_RESULT_FIELDS = ("registers", "spill_store_bytes", "spill_load_bytes", "shared_bytes", "compile_seconds", "error")


def load_cache(path: Path | str | None) -> dict[str, dict]:
    """Rows of a previous ``--json`` output by key, or nothing when there is none."""
    if path is None or not Path(path).exists():
        return {}
    return {row["key"]: row for row in json.loads(Path(path).read_text())["rows"]}


def run_check(entries: list[CompileEntry], jobs: int, cache: dict[str, dict] | None = None,
              progress: Callable[[CompileResult], None] | None = None) -> list[CompileResult]:
    """Compile every entry not in ``cache`` (``jobs`` processes) and return all results in entry order.

    A cached row with an error is compiled again: a failure may come from the machine (ptxas killed)."""
    cache = cache or {}
    results: dict[str, CompileResult] = {}
    to_compile = []
    for entry in entries:
        row = cache.get(entry.key)
        if row is not None and row["error"] is None:
            results[entry.key] = CompileResult(
                **_entry_labels(entry), shared_limit=SHARED_MEMORY_LIMIT[entry.arch], key=entry.key, cached=True,
                **{name: row[name] for name in _RESULT_FIELDS},
            )
        else:
            to_compile.append(entry)

    def finished(result: CompileResult) -> None:
        results[result.key] = result
        if progress is not None:
            progress(result)

    if jobs <= 1 or len(to_compile) <= 1:
        for entry in to_compile:
            finished(compile_entry(entry))
    else:
        # Fresh interpreters (spawn): LLVM and torch threads do not survive a fork reliably.
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            for result in pool.map(compile_entry, to_compile):
                finished(result)
    return [results[entry.key] for entry in entries]


# ----------------------------------------------------------------------------------------------------
# Report


def ptxas_versions(archs) -> dict[int, str]:
    from triton.backends.nvidia.compiler import get_ptxas

    versions = {}
    for arch in archs:
        tool = get_ptxas(arch)
        versions[arch] = f"{Path(tool.path).name} {tool.version}"
    return versions


_COLUMNS = ("kernel", "config", "not_divisible", "dtype", "shape", "arch", "registers", "spill_store_bytes",
            "spill_load_bytes", "shared_bytes", "shared_limit", "compile_seconds", "error")


def _environment(archs, command: str) -> dict:
    import triton

    from .selfcheck import environment_info

    return {**environment_info("cpu"), "triton": triton.__version__, "command": command,
            "ptxas": {f"sm_{arch}": version for arch, version in ptxas_versions(archs).items()}}


def markdown_report(results: list[CompileResult], environment: dict, unregistered: list[str]) -> str:
    failed = [r for r in results if not r.passed]
    lines = [
        "# Ahead-of-time compile check of the Triton kernels",
        "",
        "Generated by `atedm_kernels/aot.py` (do not edit by hand); `tests/test_aot_compile.py` runs the same",
        "check in CI and fails on any compile error, register spill or shared memory over the limit.",
        "",
        f"- command: `{environment['command']}`",
        f"- triton {environment['triton']}, torch {environment['torch']}, "
        + ", ".join(f"{arch}: {version}" for arch, version in environment["ptxas"].items()),
        f"- git SHA {environment['git_sha']} (the commit the table was generated on), on {environment['device']}",
        "- shapes (B, H, N, d), C: " + "; ".join(
            f"{s.name} ({s.batch}, {s.heads}, {s.tokens}, {s.head_dim}), C = {s.channels}" for s in SHAPES),
        f"- dtype: the model's dtype (the G-WPR map is fp16 for both); k = ceil((1 - {PRUNE_RATIO}) N) kept "
        f"tokens, K = {GWPR_ITERATIONS} G-WPR iterations",
        "- config: the kernel's constexpr meta-parameters, `w` num_warps, `s` num_stages; args not ÷16: the "
        "integer and pointer arguments a launch does not specialize as divisible by 16 (the rest are, or are "
        "1 and become constants); one row per distinct binary (Triton cache key), listing every shape and "
        "dtype that compiles to it",
        "- registers per thread and spill bytes from ptxas -v; shared: Triton's shared memory per block, "
        "limit: the per-block opt-in maximum of sm_80 (A100) and sm_90 (H100/H200); compile: seconds of "
        "the row's one compile (Triton and ptxas), kept when a later run reuses the row",
        "",
        f"**{len(results)} binaries ({sum(not r.cached for r in results)} compiled by this command, "
        f"{sum(r.cached for r in results)} reused from the cache), {len(results) - len(failed)} pass, "
        f"{len(failed)} fail; unregistered kernels: {', '.join(unregistered) or 'none'}.**",
        "",
        "| kernel | config | args not ÷16 | dtype | shape | arch | registers | spill st/ld (B) | shared (B) "
        "| limit (B) | compile (s) | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        spills = "" if r.error else f"{r.spill_store_bytes}/{r.spill_load_bytes}"
        cells = [r.kernel, r.config, r.not_divisible, r.dtype, r.shape, f"sm_{r.arch}",
                 "" if r.registers is None else r.registers, spills, "" if r.shared_bytes is None else r.shared_bytes,
                 r.shared_limit, r.compile_seconds,
                 "pass" if r.passed else f"**FAIL: {', '.join(r.failures)}** {r.error or ''}".strip()]
        lines.append("| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def json_report(results: list[CompileResult], environment: dict, unregistered: list[str]) -> str:
    rows = [{column: getattr(r, column) for column in (*_COLUMNS, "passed", "key")} for r in results]
    kernels = discover_kernels()
    autotune_configs = {
        name: [{**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
               for config in kernel.configs]
        for name, kernel in kernels.items() if hasattr(kernel, "configs")
    }
    report = {"environment": environment, "kernels": sorted(kernels), "autotune_configs": autotune_configs,
              "unregistered_kernels": unregistered, "rows": rows}
    return json.dumps(report, indent=1) + "\n"


def _parse_trial(spec: str) -> tuple[str, dict]:
    kernel_name, _, assignments = spec.partition(":")
    overrides = {}
    for assignment in filter(None, assignments.split(",")):
        name, _, value = assignment.partition("=")
        try:
            overrides[name.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):  # a bare word, e.g. DOT_PRECISION=ieee
            overrides[name.strip()] = value.strip()
    return kernel_name, overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m atedm_kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)), help="compute capabilities, e.g. 80,90")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument("--json", type=Path, help="write the rows (and the cache keys) here")
    parser.add_argument("--cache", type=Path,
                        help="reuse the rows of this earlier --json output whose key is unchanged (default: --json)")
    parser.add_argument("--no-cache", action="store_true", help="compile every entry")
    parser.add_argument("--trial", action="append", default=[], metavar="KERNEL:NAME=VALUE,...",
                        help="compile only these variants of a registered launch, e.g. "
                             "'gwpr._map_power_step_kernel:BLOCK_M=1024,num_warps=4' (repeatable)")
    args = parser.parse_args(argv)
    archs = [int(arch) for arch in args.arch.split(",")]
    command = "python -m atedm_kernels.aot " + " ".join(argv if argv is not None else sys.argv[1:])

    if args.trial:
        entries = trial_entries([_parse_trial(spec) for spec in args.trial], archs)
        unregistered = []
    else:
        entries = registry(archs)
        unregistered = unregistered_kernels(entries)
    cache = {} if args.no_cache else load_cache(args.cache or args.json)

    def progress(result: CompileResult) -> None:
        status = "ok" if result.passed else f"FAIL: {', '.join(result.failures)} {result.error or ''}"
        print(f"{result.compile_seconds:6.1f}s sm_{result.arch} {result.kernel} {result.config}: "
              f"{result.registers} regs, spills {result.spill_store_bytes}/{result.spill_load_bytes}, "
              f"shared {result.shared_bytes} {status}", flush=True)

    environment = _environment(archs, command)  # before compiling: it needs the checkout (benchmarks/)
    start = time.perf_counter()
    results = run_check(entries, args.jobs, cache, progress)
    fresh = sum(not r.cached for r in results)
    failed = [r for r in results if not r.passed]
    print(f"{len(results)} binaries ({fresh} compiled, {len(results) - fresh} from the cache) in "
          f"{time.perf_counter() - start:.1f} s; {len(failed)} fail; unregistered kernels: {unregistered or 'none'}")
    if args.markdown:
        args.markdown.write_text(markdown_report(results, environment, unregistered))
    if args.json:
        args.json.write_text(json_report(results, environment, unregistered))
    return 1 if failed or unregistered else 0


if __name__ == "__main__":
    sys.exit(main())

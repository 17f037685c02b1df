"""Which implementation serves each op on each device type.

Backends, best first:
- ``cpu``:  ``cpp`` (``astra_kernels._C``, OpenMP + ATen vectorization) -> ``reference``
- ``cuda``: ``cuda`` (``_C`` built with CUDA) / ``triton`` -> ``reference``

Overrides: ``ASTRA_BACKEND`` picks the CUDA backend (``triton|cuda|reference``),
``ASTRA_CPU_BACKEND`` the CPU one (``cpp|reference``, or ``triton`` to run the Triton
kernels in the interpreter, which needs ``TRITON_INTERPRET=1``). :func:`use_backend`
changes the choice for a block of code.

The choice is made once per (op, device type), on the first call, and cached, so a
call costs one dict lookup here. The override and the environment variables are read
when a choice is made: :func:`use_backend` clears the cache on entry and exit, and
:func:`reset` (``astra_kernels.reset_backend_cache``) clears it after the environment
changes at run time.

Loading never fails: a missing or incompatible ``_C`` is reported by one warning and
the next backend serves. The extension registers kernels only; their schemas come
from :data:`astra_kernels.ops.SCHEMAS` (:func:`astra_kernels.ops.define_compiled`).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from collections.abc import Callable, Iterator

import torch

from . import reference

_C_ERROR: str | None = None
_C_LOADED = False


def _load_C() -> bool:
    """Import the compiled extension once; remember why it failed if it did."""
    global _C_ERROR, _C_LOADED
    if _C_LOADED or _C_ERROR is not None:
        return _C_LOADED
    if os.environ.get("ASTRA_DISABLE_C", "0") == "1":
        _C_ERROR = "disabled by ASTRA_DISABLE_C=1"
        return False
    try:
        importlib.import_module("astra_kernels._C")
        from . import ops
        ops.define_compiled()  # the kernels' schemas, from ops.SCHEMAS
        _C_LOADED = hasattr(torch.ops, "astra_C") and hasattr(torch.ops.astra_C, "vq_encode")
        if not _C_LOADED:
            _C_ERROR = "astra_kernels._C imported but registered no ops"
    except (ImportError, OSError) as e:  # missing, or built against another torch
        _C_ERROR = f"{type(e).__name__}: {e}"
    except RuntimeError as e:  # a kernel disagrees with ops.SCHEMAS, or a stale build
        _C_ERROR = (f"{type(e).__name__}: {e}; rebuild it so that it matches "
                    "astra_kernels/ops.py")
    if not _C_LOADED:
        warnings.warn(
            f"astra_kernels: compiled kernels unavailable ({_C_ERROR}); falling back to "
            "Triton/reference. Build them with `pip install --no-build-isolation -e .`.",
            RuntimeWarning, stacklevel=3)
    return _C_LOADED


def _c_has_cuda() -> bool:
    return _load_C() and bool(torch.ops.astra_C.has_cuda())


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _cpp_impl(op: str) -> Callable:
    return getattr(torch.ops.astra_C, op).default


def _triton_impl(op: str) -> Callable | None:
    from . import triton as triton_kernels  # imported lazily: it defines Triton kernels
    return triton_kernels.IMPLS.get(op)


def _ref_impl(op: str) -> Callable:
    return getattr(reference, op)


def available(device_type: str) -> list[str]:
    """Backends that can serve ``device_type`` on this machine, best first."""
    out: list[str] = []
    if device_type == "cpu":
        if _load_C():
            out.append("cpp")
        if os.environ.get("TRITON_INTERPRET") == "1" and _triton_available():
            out.append("triton")
    elif device_type == "cuda":
        if _c_has_cuda():
            out.append("cuda")
        if _triton_available():
            out.append("triton")
    out.append("reference")
    return out


def _op_names() -> tuple[str, ...]:
    from .ops import SCHEMAS  # imported here: ops imports this module
    return tuple(SCHEMAS)


# CUDA tensors: Triton first until the CUDA C++ kernels have GPU results (bench/RESULTS.md).
_CUDA_PREFERENCE = ("triton", "cuda", "reference")
_CPU_PREFERENCE = ("cpp", "reference")
_override: dict[str, str] = {}
# (op, device type) -> (backend name, callable)
_decisions: dict[tuple[str, str], tuple[str, Callable]] = {}


def _serves(name: str, op: str, device_type: str) -> bool:
    """Whether backend ``name`` has a kernel of its own for ``op`` on ``device_type``
    (the compiled library registers some ops for the CPU only)."""
    if name == "triton":
        return _triton_impl(op) is not None
    if name in ("cpp", "cuda"):
        key = "CUDA" if device_type == "cuda" else "CPU"
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"astra_C::{op}", key)
    return True


def _requested(device_type: str) -> str | None:
    if device_type in _override:
        return _override[device_type]
    env = "ASTRA_BACKEND" if device_type == "cuda" else "ASTRA_CPU_BACKEND"
    return os.environ.get(env) or None


def _choose(op: str, device_type: str, want: str | None) -> str:
    """The backend for ``op`` on ``device_type`` when ``want`` (or nothing) is requested."""
    avail = available(device_type)
    if want is not None:
        if want not in ("cpp", "cuda", "triton", "reference"):
            raise ValueError(f"unknown Astra backend {want!r} for {device_type}")
        if want not in avail:
            raise RuntimeError(
                f"Astra backend {want!r} was requested for {device_type} tensors but is "
                f"not available here (available: {', '.join(avail)})")
        return want if _serves(want, op, device_type) else "reference"
    pref = _CUDA_PREFERENCE if device_type == "cuda" else _CPU_PREFERENCE
    for name in pref:
        if name in avail and _serves(name, op, device_type):
            return name
    return "reference"


def _decide(op: str, device_type: str) -> tuple[str, Callable]:
    key = (op, device_type)
    hit = _decisions.get(key)
    if hit is None:
        # raises, and caches nothing, when the requested backend is unusable
        name = _choose(op, device_type, _requested(device_type))
        if name in ("cpp", "cuda"):
            fn = _cpp_impl(op)
        elif name == "triton":
            fn = _triton_impl(op)
        else:
            fn = _ref_impl(op)
        hit = _decisions[key] = (name, fn)
    return hit


def backend_name(op: str, device_type: str) -> str:
    """Name of the backend that serves ``op`` for tensors on ``device_type``."""
    return _decide(op, device_type)[0]


def impl(op: str, device_type: str) -> Callable:
    """The callable that serves ``op`` on ``device_type`` now (cached decision)."""
    return _decide(op, device_type)[1]


def reset() -> None:
    """Forget every cached backend decision; the next call of each op decides again,
    reading the override and ``ASTRA_BACKEND`` / ``ASTRA_CPU_BACKEND`` anew."""
    _decisions.clear()


@contextlib.contextmanager
def use_backend(name: str, device_type: str = "cpu") -> Iterator[None]:
    """Serve every op on ``device_type`` with backend ``name`` inside the block."""
    old = _override.get(device_type)
    _override[device_type] = name
    reset()
    try:
        backend_name(_op_names()[0], device_type)  # fail early if unavailable
        yield
    finally:
        if old is None:
            _override.pop(device_type, None)
        else:
            _override[device_type] = old
        reset()


def info() -> dict[str, dict[str, str]]:
    """``{op: {device_type: backend}}`` for this machine; CUDA only if a GPU is visible."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {op: {dev: backend_name(op, dev) for dev in devices} for op in _op_names()}


def compiled_status() -> str:
    """One line on the compiled extension: loaded (with CUDA or not), or why not."""
    if _load_C():
        return "loaded (CPU" + (" + CUDA" if _c_has_cuda() else "") + ")"
    return f"not loaded: {_C_ERROR}"

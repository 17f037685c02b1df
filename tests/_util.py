"""What this machine can run: hardware skips and backend availability for the tests.

The comparison rules live in :mod:`tests.oracles`. A backend that is not available
skips with its reason; a compiled extension that was built (``astra_kernels/_C*.so``
exists) but does not load *fails* instead, so a broken build cannot turn the
compiled-kernel tests into skips.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, List, Optional

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def compiled_files() -> List[Path]:
    """The built extension(s) next to the ``astra_kernels`` package that is imported."""
    import astra_kernels
    return sorted(Path(astra_kernels.__file__).parent.glob("_C*.so"))


def compiled_problem() -> Optional[str]:
    """``None`` when ``astra_kernels._C`` is loaded; else why not, prefixed ``FAIL:``
    when a ``_C*.so`` exists but did not load (and was not disabled on purpose)."""
    import astra_kernels as ak
    status = ak.compiled_status()
    if status.startswith("loaded"):
        return None
    files = compiled_files()
    if files and os.environ.get("ASTRA_DISABLE_C", "0") != "1":
        return (f"FAIL: {files[0].name} was built but does not load ({status}); "
                "rebuild it (make build)")
    return f"_C not built ({status})"


def backend_problem(device: str, name: str) -> Optional[str]:
    """Why backend ``name`` cannot serve ``device`` tensors here, or ``None``.
    ``FAIL:``-prefixed reasons must fail the test rather than skip it."""
    import astra_kernels as ak
    if device == "cuda" and not HAS_CUDA:
        return "needs a CUDA device"
    if name in ("cpp", "cuda"):
        problem = compiled_problem()
        if problem:
            return problem
        if name == "cuda" and "cuda" not in ak.available_backends("cuda"):
            return "_C was built without CUDA kernels"
    if name == "triton":
        try:
            import numpy
            import triton
        except ImportError:
            return "triton is not installed"
        if device == "cpu":
            if os.environ.get("TRITON_INTERPRET") != "1":
                return ("Triton on CPU tensors needs TRITON_INTERPRET=1 (conftest sets it "
                        "when no GPU is visible)")
            from astra_kernels.triton import interpreter_problem
            problem = interpreter_problem(triton.__version__, numpy.__version__)
            if problem:
                return problem
    if name not in ak.available_backends(device):
        return f"backend {name!r} is not available for {device} tensors here"
    return None


def require_backend(device: str, name: str) -> None:
    """Skip (or fail, see :func:`backend_problem`) unless ``name`` can serve ``device``."""
    problem = backend_problem(device, name)
    if problem is None:
        return
    if problem.startswith("FAIL: "):
        pytest.fail(problem[len("FAIL: "):], pytrace=False)
    pytest.skip(problem)


def require_compiled() -> None:
    """Skip without a compiled extension; fail when one was built but does not load."""
    require_backend("cpu", "cpp")


def triton_autotuners() -> list:
    """Every autotuned Triton kernel of ``astra_kernels.triton`` (imported here)."""
    import sys

    from triton.runtime.autotuner import Autotuner

    import astra_kernels.triton  # noqa: F401
    found = {}
    for name, mod in list(sys.modules.items()):
        if name.startswith("astra_kernels.triton") and mod is not None:
            for obj in vars(mod).values():
                if isinstance(obj, Autotuner):
                    found[id(obj)] = obj
    return list(found.values())


@contextlib.contextmanager
def only_configs(tuner, configs) -> Iterator[None]:
    """Restrict a Triton autotuner to ``configs`` (and forget what it chose) inside
    the block."""
    old_cfgs, old_cache = tuner.configs, dict(tuner.cache)
    tuner.configs, tuner.cache = list(configs), {}
    try:
        yield
    finally:
        tuner.configs = old_cfgs
        tuner.cache.clear()
        tuner.cache.update(old_cache)


@contextlib.contextmanager
def first_triton_configs() -> Iterator[None]:
    """Every Astra Triton autotuner limited to its first config: one compile per shape
    in GPU correctness grids (``test_triton`` checks every config separately)."""
    with contextlib.ExitStack() as stack:
        for tuner in triton_autotuners():
            stack.enter_context(only_configs(tuner, tuner.configs[:1]))
        yield

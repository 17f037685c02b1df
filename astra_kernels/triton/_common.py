"""What every Astra Triton kernel module shares: the environment switches, the autotune
config lists, the 16-bit dot, launching through ``wrap_triton`` while torch traces, and
the ``astra_triton::`` op registration with the schemas of :mod:`astra_kernels.ops`.

Environment (read once, when this module is imported):
- ``TRITON_INTERPRET=1``: kernels run on CPU tensors in Triton's interpreter; every
  autotune list shrinks to one config (the interpreter cannot time anything).
- ``ASTRA_TRITON_AUTOTUNE=0``: keep only the first config of each list (quick compiles).
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import ops

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("ASTRA_TRITON_AUTOTUNE", "1") != "0"
# the same flag as a compile-time constant for @triton.jit code
INTERP: tl.constexpr = tl.constexpr(INTERPRET)


def autotune_configs(names: tuple[str, str], shapes: Sequence[tuple[int, int, int, int]],
                     interpret_shape: tuple[int, int]) -> list:
    """``triton.Config`` per ``(block_a, block_b, num_warps, num_stages)`` in ``shapes``,
    blocks named ``names``; one ``interpret_shape`` config under the interpreter, and
    only the first config with ``ASTRA_TRITON_AUTOTUNE=0``."""
    if INTERPRET:
        return [triton.Config(dict(zip(names, interpret_shape)), num_warps=4, num_stages=1)]
    cfgs = [triton.Config(dict(zip(names, (a, b))), num_warps=w, num_stages=s)
            for a, b, w, s in shapes]
    return cfgs if AUTOTUNE else cfgs[:1]


@triton.jit
def dot16(a, b, acc):
    """16-bit ``tl.dot`` with fp32 accumulation. The interpreter's dot multiplies bf16
    as raw uint16 bits, so there both operands are widened first (exact: bf16 and fp16
    products are exact in fp32, as on the tensor cores)."""
    if INTERP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


def tracing(t: Tensor) -> bool:
    """True while torch traces (dynamo, make_fx, fake or functional tensors)."""
    if type(t) is not torch.Tensor:  # FakeTensor, FunctionalTensor, ...
        return True
    if torch._C._len_torch_dispatch_stack() > 0:  # a TorchDispatchMode is active
        return True
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling and is_compiling())


def launcher(kernel, probe: Tensor):
    """``wrap_triton(kernel)`` while torch traces, so torch.compile sees the launch;
    the plain kernel otherwise. In eager, ``wrap_triton``'s higher-order-op path costs
    far more host time than the kernels themselves (the triton_op body launches plain
    kernels anyway), and an interpreted kernel or an old torch cannot be wrapped."""
    if not tracing(probe):
        return kernel
    if INTERPRET:
        raise RuntimeError("astra_triton ops cannot be traced (torch.compile, make_fx, fake "
                           "tensors) under TRITON_INTERPRET=1: the interpreter runs eagerly "
                           "only; trace the astra:: ops instead")
    try:
        from torch.library import wrap_triton
    except ImportError:
        return kernel
    return wrap_triton(kernel)


try:
    from torch.library import triton_op as _triton_op
except ImportError:  # torch < 2.6: no triton_op
    _triton_op = None
if _triton_op is not None and "schema" not in inspect.signature(_triton_op).parameters:
    _triton_op = None


def register_op(op: str, launcher_fn: Callable, extra_args: str = "") -> Callable:
    """Register ``launcher_fn`` as the ``triton_op`` ``astra_triton::<op>``, whose schema
    is ``ops.SCHEMAS[op]`` with ``extra_args`` (launcher-only options, with defaults)
    appended, so ``torch.compile`` traces into the Triton kernels when the op is called
    directly. Without ``triton_op`` (torch < 2.6) the launcher itself is returned."""
    if _triton_op is None:
        return launcher_fn
    schema = ops.signature(op)
    if extra_args:
        args, returns = schema.rsplit(") -> ", 1)
        schema = f"{args}, {extra_args}) -> {returns}"
    return _triton_op(f"astra_triton::{op}", launcher_fn, mutates_args=(), schema=schema)

"""Triton kernels behind the ``astra::`` ops (CUDA; the CPU interpreter for tests).

``IMPLS[op]`` takes exactly the positional arguments of the op's schema in
:mod:`astra_kernels.ops` and honours its kernel contract. Each entry is the plain
launcher: the ``astra::`` op that calls it already is the dispatched custom op (with a
fake kernel), and a second op inside it would add its own dispatch cost to every call.
Each launcher is also registered as a ``torch.library.triton_op``
(``torch.ops.astra_triton.<op>``, ``OPS[op]``) with the schema of ``ops.SCHEMAS[op]``
(``mixed_attention`` adds ``remote_path``); it launches through ``wrap_triton`` so
``torch.compile`` traces into the Triton kernels when those ops are called directly.
What the kernel modules share is in :mod:`._common`.

With ``TRITON_INTERPRET=1`` set before this package is imported the same kernels run
on CPU tensors in Triton's interpreter (one autotune config, no timing). Set
``ASTRA_TRITON_AUTOTUNE=0`` to keep only the first autotune config (quick compiles),
``ASTRA_TRITON_REMOTE_PATH=gather|codebook`` to force the remote attention path.
"""
import os
import warnings

from .int8_linear import _int8_linear_kernel, int8_linear_op, int8_linear_triton
from .mixed_attention import (
    _code_counts_kernel,
    _merge_attention_kernel,
    _mixed_attention_fwd_kernel,
    choose_remote_path,
    code_counts,
    merge_attention_op,
    merge_attention_triton,
    mixed_attention_op,
    mixed_attention_triton,
)
from .vq_encode import _vq_encode_kernel, vq_encode_op, vq_encode_triton

IMPLS = {
    "vq_encode": vq_encode_triton,
    "mixed_attention": mixed_attention_triton,
    "merge_attention": merge_attention_triton,
    "int8_linear": int8_linear_triton,
}
OPS = {
    "vq_encode": vq_encode_op,
    "mixed_attention": mixed_attention_op,
    "merge_attention": merge_attention_op,
    "int8_linear": int8_linear_op,
}

KERNELS = {
    "vq_encode": _vq_encode_kernel,
    "mixed_attention": _mixed_attention_fwd_kernel,
    "merge_attention": _merge_attention_kernel,
    "code_counts": _code_counts_kernel,
    "int8_linear": _int8_linear_kernel,
}


def _release(version: str) -> tuple:
    out = []
    for part in version.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's CPU interpreter will fail with these versions, or ``None``.

    Triton before 3.8 turns a scalar kernel argument into a Python int with
    ``int(array)`` on a one-element array, which numpy 2.4 and later refuse ("only
    0-dimensional arrays can be converted to Python scalars"), so every kernel that
    uses a runtime scalar in ``range`` fails in the interpreter. Compiled kernels (a
    GPU) are not affected.
    """
    if _release(triton_version) < (3, 8) and _release(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s CPU interpreter fails with numpy {numpy_version} "
                "('only 0-dimensional arrays can be converted to Python scalars'); use "
                "numpy<2.4 or triton>=3.8 to run the Triton kernels under TRITON_INTERPRET=1")
    return None


if os.environ.get("TRITON_INTERPRET") == "1":
    import numpy
    import triton
    _problem = interpreter_problem(triton.__version__, numpy.__version__)
    if _problem:
        warnings.warn(_problem, RuntimeWarning, stacklevel=2)

__all__ = [
    "IMPLS",
    "KERNELS",
    "OPS",
    "choose_remote_path",
    "code_counts",
    "interpreter_problem",
    "merge_attention_triton",
    "mixed_attention_triton",
    "vq_encode_triton",
]

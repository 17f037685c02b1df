"""Triton kernels behind the ``astra::`` ops (CUDA; the CPU interpreter for tests).

``IMPLS[op]`` takes exactly the positional arguments of the op's schema in
:mod:`astra_kernels.ops` and honours its kernel contract. Each entry is the plain
launcher: the ``astra::`` op that calls it already is the dispatched custom op (with a
fake kernel), and going through a second op cost ~65 us of host time per call on an
H100. Each launcher is also registered as a ``torch.library.triton_op``
(``torch.ops.astra_triton.<op>``) that launches through ``wrap_triton``, so
``torch.compile`` traces into the Triton kernels when those ops are called directly.

With ``TRITON_INTERPRET=1`` set before this package is imported the same kernels run
on CPU tensors in Triton's interpreter (one autotune config, no timing). Set
``ASTRA_TRITON_AUTOTUNE=0`` to keep only the first autotune config (quick compiles),
``ASTRA_TRITON_REMOTE_PATH=gather|codebook`` to force the remote attention path.
"""
import os
import warnings
from typing import Optional

from .mixed_attention import (_code_counts_kernel, _merge_attention_kernel,
                              _mixed_attention_fwd_kernel,
                              choose_remote_path, code_counts, merge_attention_op,
                              merge_attention_triton, mixed_attention_op,
                              mixed_attention_triton)
from .vq_encode import _vq_encode_kernel, vq_encode_op, vq_encode_triton

IMPLS = {
    "vq_encode": vq_encode_triton,
    "mixed_attention": mixed_attention_triton,
    "merge_attention": merge_attention_triton,
}
OPS = {
    "vq_encode": vq_encode_op,
    "mixed_attention": mixed_attention_op,
    "merge_attention": merge_attention_op,
}

KERNELS = {
    "vq_encode": _vq_encode_kernel,
    "mixed_attention": _mixed_attention_fwd_kernel,
    "merge_attention": _merge_attention_kernel,
    "code_counts": _code_counts_kernel,
}


def _release(version: str) -> tuple:
    out = []
    for part in version.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def interpreter_problem(triton_version: str, numpy_version: str) -> Optional[str]:
    """Why Triton's CPU interpreter will fail with these versions, or ``None``.

    Triton 3.6's interpreter turns a scalar kernel argument into a Python int with
    ``int(array)`` on a one-element array, which numpy 2.4 refuses ("only
    0-dimensional arrays can be converted to Python scalars"): every kernel that uses
    a runtime scalar in ``range`` fails. Seen with triton 3.6.0 + numpy 2.4.6; the same
    tests pass with numpy 2.3.5, and with triton 3.8 + numpy 2.4. Compiled kernels (a
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

__all__ = ["interpreter_problem", "IMPLS", "OPS", "KERNELS", "vq_encode_triton",
           "mixed_attention_triton",
           "merge_attention_triton", "choose_remote_path", "code_counts"]

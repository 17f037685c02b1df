"""Astra kernels: fused VQ encode, code packing and mixed-precision attention.

Public ops (each validates its input and dispatches to the best backend here):
:func:`vq_encode`, :func:`pack_codes`, :func:`unpack_codes`,
:func:`mixed_attention`, :func:`merge_attention`, :func:`int8_linear` (with
:func:`quantize_int8` and :class:`Int8Linear`). The plain-PyTorch ground truth is
in :mod:`astra_kernels.reference`; :func:`backend_info` says which backend serves
each op. The choice is made on an op's first call and kept; :func:`use_backend`
changes it for a block, :func:`reset_backend_cache` after ``ASTRA_BACKEND`` /
``ASTRA_CPU_BACKEND`` change at run time. This package knows nothing of models or
networks.
"""
from . import ops  # noqa: F401  (declares torch.ops.astra.*)
from ._backends import _load_C, compiled_status, use_backend
from ._backends import available as available_backends
from ._backends import info as backend_info
from ._backends import reset as reset_backend_cache
from .api import (
    Int8Linear,
    int8_linear,
    merge_attention,
    mixed_attention,
    pack_codes,
    quantize_int8,
    set_code_checks,
    unpack_codes,
    vq_encode,
)

__version__ = "0.1.0"

_load_C()

__all__ = [
    "Int8Linear",
    "__version__",
    "available_backends",
    "backend_info",
    "compiled_status",
    "int8_linear",
    "merge_attention",
    "mixed_attention",
    "pack_codes",
    "quantize_int8",
    "reset_backend_cache",
    "set_code_checks",
    "unpack_codes",
    "use_backend",
    "vq_encode",
]

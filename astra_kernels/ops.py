"""Every Astra op, declared in one place (torch.library namespace ``astra``; the same
schemas serve ``astra_C`` and ``astra_triton``).

Each op has
- a schema (below),
- a fake kernel, so ``torch.compile`` and meta tensors trace it,
- a CPU and a CUDA kernel that forward to the backend chosen in
  :mod:`astra_kernels._backends` (compiled C++/CUDA, Triton, or the reference).

The ops take inputs already validated and normalized by :mod:`astra_kernels.api`;
call those wrappers (``astra_kernels.vq_encode`` ...) rather than ``torch.ops.astra``
unless you know the inputs are well formed.

:data:`SCHEMAS` is the only place the schemas are written. Every namespace takes them
from here:
- ``astra``: defined below;
- ``astra_C`` (the compiled kernels): the extension registers kernels only
  (``TORCH_LIBRARY_IMPL``); :func:`define_compiled` gives them these schemas right after
  ``astra_kernels._C`` is imported. The dispatcher keeps kernels registered before their
  schema and checks each kernel's C++ signature against the schema when it arrives, so
  a kernel that disagrees with this list fails loudly. The C++ test binary (no Python)
  defines the same list from a header that CMake generates from this file;
- ``astra_triton`` (Triton ops that ``torch.compile`` traces into):
  :func:`astra_kernels.triton._common.register_op` (``mixed_attention`` appends a
  ``remote_path`` option).

Kernel contract (what every backend may assume):
- ``vq_encode``: ``x [M, D]`` contiguous float (fp32/fp16/bf16), ``codebooks [G, K, D/G]``
  contiguous float32; returns ``int32 [M, G]`` and fp32 ``err [M]`` (empty unless asked).
  A row group holding a NaN or an infinity gets code ``-1`` and its row ``err`` NaN
  (kernels: the group's best distance is not finite).
- ``pack_codes``: ``codes`` contiguous int32 in ``[0, 2**bits)``, ``1 <= bits <= 16``.
- ``unpack_codes``: ``payload`` contiguous uint8 of exactly ``ceil(prod(shape)*bits/8)``.
- ``mixed_attention``: ``q [B,H,Tq,d]``, ``k, v [B,Hkv,Tl,d]`` contiguous, one dtype;
  either ``codes [B,Tr,G]`` int32 in ``[-1, K)`` with ``pk, pv [G,K,Hkv,d]`` (q's dtype),
  or ``remote_k, remote_v [B,Hkv,Tr,d]``, or neither (Tr = 0); when ``causal`` all three
  position tensors are given (int64); ``scale`` is given. ``rope_cos, rope_sin``: both
  or neither, and only when ``Tr > 0``: contiguous float32 ``[B or 1, Tr, R]`` (one
  shape), ``R`` even, ``2 <= R <= d``. Remote key ``j`` (the sum over groups rounded to
  the table dtype, or ``remote_k``) is rotated on its first ``R`` dims,
  ``k[:R] = k[:R] * cos + rotate_half(k[:R]) * sin`` (HF's ``apply_rotary_pos_emb``;
  ``rotate_half(x) = cat(-x[R/2:], x[:R/2])``) in fp32, rounded to the table dtype;
  values, queries and local keys are not touched. Rotated keys depend on the position,
  so with rope every backend takes the gather path, never codebook space.
  NaN: a row is empty (zeros, ``lse = -inf``) only when its softmax sum is exactly 0;
  masked scores become ``-inf`` by a select (never ``+ -inf``), so a NaN score among a
  row's visible keys gives NaN out and lse and a masked one never reaches its lse.
- ``merge_attention``: ``out_* [..., d]`` one dtype, ``lse_* [...]`` float32, same shapes;
  a NaN ``lse`` on either side gives a NaN row (out and lse).
- ``int8_linear``: ``x [M, K]`` contiguous float (fp32/fp16/bf16), ``weight [N, K]``
  contiguous int8, ``scale`` contiguous float32 ``[N]`` (one per row) or ``[N, K/g]``
  (one per group of ``g`` weights of a row, ``g`` a multiple of 32), ``bias [N]`` (or
  None) contiguous float32, ``offset`` (or None) contiguous float32 of scale's shape;
  returns ``[M, N]`` in x's dtype, ``y[m, n] = sum_k x[m, k] * (weight[n, k] *
  scale[n, k // g] + offset[n, k // g]) + bias[n]`` summed in fp32 (the CPU kernel
  rounds rows of up to 16 tokens of x to int16 first).
"""
from __future__ import annotations

import torch
from torch.library import Library

from . import _backends

SCHEMAS = {
    "vq_encode": "vq_encode(Tensor x, Tensor codebooks, str precision='fp32', "
                 "bool return_error=False) -> (Tensor, Tensor)",
    "pack_codes": "pack_codes(Tensor codes, int bits) -> Tensor",
    "unpack_codes": "unpack_codes(Tensor payload, SymInt[] shape, int bits) -> Tensor",
    "mixed_attention": "mixed_attention(Tensor q, Tensor k, Tensor v, Tensor? codes, "
                       "Tensor? pk, Tensor? pv, Tensor? remote_k, Tensor? remote_v, "
                       "bool causal=False, Tensor? q_pos=None, Tensor? kv_pos=None, "
                       "Tensor? remote_pos=None, float? scale=None, Tensor? rope_cos=None, "
                       "Tensor? rope_sin=None) -> (Tensor, Tensor)",
    "merge_attention": "merge_attention(Tensor out_a, Tensor lse_a, Tensor out_b, "
                       "Tensor lse_b) -> (Tensor, Tensor)",
    "int8_linear": "int8_linear(Tensor x, Tensor weight, Tensor scale, Tensor? bias, "
                   "Tensor? offset=None) -> Tensor",
}


def signature(op: str) -> str:
    """``SCHEMAS[op]`` without the op name: ``"(args) -> returns"``."""
    return SCHEMAS[op][len(op):]


def _define(namespace: str, kind: str) -> Library:
    lib = Library(namespace, kind)
    for schema in SCHEMAS.values():
        lib.define(schema)
    return lib


_lib = _define("astra", "DEF")
_compiled_lib: Library | None = None  # kept alive: a freed Library drops its ops


def define_compiled() -> None:
    """Give the compiled kernels (``torch.ops.astra_C``) the schemas of :data:`SCHEMAS`.

    Called once by :func:`astra_kernels._backends._load_C` after ``astra_kernels._C`` is
    imported. Raises ``RuntimeError`` when a kernel's C++ signature disagrees with its
    schema, or when the extension defines a schema itself (a build older than this file).
    """
    global _compiled_lib
    if _compiled_lib is None:
        _compiled_lib = _define("astra_C", "FRAGMENT")


def _forwarder(op: str, device_type: str):
    def kernel(*args):
        return _backends.impl(op, device_type)(*args)
    kernel.__name__ = f"{op}_{device_type}"
    return kernel


for _op in SCHEMAS:
    for _key, _dev in (("CPU", "cpu"), ("CUDA", "cuda")):
        _lib.impl(_op, _forwarder(_op, _dev), _key)


@torch.library.register_fake("astra::vq_encode")
def _vq_encode_fake(x, codebooks, precision="fp32", return_error=False):
    M, G = x.shape[0], codebooks.shape[0]
    err = x.new_empty((M,) if return_error else (0,), dtype=torch.float32)
    return x.new_empty((M, G), dtype=torch.int32), err


@torch.library.register_fake("astra::pack_codes")
def _pack_codes_fake(codes, bits):
    return codes.new_empty(((codes.numel() * bits + 7) // 8,), dtype=torch.uint8)


@torch.library.register_fake("astra::unpack_codes")
def _unpack_codes_fake(payload, shape, bits):
    return payload.new_empty(shape, dtype=torch.int32)


@torch.library.register_fake("astra::mixed_attention")
def _mixed_attention_fake(q, k, v, codes, pk, pv, remote_k, remote_v, causal=False,
                          q_pos=None, kv_pos=None, remote_pos=None, scale=None,
                          rope_cos=None, rope_sin=None):
    B, H, Tq, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, Tq), dtype=torch.float32)


@torch.library.register_fake("astra::int8_linear")
def _int8_linear_fake(x, weight, scale, bias=None, offset=None):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.register_fake("astra::merge_attention")
def _merge_attention_fake(out_a, lse_a, out_b, lse_b):
    return torch.empty_like(out_a), torch.empty_like(lse_a)

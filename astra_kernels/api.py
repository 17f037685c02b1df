"""The public op functions: validate, normalize, then call ``torch.ops.astra``.

Every bad input raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong
shape, value or device) with a message that names the argument, before any kernel
runs: the fast paths never see malformed data.

Non-finite values are not bad input (finding them would cost a pass over the data);
each op says what it returns for them, and every backend returns the same:
``vq_encode`` gives code ``-1`` to a group that holds a NaN or an infinity, and NaN in
the attention inputs gives NaN in the outputs that depend on it (see
:func:`mixed_attention`, :func:`merge_attention`). A non-finite ``scale`` is refused.

Autograd: the kernels are forward-only. ``mixed_attention`` and ``merge_attention``
compute inputs that require grad (with grad mode on) by the plain-PyTorch reference
(:mod:`astra_kernels.reference`), which autograd differentiates; ``vq_encode`` is
not differentiable and its outputs never require grad.
"""
from __future__ import annotations

import math
import numbers
import operator
from collections import abc
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import (
    _backends,
    ops,  # noqa: F401  (registers torch.ops.astra.*)
    reference,
)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
PRECISIONS = ("fp32", "bf16")

# Check that codes lie in range before the kernels read tables with them. On CUDA
# this costs one device sync per call; callers that produce codes themselves
# (the runner, k-means) may turn it off with ``set_code_checks(False)``: the kernels
# then treat out-of-range codes as missing instead of reading out of bounds (int64
# codes are clamped to [-1, K] first, so none wraps into range as int32).
_CHECK_CODES = True


def set_code_checks(enabled: bool) -> None:
    """Turn the range check on codes in :func:`mixed_attention` on or off."""
    global _CHECK_CODES
    _CHECK_CODES = bool(enabled)


def _tensor(name: str, t, dtypes=None, ndim: Optional[int] = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; "
                        f"expected one of: {names}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def _same_device(**tensors: Optional[Tensor]) -> None:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for n, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{n} is on {t.device} but {first_name} is on {first.device}; "
                             "all tensors must be on one device")


def _bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    return bits


def vq_encode(x: Tensor, codebooks: Tensor, *, precision: str = "fp32",
              return_error: bool = False):
    """Encode vectors by their nearest codeword in each group (squared L2).

    Args:
        x: ``[..., D]`` float32/float16/bfloat16.
        codebooks: ``[G, K, D // G]`` float; group ``g`` of ``x`` (dims
            ``g*D/G ... (g+1)*D/G - 1``) is matched against ``codebooks[g]``.
        precision: ``"fp32"`` computes exact fp32 distances (agrees with faiss
            ``IndexFlatL2`` up to exact ties); ``"bf16"`` may use bf16 products with
            fp32 accumulation (faster where the CPU/GPU has bf16 units, near-exact).
        return_error: also return the squared distance to the chosen codewords,
            summed over groups, per vector (float32 ``[...]``).

    Returns:
        ``int32 [..., G]`` codes, ties to the lowest index; with ``return_error``,
        ``(codes, err)``. Not differentiable: neither output requires grad.

    Non-finite input: a group of a vector that holds a NaN or an infinity has no
    nearest codeword; its code is ``-1`` (the code :func:`mixed_attention` reads as a
    missing token; :func:`pack_codes` refuses it) and, with ``return_error``, that
    vector's ``err`` is NaN. Every backend does this at no extra cost (no check pass
    over ``x``). Codebooks must be finite, and finite values so large that squared
    distances overflow float32 (beyond about ``1e19``) give unspecified codes.
    """
    _tensor("x", x, FLOAT_DTYPES)
    _tensor("codebooks", codebooks, FLOAT_DTYPES + (torch.float64,), ndim=3)
    _same_device(x=x, codebooks=codebooks)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., D]")
    G, K, dg = codebooks.shape
    D = x.shape[-1]
    if G < 1 or K < 1 or dg < 1:
        raise ValueError(f"codebooks must be non-empty [G, K, D//G], got {tuple(codebooks.shape)}")
    if G * dg != D:
        if D % G != 0:
            raise ValueError(f"G={G} groups do not divide x's last dim D={D}")
        raise ValueError(f"codebooks' last dim is {dg} but D/G = {D}/{G} = {D // G}")
    lead = x.shape[:-1]
    x2 = x.detach().reshape(-1, D).contiguous()  # forward-only: no autograd graph
    cb = codebooks.detach().to(torch.float32).contiguous()
    codes, err = torch.ops.astra.vq_encode(x2, cb, precision, return_error)
    codes = codes.reshape(*lead, G)
    if return_error:
        return codes, err.reshape(lead)
    return codes


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes into the wire format: exactly ``ceil(numel*bits/8)`` bytes.

    Code ``i`` (in row-major order) occupies bits ``i*bits ... i*bits+bits-1`` of a
    little-endian bit stream (least significant bit first). Codes must lie in
    ``[0, 2**bits)``.
    """
    _tensor("codes", codes, INT_DTYPES)
    bits = _bits(bits)
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= (1 << bits):
            why = (" (-1 marks a missing token, or a vector vq_encode could not encode: "
                   "NaN or inf; it has no wire form)" if lo == -1 else "")
            raise ValueError(f"codes must lie in [0, {1 << bits}) for bits={bits}, "
                             f"got values in [{lo}, {hi}]{why}")
    return torch.ops.astra.pack_codes(codes.to(torch.int32).contiguous(), bits)


def unpack_codes(payload: Tensor, shape: Sequence[int], bits: int) -> Tensor:
    """Inverse of :func:`pack_codes`: the ``int32`` codes of ``shape`` from ``payload``."""
    _tensor("payload", payload, (torch.uint8,), ndim=1)
    bits = _bits(bits)
    shape = _shape("shape", shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must be non-negative, got {shape}")
    need = (math.prod(shape) * bits + 7) // 8
    if payload.numel() != need:
        raise ValueError(f"payload has {payload.numel()} bytes but shape {shape} at "
                         f"{bits} bits needs exactly {need}")
    return torch.ops.astra.unpack_codes(payload.contiguous(), list(shape), bits)


def _shape(name: str, shape) -> Tuple[int, ...]:
    """``shape`` as a tuple of ints: a sequence (list, tuple, ``torch.Size``) of
    integers (Python or 0-D integer tensors); floats are refused, never truncated."""
    if isinstance(shape, Tensor) and shape.dim() == 1 and not (
            shape.dtype.is_floating_point or shape.dtype.is_complex or shape.dtype == torch.bool):
        shape = shape.tolist()
    if isinstance(shape, (str, bytes)) or not isinstance(shape, abc.Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {type(shape).__name__}")
    out = []
    for s in shape:
        if isinstance(s, bool) or isinstance(s, float) or (
                isinstance(s, Tensor) and (s.dtype.is_floating_point or s.dtype == torch.bool)):
            raise TypeError(f"{name} must hold ints, got {s!r} in {tuple(shape)}")
        try:
            out.append(operator.index(s))
        except TypeError:
            raise TypeError(f"{name} must hold ints, got {type(s).__name__} {s!r} "
                            f"in {tuple(shape)}") from None
    return tuple(out)


def _positions(name: str, pos: Optional[Tensor], n: int, device) -> Tensor:
    if pos is None:
        return torch.arange(n, device=device, dtype=torch.int64)
    _tensor(name, pos, INT_DTYPES, ndim=1)
    if pos.shape[0] != n:
        raise ValueError(f"{name} has {pos.shape[0]} entries but there are {n} such tokens")
    return pos.to(torch.int64).contiguous()


def _rope(cos: Optional[Tensor], sin: Optional[Tensor], B: int, Tr: int,
          d: int) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Validate ``rope_cos``/``rope_sin`` against the remote tokens; return them as
    contiguous float32 ``[B or 1, Tr, R]``, or ``(None, None)`` when there is nothing to
    rotate (no rope, or no remote tokens)."""
    if cos is None and sin is None:
        return None, None
    if cos is None or sin is None:
        given, missing = ("rope_cos", "rope_sin") if sin is None else ("rope_sin", "rope_cos")
        raise ValueError(f"{given} was given without {missing}; pass both or neither")
    _tensor("rope_cos", cos, FLOAT_DTYPES + (torch.float64,), ndim=3)
    _tensor("rope_sin", sin, FLOAT_DTYPES + (torch.float64,), ndim=3)
    Bc, Tc, R = cos.shape
    if Bc not in (1, B) or Tc != Tr:
        raise ValueError(f"rope_cos has shape {tuple(cos.shape)}; expected [B={B} or 1, "
                         f"Tr={Tr}, R] (one row per remote token)")
    if R % 2 or not 2 <= R <= d:
        raise ValueError(f"rope_cos has R={R} rotary dims; R must be even and in [2, d={d}]")
    if sin.shape != cos.shape:
        raise ValueError(f"rope_sin has shape {tuple(sin.shape)} but rope_cos has "
                         f"{tuple(cos.shape)}; they must match")
    if Tr == 0:
        return None, None
    return (cos.to(torch.float32).contiguous(), sin.to(torch.float32).contiguous())


def mixed_attention(q: Tensor, k: Tensor, v: Tensor, codes: Optional[Tensor] = None,
                    pk: Optional[Tensor] = None, pv: Optional[Tensor] = None, *,
                    remote_k: Optional[Tensor] = None, remote_v: Optional[Tensor] = None,
                    causal: bool = False, q_pos: Optional[Tensor] = None,
                    kv_pos: Optional[Tensor] = None, remote_pos: Optional[Tensor] = None,
                    scale: Optional[float] = None, rope_cos: Optional[Tensor] = None,
                    rope_sin: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Attention of local queries over local keys (full precision) and remote keys.

    Remote keys come either as codes into projected codebooks (remote key ``j`` is
    ``sum_g pk[g, codes[b, j, g]]``, likewise values; fold any bias into group 0) or
    already materialized.

    Args:
        q: ``[B, H, Tq, d]`` float32/float16/bfloat16.
        k, v: ``[B, Hkv, Tl, d]`` local keys/values, ``H % Hkv == 0`` (GQA).
        codes: ``[B, Tr, G]`` integer codes; ``-1`` in any group marks a missing
            (lost) token, which is masked.
        pk, pv: ``[G, K, Hkv, d]`` projected codebooks, q's dtype.
        remote_k, remote_v: ``[B, Hkv, Tr, d]`` instead of codes.
        causal: mask by global position: a key is visible when its position is
            ``<=`` the query's. ``q_pos [Tq]``, ``kv_pos [Tl]``, ``remote_pos [Tr]``;
            ``q_pos``/``kv_pos`` default to ``arange`` when ``Tq == Tl``.
        scale: score scale, default ``1/sqrt(d)``.
        rope_cos, rope_sin: rotary embedding of the remote keys (both or neither):
            ``[B, Tr, R]`` or ``[1, Tr, R]`` (shared by the batch), float (computed in
            float32), ``R`` even, ``2 <= R <= d``; the model's own rotary cos/sin at the
            remote tokens' global positions, in HF's layout (``cat(freqs, freqs)``).
            Remote key ``j`` (from the tables, or ``remote_k``) is rotated on its first
            ``R`` dims, ``k[:R] * cos + rotate_half(k[:R]) * sin`` as HF's
            ``apply_rotary_pos_emb`` does; dims ``R..d``, values, queries and local keys
            (which arrive rotated) are not touched. With rope the kernels gather every
            remote key (codebook-space attention needs position-free keys).

    Returns:
        ``(out [B, H, Tq, d] in q's dtype, lse [B, H, Tq] float32)``, ``lse`` the
        natural-log log-sum-exp of the scaled, masked scores. A query that sees no
        key gets zeros and ``lse = -inf``.

    NaN in, NaN out, on every backend (as plain softmax attention, the reference):
    a query with a NaN in ``q`` gets NaN ``out`` and ``lse``, and so does every query
    that sees a key with a NaN (in ``k``, ``remote_k``, ``pk`` rows of its codes, or
    ``rope_cos``/``rope_sin`` of a remote key); a NaN in a value a query sees makes
    its ``out`` NaN (``lse`` stays finite). A query that sees no key still gets zeros
    and ``-inf``. Keys a query does not see (causal mask, missing codes) never make
    its ``lse`` NaN, but a NaN *value* of such a key may reach its ``out`` on some
    backends and not others (``0 * NaN`` where a kernel reads a masked tile), and
    ``+-inf`` inputs give NaN or ``+-inf`` depending on the backend. ``scale`` must
    be finite (``ValueError``).

    Autograd: the kernels are forward-only. When grad mode is on and a float input
    requires grad, the result is computed by :func:`astra_kernels.reference.mixed_attention`
    (plain PyTorch, materializes the ``[B, H, Tq, Tl + Tr]`` scores), which autograd
    differentiates with respect to ``q, k, v, pk, pv, remote_k, remote_v`` and
    ``rope_cos, rope_sin``.
    """
    _tensor("q", q, FLOAT_DTYPES, ndim=4)
    _tensor("k", k, FLOAT_DTYPES, ndim=4)
    _tensor("v", v, FLOAT_DTYPES, ndim=4)
    B, H, Tq, d = q.shape
    Bk, Hkv, Tl, dk = k.shape
    if d < 1:
        raise ValueError(f"q has shape {tuple(q.shape)}: head dim d=0; attention needs d >= 1")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")
    if Bk != B or dk != d:
        raise ValueError(f"k has shape {tuple(k.shape)}; expected [B={B}, Hkv, Tl, d={d}]")
    if v.shape != k.shape:
        raise ValueError(f"v has shape {tuple(v.shape)} but k has {tuple(k.shape)}")
    if Hkv < 1 or H % Hkv != 0:
        raise ValueError(f"q's {H} heads are not a multiple of k's {Hkv} heads")
    if codes is not None and (remote_k is not None or remote_v is not None):
        raise ValueError("pass either codes (with pk, pv) or remote_k/remote_v, not both")
    _same_device(q=q, k=k, v=v, codes=codes, pk=pk, pv=pv, remote_k=remote_k,
                 remote_v=remote_v, q_pos=q_pos, kv_pos=kv_pos, remote_pos=remote_pos,
                 rope_cos=rope_cos, rope_sin=rope_sin)

    Tr = 0
    if codes is not None:
        _tensor("codes", codes, INT_DTYPES, ndim=3)
        if pk is None or pv is None:
            raise ValueError("codes need the projected codebooks pk and pv")
        _tensor("pk", pk, FLOAT_DTYPES, ndim=4)
        _tensor("pv", pv, FLOAT_DTYPES, ndim=4)
        G, K = pk.shape[0], pk.shape[1]
        if pk.shape[2:] != (Hkv, d):
            raise ValueError(f"pk has shape {tuple(pk.shape)}; expected [G, K, Hkv={Hkv}, d={d}]")
        if pv.shape != pk.shape:
            raise ValueError(f"pv has shape {tuple(pv.shape)} but pk has {tuple(pk.shape)}")
        for name, t in (("pk", pk), ("pv", pv)):
            if t.dtype != q.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")
        if codes.shape[0] != B or codes.shape[2] != G:
            raise ValueError(f"codes has shape {tuple(codes.shape)}; expected [B={B}, Tr, G={G}]")
        if K < 1:
            raise ValueError("pk has no codewords (K = 0)")
        if _CHECK_CODES and codes.numel():
            lo, hi = int(codes.min()), int(codes.max())
            if lo < -1 or hi >= K:
                raise ValueError(f"codes must lie in [-1, {K}) (K={K}; -1 = missing), "
                                 f"got values in [{lo}, {hi}]")
        elif codes.dtype == torch.int64:
            # unchecked: int64 codes outside int32 would wrap into valid codes (2**32 + 3
            # -> 3); clamped to [-1, K] they stay out of range, hence missing
            codes = codes.clamp(-1, K)
        Tr = codes.shape[1]
        codes = codes.to(torch.int32).contiguous()
        pk, pv = pk.contiguous(), pv.contiguous()
    elif pk is not None or pv is not None:
        raise ValueError("pk/pv were given without codes")
    elif remote_k is not None or remote_v is not None:
        if remote_k is None or remote_v is None:
            raise ValueError("remote_k and remote_v must be given together")
        _tensor("remote_k", remote_k, FLOAT_DTYPES, ndim=4)
        _tensor("remote_v", remote_v, FLOAT_DTYPES, ndim=4)
        for name, t in (("remote_k", remote_k), ("remote_v", remote_v)):
            if t.dtype != q.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")
        if remote_k.shape[0] != B or remote_k.shape[1] != Hkv or remote_k.shape[3] != d:
            raise ValueError(f"remote_k has shape {tuple(remote_k.shape)}; "
                             f"expected [B={B}, Hkv={Hkv}, Tr, d={d}]")
        if remote_v.shape != remote_k.shape:
            raise ValueError(f"remote_v has shape {tuple(remote_v.shape)} but remote_k has "
                             f"{tuple(remote_k.shape)}")
        Tr = remote_k.shape[2]
        remote_k, remote_v = remote_k.contiguous(), remote_v.contiguous()

    rope_cos, rope_sin = _rope(rope_cos, rope_sin, B, Tr, d)

    if causal:
        if (q_pos is None or kv_pos is None) and Tq != Tl:
            raise ValueError(f"causal attention with Tq={Tq} != Tl={Tl} needs q_pos and kv_pos")
        q_pos = _positions("q_pos", q_pos, Tq, q.device)
        kv_pos = _positions("kv_pos", kv_pos, Tl, q.device)
        if Tr and remote_pos is None:
            raise ValueError("causal attention with remote tokens needs remote_pos")
        remote_pos = _positions("remote_pos", remote_pos, Tr, q.device)
    else:
        q_pos = kv_pos = remote_pos = None
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    else:
        if isinstance(scale, bool) or not (isinstance(scale, numbers.Real) or (
                isinstance(scale, Tensor) and scale.numel() == 1)):
            raise TypeError(f"scale must be a float, got {type(scale).__name__}")
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
    args = (q.contiguous(), k.contiguous(), v.contiguous(), codes, pk, pv, remote_k, remote_v,
            bool(causal), q_pos, kv_pos, remote_pos, float(scale), rope_cos, rope_sin)
    if _needs_grad(q, k, v, pk, pv, remote_k, remote_v, rope_cos, rope_sin):
        return reference.mixed_attention(*args)
    return torch.ops.astra.mixed_attention(*args)


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd must see through the op: grad mode on and an input requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def merge_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor,
                    lse_b: Tensor) -> Tuple[Tensor, Tensor]:
    """Exactly merge two partial attentions over disjoint key sets.

    ``out_* [..., d]`` (one float dtype, at least 1-D), ``lse_* [...]`` float32 as
    returned by :func:`mixed_attention`. Returns ``(out, lse)`` as if attention had run
    over the union of both key sets. Rows empty on both sides (``lse = -inf``) give
    zeros and ``-inf``; a NaN ``lse`` on either side gives NaN ``out`` and ``lse`` for
    that row, and a NaN in ``out_a``/``out_b`` gives NaN where that side has weight.
    With grad mode on and an input that requires grad, the plain-PyTorch reference
    computes it (differentiable).
    """
    _tensor("out_a", out_a, FLOAT_DTYPES)
    _tensor("out_b", out_b, FLOAT_DTYPES)
    _tensor("lse_a", lse_a, (torch.float32,))
    _tensor("lse_b", lse_b, (torch.float32,))
    _same_device(out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)
    if out_b.dtype != out_a.dtype:
        raise TypeError(f"out_b has dtype {out_b.dtype} but out_a has {out_a.dtype}")
    if out_b.shape != out_a.shape:
        raise ValueError(f"out_b has shape {tuple(out_b.shape)} but out_a has {tuple(out_a.shape)}")
    if out_a.dim() < 1:
        raise ValueError("out_a is 0-D; expected out_a [..., d] (at least 1-D, the last "
                         "dim the head dim) with lse_a of shape out_a.shape[:-1]")
    if lse_a.shape != out_a.shape[:-1]:
        raise ValueError(f"lse_a has shape {tuple(lse_a.shape)}; "
                         f"expected {tuple(out_a.shape[:-1])} (out_a's shape without its last dim)")
    if lse_b.shape != lse_a.shape:
        raise ValueError(f"lse_b has shape {tuple(lse_b.shape)} but lse_a has {tuple(lse_a.shape)}")
    args = (out_a.contiguous(), lse_a.contiguous(), out_b.contiguous(), lse_b.contiguous())
    if _needs_grad(*args):
        return reference.merge_attention(*args)
    return torch.ops.astra.merge_attention(*args)


def quantize_int8(weight: Tensor, group_size: Optional[int] = None, *,
                  asymmetric: bool = False) -> Tuple[Tensor, ...]:
    """int8 quantization of a ``[N, K]`` float weight (an ``nn.Linear`` layout), one
    scale per row (``group_size`` None: ``[N]``) or per ``group_size`` consecutive
    weights of a row (``[N, K / group_size]``; a multiple of 32 that divides K).

    Symmetric (default): ``(q, scale)``, ``weight ≈ q * scale``, ``scale = max|group| /
    127`` (1 for an all-zero group). ``asymmetric``: ``(q, scale, offset)``, ``weight ≈ q *
    scale + offset`` with the 256 levels spread over ``[min, max]`` of each group, which
    holds a GGUF's Q4_1 blocks (16 evenly spaced levels per 32 weights) exactly.
    Non-finite weights are refused (``ValueError``)."""
    _tensor("weight", weight, FLOAT_DTYPES, ndim=2)
    N, K = weight.shape
    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight holds NaN or infinity; it cannot be quantized")
    if group_size is None:
        g = w.reshape(N, 1, K)
    else:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or \
                group_size < 32 or group_size % 32 or K % group_size:
            raise ValueError(f"group_size must be a multiple of 32 that divides K={K}, "
                             f"got {group_size}")
        g = w.reshape(N, K // group_size, group_size)
    shape = (N,) if group_size is None else (N, K // group_size)
    if asymmetric:
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = torch.where(hi > lo, (hi - lo) / 255.0, torch.ones_like(lo))
        q = torch.round((g - lo) / scale).clamp_(0, 255) - 128
        offset = lo + 128 * scale
        return (q.to(torch.int8).reshape(N, K).contiguous(), scale.reshape(shape).contiguous(),
                offset.reshape(shape).contiguous())
    amax = g.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(g / scale).clamp_(-127, 127).to(torch.int8).reshape(N, K)
    return q.contiguous(), scale.reshape(shape).contiguous()


def _check_int8(weight: Tensor, scale: Tensor, bias: Optional[Tensor],
                offset: Optional[Tensor] = None) -> None:
    _tensor("weight", weight, (torch.int8,), ndim=2)
    _tensor("scale", scale, FLOAT_DTYPES)
    N, K = weight.shape
    ng = scale.shape[1] if scale.dim() == 2 else 1
    if scale.dim() not in (1, 2) or scale.shape[0] != N or ng < 1 or K % ng or \
            (ng > 1 and (K // ng) % 32):
        raise ValueError(f"scale has shape {tuple(scale.shape)}; expected [N={N}] or "
                         f"[N, groups] splitting K={K} into groups of a multiple of 32")
    if offset is not None:
        _tensor("offset", offset, FLOAT_DTYPES)
        if offset.shape != scale.shape:
            raise ValueError(f"offset has shape {tuple(offset.shape)} but scale has "
                             f"{tuple(scale.shape)}; they must match")
    if bias is not None:
        _tensor("bias", bias, FLOAT_DTYPES, ndim=1)
        if bias.shape[0] != N:
            raise ValueError(f"bias has shape {tuple(bias.shape)}; expected [N={N}]")


def _check_x(x: Tensor, K: int, N: int) -> None:
    _tensor("x", x, FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x has shape {tuple(x.shape)} but weight is [N={N}, K={K}]: "
                         f"x's last dim must be K")


def int8_linear(x: Tensor, weight: Tensor, scale: Tensor, bias: Optional[Tensor] = None,
                offset: Optional[Tensor] = None) -> Tensor:
    """``nn.Linear`` with int8 weights (weight-only quantization):
    ``x @ (weight * scale + offset)^T + bias``, scale and offset per row or per group.

    Args:
        x: ``[..., K]`` float32/float16/bfloat16.
        weight: ``[N, K]`` int8 (from :func:`quantize_int8`).
        scale: ``[N]`` float, one per output row, or ``[N, K/g]``, one per group of
            ``g`` consecutive weights of a row (``g`` a multiple of 32).
        bias: ``[N]`` float or None.
        offset: None, or float of scale's shape (asymmetric groups, from
            ``quantize_int8(..., asymmetric=True)``).

    Returns ``[..., N]`` in x's dtype. Decode multiplies one token by each weight once,
    so its time is the weight bytes read: int8 reads 4x fewer than float32. The sums
    are float32; the CPU kernel rounds rows of up to 16 tokens to int16 first (one scale
    per row, a relative error below 2^-15 of the row's largest value) to use integer
    dot-product instructions. Forward only (the result never requires grad).
    :class:`Int8Linear` keeps checked weights for a loop that calls this often.
    """
    _check_int8(weight, scale, bias, offset)
    N, K = weight.shape
    _check_x(x, K, N)
    _same_device(x=x, weight=weight, scale=scale, bias=bias, offset=offset)
    lead = x.shape[:-1]
    x2 = x.detach().reshape(-1, K).contiguous()
    y = torch.ops.astra.int8_linear(
        x2, weight.contiguous(), scale.detach().float().contiguous(),
        None if bias is None else bias.detach().float().contiguous(),
        None if offset is None else offset.detach().float().contiguous())
    return y.reshape(*lead, N)


class Int8Linear:
    """An ``nn.Linear``'s weights as int8 rows with scales (and its bias), checked once.

    ``Int8Linear.quantize(weight, bias)`` rounds a float ``[N, K]`` weight
    (:func:`quantize_int8`); calling the object on ``x [..., K]`` is
    :func:`int8_linear` without re-checking the weights, and it calls the backend's
    kernel directly rather than through ``torch.ops.astra`` (a decode step calls some
    120 of them per token, where the dispatch cost adds up). Use :func:`int8_linear`
    where ``torch.compile`` should trace the op.
    """

    def __init__(self, weight: Tensor, scale: Tensor, bias: Optional[Tensor] = None,
                 offset: Optional[Tensor] = None):
        _check_int8(weight, scale, bias, offset)
        _same_device(weight=weight, scale=scale, bias=bias, offset=offset)
        self.weight = weight.detach().contiguous()
        self.scale = scale.detach().float().contiguous()
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.offset = None if offset is None else offset.detach().float().contiguous()
        self.out_features, self.in_features = self.weight.shape

    @classmethod
    def quantize(cls, weight: Tensor, bias: Optional[Tensor] = None,
                 group_size: Optional[int] = None, asymmetric: bool = False) -> "Int8Linear":
        q, scale, *offset = quantize_int8(weight, group_size, asymmetric=asymmetric)
        return cls(q, scale, bias, offset[0] if offset else None)

    def dequantize(self) -> Tensor:
        """The float32 ``[N, K]`` weight this stands for (``weight * scale + offset``)."""
        return reference.int8_weight(self.weight, self.scale, self.offset)

    @property
    def nbytes(self) -> int:
        """Bytes of the int8 weight, its scales and offsets."""
        per = 8 if self.offset is not None else 4
        return self.weight.numel() + per * self.scale.numel()

    def __call__(self, x: Tensor) -> Tensor:
        N, K = self.out_features, self.in_features
        if not isinstance(x, Tensor) or x.dtype not in FLOAT_DTYPES or x.dim() < 1 or \
                x.shape[-1] != K or x.device != self.weight.device:
            _check_x(x, K, N)
            _same_device(x=x, weight=self.weight)
        x2 = x.detach().reshape(-1, K)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y = _backends.impl("int8_linear", x.device.type)(x2, self.weight, self.scale, self.bias,
                                                          self.offset)
        return y.reshape(*x.shape[:-1], N)

"""Plain-PyTorch ground truth for every Astra op.

These functions define what each op computes. The compiled, Triton and CUDA kernels
are tested against them, and they serve as the last-resort backend on any device.
They take inputs already validated and normalized by :mod:`astra_kernels.api`
(contiguous, 2-D ``x`` for ``vq_encode``, positions filled in when ``causal``).

``upcast`` (attention ops only) chooses the precision of the arithmetic: ``True``
computes in fp32 (or fp64 for fp64 inputs), ``False`` computes at the input
precision, which is what tests use to measure PyTorch's own rounding error at a dtype.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

# Bound on the number of distance entries materialized at once (rows x G x K).
_VQ_TILE_ELEMS = 1 << 22


def vq_encode(x: Tensor, codebooks: Tensor, precision: str = "fp32",
              return_error: bool = False) -> Tuple[Tensor, Tensor]:
    """Nearest codeword per group, in squared L2, ties to the lowest index.

    ``x [M, D]``, ``codebooks [G, K, D//G]`` -> ``(codes int32 [M, G], err float32 [M])``.
    Distances are computed in fp64, so this is the exact argmin of the fp32 inputs
    (``precision="bf16"`` first rounds both operands to bf16, as the fast kernels do).
    ``err`` is the squared distance to the chosen codewords summed over groups, or an
    empty tensor when ``return_error`` is False.

    A group of a row that holds a NaN or an infinity (after the bf16 rounding, for
    ``precision="bf16"``) has no nearest codeword: its code is ``-1`` and the row's
    ``err`` is NaN.
    """
    M, D = x.shape
    G, K, dg = codebooks.shape
    xs = x.reshape(M, G, dg)
    cb = codebooks
    if precision == "bf16":
        xs, cb = xs.to(torch.bfloat16), cb.to(torch.bfloat16)
    xs, cb = xs.double(), cb.double()
    cn = (cb * cb).sum(-1)  # [G, K]
    codes = torch.empty(M, G, dtype=torch.int32, device=x.device)
    rows = max(1, _VQ_TILE_ELEMS // max(1, G * K))
    for s in range(0, M, rows):
        xc = xs[s:s + rows]
        # ||x||^2 is constant per row and group: it cannot change the argmin.
        d = cn.unsqueeze(0) - 2.0 * torch.einsum("mgd,gkd->mgk", xc, cb)
        codes[s:s + rows] = d.argmin(-1).to(torch.int32)
    bad = ~torch.isfinite(xs).all(-1)  # [M, G]: no nearest codeword
    codes.masked_fill_(bad, -1)
    if not return_error:
        return codes, torch.empty(0, dtype=torch.float32, device=x.device)
    err = torch.zeros(M, dtype=torch.float64, device=x.device)
    for g in range(G):
        err += ((xs[:, g] - cb[g][codes[:, g].clamp_min(0).long()]) ** 2).sum(-1)
    err.masked_fill_(bad.any(-1), float("nan"))
    return codes, err.float()


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes into a little-endian bit stream (code i at bits i*bits ...).

    Returns 1-D ``uint8`` of ``ceil(numel * bits / 8)`` bytes; the last byte is
    zero-padded. Codes must lie in ``[0, 2**bits)``.
    """
    flat = codes.reshape(-1).to(torch.int64)
    n = flat.numel()
    nbytes = (n * bits + 7) // 8
    shifts = torch.arange(bits, device=codes.device, dtype=torch.int64)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1).to(torch.uint8)
    stream = torch.cat([stream, stream.new_zeros(nbytes * 8 - stream.numel())])
    weights = (1 << torch.arange(8, device=codes.device, dtype=torch.int64))
    return (stream.reshape(nbytes, 8).to(torch.int64) * weights).sum(1).to(torch.uint8)


def unpack_codes(payload: Tensor, shape: Tuple[int, ...], bits: int) -> Tensor:
    """Inverse of :func:`pack_codes`: ``int32`` codes of the given shape."""
    n = math.prod(shape)
    bit_idx = torch.arange(8, device=payload.device, dtype=torch.int64)
    stream = ((payload.to(torch.int64).unsqueeze(1) >> bit_idx) & 1).reshape(-1)[: n * bits]
    weights = (1 << torch.arange(bits, device=payload.device, dtype=torch.int64))
    codes = (stream.reshape(n, bits) * weights).sum(1)
    return codes.to(torch.int32).reshape(shape)


def dequantize_remote(codes: Tensor, pk: Tensor, pv: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Materialize remote keys/values from codes: ``k[b, :, j] = sum_g pk[g, codes[b, j, g]]``.

    ``codes [B, Tr, G]``, ``pk, pv [G, K, Hkv, d]`` -> ``k, v [B, Hkv, Tr, d]`` (fp32
    sums cast back to the table dtype) and ``missing [B, Tr]`` (a code of -1, or out of
    range, in any group).
    """
    B, Tr, G = codes.shape
    _, K, Hkv, d = pk.shape
    # -1 marks a lost token; any other out-of-range code is treated the same way
    # (the kernels never index a table with it)
    missing = ((codes < 0) | (codes >= K)).any(-1)
    safe = codes.clamp(0, K - 1).long()
    k = torch.zeros(B, Tr, Hkv, d, dtype=torch.float32, device=pk.device)
    v = torch.zeros_like(k)
    for g in range(G):
        k += pk[g].float()[safe[:, :, g]]
        v += pv[g].float()[safe[:, :, g]]
    return (k.to(pk.dtype).permute(0, 2, 1, 3), v.to(pv.dtype).permute(0, 2, 1, 3), missing)


def rotate_keys(k: Tensor, cos: Tensor, sin: Tensor, upcast: bool = True) -> Tensor:
    """Rotary embedding of keys on their first ``R`` dims, as HF's
    ``apply_rotary_pos_emb``: ``k[..., :R] * cos + rotate_half(k[..., :R]) * sin`` with
    ``rotate_half(x) = cat(-x[..., R/2:], x[..., :R/2])``; dims ``R..d`` unchanged.

    ``k [B, Hkv, T, d]``, ``cos, sin [B or 1, T, R]``. ``upcast``: computed in fp32
    (fp64 for fp64 keys) and rounded once to ``k``'s dtype, as the kernels do; else at
    ``k``'s precision (cos/sin rounded to it first), as HF does in a 16-bit model.
    """
    R = cos.shape[-1]
    cdt = k.dtype if not upcast else (torch.float64 if k.dtype == torch.float64
                                      else torch.float32)
    x = k[..., :R].to(cdt)
    c, s = cos.unsqueeze(1).to(cdt), sin.unsqueeze(1).to(cdt)
    rot = torch.cat([-x[..., R // 2:], x[..., :R // 2]], dim=-1)
    return torch.cat([(x * c + rot * s).to(k.dtype), k[..., R:]], dim=-1)


def mixed_attention(q: Tensor, k: Tensor, v: Tensor,
                    codes: Optional[Tensor] = None, pk: Optional[Tensor] = None,
                    pv: Optional[Tensor] = None, remote_k: Optional[Tensor] = None,
                    remote_v: Optional[Tensor] = None, causal: bool = False,
                    q_pos: Optional[Tensor] = None, kv_pos: Optional[Tensor] = None,
                    remote_pos: Optional[Tensor] = None, scale: Optional[float] = None,
                    rope_cos: Optional[Tensor] = None, rope_sin: Optional[Tensor] = None,
                    upcast: bool = True) -> Tuple[Tensor, Tensor]:
    """Softmax attention of ``q`` over local keys plus remote keys (codes or materialized).

    With ``rope_cos``/``rope_sin`` the remote keys (the dequantized sums, or
    ``remote_k``) are rotated by :func:`rotate_keys` before the scores; values are not.
    Returns ``(out [B, H, Tq, d] in q.dtype, lse [B, H, Tq] float32)``. Rows that see
    no key give zeros and ``lse = -inf``; NaN propagates as plain softmax attention
    propagates it (a NaN score among a row's visible keys: NaN out and lse). Plain
    PyTorch, so autograd differentiates it. See :func:`astra_kernels.mixed_attention`.
    """
    B, H, Tq, d = q.shape
    Hkv = k.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    missing = None
    if codes is not None:
        remote_k, remote_v, missing = dequantize_remote(codes, pk, pv)
    if rope_cos is not None and remote_k is not None:
        remote_k = rotate_keys(remote_k, rope_cos, rope_sin, upcast)
    keys, vals = k, v
    if remote_k is not None:
        keys = torch.cat([k, remote_k], dim=2)
        vals = torch.cat([v, remote_v], dim=2)
    Tl, T = k.shape[2], keys.shape[2]
    rep = H // Hkv
    keys = keys.repeat_interleave(rep, dim=1)
    vals = vals.repeat_interleave(rep, dim=1)
    cdt = q.dtype if not upcast else (torch.float64 if q.dtype == torch.float64 else torch.float32)
    scores = torch.matmul(q.to(cdt), keys.to(cdt).transpose(-1, -2)).float() * scale

    visible = torch.ones(B, Tq, T, dtype=torch.bool, device=q.device)
    if causal:
        pos = kv_pos if T == Tl else torch.cat([kv_pos, remote_pos])
        visible &= (pos.unsqueeze(0) <= q_pos.unsqueeze(1)).unsqueeze(0)
    if missing is not None:
        visible[:, :, Tl:] &= ~missing.unsqueeze(1)
    scores = scores.masked_fill(~visible.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # rows that see no key (lse = -inf): p = exp(-inf - 0) = 0, no -inf - -inf; NaN
    # scores (NaN inputs) keep lse and p NaN, as they should
    lse_safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(scores - lse_safe.unsqueeze(-1))
    out = torch.matmul(p.to(cdt), vals.to(cdt))
    return out.to(q.dtype), lse


def merge_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor,
                    lse_b: Tensor) -> Tuple[Tensor, Tensor]:
    """Combine two partial attentions over disjoint key sets into one.

    ``out = (exp(lse_a) out_a + exp(lse_b) out_b) / (exp(lse_a) + exp(lse_b))``,
    computed stably; both ``-inf`` gives zeros and ``-inf``; a NaN ``lse`` on either
    side gives NaN ``out`` and ``lse`` for that row.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isinf(lse) & (lse < 0), torch.zeros_like(lse), lse)
    wa = torch.exp(lse_a - safe).unsqueeze(-1)
    wb = torch.exp(lse_b - safe).unsqueeze(-1)
    out = wa * out_a.float() + wb * out_b.float()
    return out.to(out_a.dtype), lse


def int8_weight(weight: Tensor, scale: Tensor, offset: Optional[Tensor] = None) -> Tensor:
    """The float32 weight ``[N, K]`` an int8 one stands for: ``weight * scale + offset``
    with ``scale`` (and ``offset``) ``[N]`` one per row, or ``[N, K/g]`` one per group of
    ``g`` consecutive weights of a row."""
    N, K = weight.shape
    s = scale.float().reshape(N, -1, 1)
    w = weight.float().reshape(N, s.shape[1], -1) * s
    if offset is not None:
        w = w + offset.float().reshape(N, -1, 1)
    return w.reshape(N, K)


def int8_linear(x: Tensor, weight: Tensor, scale: Tensor, bias: Optional[Tensor] = None,
                offset: Optional[Tensor] = None) -> Tensor:
    """``y = x @ (weight * scale + offset)^T + bias`` in float32 with int8 ``weight
    [N, K]`` (weight-only quantization, :func:`int8_weight`); ``[M, N]`` in x's dtype."""
    y = x.float() @ int8_weight(weight, scale, offset).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)

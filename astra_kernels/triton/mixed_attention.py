"""Mixed-precision attention (``astra::mixed_attention``) and the partial-attention
merge (``astra::merge_attention``) in Triton.

Three layers per op: ``_mixed_attention_fwd_kernel`` (``@triton.jit``) ->
``mixed_attention_triton`` (launcher) -> ``astra_triton::mixed_attention``
(``triton_op``); likewise ``_merge_attention_kernel`` -> ``merge_attention_triton`` ->
``astra_triton::merge_attention``.

Attention kernel (flash-attention forward, one program per ``BLOCK_M`` queries of one
(b, h), a 1-D grid of ``cdiv(Tq, BLOCK_M) * B * H``; GQA reads kv head
``h // (H // Hkv)``). An fp32 online softmax in base 2 runs
first over the local K/V tiles, then over the remote part in one of four forms
(``REMOTE_MODE``, a compile-time switch):

0. none (``Tr = 0``, or no remote tensors);
1. materialized ``remote_k/remote_v [B, Hkv, Tr, d]``;
2. *gather*: each remote tile's K/V rows are summed (fp32) from ``pk/pv [G, K, Hkv, d]``
   by ``codes [B, Tr, G]`` inside the kernel; a code of -1 or out of ``[0, K)`` in any
   group masks the token and is never dereferenced;
3. *codebook space* (G = 1 only): when no remote token's visibility depends on the
   query, tokens with one code share one key, so the remote part is attention over the
   K codewords with an additive bias ``log(count)`` (``-inf`` for unused ones). A tiny
   kernel (``_code_counts_kernel``: fp32 atomics on integer counts, exact and
   order-free) counts codes per batch, missing and out-of-range ones not counted; no
   host sync, and one launch instead of a chain of small torch ops.
   The test is made per query tile inside the kernel: non-causal, or causal with every
   remote position <= the tile's smallest query position -> codebook space; every
   remote position > the tile's largest -> nothing to do; otherwise the tile falls back
   to the gather loop with per-key causal masks. So one launch serves interleaved
   positions exactly.

RoPE (``HAS_ROPE``, a compile-time switch; modes 1 and 2): each remote key tile is
rotated on its first ``R`` dims after it is loaded (mode 2: summed and rounded to the
table dtype): the ``rotate_half`` partner of dim ``i`` (``i +- R/2``) is loaded as a
second tile from the same rows, and ``k * cos + sign * partner * sin`` runs in fp32,
rounded to the table dtype. Codebook space (mode 3) is never used with rope: rotated
keys depend on the position (:func:`choose_remote_path`).

Rows that see no key keep ``m = -inf``; the update uses ``m_safe = 0`` then, so
``-inf - -inf`` never happens; they end with zeros and ``lse = -inf`` (``l = 0``
exactly). NaN: masked scores are set to ``-inf`` by a select, so a NaN key a row does
not see never reaches it; a NaN score among its visible keys makes ``p`` and ``l``
NaN (whether or not ``tl.max`` propagates NaN), hence NaN out and lse. Head dims are
padded to a power of two with masks (d = 80 runs as 128). fp32 inputs use
``input_precision="ieee"`` dots (no TF32) so fp32 results match the reference.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import autotune_configs, dot16, launcher, register_op

#: "auto" picks the remote path by the cost rule; "gather" / "codebook" force one.
#: The ``remote_path`` argument of :func:`mixed_attention_triton` overrides this.
REMOTE_PATH = os.environ.get("ASTRA_TRITON_REMOTE_PATH", "auto")

_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
_POS_BIG: tl.constexpr = tl.constexpr(1 << 62)
# fp32 inputs: exact fp32 dots (TF32 would miss the fp32 reference by ~1e-3)
FP32_PREC: tl.constexpr = tl.constexpr("ieee")


def _attn_configs(fp32: bool):
    if fp32:  # FMA dots on fp32 registers: small tiles (a correctness path, not a fast one)
        shapes = ((32, 32, 4, 2), (64, 32, 8, 2), (64, 16, 4, 2))
    else:
        shapes = ((128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 8, 3))
    return autotune_configs(("BLOCK_M", "BLOCK_N"), shapes, interpret_shape=(16, 16))


@triton.jit
def _softmax_update(acc, m_i, l_i, q, kt, v, s_bias, qk_scale, IS_FP32: tl.constexpr):
    """One online-softmax step. ``kt [D, N]``, ``v [N, D]``, ``s_bias [M, N]`` in log2
    units with -inf for masked keys."""
    if IS_FP32:
        s = tl.dot(q, kt, input_precision=FP32_PREC)
    else:
        s = dot16(q, kt, None)
    # masked keys (bias -inf) get -inf by a select: a NaN score of a key the row does
    # not see must not reach it (NaN + -inf is NaN)
    s = tl.where(s_bias == float("-inf"), float("-inf"), s * qk_scale + s_bias)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if IS_FP32:
        acc = tl.dot(p, v, acc, input_precision=FP32_PREC)
    else:
        acc = dot16(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _rope_kt(kt, kt_partner, cos_base, sin_base, offs_n, ok, offs_d, R):
    """RoPE of a K^T tile ``[D, N]`` on dims ``< R``: ``kt * cos + sign * partner * sin``
    in fp32 (``partner`` holds dim ``i + R/2`` for ``i < R/2``, ``i - R/2`` above, sign
    -1 / +1: HF's ``rotate_half``), rounded to ``kt``'s dtype. ``cos_base/sin_base``
    point at the tile's batch row of ``[Tr, R]`` fp32."""
    rot = offs_d < R
    msk = ok[None, :] & rot[:, None]
    cs_off = offs_n[None, :].to(tl.int64) * R + offs_d[:, None]
    c = tl.load(cos_base + cs_off, mask=msk, other=1.0)
    s = tl.load(sin_base + cs_off, mask=msk, other=0.0)
    sign = tl.where(offs_d < R // 2, -1.0, 1.0)
    out = kt.to(tl.float32) * c + sign[:, None] * kt_partner.to(tl.float32) * s
    return out.to(kt.dtype)


@triton.jit
def _rope_partner(offs_d, R):
    """The ``rotate_half`` partner of each dim (``i +- R/2``; dims >= R: themselves)."""
    half = R // 2
    return tl.where(offs_d < half, offs_d + half, tl.where(offs_d < R, offs_d - half, offs_d))


@triton.jit
def _attend_dense(acc, m_i, l_i, q, qpos, q_max, k_base, v_base, pos_ptr, T, qk_scale,
                  offs_d, d_mask, cos_base, sin_base, R,
                  HEAD_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
                  IS_FP32: tl.constexpr, BLOCK_N: tl.constexpr, HAS_ROPE: tl.constexpr):
    """Keys/values stored densely as ``[T, HEAD_D]`` rows (local, or materialized remote;
    ``HAS_ROPE``: remote keys rotated by ``cos_base/sin_base [T, R]``)."""
    for n0 in range(0, T, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < T
        if IS_CAUSAL:
            kpos = tl.load(pos_ptr + offs_n, mask=n_mask, other=_POS_BIG)
            if tl.min(kpos, 0) <= q_max:  # skip tiles no query here can see
                kt = tl.load(k_base + offs_n[None, :] * HEAD_D + offs_d[:, None],
                             mask=n_mask[None, :] & d_mask[:, None], other=0.0)
                if HAS_ROPE:
                    kp = tl.load(k_base + offs_n[None, :] * HEAD_D
                                 + _rope_partner(offs_d, R)[:, None],
                                 mask=n_mask[None, :] & (offs_d < R)[:, None], other=0.0)
                    kt = _rope_kt(kt, kp, cos_base, sin_base, offs_n, n_mask, offs_d, R)
                v = tl.load(v_base + offs_n[:, None] * HEAD_D + offs_d[None, :],
                            mask=n_mask[:, None] & d_mask[None, :], other=0.0)
                vis = n_mask[None, :] & (kpos[None, :] <= qpos[:, None])
                bias = tl.where(vis, 0.0, float("-inf"))
                acc, m_i, l_i = _softmax_update(acc, m_i, l_i, q, kt, v, bias, qk_scale,
                                                IS_FP32)
        else:
            kt = tl.load(k_base + offs_n[None, :] * HEAD_D + offs_d[:, None],
                         mask=n_mask[None, :] & d_mask[:, None], other=0.0)
            if HAS_ROPE:
                kp = tl.load(k_base + offs_n[None, :] * HEAD_D
                             + _rope_partner(offs_d, R)[:, None],
                             mask=n_mask[None, :] & (offs_d < R)[:, None], other=0.0)
                kt = _rope_kt(kt, kp, cos_base, sin_base, offs_n, n_mask, offs_d, R)
            v = tl.load(v_base + offs_n[:, None] * HEAD_D + offs_d[None, :],
                        mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            bias = tl.where(n_mask, 0.0, float("-inf"))[None, :]
            acc, m_i, l_i = _softmax_update(acc, m_i, l_i, q, kt, v, bias, qk_scale, IS_FP32)
    return acc, m_i, l_i


@triton.jit
def _attend_gather(acc, m_i, l_i, q, qpos, q_max, pk_ptr, pv_ptr, codes_ptr, pos_ptr,
                   b, hkv, Tr, G, K, HKV, qk_scale, offs_d, d_mask, cos_base, sin_base, R,
                   HEAD_D: tl.constexpr, IS_CAUSAL: tl.constexpr, IS_FP32: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ROPE: tl.constexpr):
    """Remote keys/values summed over groups from the projected codebooks by code
    (``HAS_ROPE``: keys then rotated by ``cos_base/sin_base [Tr, R]``)."""
    partner = offs_d
    if HAS_ROPE:
        partner = _rope_partner(offs_d, R)
    for n0 in range(0, Tr, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < Tr
        ok = n_mask
        kt = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
        kp = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
        v = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        code_row = codes_ptr + (b * Tr + offs_n).to(tl.int64) * G
        for g in range(G):
            c = tl.load(code_row + g, mask=n_mask, other=-1)
            ok = ok & (c >= 0) & (c < K)  # missing (-1) or out of range: masked
            row = ((g * K + tl.where(ok, c, 0)).to(tl.int64) * HKV + hkv) * HEAD_D
            kt += tl.load(pk_ptr + row[None, :] + offs_d[:, None],
                          mask=ok[None, :] & d_mask[:, None], other=0.0).to(tl.float32)
            if HAS_ROPE:
                kp += tl.load(pk_ptr + row[None, :] + partner[:, None],
                              mask=ok[None, :] & (offs_d < R)[:, None],
                              other=0.0).to(tl.float32)
            v += tl.load(pv_ptr + row[:, None] + offs_d[None, :],
                         mask=ok[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        # fp32 sum rounded to the table dtype, as the reference dequantizes
        kt = kt.to(pk_ptr.dtype.element_ty)
        v = v.to(pv_ptr.dtype.element_ty)
        if HAS_ROPE:
            kt = _rope_kt(kt, kp.to(pk_ptr.dtype.element_ty), cos_base, sin_base, offs_n, ok,
                          offs_d, R)
        vis = ok[None, :]
        if IS_CAUSAL:
            rpos = tl.load(pos_ptr + offs_n, mask=n_mask, other=_POS_BIG)
            vis = vis & (rpos[None, :] <= qpos[:, None])
        bias = tl.where(vis, 0.0, float("-inf"))
        acc, m_i, l_i = _softmax_update(acc, m_i, l_i, q, kt, v, bias, qk_scale, IS_FP32)
    return acc, m_i, l_i


@triton.jit
def _attend_codebook(acc, m_i, l_i, q, pk_ptr, pv_ptr, cnt_ptr, b, hkv, K, HKV, qk_scale,
                     offs_d, d_mask, HEAD_D: tl.constexpr, IS_FP32: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """Remote part in codebook space (G = 1): the K codewords of table 0 as keys/values
    with bias ``log2(count[b, c])``; unused codewords get -inf and drop out."""
    for c0 in range(0, K, BLOCK_N):
        offs_c = c0 + tl.arange(0, BLOCK_N)
        c_mask = offs_c < K
        cnt = tl.load(cnt_ptr + b * K + offs_c, mask=c_mask, other=0.0)
        lc = tl.where(cnt > 0.0, tl.log2(tl.maximum(cnt, 1.0)), float("-inf"))
        row = (offs_c.to(tl.int64) * HKV + hkv) * HEAD_D
        kt = tl.load(pk_ptr + row[None, :] + offs_d[:, None],
                     mask=c_mask[None, :] & d_mask[:, None], other=0.0)
        v = tl.load(pv_ptr + row[:, None] + offs_d[None, :],
                    mask=c_mask[:, None] & d_mask[None, :], other=0.0)
        acc, m_i, l_i = _softmax_update(acc, m_i, l_i, q, kt, v, lc[None, :], qk_scale,
                                        IS_FP32)
    return acc, m_i, l_i


@triton.jit
def _code_counts_kernel(codes_ptr, cnt_ptr, Tr, G, K, BLOCK: tl.constexpr):
    """``cnt[b, c] += 1`` for every valid group-0 code ``c`` of batch ``b``."""
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < Tr
    c = tl.load(codes_ptr + (b * Tr + offs).to(tl.int64) * G, mask=m, other=-1)
    ok = m & (c >= 0) & (c < K)
    tl.atomic_add(cnt_ptr + b.to(tl.int64) * K + tl.where(ok, c, 0),
                  tl.where(ok, 1.0, 0.0), mask=ok, sem="relaxed")


@triton.jit
def _mixed_attention_fwd_kernel(
        q_ptr, k_ptr, v_ptr,            # [B, H, Tq, D], [B, Hkv, Tl, D]
        rk_ptr, rv_ptr,                 # mode 1: [B, Hkv, Tr, D]; modes 2/3: pk, pv [G, K, Hkv, D]
        codes_ptr,                      # int32 [B, Tr, G] (modes 2/3)
        cnt_ptr,                        # mode 3: fp32 code counts [B, K]
        qpos_ptr, kvpos_ptr, rpos_ptr, rminmax_ptr,  # int64 positions; [min, max] remote pos
        cos_ptr, sin_ptr,               # HAS_ROPE: fp32 [B or 1, Tr, R]
        out_ptr, lse_ptr,               # [B, H, Tq, D] q.dtype, [B, H, Tq] fp32
        qk_scale,                       # scale * log2(e)
        H, HKV, Tq, Tl, Tr, G, K,
        ROPE_R, ROPE_BS,                # HAS_ROPE: rotary dims, batch stride of cos/sin
        TQ_BKT, TKV_BKT,                # autotune keys only (log2 buckets)
        HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, REMOTE_MODE: tl.constexpr,
        IS_CAUSAL: tl.constexpr, IS_FP32: tl.constexpr, HAS_ROPE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # 1-D grid, query tiles of one (b, h) adjacent (they share K/V in L2); no 65535
    # limit on B * H as a second grid axis would have
    n_m = tl.cdiv(Tq, BLOCK_M)
    pid_m = tl.program_id(0) % n_m
    bh = tl.program_id(0) // n_m
    b = bh // H
    h = bh % H
    hkv = h // (H // HKV)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < Tq
    d_mask = offs_d < HEAD_D
    q_off = bh.to(tl.int64) * Tq * HEAD_D + offs_m[:, None] * HEAD_D + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    qpos = offs_m.to(tl.int64)  # placeholders when not causal
    q_min = 0
    q_max = 0
    if IS_CAUSAL:
        qpos = tl.load(qpos_ptr + offs_m, mask=m_mask, other=0)
        q_max = tl.max(tl.where(m_mask, qpos, -_POS_BIG), 0)
        q_min = tl.min(tl.where(m_mask, qpos, _POS_BIG), 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = tl.cast(qk_scale, tl.float32)  # inductor passes Python floats as fp64

    # -- local keys, full precision
    kv_off = (b * HKV + hkv).to(tl.int64) * Tl * HEAD_D
    acc, m_i, l_i = _attend_dense(acc, m_i, l_i, q, qpos, q_max, k_ptr + kv_off,
                                  v_ptr + kv_off, kvpos_ptr, Tl, qk_scale, offs_d, d_mask,
                                  cos_ptr, sin_ptr, 0, HEAD_D, IS_CAUSAL, IS_FP32, BLOCK_N,
                                  False)
    cos_b = cos_ptr + b.to(tl.int64) * ROPE_BS  # this batch's rows of cos/sin [Tr, R]
    sin_b = sin_ptr + b.to(tl.int64) * ROPE_BS

    # -- remote keys
    if REMOTE_MODE == 1:
        r_off = (b * HKV + hkv).to(tl.int64) * Tr * HEAD_D
        acc, m_i, l_i = _attend_dense(acc, m_i, l_i, q, qpos, q_max, rk_ptr + r_off,
                                      rv_ptr + r_off, rpos_ptr, Tr, qk_scale, offs_d,
                                      d_mask, cos_b, sin_b, ROPE_R, HEAD_D, IS_CAUSAL, IS_FP32,
                                      BLOCK_N, HAS_ROPE)
    elif REMOTE_MODE == 2:
        run = True
        if IS_CAUSAL:
            run = tl.load(rminmax_ptr) <= q_max
        if run:
            acc, m_i, l_i = _attend_gather(acc, m_i, l_i, q, qpos, q_max, rk_ptr, rv_ptr,
                                           codes_ptr, rpos_ptr, b, hkv, Tr, G, K, HKV,
                                           qk_scale, offs_d, d_mask, cos_b, sin_b, ROPE_R,
                                           HEAD_D, IS_CAUSAL, IS_FP32, BLOCK_N, BLOCK_D,
                                           HAS_ROPE)
    elif REMOTE_MODE == 3:
        if IS_CAUSAL:
            r_min = tl.load(rminmax_ptr)
            r_max = tl.load(rminmax_ptr + 1)
            if r_max <= q_min:  # every remote token visible to every query here
                acc, m_i, l_i = _attend_codebook(acc, m_i, l_i, q, rk_ptr, rv_ptr, cnt_ptr,
                                                 b, hkv, K, HKV, qk_scale, offs_d, d_mask,
                                                 HEAD_D, IS_FP32, BLOCK_N)
            elif r_min <= q_max:  # visibility depends on the query: per-key masks
                acc, m_i, l_i = _attend_gather(acc, m_i, l_i, q, qpos, q_max, rk_ptr,
                                               rv_ptr, codes_ptr, rpos_ptr, b, hkv, Tr, G,
                                               K, HKV, qk_scale, offs_d, d_mask, cos_b, sin_b,
                                               0, HEAD_D, IS_CAUSAL, IS_FP32, BLOCK_N,
                                               BLOCK_D, False)
        else:
            acc, m_i, l_i = _attend_codebook(acc, m_i, l_i, q, rk_ptr, rv_ptr, cnt_ptr, b,
                                             hkv, K, HKV, qk_scale, offs_d, d_mask, HEAD_D,
                                             IS_FP32, BLOCK_N)

    # -- epilogue: rows that saw nothing (l = 0 exactly) get zeros and lse = -inf; a
    # NaN sum (NaN inputs) gives NaN out and lse, as the reference
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * _LN2)
    tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * Tq + offs_m, lse, mask=m_mask)


# One jit kernel, tuned separately for 16-bit and fp32 inputs.
_ATTN_KEY = ["TQ_BKT", "TKV_BKT", "HEAD_D", "REMOTE_MODE", "IS_CAUSAL", "HAS_ROPE"]
_mixed_attention_fwd_tuned = triton.autotune(configs=_attn_configs(False),
                                             key=_ATTN_KEY)(_mixed_attention_fwd_kernel)
_mixed_attention_fwd_fp32_tuned = triton.autotune(configs=_attn_configs(True),
                                                  key=_ATTN_KEY)(_mixed_attention_fwd_kernel)


def _bucket(n: int) -> int:
    return max(0, int(n) - 1).bit_length()


def code_counts(codes: Tensor, K: int) -> Tensor:
    """fp32 ``[B, K]`` counts of the group-0 codes of ``codes [B, Tr, G]`` per batch;
    -1 and codes outside ``[0, K)`` are not counted. One small kernel, no host sync."""
    B, Tr, G = codes.shape
    cnt = torch.zeros((B, K), dtype=torch.float32, device=codes.device)
    if B * Tr:
        block = 1024
        launcher(_code_counts_kernel, codes)[(triton.cdiv(Tr, block), B)](
            codes, cnt, Tr, G, K, BLOCK=block, num_warps=4)
    return cnt


def choose_remote_path(G: int, K: int, Tr: int, remote_path: str = "auto",
                       rope: bool = False) -> str:
    """``"codebook"`` or ``"gather"`` for code inputs. Cost rule: codebook space reads
    ``K`` codeword rows instead of ``Tr`` rows summed over ``G`` tables, plus one tiny
    counting launch; it pays when ``G == 1`` and ``K < Tr``. With ``rope`` (rotated
    keys differ per position) only the gather path is exact: ``"auto"`` (and the
    ``ASTRA_TRITON_REMOTE_PATH`` default) gives it, an explicit ``"codebook"`` raises."""
    explicit = remote_path
    if remote_path == "auto":
        remote_path = REMOTE_PATH
    if rope and remote_path in ("auto", "gather"):
        return "gather"
    if remote_path == "codebook":
        if rope:
            if explicit == "auto":  # the environment default: rope needs the gather path
                return "gather"
            raise ValueError("the codebook-space path cannot serve rotated (RoPE) remote "
                             "keys; use remote_path='gather' or 'auto'")
        if G != 1:
            raise ValueError(f"the codebook-space path needs G == 1, got G={G}")
        return "codebook"
    if remote_path == "gather":
        return "gather"
    if remote_path != "auto":
        raise ValueError(f"remote_path must be auto|gather|codebook, got {remote_path!r}")
    return "codebook" if G == 1 and K < Tr else "gather"


def mixed_attention_triton(q: Tensor, k: Tensor, v: Tensor, codes: Tensor | None,
                           pk: Tensor | None, pv: Tensor | None,
                           remote_k: Tensor | None, remote_v: Tensor | None,
                           causal: bool = False, q_pos: Tensor | None = None,
                           kv_pos: Tensor | None = None,
                           remote_pos: Tensor | None = None,
                           scale: float | None = None,
                           rope_cos: Tensor | None = None, rope_sin: Tensor | None = None,
                           remote_path: str = "auto") -> tuple[Tensor, Tensor]:
    """Launcher; inputs follow the kernel contract in :mod:`astra_kernels.ops`.
    ``remote_path`` ("auto" | "gather" | "codebook") forces the code path; with
    ``rope_cos``/``rope_sin`` it is always the gather path."""
    B, H, Tq, D = q.shape
    HKV, Tl = k.shape[1], k.shape[2]
    dev = q.device
    out = torch.empty_like(q)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=dev)
    if B * H * Tq == 0:
        return out, lse
    if scale is None:
        scale = 1.0 / math.sqrt(D)

    # placeholder pointers for arguments the compiled variant never reads
    i64 = torch.empty(2, dtype=torch.int64, device=dev)
    i32 = torch.empty(1, dtype=torch.int32, device=dev)
    f32 = torch.empty(1, dtype=torch.float32, device=dev)
    if Tl == 0:  # never read; avoid handing an empty (maybe null) pointer to the launcher
        k = v = q
    mode, Tr, G, K = 0, 0, 1, 1
    rk, rv, codes_t, cnt = q, q, i32, f32
    if codes is not None and codes.shape[1] > 0:
        G, K, Tr = pk.shape[0], pk.shape[1], codes.shape[1]
        rk, rv, codes_t = pk, pv, codes
        if choose_remote_path(G, K, Tr, remote_path, rope_cos is not None) == "codebook":
            mode = 3
            cnt = code_counts(codes, K)
        else:
            mode = 2
    elif remote_k is not None and remote_k.shape[2] > 0:
        mode, Tr = 1, remote_k.shape[2]
        rk, rv = remote_k, remote_v

    rope = mode in (1, 2) and rope_cos is not None
    cs, sn, rope_r, rope_bs = f32, f32, 0, 0
    if rope:
        cs, sn, rope_r = rope_cos, rope_sin, rope_cos.shape[2]
        rope_bs = 0 if rope_cos.shape[0] == 1 else Tr * rope_r

    qp = kp = rp = rmm = i64
    if causal:
        qp = q_pos
        kp = kv_pos if Tl > 0 else i64
        if mode:
            rp = remote_pos
            rmm = torch.stack([remote_pos.min(), remote_pos.max()])

    kv_eff = Tl + (min(K, Tr) if mode == 3 else Tr)

    def grid(meta):
        return (triton.cdiv(Tq, meta["BLOCK_M"]) * B * H,)

    fp32 = q.dtype == torch.float32
    kernel = _mixed_attention_fwd_fp32_tuned if fp32 else _mixed_attention_fwd_tuned
    launcher(kernel, q)[grid](
        q, k, v, rk, rv, codes_t, cnt, qp, kp, rp, rmm, cs, sn, out, lse,
        float(scale) * 1.4426950408889634,
        H, HKV, Tq, Tl, Tr, G, K, rope_r, rope_bs, _bucket(Tq), _bucket(kv_eff),
        HEAD_D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), REMOTE_MODE=mode,
        IS_CAUSAL=bool(causal), IS_FP32=fp32, HAS_ROPE=rope)
    return out, lse


# ---------------------------------------------------------------------------- merge

@triton.jit
def _merge_attention_kernel(oa_ptr, la_ptr, ob_ptr, lb_ptr, out_ptr, lse_ptr, R, D,
                            BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    r_mask = offs_r < R
    msk = r_mask[:, None] & (offs_d[None, :] < D)
    la = tl.load(la_ptr + offs_r, mask=r_mask, other=float("-inf"))
    lb = tl.load(lb_ptr + offs_r, mask=r_mask, other=float("-inf"))
    # a NaN lse on either side makes the row NaN (la + lb), whatever tl.maximum does
    mx = tl.where((la != la) | (lb != lb), la + lb, tl.maximum(la, lb))
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)  # both empty: avoid -inf - -inf
    wa = tl.exp(la - mx_safe)
    wb = tl.exp(lb - mx_safe)
    tot = wa + wb
    has = tot != 0.0  # 0 only when both sides are empty; NaN: NaN out and lse
    tot_safe = tl.where(has, tot, 1.0)
    off = offs_r.to(tl.int64)[:, None] * D + offs_d[None, :]
    oa = tl.load(oa_ptr + off, mask=msk, other=0.0).to(tl.float32)
    ob = tl.load(ob_ptr + off, mask=msk, other=0.0).to(tl.float32)
    out = (wa[:, None] * oa + wb[:, None] * ob) / tot_safe[:, None]
    tl.store(out_ptr + off, out.to(out_ptr.dtype.element_ty), mask=msk)
    tl.store(lse_ptr + offs_r, tl.where(has, mx_safe + tl.log(tot_safe), float("-inf")),
             mask=r_mask)


def merge_attention_triton(out_a: Tensor, lse_a: Tensor, out_b: Tensor,
                           lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Launcher: contiguous ``out_* [..., d]`` (one dtype), ``lse_* [...]`` fp32."""
    out = torch.empty_like(out_a)
    lse = torch.empty_like(lse_a)
    R = lse_a.numel()
    D = out_a.shape[-1] if out_a.dim() else 1
    if R == 0 or D == 0:
        if R and D == 0:  # no features: only the lse merges
            lse.copy_(torch.logaddexp(lse_a, lse_b))
        return out, lse
    block_d = triton.next_power_of_2(D)
    block_r = max(1, min(64, 2048 // block_d))
    launcher(_merge_attention_kernel, out_a)[(triton.cdiv(R, block_r),)](
        out_a, lse_a, out_b, lse_b, out, lse, R, D, BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=4)
    return out, lse


mixed_attention_op = register_op("mixed_attention", mixed_attention_triton,
                                 extra_args="str remote_path='auto'")
merge_attention_op = register_op("merge_attention", merge_attention_triton)

"""Fused nearest-codeword search (``astra::vq_encode``) in Triton.

Three layers: ``_vq_encode_kernel`` (``@triton.jit``) -> ``vq_encode_triton``
(launcher: shapes, grid, dummies) -> ``astra_triton::vq_encode`` (``triton_op``, so
``torch.compile`` traces into the kernel).

Kernel: one program per (tile of ``BLOCK_M`` rows, group ``g``); it loops over the
group's ``K`` codewords ``BLOCK_K`` at a time, scores them with ``tl.dot`` as
``||c||^2 - 2 x.c`` (``||x||^2`` cannot change the argmin; ``||c||^2`` comes from the
launcher so codeword tiles go straight to shared memory) and keeps a running
min/argmin in registers, so the ``M x K`` distance matrix never exists. Ties go to the
lowest index: ``tl.argmin`` breaks ties left inside a tile and a later tile must be
strictly better. ``precision="fp32"`` uses ``input_precision="ieee"`` (no TF32);
``"bf16"`` rounds both operands to bf16 in the launcher (as the reference does) and
accumulates in fp32 on the tensor cores. Each precision has its own autotune list.
The error is recomputed as ``||x - c||^2`` from the chosen rows (no cancellation),
written per group and summed over groups by the launcher (deterministic, no atomics).
A row group holding a NaN or an infinity has no finite distance: code -1, error NaN.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import autotune_configs, dot16, launcher, register_op


def _configs(precision: str):
    if precision == "bf16":  # tensor cores (wgmma on sm_90, mma.sync on sm_80)
        shapes = ((128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3))
    else:  # exact fp32: FMA dots, smaller tiles keep them out of local memory
        shapes = ((64, 64, 4, 3), (32, 64, 4, 3), (128, 64, 8, 3), (64, 128, 8, 3))
    return autotune_configs(("BLOCK_M", "BLOCK_K"), shapes, interpret_shape=(32, 32))


@triton.jit
def _vq_operand(t, PREC_BF16: tl.constexpr):
    # bf16 operands were rounded by the launcher (as the reference does): a no-op here.
    if PREC_BF16:
        return t.to(tl.bfloat16)
    else:
        return t.to(tl.float32)


@triton.jit
def _vq_dot(a, b, acc, PREC_BF16: tl.constexpr):
    if PREC_BF16:
        return dot16(a, b, acc)
    else:
        return tl.dot(a, b, acc, input_precision="ieee")  # exact fp32, no TF32


@triton.jit
def _vq_encode_kernel(x_ptr, cb_ptr, cn_ptr, codes_ptr, err_ptr,
                      M, K, DG, G,
                      BLOCK_D: tl.constexpr, X_RESIDENT: tl.constexpr,
                      PREC_BF16: tl.constexpr, RETURN_ERR: tl.constexpr, ERR_D: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + rm
    m_mask = offs_m < M
    offs_d = tl.arange(0, BLOCK_D)
    # int64 scalar bases (M*D may exceed 2**31), int32 offsets inside a tile: half the
    # registers of 64-bit pointer tensors.
    x_tile = x_ptr + (pid_m * BLOCK_M).to(tl.int64) * (G * DG) + g * DG
    x_rows = rm[:, None] * (G * DG)
    cb_base = cb_ptr + g.to(tl.int64) * K * DG

    if X_RESIDENT:  # the whole group fits one BLOCK_D: load x once
        xt = tl.load(x_tile + x_rows + offs_d[None, :],
                     mask=m_mask[:, None] & (offs_d[None, :] < DG), other=0.0)
        xt = _vq_operand(xt, PREC_BF16)

    best_d = tl.full([BLOCK_M], float("inf"), tl.float32)
    best_i = tl.zeros([BLOCK_M], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        cn = tl.load(cn_ptr + g * K + offs_k, mask=k_mask, other=0.0)
        c_cols = offs_k[None, :] * DG  # codewords loaded transposed: [BLOCK_D, BLOCK_K]
        if X_RESIDENT:  # no inner loop, so the pipeliner sees the codeword loads
            ct = tl.load(cb_base + c_cols + offs_d[:, None],
                         mask=k_mask[None, :] & (offs_d[:, None] < DG), other=0.0)
            dots = _vq_dot(xt, _vq_operand(ct, PREC_BF16),
                           tl.zeros([BLOCK_M, BLOCK_K], tl.float32), PREC_BF16)
        else:
            dots = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
            for d0 in range(0, DG, BLOCK_D):
                dd = d0 + offs_d
                d_mask = dd < DG
                ct = tl.load(cb_base + c_cols + dd[:, None], mask=k_mask[None, :] & d_mask[:, None],
                             other=0.0)
                xt = tl.load(x_tile + x_rows + dd[None, :], mask=m_mask[:, None] & d_mask[None, :],
                             other=0.0)
                dots = _vq_dot(_vq_operand(xt, PREC_BF16), _vq_operand(ct, PREC_BF16), dots,
                               PREC_BF16)
        # ||c||^2 - 2 x.c; padded codewords and NaN distances (NaN in x) never win, so
        # tl.min and tl.argmin agree (and the interpreter's argmin never sees all-NaN)
        dist = cn[None, :] - 2.0 * dots
        dist = tl.where(k_mask[None, :] & (dist == dist), dist, float("inf"))
        tile_min = tl.min(dist, 1)
        tile_arg = tl.argmin(dist, 1, tie_break_left=True).to(tl.int32)
        better = tile_min < best_d  # strict: earlier tiles win ties
        best_i = tl.where(better, tile_arg + k0, best_i)
        best_d = tl.where(better, tile_min, best_d)

    # NaN / inf in x: every distance is NaN or +-inf, so the best one is not finite
    # (NaN never wins, -inf may): no nearest codeword, code -1 and a NaN error
    found = (best_d < float("inf")) & (best_d > float("-inf"))
    best_i = tl.where(found, best_i, -1)
    out_off = offs_m.to(tl.int64) * G + g
    tl.store(codes_ptr + out_off, best_i, mask=m_mask)
    if RETURN_ERR:
        # ||x - c||^2 from the chosen rows, in narrow chunks to keep registers free
        offs_e = tl.arange(0, ERR_D)
        err = tl.zeros([BLOCK_M], tl.float32)
        c_rows = tl.where(found, best_i, 0)[:, None] * DG
        for d0 in range(0, DG, ERR_D):
            dd = d0 + offs_e
            msk = m_mask[:, None] & (dd[None, :] < DG)
            xv = _vq_operand(tl.load(x_tile + x_rows + dd[None, :], mask=msk, other=0.0),
                             PREC_BF16).to(tl.float32)
            cv = _vq_operand(tl.load(cb_base + c_rows + dd[None, :], mask=msk, other=0.0),
                             PREC_BF16).to(tl.float32)
            diff = xv - cv
            err += tl.sum(diff * diff, 1)
        err = tl.where(found, err, float("nan"))
        tl.store(err_ptr + out_off, err, mask=m_mask)


# One jit kernel, tuned separately per precision (their best tiles differ a lot).
_KEY = ["K", "DG", "BLOCK_D"]
_vq_encode_bf16_tuned = triton.autotune(configs=_configs("bf16"), key=_KEY)(_vq_encode_kernel)
_vq_encode_fp32_tuned = triton.autotune(configs=_configs("fp32"), key=_KEY)(_vq_encode_kernel)


def vq_block_d(dg: int, precision: str) -> int:
    """Width of one d-chunk: the group's width as a power of two (>= 16), capped at 128
    for bf16 (a group up to 128 wide stays in registers) and 32 for fp32 FMA dots."""
    p = max(16, triton.next_power_of_2(dg))
    if precision == "bf16":
        return p if p <= 128 else 64
    return min(p, 32)


def vq_encode_triton(x: Tensor, codebooks: Tensor, precision: str = "fp32",
                     return_error: bool = False) -> tuple[Tensor, Tensor]:
    """Launcher. ``x [M, D]`` contiguous fp32/fp16/bf16, ``codebooks [G, K, D/G]``
    contiguous fp32 -> ``(codes int32 [M, G], err fp32 [M] or (0,))``."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    M, _ = x.shape
    G, K, DG = codebooks.shape
    codes = torch.empty((M, G), dtype=torch.int32, device=x.device)
    err_g = torch.empty((M, G) if return_error else (1,), dtype=torch.float32, device=x.device)
    if M > 0:
        bf16 = precision == "bf16"
        if bf16:
            # Round once here (as the reference does) so bf16 tiles go straight to the
            # tensor cores; the codebooks are small, x is cast only if it is not bf16.
            x = x.to(torch.bfloat16)
            codebooks = codebooks.to(torch.bfloat16)
        cbf = codebooks.float()
        cn = (cbf * cbf).sum(-1).contiguous()  # ||c||^2 [G, K], once per call
        block_d = vq_block_d(DG, precision)
        kernel = _vq_encode_bf16_tuned if bf16 else _vq_encode_fp32_tuned

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]), G)

        launcher(kernel, x)[grid](
            x, codebooks, cn, codes, err_g, M, K, DG, G,
            BLOCK_D=block_d, X_RESIDENT=block_d >= DG, PREC_BF16=bf16,
            RETURN_ERR=bool(return_error), ERR_D=16)
    if return_error:
        return codes, err_g.sum(1)
    return codes, torch.empty((0,), dtype=torch.float32, device=x.device)


vq_encode_op = register_op("vq_encode", vq_encode_triton)

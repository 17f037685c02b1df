"""Triton kernel of ``astra::int8_linear``: ``y = x @ (w * scale + offset)^T + bias`` with
int8 weights (a scale, and optionally an offset, per row or per group of a row) widened
to fp32 in registers
(weight-only quantization; decode reads the weights once per token, so their bytes are
the cost).

One program owns ``BLOCK_N`` output columns for ``BLOCK_M`` token rows and walks K in
``BLOCK_K`` steps; products are summed in fp32 by broadcasting (no ``tl.dot``: decode
has one or a few rows, below a tensor-core tile)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import launcher, register_op


@triton.jit
def _int8_linear_kernel(x_ptr, w_ptr, s_ptr, b_ptr, o_ptr, y_ptr, M, N, K, NG, GS,
                        HAS_BIAS: tl.constexpr, HAS_OFFSET: tl.constexpr,
                        BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0).to(tl.float32)
        wmask = (rn[:, None] < N) & (rk[None, :] < K)
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=wmask, other=0).to(tl.float32)
        # each weight times its row's (group's) scale: NG = 1, GS = K for one per row
        s = tl.load(s_ptr + rn[:, None] * NG + rk[None, :] // GS, mask=wmask, other=0.0)
        w = w * s
        if HAS_OFFSET:
            w += tl.load(o_ptr + rn[:, None] * NG + rk[None, :] // GS, mask=wmask, other=0.0)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0)[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def int8_linear_triton(x: Tensor, weight: Tensor, scale: Tensor,
                       bias: Tensor | None = None, offset: Tensor | None = None) -> Tensor:
    """Launcher. ``x [M, K]`` contiguous fp32/fp16/bf16, ``weight [N, K]`` int8,
    ``scale [N]`` or ``[N, K/g]`` (``offset`` of the same shape, or None) and ``bias
    [N]`` fp32 -> ``[M, N]`` in x's dtype."""
    M, K = x.shape
    N = weight.shape[0]
    ng = scale.shape[1] if scale.dim() == 2 else 1
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_m = 1 if M == 1 else min(16, triton.next_power_of_2(M))
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, 32))
    launcher(_int8_linear_kernel, x)[grid](
        x, weight, scale, bias if bias is not None else scale,
        offset if offset is not None else scale, y, M, N, K, ng, K // ng,
        HAS_BIAS=bias is not None, HAS_OFFSET=offset is not None, BLOCK_M=block_m,
        BLOCK_N=32, BLOCK_K=64)
    return y


int8_linear_op = register_op("int8_linear", int8_linear_triton)

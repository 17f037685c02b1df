"""Megatron-style tensor parallelism for one Transformer block, the ``tp`` baseline.

:class:`TPBlock` is built from the same weights as the model's block (the family
adapter's :meth:`~astra.models.Adapter.tp_spec` names them): column-parallel QKV and
fc1, row-parallel out-proj and fc2, two all-reduces per block. Switches for Llama-style
blocks: grouped KV heads (``kv_heads``: a rank computes the KV heads its query heads
use), a gated MLP (``w3``: ``act(x W1) * (x W3)``, SwiGLU) and a hook on the projected
queries and keys (``qk_fn``: per-head norms, RoPE at positions ``0..T-1``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TPSpec", "TPBlock"]


@dataclass
class TPSpec:
    """One block's weights (``[out, in]``) and shape, as the family adapter names them."""

    pre_ln: bool
    norm1: nn.Module
    norm2: nn.Module
    wq: Tensor
    wk: Tensor
    wv: Tensor
    bq: Optional[Tensor]
    bk: Optional[Tensor]
    bv: Optional[Tensor]
    wo: Tensor
    bo: Optional[Tensor]
    w1: Tensor
    b1: Optional[Tensor]
    act: Callable
    w2: Tensor
    b2: Optional[Tensor]
    heads: int
    head_dim: int
    scale: float
    causal: bool
    kv_heads: Optional[int] = None  # GQA: KV heads (default: ``heads``)
    w3: Optional[Tensor] = None     # gated MLP: act(x W1 + b1) * (x W3 + b3)
    b3: Optional[Tensor] = None
    qk_fn: Optional[Callable[[Tensor, Tensor], Tuple[Tensor, Tensor]]] = None


class TPBlock(nn.Module):
    """One block, tensor parallel over ``world`` ranks (this rank's shard of the heads
    and of the MLP's hidden units); ``comm.allreduce`` after the out-proj and fc2."""

    def __init__(self, rank: int, world: int, comm, **spec):
        super().__init__()
        spec = TPSpec(**spec)
        self.s, self.comm = spec, comm
        d = spec.head_dim
        heads = torch.tensor_split(torch.arange(spec.heads), world)[rank]
        self.h = heads.numel()
        lo, hi = int(heads[0]) * d, (int(heads[-1]) + 1) * d
        rep = spec.heads // (spec.kv_heads or spec.heads)
        k0, k1 = int(heads[0]) // rep, int(heads[-1]) // rep + 1  # the KV heads they use
        self.hk, self.kv_of = k1 - k0, heads // rep - k0
        klo, khi = k0 * d, k1 * d
        with torch.no_grad():
            self.wqkv = torch.cat([spec.wq[lo:hi], spec.wk[klo:khi],
                                   spec.wv[klo:khi]]).contiguous()
            bs = [spec.bq[lo:hi], spec.bk[klo:khi], spec.bv[klo:khi]] if spec.bq is not None \
                else None
            self.bqkv = None if bs is None else torch.cat(bs).contiguous()
            self.wo = spec.wo[:, lo:hi].contiguous()
            F_ = spec.w1.shape[0]
            units = torch.tensor_split(torch.arange(F_), world)[rank]
            flo, fhi = int(units[0]), int(units[-1]) + 1
            self.w1 = spec.w1[flo:fhi].contiguous()
            self.b1 = None if spec.b1 is None else spec.b1[flo:fhi].contiguous()
            self.w3 = None if spec.w3 is None else spec.w3[flo:fhi].contiguous()
            self.b3 = None if spec.b3 is None else spec.b3[flo:fhi].contiguous()
            self.w2 = spec.w2[:, flo:fhi].contiguous()

    def _attn(self, a: Tensor) -> Tensor:
        s = self.s
        B, T, _ = a.shape
        d = s.head_dim
        q, k, v = F.linear(a, self.wqkv, self.bqkv).split(
            [self.h * d, self.hk * d, self.hk * d], dim=-1)
        q, k, v = (t.view(B, T, -1, d).transpose(1, 2) for t in (q, k, v))
        if s.qk_fn is not None:
            q, k = s.qk_fn(q, k)
        if self.hk != self.h:  # GQA: each query head reads its KV head
            k, v = k[:, self.kv_of], v[:, self.kv_of]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=s.causal, scale=s.scale)
        o = F.linear(o.transpose(1, 2).reshape(B, T, -1), self.wo)
        o = self.comm.allreduce(o, "tp.attn")
        return o if s.bo is None else o + s.bo

    def _mlp(self, m: Tensor) -> Tensor:
        s = self.s
        y = s.act(F.linear(m, self.w1, self.b1))
        if self.w3 is not None:
            y = y * F.linear(m, self.w3, self.b3)
        y = F.linear(y, self.w2)
        y = self.comm.allreduce(y, "tp.mlp")
        return y if s.b2 is None else y + s.b2

    def forward(self, x: Tensor) -> Tensor:
        s = self.s
        if s.pre_ln:
            x = x + self._attn(s.norm1(x))
            return x + self._mlp(s.norm2(x))
        x = s.norm1(x + self._attn(x))
        return s.norm2(x + self._mlp(x))

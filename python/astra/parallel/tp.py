"""Megatron-style tensor parallelism for one Transformer block, the ``tp`` baseline.

:class:`TPBlock` is built from the same weights as the model's block (the family
adapter's :meth:`~astra.models.Adapter.tp_spec` names them): column-parallel QKV and
fc1, row-parallel out-proj and fc2, two all-reduces per block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

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


class TPBlock(nn.Module):
    """One block, tensor parallel over ``world`` ranks (this rank's shard of the heads
    and of the MLP's hidden units); ``comm.allreduce`` after the out-proj and fc2."""

    def __init__(self, rank: int, world: int, comm, **spec):
        super().__init__()
        spec = TPSpec(**spec)
        self.s, self.comm = spec, comm
        heads = torch.tensor_split(torch.arange(spec.heads), world)[rank]
        self.h = heads.numel()
        lo, hi = int(heads[0]) * spec.head_dim, (int(heads[-1]) + 1) * spec.head_dim
        with torch.no_grad():
            self.wqkv = torch.cat([spec.wq[lo:hi], spec.wk[lo:hi], spec.wv[lo:hi]]).contiguous()
            bs = [spec.bq, spec.bk, spec.bv]
            self.bqkv = None if spec.bq is None else torch.cat([b[lo:hi] for b in bs]).contiguous()
            self.wo = spec.wo[:, lo:hi].contiguous()
            F_ = spec.w1.shape[0]
            units = torch.tensor_split(torch.arange(F_), world)[rank]
            flo, fhi = int(units[0]), int(units[-1]) + 1
            self.w1 = spec.w1[flo:fhi].contiguous()
            self.b1 = None if spec.b1 is None else spec.b1[flo:fhi].contiguous()
            self.w2 = spec.w2[:, flo:fhi].contiguous()

    def _attn(self, a: Tensor) -> Tensor:
        s = self.s
        B, T, _ = a.shape
        qkv = F.linear(a, self.wqkv, self.bqkv).view(B, T, 3, self.h, s.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=s.causal, scale=s.scale)
        o = F.linear(o.transpose(1, 2).reshape(B, T, -1), self.wo)
        o = self.comm.allreduce(o, "tp.attn")
        return o if s.bo is None else o + s.bo

    def _mlp(self, m: Tensor) -> Tensor:
        s = self.s
        y = F.linear(s.act(F.linear(m, self.w1, self.b1)), self.w2)
        y = self.comm.allreduce(y, "tp.mlp")
        return y if s.b2 is None else y + s.b2

    def forward(self, x: Tensor) -> Tensor:
        s = self.s
        if s.pre_ln:
            x = x + self._attn(s.norm1(x))
            return x + self._mlp(s.norm2(x))
        x = s.norm1(x + self._attn(x))
        return s.norm2(x + self._mlp(x))

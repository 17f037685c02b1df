"""A model cut into the stages the runner needs: embed a chunk, run blocks, finish.

One :class:`Family` per supported model kind (timm ViT, HF BERT, HF GPT-2). Every rank
embeds only its own tokens (with global positions; a distributed class-token copy first
where the model has a class token), runs every block on them, and sends a summary to
rank 0, which finishes:

- ``output="full"``: every rank's hidden states go to rank 0, which pools the class
  copies (mean) and applies the model's tail (ViT: norm + head -> logits; GPT-2: ln_f +
  lm_head -> logits; BERT: last_hidden_state). Equal to the simulate-mode model's output.
- ``output="compact"``: what an application needs, and no more on the wire: ViT the
  class copies (-> logits), BERT the class copy and the sum of the rank's token states
  (-> mean-pooled sentence embedding), GPT-2 the last token (-> next-token logits).

:class:`TPBlock` is the Megatron-style tensor-parallel block built from the same
weights (column-parallel QKV and fc1, row-parallel out-proj and fc2, two all-reduces).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Family", "family_of", "TPBlock"]


@dataclass
class TPSpec:
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


class Family:
    causal = False
    has_cls = False

    def __init__(self, model: nn.Module):
        self.model = model

    def n_content(self, inputs: Tensor) -> int:
        raise NotImplementedError

    def embed(self, inputs: Tensor, lo: int, hi: int, cls: bool) -> Tensor:
        """Hidden states of content tokens ``[lo, hi)``, the class token first if ``cls``."""
        raise NotImplementedError

    def blocks(self) -> List[nn.Module]:
        raise NotImplementedError

    def run_block(self, blk: nn.Module, h: Tensor) -> Tensor:
        return blk(h)

    def tail(self, h: Tensor) -> Tensor:
        """Full hidden states (class copies pooled) -> the model's output."""
        raise NotImplementedError

    def summary(self, h: Tensor, cls: bool) -> Tensor:
        raise NotImplementedError

    def finish_compact(self, summaries: List[Tensor], n_tokens: int) -> Tensor:
        raise NotImplementedError

    def tp_spec(self, blk: nn.Module) -> TPSpec:
        raise NotImplementedError


class _ClassTokenViT(Family):
    """ViTs: patch tokens after a class token that every rank copies; the output is the
    head on the pooled class token (``tail`` of ``[B, T, D]``, class token first)."""

    has_cls = True

    def _tokens(self, img) -> Tensor:
        raise NotImplementedError

    def embed(self, inputs, lo, hi, cls):
        x = self._tokens(inputs)  # [B, 1 + patches, D], class token first
        parts = ([x[:, :1]] if cls else []) + [x[:, 1 + lo:1 + hi]]
        return torch.cat(parts, 1)

    def summary(self, h, cls):
        return h[:, :1]

    def finish_compact(self, summaries, n_tokens):
        cls = torch.stack([s[:, 0] for s in summaries]).mean(0).unsqueeze(1)
        return self.tail(cls)


class TimmViT(_ClassTokenViT):
    def _tokens(self, img):
        m = self.model
        x = m.patch_embed(img)
        x = m._pos_embed(x)
        return m.norm_pre(m.patch_drop(x))

    def n_content(self, inputs):
        return int(self.model.patch_embed.num_patches)

    def blocks(self):
        return list(self.model.blocks)

    def tail(self, h):
        m = self.model
        return m.forward_head(m.norm(h))

    def tp_spec(self, blk):
        a, mlp = blk.attn, blk.mlp
        D = a.qkv.weight.shape[1]
        A = a.num_heads * a.head_dim
        W, b = a.qkv.weight, a.qkv.bias
        if not (isinstance(blk.ls1, nn.Identity) and isinstance(a.q_norm, nn.Identity)
                and isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity)):
            raise NotImplementedError("tp supports plain timm ViT blocks (no layer scale, "
                                      "qk norm or mlp norm)")
        return TPSpec(True, blk.norm1, blk.norm2, W[:A], W[A:2 * A], W[2 * A:],
                      None if b is None else b[:A], None if b is None else b[A:2 * A],
                      None if b is None else b[2 * A:], a.proj.weight, a.proj.bias,
                      mlp.fc1.weight, mlp.fc1.bias, mlp.act, mlp.fc2.weight, mlp.fc2.bias,
                      a.num_heads, a.head_dim, float(a.scale), False)


class HFBert(Family):
    has_cls = True

    def __init__(self, model):
        super().__init__(model)
        self.base = getattr(model, "bert", model)

    def n_content(self, inputs):
        return int(inputs.shape[1]) - 1

    def embed(self, inputs, lo, hi, cls):
        ids = inputs
        pos = torch.arange(1 + lo, 1 + hi, device=ids.device)
        if cls:
            ids = torch.cat([ids[:, :1], ids[:, 1 + lo:1 + hi]], 1)
            pos = torch.cat([torch.zeros(1, dtype=torch.long, device=ids.device), pos])
        else:
            ids = ids[:, 1 + lo:1 + hi]
        B = ids.shape[0]
        return self.base.embeddings(input_ids=ids, position_ids=pos.unsqueeze(0).expand(B, -1),
                                    token_type_ids=torch.zeros_like(ids))

    def blocks(self):
        return list(self.base.encoder.layer)

    def tail(self, h):
        return h

    def summary(self, h, cls):
        return torch.stack([h[:, 0], h[:, 1:].sum(1)], 1)

    def finish_compact(self, summaries, n_tokens):
        cls = torch.stack([s[:, 0] for s in summaries]).mean(0)
        total = cls + sum(s[:, 1] for s in summaries)
        return total / n_tokens  # mean pooling over all tokens (sentence-transformers)

    def tp_spec(self, blk):
        s, o = blk.attention.self, blk.attention.output
        return TPSpec(False, o.LayerNorm, blk.output.LayerNorm, s.query.weight, s.key.weight,
                      s.value.weight, s.query.bias, s.key.bias, s.value.bias, o.dense.weight,
                      o.dense.bias, blk.intermediate.dense.weight, blk.intermediate.dense.bias,
                      blk.intermediate.intermediate_act_fn, blk.output.dense.weight,
                      blk.output.dense.bias, s.num_attention_heads, s.attention_head_size,
                      s.attention_head_size ** -0.5, False)


class HFGPT2(Family):
    causal = True

    def __init__(self, model):
        super().__init__(model)
        self.base = getattr(model, "transformer", model)

    def n_content(self, inputs):
        return int(inputs.shape[1])

    def embed(self, inputs, lo, hi, cls):
        ids = inputs[:, lo:hi]
        pos = torch.arange(lo, hi, device=ids.device).unsqueeze(0)
        return self.base.drop(self.base.wte(ids) + self.base.wpe(pos))

    def blocks(self):
        return list(self.base.h)

    def tail(self, h):
        h = self.base.ln_f(h)
        head = getattr(self.model, "lm_head", None)
        return head(h) if head is not None else h

    def summary(self, h, cls):
        return h[:, -1:]

    def finish_compact(self, summaries, n_tokens):
        return self.tail(summaries[-1])[:, 0]

    def tp_spec(self, blk):
        a, m = blk.attn, blk.mlp
        D = a.embed_dim
        W, b = a.c_attn.weight.t(), a.c_attn.bias  # Conv1D: y = x W + b
        return TPSpec(True, blk.ln_1, blk.ln_2, W[:D], W[D:2 * D], W[2 * D:], b[:D],
                      b[D:2 * D], b[2 * D:], a.c_proj.weight.t(), a.c_proj.bias,
                      m.c_fc.weight.t(), m.c_fc.bias, m.act, m.c_proj.weight.t(), m.c_proj.bias,
                      a.num_heads, a.head_dim, float(a.scaling), True)


class HFViT(_ClassTokenViT):
    """HF ``vit`` models (``ViTModel`` or ``ViTForImageClassification``): pixels in,
    the class token's logits out (the normalized hidden states for ``ViTModel``)."""

    def __init__(self, model):
        super().__init__(model)
        self.base = getattr(model, "vit", model)

    def n_content(self, inputs):
        return int(self.base.embeddings.patch_embeddings.num_patches)

    def _tokens(self, img):
        return self.base.embeddings(img)

    def blocks(self):
        from astra.models import resolve
        return resolve(self.model)[1].layers(self.model)  # the patch adapter's layer list

    def tail(self, h):
        h = self.base.layernorm(h)
        head = getattr(self.model, "classifier", None)
        return head(h[:, 0]) if head is not None else h

    def tp_spec(self, blk):
        a, mlp = blk.attention, blk.mlp
        return TPSpec(True, blk.layernorm_before, blk.layernorm_after, a.q_proj.weight,
                      a.k_proj.weight, a.v_proj.weight, a.q_proj.bias, a.k_proj.bias,
                      a.v_proj.bias, a.o_proj.weight, a.o_proj.bias, mlp.fc1.weight, mlp.fc1.bias,
                      mlp.activation_fn, mlp.fc2.weight, mlp.fc2.bias, a.num_attention_heads,
                      a.head_dim, float(a.scaling), False)


def family_of(model: nn.Module) -> Family:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt == "bert":
        return HFBert(model)
    if mt == "gpt2":
        return HFGPT2(model)
    if mt == "vit":
        return HFViT(model)
    for cls in type(model).__mro__:
        if cls.__module__.startswith("timm.") and cls.__name__ == "VisionTransformer":
            return TimmViT(model)
    raise ValueError("the runner supports timm ViT, HF vit, bert and gpt2, "
                     f"not {type(model).__name__}")


class TPBlock(nn.Module):
    """One block, tensor parallel over ``world`` ranks (this rank's shard of the heads
    and of the MLP's hidden units); ``comm.allreduce`` after the out-proj and fc2."""

    def __init__(self, spec: TPSpec, rank: int, world: int, comm):
        super().__init__()
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

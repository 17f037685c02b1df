"""HF ``gpt2``: replaces each block's ``attn`` (``GPT2Attention``, causal).

GPT-2 is pre-LN: the attention input X is ``ln_1``'s output, which is what the block
hands to ``attn``. The fused ``c_attn`` is a ``Conv1D`` (``y = x W + b``, W ``[D, 3D]``).
Runner stages: no class token; the compact output is the last token's logits.
"""
from __future__ import annotations

import torch
from torch import nn

from ._hf import CausalLMStages, HFAstraAttention, base_model, heads


class GPT2AstraAttention(HFAstraAttention):
    """Drop-in for ``GPT2Attention`` (self-attention): same submodules (c_attn, c_proj,
    attn_dropout, resid_dropout), same call signature, returns ``(attn_output, None)``."""

    def __init__(self, original: nn.Module, layer_idx: int):
        super().__init__(layer_idx=layer_idx, num_heads=original.num_heads,
                         head_dim=original.head_dim, scale=float(original.scaling),
                         causal=True, attn_dropout=float(original.attn_dropout.p))
        self.config = original.config
        self.c_attn, self.c_proj = original.c_attn, original.c_proj
        self.attn_dropout, self.resid_dropout = original.attn_dropout, original.resid_dropout
        self.embed_dim = original.embed_dim
        self.split_size = original.split_size
        self.is_causal = True
        self.is_cross_attention = False
        self.scaling = original.scaling

    def project_qkv(self, x):
        q, k, v = self.c_attn(x).split(self.split_size, dim=2)
        return heads(q, self.head_dim), heads(k, self.head_dim), heads(v, self.head_dim)

    def project_q(self, x):
        W, b = self.c_attn.weight, self.c_attn.bias
        D = self.embed_dim
        return heads(torch.addmm(b[:D], x.reshape(-1, x.shape[-1]), W[:, :D])
                     .view(*x.shape[:-1], D), self.head_dim)

    def project_kv(self, x):
        W, b = self.c_attn.weight, self.c_attn.bias
        D = self.embed_dim
        kv = torch.addmm(b[D:], x.reshape(-1, x.shape[-1]), W[:, D:]).view(*x.shape[:-1], 2 * D)
        k, v = kv.split(D, dim=-1)
        return heads(k, self.head_dim), heads(v, self.head_dim)

    def kv_affine(self):
        W, b = self.c_attn.weight, self.c_attn.bias
        D = self.embed_dim
        return W[:, D:2 * D].t(), b[D:2 * D], W[:, 2 * D:].t(), b[2 * D:]

    def output(self, o, x):
        return self.resid_dropout(self.c_proj(o))

    def forward(self, hidden_states, cache=None, attention_mask=None,
                encoder_hidden_states=None, **kwargs):
        # GPT2Attention's own argument order: the cache comes second
        return super().forward(hidden_states, attention_mask, cache=cache,
                               encoder_hidden_states=encoder_hidden_states, **kwargs)


class GPT2Adapter(CausalLMStages):
    family = "hf:gpt2"
    causal = True
    layers_path = "h"
    slot = "attn"
    final_norm = "ln_f"
    attention_cls = GPT2AstraAttention

    def check_original(self, original, layer_idx):
        if getattr(original, "is_cross_attention", False) or not hasattr(original, "c_attn"):
            raise ValueError(f"layer {layer_idx}: {type(original).__name__} is not a GPT-2 "
                             "self-attention")

    # ---- runner stages
    def embed(self, model, inputs, lo, hi, cls):
        base = base_model(model)
        ids = inputs[:, lo:hi]
        pos = torch.arange(lo, hi, device=ids.device).unsqueeze(0)
        return base.drop(base.wte(ids) + base.wpe(pos))

    def tp_spec(self, model, blk):
        a, m = blk.attn, blk.mlp
        D = a.embed_dim
        W, b = a.c_attn.weight.t(), a.c_attn.bias  # Conv1D: y = x W + b
        return dict(pre_ln=True, norm1=blk.ln_1, norm2=blk.ln_2,
                    wq=W[:D], wk=W[D:2 * D], wv=W[2 * D:],
                    bq=b[:D], bk=b[D:2 * D], bv=b[2 * D:],
                    wo=a.c_proj.weight.t(), bo=a.c_proj.bias,
                    w1=m.c_fc.weight.t(), b1=m.c_fc.bias, act=m.act,
                    w2=m.c_proj.weight.t(), b2=m.c_proj.bias,
                    heads=a.num_heads, head_dim=a.head_dim, scale=float(a.scaling),
                    causal=True)


ADAPTER = GPT2Adapter()

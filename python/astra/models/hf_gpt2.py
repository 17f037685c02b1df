"""HF ``gpt2``: replaces each block's ``attn`` (``GPT2Attention``, causal).

GPT-2 is pre-LN: the attention input X is ``ln_1``'s output, which is what the block
hands to ``attn``. The fused ``c_attn`` is a ``Conv1D`` (``y = x W + b``, W ``[D, 3D]``).
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from ..attention import AstraAttention
from . import Adapter, hf_config_hash, hf_name
from ._hf import base_model, first_attr, hf_mask


def _heads(t: torch.Tensor, d: int) -> torch.Tensor:
    return t.view(*t.shape[:-1], -1, d).transpose(1, 2)


class GPT2AstraAttention(AstraAttention):
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
        return _heads(q, self.head_dim), _heads(k, self.head_dim), _heads(v, self.head_dim)

    def project_q(self, x):
        W, b = self.c_attn.weight, self.c_attn.bias
        D = self.embed_dim
        return _heads(torch.addmm(b[:D], x.reshape(-1, x.shape[-1]), W[:, :D])
                      .view(*x.shape[:-1], D), self.head_dim)

    def project_kv(self, x):
        W, b = self.c_attn.weight, self.c_attn.bias
        D = self.embed_dim
        kv = torch.addmm(b[D:], x.reshape(-1, x.shape[-1]), W[:, D:]).view(*x.shape[:-1], 2 * D)
        k, v = kv.split(D, dim=-1)
        return _heads(k, self.head_dim), _heads(v, self.head_dim)

    def kv_affine(self):
        W, b = self.c_attn.weight, self.c_attn.bias
        D = self.embed_dim
        return W[:, D:2 * D].t(), b[D:2 * D], W[:, 2 * D:].t(), b[2 * D:]

    def output(self, o, x):
        return self.resid_dropout(self.c_proj(o))

    def forward(self, hidden_states, cache=None, attention_mask=None,
                encoder_hidden_states=None, encoder_attention_mask=None,
                output_attentions=False, past_key_values=None, **kwargs):
        if encoder_hidden_states is not None:
            raise NotImplementedError("AstraAttention replaces self-attention only")
        cache = cache if cache is not None else past_key_values
        o = self.attend(hidden_states, hf_mask(attention_mask), cache=cache)
        return self.output(o, hidden_states), None


class GPT2Adapter(Adapter):
    family = "hf:gpt2"
    causal = True

    def layers(self, model) -> List[nn.Module]:
        return list(first_attr(base_model(model), "h"))

    def attention_slots(self, model) -> List[Tuple[nn.Module, str]]:
        return [(block, "attn") for block in self.layers(model)]

    def check_original(self, original, layer_idx):
        if getattr(original, "is_cross_attention", False) or not hasattr(original, "c_attn"):
            raise ValueError(f"layer {layer_idx}: {type(original).__name__} is not a GPT-2 "
                             "self-attention")

    def build(self, original, layer_idx, model):
        self.check_original(original, layer_idx)
        return GPT2AstraAttention(original, layer_idx)

    def dim(self, model):
        return int(base_model(model).config.hidden_size)

    def name(self, model):
        return hf_name(base_model(model).config)

    def config_hash(self, model):
        return hf_config_hash(base_model(model).config)


ADAPTER = GPT2Adapter()

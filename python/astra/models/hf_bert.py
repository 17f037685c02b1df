"""HF ``bert`` (e.g. all-MiniLM-L6-v2): replaces each layer's ``attention.self``.

BERT is post-LN, so the attention input X is the hidden state entering the layer.
``BertSelfOutput`` (dense + residual + LayerNorm) stays as it is.
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


class BertAstraAttention(AstraAttention):
    """Drop-in for ``BertSelfAttention``: same submodules (query, key, value, dropout),
    same call signature, returns ``(attn_output, None)``."""

    def __init__(self, original: nn.Module, layer_idx: int):
        super().__init__(layer_idx=layer_idx, num_heads=original.num_attention_heads,
                         head_dim=original.attention_head_size,
                         scale=float(getattr(original, "scaling",
                                             original.attention_head_size ** -0.5)),
                         causal=bool(getattr(original, "is_causal", False)),
                         attn_dropout=float(original.dropout.p))
        self.config = original.config
        self.query, self.key, self.value = original.query, original.key, original.value
        self.dropout = original.dropout
        self.is_causal = self.causal
        self.is_decoder = getattr(original, "is_decoder", False)
        self.num_attention_heads = original.num_attention_heads
        self.attention_head_size = original.attention_head_size
        self.all_head_size = original.all_head_size

    def project_q(self, x):
        return _heads(self.query(x), self.head_dim)

    def project_kv(self, x):
        return _heads(self.key(x), self.head_dim), _heads(self.value(x), self.head_dim)

    def kv_affine(self):
        return self.key.weight, self.key.bias, self.value.weight, self.value.bias

    def forward(self, hidden_states, attention_mask=None, cache=None, past_key_values=None,
                encoder_hidden_states=None, **kwargs):
        if encoder_hidden_states is not None:
            raise NotImplementedError("AstraAttention replaces self-attention only")
        cache = cache if cache is not None else past_key_values
        o = self.attend(hidden_states, hf_mask(attention_mask), cache=cache)
        return self.output(o, hidden_states), None


class BertAdapter(Adapter):
    family = "hf:bert"

    def layers(self, model) -> List[nn.Module]:
        return list(first_attr(base_model(model), "encoder.layer"))

    def attention_slots(self, model) -> List[Tuple[nn.Module, str]]:
        return [(layer.attention, "self") for layer in self.layers(model)]

    def check_original(self, original, layer_idx):
        if not all(hasattr(original, a) for a in ("query", "key", "value", "dropout")):
            raise ValueError(f"layer {layer_idx}: {type(original).__name__} is not a BERT "
                             "self-attention (cross-attention is not supported)")

    def build(self, original, layer_idx, model):
        self.check_original(original, layer_idx)
        return BertAstraAttention(original, layer_idx)

    def dim(self, model):
        return int(base_model(model).config.hidden_size)

    def has_cls(self, model):
        return not bool(getattr(base_model(model).config, "is_decoder", False))

    def name(self, model):
        return hf_name(base_model(model).config)

    def config_hash(self, model):
        return hf_config_hash(base_model(model).config)


ADAPTER = BertAdapter()

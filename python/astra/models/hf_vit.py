"""HF ``vit``: replaces each layer's ``attention`` (``ViTAttention``: q/k/v/o_proj).

ViT is pre-LN: the attention input X is ``layernorm_before``'s output. Token 0 is the
class token. Covers the transformers 5.x layout (``ViTModel.layers``).
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


class ViTAstraAttention(AstraAttention):
    """Drop-in for ``ViTAttention``: same submodules (q_proj, k_proj, v_proj, o_proj),
    same call signature, returns ``(attn_output, None)``."""

    def __init__(self, original: nn.Module, layer_idx: int):
        super().__init__(layer_idx=layer_idx, num_heads=original.num_attention_heads,
                         head_dim=original.head_dim, scale=float(original.scaling),
                         causal=False, attn_dropout=float(original.attention_dropout))
        self.config = original.config
        self.q_proj, self.k_proj = original.q_proj, original.k_proj
        self.v_proj, self.o_proj = original.v_proj, original.o_proj
        self.num_attention_heads = original.num_attention_heads
        self.attention_dropout = original.attention_dropout
        self.scaling = original.scaling
        self.is_causal = False

    def project_q(self, x):
        return _heads(self.q_proj(x), self.head_dim)

    def project_kv(self, x):
        return _heads(self.k_proj(x), self.head_dim), _heads(self.v_proj(x), self.head_dim)

    def kv_affine(self):
        return self.k_proj.weight, self.k_proj.bias, self.v_proj.weight, self.v_proj.bias

    def output(self, o, x):
        return self.o_proj(o)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        o = self.attend(hidden_states, hf_mask(attention_mask))
        return self.output(o, hidden_states), None


class ViTAdapter(Adapter):
    family = "hf:vit"

    def layers(self, model) -> List[nn.Module]:
        return list(first_attr(base_model(model), "layers"))

    def attention_slots(self, model) -> List[Tuple[nn.Module, str]]:
        return [(layer, "attention") for layer in self.layers(model)]

    def check_original(self, original, layer_idx):
        if not all(hasattr(original, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise ValueError(f"layer {layer_idx}: {type(original).__name__} is not the "
                             "ViTAttention of transformers 5.x")

    def build(self, original, layer_idx, model):
        self.check_original(original, layer_idx)
        return ViTAstraAttention(original, layer_idx)

    def dim(self, model):
        return int(base_model(model).config.hidden_size)

    def has_cls(self, model):
        return True

    def seq_len(self, model):
        cfg = base_model(model).config
        img, patch = cfg.image_size, cfg.patch_size
        img = img if isinstance(img, (list, tuple)) else (img, img)
        patch = patch if isinstance(patch, (list, tuple)) else (patch, patch)
        return (img[0] // patch[0]) * (img[1] // patch[1]) + 1

    def name(self, model):
        return hf_name(base_model(model).config)

    def config_hash(self, model):
        return hf_config_hash(base_model(model).config)


ADAPTER = ViTAdapter()

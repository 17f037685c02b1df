"""HF ``bert`` (e.g. all-MiniLM-L6-v2): replaces each layer's ``attention.self``.

BERT is post-LN, so the attention input X is the hidden state entering the layer.
``BertSelfOutput`` (dense + residual + LayerNorm) stays as it is. Runner stages: token
0 is [CLS] (a copy per rank); the compact output is the mean-pooled sentence embedding.
"""
from __future__ import annotations

import torch
from torch import nn

from ._hf import HFAdapter, HFAstraAttention, base_model, heads


class BertAstraAttention(HFAstraAttention):
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
        return heads(self.query(x), self.head_dim)

    def project_kv(self, x):
        return heads(self.key(x), self.head_dim), heads(self.value(x), self.head_dim)

    def kv_affine(self):
        return self.key.weight, self.key.bias, self.value.weight, self.value.bias


class BertAdapter(HFAdapter):
    family = "hf:bert"
    layers_path = "encoder.layer"
    slot = "attention.self"
    attention_cls = BertAstraAttention

    def check_original(self, original, layer_idx):
        if not all(hasattr(original, a) for a in ("query", "key", "value", "dropout")):
            raise ValueError(f"layer {layer_idx}: {type(original).__name__} is not a BERT "
                             "self-attention (cross-attention is not supported)")

    def has_cls(self, model):
        return not bool(getattr(self.config(model), "is_decoder", False))

    # ---- runner stages
    def n_content(self, model, inputs):
        return int(inputs.shape[1]) - 1

    def embed(self, model, inputs, lo, hi, cls):
        ids = inputs
        pos = torch.arange(1 + lo, 1 + hi, device=ids.device)
        if cls:
            ids = torch.cat([ids[:, :1], ids[:, 1 + lo:1 + hi]], 1)
            pos = torch.cat([torch.zeros(1, dtype=torch.long, device=ids.device), pos])
        else:
            ids = ids[:, 1 + lo:1 + hi]
        B = ids.shape[0]
        return base_model(model).embeddings(
            input_ids=ids, position_ids=pos.unsqueeze(0).expand(B, -1),
            token_type_ids=torch.zeros_like(ids))

    def tail(self, model, h):
        return h

    def summary(self, model, h, cls):
        return torch.stack([h[:, 0], h[:, 1:].sum(1)], 1)

    def finish_compact(self, model, summaries, n_tokens):
        cls = torch.stack([s[:, 0] for s in summaries]).mean(0)
        total = cls + sum(s[:, 1] for s in summaries)
        return total / n_tokens  # mean pooling over all tokens (sentence-transformers)

    def tp_spec(self, model, blk):
        s, o = blk.attention.self, blk.attention.output
        return dict(pre_ln=False, norm1=o.LayerNorm, norm2=blk.output.LayerNorm,
                    wq=s.query.weight, wk=s.key.weight, wv=s.value.weight,
                    bq=s.query.bias, bk=s.key.bias, bv=s.value.bias,
                    wo=o.dense.weight, bo=o.dense.bias,
                    w1=blk.intermediate.dense.weight, b1=blk.intermediate.dense.bias,
                    act=blk.intermediate.intermediate_act_fn,
                    w2=blk.output.dense.weight, b2=blk.output.dense.bias,
                    heads=s.num_attention_heads, head_dim=s.attention_head_size,
                    scale=s.attention_head_size ** -0.5, causal=False)


ADAPTER = BertAdapter()

"""HF ``vit``: replaces each layer's ``attention`` (``ViTAttention``: q/k/v/o_proj).

ViT is pre-LN: the attention input X is ``layernorm_before``'s output. Token 0 is the
class token. Covers the transformers 5.x layout (``ViTModel.layers``). Runner stages:
pixels in, the class token's logits out (the normalized hidden states for ``ViTModel``).
"""
from __future__ import annotations

from torch import nn

from ._hf import HFAdapter, HFAstraAttention, base_model, heads, hf_mask
from ._vit import ClassTokenViTStages


class ViTAstraAttention(HFAstraAttention):
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
        return heads(self.q_proj(x), self.head_dim)

    def project_kv(self, x):
        return heads(self.k_proj(x), self.head_dim), heads(self.v_proj(x), self.head_dim)

    def kv_affine(self):
        return self.k_proj.weight, self.k_proj.bias, self.v_proj.weight, self.v_proj.bias

    def output(self, o, x):
        return self.o_proj(o)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        o = self.attend(hidden_states, hf_mask(attention_mask))  # no KV cache in a ViT
        return self.output(o, hidden_states), None


class ViTAdapter(ClassTokenViTStages, HFAdapter):
    family = "hf:vit"
    layers_path = "layers"
    slot = "attention"
    attention_cls = ViTAstraAttention

    def check_original(self, original, layer_idx):
        if not all(hasattr(original, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise ValueError(f"layer {layer_idx}: {type(original).__name__} is not the "
                             "ViTAttention of transformers 5.x")

    def has_cls(self, model):
        return True

    def seq_len(self, model):
        cfg = self.config(model)
        img, patch = cfg.image_size, cfg.patch_size
        img = img if isinstance(img, (list, tuple)) else (img, img)
        patch = patch if isinstance(patch, (list, tuple)) else (patch, patch)
        return (img[0] // patch[0]) * (img[1] // patch[1]) + 1

    # ---- runner stages
    def n_content(self, model, inputs):
        return int(base_model(model).embeddings.patch_embeddings.num_patches)

    def tokens(self, model, img):
        return base_model(model).embeddings(img)

    def tail(self, model, h):
        h = base_model(model).layernorm(h)
        head = getattr(model, "classifier", None)
        return head(h[:, 0]) if head is not None else h

    def tp_spec(self, model, blk):
        a, mlp = blk.attention, blk.mlp
        return dict(pre_ln=True, norm1=blk.layernorm_before, norm2=blk.layernorm_after,
                    wq=a.q_proj.weight, wk=a.k_proj.weight, wv=a.v_proj.weight,
                    bq=a.q_proj.bias, bk=a.k_proj.bias, bv=a.v_proj.bias,
                    wo=a.o_proj.weight, bo=a.o_proj.bias,
                    w1=mlp.fc1.weight, b1=mlp.fc1.bias, act=mlp.activation_fn,
                    w2=mlp.fc2.weight, b2=mlp.fc2.bias,
                    heads=a.num_attention_heads, head_dim=a.head_dim,
                    scale=float(a.scaling), causal=False)


ADAPTER = ViTAdapter()

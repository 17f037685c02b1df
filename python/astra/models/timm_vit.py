"""timm ``VisionTransformer``: replaces each block's ``attn`` (``timm.layers.Attention``).

Pre-LN: the attention input X is ``norm1``'s output. The fused ``qkv`` Linear holds
W_q, W_k, W_v stacked by rows. Optional parts of timm's Attention are kept: q/k norm
(then the key map is not affine, so the kernel path gets materialized remote keys
instead of projected tables), scale norm, output gate. Runner stages: the shared
class-token ViT stages; tensor parallelism for plain blocks (no layer scale, qk norm
or mlp norm).
"""
from __future__ import annotations

from typing import List, Tuple

import torch.nn.functional as F
from torch import nn

from ..attention import AstraAttention
from . import Adapter, stable_hash
from ._vit import ClassTokenViTStages


class TimmAstraAttention(AstraAttention):
    """Drop-in for ``timm.layers.Attention``: same submodules (qkv, q_norm, k_norm,
    attn_drop, norm, gate, proj, proj_drop), ``forward(x, attn_mask=None,
    is_causal=False) -> x``."""

    def __init__(self, original: nn.Module, layer_idx: int):
        super().__init__(layer_idx=layer_idx, num_heads=original.num_heads,
                         head_dim=original.head_dim, scale=float(original.scale),
                         causal=False, attn_dropout=float(original.attn_drop.p))
        self.qkv, self.q_norm, self.k_norm = original.qkv, original.q_norm, original.k_norm
        self.attn_drop, self.norm = original.attn_drop, original.norm
        self.gate = getattr(original, "gate", None)
        self.proj, self.proj_drop = original.proj, original.proj_drop
        self.attn_dim = getattr(original, "attn_dim", original.num_heads * original.head_dim)
        self.fused_attn = getattr(original, "fused_attn", False)

    def _split(self, t, n):
        B, T, _ = t.shape
        return t.reshape(B, T, n, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def project_qkv(self, x):
        q, k, v = self._split(self.qkv(x), 3).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def project_q(self, x):
        A = self.attn_dim
        b = None if self.qkv.bias is None else self.qkv.bias[:A]
        return self.q_norm(self._split(F.linear(x, self.qkv.weight[:A], b), 1)[0])

    def project_kv(self, x):
        A = self.attn_dim
        b = None if self.qkv.bias is None else self.qkv.bias[A:]
        k, v = self._split(F.linear(x, self.qkv.weight[A:], b), 2).unbind(0)
        return self.k_norm(k), v

    def kv_affine(self):
        if not isinstance(self.k_norm, nn.Identity):
            return None
        A, W, b = self.attn_dim, self.qkv.weight, self.qkv.bias
        return (W[A:2 * A], None if b is None else b[A:2 * A],
                W[2 * A:], None if b is None else b[2 * A:])

    def output(self, o, x):
        o = self.norm(o)
        if self.gate is not None:
            o = o * self.gate(x).sigmoid()
        return self.proj_drop(self.proj(o))

    def forward(self, x, attn_mask=None, is_causal=False, **kwargs):
        o = self.attend(x, attn_mask, causal=bool(is_causal) or None)
        return self.output(o, x)


class TimmViTAdapter(ClassTokenViTStages, Adapter):
    family = "timm:VisionTransformer"

    def layers(self, model) -> List[nn.Module]:
        return list(model.blocks)

    def attention_slots(self, model) -> List[Tuple[nn.Module, str]]:
        return [(blk, "attn") for blk in self.layers(model)]

    def check_original(self, original, layer_idx):
        from timm.layers import Attention
        if type(original) is not Attention:
            raise ValueError(f"block {layer_idx}: attention is {type(original).__name__}; "
                             "Astra supports timm.layers.Attention only")

    def build(self, original, layer_idx, model):
        self.check_original(original, layer_idx)
        return TimmAstraAttention(original, layer_idx)

    def dim(self, model):
        return int(model.embed_dim)

    def has_cls(self, model):
        return getattr(model, "cls_token", None) is not None

    def seq_len(self, model):
        grid = getattr(model.patch_embed, "grid_size", None)
        if grid is None or getattr(model.patch_embed, "dynamic_img_size", False):
            return None
        return int(grid[0] * grid[1]) + int(getattr(model, "num_prefix_tokens", 0))

    def name(self, model):
        cfg = getattr(model, "pretrained_cfg", None) or {}
        return str(cfg.get("architecture", "") or "")

    def config_hash(self, model):
        # Architecture fingerprint: every parameter's name and shape outside the head.
        shapes = [(n, list(p.shape)) for n, p in model.named_parameters()
                  if not n.startswith(("head.", "fc_norm."))]
        return stable_hash([type(model).__name__, shapes])

    # ---- runner stages
    def n_content(self, model, inputs):
        return int(model.patch_embed.num_patches)

    def tokens(self, model, img):
        x = model._pos_embed(model.patch_embed(img))
        return model.norm_pre(model.patch_drop(x))

    def tail(self, model, h):
        return model.forward_head(model.norm(h))

    def tp_spec(self, model, blk):
        a, mlp = blk.attn, blk.mlp
        A = a.num_heads * a.head_dim
        W, b = a.qkv.weight, a.qkv.bias
        if not (isinstance(blk.ls1, nn.Identity) and isinstance(a.q_norm, nn.Identity)
                and isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity)):
            raise NotImplementedError("tp supports plain timm ViT blocks (no layer scale, "
                                      "qk norm or mlp norm)")
        return dict(pre_ln=True, norm1=blk.norm1, norm2=blk.norm2,
                    wq=W[:A], wk=W[A:2 * A], wv=W[2 * A:],
                    bq=None if b is None else b[:A], bk=None if b is None else b[A:2 * A],
                    bv=None if b is None else b[2 * A:],
                    wo=a.proj.weight, bo=a.proj.bias,
                    w1=mlp.fc1.weight, b1=mlp.fc1.bias, act=mlp.act,
                    w2=mlp.fc2.weight, b2=mlp.fc2.bias,
                    heads=a.num_heads, head_dim=a.head_dim, scale=float(a.scale),
                    causal=False)


ADAPTER = TimmViTAdapter()

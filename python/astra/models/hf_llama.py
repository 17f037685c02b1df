"""HF ``llama``, ``mistral``, ``qwen2``, ``qwen3``: replaces each decoder layer's ``self_attn``.

The Llama family is pre-norm: the attention input X is ``input_layernorm``'s output, which
the decoder layer hands to ``self_attn``. The four differ in small switches, all read
from the original module: qwen2 has q/k/v biases (``nn.Linear`` biases, nothing to do),
qwen3 a per-head RMSNorm on queries and keys before the rotation (``q_norm``/``k_norm``),
mistral (and qwen2/3 layers marked sliding) a sliding window. Keys and values have
``num_key_value_heads`` heads (GQA), repeated only at attention time.

RoPE: queries and keys are rotated by the model's own ``apply_rotary_pos_emb`` (from the
original's modeling module) with the model's own cos/sin: the ``position_embeddings``
HF hands the layer (simulate mode, the whole sequence), else the model's ``rotary_emb``
at global positions (distributed mode, remote keys, the runner's blocks).

Runner stages: no class token; embed = token embeddings of the chunk (positions enter
through RoPE inside attention, so a block needs nothing else); the compact output is
the last token's logits. Tensor parallel: the generic block with its Llama switches
(GQA, SwiGLU, a query/key hook for qwen3's norms and RoPE at positions ``0..T-1``).
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from ._hf import CausalLMStages, HFAstraAttention, base_model, first_attr, hf_mask


class LlamaAstraAttention(HFAstraAttention):
    """Drop-in for ``LlamaAttention`` / ``MistralAttention`` / ``Qwen2Attention`` /
    ``Qwen3Attention``: same submodules (q_proj, k_proj, v_proj, o_proj; q_norm, k_norm
    on qwen3), ``forward(hidden_states, position_embeddings, attention_mask, ...) ->
    (attn_output, None)``. ``rotary``: the model's rotary module (cos/sin for positions
    the caller does not give)."""

    def __init__(self, original: nn.Module, layer_idx: int, rotary: nn.Module = None):
        cfg = original.config
        super().__init__(layer_idx=layer_idx, num_heads=cfg.num_attention_heads,
                         head_dim=original.head_dim, scale=float(original.scaling),
                         causal=True, num_kv_heads=cfg.num_key_value_heads,
                         attn_dropout=float(getattr(original, "attention_dropout", 0.0)))
        self.config = cfg
        self.q_proj, self.k_proj = original.q_proj, original.k_proj
        self.v_proj, self.o_proj = original.v_proj, original.o_proj
        self.q_norm = getattr(original, "q_norm", None)
        self.k_norm = getattr(original, "k_norm", None)
        self.num_key_value_groups = original.num_key_value_groups
        self.attention_dropout = getattr(original, "attention_dropout", 0.0)
        self.scaling = original.scaling
        self.is_causal = True
        self.sliding_window = (original.sliding_window if hasattr(original, "sliding_window")
                               else getattr(cfg, "sliding_window", None))
        self.window = self.sliding_window
        self._apply_rope = sys.modules[type(original).__module__].apply_rotary_pos_emb
        if rotary is not None:  # a bound method: the module stays the model's, not ours
            self.rotary = rotary.__call__

    def _heads(self, t, norm):
        t = t.view(*t.shape[:-1], t.shape[-1] // self.head_dim, self.head_dim)
        return (t if norm is None else norm(t)).transpose(1, 2)

    def split_heads(self, q, k, v):
        """Projections ``[B, T, H*d]``, ``[B, T, Hkv*d]`` x2 -> heads ``[B, H|Hkv, T, d]``
        (qwen3: with its query/key norms), as :meth:`project_qkv` makes them."""
        return self._heads(q, self.q_norm), self._heads(k, self.k_norm), self._heads(v, None)

    def project_q(self, x):
        return self._heads(self.q_proj(x), self.q_norm)

    def project_kv(self, x):
        return self._heads(self.k_proj(x), self.k_norm), self._heads(self.v_proj(x), None)

    def kv_affine(self):
        if self.k_norm is not None:
            return None  # qwen3: exact tables only at G=1 (see projected_tables)
        return self.k_proj.weight, self.k_proj.bias, self.v_proj.weight, self.v_proj.bias

    def rotate(self, q, k, cos, sin):
        return self._apply_rope(q, k, cos, sin)

    def output(self, o, x):
        return self.o_proj(o)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        o = self.attend(hidden_states, hf_mask(attention_mask), cache=cache,
                        rope=position_embeddings)
        return self.output(o, hidden_states), None


class _QKRope:
    """The TP block's query/key hook: qwen3's per-head norms, then RoPE at positions
    ``0..T-1`` (cos/sin from the model's rotary module, rotation from its modeling
    module)."""

    def __init__(self, attn, rotary, apply, window):
        self.q_norm = getattr(attn, "q_norm", None)
        self.k_norm = getattr(attn, "k_norm", None)
        self.rotary, self.apply, self.window = rotary, apply, window

    def __call__(self, q, k):
        T = q.shape[2]
        if self.window is not None and T > self.window:
            raise NotImplementedError(f"a {T}-token sequence exceeds the sliding window "
                                      f"({self.window}): not supported")
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = self.rotary(q, torch.arange(T, device=q.device).unsqueeze(0))
        return self.apply(q, k, cos, sin)


class LlamaAdapter(CausalLMStages):
    family = "hf:llama"
    causal = True
    layers_path = "layers"
    slot = "self_attn"
    final_norm = "norm"
    attention_cls = LlamaAstraAttention

    def check_original(self, original, layer_idx):
        if not all(hasattr(original, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise ValueError(f"layer {layer_idx}: {type(original).__name__} is not a "
                             "Llama-family self-attention")
        mod = sys.modules.get(type(original).__module__)
        if not hasattr(mod, "apply_rotary_pos_emb"):
            raise ValueError(f"layer {layer_idx}: {type(original).__module__} has no "
                             "apply_rotary_pos_emb")

    def build(self, original, layer_idx, model):
        self.check_original(original, layer_idx)
        return LlamaAstraAttention(original, layer_idx, self.rotary(model))

    def rotary(self, model) -> nn.Module:
        """The model's rotary embedding module."""
        return first_attr(base_model(model), "rotary_emb")

    def identity(self, model):
        ident = super().identity(model)
        ident["model"] = f"hf:{self.config(model).model_type}"
        return ident

    # ---- runner stages
    def embed(self, model, inputs, lo, hi, cls):
        return base_model(model).embed_tokens(inputs[:, lo:hi])

    def tp_spec(self, model, blk):
        a, m, cfg = blk.self_attn, blk.mlp, self.config(model)
        window = (a.sliding_window if hasattr(a, "sliding_window")
                  else getattr(cfg, "sliding_window", None))
        apply = sys.modules[type(blk).__module__].apply_rotary_pos_emb
        return dict(pre_ln=True, norm1=blk.input_layernorm, norm2=blk.post_attention_layernorm,
                    wq=a.q_proj.weight, wk=a.k_proj.weight, wv=a.v_proj.weight,
                    bq=a.q_proj.bias, bk=a.k_proj.bias, bv=a.v_proj.bias,
                    wo=a.o_proj.weight, bo=a.o_proj.bias,
                    w1=m.gate_proj.weight, b1=m.gate_proj.bias, act=m.act_fn,
                    w3=m.up_proj.weight, b3=m.up_proj.bias,
                    w2=m.down_proj.weight, b2=m.down_proj.bias,
                    heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                    head_dim=a.head_dim, scale=float(a.scaling), causal=True,
                    qk_fn=_QKRope(a, self.rotary(model), apply, window))


ADAPTER = LlamaAdapter()

"""What the Hugging Face families share: the attention base class (head split, the
HF call convention) and the adapter base (layers by attribute path, config identity)."""
from __future__ import annotations

from typing import List, Optional, Tuple

from torch import Tensor, nn

from ..attention import AstraAttention
from . import Adapter, hf_config_hash, hf_name


def base_model(model: nn.Module) -> nn.Module:
    """The bare transformer under a task head (``BertForX.bert`` ...)."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def first_attr(obj, *paths: str):
    """The first ``a.b.c`` path that exists on ``obj``."""
    for path in paths:
        cur = obj
        for part in path.split("."):
            cur = getattr(cur, part, None)
            if cur is None:
                break
        if cur is not None:
            return cur
    raise ValueError(f"{type(obj).__name__} has none of {', '.join(paths)}: an HF "
                     "layout this version of Astra does not know")


def hf_mask(mask: Optional[Tensor]) -> Optional[Tensor]:
    """HF masks for AstraAttention: a 2-D ``[B, T]`` keep-mask (1 = token, as flash
    attention gets it) becomes a bool ``[B, 1, 1, T]``; 4-D masks pass unchanged."""
    if mask is not None and mask.dim() == 2:
        return mask.bool()[:, None, None, :]
    return mask


def heads(t: Tensor, d: int) -> Tensor:
    """``[..., T, H*d] -> [..., H, T, d]``."""
    return t.view(*t.shape[:-1], -1, d).transpose(1, 2)


class HFAstraAttention(AstraAttention):
    """An HF self-attention replacement: ``forward(hidden_states, attention_mask=None,
    ...) -> (attn_output, None)``, the KV cache passed as ``cache`` or
    ``past_key_values``. Subclasses hold the original's projections and define
    ``project_q``/``project_kv``/``kv_affine``/``output``."""

    def forward(self, hidden_states, attention_mask=None, cache=None, past_key_values=None,
                encoder_hidden_states=None, **kwargs):
        if encoder_hidden_states is not None:
            raise NotImplementedError("AstraAttention replaces self-attention only")
        cache = cache if cache is not None else past_key_values
        o = self.attend(hidden_states, hf_mask(attention_mask), cache=cache)
        return self.output(o, hidden_states), None


class HFAdapter(Adapter):
    """An HF family: blocks at ``layers_path`` under the base model, each block's
    self-attention at ``slot`` (``"attention.self"``: parent ``attention``, attribute
    ``self``), replaced by ``attention_cls(original, layer_idx)``."""

    layers_path: str = ""
    slot: str = ""
    attention_cls: type = HFAstraAttention

    def layers(self, model) -> List[nn.Module]:
        return list(first_attr(base_model(model), self.layers_path))

    def attention_slots(self, model) -> List[Tuple[nn.Module, str]]:
        parent, _, name = self.slot.rpartition(".")
        return [(first_attr(layer, parent) if parent else layer, name)
                for layer in self.layers(model)]

    def build(self, original, layer_idx, model):
        self.check_original(original, layer_idx)
        return self.attention_cls(original, layer_idx)

    def config(self, model):
        return base_model(model).config

    def dim(self, model):
        return int(self.config(model).hidden_size)

    def name(self, model):
        return hf_name(self.config(model))

    def config_hash(self, model):
        return hf_config_hash(self.config(model))


class CausalLMStages(HFAdapter):
    """Runner stages every causal HF language model shares: no class token, the tail is
    the base model's final norm (attribute ``final_norm``) and the LM head, the compact
    output the last token's next-token logits."""

    final_norm: str = ""

    def n_content(self, model, inputs):
        return int(inputs.shape[1])

    def tail(self, model, h):
        h = getattr(base_model(model), self.final_norm)(h)
        head = getattr(model, "lm_head", None)
        return head(h) if head is not None else h

    def summary(self, model, h, cls):
        return h[:, -1:]

    def finish_compact(self, model, summaries, n_tokens):
        return self.tail(model, summaries[-1])[:, 0]


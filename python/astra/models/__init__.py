"""Model families: one table row and one adapter module per family.

One table maps a model to its adapter: HF models by ``config.model_type``, timm models
by class (``"timm:<ClassName>"``, matched along the model's MRO, so subclasses of a
supported timm class are found too). Adapter modules are imported lazily, so
``import astra`` needs neither transformers nor timm.

An adapter module defines ``ADAPTER``, an :class:`Adapter` instance with both faces of
its family: how :func:`astra.patch` swaps its attention, and how the runner stages it
(embed a chunk, run the blocks, finish; the tensor-parallel split of a block). Adding a
family is one row in :data:`TABLE` and one module here.
"""
from __future__ import annotations

import hashlib
import importlib
import json
from typing import Any, Dict, List, Optional, Tuple

from torch import Tensor, nn

# family key -> adapter module (relative to this package)
TABLE: Dict[str, str] = {
    "bert": "hf_bert",
    "gpt2": "hf_gpt2",
    "vit": "hf_vit",
    "timm:VisionTransformer": "timm_vit",
    "llama": "hf_llama",
    "mistral": "hf_llama",
    "qwen2": "hf_llama",
    "qwen3": "hf_llama",
}


def supported_models() -> List[str]:
    """Keys of the dispatch table: HF ``model_type`` values and timm classes."""
    return list(TABLE)


class Adapter:
    """What :func:`astra.patch` needs to know about one model family.

    Patch face: :meth:`layers`, :meth:`attention_slots`, :meth:`build`, :meth:`dim`,
    :meth:`config_hash` (HF families get most of it from
    :class:`astra.models._hf.HFAdapter`). Runner face (:mod:`astra.parallel`):
    :meth:`n_content`, :meth:`embed`, :meth:`tail`, :meth:`summary`,
    :meth:`finish_compact`, :meth:`tp_spec`; every rank embeds only its own tokens (at
    their global positions, a class-token copy first where the model has one), runs
    every block on them and sends a summary to rank 0, which finishes.
    """

    family: str = ""          # identity string stored in codebook files, e.g. "hf:bert"
    causal: bool = False      # causal self-attention (no class token then)

    def layers(self, model: nn.Module) -> List[nn.Module]:
        """The transformer blocks, in order."""
        raise NotImplementedError

    def attention_slots(self, model: nn.Module) -> List[Tuple[nn.Module, str]]:
        """``(parent, attribute)`` of each block's self-attention module (the one whose
        input is the attention input X and that AstraAttention replaces)."""
        raise NotImplementedError

    def build(self, original: nn.Module, layer_idx: int, model: nn.Module):
        """An :class:`astra.AstraAttention` that computes what ``original`` computes."""
        raise NotImplementedError

    def check_original(self, original: nn.Module, layer_idx: int) -> None:
        """Raise ``ValueError`` when ``original`` is not a module this adapter handles."""

    def dim(self, model: nn.Module) -> int:
        raise NotImplementedError

    def has_cls(self, model: nn.Module) -> bool:
        """Whether token 0 is a class token (distributed class tokens apply)."""
        return False

    def seq_len(self, model: nn.Module) -> Optional[int]:
        """The fixed sequence length, where the model has one (vision models)."""
        return None

    def name(self, model: nn.Module) -> str:
        return ""

    def config_hash(self, model: nn.Module) -> str:
        raise NotImplementedError

    def identity(self, model: nn.Module) -> Dict[str, Any]:
        """The metadata a codebook file must match: model, config_hash, num_layers, dim
        (the attention input's width) and kv_dim (``[key; value]``'s, ``2·Hkv·d``)."""
        return {"model": self.family, "name": self.name(model),
                "config_hash": self.config_hash(model),
                "num_layers": len(self.layers(model)), "dim": self.dim(model),
                "kv_dim": self.kv_dim(model)}

    def kv_dim(self, model: nn.Module) -> int:
        """The width of a token's ``[key; value]`` in one layer, ``2·Hkv·d`` (what
        ``"kv"`` codebooks quantize), read off layer 0's attention module."""
        from ..attention import AstraAttention
        parent, name = self.attention_slots(model)[0]
        a = getattr(parent, name)
        if not isinstance(a, AstraAttention):
            a = self.build(a, 0, model)
        return 2 * a.num_kv_heads * a.head_dim

    # ------------------------------------------------------------ the runner's stages

    def n_content(self, model: nn.Module, inputs: Tensor) -> int:
        """Tokens of ``inputs`` that ranks split among them (the class token excluded)."""
        raise NotImplementedError(f"{self.family} has no runner stages")

    def embed(self, model: nn.Module, inputs: Tensor, lo: int, hi: int, cls: bool) -> Tensor:
        """Hidden states of content tokens ``[lo, hi)``, the class token first if ``cls``."""
        raise NotImplementedError(f"{self.family} has no runner stages")

    def run_block(self, model: nn.Module, block: nn.Module, h: Tensor) -> Tensor:
        return block(h)

    def tail(self, model: nn.Module, h: Tensor) -> Tensor:
        """Full hidden states (class copies pooled) -> the model's output (``"full"``)."""
        raise NotImplementedError(f"{self.family} has no runner stages")

    def summary(self, model: nn.Module, h: Tensor, cls: bool) -> Tensor:
        """What a rank sends rank 0 for the ``"compact"`` output: what an application
        needs and no more (ViT: the class copy; BERT: the class copy and the sum of the
        rank's token states; GPT-2: the last token)."""
        raise NotImplementedError(f"{self.family} has no runner stages")

    def finish_compact(self, model: nn.Module, summaries: List[Tensor],
                       n_tokens: int) -> Tensor:
        """Every rank's :meth:`summary` -> the compact output (logits, embedding)."""
        raise NotImplementedError(f"{self.family} has no runner stages")

    def tp_spec(self, model: nn.Module, block: nn.Module) -> Dict[str, Any]:
        """The keyword arguments of :class:`astra.parallel.tp.TPBlock` for ``block``:
        ``pre_ln, norm1, norm2, wq, wk, wv, bq, bk, bv, wo, bo, w1, b1, act, w2, b2,
        heads, head_dim, scale, causal`` (weights ``[out, in]``), and for Llama-style
        blocks ``kv_heads`` (GQA), ``w3, b3`` (gated MLP), ``qk_fn`` (norms, RoPE)."""
        raise NotImplementedError(f"{self.family} has no tensor-parallel split")


def stable_hash(obj: Any) -> str:
    """Short sha256 of a JSON-able object (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# Config fields that shape the activations; the hash ignores everything else (names,
# dtypes, attention implementation, label maps, fields newer transformers add).
HF_ARCH_FIELDS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "intermediate_size", "n_inner", "vocab_size",
    "max_position_embeddings", "type_vocab_size", "hidden_act", "activation_function",
    "layer_norm_eps", "layer_norm_epsilon", "position_embedding_type", "is_decoder",
    "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "image_size", "patch_size",
    "num_channels", "qkv_bias", "encoder_stride",
    # RoPE / Llama family (absent from the bert, gpt2 and vit configs: their hashes stay)
    "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
    "attention_bias", "mlp_bias", "rms_norm_eps", "sliding_window", "layer_types",
)


def hf_config_hash(config) -> str:
    fields = {}
    for name in HF_ARCH_FIELDS:
        try:
            val = getattr(config, name)
        except AttributeError:
            continue
        if isinstance(val, (int, float, str, bool, list, tuple, dict)) or val is None:
            fields[name] = list(val) if isinstance(val, tuple) else val
    return stable_hash(fields)


def hf_name(config) -> str:
    return str(getattr(config, "name_or_path", "") or "")


def resolve(model: nn.Module) -> Tuple[str, Adapter]:
    """``(key, adapter)`` for ``model``; ``ValueError`` listing the supported models."""
    key = _key(model)
    if key is None or key not in TABLE:
        raise ValueError(
            f"Astra does not support {_describe(model)}; supported: "
            + ", ".join(f"'{k}'" for k in TABLE)
            + " (HF config.model_type, or a timm model class)")
    mod = importlib.import_module(f"{__name__}.{TABLE[key]}")
    return key, mod.ADAPTER


def _key(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    mt = getattr(config, "model_type", None)
    if isinstance(mt, str) and mt:
        return mt
    for cls in type(model).__mro__:
        if cls.__module__.startswith("timm.") and f"timm:{cls.__name__}" in TABLE:
            return f"timm:{cls.__name__}"
    return None


def _describe(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    mt = getattr(config, "model_type", None)
    cls = f"{type(model).__module__}.{type(model).__qualname__}"
    return f"model_type '{mt}' ({cls})" if mt else cls

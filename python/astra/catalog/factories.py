"""Constructors of the catalogue's models (top-level functions, so a
:class:`~astra.catalog.ModelSpec` pickles them by reference and every rank builds the
same model: weights are seeded or loaded, never sent)."""
from __future__ import annotations

import torch

from .inputs import minilm_path


def tiny_gpt2(seed: int = 0, layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=layers, n_head=4, vocab_size=97, n_positions=128,
                     bos_token_id=0, eos_token_id=0,
                     attn_pdrop=0, resid_pdrop=0, embd_pdrop=0)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0, layers: int = 2):
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=64, vocab_size=97, max_position_embeddings=128,
                     hidden_dropout_prob=0, attention_probs_dropout_prob=0)
    cfg._attn_implementation = "eager"
    return BertModel(cfg, add_pooling_layer=False).eval()


def _tiny_decoder(config_cls, model_cls, seed: int, layers: int, **extra):
    """A small random Llama-family LM: D=64, 4 query heads / 2 KV heads (GQA), head_dim
    16, vocab 101, eager attention; weights wider than HF's default init, so attention
    is peaked and positions (RoPE) matter."""
    torch.manual_seed(seed)
    cfg = config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     vocab_size=101, max_position_embeddings=256, attention_dropout=0.0,
                     tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                     pad_token_id=0, initializer_range=0.15, **extra)
    cfg._attn_implementation = "eager"
    return model_cls(cfg).eval()


def tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM
    return _tiny_decoder(LlamaConfig, LlamaForCausalLM, seed, layers)


def tiny_qwen2(seed: int = 0, layers: int = 2):
    """Qwen2: q/k/v projections with biases."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return _tiny_decoder(Qwen2Config, Qwen2ForCausalLM, seed, layers)


def tiny_qwen3(seed: int = 0, layers: int = 2):
    """Qwen3: per-head RMSNorm on queries and keys before the rotation."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    return _tiny_decoder(Qwen3Config, Qwen3ForCausalLM, seed, layers)


def tiny_vit(seed: int = 0):
    import timm
    torch.manual_seed(seed)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5).eval()


def tiny_hf_vit(seed: int = 0, layers: int = 2):
    """A small HF ViT classifier (8x8 one-channel images, 2x2 patches: 16 tokens)."""
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=32,
                    num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                    num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "eager"
    return ViTForImageClassification(cfg).eval()


def vit_base(seed: int = 0):
    import timm
    torch.manual_seed(seed)
    return timm.create_model("vit_base_patch16_224", pretrained=False).eval()


def gpt2_small(seed: int = 0, positions: int = 1024):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(n_positions=positions)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg).eval()


def link_probe(seed: int = 0):
    """A narrow 4-layer GPT-2 (D=192) whose per-layer payload dominates its compute:
    for checking a link (``--link netns`` against ``--link emulated``)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=192, n_layer=4, n_head=4, n_positions=1024, vocab_size=1000,
                     bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg).eval()


def minilm():
    """The real all-MiniLM-L6-v2 (BERT, 6 layers, D=384), eager attention."""
    from transformers import AutoModel
    return AutoModel.from_pretrained(str(minilm_path()), attn_implementation="eager").eval()


def byte_gpt2(trained: bool = True):
    """The project's byte-level GPT-2 (:func:`astra.zoo.byte_gpt2`, trained on first use
    and cached); ``trained=False``: its architecture only (weights to be loaded, e.g.
    from an ``astra finetune`` checkpoint)."""
    from astra import zoo
    if trained:
        return zoo.byte_gpt2(progress=False)
    from transformers import GPT2LMHeadModel
    torch.manual_seed(zoo.BYTES_SPEC["seed"])
    return GPT2LMHeadModel(zoo.byte_gpt2_config()).eval()


def digits_vit(trained: bool = True):
    """The project's digits ViT (:func:`astra.zoo.digits_vit`, an HF ViT trained on
    first use and cached); ``trained=False``: its architecture only."""
    from astra import zoo
    if trained:
        return zoo.digits_vit(progress=False).eval()
    from transformers import ViTForImageClassification
    torch.manual_seed(zoo.DIGITS_SPEC["seed"])
    return ViTForImageClassification(zoo.digits_vit_config()).eval()

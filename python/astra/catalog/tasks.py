"""Tasks: a named model with calibration and evaluation inputs (and a metric where the
model has one), for ``astra eval``, ``astra finetune`` and the accuracy study.

Models: ``minilm`` (the real all-MiniLM-L6-v2 weights, text from ``pydoc_data.topics``:
the even topics calibrate, the odd ones evaluate, in 256-token inputs), ``digits-vit``
and ``byte-gpt2`` (:mod:`astra.zoo`), a local HF model folder (text models with a
tokenizer), or an HF model type / timm architecture name (random weights, random
inputs: checks the plumbing, not quality). :func:`study_task` adds the training batches
of the three models the accuracy study fine-tunes (:data:`STUDY_MODELS`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from ..options import STUDY_MODELS
from .inputs import minilm_path

__all__ = ["Task", "load_task", "study_task", "token_windows", "STUDY_MODELS",
           "MODEL_DEFAULTS", "SEQ_LEN"]

SEQ_LEN = 256


@dataclass
class Task:
    """A model with calibration and evaluation inputs.

    ``forward(model, batch) -> [B, T, D]`` gives the features compared (last hidden
    state); ``metric(model) -> {name: value}`` an optional task metric.
    """

    name: str
    model: nn.Module
    calib: List
    evals: List
    forward: Callable[[nn.Module, object], Tensor]
    metric: Optional[Callable[[nn.Module], Dict[str, float]]] = None
    notes: Dict[str, object] = field(default_factory=dict)


def _read(path) -> Dict[str, str]:
    return {str(path): Path(path).read_text(encoding="utf-8")}


def token_windows(tokenizer, texts: Dict[str, str], seq_len: int = SEQ_LEN,
                  limit: Optional[int] = None) -> Tensor:
    """Each document's tokens cut into full ``seq_len``-token inputs ``[CLS] ... [SEP]``
    (the remainder of each document is dropped), ``[N, seq_len]``."""
    body = seq_len - 2
    rows = []
    for text in texts.values():
        if limit is not None and len(rows) >= limit:
            break
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        for i in range(0, len(ids) - body + 1, body):
            rows.append([tokenizer.cls_token_id] + ids[i:i + body] + [tokenizer.sep_token_id])
    if not rows:
        raise ValueError(f"the text has fewer than {body} tokens: no {seq_len}-token input")
    out = torch.tensor(rows, dtype=torch.long)
    return out[:limit] if limit is not None else out


def _batches(ids: Tensor, batch: int) -> List[Dict[str, Tensor]]:
    return [{"input_ids": ids[i:i + batch], "attention_mask": torch.ones_like(ids[i:i + batch])}
            for i in range(0, len(ids), batch)]


def _hidden(model, batch):
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    if isinstance(batch, dict):
        return base(**batch).last_hidden_state
    if hasattr(model, "forward_features"):  # timm
        return model.forward_features(batch)
    return base(batch).last_hidden_state


def _text_task(name, model, tokenizer, calib_text, text, limit, calib_limit, batch):
    from astra import data
    calib = _read(calib_text) if calib_text else data.pydoc_topics("calib", holdout_every=2)
    evals = _read(text) if text else data.pydoc_topics("heldout", holdout_every=2)
    c = token_windows(tokenizer, calib, limit=calib_limit)
    e = token_windows(tokenizer, evals, limit=limit)
    return Task(name, model, _batches(c, batch), _batches(e, batch), _hidden,
                notes={"calib_inputs": len(c), "eval_inputs": len(e), "seq_len": SEQ_LEN})


def load_task(model: str, *, calib_text=None, text=None, limit: Optional[int] = None,
              calib_limit: Optional[int] = None, batch: int = 4, seed: int = 0) -> Task:
    """The :class:`Task` for ``--model`` (see the module docstring)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is local
    from astra import zoo
    if model == "minilm" or (os.path.isdir(model) and
                             os.path.exists(os.path.join(model, "config.json"))):
        from transformers import AutoModel, AutoTokenizer
        path = minilm_path() if model == "minilm" else Path(model)
        tok = AutoTokenizer.from_pretrained(path)
        m = AutoModel.from_pretrained(path).eval()
        return _text_task(model, m, tok, calib_text, text, limit, calib_limit, batch)
    if model == "digits-vit":
        from astra import data
        m = zoo.digits_vit()
        xtr, _, xte, yte = data.digits(seed=0)
        xtr, xte_l = xtr[:calib_limit], xte[:limit]
        b = 64
        return Task(model, m, [{"pixel_values": xtr[i:i + b]} for i in range(0, len(xtr), b)],
                    [{"pixel_values": xte_l[i:i + b]} for i in range(0, len(xte_l), b)],
                    _hidden, metric=lambda mm: {"top1": zoo.digits_accuracy(mm, xte, yte)},
                    notes={"calib_inputs": len(xtr), "eval_inputs": len(xte_l)})
    if model == "byte-gpt2":
        from astra import data
        m = zoo.byte_gpt2()
        ctx = zoo.BYTES_SPEC["ctx"]
        stream = data.byte_tensor(data.pydoc_topics("calib")).long()
        n = min(len(stream) // ctx, calib_limit or 256)
        cw = stream[: n * ctx].reshape(n, ctx)
        ew = zoo.heldout_bytes(ctx, limit=limit or 128)
        b = 16
        return Task(model, m, [{"input_ids": cw[i:i + b]} for i in range(0, len(cw), b)],
                    [{"input_ids": ew[i:i + b]} for i in range(0, len(ew), b)], _hidden,
                    metric=lambda mm: {"perplexity": zoo.perplexity(mm, ew)},
                    notes={"calib_inputs": len(cw), "eval_inputs": len(ew), "seq_len": ctx})
    return _random_task(model, limit or 8, calib_limit or 16, seed)


def _random_task(name: str, n_eval: int, n_calib: int, seed: int) -> Task:
    """An HF model type (``bert``, ``gpt2``, ``vit``) or a timm name, random weights."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    try:
        import timm
        if name in timm.list_models():
            m = timm.create_model(name, pretrained=False).eval()
            size = m.default_cfg.get("input_size", (3, 224, 224))
            mk = lambda n: torch.randn(n, *size, generator=gen)  # noqa: E731
            return Task(name, m, [mk(2) for _ in range(max(1, n_calib // 2))],
                        [mk(2) for _ in range(max(1, n_eval // 2))], _hidden,
                        notes={"weights": "random"})
    except ImportError:
        pass
    from transformers import AutoConfig, AutoModel
    try:
        cfg = AutoConfig.for_model(name)
    except ValueError:
        raise ValueError(f"unknown model {name!r}: use minilm, digits-vit, byte-gpt2, a local "
                         "HF folder, an HF model type or a timm architecture name") from None
    m = AutoModel.from_config(cfg).eval()
    if cfg.model_type == "vit":
        s, c = cfg.image_size, cfg.num_channels
        mk = lambda n: {"pixel_values": torch.randn(n, c, s, s, generator=gen)}  # noqa: E731
    else:
        T = min(SEQ_LEN, getattr(cfg, "max_position_embeddings", getattr(cfg, "n_positions", 256)))
        mk = lambda n: {"input_ids": torch.randint(cfg.vocab_size, (n, T), generator=gen)}  # noqa
    return Task(name, m, [mk(2) for _ in range(max(1, n_calib // 2))],
                [mk(2) for _ in range(max(1, n_eval // 2))], _hidden, notes={"weights": "random"})


# Per model: defaults that work (digits/byte models were trained here at lr ~2e-3).
MODEL_DEFAULTS = {"digits-vit": dict(lr=3e-4, steps=200),
                  "byte-gpt2": dict(lr=3e-4, steps=300),
                  "minilm": dict(lr=5e-5, steps=300)}


def study_task(name: str, progress: bool = True):
    """``(task, train_batches)`` for one of :data:`STUDY_MODELS`: the :class:`Task`
    (evaluation inputs, metric) and the training batches (with labels where the task has
    them): digits train split + labels, the calibration byte windows, MiniLM's
    calibration windows."""
    from astra import zoo
    if name not in STUDY_MODELS:
        raise ValueError(f"unknown model {name!r}; finetune knows {', '.join(STUDY_MODELS)}")
    # train (first use) or load the project's models here, so that `progress` is obeyed
    if name == "digits-vit":
        zoo.digits_vit(progress=progress)
    elif name == "byte-gpt2":
        zoo.byte_gpt2(progress=progress)
    if name == "digits-vit":
        from astra import data
        task = load_task(name)
        x, y, _, _ = data.digits(seed=0)
        b = 64
        train = [{"pixel_values": x[i:i + b], "labels": y[i:i + b]} for i in range(0, len(y), b)]
        return task, train
    if name == "byte-gpt2":
        task = load_task(name, calib_limit=1024)
        return task, list(task.calib)
    task = load_task(name)
    return task, list(task.calib)

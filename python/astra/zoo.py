"""The project's own small models, trained here on data that ships offline.

No pretrained ViT or GPT-2 weights can be downloaded on these machines, so accuracy
is measured on two small models that Astra trains itself (seeded, minutes on a CPU,
weights cached outside the repository in ``$ASTRA_CACHE`` or ``~/.cache/astra``):

- :func:`digits_vit`: an HF ``ViTForImageClassification`` on sklearn's 8x8 digits,
  one pixel per patch (64 patch tokens + [CLS] = 65 tokens), metric top-1.
- :func:`byte_gpt2`: an HF ``GPT2LMHeadModel`` over UTF-8 bytes of the pydoc topics
  (held-out topics for evaluation), metric perplexity per byte.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional

import torch

from . import data
from .cache import cache_path, write_atomic


def _key(name: str, spec: dict) -> Path:
    return cache_path("models", name, spec, digits=12)


def _cached(name: str, spec: dict, build: Callable, train: Callable, retrain: bool):
    path = _key(name, spec)
    model = build()
    weights = path / "model.safetensors"
    # save_model/load_model: GPT-2 ties its LM head to the token embedding.
    from safetensors.torch import load_model, save_model
    if weights.exists() and not retrain:
        load_model(model, weights)
    else:
        train(model)
        write_atomic(weights, lambda tmp: save_model(
            model, tmp, metadata={"spec": json.dumps(spec, sort_keys=True)}))
    return model.eval()


# ----------------------------------------------------------------------------- digits ViT

DIGITS_SPEC = dict(hidden=64, layers=4, heads=4, mlp=128, epochs=40, batch=64, lr=2e-3, seed=0)


def digits_vit_config(spec: dict = DIGITS_SPEC):
    from transformers import ViTConfig

    return ViTConfig(image_size=8, patch_size=1, num_channels=1, hidden_size=spec["hidden"],
                     num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                     intermediate_size=spec["mlp"], num_labels=10, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)


def digits_vit(retrain: bool = False, progress: bool = True, spec: Optional[dict] = None):
    """The digits ViT, trained on first use (about three minutes here, 920 steps) and cached."""
    from transformers import ViTForImageClassification

    spec = dict(DIGITS_SPEC, **(spec or {}))

    def build():
        torch.manual_seed(spec["seed"])
        return ViTForImageClassification(digits_vit_config(spec))

    def train(model):
        x, y, _, _ = data.digits(seed=spec["seed"])
        gen = torch.Generator().manual_seed(spec["seed"])
        opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.05)
        steps = spec["epochs"] * math.ceil(len(y) / spec["batch"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, spec["lr"], total_steps=steps)
        model.train()
        bar = _bar(steps, "train digits ViT", progress)
        for _ in range(spec["epochs"]):
            perm = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y), spec["batch"]):
                idx = perm[i:i + spec["batch"]]
                loss = model(pixel_values=x[idx], labels=y[idx]).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()

    return _cached("digits_vit", spec, build, train, retrain)


@torch.no_grad()
def digits_accuracy(model, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    """Top-1 accuracy (fraction) of an image classifier returning ``.logits``."""
    correct = 0
    for i in range(0, len(y), batch):
        logits = model(pixel_values=x[i:i + batch]).logits
        correct += int((logits.argmax(-1) == y[i:i + batch]).sum())
    return correct / len(y)


# ----------------------------------------------------------------------------- byte GPT-2

BYTES_SPEC = dict(embd=128, layers=4, heads=4, ctx=256, steps=500, batch=8, lr=3e-3, seed=0)


def byte_gpt2_config(spec: dict = BYTES_SPEC):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=256, n_positions=spec["ctx"], n_embd=spec["embd"],
                      n_layer=spec["layers"], n_head=spec["heads"], resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)


def byte_gpt2(retrain: bool = False, progress: bool = True, spec: Optional[dict] = None):
    """The byte-level GPT-2, trained on the calibration topics on first use (about three
    minutes here, 500 steps) and cached."""
    from transformers import GPT2LMHeadModel

    spec = dict(BYTES_SPEC, **(spec or {}))

    def build():
        torch.manual_seed(spec["seed"])
        return GPT2LMHeadModel(byte_gpt2_config(spec))

    def train(model):
        stream = data.byte_tensor(data.pydoc_topics("calib")).long()
        gen = torch.Generator().manual_seed(spec["seed"])
        opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, spec["lr"], total_steps=spec["steps"])
        model.train()
        ctx = spec["ctx"]
        bar = _bar(spec["steps"], "train byte GPT-2", progress)
        for _ in range(spec["steps"]):
            start = torch.randint(0, len(stream) - ctx - 1, (spec["batch"],), generator=gen)
            batch = torch.stack([stream[s:s + ctx] for s in start.tolist()])
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()

    return _cached("byte_gpt2", spec, build, train, retrain)


def heldout_bytes(ctx: int = BYTES_SPEC["ctx"], limit: Optional[int] = None) -> torch.Tensor:
    """Held-out topics as ``[N, ctx]`` int64 windows (non-overlapping)."""
    stream = data.byte_tensor(data.pydoc_topics("heldout")).long()
    n = len(stream) // ctx
    if limit is not None:
        n = min(n, limit)
    return stream[: n * ctx].reshape(n, ctx)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int = 16) -> float:
    """exp(mean next-token cross-entropy) over all windows."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        logits = model(input_ids=w).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                w[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += w[:, 1:].numel()
    return math.exp(total / count)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)

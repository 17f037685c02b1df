"""How much quality Astra costs on a real model (``astra eval``, :mod:`astra.cli.eval`).

For a model, a calibration set and an evaluation set, :func:`evaluate` fits (or loads
from the cache) codebooks by a :class:`~astra.calibrate.Method`, patches the model for
N simulated devices and compares its output with the unpatched model's:

- ``emb_cos_mean`` / ``emb_cos_min``: cosine between the Astra and the single-device
  sentence embeddings (mean pooling over real tokens, as sentence-transformers does),
  mean and minimum over the evaluation inputs;
- ``tok_cos_mean``: the same per token (last hidden state), mean over real tokens;
- ``bits_per_token`` and ``compression_vs_fp16`` (``16·D / bits``);
- for the project's small models the task metric too (top-1, perplexity).

The models and their data are the catalogue's tasks (:mod:`astra.catalog.tasks`).
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .calibrate import Method, calibrate
from .catalog.tasks import Task, load_task  # noqa: F401 (the tasks evaluated: re-export)
from .codebooks import Codebooks

__all__ = ["Task", "load_task", "evaluate", "compare", "measure", "attribute_layers"]


def _pool(h: Tensor, batch) -> Tensor:
    m = batch.get("attention_mask") if isinstance(batch, dict) else None
    if m is None:
        return h.mean(1)
    m = m.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp_min(1e-9)


@torch.no_grad()
def compare(task: Task, patched_forward: Callable, ref: Sequence[Tensor]) -> Dict[str, float]:
    """Cosines of the patched model's features against ``ref`` (unpatched)."""
    emb, tok_sum, tok_n = [], 0.0, 0
    for b, r in zip(task.evals, ref):
        h = patched_forward(b).float()
        emb.append(torch.cosine_similarity(_pool(h, b), _pool(r, b), dim=-1))
        tc = torch.cosine_similarity(h, r, dim=-1)
        m = b.get("attention_mask") if isinstance(b, dict) else None
        m = torch.ones_like(tc) if m is None else m.to(tc.dtype)
        tok_sum += float((tc * m).sum())
        tok_n += float(m.sum())
    e = torch.cat(emb).double()
    return {"emb_cos_mean": float(e.mean()), "emb_cos_min": float(e.min()),
            "tok_cos_mean": tok_sum / tok_n}


def evaluate(task: Task, method: Method, devices: int = 4, *, cache: bool = True,
             progress: bool = True, log: Callable[[str], None] = print) -> Dict[str, object]:
    """Calibrate ``task.model`` by ``method`` and compare N devices with one.

    Returns the JSON row: model, devices, groups, codebook_size, bits_per_token,
    emb_cos_mean, emb_cos_min, tok_cos_mean, plus method, stages, compression_vs_fp16,
    timings and the task metric (single device and Astra) where the task has one.
    """
    from .models import resolve
    from .patch import patch, unpatch
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices must be a positive int, got {devices!r}")
    model = task.model
    ident = resolve(model)[1].identity(model)
    D = int(ident["dim"])
    t0 = time.perf_counter()
    cb = calibrate(model, task.calib, method, devices=devices, forward=task.forward,
                   cache=cache, progress=progress, log=log)
    t_cal = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = [task.forward(model, b).float() for b in task.evals]
        base_metric = task.metric(model) if task.metric else {}
    patch(model, cb, devices=devices)
    try:
        with torch.no_grad():
            res = compare(task, lambda b: task.forward(model, b), ref)
            astra_metric = task.metric(model) if task.metric else {}
    finally:
        unpatch(model)
    t_eval = time.perf_counter() - t0
    bits = cb.bits_per_token
    row: Dict[str, object] = {
        "model": task.name, "devices": devices, "groups": method.groups,
        "codebook_size": method.codebook_size, "bits_per_token": bits, **res,
        "method": method.name, "stages": list(method.stage_sizes or ()),
        "layer_stages": {str(li): [method.codebook_size, *ks] for li, ks in method.layer_stages},
        "layer_bits": [cb.layer_bits(i) for i in range(cb.num_layers)],
        "distill_steps": method.distill_steps,
        "compression_vs_fp16": 16 * D / bits, "calibrate_s": round(t_cal, 1),
        "eval_s": round(t_eval, 1), **task.notes}
    for k, v in base_metric.items():
        row[f"{k}_single"] = v
    for k, v in astra_metric.items():
        row[f"{k}_astra"] = v
    return row


@torch.no_grad()
def attribute_layers(task: Task, codebooks, devices: int = 4) -> List[Dict[str, float]]:
    """Where the error comes from: for each layer alone, the cosines when only that
    layer's remote tokens are quantized (the others cross at full precision)."""
    from .attention import AstraAttention
    from .patch import patch, unpatch
    model = task.model
    ref = [task.forward(model, b).float() for b in task.evals]
    rows = []
    patch(model, codebooks, devices=devices)
    try:
        attns = [m for m in model.modules() if isinstance(m, AstraAttention)]
        books = [a.codebook for a in attns]
        for li in range(len(attns)):
            for j, a in enumerate(attns):
                a.codebook = books[j] if j == li else None
            rows.append({"layer": li, **compare(task, lambda b: task.forward(model, b), ref)})
        for a, b in zip(attns, books):
            a.codebook = b
    finally:
        unpatch(model)
    return rows


@torch.no_grad()
def measure(task, model: nn.Module, codebooks: Optional[Codebooks], devices: int,
            ref: Sequence[Tensor], distributed_cls: Optional[bool] = None) -> Dict[str, float]:
    """The task metric and the feature cosines (``emb_cos_mean``...) against ``ref`` (the
    single-device model's features on ``task.evals``) of ``model`` patched with
    ``codebooks`` for ``devices`` (``codebooks=None``: the model alone)."""
    from .patch import patch, unpatch
    model.eval()
    if codebooks is not None:
        patch(model, codebooks, devices=devices, distributed_cls=distributed_cls)
    try:
        res = compare(task, lambda b: task.forward(model, b), ref)
        if task.metric is not None:
            res.update(task.metric(model))
    finally:
        if codebooks is not None:
            unpatch(model)
    return res

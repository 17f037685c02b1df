"""What fine-tuning optimizes: how a model is run and scored (:class:`Objective`).

:func:`astra.finetune.finetune` adds the task loss (where batches carry labels) and the
distillation loss from a frozen copy of the unpatched model; :func:`objective_for`
picks the built-in objective of a model. The losses (:func:`kl_divergence`,
:func:`cos_loss`) are also what :mod:`astra.calibrate`'s codebook distillation minimizes.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Objective", "ClassificationObjective", "LMObjective", "HiddenObjective",
           "objective_for", "kl_divergence", "cos_loss"]


def cos_loss(out: Tensor, ref: Tensor, batch=None) -> Tensor:
    """The encoders' distillation loss: :func:`_cos_loss` over the batch's real tokens
    (its ``attention_mask`` when it is a dict that has one)."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    return _cos_loss(out, ref, mask)


def _cos_loss(out: Tensor, ref: Tensor, mask: Optional[Tensor]) -> Tensor:
    """``1 - cos`` per token (mean over real tokens) plus ``1 - cos`` of the mean-pooled
    vectors (what a sentence embedding sees)."""
    out, ref = out.float(), ref.float()
    if mask is None:
        mask = torch.ones(out.shape[:2], dtype=out.dtype)
    m = mask.to(out.dtype)
    tok = ((1 - torch.cosine_similarity(out, ref, dim=-1)) * m).sum() / m.sum()
    po = (out * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True)
    pr = (ref * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True)
    pooled = (1 - torch.cosine_similarity(po, pr, dim=-1)).mean()
    return tok + pooled


def kl_divergence(student: Tensor, teacher: Tensor, T: float = 1.0) -> Tensor:
    """``KL(teacher || student)`` of the softmax distributions of logits ``[..., V]`` at
    temperature ``T``, mean over the rows, scaled by ``T²``."""
    s = F.log_softmax(student.float() / T, dim=-1)
    t = F.log_softmax(teacher.float() / T, dim=-1)
    return F.kl_div(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]),
                    log_target=True, reduction="batchmean") * (T * T)


class Objective:
    """How a model is run and scored while fine-tuning.

    ``forward(model, batch)`` returns the output compared with the teacher's;
    ``task_loss(out, batch)`` is None when the batch has no labels;
    ``distill_loss(out, teacher_out, batch, temperature)``.
    """

    name = "objective"

    def forward(self, model: nn.Module, batch) -> Tensor:
        raise NotImplementedError

    def task_loss(self, out: Tensor, batch) -> Optional[Tensor]:
        return None

    def distill_loss(self, out: Tensor, ref: Tensor, batch, temperature: float) -> Tensor:
        raise NotImplementedError


class ClassificationObjective(Objective):
    """Image classifiers (``pixel_values``, optional ``labels``): cross-entropy + KL."""

    name = "classification"

    def forward(self, model, batch):
        return model(pixel_values=batch["pixel_values"]).logits

    def task_loss(self, out, batch):
        y = batch.get("labels")
        return None if y is None else F.cross_entropy(out.float(), y)

    def distill_loss(self, out, ref, batch, temperature):
        return kl_divergence(out, ref, temperature)


class LMObjective(Objective):
    """Causal LMs (``input_ids``): next-token cross-entropy + per-token KL."""

    name = "lm"

    def forward(self, model, batch):
        return model(input_ids=batch["input_ids"]).logits

    def task_loss(self, out, batch):
        ids = batch["input_ids"]
        lg = out[:, :-1].float()
        return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1))

    def distill_loss(self, out, ref, batch, temperature):
        return kl_divergence(out, ref, temperature)


class HiddenObjective(Objective):
    """Encoders (``input_ids``, ``attention_mask``): ``1 - cos`` of the last hidden
    states per token and of their mean-pooled embeddings (no task loss)."""

    name = "hidden"

    def forward(self, model, batch):
        base = getattr(model, getattr(model, "base_model_prefix", ""), model)
        return base(**batch).last_hidden_state

    def distill_loss(self, out, ref, batch, temperature):
        return cos_loss(out, ref, batch)


def objective_for(model: nn.Module) -> Objective:
    """The built-in objective of a model: classification heads, LM heads, else hidden."""
    if hasattr(model, "classifier") and hasattr(getattr(model, "config", None), "num_labels"):
        return ClassificationObjective()
    if hasattr(model, "lm_head"):
        return LMObjective()
    return HiddenObjective()

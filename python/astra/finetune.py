"""Fine-tuning with Noise-Augmented Quantization (NAQ): recover single-device quality.

:func:`finetune` trains a model patched for N simulated devices (simulate mode, the
differentiable torch path) so that it behaves like the unpatched model:

- **losses**: the task loss where the batches carry labels (classification, next-token
  LM) plus distillation from a frozen copy of the unpatched model (KL on logits at a
  temperature, or ``1 - cos`` on hidden states for an encoder), weighted by
  :class:`FinetuneConfig` ``task_weight`` / ``distill_weight``;
- **straight-through estimator**: a remote token's embedding is
  ``x + sg(x̂ - x)`` (value: the codeword(s) ``x̂``; gradient: straight to ``x``), so the
  weights of earlier layers learn what the quantized link does to later ones;
- **codebooks** trained jointly: ``codebook_update="grad"`` adds ``x̂ - sg(x̂)``, so the
  codewords get the task's gradient through their lookups (plus VQ-VAE's
  ``codebook_weight * ||sg(x) - x̂||²`` if wanted), or ``"ema"``: each codeword moves to
  the exponential moving average of the inputs assigned to it (no gradient). Codewords
  no input chose for ``reseed_every`` steps are re-seeded from current inputs;
- **commitment loss** ``β ||x - sg(x̂)||²`` (mean over sent tokens and dims), β =
  ``commitment`` (the paper's range is 1e-4 ... 5e-4);
- **NAQ**: during training only, Gaussian noise ``λ σ_g ε`` is added to the quantized
  remote embeddings, ``σ_g²`` being the current quantization residual's variance in
  group g (residual codebooks: over all dims), λ = ``noise``. Never at inference: the
  quantizer acts only while the module is in training mode.

Checkpoints (a folder): ``model.safetensors`` (the weights), ``codebooks.safetensors``
(the :class:`~astra.Codebooks` format), ``trainer.pt`` (optimizer, schedule, random
states, step, history) and ``config.json``; resuming gives the same result as an
uninterrupted run (tested). :func:`load_checkpoint` puts a fine-tuned model back.

``astra finetune`` runs it on the project's models (``digits-vit``, ``byte-gpt2``,
``minilm``) from k-means codebooks, and prints the metric before and after.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import AstraAttention, ChunkLayout
from .codebooks import Codebooks

__all__ = ["FinetuneConfig", "NoiseAugmentedQuantizer", "Objective", "ClassificationObjective",
           "LMObjective", "HiddenObjective", "FinetuneResult", "finetune", "load_checkpoint",
           "objective_for"]

UPDATES = ("grad", "ema")


# ------------------------------------------------------------------------------ config

@dataclass(frozen=True)
class FinetuneConfig:
    """What :func:`finetune` does.

    Args:
        devices: N simulated devices.
        steps: optimizer steps.
        lr: AdamW learning rate of the model's weights (``train_weights``).
        codebook_lr: AdamW learning rate of the codebooks (``codebook_update="grad"``).
        weight_decay: AdamW weight decay of the weights (codebooks: none).
        warmup: linear warm-up steps, then a cosine decay to 0.
        noise: NAQ strength λ (0: off).
        commitment: β of the commitment loss.
        codebook_update: ``"grad"`` or ``"ema"`` (see the module docstring).
        codebook_weight: weight of ``||sg(x) - x̂||²`` for ``"grad"`` (0: task gradient only).
        ema_decay: decay of the EMA updates.
        reseed_every: re-seed codewords that no input chose in the last ``reseed_every``
            steps, at steps ``reseed_every``, ``2 * reseed_every`` ... (0: never).
        task_weight: weight of the task loss (where the batches have labels).
        distill_weight: weight of the distillation loss.
        temperature: distillation temperature for logits.
        distributed_cls: distributed class tokens (None: the model's default).
        train_weights: train the model's weights (False: codebooks only).
        dropout: keep the model's dropout on while training (default off).
        grad_clip: clip the global gradient norm (0: no clipping).
        batch_size: batches (from the given sequence) per step.
        seed: seeds the batch order, the noise and the re-seeding.
        save_every: write a checkpoint every this many steps (0: only at the end).
    """

    devices: int = 4
    steps: int = 200
    lr: float = 1e-4
    codebook_lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 10
    noise: float = 0.3
    commitment: float = 2.5e-4
    codebook_update: str = "grad"
    codebook_weight: float = 0.0
    ema_decay: float = 0.99
    reseed_every: int = 50
    task_weight: float = 1.0
    distill_weight: float = 1.0
    temperature: float = 1.0
    distributed_cls: Optional[bool] = None
    train_weights: bool = True
    dropout: bool = False
    grad_clip: float = 1.0
    batch_size: int = 1
    seed: int = 0
    save_every: int = 0

    def __post_init__(self):
        if self.codebook_update not in UPDATES:
            raise ValueError(f"codebook_update must be one of {UPDATES}, got "
                             f"{self.codebook_update!r}")
        for name in ("devices", "steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("lr", "codebook_lr", "weight_decay", "noise", "commitment",
                     "codebook_weight", "task_weight", "distill_weight", "grad_clip"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        for name in ("warmup", "reseed_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")


# ------------------------------------------------------------------------------ quantizer

class NoiseAugmentedQuantizer:
    """The training-time quantizer :class:`AstraAttention` calls for remote embeddings.

    ``q(module, x, layout)`` returns what the remote keys/values are computed from:
    ``x + sg(x̂ - x)`` (+ ``x̂ - sg(x̂)`` in ``"grad"`` mode, + NAQ noise when
    ``noise > 0``), ``x̂`` being the nearest codeword(s). It also records, per layer, the
    auxiliary loss (commitment, codebook) and the statistics that the EMA update and
    the re-seeding need; :meth:`pop_aux_loss` and :meth:`pop_stats` hand them over.
    Only tokens that are sent count (class-token copies are not).
    """

    def __init__(self, *, noise: float = 0.0, commitment: float = 0.0,
                 codebook_update: str = "grad", codebook_weight: float = 0.0,
                 generator: Optional[torch.Generator] = None, sample_rows: int = 4096):
        if codebook_update not in UPDATES:
            raise ValueError(f"codebook_update must be one of {UPDATES}, got {codebook_update!r}")
        self.noise = float(noise)
        self.commitment = float(commitment)
        self.codebook_update = codebook_update
        self.codebook_weight = float(codebook_weight)
        self.generator = generator
        self.sample_rows = int(sample_rows)
        self._aux: List[Tensor] = []
        self._stats: Dict[int, Dict[str, Tensor]] = {}

    def __call__(self, module: AstraAttention, x: Tensor, layout: ChunkLayout) -> Tensor:
        codes = module.encode(x)                        # nearest codewords, no gradient
        xhat = module.dequantize(codes, torch.float32)  # differentiable in the codebook
        xf = x.float()
        out = xf + (xhat - xf).detach()                 # straight-through: value x̂
        if self.codebook_update == "grad":
            out = out + (xhat - xhat.detach())          # codebook gets the task gradient
        sent = ~layout.is_copy
        xs, hs = xf[:, sent], xhat[:, sent]
        aux = None
        if self.commitment > 0:
            aux = self.commitment * F.mse_loss(xs, hs.detach())
        if self.codebook_update == "grad" and self.codebook_weight > 0:
            term = self.codebook_weight * F.mse_loss(hs, xs.detach())
            aux = term if aux is None else aux + term
        if aux is not None:
            self._aux.append(aux)
        if self.noise > 0:
            out = out + self._noise(module, (xf - xhat).detach(), sent)
        self._record(module, xf.detach()[:, sent], codes[:, sent])
        return out.to(x.dtype)

    def _noise(self, module: AstraAttention, resid: Tensor, sent: Tensor) -> Tensor:
        """``λ σ_g ε``: Gaussian noise with the residual's per-group variance."""
        G = 1 if module.stage_sizes is not None else module.codebook.shape[0]
        B, T, D = resid.shape
        r = resid[:, sent].reshape(-1, G, D // G)
        sigma = r.pow(2).mean(dim=(0, 2)).sqrt()                 # [G]
        eps = torch.randn(resid.shape, generator=self.generator, dtype=resid.dtype)
        eps = eps.to(resid.device).reshape(B, T, G, D // G)
        return (self.noise * sigma.view(1, 1, G, 1) * eps).reshape(B, T, D)

    @torch.no_grad()
    def _record(self, module: AstraAttention, xs: Tensor, codes: Tensor) -> None:
        cb = module.codebook.detach()
        G, K, dg = cb.shape
        xs = xs.reshape(-1, xs.shape[-1])
        codes = codes.reshape(-1, G).long()
        if module.stage_sizes is not None:  # stage s quantizes what the stages before left
            parts, r = [], xs
            for s in range(G):
                parts.append(r)
                r = r - cb[s, codes[:, s]]
            data = torch.stack(parts, dim=1)                       # [M, S, D]
        else:
            data = xs.reshape(-1, G, dg)                          # [M, G, dg]
        counts = torch.zeros(G, K, dtype=torch.float64, device=cb.device)
        ema = self.codebook_update == "ema"  # only the EMA update needs the sums
        sums = torch.zeros(G, K, dg if ema else 0, dtype=torch.float64, device=cb.device)
        for g in range(G):
            counts[g].index_add_(0, codes[:, g], torch.ones_like(codes[:, g], dtype=torch.float64))
            if ema:
                sums[g].index_add_(0, codes[:, g], data[:, g].double())
        st = self._stats.get(module.layer_idx)
        sample = data[: self.sample_rows].float()
        if st is None:
            self._stats[module.layer_idx] = {"counts": counts, "sums": sums, "sample": sample}
        else:
            st["counts"] += counts
            st["sums"] += sums
            st["sample"] = sample

    def pop_aux_loss(self) -> Optional[Tensor]:
        """The summed auxiliary losses recorded since the last call (None if none)."""
        aux, self._aux = self._aux, []
        return torch.stack(aux).sum() if aux else None

    def pop_stats(self) -> Dict[int, Dict[str, Tensor]]:
        """Per layer: ``counts [G, K]``, ``sums [G, K, dg]`` (EMA mode; empty otherwise)
        and a ``sample [M, G, dg]`` of the inputs recorded since the last call."""
        st, self._stats = self._stats, {}
        return st


# ------------------------------------------------------------------------------ objectives

def _kl(student: Tensor, teacher: Tensor, T: float) -> Tensor:
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
        return _kl(out, ref, temperature)


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
        return _kl(out, ref, temperature)


class HiddenObjective(Objective):
    """Encoders (``input_ids``, ``attention_mask``): ``1 - cos`` of the last hidden
    states per token and of their mean-pooled embeddings (no task loss)."""

    name = "hidden"

    def forward(self, model, batch):
        base = getattr(model, getattr(model, "base_model_prefix", ""), model)
        return base(**batch).last_hidden_state

    def distill_loss(self, out, ref, batch, temperature):
        from .calibrate import _cos_loss
        return _cos_loss(out, ref, batch.get("attention_mask"))


def objective_for(model: nn.Module) -> Objective:
    """The built-in objective of a model: classification heads, LM heads, else hidden."""
    if hasattr(model, "classifier") and hasattr(getattr(model, "config", None), "num_labels"):
        return ClassificationObjective()
    if hasattr(model, "lm_head"):
        return LMObjective()
    return HiddenObjective()


# ------------------------------------------------------------------------------ training

@dataclass
class FinetuneResult:
    """What :func:`finetune` returns: the (unpatched, fine-tuned) model, its codebooks
    and the loss history (one dict per step)."""

    model: nn.Module
    codebooks: Codebooks
    history: List[Dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def _schedule(cfg: FinetuneConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if cfg.warmup and step < cfg.warmup:
            return (step + 1) / cfg.warmup
        span = max(1, cfg.steps - cfg.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup) / span)))
    return f


class _Trainer:
    def __init__(self, model, codebooks, batches, objective, cfg: FinetuneConfig):
        from .patch import is_patched, patch
        if is_patched(model):
            raise ValueError("finetune needs the unpatched model (call astra.unpatch first)")
        if not isinstance(codebooks, Codebooks):
            raise TypeError(f"codebooks must be astra.Codebooks, got {type(codebooks).__name__}")
        if len(batches) == 0:
            raise ValueError("finetune needs at least one batch")
        self.cfg, self.model, self.batches, self.obj = cfg, model, batches, objective
        self.teacher = copy.deepcopy(model).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self._teacher_out: Dict[int, Tensor] = {}
        dev = next(model.parameters()).device
        cb = codebooks.with_tensor(codebooks.tensor.clone().to(dev))
        self.template = cb
        patch(model, cb, devices=cfg.devices, distributed_cls=cfg.distributed_cls)
        self.attns = [m for m in model.modules() if isinstance(m, AstraAttention)]
        self.gen_noise = torch.Generator().manual_seed(cfg.seed * 2 + 1)
        self.gen_order = torch.Generator().manual_seed(cfg.seed)
        self.order: List[int] = []
        self.quant = NoiseAugmentedQuantizer(
            noise=cfg.noise, commitment=cfg.commitment, codebook_update=cfg.codebook_update,
            codebook_weight=cfg.codebook_weight, generator=self.gen_noise)
        grad_cb = cfg.codebook_update == "grad"
        for a in self.attns:
            a.codebook = a.codebook.detach().clone().requires_grad_(grad_cb)
            a.quantizer = self.quant
        self.weights = [p for p in model.parameters() if p.requires_grad] \
            if cfg.train_weights else []
        self.frozen = [] if cfg.train_weights else [
            (p, p.requires_grad) for p in model.parameters()]
        for p, _ in self.frozen:
            p.requires_grad_(False)
        groups = []
        if self.weights:
            groups.append({"params": self.weights, "lr": cfg.lr,
                           "weight_decay": cfg.weight_decay})
        if grad_cb:
            groups.append({"params": [a.codebook for a in self.attns], "lr": cfg.codebook_lr,
                           "weight_decay": 0.0})
        if not groups:
            raise ValueError("nothing to train: train_weights=False with codebook_update='ema' "
                             "trains the codebooks without an optimizer; set train_weights "
                             "or use codebook_update='grad'")
        self.opt = torch.optim.AdamW(groups)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _schedule(cfg))
        G, K = cb.tensor.shape[1], cb.tensor.shape[2]
        self.usage = torch.zeros(len(self.attns), G, K, dtype=torch.float64)
        self.ema_n = torch.ones(len(self.attns), G, K, dtype=torch.float64)
        self.ema_m = cb.tensor.double().cpu().clone()
        self.step = 0
        self.history: List[Dict[str, float]] = []
        self.reseeded = [0] * len(self.attns)
        self._dropouts = []

    # -------------------------------------------------------------- state
    def state(self) -> Dict:
        return {"step": self.step, "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict(), "order": list(self.order),
                "gen_order": self.gen_order.get_state(), "gen_noise": self.gen_noise.get_state(),
                "torch_rng": torch.get_rng_state(), "usage": self.usage,
                "ema_n": self.ema_n, "ema_m": self.ema_m, "history": self.history,
                "reseeded": self.reseeded}

    def load_state(self, st: Dict) -> None:
        self.step = int(st["step"])
        self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])
        self.order = list(st["order"])
        self.gen_order.set_state(st["gen_order"])
        self.gen_noise.set_state(st["gen_noise"])
        torch.set_rng_state(st["torch_rng"])
        self.usage, self.ema_n, self.ema_m = st["usage"], st["ema_n"], st["ema_m"]
        self.history = list(st["history"])
        self.reseeded = list(st["reseeded"])

    def codebooks(self) -> Codebooks:
        return self.template.with_tensor(
            torch.stack([a.codebook.detach().cpu().float() for a in self.attns]))

    # -------------------------------------------------------------- mode
    def train_mode(self) -> None:
        self.model.train()
        if not self.cfg.dropout:
            for m in self.model.modules():
                if isinstance(m, nn.Dropout):
                    m.eval()
            self._dropouts = [(a, a.attn_dropout_p) for a in self.attns]
            for a in self.attns:
                a.attn_dropout_p = 0.0

    def restore(self) -> None:
        for a, p in self._dropouts:
            a.attn_dropout_p = p
        for a in self.attns:
            a.quantizer = None
        for p, r in self.frozen:
            p.requires_grad_(r)

    # -------------------------------------------------------------- one step
    def _next_batches(self) -> List[int]:
        idx = []
        for _ in range(self.cfg.batch_size):
            if not self.order:
                self.order = torch.randperm(len(self.batches), generator=self.gen_order).tolist()
            idx.append(self.order.pop())
        return idx

    def _teacher(self, i: int) -> Tensor:
        if i not in self._teacher_out:
            with torch.no_grad():
                self._teacher_out[i] = self.obj.forward(self.teacher, self.batches[i]).detach()
        return self._teacher_out[i]

    def run_step(self) -> Dict[str, float]:
        cfg = self.cfg
        parts = {"task": 0.0, "distill": 0.0, "aux": 0.0}
        total = 0.0
        idx = self._next_batches()
        for i in idx:
            batch = self.batches[i]
            out = self.obj.forward(self.model, batch)
            loss = out.new_zeros((), dtype=torch.float32)
            task = self.obj.task_loss(out, batch) if cfg.task_weight else None
            if task is not None:
                loss = loss + cfg.task_weight * task
                parts["task"] += float(task.detach()) / len(idx)
            if cfg.distill_weight:
                dl = self.obj.distill_loss(out, self._teacher(i), batch, cfg.temperature)
                loss = loss + cfg.distill_weight * dl
                parts["distill"] += float(dl.detach()) / len(idx)
            aux = self.quant.pop_aux_loss()
            if aux is not None:
                loss = loss + aux
                parts["aux"] += float(aux.detach()) / len(idx)
            (loss / len(idx)).backward()
            total += float(loss.detach()) / len(idx)
        params = [p for g in self.opt.param_groups for p in g["params"]]
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        stats = self.quant.pop_stats()
        self.step += 1
        self._update_codebooks(stats)
        row = {"step": self.step, "loss": total, **parts,
               "lr": self.sched.get_last_lr()[0]}
        self.history.append(row)
        return row

    @torch.no_grad()
    def _update_codebooks(self, stats: Dict[int, Dict[str, Tensor]]) -> None:
        cfg = self.cfg
        for li, a in enumerate(self.attns):
            st = stats.get(a.layer_idx)
            if st is None:
                continue
            counts = st["counts"].cpu()
            self.usage[li] += counts
            if cfg.codebook_update == "ema":
                d = cfg.ema_decay
                self.ema_n[li].mul_(d).add_(counts, alpha=1 - d)
                self.ema_m[li].mul_(d).add_(st["sums"].cpu(), alpha=1 - d)
                n = self.ema_n[li]
                tot = n.sum(-1, keepdim=True)
                n = (n + 1e-5) / (tot + n.shape[-1] * 1e-5) * tot  # Laplace smoothing
                new = (self.ema_m[li] / n.unsqueeze(-1)).float()
                self.template.zero_padding(li, new)
                a.codebook.copy_(new.to(a.codebook.device))
        # every reseed_every steps (not after the last: a re-seeded codeword is untested)
        if cfg.reseed_every and self.step % cfg.reseed_every == 0 and self.step < cfg.steps:
            self._reseed(stats)

    @torch.no_grad()
    def _reseed(self, stats) -> None:
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step)
        for li, a in enumerate(self.attns):
            st = stats.get(a.layer_idx)
            if st is None:
                continue
            sample = st["sample"]  # [M, G, dg]
            G, K, _ = a.codebook.shape
            for g in range(G):
                k_used = (self.template.stages(li) or (K,) * G)[g]
                dead = (self.usage[li, g, :k_used] == 0).nonzero().flatten()
                if dead.numel() == 0 or sample.shape[0] == 0:
                    continue
                pick = torch.randint(sample.shape[0], (dead.numel(),), generator=gen)
                rows = sample[pick, g].to(a.codebook.device, a.codebook.dtype)
                a.codebook[g, dead.to(a.codebook.device)] = rows
                self.ema_m[li, g, dead] = rows.double().cpu()
                self.ema_n[li, g, dead] = 1.0
                for grp in self.opt.param_groups:  # forget Adam's moments of those rows
                    for p in grp["params"]:
                        if p is a.codebook and p in self.opt.state:
                            for key in ("exp_avg", "exp_avg_sq"):
                                self.opt.state[p][key][g, dead] = 0
                self.reseeded[li] += int(dead.numel())
        self.usage.zero_()

    # -------------------------------------------------------------- files
    def save(self, out_dir: Path) -> None:
        from safetensors.torch import save_model
        out_dir.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        tmp = out_dir / f"model.tmp{pid}"
        # the patched model's state_dict has the original keys (codebooks are buffers
        # that are not saved); save_model handles tied weights (GPT-2's LM head)
        save_model(self.model, os.fspath(tmp))
        os.replace(tmp, out_dir / "model.safetensors")
        tmp = out_dir / f"codebooks.tmp{pid}"
        self.codebooks().save(tmp)
        os.replace(tmp, out_dir / "codebooks.safetensors")
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(self.cfg), indent=1))
        tmp = out_dir / f"trainer.tmp{pid}"
        torch.save(self.state(), tmp)
        os.replace(tmp, out_dir / "trainer.pt")

    def load(self, out_dir: Path) -> None:
        from safetensors.torch import load_model
        load_model(self.model, os.fspath(out_dir / "model.safetensors"))
        cb = Codebooks.load(out_dir / "codebooks.safetensors",
                            expect={"num_layers": len(self.attns)})
        with torch.no_grad():
            for i, a in enumerate(self.attns):
                a.codebook.copy_(cb.layer(i).to(a.codebook.device))
        self.load_state(torch.load(out_dir / "trainer.pt", weights_only=False))


def finetune(model: nn.Module, codebooks: Codebooks, batches: Sequence,
             objective: Optional[Objective] = None, config: FinetuneConfig = FinetuneConfig(),
             *, out_dir: Union[str, os.PathLike, None] = None, resume: bool = False,
             progress: bool = True, callback: Optional[Callable[[Dict[str, float]], None]] = None
             ) -> FinetuneResult:
    """Fine-tune ``model`` (weights and codebooks) for ``config.devices`` devices.

    Args:
        model: an unpatched supported model (see :func:`astra.patch`); trained in place.
        codebooks: the starting codebooks (e.g. k-means from :func:`astra.calibrate.calibrate`).
        batches: training batches, each what ``objective.forward`` takes (dicts); labels
            (``labels`` for classifiers; LMs use their ``input_ids``) enable the task loss.
        objective: how to run and score the model (default: :func:`objective_for`).
        config: :class:`FinetuneConfig`.
        out_dir: checkpoint folder (written every ``config.save_every`` steps and at the end).
        resume: continue from the checkpoint in ``out_dir`` (same config and batches;
            only ``steps`` may differ, which stretches the learning-rate schedule).
        callback: called with each step's history row.

    Returns:
        :class:`FinetuneResult`; the model comes back unpatched, in eval mode, with the
        fine-tuned weights: ``astra.patch(model, result.codebooks, devices=N)`` runs it.
    """
    from tqdm.auto import tqdm
    from .patch import unpatch

    objective = objective or objective_for(model)
    out = Path(out_dir) if out_dir is not None else None
    if resume:
        if out is None or not (out / "trainer.pt").exists():
            raise FileNotFoundError(f"resume=True but there is no checkpoint in {out_dir}")
        saved = json.loads((out / "config.json").read_text())
        diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}"
                 for k, v in dataclasses.asdict(config).items()
                 if k != "steps" and saved.get(k) != v]
        if diffs:
            raise ValueError("resume: the config differs from the checkpoint's: "
                             + "; ".join(diffs))
    t0 = time.perf_counter()
    tr = _Trainer(model, codebooks, batches, objective, config)
    try:
        if resume:
            tr.load(out)
        tr.train_mode()
        with tqdm(total=config.steps, initial=tr.step, desc="finetune",
                  disable=not progress) as bar:
            while tr.step < config.steps:
                row = tr.run_step()
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                if callback is not None:
                    callback(row)
                if out is not None and config.save_every and tr.step % config.save_every == 0 \
                        and tr.step < config.steps:
                    tr.save(out)
        if out is not None:
            tr.save(out)
            plot_history(tr.history, out / "loss.png")
        cb = tr.codebooks()
    finally:
        tr.restore()
        unpatch(model)
        model.eval()
    cb.reseeded = list(tr.reseeded)
    return FinetuneResult(model, cb, tr.history, time.perf_counter() - t0)


def load_checkpoint(model: nn.Module, path: Union[str, os.PathLike]) -> Codebooks:
    """Load a :func:`finetune` checkpoint folder into ``model`` (unpatched) and return its
    codebooks (checked against the model): ``astra.patch(model, cb, devices=N)``."""
    from safetensors.torch import load_model
    path = Path(path)
    for name in ("model.safetensors", "codebooks.safetensors"):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path} is not a finetune checkpoint: no {name}")
    cb = Codebooks.load(path / "codebooks.safetensors", expect=model)
    missing, unexpected = load_model(model, os.fspath(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}/model.safetensors does not fit the model: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return cb


def plot_history(history: List[Dict[str, float]], path: Union[str, os.PathLike]) -> None:
    """The loss curves (total, task, distillation, auxiliary) per step, log y axis: each
    step faint, its exponential moving average (0.9) solid."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not history:
        return
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("loss", "task", "distill", "aux"):
        ys = [max(h[key], 1e-12) for h in history]
        if any(y > 1e-12 for y in ys):
            smooth, acc = [], ys[0]
            for y in ys:  # exponential moving average: one batch per step is noisy
                acc = 0.9 * acc + 0.1 * y
                smooth.append(acc)
            line, = ax.plot(steps, smooth, label=key)
            ax.plot(steps, ys, color=line.get_color(), alpha=0.2, lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("astra finetune")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------ tasks, CLI

MODELS = ("digits-vit", "byte-gpt2", "minilm")
# Per model: defaults that work (digits/byte models were trained here at lr ~2e-3).
MODEL_DEFAULTS = {"digits-vit": dict(lr=3e-4, steps=200),
                  "byte-gpt2": dict(lr=3e-4, steps=300),
                  "minilm": dict(lr=5e-5, steps=300)}


def study_task(name: str, progress: bool = True):
    """``(task, train_batches)`` for one of :data:`MODELS`: the :class:`astra.evaluate.Task`
    (evaluation inputs, metric) and the training batches (with labels where the task has
    them): digits train split + labels, the calibration byte windows, MiniLM's
    calibration windows."""
    from . import zoo
    from .evaluate import load_task
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; finetune knows {', '.join(MODELS)}")
    # train (first use) or load the project's models here, so that `progress` is obeyed
    if name == "digits-vit":
        zoo.digits_vit(progress=progress)
    elif name == "byte-gpt2":
        zoo.byte_gpt2(progress=progress)
    if name == "digits-vit":
        from . import data
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


@torch.no_grad()
def measure(task, model: nn.Module, codebooks: Optional[Codebooks], devices: int,
            ref: Sequence[Tensor], distributed_cls: Optional[bool] = None) -> Dict[str, float]:
    """The task metric and the feature cosines (``emb_cos_mean``...) against ``ref`` (the
    single-device model's features on ``task.evals``) of ``model`` patched with
    ``codebooks`` for ``devices`` (``codebooks=None``: the model alone)."""
    from .evaluate import compare
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


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune a model for N devices (STE, NAQ noise, distillation)",
        description="Fine-tune one of the project's models for N simulated devices from "
        "k-means codebooks and print its quality before and after.")
    p.add_argument("--model", default="digits-vit", choices=MODELS)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--groups", type=int, default=1, help="G groups per token")
    p.add_argument("--codebook-size", type=int, default=1024, help="K codewords per group")
    from .evaluate import _sizes
    p.add_argument("--residual", type=_sizes, default=(), metavar="K2[,K3..]",
                   help="residual stages after the first (G must be 1), e.g. 64: 10+6 bits")
    p.add_argument("--layer-residual", action="append", default=[], metavar="L:K2[,K3..]",
                   help="layer L (negative: from the end) gets these residual stages instead "
                   "of --residual's; repeatable (e.g. -1:4096,4096: more bits in the last layer)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: per model)")
    p.add_argument("--lr", type=float, help="weights' learning rate (default: per model)")
    p.add_argument("--codebook-lr", type=float, default=FinetuneConfig.codebook_lr)
    p.add_argument("--noise", type=float, default=FinetuneConfig.noise, help="NAQ strength λ")
    p.add_argument("--commitment", type=float, default=FinetuneConfig.commitment, help="β")
    p.add_argument("--codebook-update", choices=UPDATES, default=FinetuneConfig.codebook_update)
    p.add_argument("--batch-size", type=int, default=1, help="batches per step")
    p.add_argument("--no-distributed-cls", action="store_true",
                   help="one class token on device 0 instead of one copy per device")
    p.add_argument("--codebooks-only", action="store_true", help="freeze the weights")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="DIR", help="checkpoint folder (default: "
                   "<cache>/finetune/<model>-N<devices>-G<groups>-K<K>-s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--json", metavar="PATH", help="write the before/after row as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import sys
    from .calibrate import Method, calibrate
    from .zoo import cache_dir
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
    d = MODEL_DEFAULTS[args.model]
    cfg = FinetuneConfig(
        devices=args.devices, steps=args.steps or d["steps"], lr=args.lr or d["lr"],
        codebook_lr=args.codebook_lr, noise=args.noise, commitment=args.commitment,
        codebook_update=args.codebook_update, batch_size=args.batch_size,
        distributed_cls=False if args.no_distributed_cls else None,
        train_weights=not args.codebooks_only, seed=args.seed, save_every=args.save_every)
    from .evaluate import layer_stages_arg
    layer_stages = layer_stages_arg(args.layer_residual)
    res_tag = "".join(f"+{k}" for k in args.residual) + "".join(
        f"-L{li}" + "".join(f"+{k}" for k in ks) for li, ks in layer_stages)
    out = Path(args.out) if args.out else cache_dir() / "finetune" / (
        f"{args.model}-N{args.devices}-G{args.groups}-K{args.codebook_size}{res_tag}"
        f"-s{args.seed}")
    task, train = study_task(args.model, progress=not args.quiet)
    model = task.model
    method = Method(groups=args.groups, codebook_size=args.codebook_size,
                    stages=args.residual, layer_stages=layer_stages, seed=args.seed)
    cb = calibrate(model, task.calib, method, devices=args.devices, progress=not args.quiet,
                   log=log)
    with torch.no_grad():
        ref = [task.forward(model, b).float() for b in task.evals]
    single = measure(task, model, None, args.devices, ref)
    before = measure(task, model, cb, args.devices, ref, cfg.distributed_cls)
    log(f"{args.model}: fine-tuning {cfg.steps} steps, N={cfg.devices}, G={args.groups} "
        f"K={args.codebook_size} ({cb.bits_per_token} bits/token), λ={cfg.noise}, "
        f"β={cfg.commitment}, {len(train)} training batches -> {out}")
    res = finetune(model, cb, train, config=cfg, out_dir=out, resume=args.resume,
                   progress=not args.quiet)
    after = measure(task, model, res.codebooks, args.devices, ref, cfg.distributed_cls)
    keys = [k for k in after if k in ("top1", "perplexity")] + ["emb_cos_mean", "tok_cos_mean"]
    print(f"{args.model}  N={cfg.devices}  {method.describe()}  "
          f"{cb.bits_per_token} bits/token  {cfg.steps} steps in {res.seconds:.0f} s")
    print(f"  {'':<14}{'single':>10}{'post-train':>12}{'finetuned':>12}")
    for k in keys:
        print(f"  {k:<14}{single.get(k, float('nan')):>10.4f}{before[k]:>12.4f}{after[k]:>12.4f}")
    print(f"  checkpoint {out} (loss curve {out / 'loss.png'})")
    if args.json:
        row = {"model": args.model, "devices": cfg.devices, "groups": args.groups,
               "codebook_size": args.codebook_size, "stages": list(args.residual),
               "layer_stages": [[li, list(ks)] for li, ks in layer_stages],
               "bits_per_token": cb.bits_per_token, "config": dataclasses.asdict(cfg),
               "single": single, "post_training": before, "finetuned": after,
               "seconds": res.seconds, "checkpoint": str(out)}
        Path(args.json).write_text(json.dumps(row, indent=2) + "\n")
    return 0

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

Checkpoints (a folder, :mod:`astra.checkpoint`) hold the weights, the codebooks and the
trainer's state; resuming gives the same result as an uninterrupted run (tested).
:func:`astra.checkpoint.load_checkpoint` puts a fine-tuned model back. The objectives
(what is run and scored) are in :mod:`astra.objectives`.

``astra finetune`` (:mod:`astra.cli.finetune`) runs it on the project's models
(``digits-vit``, ``byte-gpt2``, ``minilm``) from k-means codebooks, and prints the metric
before and after.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import AstraAttention, ChunkLayout
from .checkpoint import check_resume, load_checkpoint, load_training_state, save_training_state
from .codebooks import Codebooks
from .objectives import (
    ClassificationObjective,
    HiddenObjective,
    LMObjective,
    Objective,
    objective_for,
)
from .options import CODEBOOK_LR, CODEBOOK_UPDATE, COMMITMENT, NAQ_NOISE
from .options import CODEBOOK_UPDATES as UPDATES
from .plots import plot_history

__all__ = ["FinetuneConfig", "NoiseAugmentedQuantizer", "Objective", "ClassificationObjective",
           "LMObjective", "HiddenObjective", "FinetuneResult", "finetune", "load_checkpoint",
           "objective_for"]


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
    codebook_lr: float = CODEBOOK_LR
    weight_decay: float = 0.0
    warmup: int = 10
    noise: float = NAQ_NOISE
    commitment: float = COMMITMENT
    codebook_update: str = CODEBOOK_UPDATE
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

    ``q(module, x, layout)`` (``x``: what the codebook quantizes, the attention input or
    ``[k; v]``, :meth:`AstraAttention.quant_input`) returns what the remote keys/values
    are computed from:
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
        codes = module.vq(x)                            # nearest codewords, no gradient
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
        G, K = cb.codes_per_token, cb.codebook_size
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
        if not math.isfinite(total):
            # stop before the optimizer writes NaN into the weights (and a checkpoint)
            raise FloatingPointError(
                f"finetune: the loss is {total} at step {self.step + 1} (diverged); try a "
                f"lower learning rate or less noise — nothing of this step was applied")
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
        save_training_state(out_dir, self.model, self.codebooks(),
                            dataclasses.asdict(self.cfg), self.state())

    def load(self, out_dir: Path) -> None:
        cb, state = load_training_state(out_dir, self.model, len(self.attns))
        with torch.no_grad():
            for i, a in enumerate(self.attns):
                a.codebook.copy_(cb.layer(i).to(a.codebook.device))
        self.load_state(state)


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
        check_resume(out_dir, dataclasses.asdict(config))
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

"""Calibration methods: how a model's codebooks are made from calibration data.

All methods leave the model's weights untouched (plug-and-play):

- ``kmeans``: per layer and group, k-means on the attention input X
  (:meth:`Codebooks.fit`); the baseline. With ``target="kv"`` every method works on
  ``[k; v]`` (each token's pre-RoPE key and value, :func:`kv_activations`) instead.
- ``residual``: a first full-width codebook (G=1, K codewords) refined by further
  stages, each a k-means on what the stages before it left (residual VQ). A token is
  S codes, ``sum_s ceil(log2 K_s)`` bits; a remote key is still a sum of S table rows,
  so the ops take the S stages as S "groups" (smaller stages padded to the largest K).
- ``layers`` (on top of either): each layer's codebook alone, by gradient descent, so
  that the layer's attention output (through its output projection) over N simulated
  devices matches the exact one, on the inputs the unpatched model gives that layer
  (:func:`distill_layers`). No whole-model backward: seconds per layer.
- ``distill`` (on top of any): gradient descent on the codebooks only, so that the
  patched model's output (simulate mode, N devices) matches the unpatched model's on
  calibration inputs. The codes are re-chosen (nearest codeword) at every step. The
  loss is ``1 - cos`` of the output features (:func:`cos_loss`, encoders) or the
  caller's (causal LLMs: :func:`next_token_kl`, KL of the next-token distributions).

:func:`calibrate` runs a :class:`Method` and caches the result under
:func:`astra.cache.cache_dir`, keyed by model identity, method, seed and data.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .codebooks import TARGETS, Codebooks, collect_activations, kv_activations
from .kmeans import INITS
from .objectives import cos_loss, kl_divergence
from .options import (
    DISTILL_LR,
    KMEANS_INIT,
    KMEANS_ITERS,
    KMEANS_MAX_POINTS,
    LAYER_LR,
    REFINE_PASSES,
)

__all__ = ["Method", "calibrate", "fit_kmeans", "fit_residual", "refine_stages", "distill",
           "distill_layers",
           "cache_path",
           "cos_loss", "next_token_kl", "DistillLoss"]

# ``(output, target, batch) -> scalar``: what a distillation step minimizes.
DistillLoss = Callable[[Tensor, Tensor, object], Tensor]


@dataclass(frozen=True)
class Method:
    """How to make codebooks.

    Args:
        groups: G (must be 1 with ``stages``).
        codebook_size: K (the first stage's size with ``stages``).
        stages: sizes of the residual stages after the first (``(16,)``: 4096+16).
        layer_stages: per-layer overrides of ``stages``, ``((layer, (K2, ...)), ...)``
            (negative layers count from the end): bits go where the error is. Layers
            with fewer stages than the most get stages of size 1 (no bits: a fixed
            offset). Bits per token are then the mean over layers.
        layer_steps: steps of layer-local codebook training after k-means (0: none;
            :func:`distill_layers`), before any ``distill_steps``.
        layer_lr: its Adam learning rate.
        distill_steps: steps of codebook distillation after k-means (0: none).
        distill_lr: Adam learning rate of the distillation.
        distill_batch: calibration batches per distillation step.
        iters: Lloyd iterations per k-means.
        refine: residual stages: passes of :func:`refine_stages` after the k-means.
        max_points: k-means points per layer (a random subset; None: all).
        init: k-means init (``"sampled"``, ``"k-means++"``, ``"random"``).
        seed: seeds k-means and the distillation's batch order.
        target: what the codebooks quantize: ``"x"`` (the attention input) or ``"kv"``
            (the pre-RoPE key and the value, ``[k; v]``).
    """

    groups: int = 1
    codebook_size: int = 1024
    stages: Tuple[int, ...] = ()
    layer_stages: Tuple[Tuple[int, Tuple[int, ...]], ...] = ()
    layer_steps: int = 0
    layer_lr: float = LAYER_LR
    distill_steps: int = 0
    distill_lr: float = DISTILL_LR
    distill_batch: int = 1
    iters: int = KMEANS_ITERS
    refine: int = REFINE_PASSES
    max_points: Optional[int] = KMEANS_MAX_POINTS
    init: str = KMEANS_INIT
    seed: int = 0
    target: str = "x"

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple(int(k) for k in self.stages))
        object.__setattr__(self, "layer_stages", tuple(
            (int(li), tuple(int(k) for k in ks)) for li, ks in self.layer_stages))
        if (self.stages or self.layer_stages) and self.groups != 1:
            raise ValueError(f"residual stages need groups=1 (got groups={self.groups})")
        if self.groups < 1 or self.codebook_size < 1 or any(k < 1 for k in self.stages):
            raise ValueError(f"bad method {self}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")

    @property
    def name(self) -> str:
        """Short label: ``kmeans``, ``residual``, ``kmeans+distill`` ..."""
        base = "residual" if self.residual else "kmeans"
        return (base + ("+layers" if self.layer_steps else "")
                + ("+distill" if self.distill_steps else ""))

    @property
    def residual(self) -> bool:
        return bool(self.stages or self.layer_stages)

    @property
    def stage_sizes(self) -> Optional[Tuple[int, ...]]:
        """The stage sizes of the layers without an override (None: grouped)."""
        return (self.codebook_size,) + self.stages if self.residual else None

    def layer_stage_sizes(self, num_layers: int) -> Optional[List[Tuple[int, ...]]]:
        """Every layer's stage sizes, padded with size-1 stages to one length."""
        if not self.residual:
            return None
        rows = [(self.codebook_size,) + self.stages for _ in range(num_layers)]
        for li, ks in self.layer_stages:
            rows[li % num_layers] = (self.codebook_size,) + ks
        S = max(len(r) for r in rows)
        return [r + (1,) * (S - len(r)) for r in rows]

    def bits(self, num_layers: int = 1) -> float:
        """Mean bits per token and layer."""
        rows = self.layer_stage_sizes(num_layers)
        if rows is None:
            return self.groups * max(1, math.ceil(math.log2(self.codebook_size)))
        b = sum(sum(math.ceil(math.log2(k)) for k in r) for r in rows) / num_layers
        return int(b) if b == int(b) else b

    @property
    def bits_per_token(self) -> float:
        """Bits per token (uniform methods; see :meth:`bits` with per-layer stages)."""
        return self.bits()

    def describe(self) -> str:
        sizes = "+".join(map(str, self.stage_sizes)) if self.residual else \
            f"G={self.groups} K={self.codebook_size}"
        for li, ks in self.layer_stages:
            sizes += f", layer {li}: " + "+".join(map(str, (self.codebook_size,) + ks))
        d = f", layer-local {self.layer_steps} steps" if self.layer_steps else ""
        d += f", distill {self.distill_steps} steps" if self.distill_steps else ""
        t = "" if self.target == "x" else ", of [k; v]"
        return f"{self.name} ({sizes}{t}{d})"


# ------------------------------------------------------------------------ k-means

def fit_kmeans(acts: Sequence[Tensor], groups: int, codebook_size: int, *, iters: int = 12,
               seed: int = 0, max_points: Optional[int] = 32768, init: str = "sampled",
               model: Optional[nn.Module] = None, progress: bool = True,
               target: str = "x") -> Codebooks:
    """Plain k-means codebooks (see :meth:`Codebooks.fit`)."""
    return Codebooks.fit(acts, groups, codebook_size, iters=iters, seed=seed,
                         progress=progress, init=init, model=model, max_points=max_points,
                         target=target)


def fit_residual(acts: Sequence[Tensor], stage_sizes, *, iters: int = 12,
                 seed: int = 0, max_points: Optional[int] = 32768, init: str = "sampled",
                 model: Optional[nn.Module] = None, progress: bool = True,
                 target: str = "x", refine: int = REFINE_PASSES) -> Codebooks:
    """Residual codebooks ``[L, S, max K, D]``: stage s is k-means (G=1) on the residual
    the stages before it left, then ``refine`` passes of :func:`refine_stages`. Rows
    past a stage's own size are zero padding. ``stage_sizes``: one tuple for all
    layers, or one per layer (equal lengths)."""
    if len(stage_sizes) and not isinstance(stage_sizes[0], int):
        rows = [tuple(int(k) for k in r) for r in stage_sizes]
        return _fit_residual_per_layer(acts, rows, iters=iters, seed=seed,
                                       max_points=max_points, init=init, model=model,
                                       progress=progress, target=target, refine=refine)
    stage_sizes = tuple(int(k) for k in stage_sizes)
    gen = torch.Generator().manual_seed(int(seed))
    xs = []
    for a in acts:
        x = a.detach().reshape(-1, a.shape[-1]).float()
        if max_points is not None and x.shape[0] > max_points:
            x = x[torch.randperm(x.shape[0], generator=gen)[:max_points]]
        xs.append(x)
    xs0 = xs
    Kmax = max(stage_sizes)
    L, D = len(xs), xs[0].shape[-1]
    out = torch.zeros(L, len(stage_sizes), Kmax, D)
    first = None
    for s, k in enumerate(stage_sizes):
        cb = Codebooks.fit(xs, 1, k, iters=iters, seed=seed + s, progress=progress,
                           init=init, model=model, target=target)
        first = first or cb
        out[:, s, :k] = cb.tensor[:, 0]
        xs = [x - cb.decode(li, cb.encode(li, x)) for li, x in enumerate(xs)]
    cb = Codebooks(out, model=first.model, name=first.name, config_hash=first.config_hash,
                   stage_sizes=stage_sizes, target=target)
    return refine_stages(cb, xs0, refine)


def refine_stages(cb: Codebooks, acts: Sequence[Tensor], passes: int) -> Codebooks:
    """Residual codebooks with their stages fitted jointly on the greedy codes of ``acts``
    (one ``[M, D]`` per layer): ``passes`` rounds of setting each stage's used rows to the
    mean of what the other stages leave of the tokens that chose them (alternating least
    squares; the codes stay). Stages fitted one after another leave a token's sum biased
    given its codes; this removes the bias (it lowers the squared error only ~1%, but
    SmolLM2's perplexity at 1024+64 codes of [k; v] from +14.0% to +8.3% over one device).
    """
    if passes <= 0 or cb.kind != "residual":
        return cb
    t = cb.tensor.clone()
    for li, x in enumerate(acts):
        x = x.reshape(-1, x.shape[-1]).float()
        codes = cb.encode(li, x).long()
        C = t[li]
        rows = torch.arange(C.shape[0])
        for _ in range(passes):
            for s, k in enumerate(cb.stages(li)):
                rest = x - C[rows, codes].sum(-2) + C[s, codes[:, s]]  # x minus the others
                sums = torch.zeros(k, x.shape[1]).index_add_(0, codes[:, s], rest)
                cnt = torch.bincount(codes[:, s], minlength=k)
                used = cnt > 0
                C[s, :k][used] = sums[used] / cnt[used].unsqueeze(1).float()
    return cb.with_tensor(t)


def _fit_residual_per_layer(acts, rows, **kw) -> Codebooks:
    """:func:`fit_residual` layer by layer, each with its own stage sizes."""
    L, S = len(acts), len(rows[0])
    if len(rows) != L or any(len(r) != S for r in rows):
        raise ValueError(f"need {L} stage lists of one length, got {rows}")
    model = kw.pop("model", None)
    target = kw.get("target", "x")
    parts = [fit_residual([a], r, **kw) for a, r in zip(acts, rows)]
    out = torch.zeros(L, S, max(max(r) for r in rows), acts[0].shape[-1])
    for li, p in enumerate(parts):
        out[li, :, :p.tensor.shape[2]] = p.tensor[0]
    ident = {}
    if model is not None:
        from .models import resolve
        idn = resolve(model)[1].identity(model)
        ident = {k: idn[k] for k in ("model", "name", "config_hash")}
    return Codebooks(out, stage_sizes=rows, target=target, **ident)


# ------------------------------------------------------------------------ distillation

def distill(model: nn.Module, codebooks: Codebooks, batches: Sequence, targets: Sequence[Tensor],
            forward: Callable[[nn.Module, object], Tensor], *, devices: int, steps: int,
            lr: float = 2e-3, batch_size: int = 1, seed: int = 0,
            distributed_cls: Optional[bool] = None, loss: Optional[DistillLoss] = None,
            progress: bool = True) -> Codebooks:
    """Fit ``codebooks`` to the model's output by gradient descent on the codebooks only.

    The model is patched (simulate mode, ``devices`` devices, the differentiable torch
    path) and, for ``steps`` steps, each layer's codebook takes an Adam step on
    ``1 - cos`` between ``forward(patched, batch)`` and ``targets[i]`` (the unpatched
    model's ``forward`` on the same batch), per token and mean-pooled. The weights are
    frozen and untouched; the model is unpatched afterwards.

    Args:
        batches: calibration inputs (each what ``forward`` takes); ``targets`` aligned.
        forward: ``(model, batch) -> [B, T, D]`` features.
        batch_size: how many of ``batches`` are concatenated per step.
    """
    from .attention import AstraAttention
    from .patch import patch, unpatch

    if steps <= 0:
        return codebooks
    loss_fn = loss or cos_loss
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    patch(model, codebooks, devices=devices, distributed_cls=distributed_cls, strict=False)
    try:
        attns = [m for m in model.modules() if isinstance(m, AstraAttention)]
        params = []
        for a in attns:
            a.codebook = a.codebook.clone().requires_grad_(True)
            params.append(a.codebook)
        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        gen = torch.Generator().manual_seed(int(seed))
        from tqdm.auto import tqdm
        order: List[int] = []
        with tqdm(total=steps, desc="distill codebooks", disable=not progress) as bar:
            for _ in range(steps):
                idx = []
                for _ in range(batch_size):
                    if not order:
                        order = torch.randperm(len(batches), generator=gen).tolist()
                    idx.append(order.pop())
                total = 0.0
                for i in idx:
                    out = forward(model, batches[i])
                    total = total + loss_fn(out, targets[i], batches[i])
                total = total / len(idx)
                opt.zero_grad()
                total.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{total.item():.4f}")
        tensor = torch.stack([a.codebook.detach().cpu() for a in attns])
    finally:
        unpatch(model)
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
        model.train(was_training)
    return codebooks.with_tensor(tensor)  # padding rows back to zero


def _layer_inputs(model: nn.Module, batches: Sequence) -> List[List[Tensor]]:
    """``[layer][batch] -> [B, T, D]``: what the unpatched model feeds each layer's
    attention for each batch of token ids."""
    out: List[List[Tensor]] = []
    for b in batches:
        if not isinstance(b, Tensor) or b.dim() != 2:
            raise ValueError("layer-local distillation takes batches of token ids [B, T]")
        acts = collect_activations(model, [b])
        for li, a in enumerate(acts):
            if li == len(out):
                out.append([])
            out[li].append(a.view(*b.shape, a.shape[-1]))
    return out


def distill_layers(model: nn.Module, codebooks: Codebooks, batches: Sequence, *, devices: int,
                   steps: int, lr: float = LAYER_LR, seed: int = 0, progress: bool = True,
                   log: Callable[[str], None] = lambda s: None) -> Codebooks:
    """Train each layer's codebook alone: Adam on the relative squared error of the
    layer's attention output (after its output projection) over ``devices`` simulated
    devices against the exact output, on the inputs the unpatched model gives that
    layer for ``batches`` (token ids ``[B, T]``). One layer at a time, no backward
    through the model: the cost is ``steps`` attentions per layer. Logs each layer's
    error before and after; a layer whose error did not fall keeps its codebook. The
    weights are untouched."""
    from .attention import AstraAttention
    from .models import resolve
    from .patch import patch, unpatch

    if steps <= 0:
        return codebooks
    if resolve(model)[1].has_cls(model):
        raise ValueError("layer-local distillation is for models without a class token")
    with torch.no_grad():
        inputs = _layer_inputs(model, batches)
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    patch(model, codebooks, devices=devices, use_kernels=False, strict=False)
    gen = torch.Generator().manual_seed(int(seed))
    from tqdm.auto import tqdm
    try:
        attns = [m for m in model.modules() if isinstance(m, AstraAttention)]
        with tqdm(total=len(attns) * steps, desc="distill layers", disable=not progress) as bar:
            for li, a in enumerate(attns):
                xs = inputs[li]
                _fit_layer(a, xs, steps, lr, gen, bar, log)
        tensor = torch.stack([a.codebook.detach().cpu() for a in attns])
    finally:
        unpatch(model)
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
    return codebooks.with_tensor(tensor)  # padding rows back to zero


def _fit_layer(a, xs: List[Tensor], steps: int, lr: float, gen, bar, log) -> None:
    """:func:`distill_layers` for one layer ``a`` (patched, simulate mode). The queries,
    keys, values, layout and RoPE of each input do not depend on the codebook: they are
    computed once, and a step runs only the mixed attention and the output projection."""
    pre = []
    with torch.no_grad():
        for x in xs:
            layout = a._layout(x)
            rope = a._rope_at(x, layout.orig_index)
            q, k, v = a.project_qkv(x)
            q, k = a._rot(q, k, rope)
            pre.append((x, q, k, v, layout, rope))

    def out(i):
        x, q, k, v, layout, rope = pre[i]
        o = a._simulate_torch(x, q, k, v, layout, None, a.causal, rope)
        o = a.output(o, x)
        return o[0] if isinstance(o, tuple) else o

    def rel_error(i):
        return (out(i) - refs[i]).pow(2).sum() / refs[i].pow(2).sum()

    cb = a.codebook
    with torch.no_grad():
        a.codebook = None  # remote tokens exact: the one-device output
        refs = [out(i) for i in range(len(xs))]
        a.codebook = cb
        before = sum(float(rel_error(i)) for i in range(len(xs))) / len(xs)
    a.codebook = cb.clone().requires_grad_(True)
    opt = torch.optim.Adam([a.codebook], lr=lr)
    for _ in range(steps):
        loss = rel_error(int(torch.randint(len(xs), (1,), generator=gen)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.update(1)
    a.codebook = a.codebook.detach()
    with torch.no_grad():
        after = sum(float(rel_error(i)) for i in range(len(xs))) / len(xs)
    if after >= before:  # Adam's steps are lr-sized however small the gradient: a layer
        a.codebook = cb  # k-means already fits well can get worse; keep k-means's then
    log(f"layer {a.layer_idx}: attention output error {before:.4f} -> {after:.4f}"
        + (" (kept k-means's)" if after >= before else ""))


def next_token_kl(head: nn.Module, skip: int = 0) -> DistillLoss:
    """A causal LLM's distillation loss: ``KL(single || Astra)`` of the next-token
    distributions, ``head`` (the LM head) applied to both last hidden states, mean over
    the tokens past the first ``skip`` (the first device's chunk sees no codes: its
    output is exact and only dilutes the mean)."""
    def loss(out: Tensor, ref: Tensor, batch=None) -> Tensor:
        with torch.no_grad():
            teacher = head(ref[:, skip:])
        return kl_divergence(head(out[:, skip:]), teacher)
    return loss


# ------------------------------------------------------------------------ entry point

def cache_path(model: nn.Module, method: Method, data_key: str, devices: int,
               loss_name: str = "cos"):
    """Where :func:`calibrate` caches the codebooks of this model/method/data
    (``loss_name``: the distillation loss, part of the key when distilling)."""
    from .cache import cache_path as artefact_path
    from .models import resolve
    ident = resolve(model)[1].identity(model)
    spec = dataclasses.asdict(method)
    if not method.distill_steps:  # distillation settings do not change plain k-means
        for k in ("distill_lr", "distill_batch"):
            spec.pop(k)
    spec = dict(spec, model=ident["model"], name=ident["name"],
                config_hash=ident["config_hash"], data=data_key,
                devices=devices if method.distill_steps else None)
    if method.distill_steps and loss_name != "cos":  # keys of cos distillations unchanged
        spec["loss"] = loss_name
    if method.target == "x":  # keys made before there were targets stay as they were
        spec.pop("target")
    if not method.residual:  # only residual stages are refined
        spec.pop("refine")
    if not method.layer_steps:  # nor those made before layer-local training
        spec.pop("layer_steps")
        spec.pop("layer_lr")
    return artefact_path("codebooks", method.name.replace("+", "-"), spec, suffix=".safetensors")


def data_key(batches: Sequence) -> str:
    """A hash of the calibration inputs (tensors of each batch)."""
    h = hashlib.sha256()
    for b in batches:
        vals = b.values() if isinstance(b, dict) else (b if isinstance(b, (tuple, list)) else [b])
        for v in vals:
            if isinstance(v, Tensor):
                h.update(str(tuple(v.shape)).encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def calibrate(model: nn.Module, batches: Sequence, method: Method, *, devices: int = 4,
              forward: Optional[Callable] = None, distributed_cls: Optional[bool] = None,
              max_tokens: Optional[int] = None, cache: bool = True,
              loss: Optional[DistillLoss] = None, loss_name: str = "cos",
              progress: bool = True, log: Callable[[str], None] = lambda s: None) -> Codebooks:
    """Codebooks for ``model`` by ``method`` on calibration ``batches`` (cached).

    ``forward(model, batch) -> [B, T, D]`` is needed for distillation (the features
    the distillation ``loss`` compares with the unpatched model's; default
    :func:`cos_loss`, cached under ``loss_name``).
    """
    path = cache_path(model, method, data_key(batches), devices, loss_name) if cache else None
    if path is not None and path.exists():
        log(f"codebooks from cache {path}")
        return Codebooks.load(path, expect=model)
    if method.distill_steps:
        if forward is None:
            raise ValueError("distillation needs forward(model, batch) -> features")
        # The k-means starting point is cached on its own: other step counts reuse it.
        cb = calibrate(model, batches, dataclasses.replace(method, distill_steps=0),
                       devices=devices, max_tokens=max_tokens, cache=cache,
                       progress=progress, log=log)
        with torch.no_grad():
            targets = [forward(model, b).detach() for b in batches]
        cb = distill(model, cb, batches, targets, forward, devices=devices,
                     steps=method.distill_steps, lr=method.distill_lr,
                     batch_size=method.distill_batch, seed=method.seed,
                     distributed_cls=distributed_cls, loss=loss, progress=progress)
    elif method.layer_steps:
        cb = calibrate(model, batches, dataclasses.replace(method, layer_steps=0),
                       devices=devices, max_tokens=max_tokens, cache=cache,
                       progress=progress, log=log)
        cb = distill_layers(model, cb, batches, devices=devices, steps=method.layer_steps,
                            lr=method.layer_lr, seed=method.seed, progress=progress, log=log)
    else:
        acts = collect_activations(model, batches, max_tokens=max_tokens)
        if method.target == "kv":
            acts = kv_activations(model, acts)
        kw = dict(iters=method.iters, seed=method.seed, max_points=method.max_points,
                  init=method.init, model=model, progress=progress, target=method.target)
        if method.layer_stages:
            cb = fit_residual(acts, method.layer_stage_sizes(len(acts)), refine=method.refine,
                              **kw)
        elif method.stages:
            cb = fit_residual(acts, method.stage_sizes, refine=method.refine, **kw)
        else:
            cb = fit_kmeans(acts, method.groups, method.codebook_size, **kw)
        del acts
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        cb.save(path)
        log(f"codebooks cached at {path}")
    return cb

"""``astra bench accuracy``: the accuracy study — single device vs Astra post-training
vs Astra fine-tuned (:mod:`astra.finetune`), and the paper's ablations.

Grid (N=4): (G, K) = (1, 1024), (16, 1024), (32, 1024) on

- ``digits-vit`` (top-1 and test cross-entropy, task loss + distillation),
- ``minilm`` (real weights; embedding cosine against the unpatched model; distillation
  only),
- ``byte-gpt2`` (held-out perplexity per byte; LM loss + distillation).

Ablations on ``digits-vit`` at G=1, K=1024 (the paper's 10 bits, where this small model
loses almost nothing even post-training) and at G=1, K=16 (4 bits, where it loses much),
N=4 (fine-tuned unless said): NAQ strength
λ ∈ {0, 0.1, 0.3, 1.0}; distributed vs single class token; commitment β ∈ {0, 1e-4,
0.25}; N ∈ {2, 4, 8} (post-training and fine-tuned).

Every number goes to ``<out>/accuracy.json`` as rows ``{"model", "devices", "groups",
"codebook_size", "method", "metric", "value", "seed"}`` (method: ``single``,
``post_training``, ``finetuned``, ``single_finetuned`` — the same fine-tuning on one
device, the control that separates "more training" from "recovered from the codes" —
or the ablation's name, e.g. ``naq_lambda=0.1``), written
as each one is measured; a rerun skips what the file already has (delete it to redo).
Tables (mean ± spread over seeds) go to ``<out>/accuracy.md`` and the plot to
``<out>/accuracy.png``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from ..catalog.tasks import STUDY_MODELS

GRID = ((1, 1024), (16, 1024), (32, 1024))
MODELS = STUDY_MODELS
METRICS = {"digits-vit": ("top1", "nll"), "minilm": ("emb_cos_mean",),
           "byte-gpt2": ("perplexity",)}
LAMBDAS = (0.0, 0.1, 0.3, 1.0)
BETAS = (0.0, 1e-4, 0.25)
DEVICES = (2, 4, 8)


def _key(r: Dict) -> Tuple:
    return (r["model"], r["devices"], r["groups"], r["codebook_size"], r["method"],
            r["metric"], r.get("seed"))


class Study:
    """Runs the configurations, appending rows to the JSON file as it goes."""

    def __init__(self, out: Path, seeds: int, steps_scale: float, progress: bool, log):
        self.out, self.seeds, self.scale, self.progress, self.log = out, seeds, steps_scale, \
            progress, log
        self.path = out / "accuracy.json"
        self.rows: List[Dict] = json.loads(self.path.read_text()) if self.path.exists() else []
        self.have = {_key(r) for r in self.rows}
        self._tasks: Dict[str, tuple] = {}

    # ------------------------------------------------------------ plumbing
    def task(self, name: str):
        if name not in self._tasks:
            from ..catalog.tasks import study_task
            task, train = study_task(name, progress=self.progress)
            with torch.no_grad():
                ref = [task.forward(task.model, b).float() for b in task.evals]
            base = {k: v.detach().clone() for k, v in task.model.state_dict().items()}
            self._tasks[name] = (task, train, ref, base)
        return self._tasks[name]

    def done(self, model, devices, G, K, method, seed) -> bool:
        return all((model, devices, G, K, method, m, seed) in self.have
                   for m in METRICS[model])

    def add(self, model, devices, G, K, method, seed, values: Dict[str, float], **extra):
        for m in METRICS[model]:
            row = {"model": model, "devices": devices, "groups": G, "codebook_size": K,
                   "method": method, "metric": m, "value": float(values[m]), "seed": seed,
                   **extra}
            self.rows.append(row)
            self.have.add(_key(row))
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.rows, indent=1) + "\n")
        tmp.replace(self.path)
        self.log(f"  {model} N={devices} G={G} K={K} {method} seed={seed}: " + ", ".join(
            f"{m}={values[m]:.4f}" for m in METRICS[model]))

    def measure(self, name, codebooks, devices, distributed_cls=None) -> Dict[str, float]:
        from ..evaluate import measure
        task, _, ref, _ = self.task(name)
        res = measure(task, task.model, codebooks, devices, ref, distributed_cls)
        if name == "digits-vit":
            res["nll"] = _digits_nll(task.model, codebooks, devices, distributed_cls)
        return res

    def reset(self, name) -> None:
        task, _, _, base = self.task(name)
        task.model.load_state_dict(base)

    def codebooks(self, name, G, K, seed):
        from ..calibrate import Method, calibrate
        task = self.task(name)[0]
        return calibrate(task.model, task.calib, Method(groups=G, codebook_size=K, seed=seed),
                         progress=self.progress, log=lambda s: None)

    def config(self, name, seed, **kw):
        from ..catalog.tasks import MODEL_DEFAULTS
        from ..finetune import FinetuneConfig
        d = MODEL_DEFAULTS[name]
        steps = max(1, int(round(d["steps"] * self.scale)))
        cfg = FinetuneConfig(steps=steps, lr=d["lr"], seed=seed, **kw)
        if name == "minilm":  # an encoder without labels: distillation only
            cfg = dataclasses.replace(cfg, task_weight=0.0)
        return cfg

    def finetuned(self, name, cb, cfg, distributed_cls=None) -> Dict[str, float]:
        from ..finetune import finetune
        task, train, _, _ = self.task(name)
        self.reset(name)
        t0 = time.perf_counter()
        res = finetune(task.model, cb, train, config=cfg, progress=self.progress)
        vals = self.measure(name, res.codebooks, cfg.devices, distributed_cls)
        vals["_seconds"] = time.perf_counter() - t0
        self.reset(name)
        return vals

    # ------------------------------------------------------------ parts
    def grid(self, name: str, grid: Sequence[Tuple[int, int]], devices: int = 4) -> None:
        self.log(f"{name}: single / post-training / fine-tuned, N={devices}")
        if not self.done(name, 1, 0, 0, "single", None):
            self.add(name, 1, 0, 0, "single", None, self.measure(name, None, 1))
        if name != "minilm":  # control: the same fine-tuning on one device (no codes)
            for seed in range(self.seeds):
                if not self.done(name, 1, 0, 0, "single_finetuned", seed):
                    cb = self.codebooks(name, *grid[0], seed)  # unused with one device
                    vals = self.finetuned(name, cb, self.config(name, seed, devices=1))
                    self.add(name, 1, 0, 0, "single_finetuned", seed, vals,
                             seconds=round(vals["_seconds"], 1))
        for G, K in grid:
            for seed in range(self.seeds):
                cb = None
                if not self.done(name, devices, G, K, "post_training", seed):
                    cb = self.codebooks(name, G, K, seed)
                    self.add(name, devices, G, K, "post_training", seed,
                             self.measure(name, cb, devices))
                if not self.done(name, devices, G, K, "finetuned", seed):
                    cb = cb or self.codebooks(name, G, K, seed)
                    vals = self.finetuned(name, cb, self.config(name, seed, devices=devices))
                    self.add(name, devices, G, K, "finetuned", seed, vals,
                             seconds=round(vals["_seconds"], 1))

    def ablations(self, name: str = "digits-vit", G: int = 1, K: int = 1024) -> None:
        self.log(f"{name}: ablations at G={G}, K={K}")
        runs = [(f"naq_lambda={lam:g}", 4, dict(noise=lam), None) for lam in LAMBDAS]
        runs += [("cls=distributed", 4, dict(), True), ("cls=single", 4, dict(), False)]
        runs += [(f"commitment_beta={b:g}", 4, dict(commitment=b), None) for b in BETAS]
        runs += [(f"devices={n}", n, dict(), None) for n in DEVICES]
        for method, n, kw, dcls in runs:
            for seed in range(self.seeds):
                if method.startswith("devices="):
                    pm = f"{method}:post_training"
                    if not self.done(name, n, G, K, pm, seed):
                        cb = self.codebooks(name, G, K, seed)
                        self.add(name, n, G, K, pm, seed, self.measure(name, cb, n))
                    m = f"{method}:finetuned"
                else:
                    m = method
                if self.done(name, n, G, K, m, seed):
                    continue
                cb = self.codebooks(name, G, K, seed)
                if dcls is False:  # one class token, on device 0, sent like any token
                    kw = dict(kw, distributed_cls=False)
                vals = self.finetuned(name, cb, self.config(name, seed, devices=n, **kw), dcls)
                self.add(name, n, G, K, m, seed, vals, seconds=round(vals["_seconds"], 1))
                if dcls is False and not self.done(name, n, G, K, "cls=single:post_training",
                                                   seed):
                    self.add(name, n, G, K, "cls=single:post_training", seed,
                             self.measure(name, cb, n, False))


@torch.no_grad()
def _digits_nll(model, codebooks, devices, distributed_cls) -> float:
    """Mean test cross-entropy of the digits ViT (finer-grained than top-1 on 359 images)."""
    from .. import data
    from ..patch import patch, unpatch
    _, _, x, y = data.digits(seed=0)
    if codebooks is not None:
        patch(model, codebooks, devices=devices, distributed_cls=distributed_cls)
    try:
        logits = torch.cat([model(pixel_values=x[i:i + 512]).logits
                            for i in range(0, len(y), 512)])
    finally:
        if codebooks is not None:
            unpatch(model)
    return float(torch.nn.functional.cross_entropy(logits.float(), y))


# ------------------------------------------------------------------------------ report

def _stats(vals: List[float]) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.4f}"
    return f"{statistics.mean(vals):.4f} ± {(max(vals) - min(vals)) / 2:.4f}"


def _collect(rows, **match) -> Dict[Tuple, List[float]]:
    out: Dict[Tuple, List[float]] = {}
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            out.setdefault((r["devices"], r["groups"], r["codebook_size"], r["method"],
                            r["metric"]), []).append(r["value"])
    return out


def tables(rows: List[Dict]) -> str:
    """Markdown tables: one per model (grid), one for the ablations."""
    lines = []
    for model in MODELS:
        got = _collect(rows, model=model)
        if not got:
            continue
        lines += [f"#### {model}", "",
                  "| G | K | bits/token | metric | single | single, fine-tuned | post-training "
                  "| fine-tuned | seeds |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m in METRICS[model]:
            single = got.get((1, 0, 0, "single", m))
            sft = got.get((1, 0, 0, "single_finetuned", m))
            cells = sorted({(g, k) for (n, g, k, meth, mm) in got
                            if meth in ("post_training", "finetuned") and mm == m})
            for g, k in cells:
                post = got.get((4, g, k, "post_training", m), [])
                fine = got.get((4, g, k, "finetuned", m), [])
                bits = g * math.ceil(math.log2(k))
                lines.append(f"| {g} | {k} | {bits} | {m} | "
                             f"{_stats(single) if single else '-'} | "
                             f"{_stats(sft) if sft else '-'} | "
                             f"{_stats(post) if post else '-'} | "
                             f"{_stats(fine) if fine else '-'} | "
                             f"{max(len(post), len(fine))} |")
        lines.append("")
    abl = {k: v for k, v in _collect(rows, model="digits-vit").items()
           if k[3] not in ("single", "post_training", "finetuned", "single_finetuned")}
    metrics = METRICS["digits-vit"]
    for g0, k0 in sorted({(k[1], k[2]) for k in abl}, key=lambda c: -c[1]):
        bits = g0 * math.ceil(math.log2(k0))
        lines += [f"#### digits-vit ablations (G={g0}, K={k0}: {bits} bits/token; "
                  "fine-tuned unless marked)", "",
                  "| ablation | N | " + " | ".join(metrics) + " | seeds |",
                  "|---|---|" + "---|" * len(metrics) + "---|"]
        names = []
        for (n, g, k, meth, m) in abl:
            if (g, k) == (g0, k0) and (meth, n) not in names:
                names.append((meth, n))
        for meth, n in names:
            vals = [abl.get((n, g0, k0, meth, m), []) for m in metrics]
            lines.append(f"| {meth} | {n} | " + " | ".join(_stats(v) if v else "-" for v in vals)
                         + f" | {max(len(v) for v in vals)} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: List[Dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(m, METRICS[m][0]) for m in MODELS if any(r["model"] == m for r in rows)]
    has_abl = any(r["method"].startswith("naq_lambda=") for r in rows)
    n = len(panels) + int(has_abl)
    if n == 0:
        return
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    for ax, (model, metric) in zip(axes[0], panels):
        got = _collect(rows, model=model, metric=metric)
        single = got.get((1, 0, 0, "single", metric))
        for meth, mark in (("post_training", "o--"), ("finetuned", "s-")):
            pts = sorted((g * math.ceil(math.log2(k)), statistics.mean(v))
                         for (nd, g, k, mm, _), v in got.items() if mm == meth and nd == 4)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], mark, label=meth)
        if single:
            ax.axhline(statistics.mean(single), color="k", lw=1, label="single device")
        sft = got.get((1, 0, 0, "single_finetuned", metric))
        if sft:
            ax.axhline(statistics.mean(sft), color="k", lw=1, ls=":",
                       label="single device, fine-tuned")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bits per token")
        ax.set_title(f"{model}: {metric} (N=4)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if has_abl:
        ax = axes[0][-1]
        got = _collect(rows, model="digits-vit", metric="top1")
        cells = sorted({(k[1], k[2]) for k in got if k[3].startswith("naq_lambda=")})
        for g0, k0 in cells:
            xs, ys, es = [], [], []
            for lam in LAMBDAS:
                v = got.get((4, g0, k0, f"naq_lambda={lam:g}", "top1"))
                if v:
                    xs.append(lam)
                    ys.append(statistics.mean(v))
                    es.append((max(v) - min(v)) / 2)
            ax.errorbar(xs, ys, yerr=es, fmt="s-", capsize=3,
                        label=f"G={g0} K={k0} ({g0 * math.ceil(math.log2(k0))} bits)")
        ax.set_xlabel("NAQ strength λ")
        ax.set_ylabel("top-1 (fine-tuned)")
        ax.set_title("digits-vit, N=4: NAQ")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------- the study

def parse_cells(text: str, what: str = "--grid") -> List[Tuple[int, int]]:
    """``"1x1024,16x1024"`` -> ``[(1, 1024), (16, 1024)]``; ``ValueError`` otherwise."""
    try:
        cells = [tuple(int(v) for v in c.lower().split("x")) for c in text.split(",") if c]
    except ValueError:
        cells = []
    if not cells or not all(len(c) == 2 and c[0] >= 1 and c[1] >= 2 for c in cells):
        raise ValueError(f"{what} must be GxK cells like 1x1024,16x1024, got {text!r}")
    return cells


def run_study(models: Sequence[str], grid: Sequence[Tuple[int, int]], *, seeds: int = 3,
              minilm_seeds: int = 1, steps_scale: float = 1.0, ablations: bool = True,
              ablation_cells: Sequence[Tuple[int, int]] = ((1, 1024), (1, 16)),
              out: Path = Path("bench/results"), progress: bool = True,
              log=lambda s: print(s, file=sys.stderr, flush=True)) -> str:
    """Run (or resume) the study; write ``accuracy.{json,md,png}`` under ``out`` and
    return the Markdown tables."""
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    out = Path(out)
    for m in models:
        st = Study(out, minilm_seeds if m == "minilm" else seeds, steps_scale, progress, log)
        st.grid(m, grid)
        if m == "digits-vit" and ablations:
            for g, k in ablation_cells:
                st.ablations(m, g, k)
    rows = json.loads((out / "accuracy.json").read_text())
    md = tables(rows)
    (out / "accuracy.md").write_text(md + "\n")
    plot(rows, out / "accuracy.png")
    return md

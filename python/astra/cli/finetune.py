"""``astra finetune``: fine-tune one of the project's models for N simulated devices.

Starts from k-means codebooks (:func:`astra.calibrate.calibrate`), trains weights and
codebooks (:func:`astra.finetune.finetune`) and prints the quality before and after.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ..options import (
    CODEBOOK_LR,
    CODEBOOK_UPDATE,
    CODEBOOK_UPDATES,
    COMMITMENT,
    NAQ_NOISE,
    STUDY_MODELS,
)
from ._args import (
    add_residual_options,
    layer_stages_arg,
    nonnegative_float,
    nonnegative_int,
    positive_int,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune a model for N devices (STE, NAQ noise, distillation)",
        description="Fine-tune one of the project's models for N simulated devices from "
        "k-means codebooks and print its quality before and after.")
    p.add_argument("--model", default="digits-vit", choices=STUDY_MODELS)
    p.add_argument("--devices", type=positive_int, default=4)
    p.add_argument("--groups", type=positive_int, default=1, help="G groups per token")
    p.add_argument("--codebook-size", type=positive_int, default=1024, help="K codewords per group")
    add_residual_options(p, "residual stages after the first (G must be 1), e.g. 64: 10+6 bits",
                         "-1:4096,4096: more bits in the last layer")
    p.add_argument("--steps", type=positive_int, help="optimizer steps (default: per model)")
    p.add_argument("--lr", type=nonnegative_float,
                   help="weights' learning rate (default: per model)")
    p.add_argument("--codebook-lr", type=nonnegative_float, default=CODEBOOK_LR)
    p.add_argument("--noise", type=nonnegative_float, default=NAQ_NOISE,
                   help="NAQ strength λ")
    p.add_argument("--commitment", type=nonnegative_float, default=COMMITMENT,
                   help="β")
    p.add_argument("--codebook-update", choices=CODEBOOK_UPDATES,
                   default=CODEBOOK_UPDATE)
    p.add_argument("--batch-size", type=positive_int, default=1, help="batches per step")
    p.add_argument("--no-distributed-cls", action="store_true",
                   help="one class token on device 0 instead of one copy per device")
    p.add_argument("--codebooks-only", action="store_true", help="freeze the weights")
    p.add_argument("--save-every", type=nonnegative_int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="DIR", help="checkpoint folder (default: "
                   "<cache>/finetune/<model>-N<devices>-G<groups>-K<K>-s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--json", metavar="PATH", help="write the before/after row as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=main)


def _default_out(args: argparse.Namespace, layer_stages) -> Path:
    """``<cache>/finetune/<model>-N<devices>-G<groups>-K<K>[+K2..][-L<l>+K..]-s<seed>``."""
    from astra.cache import cache_dir
    res_tag = "".join(f"+{k}" for k in args.residual) + "".join(
        f"-L{li}" + "".join(f"+{k}" for k in ks) for li, ks in layer_stages)
    return cache_dir() / "finetune" / (
        f"{args.model}-N{args.devices}-G{args.groups}-K{args.codebook_size}{res_tag}"
        f"-s{args.seed}")


def main(args: argparse.Namespace) -> int:
    import torch

    from astra.calibrate import Method, calibrate
    from astra.catalog.tasks import MODEL_DEFAULTS, study_task
    from astra.evaluate import measure
    from astra.finetune import FinetuneConfig, finetune
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
    d = MODEL_DEFAULTS[args.model]
    cfg = FinetuneConfig(
        devices=args.devices, steps=args.steps or d["steps"], lr=args.lr or d["lr"],
        codebook_lr=args.codebook_lr, noise=args.noise, commitment=args.commitment,
        codebook_update=args.codebook_update, batch_size=args.batch_size,
        distributed_cls=False if args.no_distributed_cls else None,
        train_weights=not args.codebooks_only, seed=args.seed, save_every=args.save_every)
    layer_stages = layer_stages_arg(args.layer_residual)
    method = Method(groups=args.groups, codebook_size=args.codebook_size,
                    stages=args.residual, layer_stages=layer_stages, seed=args.seed)
    out = Path(args.out) if args.out else _default_out(args, layer_stages)
    if args.resume:  # before the minutes of set-up: is there a checkpoint of this config?
        from astra.checkpoint import check_resume
        check_resume(out, dataclasses.asdict(cfg))
    task, train = study_task(args.model, progress=not args.quiet)
    model = task.model
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

"""``astra eval``: how much quality Astra costs on a real model.

Calibrates codebooks by a method (:class:`astra.calibrate.Method`), runs the model for N
simulated devices and prints its cosines to the single-device model (and the task
metric where the model has one); see :mod:`astra.evaluate`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from ._args import add_residual_options, layer_stages_arg


def register(subparsers) -> None:
    from astra.calibrate import Method
    p = subparsers.add_parser(
        "eval", help="quality of Astra vs one device on a real model (embedding cosine)",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm",
                   help="minilm | digits-vit | byte-gpt2 | local HF folder | HF type | timm name")
    p.add_argument("--devices", type=int, default=4, help="N simulated devices")
    p.add_argument("--groups", type=int, default=1, help="G groups per token")
    p.add_argument("--codebook-size", type=int, default=1024, help="K (first stage's K)")
    add_residual_options(p, "residual stages after the first (e.g. 16, or 256x9 for nine "
                         "stages of 256): G must be 1", "-1:4096,4096 for the last layer")
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


def main(args: argparse.Namespace) -> int:
    from astra.calibrate import Method, calibrate
    from astra.evaluate import attribute_layers, evaluate, load_task
    method = Method(groups=args.groups, codebook_size=args.codebook_size, stages=args.residual,
                    layer_stages=layer_stages_arg(args.layer_residual),
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
    """``astra eval`` with ``argv`` (default: ``sys.argv[1:]``), for scripts and tests;
    ``python -m astra.cli eval ...`` is the same from a shell."""
    from astra.cli import main as cli_main
    return cli_main(["eval", *(sys.argv[1:] if argv is None else argv)])

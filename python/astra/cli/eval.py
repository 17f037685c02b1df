"""``astra eval``: how much quality Astra costs on a real model.

Calibrates codebooks by a method (:class:`astra.calibrate.Method`), runs the model for N
simulated devices and prints its cosines to the single-device model (and the task
metric where the model has one); see :mod:`astra.evaluate`. Causal LLMs (``smollm2``,
a ``.gguf`` file, a Llama-family HF folder) get perplexity, top-1 agreement on the last
device's chunk and greedy-continuation agreement instead; see :mod:`astra.evaluate_llm`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from ..options import (
    DISTILL_LR,
    GREEDY_TOKENS,
    KMEANS_INIT,
    KMEANS_ITERS,
    KMEANS_MAX_POINTS,
    LAYER_LR,
    LLM_CALIB_ITERS,
    LLM_QUANTIZE,
    LLM_STAGES,
    QUANTIZE_TARGETS,
)
from ._args import (
    add_residual_options,
    layer_stages_arg,
    nonnegative_int,
    positive_float,
    positive_int,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="quality of Astra vs one device on a real model (embedding cosine; "
        "perplexity and agreement for causal LLMs)",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm",
                   help="minilm | digits-vit | byte-gpt2 | smollm2 | .gguf file | local HF "
                   "folder | HF type | timm name")
    p.add_argument("--devices", type=positive_int, default=4, help="N simulated devices")
    p.add_argument("--groups", type=positive_int, default=1, help="G groups per token")
    p.add_argument("--codebook-size", type=positive_int, default=1024, help="K (first stage's K)")
    add_residual_options(p, "residual stages after the first (e.g. 16, or 256x9 for nine "
                         "stages of 256): G must be 1; causal LLMs at G=1 default to "
                         f"{','.join(map(str, LLM_STAGES))} (1: no second stage)",
                         "-1:4096,4096 for the last layer")
    p.add_argument("--quantize", choices=QUANTIZE_TARGETS,
                   help="what the codes stand for: x = the attention input, kv = each "
                   "token's pre-RoPE key and value (narrower with GQA); default: "
                   f"{LLM_QUANTIZE} for causal LLMs (as the catalogue's), x for the others")
    p.add_argument("--layer-steps", type=nonnegative_int, default=0, metavar="STEPS",
                   help="layer-local codebook training after k-means (0: none): each layer's "
                   "codebook alone learns to reproduce the layer's exact attention output "
                   "(seconds per layer; no backward through the model)")
    p.add_argument("--layer-lr", type=positive_float, default=LAYER_LR)
    p.add_argument("--distill", type=nonnegative_int, default=0, metavar="STEPS",
                   help="codebook distillation steps after k-means (0: none): the codebooks "
                   "alone learn to match one device's output (encoders: cosine of the "
                   "hidden states; causal LLMs: KL of the next-token distributions)")
    p.add_argument("--distill-lr", type=positive_float, default=DISTILL_LR)
    p.add_argument("--iters", type=positive_int, help=f"Lloyd iterations (default {KMEANS_ITERS}; "
                   f"causal LLMs {LLM_CALIB_ITERS}, as the catalogue's cached codebooks)")
    p.add_argument("--max-points", type=positive_int, default=KMEANS_MAX_POINTS,
                   help="k-means points per layer (random subset)")
    p.add_argument("--init", default=KMEANS_INIT, choices=("sampled", "k-means++", "random"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-text", metavar="FILE", help="calibration text (default: even "
                   "pydoc topics)")
    p.add_argument("--text", metavar="FILE", help="evaluation text (default: held-out pydoc "
                   "topics)")
    p.add_argument("--limit", type=positive_int, help="at most this many evaluation inputs (causal "
                   "LLMs: windows)")
    p.add_argument("--tokens", type=positive_int, default=2048, help="causal LLMs: tokens per "
                   "evaluation window (at most the model's positions)")
    p.add_argument("--prompts", type=nonnegative_int, default=4,
                   help="causal LLMs: prompts (the first "
                   f"windows, cut) whose {GREEDY_TOKENS} greedy tokens are compared; 0: none")
    p.add_argument("--prompt-tokens", type=positive_int, default=512,
                   help="causal LLMs: tokens of each prompt")
    p.add_argument("--calib-limit", type=positive_int, help="at most this many calibration inputs")
    p.add_argument("--no-cache", action="store_true", help="refit even if cached")
    p.add_argument("--json", metavar="PATH", help="write the result row as JSON")
    p.add_argument("--attribute", action="store_true",
                   help="also report the cosines with one layer at a time quantized")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=main)


def _method(args: argparse.Namespace, causal_lm: bool):
    from astra.calibrate import Method
    iters = args.iters if args.iters is not None else (
        LLM_CALIB_ITERS if causal_lm else Method.iters)
    stages = args.residual
    if causal_lm and not stages and not args.layer_residual and args.groups == 1:
        stages = LLM_STAGES  # the catalogue's codebooks: a refined 64-row second stage
    if tuple(stages) == (1,):  # "1": no second stage, plain k-means
        stages = ()
    return Method(groups=args.groups, codebook_size=args.codebook_size, stages=stages,
                  layer_stages=layer_stages_arg(args.layer_residual),
                  layer_steps=args.layer_steps, layer_lr=args.layer_lr,
                  distill_steps=args.distill, distill_lr=args.distill_lr, iters=iters,
                  max_points=args.max_points, init=args.init, seed=args.seed,
                  target=args.quantize or (LLM_QUANTIZE if causal_lm else "x"))


def main(args: argparse.Namespace) -> int:
    from astra.calibrate import calibrate
    from astra.evaluate import attribute_layers, evaluate, load_task
    from astra.evaluate_llm import is_causal_lm
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
    if is_causal_lm(args.model):
        return main_llm(args, _method(args, True), log)
    method = _method(args, False)
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


def main_llm(args: argparse.Namespace, method, log) -> int:
    """``astra eval`` for a causal LLM: perplexity and agreement (:mod:`astra.evaluate_llm`)."""
    from astra.evaluate_llm import evaluate_llm
    if args.attribute:
        raise ValueError("--attribute is for the embedding models, not causal LLMs")
    row = evaluate_llm(args.model, method, args.devices, text=args.text, tokens=args.tokens,
                       limit=args.limit, prompts=args.prompts,
                       prompt_tokens=args.prompt_tokens, calib_text=args.calib_text,
                       calib_limit=args.calib_limit, cache=not args.no_cache,
                       progress=not args.quiet, log=log)
    single, astra = row["ppl_single"], row["ppl_astra"]
    print(f"{row['model']}  N={row['devices']}  {method.describe()}  "
          f"{row['bits_per_token_per_layer']:g} bits/token/layer  "
          f"{row['windows']} windows x {row['tokens']} tokens")
    print(f"  perplexity            single device {single:.4f}  Astra {astra:.4f}  "
          f"({100 * (astra / single - 1):+.1f}%)")
    print(f"  top-1 agreement       {row['top1_agreement']:.4f}  (last device's chunk)")
    same = row[f"greedy{GREEDY_TOKENS}_identical"]
    if same is not None:
        print(f"  greedy {GREEDY_TOKENS} identical    {same:.4f}  ({round(same * row['prompts'])}"
              f"/{row['prompts']} prompts of {row['prompt_tokens']} tokens)")
    print(f"  calibrate {row['calibrate_s']} s, evaluate {row['eval_s']} s, "
          f"total {row['elapsed_s']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2) + "\n")
    return 0


def run_cli(argv: Optional[List[str]] = None) -> int:
    """``astra eval`` with ``argv`` (default: ``sys.argv[1:]``), for scripts and tests;
    ``python -m astra.cli eval ...`` is the same from a shell."""
    from astra.cli import main as cli_main
    return cli_main(["eval", *(sys.argv[1:] if argv is None else argv)])

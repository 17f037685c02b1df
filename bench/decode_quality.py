"""What int8 decode weights cost in quality: SmolLM2 on one device, held-out pydoc text.

For each window (a 512-token prompt, then 128 tokens of the same text) the prompt is
prefilled with the model's own float32 weights, then the 128 tokens are fed through the
lean decoder (:mod:`astra.decode`) 16 at a time, once with fp32 and once with int8
weights: perplexity of the true next tokens, next-token top-1 agreement and KL(fp32 ||
int8). Then 32 greedy tokens from each prompt with either weights: how many prompts
give identical continuations, and the mean length of the common prefix.

    python bench/decode_quality.py [--windows 6] [--json bench/results/decode_quality.json]

``--group G`` instead simulates int8 with one scale per G weights of a row (the fp32
decoder on weights rounded that way), to try group sizes without a kernel; ``--group
576`` (= K of most projections) comes close to the per-row scales the first version had.
"""
import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import astra
from astra import decode
from astra.catalog import llm
from astra.generation import AstraCache, cache_kw
from astra.options import INT8_GROUP

PROMPT, CONT, STEP, GREEDY = 512, 128, 16, 32


def _prefill(model, ids):
    cache = AstraCache()
    model(ids, use_cache=True, logits_to_keep=1, **{cache_kw(model): cache})
    return cache


def _forced(model, prompt, cont):
    return _forced_with(model, model, prompt, cont)


def _greedy(model, prompt):
    return _greedy_with(model, model, prompt)


def _forced_with(pre, model, prompt, cont):
    """Logits of ``cont``'s tokens fed STEP at a time after ``prompt`` (prefilled by
    ``pre``): [n, V]."""
    cache = _prefill(pre, prompt[:, :-1])
    feed = torch.cat([prompt[:, -1:], cont[:, :-1]], 1)
    out = [model(feed[:, i:i + STEP], use_cache=True, logits_to_keep=0,
                 **{cache_kw(model): cache}).logits[0] for i in range(0, feed.shape[1], STEP)]
    return torch.cat(out)


def _greedy_with(pre, model, prompt):
    cache = _prefill(pre, prompt[:, :-1])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=GREEDY,
                         min_new_tokens=GREEDY, do_sample=False, pad_token_id=0,
                         **{cache_kw(model): cache})
    return out[0, prompt.shape[1]:]


def _round_groups(model, group):
    """Round every projection and the LM head to int8 with one scale per ``group``
    consecutive weights of a row, in place (the LM head untied from the embeddings)."""
    lins = [m for blk in model.model.layers for m in blk.modules()
            if isinstance(m, torch.nn.Linear)]
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    for lin in lins + [model.lm_head]:
        w = lin.weight.detach()
        N, K = w.shape
        g = w.reshape(N, K // group, group)
        s = (g.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12)
        lin.weight.data = (torch.round(g / s) * s).reshape(N, K)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--json", default="bench/results/decode_quality.json")
    ap.add_argument("--group", type=int, default=0,
                    help="simulate int8 with one scale per GROUP weights (0: the int8 kernel)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    src = llm.model_source("smollm2")
    model = llm.load_causal_lm(src)
    astra.patch(model, None, devices=1)
    rounded = None
    if args.group:
        import copy
        rounded = copy.deepcopy(model)
        _round_groups(rounded, args.group)
    n = PROMPT + CONT
    ids = llm.text_inputs(src, n * args.windows).view(args.windows, n)
    stats = {w: dict(nll=0.0) for w in ("fp32", "int8")}
    agree = kl = count = 0.0
    same, prefix = 0, 0
    with torch.no_grad():
        for row in ids:
            prompt, cont = row[None, :PROMPT], row[None, PROMPT:]
            lg, gr = {}, {}
            for w in ("fp32", "int8"):
                if rounded is not None and w == "int8":  # prefill: the fp32 weights
                    decode.install(rounded, "fp32")
                    lg[w] = _forced_with(model, rounded, prompt, cont).float()
                    gr[w] = _greedy_with(model, rounded, prompt)
                    decode.uninstall(rounded)
                else:
                    decode.install(model, w)
                    lg[w] = _forced(model, prompt, cont).float()
                    gr[w] = _greedy(model, prompt)
                stats[w]["nll"] += F.cross_entropy(lg[w], cont[0], reduction="sum").item()
            decode.uninstall(model)
            p, q = lg["fp32"].log_softmax(-1), lg["int8"].log_softmax(-1)
            kl += (p.exp() * (p - q)).sum().item()
            agree += (lg["fp32"].argmax(-1) == lg["int8"].argmax(-1)).sum().item()
            count += cont.shape[1]
            eq = (gr["fp32"] == gr["int8"]).long()
            same += int(bool(eq.all()))
            prefix += int(eq.cumprod(0).sum())
    res = dict(windows=args.windows, prompt_tokens=PROMPT, forced_tokens=CONT,
               int8=f"one scale per {args.group} weights (simulated)" if args.group else
               f"the decoder's (astra_kernels.int8_linear: one scale, and an offset where "
               f"it holds the weights better, per {INT8_GROUP} weights of a row)",
               ppl_fp32=math.exp(stats["fp32"]["nll"] / count),
               ppl_int8=math.exp(stats["int8"]["nll"] / count),
               top1_agreement=agree / count, kl_per_token=kl / count,
               greedy32_identical=same / args.windows,
               greedy_common_prefix=prefix / args.windows)
    res["ppl_change"] = res["ppl_int8"] / res["ppl_fp32"] - 1
    for k, v in res.items():
        print(f"{k:<22}{v:.4g}" if isinstance(v, float) else f"{k:<22}{v}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()

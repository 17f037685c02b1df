"""Quality per bit of an LLM across 4 devices: perplexity and agreement with one device
against the bits a remote token costs per layer, for codebooks of the attention input X
and of the keys and values ([k; v]), k-means only (weights and codebooks untrained;
residual stages refined jointly unless the name ends in -seq).

Each configuration is one ``astra eval --model smollm2`` run (the library's path,
:func:`astra.evaluate_llm.evaluate_llm`: held-out pydoc text, 4 windows of 1,024 tokens,
4 greedy prompts of 512, calibration on 32 windows of 512 tokens); rows already in the
JSON are kept, so the script can be run piecewise (``--only NAME,...``). Then it writes
the table (markdown) and the plot, with the anchors the issue names: the ASTRA paper's
GPT2-M (K=1024, G=32 = 320 bits, fine-tuned: +13.8% perplexity) and KV-cache
quantization (about 3 bits per channel: 1,152 bits per token and layer here, under
+0.1 perplexity).

    .venv/bin/python bench/quality_frontier.py [--only kv-10,kv-20] [--plot-only]
"""
import argparse
import json
import sys
from pathlib import Path

from astra.calibrate import Method
from astra.options import LLM_CALIB_ITERS

OUT = Path("bench/results")
EVAL = dict(devices=4, tokens=1024, limit=4, prompts=4, prompt_tokens=512, calib_limit=32)

# name: Method fields (all k-means, LLM_CALIB_ITERS iterations)
CONFIGS = {
    "x-10": dict(codebook_size=1024),
    "x-20-seq": dict(codebook_size=1024, stages=(1024,), refine=0),
    "x-80": dict(groups=8, codebook_size=1024),
    "x-256": dict(groups=32, codebook_size=256),
    "kv-10": dict(codebook_size=1024, target="kv"),
    # residual stages fitted one after another (refine=0), and jointly refined (default)
    "kv-16-seq": dict(codebook_size=1024, stages=(64,), target="kv", refine=0),
    "kv-16.7-late-seq": dict(codebook_size=1024, stages=(1024,), target="kv", refine=0,
                             layer_stages=tuple((li, (1,)) for li in range(10))),
    "kv-16": dict(codebook_size=1024, stages=(64,), target="kv"),
    "kv-20-residual": dict(codebook_size=1024, stages=(1024,), target="kv"),
    "kv-20": dict(groups=2, codebook_size=1024, target="kv"),
    "kv-40": dict(groups=4, codebook_size=1024, target="kv"),
    "kv-80": dict(groups=8, codebook_size=1024, target="kv"),
    "kv-160": dict(groups=16, codebook_size=1024, target="kv"),
    "kv-256": dict(groups=32, codebook_size=256, target="kv"),
}
PAPER = (320, 13.8, "ASTRA paper: GPT2-M, G=32, fine-tuned")
KV_CACHE = (1152, 100 * 0.1 / 12.352, "KV-cache quantization, ~3 bits/channel")


def run(names, path: Path) -> list:
    from astra.evaluate_llm import evaluate_llm
    rows = json.loads(path.read_text()) if path.exists() else []
    done = {r["config"] for r in rows}
    for name in names:
        if name in done:
            continue
        method = Method(iters=LLM_CALIB_ITERS, **CONFIGS[name])
        print(f"== {name}: {method.describe()}", file=sys.stderr, flush=True)
        row = evaluate_llm("smollm2", method, progress=False,
                           log=lambda s: print(s, file=sys.stderr), **EVAL)
        row["config"] = name
        rows = [r for r in rows if r["config"] != name] + [row]
        path.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def table(rows) -> str:
    out = ["| config | quantized | bits/token/layer | ppl | vs one device | top-1 (last chunk) "
           "| greedy 32 identical | calibrate s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["quantize"], r["bits_per_token_per_layer"])):
        d = 100 * (r["ppl_astra"] / r["ppl_single"] - 1)
        out.append(f"| {r['config']} | {'[k; v]' if r['quantize'] == 'kv' else 'X'} | "
                   f"{r['bits_per_token_per_layer']:g} | {r['ppl_astra']:.3f} | {d:+.1f}% | "
                   f"{r['top1_agreement']:.3f} | {round(r['greedy32_identical'] * r['prompts'])}"
                   f"/{r['prompts']} | {r['calibrate_s']:g} |")
    singles = sorted({round(r["ppl_single"], 3) for r in rows})
    out.append(f"one device (the anchor, measured in each run): perplexity {singles}")
    return "\n".join(out)


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = (("X, G groups", "o--", lambda r: r["quantize"] == "x" and not r["stages"]),
              ("[k; v], G groups", "s-", lambda r: r["quantize"] == "kv" and not r["stages"]),
              ("[k; v], residual, refined", "D-",
               lambda r: r["quantize"] == "kv" and r["stages"] and "-seq" not in r["config"]
               and "late" not in r["config"]),
              ("[k; v], residual, stage by stage", "v:",
               lambda r: r["quantize"] == "kv" and "-seq" in r["config"]))
    for label, style, keep in series:
        rs = sorted((r for r in rows if keep(r)), key=lambda r: r["bits_per_token_per_layer"])
        if label.startswith("[k; v], residual"):  # they start from the one-stage codebook
            rs = [r for r in rows if r["config"] == "kv-10"] + rs
        if not rs:
            continue
        bits = [r["bits_per_token_per_layer"] for r in rs]
        a.plot(bits, [100 * (r["ppl_astra"] / r["ppl_single"] - 1) for r in rs], style,
               label=label)
        b.plot(bits, [r["top1_agreement"] for r in rs], style, label=label)
    for x, y, label, m in (PAPER + ("*",), KV_CACHE + ("^",)):
        a.plot([x], [y], m, color="gray", markersize=10)
        a.annotate(label, (x, y), textcoords="offset points", xytext=(-10, -14), ha="right",
                   fontsize=8, color="gray")
    a.axhline(5, color="C3", lw=0.8, ls=":")
    a.text(10, 5.3, "goal at <= 16 bits: +5%", color="C3", fontsize=8)
    a.axhline(2, color="C3", lw=0.8, ls=":")
    a.text(10, 2.1, "goal at <= 64 bits: +2%", color="C3", fontsize=8)
    b.axhline(0.92, color="C3", lw=0.8, ls=":")
    for ax, yl in ((a, "perplexity vs one device (%)"), (b, "top-1 agreement (last chunk)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bits per remote token per layer")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    a.set_yscale("log")
    a.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M, 4 devices, k-means codebooks (weights untouched)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated config names (default: all)")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--json", default=str(OUT / "quality_frontier.json"))
    a = ap.parse_args()
    names = a.only.split(",") if a.only else list(CONFIGS)
    bad = [n for n in names if n not in CONFIGS]
    if bad:
        ap.error(f"unknown configs {bad}; known: {', '.join(CONFIGS)}")
    path = Path(a.json)
    rows = json.loads(path.read_text()) if a.plot_only else run(names, path)
    print(table(rows))
    if rows:
        plot(rows, path.with_suffix(".png"))
        print(f"plot: {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()

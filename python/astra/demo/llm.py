"""``astra demo``: a long question answered by SmolLM2 across 4 emulated devices.

The prompt is ~2,000 tokens of the embedded Python documentation (held-out pydoc
topics, none of them calibration text) followed by a question whose answer is in it,
in SmolLM2-Instruct's chat template. Four ranks prefill it over an emulated 10 Mbit/s
shared link (0.5 ms one-way latency, the virtual clock: each rank's CPU time on one
timeline, one thread per rank); the rank holding the last chunk answers alone from its
compressed cache, streamed as it comes. Then the table: time to first token and the
whole request against one device, the int8 baselines (``sp`` generates too; ``tp`` and
``ring`` prefill only) and llama.cpp on one device where ``astra bench llamacpp
--build`` has built it; the bytes each device sent; the remote part of the KV cache
beside fp16 keys/values; and whether the answer is one device's, word for word.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional

from ..options import GENERATE_WEIGHTS

DEVICES = 4
PROMPT_TOKENS = 2000
MAX_NEW_TOKENS = 48
BANDWIDTH = 10.0
LATENCY_MS = 0.5
FACT = "pass"  # the topic that answers QUESTION: placed last, right before it
FILLER = ("class", "dynamic-features", "nonlocal", "in", "binary", "shifting", "conversions",
          "atom-literals", "floating")
QUESTION = "According to the Python documentation above, what does the pass statement do?"


def demo_prompt(tokenizer, tokens: int = PROMPT_TOKENS) -> List[int]:
    """The chat-templated prompt, about ``tokens`` tokens: held-out pydoc topics
    (:data:`FILLER`, cut to fit), then the topic that answers the question
    (:data:`FACT`), then :data:`QUESTION`. Held-out: no calibration text."""
    from ..data import pydoc_topics
    topics = pydoc_topics("heldout")
    fact = topics[FACT].strip()
    n_fact = len(tokenizer(fact, add_special_tokens=False)["input_ids"])
    n_q = len(tokenizer(QUESTION, add_special_tokens=False)["input_ids"])
    docs = "\n\n".join(topics[t].strip() for t in FILLER if t in topics)
    ids = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
    content = (tokenizer.decode(ids[:max(0, tokens - n_fact - n_q - 40)]) + "\n\n" + fact
               + "\n\n" + QUESTION)
    out = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                        add_generation_prompt=True, return_dict=False)
    return list(out["input_ids"] if isinstance(out, dict) else out)


def _row(name: str, wire: str, devices: int, ttft_ms: float, decode_tok_s: Optional[float],
         new_tokens: int, sent: int, **extra) -> Dict:
    whole = (ttft_ms + 1e3 * max(new_tokens - 1, 0) / decode_tok_s
             if decode_tok_s else None)
    return dict(strategy=name, wire=wire, devices=devices, ttft_ms=ttft_ms,
                decode_tok_s=decode_tok_s, whole_ms=whole, bytes_per_device=sent, **extra)


def print_table(rows: List[Dict], new_tokens: int) -> None:
    single = next(r for r in rows if r["strategy"] == "single")
    print(f"\n{'':<14}{'N':>3}{'TTFT ms':>10}{'vs single':>11}{'decode tok/s':>14}"
          f"{'request ms':>12}{'vs single':>11}{'bytes/dev':>12}")
    for r in rows:
        w = "" if r["wire"] in ("-", "fp32") else f" {r['wire']}"
        whole = f"{r['whole_ms']:.0f}" if r["whole_ms"] else "-"
        sp2 = (f"{single['whole_ms'] / r['whole_ms']:.2f}x" if r["whole_ms"] and
               single["whole_ms"] else "-")
        dec = f"{r['decode_tok_s']:.1f}" if r["decode_tok_s"] else "-"
        print(f"{r['strategy'] + w:<14}{r['devices']:>3}{r['ttft_ms']:>10.0f}"
              f"{single['ttft_ms'] / r['ttft_ms']:>10.2f}x{dec:>14}{whole:>12}{sp2:>11}"
              f"{r['bytes_per_device']:>12,}")
    print(f"(request: TTFT + {new_tokens - 1} more tokens at the decode rate; Astra and "
          f"one device decode with {GENERATE_WEIGHTS} weights, llama.cpp reads its GGUF's)")


def plot(rows: List[Dict], path: str) -> None:
    """TTFT and whole request per strategy, bars, one device's as the reference line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r["strategy"] + ("" if r["wire"] in ("-", "fp32") else " " + r["wire"])
             for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["ttft_ms"] / 1e3 for r in rows], 0.4, label="TTFT")
    whole = [(x, r["whole_ms"] / 1e3) for x, r in zip(xs, rows) if r["whole_ms"]]
    ax.bar([x + 0.2 for x, _ in whole], [w for _, w in whole], 0.4,
           label="whole request (prefill-only rows: none)")
    ax.set_xticks(list(xs), names, rotation=20)
    ax.set_yscale("log")  # tp over 10 Mbit/s is ~100x the others
    ax.set_ylabel("seconds (log scale)")
    ax.set_title(f"SmolLM2-135M, {rows[0].get('prompt_tokens', '')}-token prompt, "
                 f"{DEVICES} devices, {BANDWIDTH:g} Mbit/s")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _llamacpp_row(tokens: int, new_tokens: int) -> Optional[Dict]:
    """llama.cpp on one device (1 thread, decode after the prompt's depth), measured once
    per binary, model and shape and then reused from the cache (it takes ~a minute and
    is the same program on the same file every time); None when it is not built."""
    import json
    import os

    from ..bench import llamacpp
    from ..cache import cache_path, write_atomic
    from ..catalog.llm import smollm2_path
    binary = llamacpp.llama_bench_path()
    if binary is None:
        return None
    gguf = smollm2_path()
    key = dict(binary=str(binary), mtime=os.path.getmtime(binary), gguf=gguf.name,
               size=gguf.stat().st_size, threads=1, tokens=tokens, gen=new_tokens)
    path = cache_path("llama.cpp", "anchor", key, suffix=".json")
    if path.exists():
        got = json.loads(path.read_text())
    else:
        got = llamacpp.anchor_rows(gguf, 1, tokens, new_tokens, repeats=1, depth=tokens)
        write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(got)))
    return _row("llama.cpp", "-", 1, 1e3 * tokens / got["pp_tok_s"], got["tg_tok_s"],
                new_tokens, 0)


def run(devices: int = DEVICES, plot_path: Optional[str] = "astra-demo.png",
        json_path: Optional[str] = None, new_tokens: int = MAX_NEW_TOKENS) -> Dict:
    """The demo (see the module docstring); returns the rows and the answers."""
    import json
    import statistics
    import sys

    import torch

    from .. import catalog
    from ..catalog import llm
    from ..parallel.links import LinkModel
    from ..parallel.runner import Job, launch
    from ..textgen import TextStream

    t_start = time.monotonic()
    tok = llm.load_tokenizer(llm.smollm2_path())
    ids = torch.tensor([demo_prompt(tok)])
    T = int(ids.shape[1])
    prep = catalog.prepare("smollm2", T)
    print(f"SmolLM2-135M-Instruct, a {T}-token prompt (Python docs + a question), {devices} "
          f"devices, shared {BANDWIDTH:g} Mbit/s link, {LATENCY_MS} ms latency, virtual "
          "clock, one thread per rank")
    link = LinkModel(BANDWIDTH, LATENCY_MS)
    gen = dict(do_sample=False)
    # the planner sizes Astra's chunks (the ranks prefill all but the last prompt token)
    from ..parallel import planner, probe
    plan = planner.plan(probe.compute_cost(prep.spec, ids[:, :-1], prep.codebooks,
                                           progress=True),
                        [1.0] * devices, link)
    print(plan.line())
    chunks = plan.chunks if plan.strategy == "astra" and len(plan.devices) == devices else None

    def job(s, wire="fp32", generate=True):
        return Job(s, ids, wire=wire, codebooks=prep.codebooks if s == "astra" else None,
                   chunks=chunks if s == "astra" else None,
                   output="compact", link=link, clock="virtual", timeout_s=900.0,
                   max_new_tokens=new_tokens if generate else 0, generation=gen,
                   decode_weights=GENERATE_WEIGHTS)
    jobs = [job("astra"), job("single"), job("sp", "int8"), job("tp", "int8", False),
            job("ring", "int8", False)]
    shown = []  # the first pass is Astra's answer: streamed

    def show(text):
        if len(shown) == 0:
            sys.stdout.write(text)
            sys.stdout.flush()
    stream = TextStream(tok, show)

    def on_ids(got):
        if not got:
            shown.append(True)
        stream(got)
    print("\nanswer (astra, streamed from the last device):")
    results = launch(prep.spec, jobs, devices, stream=on_ids)
    print()
    rows, answers = [], {}
    for j, res in zip(jobs, results):
        sent = max(max(r["bytes_sent"]) if r["bytes_sent"] else 0 for r in res)
        g = next((r["generation"] for r in res if r.get("generation")), None)
        n = 1 if j.strategy == "single" else devices
        if g is None:  # prefill only: TTFT = the prefill (the last rank's clock)
            rows.append(_row(j.strategy, j.wire, n, 1e3 * statistics.median(res[0]["times"]),
                             None, new_tokens, sent))
            continue
        answers[j.strategy] = g["tokens"].tolist()
        if j.strategy == "astra" and chunks:
            print(f"astra prefill: predicted {plan.predicted_s * 1e3:.0f} ms, measured "
                  f"{g['prefill_s'] * 1e3:.0f} ms")
        rows.append(_row(j.strategy, j.wire, n, g["ttft_s"] * 1e3, g["decode_tok_s"],
                         g["new_tokens"], 0 if j.strategy == "single" else sent,
                         remote_kv_bytes=g["remote_kv_bytes"],
                         remote_kv_fp16_bytes=g["remote_kv_fp16_bytes"]))
    rows.sort(key=lambda r: ["single", "astra", "sp", "tp", "ring"].index(r["strategy"]))
    cpp = _llamacpp_row(T, new_tokens)
    if cpp:
        rows.insert(1, cpp)
    for r in rows:
        r["prompt_tokens"] = T
    print_table(rows, new_tokens)
    a = next(r for r in rows if r["strategy"] == "astra")
    print(f"remote KV cache on the answering device: {a['remote_kv_bytes']:,} bytes; fp16 "
          f"K/V of the same tokens {a['remote_kv_fp16_bytes']:,} "
          f"({a['remote_kv_fp16_bytes'] / max(a['remote_kv_bytes'], 1):.0f}x smaller)")
    same = answers.get("astra") == answers.get("single")
    print(f"the answer is one device's, token for token: {'yes' if same else 'no'}")
    if not same:
        print("one device answered: " + tok.decode(answers["single"], skip_special_tokens=True))
    if not cpp:
        print("(llama.cpp row: build it once with `astra bench llamacpp --build`)")
    if plot_path:
        plot(rows, plot_path)
        print(f"plot: {plot_path}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(rows=rows, answers=answers, same=same), f, indent=1)
    print(f"demo took {time.monotonic() - t_start:.0f} s")
    return dict(rows=rows, answers=answers, same=same)

"""``astra bench e2e``: end-to-end latency of single / tp / sp / astra across N ranks.

Real processes exchange real bytes (:mod:`astra.parallel.runner`); the link is
emulated on top of the real transfers (``--link emulated``: waits in wall-clock time),
combined with each rank's CPU time on one timeline (``--link virtual``: for more ranks
than cores), or real (``--link netns``: namespaces + veth + tbf; latency added in the
application). Printed beside every speedup: the bound ``N / (1 + N·L·latency / T1)``
(every layer needs the other devices' codes for that layer: L one-way latencies in
sequence). Models and their codebooks come from :mod:`astra.catalog`.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

from ..options import GENERATE_WEIGHTS


def bound(N: int, L: int, latency_s: float, t1: float) -> float:
    """Upper bound on the speedup: N / (1 + N·L·latency / T1)."""
    return N / (1 + N * L * latency_s / t1)


# ---------------------------------------------------------------------------- bench

def run_grid(name: str, devices: int, bandwidths: List[float], latency_ms: float,
             strategies: List[str], wires: List[str], link: str = "emulated",
             tokens: int = 256, repeats: int = 3, timeout_s: float = 300.0,
             setup_result=None, quiet: bool = False, medium: str = "shared",
             warmup: int = 1, decode_tokens: int = 0,
             speeds: Optional[List[float]] = None,
             decode_weights: Sequence[str] = (GENERATE_WEIGHTS,)) -> List[dict]:
    """Every strategy (sp/tp/ring once per wire) at every bandwidth on ``devices`` ranks;
    the rows, printed as a table unless ``quiet``. ``setup_result``: a
    :class:`astra.catalog.Prepared` to reuse (default: :func:`astra.catalog.prepare`).
    ``decode_tokens`` (causal LMs): also generate that many tokens after the prompt by
    ``single`` and ``astra`` at the first bandwidth (rows with ``decode_tok_s``, the
    time to first token ``ttft_ms`` and the whole request ``request_ms``), once per
    entry of ``decode_weights`` (``fp32``/``int8``: the weights a decode step reads).
    ``"auto"`` among the strategies: the planner's choice at each bandwidth, run on the
    devices it picks (rows carry ``"plan"``: strategy, devices, chunks, predicted_ms).
    ``speeds``: each rank's emulated speed (``--device-speeds``; default all 1)."""
    from astra import catalog
    from astra.parallel.links import LinkModel
    from astra.parallel.runner import Job, check_chunks, launch, summarize
    prep = setup_result or catalog.prepare(name, tokens, with_codebooks=bool(
        {"astra", "auto"} & set(strategies)), check=lambda n: check_chunks(None, n, devices))
    spec, inputs, cbs, L = prep.spec, prep.inputs, prep.codebooks, prep.num_layers
    clock = "virtual" if link == "virtual" else "wall"
    jobs, keys = [], []
    for bw in bandwidths:
        lk = LinkModel(bw, latency_ms, medium=medium)
        for s in strategies:
            if s == "auto":
                continue
            for w in (wires if s in WIRED else ["-"]):
                if s == "single" and bw != bandwidths[0]:
                    continue
                jobs.append(Job(s, inputs, wire=w if w != "-" else "fp32",
                                codebooks=cbs if s == "astra" else None, output="compact",
                                link=lk, link_mode="latency" if link == "netns" else "model",
                                clock=clock, repeats=repeats, warmup=warmup, timeout_s=timeout_s))
                keys.append((bw, s, w))
    gen_keys = []
    for s in (("single", "astra") if decode_tokens else ()):
        for dw in (decode_weights if s in strategies else ()):
            jobs.append(Job(s, inputs, codebooks=cbs if s == "astra" else None, output="compact",
                            link=LinkModel(bandwidths[0], latency_ms, medium=medium),
                            clock=clock, repeats=1, warmup=0, timeout_s=timeout_s,
                            max_new_tokens=decode_tokens, decode_weights=dw,
                            generation=dict(do_sample=False, min_new_tokens=decode_tokens)))
            gen_keys.append((bandwidths[0], s, dw))
    if link == "netns":
        if gen_keys or "auto" in strategies:
            raise ValueError("--decode and the auto strategy run on the emulated or virtual "
                             "link")
        from astra.parallel.netns import NetnsLab
        if len(bandwidths) != 1:
            rows = []
            for bw in bandwidths:
                rows += run_grid(name, devices, [bw], latency_ms, strategies, wires, link, tokens,
                                 repeats, timeout_s, prep, quiet=True,
                                 medium=medium, warmup=warmup)
            return _finish_rows(rows, quiet)
        with NetnsLab(devices, bandwidths[0]) as lab:
            results = launch(spec, jobs, devices, netns=lab)
    else:
        results = launch(spec, jobs, devices, speeds=speeds) if jobs else []
    tokens_ = int(inputs.shape[1]) if inputs.dim() == 2 else None
    rows = [table_row(name, key, summarize(res), devices, latency_ms, link, tokens=tokens_,
                      medium=medium)
            for key, res in zip(keys, results)]
    if "auto" in strategies:
        rows += auto_rows(prep, name, devices, bandwidths, latency_ms, link, medium, repeats,
                          warmup, timeout_s, speeds or [1.0] * devices, tokens=tokens_)
    add_speedups(rows, devices, L, latency_ms)
    gen_rows = [decode_row(name, key, res, devices, decode_tokens)
                for key, res in zip(gen_keys, results[len(keys):])]
    if gen_rows:
        gen_rows.append(hf_generate_anchor(spec, inputs, decode_tokens))
    out = _finish_rows(rows, quiet)
    if gen_rows and not quiet:
        print_decode(gen_rows)
    return out + gen_rows


WIRED = ("sp", "tp", "ring")  # the strategies whose bytes --wire sets


def auto_rows(prep, name: str, devices: int, bandwidths: List[float], latency_ms: float,
              link: str, medium: str, repeats: int, warmup: int, timeout_s: float,
              speeds: List[float], **extra) -> List[dict]:
    """``auto`` at every bandwidth: the planner's plan (from the model's measured costs,
    :mod:`astra.parallel.probe`), run on the devices it picks; one launch per device
    count. Rows as :func:`table_row` with ``"plan"``."""
    from astra.parallel import planner, probe
    from astra.parallel.links import LinkModel
    from astra.parallel.runner import Job, launch, summarize
    cost = probe.compute_cost(prep.spec, prep.inputs, prep.codebooks)
    clock = "virtual" if link == "virtual" else "wall"
    plans = {bw: planner.plan(cost, speeds, LinkModel(bw, latency_ms, medium=medium))
             for bw in bandwidths}
    rows = []
    for world in sorted({len(p.devices) for p in plans.values()}):
        group = [(bw, p) for bw, p in plans.items() if len(p.devices) == world]
        jobs = [Job(p.strategy, prep.inputs, codebooks=prep.codebooks, chunks=p.chunks,
                    output="compact", link=LinkModel(bw, latency_ms, medium=medium),
                    clock=clock, repeats=repeats, warmup=warmup, timeout_s=timeout_s)
                for bw, p in group]
        # all groups share the fastest devices' speeds in the plan's rank order
        res = launch(prep.spec, jobs, world, speeds=group[0][1].speeds)
        for (bw, p), r in zip(group, res):
            row = table_row(name, (bw, "auto", "-"), summarize(r), world, latency_ms, link,
                            medium=medium, **extra)
            row["plan"] = p.as_dict()
            rows.append(row)
    return rows


def hf_generate_anchor(spec, inputs, new_tokens: int) -> dict:
    """The plain HF model (unpatched, its SDPA attention and dynamic cache), one thread,
    in this process: ``generate`` after the prompt, timed like the generation jobs
    (prefill of all but the last prompt token, then the decode) — the anchor the decode
    rows are read against."""
    import time

    import torch
    from transformers.cache_utils import DynamicCache

    from astra.generation import cache_kw
    model = spec.build()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            kw = {cache_kw(model): DynamicCache()}
            t0 = time.perf_counter()
            model(inputs[:, :-1], use_cache=True, logits_to_keep=1, **kw)
            t1 = time.perf_counter()
            model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           pad_token_id=0, **kw)
            t2 = time.perf_counter()
    finally:
        torch.set_num_threads(threads)
    return dict(model="hf", strategy="hf generate", wire="decode", devices=1, decode_weights="fp32",
                bandwidth_mbps=0.0, ttft_ms=None, prefill_ms=(t1 - t0) * 1e3,
                decode_tok_s=new_tokens / (t2 - t1), new_tokens=new_tokens,
                request_ms=(t2 - t0) * 1e3, remote_kv_bytes=0, remote_kv_fp16_bytes=0)


def decode_row(model: str, key, res: List[dict], devices: int, new_tokens: int) -> dict:
    """A generation job's row: TTFT, decode tokens/s, the whole request, the cache;
    ``key = (bandwidth, strategy, decode weights)``."""
    bw, s, dw = key
    g = next(r["generation"] for r in res if r.get("generation"))
    request = g["ttft_s"] + max(g["new_tokens"] - 1, 0) / g["decode_tok_s"] \
        if g["decode_tok_s"] else g["ttft_s"]
    return dict(model=model, strategy=s, wire="decode", devices=1 if s == "single" else devices,
                bandwidth_mbps=bw, ttft_ms=g["ttft_s"] * 1e3, decode_tok_s=g["decode_tok_s"],
                new_tokens=g["new_tokens"], request_ms=request * 1e3, decode_weights=dw,
                tokens=g["tokens"].tolist(),
                remote_kv_bytes=g["remote_kv_bytes"],
                remote_kv_fp16_bytes=g["remote_kv_fp16_bytes"])


def print_decode(rows: List[dict]) -> None:
    """The generation rows, decode rates against one device (the fused kernels) and
    against HF's own ``generate`` (the anchor)."""
    hf = next((r for r in rows if r["strategy"] == "hf generate"), None)

    def single(r):  # one device with the same decode weights
        return next((s for s in rows if s["strategy"] == "single"
                     and s["decode_weights"] == r["decode_weights"]), None)

    def ratio(r, ref):
        return f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}x" if ref else "-"
    print(f"\n{'decode':<12}{'weights':>8}{'N':>3}{'TTFT ms':>10}{'tok/s':>8}{'vs single':>11}"
          f"{'vs HF':>8}{'request ms':>12}{'remote KV B':>13}{'fp16 K/V B':>13}")
    for r in rows:
        ttft = f"{r['ttft_ms']:.0f}" if r["ttft_ms"] is not None else "-"
        print(f"{r['strategy'][:12]:<12}{r['decode_weights']:>8}{r['devices']:>3}{ttft:>10}"
              f"{r['decode_tok_s']:>8.1f}{ratio(r, single(r)):>11}{ratio(r, hf):>8}"
              f"{r['request_ms']:>12.0f}"
              f"{r['remote_kv_bytes']:>13,}{r['remote_kv_fp16_bytes']:>13,}")


def table_row(model: str, key, summary: dict, devices: int, link_latency_ms: float, link: str,
              **extra) -> dict:
    """One printed row: ``key = (bandwidth, strategy, wire)`` and the job's summary."""
    bw, s, w = key
    return dict(model=model, strategy=s, wire=w, devices=1 if s == "single" else devices,
                bandwidth_mbps=bw, latency_ms=summary["latency_s"] * 1e3,
                link_latency_ms=link_latency_ms, bytes_per_device=summary["bytes_per_device"],
                link=link, link_wait_ms=summary["wait_s"] * 1e3,
                times_ms=[t * 1e3 for t in summary["times"]], **extra)


def add_speedups(rows: List[dict], devices: int, layers: int, latency_ms: float) -> None:
    """Each row's speedup over the ``single`` row and its bound (none without a single row)."""
    t1 = next((r["latency_ms"] / 1e3 for r in rows if r["strategy"] == "single"), None)
    if not t1:
        return
    for r in rows:
        r["speedup"] = t1 / (r["latency_ms"] / 1e3)
        r["bound"] = 1.0 if r["strategy"] == "single" else bound(devices, layers,
                                                                  latency_ms / 1e3, t1)


def _finish_rows(rows, quiet):
    if not quiet:
        print_table(rows)
    return rows


def print_table(rows: List[dict]) -> None:
    print(f"{'model':<9}{'strategy':<9}{'wire':<6}{'N':>3}{'Mbit/s':>8}{'latency ms':>12}"
          f"{'speedup':>9}{'bound':>7}{'bytes/dev':>12}")
    for r in rows:
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        bd = f"{r['bound']:.2f}" if "bound" in r else "-"
        print(f"{r['model']:<9}{r['strategy']:<9}{r['wire']:<6}{r['devices']:>3}"
              f"{r['bandwidth_mbps']:>8g}{r['latency_ms']:>12.1f}{sp:>9}{bd:>7}"
              f"{r['bytes_per_device']:>12.0f}")
    for r in rows:
        if "plan" in r:
            p = r["plan"]
            what = ("one device" if p["strategy"] == "single" else
                    f"astra on {len(p['devices'])} (chunks {','.join(map(str, p['chunks']))})")
            print(f"auto at {r['bandwidth_mbps']:g} Mbit/s: {what}, predicted "
                  f"{p['predicted_ms']:.1f} ms, measured {r['latency_ms']:.1f} ms")
    over = [r for r in rows if "speedup" in r and "bound" in r
            and r["speedup"] > r["bound"] * 1.001]
    if over:  # impossible for a real speedup: the single-device time was inflated
        print(f"note: {len(over)} speedup(s) above their bound: the single-device run was "
              "slowed (other load on the machine?); rerun when the machine is idle")


def plot(rows: List[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    series = {}
    rows = [r for r in rows if "latency_ms" in r]  # generation rows have their own table
    for r in rows:
        series.setdefault(f"{r['strategy']}" + (f" {r['wire']}" if r["wire"] != "-" else ""),
                          []).append((r["bandwidth_mbps"], r["latency_ms"]))
    bws = sorted({r["bandwidth_mbps"] for r in rows})
    for name, pts in series.items():
        pts.sort()
        if name == "single":
            pts = [(b, pts[0][1]) for b in bws]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bandwidth (Mbit/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"{rows[0]['model']}, N={max(r['devices'] for r in rows)}")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


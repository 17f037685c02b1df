"""``astra demo --model minilm``: sentence embeddings across devices.

Real all-MiniLM-L6-v2 weights (BERT, 6 layers, D=384), long passages (512 tokens) of
the embedded pydoc text, 4 devices on an emulated 10 Mbit/s shared link (0.5 ms one-way
latency; the virtual clock when this machine has fewer cores than devices), Astra
against ``single``, ``tp`` and ``sp`` (fp32 and int8 on the wire). Codebooks
(:func:`demo_codebooks`: K=1024 in every layer, 10 bits per token, and two residual
stages more in the last layer, whose errors no later layer absorbs: 30 bits there,
13⅓ bits per token on average) are calibrated by k-means on the calibration split on
first use and cached under :func:`astra.cache.cache_dir`. Prints the speed table and the
embedding fidelity (cosine of the mean-pooled sentence embedding against one device)
and writes the latency-vs-bandwidth plot.
"""
from __future__ import annotations

import os
import time
from typing import Optional

DEVICES = 4
TOKENS = 512
BANDWIDTHS = (10.0, 100.0, 500.0)
LATENCY_MS = 0.5


DEMO_METHOD = dict(codebook_size=1024, layer_stages=((-1, (1024, 1024)),), iters=8)


def demo_codebooks(model, devices: int = DEVICES, progress: bool = True):
    """The demo's codebooks: k-means, K=1024 per layer plus two residual stages of 1024
    in the last layer (10 bits per token in layers 0-4, 30 in the last), calibrated
    once on :func:`astra.catalog.inputs.minilm_calibration` and cached. The last
    layer's errors are the ones no later layer absorbs, so the extra bits go there
    (the comparison with plain 10-bit codebooks is in bench/RESULTS.md)."""
    from ..calibrate import Method, calibrate
    from ..catalog.inputs import minilm_calibration
    calib = minilm_calibration(tokens=TOKENS)
    batches = [calib[i:i + 4] for i in range(0, len(calib), 4)]
    log = print if progress else (lambda s: None)
    return calibrate(model, batches, Method(**DEMO_METHOD), devices=devices,
                     progress=progress, log=log)


def _describe(cbs) -> str:
    bits = [cbs.layer_bits(i) for i in range(cbs.num_layers)]
    per = (f"{bits[0]} bits/token" if len(set(bits)) == 1 else
           f"{bits[0]} bits/token in layers 0-{len(bits) - 2}, {bits[-1]} in the last, "
           f"{sum(bits) / len(bits):.3g} on average")
    st = cbs.stages(cbs.num_layers - 1)
    kind = (f"G={cbs.groups} K={cbs.codebook_size}" if st is None else
            f"K={cbs.codebook_size}, {len(st) - 1} residual stages more in the last layer")
    return f"{kind} ({per})"


def run(devices: int = DEVICES, bandwidths=BANDWIDTHS, latency_ms: float = LATENCY_MS,
        plot_path: Optional[str] = "astra-demo.png", json_path: Optional[str] = None) -> dict:
    import json

    import torch

    from .. import catalog
    from ..bench import e2e
    from ..catalog.inputs import minilm_inputs
    from ..parallel.links import LinkModel
    from ..parallel.runner import Job, launch, summarize

    t_start = time.monotonic()
    spec = catalog.ModelSpec(catalog.factories.minilm)
    model = spec.build()
    L = catalog.num_layers(model)
    cbs = demo_codebooks(model, devices)
    inputs = minilm_inputs(TOKENS, batch=1)
    cores = os.cpu_count() or 1
    clock = "virtual" if cores < devices else "wall"
    print(f"MiniLM-L6 (real weights), {inputs.shape[1]} tokens, {devices} devices, "
          f"shared link, {latency_ms} ms one-way latency, {clock} clock "
          f"({cores} cores); codebooks {_describe(cbs)}")
    jobs, keys = [], []
    for bw in bandwidths:
        lk = LinkModel(bw, latency_ms)
        for s, w in [("single", "-"), ("tp", "fp32"), ("tp", "int8"), ("sp", "fp32"),
                     ("sp", "int8"), ("astra", "-")]:
            if s == "single" and bw != bandwidths[0]:
                continue
            jobs.append(Job(s, inputs, wire="fp32" if w == "-" else w, output="compact",
                            codebooks=cbs if s == "astra" else None, link=lk, clock=clock,
                            # single is the noisiest row and the cheapest: more repeats
                            repeats=7 if s == "single" else 3, warmup=1, timeout_s=300))
            keys.append((bw, s, w))
    results = launch(spec, jobs, devices)
    rows = [e2e.table_row("minilm", key, summarize(res), devices, latency_ms, clock)
            for key, res in zip(keys, results)]
    outs = {key: res[0]["output"] for key, res in zip(keys, results)}
    e2e.add_speedups(rows, devices, L, latency_ms)
    e2e.print_table(rows)
    ref = outs[(bandwidths[0], "single", "-")]
    print("\nembedding fidelity (cosine of the sentence embedding vs one device):")
    for key in [(bandwidths[0], "tp", "int8"), (bandwidths[0], "sp", "int8"),
                (bandwidths[0], "astra", "-")]:
        cos = torch.nn.functional.cosine_similarity(outs[key], ref).mean().item()
        print(f"  {key[1]:<6}{key[2]:<5} {cos:.4f}")
        for r in rows:
            if (r["bandwidth_mbps"], r["strategy"], r["wire"]) == key:
                r["cosine"] = cos
    # fidelity on more passages, same codebooks, simulate mode (one process)
    import astra
    more = minilm_inputs(TOKENS, batch=8)
    with torch.no_grad():
        a = model(more).last_hidden_state.mean(1)
        astra.patch(model, cbs, devices=devices)
        try:
            b = model(more).last_hidden_state.mean(1)
        finally:
            astra.unpatch(model)
    cs = torch.nn.functional.cosine_similarity(a, b)
    print(f"  astra on {len(cs)} held-out passages (simulate mode): mean {cs.mean():.4f}, "
          f"min {cs.min():.4f}")
    if plot_path:
        e2e.plot(rows, plot_path)
        print(f"plot: {plot_path}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"demo took {time.monotonic() - t_start:.0f} s")
    return dict(rows=rows, cosine_sim=cs.tolist())


"""Scaling of Astra with GPT-2 (small architecture, random weights): latency for
N = 1, 2, 4, 8 ranks and sequence lengths 256..4096 on the virtual clock (per-rank CPU
time + the link model), 10 Mbit/s shared link, 0.5 ms one-way latency.

    .venv/bin/python bench/scaling_gpt2.py [--json PATH]
"""
import argparse
import json

import torch

from astra import catalog
from astra.catalog import factories
from astra.parallel.links import LinkModel
from astra.parallel.runner import Job, ModelSpec, launch, summarize


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="bench/results/gpt2-scaling-virtual.json")
    ap.add_argument("--tokens", default="256,1024,4096")
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument("--bandwidth", type=float, default=10.0)
    a = ap.parse_args()
    Ts = [int(t) for t in a.tokens.split(",")]
    spec = ModelSpec(factories.gpt2_small, dict(positions=max(Ts)))
    model = spec.build()
    gen = torch.Generator().manual_seed(0)
    inputs = {T: torch.randint(0, 50257, (1, T), generator=gen) for T in Ts}
    with torch.no_grad():
        calib = torch.randint(0, 50257, (5, 256), generator=torch.Generator().manual_seed(1))
        cbs = catalog.quick_codebooks(model, calib)  # k-means on 1280 rows (K=1024)
    del model
    lk = LinkModel(a.bandwidth, 0.5)
    rows = []
    for N in [int(n) for n in a.devices.split(",")]:
        strat = "single" if N == 1 else "astra"
        jobs = [Job(strat, inputs[T], codebooks=cbs if N > 1 else None, output="compact",
                    link=lk, clock="virtual", repeats=1, warmup=0 if T > 1024 else 1,
                    timeout_s=600) for T in Ts]
        for T, res in zip(Ts, launch(spec, jobs, N)):
            sm = summarize(res)
            rows.append(dict(model="gpt2", strategy=strat, devices=N, tokens=T,
                             bandwidth_mbps=a.bandwidth, latency_ms=sm["latency_s"] * 1e3,
                             link_wait_ms=sm["wait_s"] * 1e3,
                             bytes_per_device=sm["bytes_per_device"],
                             wire="-", link="virtual"))
            print(rows[-1], flush=True)
    t1 = {r["tokens"]: r["latency_ms"] for r in rows if r["devices"] == 1}
    Ns = sorted({r['devices'] for r in rows})
    print(f"\n{'T':>6}" + "".join(f"{'N=' + str(n):>16}" for n in Ns))
    for T in Ts:
        line = f"{T:>6}"
        for r in sorted((r for r in rows if r["tokens"] == T), key=lambda r: r["devices"]):
            line += f"{r['latency_ms']:>9.0f} ms {t1[T] / r['latency_ms']:>4.2f}x"
        print(line)
    with open(a.json, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

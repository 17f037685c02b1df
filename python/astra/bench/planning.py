"""``astra bench plan``: does the planner choose well, does its model predict, does a
request survive a device dropping out.

- :func:`grid`: over links (bandwidth × one-way latency) × models × tokens, on the
  virtual clock: ``single`` (one rank, alone), ``astra`` over 2..N devices with the
  default chunks, and ``auto`` (the plan, run on the devices it picks). Each cell says
  whether ``auto`` is within 5% of the better of ``single`` and the best ``astra``
  split, and every measured configuration's predicted time beside its measured one.
  ``auto``'s plan runs in the same launch as the default splits over as many devices
  (the machine's state drifts between launches: the same job in two launches differs
  by a median 5%, up to 30%, on the 2-core machine here); a plan that is a job already
  measured (one device; or a split with the default chunks) is that measurement.
- :func:`hetero`: devices of speeds 1, 1, 0.5, 0.25 on a causal LLM: equal chunks over
  all of them against ``auto``.
- :func:`dropout`: one of 4 ranks dies mid-prefill (wall clock): the request completes
  on the others; the detection time, the re-run, and a clean run of the same re-plan.
- :func:`wall`: predicted against measured on the wall clock, as many ranks as cores
  (not in the default parts).
"""
from __future__ import annotations

import statistics
import time
from typing import Dict, List, Optional, Sequence, Tuple

LINKS = [(bw, lat) for bw in (1.0, 10.0, 100.0) for lat in (0.5, 5.0, 20.0)]
WALL_CELLS = [("minilm", 512), ("gpt2", 512), ("smollm2", 512)]
WALL_LINKS = [(10.0, 0.5), (100.0, 5.0), (1.0, 20.0)]
CELLS = [("minilm", 128), ("minilm", 512), ("gpt2", 128), ("gpt2", 512),
         ("smollm2", 128), ("smollm2", 512), ("smollm2", 2048)]


def _median(res) -> float:
    from astra.parallel.runner import summarize
    return summarize(res)["latency_s"]


def _cell(name: str, T: int, clock: str, repeats: int, warmup: int):
    """A cell's prepared model, its (cached) cost, the jobs' options and the one-device
    time: ``(prep, cost, job kwargs, single seconds)``."""
    from astra import catalog
    from astra.parallel import probe
    from astra.parallel.runner import Job, launch
    prep = catalog.prepare(name, T)
    cost = probe.compute_cost(prep.spec, prep.inputs, prep.codebooks)
    kw = dict(output="compact", clock=clock, repeats=repeats, warmup=warmup, timeout_s=600.0)
    return prep, cost, kw, _median(launch(prep.spec, [Job("single", prep.inputs, **kw)], 1)[0])


def grid(cells: Sequence[Tuple[str, int]] = CELLS, links=LINKS, devices: int = 4,
         repeats: int = 1, warmup: int = 1, progress: bool = True) -> List[Dict]:
    """One row per (model, tokens, link); see the module docstring."""
    from tqdm import tqdm

    from astra.parallel import planner
    from astra.parallel.costmodel import predict_astra, predict_single
    from astra.parallel.links import LinkModel
    from astra.parallel.runner import Job, default_chunks, launch
    rows = []
    bar = tqdm(total=len(cells), desc="plan grid", disable=not progress)
    for name, T in cells:
        prep, cost, kw, single_s = _cell(name, T, "virtual", repeats, warmup)
        lks = [LinkModel(bw, lat) for bw, lat in links]
        plans = [planner.plan(cost, [1.0] * devices, lk) for lk in lks]
        astra: Dict[int, List[float]] = {}
        chunks: Dict[int, List[int]] = {}
        auto: List[Optional[float]] = [single_s if p.strategy == "single" else None
                                       for p in plans]
        worlds = sorted(set(range(2, devices + 1) if T < 2048 else (2, devices)) |
                        {len(p.devices) for p in plans if p.strategy == "astra"})
        for N in worlds:
            chunks[N] = default_chunks(prep.content_tokens, N, _apk(cost))
            # a plan over N devices runs in the same launch as the default splits over N
            # (the same machine state); one with the default chunks is that job
            own = [i for i, p in enumerate(plans) if p.strategy == "astra"
                   and len(p.devices) == N and p.chunks != chunks[N]]
            jobs = [Job("astra", prep.inputs, codebooks=prep.codebooks, chunks=chunks[N],
                        link=lk, **kw) for lk in lks]
            jobs += [Job("astra", prep.inputs, codebooks=prep.codebooks,
                         chunks=plans[i].chunks, link=lks[i], **kw) for i in own]
            got = [_median(r) for r in launch(prep.spec, jobs, N)]
            astra[N] = got[:len(lks)]
            for i, t in zip(own, got[len(lks):]):
                auto[i] = t
            for i, p in enumerate(plans):
                if p.strategy == "astra" and len(p.devices) == N and auto[i] is None:
                    auto[i] = astra[N][i]
        for i, ((bw, lat), lk) in enumerate(zip(links, lks)):
            best_n = min(astra, key=lambda N: astra[N][i])
            ref = min(single_s, astra[best_n][i])
            predicted = dict(single=predict_single(cost) * 1e3)
            predicted.update({f"astra{N}": predict_astra(cost, chunks[N], [1.0] * N, lk) * 1e3
                              for N in astra})
            measured = dict(single=single_s * 1e3)
            measured.update({f"astra{N}": astra[N][i] * 1e3 for N in astra})
            if plans[i].strategy == "astra":
                predicted["auto"] = plans[i].predicted_s * 1e3
                measured["auto"] = auto[i] * 1e3
            rows.append(dict(model=name, tokens=T, bandwidth_mbps=bw, latency_ms=lat,
                             single_ms=single_s * 1e3, best_astra_ms=astra[best_n][i] * 1e3,
                             best_astra_devices=best_n, auto_ms=auto[i] * 1e3,
                             plan=plans[i].as_dict(), auto_vs_best=auto[i] / ref,
                             auto_vs_single=auto[i] / single_s,
                             predicted_ms=predicted, measured_ms=measured))
        bar.update()
    bar.close()
    return rows


def _apk(cost) -> float:
    """The causal weight of :func:`astra.parallel.job.default_chunks` from a cost."""
    if not cost.causal or not cost.astra.per_token_s:
        return 0.0
    return cost.astra.per_pair_s / cost.astra.per_token_s


def prediction_errors(rows: List[Dict]) -> List[float]:
    """|predicted / measured - 1| of every measured configuration of the grid."""
    return [abs(r["predicted_ms"][k] / r["measured_ms"][k] - 1)
            for r in rows for k in r["measured_ms"]]


def print_grid(rows: List[Dict]) -> None:
    print(f"{'model':<8}{'T':>5}{'Mbit/s':>7}{'lat ms':>7}{'single':>9}{'best astra':>12}"
          f"{'auto':>9}  {'plan':<22}{'auto/best':>10}{'pred err':>9}")
    for r in rows:
        p = r["plan"]
        plan = "single" if p["strategy"] == "single" else f"astra x{len(p['devices'])}"
        err = statistics.median(prediction_errors([r]))
        print(f"{r['model']:<8}{r['tokens']:>5}{r['bandwidth_mbps']:>7g}{r['latency_ms']:>7g}"
              f"{r['single_ms']:>9.0f}{r['best_astra_ms']:>9.0f} x{r['best_astra_devices']}"
              f"{r['auto_ms']:>9.0f}  {plan:<22}{r['auto_vs_best']:>9.2f}x{err:>8.0%}")
    ok = sum(r["auto_vs_best"] <= 1.05 for r in rows)
    slow = sum(r["auto_vs_single"] > 1.05 for r in rows)
    errs = prediction_errors(rows)
    print(f"auto within 5% of the better of single and the best astra split: {ok}/{len(rows)} "
          f"cells (worst {max(r['auto_vs_best'] for r in rows):.2f}x); slower than single by "
          f"more than 5%: {slow}; prediction error median {statistics.median(errs):.1%}, "
          f"max {max(errs):.0%} over {len(errs)} runs")


def hetero(name: str = "smollm2", tokens: int = 2048, speeds=(1.0, 1.0, 0.5, 0.25),
           bandwidth: float = 10.0, latency_ms: float = 0.5, repeats: int = 1,
           warmup: int = 1) -> Dict:
    """Equal chunks over every device against ``auto`` (virtual clock)."""
    from astra import catalog
    from astra.parallel import planner, probe
    from astra.parallel.links import LinkModel
    from astra.parallel.runner import Job, launch
    prep = catalog.prepare(name, tokens)
    cost = probe.compute_cost(prep.spec, prep.inputs, prep.codebooks)
    lk = LinkModel(bandwidth, latency_ms)
    kw = dict(output="compact", clock="virtual", repeats=repeats, warmup=warmup, link=lk,
              timeout_s=900.0, codebooks=prep.codebooks)
    n, W = prep.content_tokens, len(speeds)
    equal = [n // W + (r < n % W) for r in range(W)]
    eq_s = _median(launch(prep.spec, [Job("astra", prep.inputs, chunks=equal, **kw)], W,
                          speeds=list(speeds))[0])
    p = planner.plan(cost, list(speeds), lk)
    if p.strategy == "single":
        auto_s = _median(launch(prep.spec, [Job("single", prep.inputs, **kw)], 1,
                                speeds=p.speeds)[0])
    else:
        auto_s = _median(launch(prep.spec, [Job("astra", prep.inputs, chunks=p.chunks, **kw)],
                                len(p.devices), speeds=p.speeds)[0])
    return dict(model=name, tokens=tokens, speeds=list(speeds), bandwidth_mbps=bandwidth,
                latency_ms=latency_ms, equal_chunks=equal, equal_ms=eq_s * 1e3,
                plan=p.as_dict(), auto_ms=auto_s * 1e3, ratio=auto_s / eq_s)


def dropout(name: str = "minilm", tokens: int = 512, devices: int = 4, lost: int = 2,
            after_s: float = 0.1, bandwidth: float = 10.0, latency_ms: float = 0.5,
            repeats: int = 3) -> Dict:
    """Rank ``lost`` dies ``after_s`` into its first pass (wall clock); the request is
    re-planned and completes on the others. Returns the times: from the death to the
    launcher's verdict (detection), the whole request, and a clean run of the re-plan."""
    import os
    import tempfile

    from astra import catalog
    from astra.parallel import planner, probe
    from astra.parallel.links import LinkModel
    from astra.parallel.runner import Job, launch
    from astra.parallel.survive import report, run_planned
    prep = catalog.prepare(name, tokens)
    cost = probe.compute_cost(prep.spec, prep.inputs, prep.codebooks)
    lk = LinkModel(bandwidth, latency_ms)
    speeds = [1.0] * devices
    # every device takes part (the failure must hit the plan's ranks)
    first = planner.plan(cost, speeds, lk, devices=range(devices))
    if len(first.devices) < devices:
        raise ValueError(f"the plan uses {len(first.devices)} devices, not {devices}")
    marks: Dict[str, float] = {}

    def attempt(p, tries):
        job = Job(p.strategy, prep.inputs, codebooks=prep.codebooks, chunks=p.chunks,
                  output="compact", link=lk, repeats=repeats, warmup=0, timeout_s=30.0,
                  fault=f"die:{lost}@{after_s}" if tries == 0 else None)
        if tries:
            marks["verdict"] = time.time()
        return launch(prep.spec, [job], len(p.devices))

    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "fault.log")
        os.environ["ASTRA_FAULT_LOG"] = log
        try:
            t0 = time.time()
            res, plan, losses = run_planned(
                first, attempt, lambda alive: planner.plan(cost, speeds, lk, devices=alive),
                range(devices))
            t_end = time.time()
        finally:
            del os.environ["ASTRA_FAULT_LOG"]
        fired = float(open(log).read().split()[0])
    t1 = time.time()
    clean = launch(prep.spec, [Job(plan.strategy, prep.inputs, codebooks=prep.codebooks,
                                   chunks=plan.chunks, output="compact", link=lk,
                                   repeats=repeats, warmup=0, timeout_s=30.0)],
                   len(plan.devices))
    clean_s = time.time() - t1
    return dict(model=name, tokens=tokens, devices=devices, lost_rank=lost,
                detection_s=marks["verdict"] - fired, request_s=t_end - t0,
                after_death_s=t_end - fired, clean_rerun_s=clean_s,
                first_attempt_s=marks["verdict"] - t0,
                report=[report(x) for x in losses], plan=plan.as_dict(),
                latency_ms=_median(res[0]) * 1e3, clean_latency_ms=_median(clean[0]) * 1e3)


def wall(cells: Sequence[Tuple[str, int]] = WALL_CELLS, links=WALL_LINKS,
         devices: Optional[int] = None, repeats: int = 3, warmup: int = 1) -> List[Dict]:
    """``single`` and ``astra`` over ``devices`` ranks (default: as many as cores, at
    most 4) with the default chunks on the wall clock: the prediction against what the
    ranks measured, one row per (model, tokens, link) and strategy."""
    import os

    from astra.parallel.costmodel import predict_astra, predict_single
    from astra.parallel.links import LinkModel
    from astra.parallel.runner import Job, default_chunks, launch
    N = devices or max(2, min(4, os.cpu_count() or 2))
    rows = []
    for name, T in cells:
        prep, cost, kw, single_s = _cell(name, T, "wall", repeats, warmup)
        chunks = default_chunks(prep.content_tokens, N, _apk(cost))
        lks = [LinkModel(bw, lat) for bw, lat in links]
        split = launch(prep.spec, [Job("astra", prep.inputs, codebooks=prep.codebooks,
                                       chunks=chunks, link=lk, **kw) for lk in lks], N)
        rows.append(dict(model=name, tokens=T, strategy="single", devices=1,
                         predicted_ms=predict_single(cost) * 1e3, measured_ms=single_s * 1e3))
        for (bw, lat), lk, res in zip(links, lks, split):
            rows.append(dict(model=name, tokens=T, strategy="astra", devices=N, chunks=chunks,
                             bandwidth_mbps=bw, latency_ms=lat,
                             predicted_ms=predict_astra(cost, chunks, [1.0] * N, lk) * 1e3,
                             measured_ms=_median(res) * 1e3))
    return rows


def print_wall(rows: List[Dict]) -> None:
    print(f"{'model':<8}{'T':>5}  {'run':<24}{'predicted':>10}{'measured':>10}{'error':>8}")
    for r in rows:
        run = ("single" if r["strategy"] == "single" else
               f"astra x{r['devices']} {r['bandwidth_mbps']:g}/{r['latency_ms']:g}")
        print(f"{r['model']:<8}{r['tokens']:>5}  {run:<24}{r['predicted_ms']:>10.0f}"
              f"{r['measured_ms']:>10.0f}{r['predicted_ms'] / r['measured_ms'] - 1:>+8.0%}")
    errs = [abs(r["predicted_ms"] / r["measured_ms"] - 1) for r in rows]
    print(f"wall clock: prediction error median {statistics.median(errs):.1%}, "
          f"max {max(errs):.0%} over {len(errs)} runs")


def plot(rows: List[Dict], path: str) -> None:
    """Predicted against measured time for every run of the grid (log-log), and auto
    against the better of single and the best astra split per cell."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    for model in sorted({r["model"] for r in rows}):
        pts = [(r["measured_ms"][k], r["predicted_ms"][k]) for r in rows
               if r["model"] == model for k in r["measured_ms"]]
        a.scatter([p[0] for p in pts], [p[1] for p in pts], s=12, label=model)
    lo = min(min(r["measured_ms"].values()) for r in rows)
    hi = max(max(r["measured_ms"].values()) for r in rows)
    a.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("measured (ms, virtual clock)")
    a.set_ylabel("predicted (ms)")
    a.set_title("cost model")
    a.legend()
    labels = [f"{r['model']} {r['tokens']} {r['bandwidth_mbps']:g}/{r['latency_ms']:g}"
              for r in rows]
    b.barh(range(len(rows)), [r["auto_vs_best"] for r in rows], color="tab:blue")
    b.axvline(1.05, color="r", ls="--", lw=0.8, label="+5%")
    b.set_yticks(range(len(rows)))
    b.set_yticklabels(labels, fontsize=5)
    b.set_xlabel("auto / min(single, best astra split)")
    b.set_title("auto against the best it could have picked")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(which: Sequence[str], json_path: Optional[str], plot_path: Optional[str],
         cells=CELLS, links=LINKS, repeats: int = 1) -> Dict:
    import json
    import os
    out: Dict = {}
    if json_path and os.path.exists(json_path):  # the parts not run this time are kept
        with open(json_path) as f:
            out = json.load(f)
    if "grid" in which:
        out["grid"] = grid(cells, links, repeats=repeats)
        print_grid(out["grid"])
        if plot_path:
            plot(out["grid"], plot_path)
    if "hetero" in which:
        h = out["hetero"] = hetero()
        print(f"speeds {h['speeds']}: equal chunks {h['equal_chunks']} {h['equal_ms']:.0f} ms, "
              f"auto {h['plan']['strategy']} on {h['plan']['devices']} chunks "
              f"{h['plan']['chunks']} {h['auto_ms']:.0f} ms: {h['ratio']:.2f}x")
    if "dropout" in which:
        d = out["dropout"] = dropout()
        print("\n".join(d["report"]))
        print(f"rank {d['lost_rank']} died: detected in {d['detection_s']:.1f} s; the request "
              f"completed {d['after_death_s']:.1f} s after the death (detection + a 3-device run "
              f"from start-up: {d['detection_s'] + d['clean_rerun_s']:.1f} s with a clean run "
              f"of {d['clean_rerun_s']:.1f} s)")
    if "wall" in which:
        out["wall"] = wall(repeats=max(3, repeats))
        print_wall(out["wall"])
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=1)
    return out

"""``astra run``: one model, one strategy, N local ranks on an emulated link.

:func:`add_job_args` declares the options a rank needs to build the same job; the
torchrun entry (:mod:`astra.cli.torchrun`) shares them.
"""
from __future__ import annotations

import argparse

from ..options import MODEL_NAMES, RUN_STRATEGIES, STRATEGIES
from ._args import (
    add_timeout,
    csv_floats,
    csv_ints,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    probability,
    time_rates,
)


def add_job_args(p: argparse.ArgumentParser, strategies=STRATEGIES,
                 strategy: str = "astra") -> None:
    """What every rank needs to build the same job (``astra run`` and torchrun)."""
    p.add_argument("--model", default="gpt2",
                   help=" | ".join(MODEL_NAMES) + " | a local HF folder or .gguf file")
    p.add_argument("--strategy", default=strategy, choices=strategies,
                   help="auto: the planner picks the devices and chunks, or one device "
                   "alone, from a measured cost model" if "auto" in strategies else None)
    p.add_argument("--wire", default="fp32", choices=("fp32", "fp16", "int8"))
    p.add_argument("--tokens", type=positive_int, default=256, help="sequence length (text models)")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where each rank computes (cuda: rank r on GPU r %% count; the "
                   "bytes still travel over gloo)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--codebooks", metavar="PATH",
                   help="a saved Codebooks file (grouped or residual), checked against the "
                   "model (default: codebooks fitted quickly on the model's activations); "
                   "across hosts every host needs the same file")
    g.add_argument("--checkpoint", metavar="DIR",
                   help="an `astra finetune` checkpoint folder: its weights and codebooks")


def register(sub) -> None:
    p = sub.add_parser("run", help="run a model across N local processes on an emulated link")
    p.add_argument("--devices", type=positive_int, default=2)
    add_job_args(p, RUN_STRATEGIES, "auto")
    p.add_argument("--chunks", type=csv_ints,
                   help="comma-separated content tokens per rank (uneven devices)")
    p.add_argument("--device-speeds", type=csv_floats, metavar="S1,S2,..",
                   help="emulate devices of different speed: one factor per device (0.5: "
                   "compute takes twice as long; the virtual clock scales CPU time, the "
                   "wall clock sleeps the difference)")
    p.add_argument("--bandwidth", type=positive_float, default=10.0, help="Mbit/s")
    p.add_argument("--latency-ms", type=nonnegative_float, default=0.5,
                   help="one-way latency per transfer")
    p.add_argument("--jitter-ms", type=nonnegative_float, default=0.0)
    p.add_argument("--loss", type=probability, default=0.0,
                   help="packet loss probability (codes)")
    p.add_argument("--resend", type=nonnegative_int, default=0, metavar="ROUNDS",
                   help="with --loss: rounds in which a device asks again for its lost code "
                   "packets (each costs one more latency and the resent bytes)")
    p.add_argument("--medium", choices=("shared", "switched"), default="shared")
    p.add_argument("--bandwidth-trace", type=time_rates, metavar="T:MBPS[,T:MBPS..]",
                   help="the bandwidth changes during the run: MBPS from T seconds after the "
                   "first request on (e.g. 2:1); with --strategy auto the requests after a "
                   "change the transfers show are re-planned (each repeat is a request)")
    p.add_argument("--clock", choices=("wall", "virtual"), default="wall")
    p.add_argument("--check", action="store_true",
                   help="also run the model on one device and print how close the output is")
    add_timeout(p, 60.0)
    p.set_defaults(func=main)


def describe_codebooks(cbs) -> str:
    """``codebooks G=1 K=1024 (10 bits/token)``, ``... residual stages [...]``, with
    ``of [k; v]`` for codebooks of the keys and values."""
    import torch
    if cbs is None or isinstance(cbs, torch.Tensor):
        return ""
    st = cbs.stage_sizes
    kind = (f"G={cbs.groups} K={cbs.codebook_size}" if st is None
            else f"residual stages {st}")
    of = " of [k; v]" if cbs.target == "kv" else ""
    return f"codebooks {kind}{of} ({cbs.bits_per_token} bits/token)"


def main(args: argparse.Namespace) -> int:
    from astra.parallel.planner import Plan, check_speeds  # torch-free
    auto = args.strategy == "auto"
    if args.chunks is not None and len(args.chunks) != args.devices:  # before importing torch
        raise ValueError(f"--chunks has {len(args.chunks)} entries {args.chunks} but there "
                         f"are {args.devices} devices")
    speeds = check_speeds(args.device_speeds, args.devices)
    if auto and args.chunks is not None:
        raise ValueError("--chunks fixes the split: give it with --strategy astra (auto "
                         "chooses the devices and chunks itself)")
    from astra import catalog
    from astra.parallel.job import fidelity
    from astra.parallel.links import LinkModel
    from astra.parallel.runner import Job, check_chunks, check_device, launch, summarize
    check_device(args.device, [args.clock])  # before the set-up builds anything
    run = catalog.load(args.model, args.tokens, args.codebooks, args.checkpoint,
                       with_codebooks=args.strategy in ("astra", "auto"),
                       check=lambda n: check_chunks(args.chunks, n, args.devices))
    link = LinkModel(args.bandwidth, args.latency_ms, medium=args.medium,
                     jitter_ms=args.jitter_ms, loss=args.loss, resend=args.resend,
                     trace=args.bandwidth_trace)

    def attempt(plan: Plan, tries: int, repeats: int = args.repeats, lk=link):
        job = Job(plan.strategy, run.inputs, wire=args.wire, codebooks=run.codebooks,
                  chunks=plan.chunks, output="compact", link=lk,
                  clock=args.clock, repeats=repeats, warmup=1, timeout_s=args.timeout,
                  watch_link=WATCH if auto and lk.trace else 0.0)
        jobs = [job]
        if args.check:  # the reference: the same inputs on one device, in the same launch
            jobs.append(Job("single", run.inputs, output="compact", repeats=1,
                            timeout_s=args.timeout))
        return launch(run.spec, jobs, len(plan.devices), device=args.device,
                      speeds=[speeds[d] for d in plan.devices])

    runs = []  # (plan, results) of each launch: more than one when the link changed
    if auto:
        runs, losses = _auto(run, speeds, link, attempt, args.devices, args.repeats)
        plan, results = runs[-1]
    else:
        plan = Plan(args.strategy, list(range(args.devices)), args.chunks, 0.0, 0.0)
        results, losses = attempt(plan, 0), []
    res = summarize(results[0])
    wire = f" wire={res['wire']}" if res["strategy"] in ("sp", "tp", "ring") else ""
    if res["strategy"] == "astra" and describe_codebooks(run.codebooks):
        wire = f" ({describe_codebooks(run.codebooks)})"
    print(f"{args.model} {res['strategy']}{wire} N={len(plan.devices)}: "
          f"median {res['latency_s'] * 1e3:.1f} ms, "
          f"{res['bytes_per_device']:.0f} B sent per device, "
          f"link waits {res['wait_s'] * 1e3:.1f} ms")
    if len(runs) > 1:
        print("requests (ms): " + " | re-planned | ".join(
            ", ".join(f"{t * 1e3:.0f}" for t in r[0][0]["times"]) for _, r in runs))
    if auto:
        from astra.parallel.survive import report
        for loss in losses:
            print(report(loss))
        print(f"predicted {plan.predicted_s * 1e3:.1f} ms, measured "
              f"{res['latency_s'] * 1e3:.1f} ms ({res['latency_s'] / plan.predicted_s - 1:+.0%})")
    if res["handshake"] and len(plan.devices) > 1:
        hs = res["handshake"]
        print(f"handshake (every rank runs the same model, codebooks and options): "
              f"{hs['bytes']:.0f} B per rank, {hs['seconds'] * 1e3:.0f} ms, before the first "
              "layer")
    _report_loss(res)
    if args.check:
        f = fidelity(results[0][0]["output"], results[1][0]["output"], logits=run.causal)
        print(f"check against one device: cosine {f['cosine']:.4f}, relative error "
              f"{f['rel_error']:.3g}" + (f", next-token top-1 agrees on {f['top1']:.0%} of "
                                         "rows" if "top1" in f else ""))
    return 0


WATCH = 0.3  # --bandwidth-trace with auto: a bandwidth 30% off the plan's is re-planned


def _auto(run, speeds, link, attempt, devices: int, repeats: int):
    """``--strategy auto``: measure (or load) the model's costs, plan, print the plan,
    run it. A device lost on the way is left out of a new plan and the request run again
    (:mod:`astra.parallel.survive`); when the link's transfers show another bandwidth
    than planned for (``--bandwidth-trace``), the requests left are re-planned for it.
    Returns ``([(plan, results) per launch], losses)``."""
    from astra.parallel import planner, probe
    from astra.parallel.links import LinkModel
    from astra.parallel.survive import run_planned
    cost = probe.compute_cost(run.spec, run.inputs, run.codebooks, progress=True)
    plan = planner.plan(cost, speeds, link)
    print(plan.line(), flush=True)
    runs, losses, left, shift, now = [], [], repeats, 0.0, link
    while True:
        lk = link.shifted(shift)
        results, plan, lost = run_planned(
            plan, lambda p, tries: attempt(p, tries, left, lk),
            lambda alive: planner.plan(cost, speeds, now, devices=alive), range(devices))
        runs.append((plan, results))
        losses += lost
        r0 = results[0][0]
        seen = r0.get("link_changed")
        left -= len(r0["times"])
        if not seen or left <= 0:
            return runs, losses
        shift += r0["elapsed_s"]
        now = LinkModel(seen["observed_mbps"], link.latency_ms, medium=link.medium)
        plan = planner.plan(cost, speeds, now)
        print(f"after request {seen['after_request']} the transfers took "
              f"{seen['observed_mbps']:g} Mbit/s (planned for {seen['planned_mbps']:g}): "
              f"re-planned for the {left} left: {plan.line().removeprefix('plan: ')}",
              flush=True)


def _report_loss(res: dict) -> None:
    """Codes lost on the link per receiving rank, and a warning when so many were lost
    that the output says little (every lost token is one the attention cannot see)."""
    import sys

    from astra.parallel.job import LOSS_WARNING
    if not sum(res["codes_lost"]):
        return
    per = ", ".join(f"rank {r} {lost / recv:.1%}" if recv else f"rank {r} -"
                    for r, (lost, recv) in enumerate(zip(res["codes_lost"],
                                                         res["codes_received"])))
    print(f"codes lost on the link: {res['lost_fraction']:.1%} of "
          f"{sum(res['codes_received']):,} received ({per})")
    if res["lost_fraction"] >= LOSS_WARNING:
        print(f"warning: {res['lost_fraction']:.0%} of the remote token codes were lost: each "
              "device saw little of the others' context, so the output is far from one "
              "device's (measure it with --check)", file=sys.stderr)

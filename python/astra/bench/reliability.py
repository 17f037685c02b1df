"""``astra bench reliability``: what lost codes cost, and how each fault is reported.

:func:`quality_vs_loss` runs a model through the real runner with packet loss on the
emulated link (``LinkModel.loss``: each ``mtu``-byte packet of a code frame is lost
with that probability; the tokens whose bits were in it become missing codes, which
the attention masks) and measures the quality against the same run without loss and
against one device: perplexity of the input text for causal LMs (each rank's
next-token log-likelihoods, output ``"nll"``), the cosine of the sentence embedding
to one device's otherwise. Two packet sizes: ``mtu=1500`` (a whole chunk's codes of a
layer fit one packet: a loss drops every token of one sender in one layer) and
``mtu=2`` (about one token per packet: losses spread over tokens, as in the paper's
per-token loss experiment).

:func:`fault_table` injects each fault into a real run and records how long the
run takes to stop, the first line of its message and what it leaves behind.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

LOSSES = (0.0, 0.01, 0.05, 0.2)
MTUS = (1500, 2)


def _quality(out, ref, causal: bool) -> float:
    """Perplexity from next-token NLLs (causal), else cosine to one device's output."""
    import torch
    if causal:
        return float(torch.exp(out.double().mean()))
    a, b = out.double().flatten(), ref.double().flatten()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def quality_vs_loss(name: str, *, devices: int = 4, tokens: int = 512,
                    losses: Sequence[float] = LOSSES, mtus: Sequence[int] = MTUS,
                    resends: Sequence[int] = (0, 1), seeds: Sequence[int] = (0, 1, 2),
                    quiet: bool = False) -> List[Dict]:
    """One row per (mtu, resend rounds, loss): the lost fraction of remote codes and
    the quality (mean over ``seeds`` of the link's loss draws), beside one device's
    and the lossless run's. The rows are printed as a table unless ``quiet``."""
    from astra import catalog
    from astra.parallel.job import Job, summarize
    from astra.parallel.launcher import launch
    from astra.parallel.links import LinkModel
    prep = catalog.prepare(name, tokens)
    out = "nll" if prep.causal else "compact"
    jobs, keys = [Job("single", prep.inputs, output=out, name="single")], [None]
    for mtu in mtus:
        for rs in resends:
            for p in losses:
                if rs and not p:
                    continue  # nothing to resend
                for s in (seeds if p else seeds[:1]):
                    lk = LinkModel(1000.0, 0.0, loss=p, mtu=mtu, seed=s, resend=rs)
                    jobs.append(Job("astra", prep.inputs, codebooks=prep.codebooks,
                                    output=out, link=lk, name=f"astra-{mtu}-{rs}-{p}-{s}"))
                    keys.append((mtu, rs, p))
    res = launch(prep.spec, jobs, devices)
    ref = res[0][0]["output"]
    single = _quality(ref, ref, prep.causal)
    acc: Dict = {}
    for key, r in zip(keys[1:], res[1:]):
        q = _quality(r[0]["output"], ref, prep.causal)
        acc.setdefault(key, []).append((q, summarize(r)["lost_fraction"]))
    clean = {mtu: sum(q for q, _ in acc[(mtu, 0, 0.0)]) / len(acc[(mtu, 0, 0.0)])
             for mtu in mtus}
    rows = []
    for (mtu, rs, p), got in acc.items():
        q = sum(v for v, _ in got) / len(got)
        cost = (q / clean[mtu] - 1) if prep.causal else (1 - q / clean[mtu])
        rows.append(dict(model=name, devices=devices, tokens=tokens, mtu=mtu, resend=rs, loss=p,
                         metric="perplexity" if prep.causal else "cosine to one device",
                         lost_fraction=sum(f for _, f in got) / len(got), quality=q,
                         quality_single=single, quality_no_loss=clean[mtu],
                         cost_vs_no_loss=cost, seeds=len(got)))
    if not quiet:
        print_loss_table(rows)
    return rows


def print_loss_table(rows: List[Dict]) -> None:
    r0 = rows[0]
    print(f"{r0['model']}, N={r0['devices']}, {r0['tokens']} tokens, {r0['metric']} "
          f"(one device: {r0['quality_single']:.4f})")
    print(f"{'mtu':>5} {'resend':>6} {'loss':>6} {'codes lost':>11} {'quality':>9} "
          f"{'vs no loss':>11}")
    for r in rows:
        print(f"{r['mtu']:>5} {r['resend']:>6} {r['loss']:>6.0%} {r['lost_fraction']:>11.1%} "
              f"{r['quality']:>9.4f} {r['cost_vs_no_loss']:>+11.2%}")


# ------------------------------------------------------------------------- faults

def processes_mentioning(text: str) -> List[int]:
    """Pids of the processes whose command line contains ``text`` (Linux ``/proc``)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                found.append(int(d.name))
    return found


def _workers(tag: str) -> List[int]:
    """The worker processes of runs whose temp folders are under ``tag``."""
    return processes_mentioning(os.path.join(tag, "astra-run-"))


def _launch_fault(fault: str, world: int, timeout_s: float) -> Dict:
    import torch

    from astra.catalog import factories
    from astra.parallel.job import Job, RunnerError
    from astra.parallel.launcher import launch
    from astra.parallel.runner import ModelSpec
    x = torch.randint(0, 97, (1, 48), generator=torch.Generator().manual_seed(0))
    tmp = tempfile.mkdtemp(prefix="astra-faults-")
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"], tempfile.tempdir = tmp, None
    log = os.path.join(tmp, "fault.log")
    os.environ["ASTRA_FAULT_LOG"] = log
    msg = "(no error)"
    try:
        # the fault fires in the timed pass, after the ranks are up
        launch(ModelSpec(factories.tiny_gpt2), [Job("sp", x, fault=fault, timeout_s=timeout_s,
                                                     warmup=1)], world)
    except RunnerError as e:
        msg = str(e).splitlines()[0]
    finally:
        stopped = time.time()
        os.environ.pop("ASTRA_FAULT_LOG", None)
        if old is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old
        tempfile.tempdir = None
    with open(log) as f:  # from the fault's first firing to the run's stop
        dt = stopped - min(float(t) for t in f.read().split())
    left = _workers(tmp) + [str(p) for p in Path(tmp).glob("astra-run-*")]
    shutil.rmtree(tmp, ignore_errors=True)
    return dict(fault=f"Job.fault={fault} (N={world}, timeout {timeout_s:g} s)",
                seconds=dt, message=msg, leftovers=len(left))


LONG_RUN = ["run", "--model", "tiny-bert", "--tokens", "32", "--devices", "2", "--strategy",
            "sp", "--repeats", "100000", "--bandwidth", "1000", "--latency-ms", "0"]


def signal_a_run(argv: Sequence[str], sig: int, tmp: str, world: int = 2) -> Dict:
    """Start ``astra argv`` (a long run, ``TMPDIR=tmp``), wait until its ``world``
    workers run, send ``sig`` to it. Returns its exit ``code``, the ``seconds`` from
    the signal until every worker was gone (at most 30 s more), and what was left:
    ``workers`` (pids) and ``folders`` (run folders under ``tmp``)."""
    p = subprocess.Popen([sys.executable, "-m", "astra.cli", *argv],
                         env=dict(os.environ, TMPDIR=tmp), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while len(_workers(tmp)) < world and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.2)
        if len(_workers(tmp)) < world:
            raise RuntimeError(f"`astra {' '.join(argv)}` did not start {world} workers: "
                               f"{p.stderr.read() if p.poll() is not None else 'timeout'}")
        time.sleep(2)  # the ranks are inside their jobs
        t0 = time.monotonic()
        p.send_signal(sig)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    while _workers(tmp) and time.monotonic() - t0 < 30:
        time.sleep(0.05)
    return dict(code=p.returncode, seconds=time.monotonic() - t0, workers=_workers(tmp),
                folders=[str(d) for d in Path(tmp).glob("astra-run-*")])


def _signal_fault(sig: int) -> Dict:
    tmp = tempfile.mkdtemp(prefix="astra-faults-")
    try:
        r = signal_a_run(LONG_RUN, sig, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # SIGKILL leaves the run's folder behind
    name = signal.Signals(sig).name
    return dict(fault=f"{name} to `astra run` (N=2)", seconds=r["seconds"],
                message=f"exit {r['code']}", leftovers=len(r["workers"]) + len(r["folders"]),
                left_detail=f"{len(r['workers'])} workers, {len(r['folders'])} run folders")


def fault_table(quiet: bool = False) -> List[Dict]:
    """Each fault injected into a real run: seconds until the run stopped and every
    worker was gone, the first line of the message, what was left behind."""
    rows = [_launch_fault("die:1", 2, 5.0), _launch_fault("hang:1", 3, 5.0),
            _launch_fault("corrupt:1", 2, 5.0), _launch_fault("truncate:1", 2, 5.0),
            _signal_fault(signal.SIGTERM), _signal_fault(signal.SIGKILL)]
    if not quiet:
        for r in rows:
            print(f"{r['fault']:<42} {r['seconds']:6.1f} s  leftovers {r['leftovers']}  "
                  f"{r['message'][:110]}")
    return rows

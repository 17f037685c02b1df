"""Start the ranks of a run as local processes and watch them.

:func:`launch` starts ``world`` worker processes (``python -m astra.parallel.worker
JOBFILE OUTDIR``) with the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``); for ``--link netns`` each is started inside its rank's
network namespace. The parent watches them: when one fails the others are killed and
:class:`~astra.parallel.job.RunnerError` carries the failing rank's log; nothing is
left running.
"""
from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .comm import EXIT_PEER_TIMEOUT, read_progress
from .job import Job, RunnerError, check_device

__all__ = ["launch"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model, jobs: Sequence[Job], world: int, *, threads: int = 1,
           netns=None, startup_timeout_s: float = 120.0,
           device: str = "cpu", stream: Optional[Callable[[List[int]], None]] = None,
           speeds: Optional[Sequence[float]] = None) -> List[List[Dict[str, Any]]]:
    """Run ``jobs`` on ``world`` fresh worker processes; returns ``results[job][rank]``.

    ``model``: a :class:`~astra.catalog.ModelSpec` every rank builds.

    ``device``: ``"cpu"``, or ``"cuda"`` (rank r computes on GPU ``r % count``; frames
    still travel as host bytes over gloo: a few hundred bytes of codes per layer do
    not need NCCL, and several ranks can share one GPU). Outputs come back on the CPU.

    ``netns``: a :class:`~astra.parallel.netns.NetnsLab` (entered) to start rank r in
    its namespace; rank 0's lab address is the rendezvous.

    ``speeds``: per rank, an emulated speed (``0.5``: compute takes twice as long: the
    virtual clock scales the rank's CPU time, the wall clock sleeps the difference).

    ``stream``: called in this process with the ids a generation job's decoding rank
    has generated since the last call (``[]`` once at the end of each pass), while the
    ranks run.
    """
    jobs = list(jobs)
    check_device(device, [j.clock for j in jobs])
    if speeds is not None and (len(speeds) != world or min(speeds) <= 0):
        raise ValueError(f"speeds {list(speeds)} must be {world} positive numbers")
    budget = startup_timeout_s + sum((j.warmup + j.repeats + 1) * j.timeout_s for j in jobs)
    with tempfile.TemporaryDirectory(prefix="astra-run-") as tmp:
        jobfile = os.path.join(tmp, "jobs.pkl")
        with open(jobfile, "wb") as f:
            pickle.dump(dict(model=model, jobs=jobs, threads=threads, device=device,
                             speeds=None if speeds is None else list(speeds)), f)
        port = _free_port()
        procs, logs = [], []
        progress = [os.path.join(tmp, f"rank{r}.progress") for r in range(world)]
        src = str(Path(__file__).resolve().parents[2])
        try:
            for r in range(world):
                env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                           OMP_NUM_THREADS=str(threads),
                           ASTRA_CPU_LOCK=os.path.join(tmp, "cpu.lock"),
                           ASTRA_STREAM=os.path.join(tmp, "stream.txt") if stream else "",
                           ASTRA_PROGRESS=progress[r],
                           ASTRA_PARENT_PID=str(os.getpid()),
                           PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
                cmd = [sys.executable, "-m", "astra.parallel.worker", jobfile, tmp]
                if netns is not None:
                    env["MASTER_ADDR"] = netns.addr(0)
                    env["GLOO_SOCKET_IFNAME"] = netns.ifname(r)
                    cmd = netns.prefix(r) + ["env"] + [f"{k}={v}" for k, v in env.items()
                                                       if k in _PASS] + cmd
                log = open(os.path.join(tmp, f"rank{r}.log"), "w+")
                logs.append(log)
                procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
            _watch(procs, logs, budget, _Tail(os.path.join(tmp, "stream.txt"), stream),
                   progress, max(j.timeout_s for j in jobs))
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            for log in logs:
                log.close()
        per_rank = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False)
                    for r in range(world)]
    return [[per_rank[r][j] for r in range(world)] for j in range(len(jobs))]


_PASS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS",
         "ASTRA_CPU_LOCK", "ASTRA_STREAM", "ASTRA_PROGRESS", "ASTRA_PARENT_PID",
         "PYTHONPATH", "GLOO_SOCKET_IFNAME", "HF_HUB_OFFLINE", "ASTRA_CACHE", "PATH", "HOME")


def _raised(log) -> bool:
    """The rank's log holds a Python traceback (it failed with an error of its own)."""
    return "Traceback (most recent call last)" in _tail(log, None)


def _tail(log, n: Optional[int] = 3000) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-n:] if n else log.read()


class _Tail:
    """Hands the lines appended to a generation job's stream file to ``fn``."""

    def __init__(self, path: str, fn):
        self.path, self.fn, self.pos, self.buf = path, fn, 0, ""

    def poll(self) -> None:
        if self.fn is None or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            f.seek(self.pos)
            self.buf += f.read()
            self.pos = f.tell()
        *lines, self.buf = self.buf.split("\n")
        ids = []
        for line in lines:
            if line == "end":
                self.fn(ids)
                self.fn([])
                ids = []
            elif line:
                ids.append(int(line))
        if ids:
            self.fn(ids)


def _watch(procs, logs, budget: float, tail: Optional[_Tail] = None,
           progress: Optional[List[str]] = None, timeout_s: float = 0.0) -> None:
    t_end = time.monotonic() + budget
    while True:
        if tail is not None:
            tail.poll()
        codes = [p.poll() for p in procs]
        bad = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if bad:
            time.sleep(0.2)  # let the others report their own error first
            codes = [p.poll() for p in procs]
            silent = _silent(codes, progress, timeout_s) if progress else None
            if silent is not None:
                raise RunnerError(silent[0] + _logs(procs, logs, codes, []), lost=silent[1])
            # the first to fail is the root cause when it died; when it merely reports a
            # peer's failure, prefer a rank that died without a Python traceback
            r = bad[0]
            for q in bad:
                if not _raised(logs[q]):
                    r = q
            dropped = not _raised(logs[r])  # died or killed, not an error of its own
            if dropped:
                why = (f"killed by {signal.Signals(-codes[r]).name}" if codes[r] < 0
                       else "died without an error")
                head = f"rank {r} dropped out (exit {codes[r]}: {why})"
            else:
                last = [ln for ln in _tail(logs[r], 600).splitlines() if ln.strip()]
                why = f": {last[-1].strip()[:200]}" if last else ""
                head = f"rank {r} failed (exit {codes[r]}){why}"
            raise RunnerError(f"{head}; the run was stopped.\n"
                              + _logs(procs, logs, codes, [r]), lost=[r] if dropped else [])
        if all(c == 0 for c in codes):
            if tail is not None:
                tail.poll()  # what was written after the last poll
            return
        if time.monotonic() > t_end:
            raise RunnerError(f"the run did not finish within {budget:.0f} s; stopped")
        time.sleep(0.05)


def _logs(procs, logs, codes, also) -> str:
    return "\n".join(f"--- rank {q} (exit {codes[q]}):\n{_tail(logs[q], 1500)}"
                     for q in range(len(procs)) if codes[q] not in (None, 0) or q in also)


def _silent(codes, progress, timeout_s: float) -> Optional[tuple]:
    """When ranks failed because a peer stopped answering (``EXIT_PEER_TIMEOUT``), the
    message naming that peer and the blamed ranks: a rank that never entered the
    collective they waited in (from the progress files), else one still running; None
    when no rank timed out."""
    waited = [r for r, c in enumerate(codes) if c == EXIT_PEER_TIMEOUT]
    if not waited:
        return None
    prog = [read_progress(p) for p in progress]
    n, what = max(prog[r] for r in waited)
    others = [r for r in range(len(codes)) if r not in waited]
    behind = [r for r in others if prog[r][0] < n]
    running = [r for r in others if codes[r] is None]
    blamed = behind or running
    if not blamed:
        return None
    names = ", ".join(map(str, blamed))
    who = f"rank{'s' if len(blamed) > 1 else ''} {names}"
    where = (f"{what} (collective {n}), which {who} never reached" if behind
             else f"{what} (collective {n}), which {who} entered but never completed")
    waiters = ", ".join(map(str, waited))
    return (f"{who} stopped answering: rank{'s' if len(waited) > 1 else ''} {waiters} waited "
            f"{timeout_s:g} s (the timeout; --timeout sets it) in {where}; the run was "
            "stopped.\n", blamed)

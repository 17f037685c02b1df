"""One rank of a run: build the model, run each :class:`~astra.parallel.job.Job`, time it.

Started by :func:`astra.parallel.launcher.launch` as ``python -m astra.parallel.worker
JOBFILE OUTDIR`` (the torchrun environment names its rank), or in-process by the
torchrun entry (:mod:`astra.cli.torchrun`). Each strategy is one row of
:data:`STRATEGIES`: how a rank prepares the model, and one forward pass.

- ``single``: rank 0 runs the plain model alone.
- ``sp`` / ``astra``: every rank embeds its own chunk (a class-token copy first where the
  model has one) and runs every block on it; the patched attention exchanges the full
  attention input (sp: fp32/fp16/int8 on the wire) or its codes (astra). Rank 0 gathers
  the summaries (``output="compact"``) or the hidden states (``"full"``) and finishes.
- ``tp``: Megatron blocks (:class:`~astra.parallel.tp.TPBlock`) on the whole sequence.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import struct
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import torch

from .handshake import handshake
from .job import Job, attn_per_key, check_chunks, default_chunks, job_codebooks, wire_bits
from .ring import setup_ring as _setup_ring

__all__ = ["STRATEGIES", "FAULTS", "run_jobs", "serve"]


@dataclass
class RankRun:
    """One job on one rank: the model and its family adapter, this rank's chunk
    ``[lo, hi)`` of the ``n`` content tokens, the communicator."""

    job: Job
    model: Any
    adapter: Any
    rank: int
    world: int
    n: int
    lo: int
    hi: int
    comm: Any
    tp_blocks: Optional[List[Any]] = None

    @property
    def cls(self) -> bool:
        return bool(self.adapter.has_cls(self.model))

    def embed(self, lo: int, hi: int):
        return self.adapter.embed(self.model, self.job.inputs, lo, hi, self.cls)

    def blocks(self, h):
        for b in self.adapter.layers(self.model):
            h = self.adapter.run_block(self.model, b, h)
        return h

    def finish(self, h):
        """Rank 0: the whole sequence's hidden states -> the job's output."""
        ad, m = self.adapter, self.model
        if self.job.output == "compact":
            return ad.finish_compact(m, [ad.summary(m, h, self.cls)], self.n + self.cls)
        return _output(self.job, ad.tail(m, h))


def _output(job: Job, logits):
    """``"full"``: the logits / hidden states; ``"nll"`` (causal LMs): each next token's
    negative log-likelihood ``[B, T-1]`` (perplexity without shipping the logits)."""
    if job.output != "nll":
        return logits
    import torch.nn.functional as F
    ids = job.inputs
    B, T = ids.shape
    return F.cross_entropy(logits[:, :-1].float().reshape(B * (T - 1), -1),
                           ids[:, 1:].reshape(-1), reduction="none").view(B, T - 1)


def _setup_sequence(r: RankRun, codebooks) -> bool:
    import astra
    from astra.attention import AstraAttention
    astra.patch(r.model, codebooks, communicator=r.comm, strict=False)
    # the codebooks projected through W_k / W_v belong to the model as its weights do:
    # made here, once, not inside the first request's time
    with torch.no_grad():
        for m in r.model.modules():
            if isinstance(m, AstraAttention):
                m.kernel_tables()
    return True


def _setup_tp(r: RankRun, codebooks) -> bool:
    from .tp import TPBlock
    r.tp_blocks = [TPBlock(r.rank, r.world, r.comm, **r.adapter.tp_spec(r.model, b))
                   for b in r.adapter.layers(r.model)]
    return False


def _setup_single(r: RankRun, codebooks) -> bool:
    if r.adapter.causal:
        # the plain HF blocks need the model's causal mask; N=1 patch = original, and
        # the fused kernels make it the fastest one device here (SmolLM2, 2,048 tokens,
        # one thread: 10.9 s against HF's SDPA 15.8 s); generation decodes through it too
        import astra
        astra.patch(r.model, None, devices=1)
        return True
    return False


def _forward_single(r: RankRun):
    if r.rank != 0:
        return None
    return r.finish(r.blocks(r.embed(0, r.n)))


def _forward_tp(r: RankRun):
    h = r.embed(0, r.n)
    for b in r.tp_blocks:
        h = b(h)
    return r.finish(h) if r.rank == 0 else None


def _forward_sequence(r: RankRun):
    h = r.blocks(r.embed(r.lo, r.hi))
    ad, m = r.adapter, r.model
    if r.job.output == "compact":
        got = r.comm.gather_to_root(ad.summary(m, h, r.cls), "gather.summary")
        return None if got is None else ad.finish_compact(m, got, r.n + r.cls)
    got = r.comm.gather_to_root(h, "gather.hidden")
    if got is None:
        return None
    if r.cls:  # pool the class-token copies
        cls = torch.stack([g[:, 0] for g in got]).mean(0).unsqueeze(1)
        h = torch.cat([cls] + [g[:, 1:] for g in got], 1)
    else:
        h = torch.cat(got, 1)
    return _output(r.job, ad.tail(m, h))


class Strategy(NamedTuple):
    """``setup(run, codebooks) -> patched`` once per job, ``forward(run) -> output``
    (rank 0) or None per timed pass."""

    setup: Callable[[RankRun, Any], bool]
    forward: Callable[[RankRun], Any]


STRATEGIES: Dict[str, Strategy] = {
    "single": Strategy(_setup_single, _forward_single),
    "sp": Strategy(_setup_sequence, _forward_sequence),
    "tp": Strategy(_setup_tp, _forward_tp),
    "astra": Strategy(_setup_sequence, _forward_sequence),
    "ring": Strategy(_setup_ring, _forward_sequence),
}


# ------------------------------------------------------------------ test hook: faults

def _fired() -> None:
    # the bench's fault table measures from here to the run's stop (ASTRA_FAULT_LOG)
    path = os.environ.get("ASTRA_FAULT_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{time.time()}\n")


def _tamper(kind: str):
    def fn(seq, dst, frame):
        _fired()
        if kind == "corrupt":
            frame[-1] ^= 0xFF
        else:  # truncate: the header claims fewer bytes than the receiver expects
            n = struct.unpack_from("<I", frame.numpy(), 28)[0]
            struct.pack_into("<I", frame.numpy(), 28, max(n - 1, 0))
        return frame
    return fn


def _die(forward, after_s: float = 0.0):
    def fn(r):
        if not after_s:
            _fired()
            os._exit(3)
        import threading

        def later():
            _fired()
            os._exit(3)
        threading.Timer(after_s, later).start()  # mid-forward, wherever the rank is then
        return forward(r)
    return fn


def _hang(forward):
    def fn(r):
        _fired()
        time.sleep(3600)
    return fn


# ``Job.fault = "<kind>:<rank>"``: frame faults tamper with what the rank sends; process
# faults replace the rank's forward pass (``die:<rank>@<seconds>``: it dies that long
# into its first pass).
FAULTS = {"corrupt": "frame", "truncate": "frame", "die": _die, "hang": _hang}


def _inject(job: Job, rank: int, comm, forward):
    """The forward pass to time, with ``job.fault`` applied where it names this rank."""
    if not job.fault:
        return forward
    kind, _, who = job.fault.partition(":")
    who, _, after = who.partition("@")
    try:
        after_s = float(after) if after and kind == "die" else 0.0
    except ValueError:
        after_s = -1.0
    if kind not in FAULTS or not who.isdigit() or after_s < 0 or (after and kind != "die"):
        raise ValueError(f"fault must be one of {sorted(FAULTS)}:<rank> (die:<rank>@<seconds> "
                         f"too), got {job.fault!r}")
    if int(who) != rank:
        return forward
    if FAULTS[kind] == "frame":
        comm.tamper = _tamper(kind)
        return forward
    return FAULTS[kind](forward, after_s) if kind == "die" else FAULTS[kind](forward)


# ----------------------------------------------------------------------- one job

def job_chunks(job: Job, model, world: int):
    """``(n, chunks)``: the content tokens the ranks split and each rank's share (the
    job's, checked, or :func:`default_chunks`); refuses outputs and generation the
    model cannot give."""
    from astra.models import resolve
    ad = resolve(model)[1]
    if job.output not in ("full", "compact", "nll") or (job.output == "nll" and not ad.causal):
        raise ValueError(f"output must be 'full', 'compact' or (causal LMs) 'nll'; got "
                         f"{job.output!r} for {ad.family}")
    n = ad.n_content(model, job.inputs)
    if job.max_new_tokens:  # the prompt's last token is the first the decoder feeds
        if not ad.causal or job.strategy not in ("single", "sp", "astra"):
            raise ValueError(f"generation needs a causal LM and strategy single, sp or "
                             f"astra; got {ad.family} with {job.strategy!r}")
        n -= 1
    check_chunks(job.chunks, n, world)
    return n, list(job.chunks or default_chunks(n, world, attn_per_key(model, ad)))


def _prepare(job: Job, model, rank: int, world: int, device: torch.device):
    """The rank's :class:`RankRun` and the job's codebooks (astra)."""
    from astra.models import resolve

    from .comm import DistCommunicator
    if job.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {job.strategy!r}")
    ad = resolve(model)[1]
    n, chunks = job_chunks(job, model, world)
    lo = sum(chunks[:rank])
    cbs, wb = None, dict(G=0, K=0, bits=0, stage_bits=None)
    if job.strategy == "astra":
        cbs = job_codebooks(job)
        if cbs is None:
            raise ValueError("strategy 'astra' needs codebooks")
        cbs = cbs.to(device)
        wb = wire_bits(cbs)
    comm = DistCommunicator(rank, world, chunks, causal=ad.causal, wire=job.wire,
                            bits=wb["bits"], stage_bits=wb["stage_bits"], link=job.link,
                            link_mode=job.link_mode, timeout_s=job.timeout_s, device=device,
                            progress=os.environ.get("ASTRA_PROGRESS") or None)
    run = RankRun(job, model, ad, rank, world, n, lo, lo + chunks[rank], comm)
    return run, cbs, wb, chunks


def _time(job: Job, comm, forward, sync, speed: float = 1.0):
    """``warmup + repeats`` passes; per timed pass its time, bytes sent and link waits.
    ``speed`` (< 1: an emulated slower device) scales this rank's compute time."""
    from .comm import VirtualClock, WallClock
    times, sent, waits, out = [], [], [], None
    elapsed, changed = 0.0, None
    for it in range(job.warmup + job.repeats):
        comm.clock = WallClock()
        comm.barrier()
        comm.clock = (VirtualClock(os.environ.get("ASTRA_CPU_LOCK"), speed)
                      if job.clock == "virtual" else WallClock(speed))
        comm.reset_stats()
        sync()
        t0 = comm.clock.now()
        comm.trace_base = elapsed - t0  # a bandwidth trace runs from the first pass on
        out = forward()
        sync()
        comm.clock.tick()
        t = comm.clock.now() - t0
        elapsed += t
        if job.clock == "virtual":
            comm.clock.close()
        if it >= job.warmup:
            times.append(t)
            sent.append(comm.bytes_sent())
            waits.append(sum(s.wait_s for s in comm.stats))
            if job.watch_link > 0 and job.link is not None:
                changed = _link_changed(job, comm, len(times), elapsed)
                if changed:
                    break
    return times, sent, waits, out, dict(elapsed_s=elapsed, link_changed=changed)


def _link_changed(job: Job, comm, requests: int, elapsed: float):
    """After a timed pass: the bandwidth this pass's transfers took (median over the
    collectives that waited on the link, agreed by every rank); a dict when it differs
    from the job's link by more than ``job.watch_link``, else None. Every rank takes the
    same decision from the same gathered numbers."""
    import statistics
    seen = [s.link_mbps for s in comm.stats if s.link_mbps]
    mine = statistics.median(seen) if seen else 0.0
    got = [v for v in comm.agree(mine) if v > 0]
    if not got:
        return None
    observed = statistics.median(got)
    planned = job.link.bandwidth_mbps
    if abs(observed / planned - 1) <= job.watch_link:
        return None
    return dict(after_request=requests, observed_mbps=observed, planned_mbps=planned,
                elapsed_s=elapsed)


def run_job(job: Job, model, rank: int, world: int,
            device: torch.device = torch.device("cpu"), speed: float = 1.0) -> Dict[str, Any]:
    """Run ``job`` on this rank (the process group is up); its result record. ``speed``:
    this rank's emulated speed (1: as fast as it is)."""
    import astra
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    job = dataclasses.replace(job, inputs=job.inputs.to(device))
    run, cbs, wb, chunks = _prepare(job, model, rank, world, device)
    strategy = STRATEGIES[job.strategy]
    forward = strategy.forward
    if job.max_new_tokens:
        from .generate import generate_forward
        forward = lambda r: generate_forward(r, job)  # noqa: E731
    forward = _inject(job, rank, run.comm, forward)
    patched = strategy.setup(run, cbs)
    if patched and job.max_new_tokens and job.decode_weights:
        from astra import decode

        from .generate import decoder_rank
        if rank == decoder_rank(job.strategy, world) and run.adapter.family == "hf:llama":
            decode.install(model, job.decode_weights)  # unpatch removes it
    try:
        with torch.no_grad():
            times, sent, waits, out, seen = _time(job, run.comm, lambda: forward(run), sync,
                                                  speed)
        stats = [dict(what=s.what, sent=s.bytes_sent, recv=s.bytes_recv, link_s=s.link_s,
                      wait_s=s.wait_s, blocked_cpu_s=s.blocked_cpu_s) for s in run.comm.stats]
    finally:
        if patched:
            astra.unpatch(model)
    return dict(name=job.name, strategy=job.strategy, wire=job.wire, rank=rank, times=times,
                bytes_sent=sent, waits=waits, collectives=stats, chunks=chunks,
                output=out.cpu() if rank == 0 and torch.is_tensor(out) else None,
                generation=out if isinstance(out, dict) else None,
                codes_received=run.comm.codes_received, codes_lost=run.comm.codes_lost,
                elapsed_s=seen["elapsed_s"], link_changed=seen["link_changed"],
                bits=wb["bits"], G=wb["G"], K=wb["K"], stage_bits=wb["stage_bits"],
                bits_per_token=(None if cbs is None else
                                [cbs.layer_bits(i) for i in range(cbs.num_layers)]))


# --------------------------------------------------------------------- the process

def _rank_device(device: str, rank: int) -> torch.device:
    """``"cpu"``, or ``"cuda"``: rank r on GPU ``r % device_count`` (several ranks may
    share one GPU)."""
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no CUDA device on this host")
    return torch.device("cuda", rank % torch.cuda.device_count())


def _codebooks_from_rank0(jobs: List[Job], rank: int):
    """Every job's codebooks as rank 0 has them (rank 0 made them; the others hold
    None): one broadcast before the first job. Returns the jobs and the bytes sent."""
    import torch.distributed as dist
    got = [[j.codebooks for j in jobs] if rank == 0 else None]
    dist.broadcast_object_list(got, src=0)
    nbytes = len(pickle.dumps(got[0]))
    return [dataclasses.replace(j, codebooks=c) for j, c in zip(jobs, got[0])], nbytes


def run_jobs(spec: Dict[str, Any]) -> List[Dict[str, Any]]:
    """This rank (``RANK``, ``WORLD_SIZE``, ``MASTER_*`` in the environment) joins the
    gloo process group, builds ``spec["model"]`` and runs ``spec["jobs"]``, after
    the handshake (:mod:`astra.parallel.handshake`). ``spec["share_codebooks"]``: the
    jobs' codebooks are rank 0's, broadcast once (the other ranks pass None).
    ``spec["speeds"]``: each rank's emulated speed (``--device-speeds``);
    ``spec["measure_speeds"]`` (torchrun ``--strategy auto``): every job's chunks sized to
    the speeds the ranks measure (:func:`_chunks_by_measured_speed`)."""
    import faulthandler

    import torch.distributed as dist

    import astra_kernels
    faulthandler.enable(all_threads=True)  # a C++ abort then shows where Python was
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(spec.get("threads", 1))
    device = _rank_device(spec.get("device", "cpu"), rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = max(j.timeout_s for j in spec["jobs"])
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout))
    try:
        astra_kernels.set_code_checks(False)  # codes come from our own encoder / decoder
        model = spec["model"].build().to(device)
        jobs = [dataclasses.replace(j, inputs=j.inputs.to(device)) for j in spec["jobs"]]
        speeds = None
        if spec.get("measure_speeds"):
            jobs, speeds = _chunks_by_measured_speed(model, jobs, world)
        share = bool(spec.get("share_codebooks"))
        # every rank proves it runs the same thing before a byte of codes is decoded
        # (codebooks that rank 0 sends afterwards are equal by construction)
        cost = handshake(model, jobs, [job_chunks(j, model, world)[1] for j in jobs],
                         shared_codebooks=share)
        shared = 0
        if share:
            jobs, shared = _codebooks_from_rank0(jobs, rank)
        speed = float((spec.get("speeds") or [1.0] * world)[rank])
        out = [run_job(j, model, rank, world, device, speed) for j in jobs]
        for r in out:
            r["handshake"] = cost
            r["shared_codebooks_bytes"] = shared
            r["measured_speeds"] = speeds
        return out
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - peers may be gone already
            pass


def _chunks_by_measured_speed(model, jobs: List[Job], world: int):
    """Every rank probes its own speed (:func:`astra.parallel.probe.measure`: one block
    on a few shapes, seconds), the ranks share what they measured, and each job gets the
    chunks :func:`astra.parallel.planner.balanced_chunks` sizes for those speeds: every
    rank computes the same split from the same numbers. Returns ``(jobs, speeds)``
    (speeds relative to the fastest rank)."""
    import torch.distributed as dist

    from . import planner, probe
    from .costmodel import ComputeCost, predict_single
    got: List[Any] = [None] * world
    dist.all_gather_object(got, probe.measure(model, jobs[0].inputs, None).as_dict())
    costs = [ComputeCost.from_dict(c) for c in got]
    t = [predict_single(c) for c in costs]
    speeds = [min(t) / x for x in t]
    return [dataclasses.replace(j, chunks=planner.balanced_chunks(
        costs[0], job_chunks(dataclasses.replace(j, chunks=None), model, world)[0], speeds))
        for j in jobs], speeds


def die_with_parent() -> None:
    """Linux: ask the kernel to SIGKILL this process when the launcher that started it
    dies (even by SIGKILL, when its own clean-up cannot run); exit at once if it is
    already gone. ``ASTRA_PARENT_PID`` names the launcher; elsewhere a no-op."""
    parent = os.environ.get("ASTRA_PARENT_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal
    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != int(parent):  # the launcher died before the request took effect
        os._exit(1)


def serve(jobfile: str, outdir: str) -> int:
    """The worker process: run the pickled spec's jobs, save ``rank<r>.pt`` in ``outdir``."""
    die_with_parent()
    with open(jobfile, "rb") as f:
        spec = pickle.load(f)
    results = run_jobs(spec)
    torch.save(results, Path(outdir) / f"rank{os.environ['RANK']}.pt")
    return 0


def _timed_out(e: BaseException) -> bool:
    """``e`` or an exception it was raised from is a :class:`CommError` that timed out."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "timed_out", False):
            return True
        e = e.__cause__ or e.__context__
    return False


def exit_now(fn, *args) -> None:
    """Run a worker's ``fn`` and leave the process at once with its status.

    A rank's results are on disk and its process group destroyed when ``fn``
    returns; what follows is interpreter teardown, where static destructors of
    the distributed stack occasionally abort ("terminate called without an
    active exception", SIGABRT, with no Python frame left on the stack).
    ``os._exit`` skips that teardown, so a finished rank always reports 0 and a
    failed one 1 after its traceback (``comm.EXIT_PEER_TIMEOUT`` when it failed
    because a peer stopped answering, so the launcher blames that peer).
    """
    try:
        code = fn(*args)
    except SystemExit as e:
        if e.code not in (None, 0):
            print(e.code if isinstance(e.code, str) else f"exit {e.code}", file=sys.stderr)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:  # noqa: BLE001 - reported, then the process ends
        traceback.print_exc()
        from .comm import EXIT_PEER_TIMEOUT
        code = EXIT_PEER_TIMEOUT if _timed_out(e) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python -m astra.parallel.worker JOBFILE OUTDIR", file=sys.stderr)
        sys.exit(2)
    exit_now(serve, sys.argv[1], sys.argv[2])

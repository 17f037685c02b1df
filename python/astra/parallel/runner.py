"""The runner: one process per rank, ``torch.distributed`` over gloo, every rank holding
the weights and its contiguous chunk of tokens. Ranks compute on the CPU, or on a GPU
(``device="cuda"``, ``astra run --device cuda``: rank r on GPU ``r % count``); frames
always travel as host bytes over gloo — per layer a rank sends a few hundred bytes of
codes, which needs no NCCL, and several ranks can share one GPU. (No NCCL transport:
the sp/tp baselines' large fp32 payloads on a fast GPU interconnect are not what this
runner measures.)

Process model
-------------
:func:`launch` starts ``world`` worker processes (``python -m astra.parallel.runner
worker JOBFILE OUTDIR``) with the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``); for ``--link netns`` each is started inside its rank's
network namespace. The parent watches them: when one fails the others are killed and
:class:`RunnerError` carries the failing rank's traceback; nothing is left running.
A worker runs a list of :class:`Job` s (several strategies share one start-up).

Per layer, ``astra`` strategy (:class:`astra.AstraAttention` in distributed mode, with
:class:`~astra.parallel.comm.DistCommunicator`): ``vq_encode`` the local attention input
-> ``pack_codes`` -> framed ``isend``/``irecv`` to the ranks that need it (all others;
later ranks only for causal models) -> the local partial attention (own tokens, full
precision) runs while the bytes travel -> wait (link emulation) -> remote partial from
the received codes through the projected codebooks -> ``merge_attention``.
At the end each rank sends a summary (``output="compact"``) or its hidden states
(``"full"``) to rank 0, which pools the class-token copies and applies the model's tail.

Strategies: ``single`` (rank 0 alone, the plain model), ``sp`` (the same seam, the full
attention input on the wire as fp32/fp16/int8), ``tp`` (Megatron: column/row-parallel
linears, two all-reduces per block, on the wire as fp32/fp16/int8), ``astra``.

Across real hosts (two machines, one rank each; the link is real, no emulation)::

    # host A (10.0.0.1) and host B, same command but --node_rank 0 / 1:
    torchrun --nnodes 2 --nproc_per_node 1 --node_rank 0 \\
        --master_addr 10.0.0.1 --master_port 29511 \\
        -m astra.parallel.runner torchrun --model gpt2 --strategy astra --tokens 1024

(``GLOO_SOCKET_IFNAME`` picks the interface when a host has several.) ``--codebooks PATH``
(a saved :class:`astra.Codebooks` file) or ``--checkpoint DIR`` (an ``astra finetune``
folder: weights and codebooks) replace the quickly fitted codebooks; every host needs
the same file. ``astra run`` takes the same two options.

Codes on the wire: grouped codebooks send G codes of ``ceil(log2 K)`` bits per token;
residual codebooks (``Codebooks(..., stage_sizes=...)``, per layer or for all) send each
stage's code at its own width ``ceil(log2 K_s)`` (nothing for a stage of size 1), the
widths per layer being part of the set-up (:mod:`astra.parallel.wire`, ``rcodes``).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

__all__ = ["Job", "RunnerError", "launch", "default_chunks", "ModelSpec", "summarize",
           "setup", "finetuned", "job_codebooks", "wire_bits", "check_device"]


class RunnerError(RuntimeError):
    pass


@dataclass
class ModelSpec:
    """How every rank builds the same model: ``factory(**kwargs)`` (a top-level function,
    so it pickles by reference); weights are seeded or loaded, never sent."""

    factory: Callable
    kwargs: Dict[str, Any] = field(default_factory=dict)

    def build(self):
        return self.factory(**self.kwargs).eval()


@dataclass
class Job:
    strategy: str                     # single | sp | tp | astra
    inputs: torch.Tensor
    wire: str = "fp32"
    # astra: a tensor [L, G, K, D/G] (grouped) or an astra.Codebooks (grouped or
    # residual [L, S, Kmax, D] with stage sizes); or a residual tensor + stage_sizes
    codebooks: Optional[Any] = None
    stage_sizes: Optional[Sequence[Any]] = None   # with a tensor: residual stage sizes
    chunks: Optional[List[int]] = None         # content tokens per rank
    output: str = "full"              # full | compact
    link: Optional[Any] = None        # LinkModel
    link_mode: str = "model"          # model | latency | none
    clock: str = "wall"               # wall | virtual
    repeats: int = 1
    warmup: int = 0
    timeout_s: float = 60.0
    fault: Optional[str] = None       # tests: "die:<rank>", "hang:<rank>", "corrupt:<rank>", "truncate:<rank>"
    name: str = ""


def default_chunks(n_content: int, world: int) -> List[int]:
    return [int(c.numel()) for c in torch.tensor_split(torch.arange(n_content), world)]


# ------------------------------------------------------------------------------ worker

def _tamper(kind: str):
    def fn(seq, dst, frame):
        if kind == "corrupt":
            frame[-1] ^= 0xFF
        elif kind == "truncate":  # header claims fewer bytes than the receiver expects
            import struct
            n = struct.unpack_from("<I", frame.numpy(), 28)[0]
            struct.pack_into("<I", frame.numpy(), 28, max(n - 1, 0))
        return frame
    return fn


def job_codebooks(job: Job):
    """The job's codebooks as an :class:`astra.Codebooks` (None without)."""
    import astra
    cb = job.codebooks
    if cb is None:
        return None
    if isinstance(cb, astra.Codebooks):
        if job.stage_sizes is not None:
            raise ValueError("give stage_sizes with a codebooks tensor, not with a Codebooks")
        return cb
    return astra.Codebooks(cb, stage_sizes=job.stage_sizes)


def wire_bits(cb) -> Dict[str, Any]:
    """How the codes of ``cb`` (an :class:`astra.Codebooks`) travel: grouped codebooks
    ``bits`` per code for all G columns (``stage_bits`` None); residual codebooks
    ``stage_bits[l][s] = ceil(log2 K_s)`` per layer and stage (0 for a size-1 stage)."""
    if cb.stages(0) is None:
        K = cb.codebook_size
        return dict(bits=max(1, (K - 1).bit_length()), stage_bits=None,
                    G=cb.groups, K=K)
    stage_bits = [tuple((int(k) - 1).bit_length() for k in cb.stages(i))
                  for i in range(cb.num_layers)]
    return dict(bits=0, stage_bits=stage_bits, G=cb.groups, K=cb.codebook_size)


def check_device(device: str, clocks: Sequence[str]) -> None:
    """Refuse what cannot run: an unknown ``device``, or GPU ranks on the virtual clock
    (it counts a rank's CPU time, which says nothing of GPU work). ``ValueError``."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and "virtual" in clocks:
        raise ValueError("--clock virtual counts CPU time; use --clock wall with --device "
                         "cuda (clock='wall' with device='cuda')")


def _rank_device(device: str, rank: int) -> torch.device:
    """``"cpu"``, or ``"cuda"``: rank r on GPU ``r % device_count`` (several ranks may
    share one GPU)."""
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no CUDA device on this host")
    return torch.device("cuda", rank % torch.cuda.device_count())


def _run_job(job: Job, model, rank: int, world: int,
             device: torch.device = torch.device("cpu")) -> Dict[str, Any]:
    import astra
    from .comm import DistCommunicator, VirtualClock, WallClock
    from .staged import TPBlock, family_of

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    job = dataclasses.replace(job, inputs=job.inputs.to(device))

    fam = family_of(model)
    n = fam.n_content(job.inputs)
    chunks = job.chunks or default_chunks(n, world)
    if sum(chunks) != n or min(chunks) < 1:
        raise ValueError(f"chunks {chunks} must be positive and sum to {n} tokens")
    offs = [sum(chunks[:i]) for i in range(world)]
    lo, hi = offs[rank], offs[rank] + chunks[rank]
    G = K = bits = 0
    stage_bits = cbs = None
    if job.strategy == "astra":
        cbs = job_codebooks(job)
        if cbs is None:
            raise ValueError("strategy 'astra' needs codebooks")
        cbs = cbs.to(device)
        wb = wire_bits(cbs)
        G, K, bits, stage_bits = wb["G"], wb["K"], wb["bits"], wb["stage_bits"]
    comm = DistCommunicator(rank, world, chunks, causal=fam.causal, wire=job.wire, bits=bits,
                            stage_bits=stage_bits, link=job.link, link_mode=job.link_mode,
                            timeout_s=job.timeout_s, device=device)
    if job.fault:
        what, who = job.fault.split(":")
        if int(who) == rank and what in ("corrupt", "truncate"):
            comm.tamper = _tamper(what)

    patched = False
    tp_blocks = None
    if job.strategy in ("astra", "sp"):
        astra.patch(model, cbs, communicator=comm, strict=False)
        patched = True
    elif job.strategy == "tp":
        tp_blocks = [TPBlock(fam.tp_spec(b), rank, world, comm) for b in fam.blocks()]
    elif job.strategy == "single":
        if fam.causal:  # the plain HF blocks need the model's causal mask; N=1 patch = original
            astra.patch(model, None, devices=1)
            patched = True
    else:
        raise ValueError(f"unknown strategy {job.strategy!r}")

    def forward():
        if job.strategy == "single":
            if rank != 0:
                return None
            h = fam.embed(job.inputs, 0, n, fam.has_cls)
            for b in fam.blocks():
                h = fam.run_block(b, h)
            if job.output == "compact":
                return fam.finish_compact([fam.summary(h, fam.has_cls)], n + fam.has_cls)
            return fam.tail(h)
        if job.strategy == "tp":
            h = fam.embed(job.inputs, 0, n, fam.has_cls)
            for b in tp_blocks:
                h = b(h)
            if rank != 0:
                return None
            if job.output == "compact":
                return fam.finish_compact([fam.summary(h, fam.has_cls)], n + fam.has_cls)
            return fam.tail(h)
        h = fam.embed(job.inputs, lo, hi, fam.has_cls)
        if job.fault == f"die:{rank}":
            os._exit(3)
        if job.fault == f"hang:{rank}":
            time.sleep(3600)
        for b in fam.blocks():
            h = fam.run_block(b, h)
        if job.output == "compact":
            got = comm.gather_to_root(fam.summary(h, fam.has_cls), "gather.summary")
            return None if got is None else fam.finish_compact(got, n + fam.has_cls)
        got = comm.gather_to_root(h, "gather.hidden")
        if got is None:
            return None
        if fam.has_cls:
            cls = torch.stack([g[:, 0] for g in got]).mean(0).unsqueeze(1)
            h = torch.cat([cls] + [g[:, 1:] for g in got], 1)
        else:
            h = torch.cat(got, 1)
        return fam.tail(h)

    times, sent, waits, out = [], [], [], None
    try:
        with torch.no_grad():
            for it in range(job.warmup + job.repeats):
                comm.clock = WallClock()
                comm.barrier()
                comm.clock = (VirtualClock(os.environ.get("ASTRA_CPU_LOCK"))
                              if job.clock == "virtual" else WallClock())
                comm.reset_stats()
                sync()
                t0 = comm.clock.now()
                out = forward()
                sync()
                t = comm.clock.now() - t0
                if job.clock == "virtual":
                    comm.clock.close()
                if it >= job.warmup:
                    times.append(t)
                    sent.append(comm.bytes_sent())
                    waits.append(sum(s.wait_s for s in comm.stats))
        stats = [dict(what=s.what, sent=s.bytes_sent, recv=s.bytes_recv, link_s=s.link_s,
                      wait_s=s.wait_s, blocked_cpu_s=s.blocked_cpu_s) for s in comm.stats]
    finally:
        if patched:
            astra.unpatch(model)
    return dict(name=job.name, strategy=job.strategy, wire=job.wire, rank=rank, times=times,
                bytes_sent=sent, waits=waits, collectives=stats, chunks=chunks,
                output=out.cpu() if rank == 0 and out is not None else None, bits=bits,
                G=G, K=K,
                stage_bits=stage_bits,
                bits_per_token=(None if cbs is None else
                                [cbs.layer_bits(i) for i in range(cbs.num_layers)]))


def _worker(jobfile: str, outdir: str) -> int:
    import faulthandler

    import torch.distributed as dist
    faulthandler.enable(all_threads=True)  # a C++ abort then shows where Python was
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    with open(jobfile, "rb") as f:
        spec = pickle.load(f)
    torch.set_num_threads(spec.get("threads", 1))
    device = _rank_device(spec.get("device", "cpu"), rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = max(j.timeout_s for j in spec["jobs"])
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout))
    try:
        import astra_kernels
        astra_kernels.set_code_checks(False)  # codes come from our own encoder / decoder
        model = spec["model"].build().to(device)
        results = [_run_job(j, model, rank, world, device) for j in spec["jobs"]]
        torch.save(results, Path(outdir) / f"rank{rank}.pt")
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - peers may be gone already
            pass
    return 0


# ------------------------------------------------------------------------------ launch

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model: ModelSpec, jobs: Sequence[Job], world: int, *, threads: int = 1,
           netns=None, startup_timeout_s: float = 120.0,
           device: str = "cpu") -> List[List[Dict[str, Any]]]:
    """Run ``jobs`` on ``world`` fresh worker processes; returns ``results[job][rank]``.

    ``device``: ``"cpu"``, or ``"cuda"`` (rank r computes on GPU ``r % count``; frames
    still travel as host bytes over gloo: a few hundred bytes of codes per layer do
    not need NCCL, and several ranks can share one GPU). Outputs come back on the CPU.

    ``netns``: a :class:`~astra.parallel.netns.NetnsLab` (entered) to start rank r in
    its namespace; rank 0's lab address is the rendezvous.
    """
    jobs = list(jobs)
    check_device(device, [j.clock for j in jobs])
    budget = startup_timeout_s + sum((j.warmup + j.repeats + 1) * j.timeout_s for j in jobs)
    with tempfile.TemporaryDirectory(prefix="astra-run-") as tmp:
        jobfile = os.path.join(tmp, "jobs.pkl")
        with open(jobfile, "wb") as f:
            pickle.dump(dict(model=model, jobs=jobs, threads=threads, device=device), f)
        port = _free_port()
        procs, logs = [], []
        src = str(Path(__file__).resolve().parents[2])
        try:
            for r in range(world):
                env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                           OMP_NUM_THREADS=str(threads),
                           ASTRA_CPU_LOCK=os.path.join(tmp, "cpu.lock"),
                           PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
                cmd = [sys.executable, "-m", "astra.parallel.runner", "worker", jobfile, tmp]
                if netns is not None:
                    env["MASTER_ADDR"] = netns.addr(0)
                    env["GLOO_SOCKET_IFNAME"] = netns.ifname(r)
                    cmd = netns.prefix(r) + ["env"] + [f"{k}={v}" for k, v in env.items()
                                                       if k in _PASS] + cmd
                log = open(os.path.join(tmp, f"rank{r}.log"), "w+")
                logs.append(log)
                procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
            _watch(procs, logs, budget)
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
         "ASTRA_CPU_LOCK",
         "PYTHONPATH", "GLOO_SOCKET_IFNAME", "HF_HUB_OFFLINE", "ASTRA_CACHE", "PATH", "HOME")


def _tail(log, n=3000) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-n:]


def _watch(procs, logs, budget: float) -> None:
    t_end = time.monotonic() + budget
    while True:
        codes = [p.poll() for p in procs]
        bad = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if bad:
            time.sleep(0.2)  # let the others report their own error first
            # the first to fail is the root cause when it died; when it merely reports a
            # peer's failure, prefer a rank that died without a Python traceback
            r = bad[0]
            for q in bad:
                if "Traceback" not in _tail(logs[q]):
                    r = q
            msgs = "\n".join(f"--- rank {q} (exit {codes[q] if codes[q] is not None else procs[q].poll()}):\n"
                             f"{_tail(logs[q], 1500)}" for q in range(len(procs))
                             if procs[q].poll() not in (None, 0) or q == r)
            raise RunnerError(f"rank {r} failed (exit {codes[r]}); the run was stopped.\n{msgs}")
        if all(c == 0 for c in codes):
            return
        if time.monotonic() > t_end:
            raise RunnerError(f"the run did not finish within {budget:.0f} s; stopped")
        time.sleep(0.05)


# ------------------------------------------------------------------------------- CLI

def summarize(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One job's per-rank results -> median latency (rank 0's clock), bytes per device."""
    r0 = results[0]
    par = r0["strategy"] != "single"
    sent = [statistics.median(r["bytes_sent"]) for r in results] if par else [0]
    return dict(strategy=r0["strategy"], wire=r0["wire"], latency_s=statistics.median(r0["times"]),
                times=r0["times"], bytes_per_device=max(sent),
                wait_s=statistics.median(r0["waits"]) if r0["waits"] else 0.0)


def finetuned(base: ModelSpec, checkpoint: str):
    """``base``'s model with the weights of an ``astra finetune`` checkpoint folder
    (a :class:`ModelSpec` factory: every rank loads the same checkpoint)."""
    from astra.finetune import load_checkpoint
    model = base.build()
    load_checkpoint(model, checkpoint)
    return model


def setup(model_name: str, tokens: int, codebooks: Optional[str] = None,
          checkpoint: Optional[str] = None):
    """``(ModelSpec, inputs, codebooks)`` for ``astra run`` and the torchrun entry.

    Without ``codebooks`` / ``checkpoint``: :func:`astra.bench.e2e.setup` (codebooks
    fitted quickly on the model's own activations). ``codebooks``: a saved
    :class:`astra.Codebooks` file, checked against the model. ``checkpoint``: an
    ``astra finetune`` folder: its weights (loaded by every rank) and its codebooks.
    Raises ``ValueError`` when the file or the checkpoint does not fit the model."""
    from astra.bench import e2e
    if codebooks and checkpoint:
        raise ValueError("give --codebooks or --checkpoint, not both (a checkpoint "
                         "carries its own codebooks)")
    if not codebooks and not checkpoint:
        return e2e.setup(model_name, tokens)
    import astra
    spec, inputs = e2e.model_and_inputs(model_name, tokens, trained=not checkpoint)
    model = spec.build()
    if checkpoint:
        from astra.finetune import load_checkpoint
        path = os.path.abspath(os.fspath(checkpoint))
        try:
            cbs = load_checkpoint(model, path)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"--checkpoint {checkpoint} does not fit --model "
                             f"{model_name}: {e}") from e
        spec = ModelSpec(finetuned, dict(base=spec, checkpoint=path))
    else:
        if not os.path.exists(codebooks):
            raise ValueError(f"--codebooks {codebooks}: no such file")
        try:
            cbs = astra.Codebooks.load(codebooks, expect=model)
        except ValueError as e:
            raise ValueError(f"--codebooks {codebooks} does not fit --model {model_name}: "
                             f"{e}") from e
    return spec, inputs, cbs


def _describe(cbs) -> str:
    if cbs is None or isinstance(cbs, torch.Tensor):
        return ""
    st = cbs.stage_sizes
    kind = (f"G={cbs.groups} K={cbs.codebook_size}" if st is None
            else f"residual stages {st}")
    return f"codebooks {kind} ({cbs.bits_per_token} bits/token)"


def _cmd_run(args) -> int:
    from .links import LinkModel
    try:
        check_device(args.device, [args.clock])  # before the set-up builds anything
        model, inputs, cbs = setup(args.model, args.tokens, getattr(args, "codebooks", None),
                                   getattr(args, "checkpoint", None))
    except ValueError as e:
        raise SystemExit(f"astra run: {e}") from None
    chunks = [int(c) for c in args.chunks.split(",")] if args.chunks else None
    link = LinkModel(args.bandwidth, args.latency_ms, medium=args.medium,
                     jitter_ms=args.jitter_ms, loss=args.loss)
    job = Job(args.strategy, inputs, wire=args.wire, codebooks=cbs, chunks=chunks,
              output="compact", link=link,
              clock=args.clock, repeats=args.repeats, warmup=1)
    res = summarize(launch(model, [job], args.devices, device=args.device)[0])
    wire = f" wire={res['wire']}" if res["strategy"] in ("sp", "tp") else ""
    if res["strategy"] == "astra" and _describe(cbs):
        wire = f" ({_describe(cbs)})"
    print(f"{args.model} {res['strategy']}{wire} N={args.devices}: "
          f"median {res['latency_s'] * 1e3:.1f} ms, {res['bytes_per_device']:.0f} B sent per device, "
          f"link waits {res['wait_s'] * 1e3:.1f} ms")
    return 0


def _exit_now(fn, *args) -> None:
    """Run a worker's ``fn`` and leave the process at once with its status.

    A rank's results are on disk and its process group destroyed when ``fn``
    returns; what follows is interpreter teardown, where static destructors of
    the distributed stack occasionally abort ("terminate called without an
    active exception", SIGABRT: 2 of 77 launches in a loop here, with no Python
    frame left on the stack). ``os._exit`` skips that teardown, so a finished
    rank always reports 0 and a failed one 1 after its traceback.
    """
    try:
        code = fn(*args)
    except SystemExit as e:
        if e.code not in (None, 0):
            print(e.code if isinstance(e.code, str) else f"exit {e.code}", file=sys.stderr)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported, then the process ends
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def _main(argv: List[str]) -> int:
    if argv and argv[0] == "worker":
        _exit_now(_worker, argv[1], argv[2])
    if argv and argv[0] == "torchrun":
        _exit_now(_torchrun, argv[1:])
    raise SystemExit("usage: python -m astra.parallel.runner worker JOBFILE OUTDIR | torchrun ...")


def _torchrun(argv: List[str]) -> int:
    """Entry under ``torchrun``: every rank builds the same job from the arguments."""
    ap = argparse.ArgumentParser(prog="python -m astra.parallel.runner torchrun")
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--strategy", default="astra", choices=("single", "sp", "tp", "astra"))
    ap.add_argument("--wire", default="fp32", choices=("fp32", "fp16", "int8"))
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    from .cli import add_codebook_args
    add_codebook_args(ap)
    a = ap.parse_args(argv)
    try:
        model, inputs, cbs = setup(a.model, a.tokens, a.codebooks, a.checkpoint)
    except ValueError as e:
        raise SystemExit(f"rank {os.environ.get('RANK', '?')}: {e}") from None
    job = Job(a.strategy, inputs, wire=a.wire, codebooks=cbs, output="compact",
              link=None, link_mode="none", repeats=a.repeats, warmup=1)
    with tempfile.TemporaryDirectory() as tmp:
        jf = os.path.join(tmp, "jobs.pkl")
        with open(jf, "wb") as f:
            pickle.dump(dict(model=model, jobs=[job], threads=1, device=a.device), f)
        _worker(jf, tmp)
        r = torch.load(os.path.join(tmp, f"rank{os.environ['RANK']}.pt"), weights_only=False)[0]
    if int(os.environ["RANK"]) == 0:
        print(f"median {statistics.median(r['times']) * 1e3:.1f} ms, "
              f"{statistics.median(r['bytes_sent']):.0f} B sent by rank 0")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

"""The runner's communicator: framed point-to-point transfers with link emulation.

:class:`DistCommunicator` implements :class:`astra.Communicator` (``exchange``) plus
``exchange_start`` (asynchronous: returns a handle whose ``wait()`` gives the payloads,
so the local partial attention runs while the bytes travel), ``allreduce`` (tensor
parallelism: reduce-scatter + all-gather, each a framed exchange so fp16/int8 wires
compress it too) and ``gather_to_root``.

Every collective is a set of ``isend``/``irecv`` of frames (:mod:`astra.parallel.wire`):
an all-gather where each rank sends its frame to the ranks that need it (every other
rank; only later ranks for causal models). Sizes are known on both sides in advance
(chunk sizes are part of the run's set-up), so each receive buffer has exactly the
size of the expected frame and the header is checked field by field.

Link emulation (``link`` = a :class:`LinkModel`):
  the collective starts at the latest ``t_send`` stamp among the frames this rank
  receives and its own start; it completes ``latency (+ jitter) + serialization(plan)``
  later, where the plan is every transfer of the collective (a shared medium serializes
  all of them, a switched one only the busiest port). After the real transfer a rank
  waits until that completion time on its clock: with :class:`WallClock` it sleeps
  (waits happen in wall-clock time), with :class:`VirtualClock` it moves the clock
  forward (compute is measured as the rank's own CPU time, so N ranks can share fewer
  cores). Jitter is drawn from an RNG seeded by (seed, collective) on every rank alike;
  packet loss (codes only) is drawn per (collective, sender, receiver): tokens whose
  packed bits fall in a lost packet get code -1 (masked by the attention).
  ``link_mode="latency"`` (real shaped link, e.g. netns) only adds the one-way latency
  after the real transfer; bandwidth is the real link's.

Failures: every wait has ``timeout_s``; a peer that died or hangs raises
:class:`CommError` naming the rank, the collective and the peers, instead of hanging
(``timed_out`` set when the wait ran out rather than the peer's connection failing).
With ``progress`` (a file path; the launcher gives each rank one) every collective
writes its number and name there before it starts, so when ranks time out the
launcher can name the rank that never reached the collective they waited in.
"""
from __future__ import annotations

import fcntl
import os
import random
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

from . import wire
from .links import LinkModel, missing_tokens

__all__ = ["CommError", "WallClock", "VirtualClock", "DistCommunicator", "CollectiveStat",
           "write_progress", "read_progress", "EXIT_PEER_TIMEOUT"]


class CommError(RuntimeError):
    """A collective did not complete: a peer died, hung past the timeout, or sent garbage.
    ``timed_out``: the wait ran for the whole timeout (a peer stopped answering)."""

    def __init__(self, message: str, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out


# a rank's exit status when it failed because a peer stopped answering (not its fault)
EXIT_PEER_TIMEOUT = 124

_PROGRESS_FDS: Dict[str, int] = {}


def write_progress(path: str, number: int, what: str) -> None:
    """Overwrite ``path`` with ``"<number> <what>"`` (one fixed-width line)."""
    fd = _PROGRESS_FDS.get(path)
    if fd is None:
        fd = _PROGRESS_FDS[path] = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.pwrite(fd, f"{number:12d} {what[:50]:<50}\n".encode(), 0)


def read_progress(path: str):
    """``(number, what)`` written by :func:`write_progress`; ``(0, "")`` if none yet."""
    try:
        with open(path) as f:
            n, _, what = f.read().strip().partition(" ")
        return int(n), what.strip()
    except (OSError, ValueError):
        return 0, ""


class WallClock:
    """``time.monotonic`` (system-wide on Linux, so stamps compare across local ranks).

    ``speed < 1`` emulates a slower device: :meth:`tick` (called by the communicator
    before every stamp and wait) sleeps ``1/speed - 1`` times the CPU time this thread
    spent since the last tick, so compute takes ``1/speed`` as long in wall-clock time."""

    virtual = False

    def __init__(self, speed: float = 1.0):
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        self.speed = speed
        self._mark = time.thread_time()

    def now(self) -> float:
        return time.monotonic()

    def tick(self) -> None:
        if self.speed == 1.0:
            return
        c = time.thread_time()
        pad = (c - self._mark) * (1.0 / self.speed - 1.0)
        if pad > 0:
            time.sleep(pad)
        self._mark = time.thread_time()

    def discount(self, cpu_s: float) -> None:
        """CPU time spent blocked on a transfer is not compute: not padded."""
        self._mark += cpu_s

    def wait_until(self, t: float) -> float:
        d = t - time.monotonic()
        if d > 0:
            time.sleep(d)
        return max(d, 0.0)


class VirtualClock:
    """This thread's CPU time plus the waits the link model imposes.

    Run torch with one intra-op thread per rank: the compute then happens in the
    calling thread, and its CPU time is what a dedicated core would take. With
    ``lock_path`` the ranks of one machine take turns on the CPU (an ``flock`` held
    while computing, released while blocked on a transfer), so ranks that outnumber
    the cores do not slow each other down through shared caches and cores; CPU time
    burnt while blocked on a real transfer is not counted (the link model is).
    """

    virtual = True

    def __init__(self, lock_path: Optional[str] = None, speed: float = 1.0):
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        self.speed = speed  # a device of speed s: its CPU time counts 1/s
        self.offset = 0.0
        self._fd = None
        if lock_path:
            self._fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            self.acquire()
        self.t0 = time.thread_time()

    def acquire(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            self.release()
            os.close(self._fd)
            self._fd = None

    def now(self) -> float:
        return self.offset + (time.thread_time() - self.t0) / self.speed

    def tick(self) -> None:
        pass

    def discount(self, cpu_s: float) -> None:
        """CPU time spent blocked on a transfer is not compute: taken off the clock."""
        self.offset -= cpu_s / self.speed

    def wait_until(self, t: float) -> float:
        d = t - self.now()
        if d > 0:
            self.offset += d
        return max(d, 0.0)


@dataclass
class CollectiveStat:
    seq: int
    what: str
    bytes_sent: int
    bytes_recv: int
    link_s: float      # modelled duration of the collective (0 without emulation)
    wait_s: float      # time this rank waited on the link after the real transfer
    blocked_cpu_s: float = 0.0  # CPU time spent blocked on the real transfer
    link_mbps: Optional[float] = None  # the bandwidth its bytes took (emulated link)


@dataclass
class _Handle:
    comm: "DistCommunicator"
    seq: int
    what: str
    works: List
    recv_bufs: Dict[int, Tensor]
    expect: Dict[int, dict]
    plan: List
    t_start: float
    sent: int
    own: Optional[Tensor] = None
    done: bool = False
    result: Optional[List[Tensor]] = None

    def wait(self) -> List[Tensor]:
        if not self.done:
            self.result = self.comm._finish(self)
            self.done = True
        return self.result


@dataclass
class DistCommunicator:
    """Communicator for one rank of a ``torch.distributed`` process group.

    Args:
        rank, world_size: this rank and the group size.
        send_tokens: tokens each rank sends per layer (its chunk without a class copy).
        causal: send only to later ranks (earlier ranks never attend to later ones).
        wire: how float payloads travel: ``fp32``, ``fp16`` or ``int8``.
        bits: bits per code (log2 K) for code payloads of grouped codebooks.
        stage_bits: residual codebooks: per layer (indexed by ``layer_idx``), the bits of
            each code column (stage of size K_s: ``ceil(log2 K_s)``, 0 for a size-1
            stage, whose code is not sent); the codes then go as ``rcodes`` frames, each
            column packed at its own width (:func:`astra.parallel.wire.pack_columns`).
        link: the :class:`LinkModel` to emulate, or None.
        link_mode: ``"model"`` (bandwidth + latency emulated), ``"latency"`` (only the
            latency: the link itself is real and shaped) or ``"none"``.
        clock: :class:`WallClock` or :class:`VirtualClock`.
        timeout_s: how long any wait may take before :class:`CommError`.
    """

    rank: int
    world_size: int
    send_tokens: Sequence[int]
    causal: bool = False
    wire: str = "fp32"
    bits: int = 0
    stage_bits: Optional[Sequence[Sequence[int]]] = None
    link: Optional[LinkModel] = None
    link_mode: str = "model"
    clock: object = field(default_factory=WallClock)
    timeout_s: float = 60.0
    stats: List[CollectiveStat] = field(default_factory=list)
    tamper: Optional[object] = None  # tests: fn(seq, dst, frame) -> frame, applied on send
    device: Union[str, torch.device] = "cpu"  # where received tensors go (frames: host)
    progress: Optional[str] = None  # file: the collective this rank last entered
    codes_received: int = 0  # remote token codes received (every layer, every pass)
    codes_lost: int = 0      # ... of which lost on the link (-1: masked by the attention)
    trace_base: float = 0.0  # clock stamp + trace_base = seconds since the run started
    _seq: int = 0
    _entered: int = 0

    def _enter(self, what: str) -> None:
        self._entered += 1
        if self.progress:
            write_progress(self.progress, self._entered, what)

    # ------------------------------------------------------------------ Communicator
    def receivers(self, src: int) -> List[int]:
        if self.causal:
            return list(range(src + 1, self.world_size))
        return [d for d in range(self.world_size) if d != src]

    def _kind(self, local: Tensor) -> str:
        if local.dtype in (torch.int32, torch.int64, torch.int16):
            if self.stage_bits is not None:
                return "rcodes"
            if self.bits <= 0:
                raise ValueError("code payloads need bits > 0 (log2 K)")
            return "codes"
        return self.wire

    def exchange_start(self, layer_idx: int, local: Tensor) -> _Handle:
        """Start the all-gather of ``local [B, T_r, W]``; ``.wait()`` returns the list."""
        B, T, W = local.shape
        if T != self.send_tokens[self.rank]:
            raise ValueError(f"rank {self.rank} sends {T} tokens but the run declared "
                             f"{self.send_tokens[self.rank]}")
        kind = self._kind(local)
        bits = self.bits if kind == "codes" else 0
        widths = None
        if kind == "rcodes":
            if not 0 <= layer_idx < len(self.stage_bits):
                raise ValueError(f"layer {layer_idx} has no stage bit widths "
                                 f"({len(self.stage_bits)} layers declared)")
            widths = tuple(int(w) for w in self.stage_bits[layer_idx])
            if len(widths) != W:
                raise ValueError(f"layer {layer_idx} sends {W} code columns but the run "
                                 f"declared {len(widths)} stages {widths}")
            bits = sum(widths)
        senders = [s for s in range(self.world_size) if s != self.rank
                   and self.rank in self.receivers(s)]
        sizes = {s: wire.frame_nbytes(kind, B, self.send_tokens[s], W, bits)
                 for s in range(self.world_size)}
        plan = [(s, d, sizes[s]) for s in range(self.world_size) for d in self.receivers(s)]
        expect = {s: dict(kind=kind, rows=B, tokens=self.send_tokens[s], width=W, bits=bits)
                  for s in senders}
        if widths is not None:
            for e in expect.values():
                e["widths"] = widths
        sends = {d: None for d in self.receivers(self.rank)}
        h = self._post(f"exchange[{layer_idx}]", local, kind, bits, sends, expect, sizes, plan,
                       widths)
        h.own = local
        return h

    def exchange(self, layer_idx: int, local: Tensor) -> List[Tensor]:
        return self.exchange_start(layer_idx, local).wait()

    # ---------------------------------------------------------------- tensor parallel
    def allreduce(self, x: Tensor, what: str = "allreduce") -> Tensor:
        """Sum of ``x`` over ranks: reduce-scatter then all-gather, both framed on the
        wire (``2·(N-1)/N`` of the tensor per rank each way, like a ring all-reduce)."""
        N = self.world_size
        if N == 1:
            return x
        shape = x.shape
        flat = x.reshape(-1, shape[-1]) if x.dim() > 1 else x.reshape(-1, 1)
        parts = list(torch.tensor_split(flat, N, dim=0))
        rows = [p.shape[0] for p in parts]
        W = flat.shape[1]
        kind = self.wire
        # reduce-scatter: part d goes to rank d
        sizes = {s: wire.frame_nbytes(kind, 1, rows[s], W) for s in range(N)}
        plan = [(s, d, sizes[d]) for s in range(N) for d in range(N) if d != s]
        expect = {s: dict(kind=kind, rows=1, tokens=rows[self.rank], width=W)
                  for s in range(N) if s != self.rank}
        sends = {d: parts[d].unsqueeze(0) for d in range(N) if d != self.rank}
        got = self._post(f"{what}.rs", None, kind, 0, sends, expect, None, plan).wait()
        mine = parts[self.rank].float().clone()
        for s in range(N):
            if s != self.rank:
                mine += got[s][0]
        mine = mine.to(x.dtype)
        # all-gather of the reduced parts (every rank decodes the same bytes, so all agree)
        sizes = {s: wire.frame_nbytes(kind, 1, rows[s], W) for s in range(N)}
        plan = [(s, d, sizes[s]) for s in range(N) for d in range(N) if d != s]
        expect = {s: dict(kind=kind, rows=1, tokens=rows[s], width=W) for s in range(N)
                  if s != self.rank}
        sends = {d: mine.unsqueeze(0) for d in range(N) if d != self.rank}
        got = self._post(f"{what}.ag", None, kind, 0, sends, expect, None, plan).wait()
        own = wire.decode_payload(wire.encode_payload(mine.unsqueeze(0).cpu(), kind), kind, 1,
                                  rows[self.rank], W).to(mine.device) if kind != "fp32" \
            else mine.unsqueeze(0)
        got[self.rank] = own
        return torch.cat([g[0] for g in got], dim=0).to(x.dtype).reshape(shape)

    def gather_to_root(self, x: Tensor, what: str = "gather") -> Optional[List[Tensor]]:
        """Rank 0 gets every rank's ``x [B, T_r, W]`` (fp32 on the wire, through the
        link model); the others get None. ``T_r`` may differ per rank: the counts are
        agreed first by a tiny all-gather outside the link model."""
        N = self.world_size
        B, T, W = x.shape
        if N == 1:
            return [x]
        sizes_T = self._gather_sizes(T)
        sizes = {s: wire.frame_nbytes("fp32", B, sizes_T[s], W) for s in range(N)}
        plan = [(s, 0, sizes[s]) for s in range(1, N)]
        if self.rank == 0:
            expect = {s: dict(kind="fp32", rows=B, tokens=sizes_T[s], width=W)
                      for s in range(1, N)}
            got = self._post(what, None, "fp32", 0, {}, expect, None, plan).wait()
            got[0] = x
            return got
        self._post(what, None, "fp32", 0, {0: x}, {}, None, plan).wait()
        return None

    def agree(self, value: float) -> List[float]:
        """Every rank's ``value`` (an all-gather outside the link model: a few bytes the
        ranks exchange to take the same decision)."""
        t = torch.tensor([float(value)], dtype=torch.float64)
        out = [torch.zeros(1, dtype=torch.float64) for _ in range(self.world_size)]
        self._guard(lambda: dist.all_gather(out, t, async_op=True), "agree")
        return [float(o) for o in out]

    def _gather_sizes(self, T: int) -> List[int]:
        # token counts are part of the set-up for exchanges; for gathers the caller's
        # T may differ per rank (the class copy), so agree on them out of band.
        t = torch.tensor([T], dtype=torch.int64)
        out = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        self._guard(lambda: dist.all_gather(out, t, async_op=True), "gather sizes")
        return [int(o) for o in out]

    def barrier(self) -> None:
        self._guard(lambda: dist.barrier(async_op=True), "barrier")

    def _timed_out(self, t0: float) -> bool:
        return time.monotonic() - t0 >= 0.95 * self.timeout_s

    def _guard(self, start, what):
        self._enter(what)
        self.clock.tick()
        virtual = getattr(self.clock, "virtual", False)
        if virtual:
            self.clock.release()
        c0, t0 = time.thread_time(), time.monotonic()
        try:
            w = start()
            w.wait(timeout=timedelta(seconds=self.timeout_s))
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise CommError(f"rank {self.rank}: {what} did not complete within "
                            f"{self.timeout_s:g} s (a peer died or hangs): {e}",
                            timed_out=self._timed_out(t0)) from e
        finally:
            if virtual:
                self.clock.acquire()
            self.clock.discount(time.thread_time() - c0)

    # ------------------------------------------------------------------ transport
    def _post(self, what, local, kind, bits, sends, expect, sizes, plan,
              widths=None) -> _Handle:
        seq = self._seq
        self._seq += 1
        self._enter(what)
        self.clock.tick()  # a slowed wall clock pads the compute before the stamp
        t_start = self.clock.now()
        tag = seq % (1 << 20)
        works, sent = [], 0
        frames = {}
        for d, payload in sends.items():
            key = id(payload if payload is not None else local)
            if key not in frames:  # frames are host bytes (gloo): GPU payloads copied
                src_t = payload if payload is not None else local
                frames[key] = wire.encode(src_t.cpu(), kind,
                                          seq=seq, src=self.rank, t_send=t_start, bits=bits,
                                          widths=widths)
            f = frames[key]
            if self.tamper is not None:
                f = self.tamper(seq, d, f.clone())
            sent += f.numel()
            works.append(("send", d, dist.isend(f, d, tag=tag)))
        recv_bufs = {}
        for s, e in expect.items():
            n = wire.frame_nbytes(e["kind"], e["rows"], e["tokens"], e["width"], e.get("bits", 0))
            buf = torch.empty(n, dtype=torch.uint8)
            recv_bufs[s] = buf
            works.append(("recv", s, dist.irecv(buf, s, tag=tag)))
        return _Handle(self, seq, what, works, recv_bufs, expect, plan, t_start, sent)

    def _finish(self, h: _Handle) -> List[Tensor]:
        self.clock.tick()  # the local work done while the bytes travelled
        virtual = getattr(self.clock, "virtual", False)
        if virtual:
            self.clock.release()
        c0 = time.thread_time()
        for op, peer, w in h.works:
            t0 = time.monotonic()
            try:
                w.wait(timeout=timedelta(seconds=self.timeout_s))
            except Exception as e:  # noqa: BLE001
                raise CommError(
                    f"rank {self.rank}: {h.what} (collective {h.seq}) did not complete within "
                    f"{self.timeout_s:g} s: {op} {'to' if op == 'send' else 'from'} rank "
                    f"{peer} failed (that rank died or hangs): {e}",
                    timed_out=self._timed_out(t0)) from e
        blocked_cpu = time.thread_time() - c0
        if virtual:
            self.clock.acquire()
        # CPU burnt while blocked on the real transfer is not compute: the link model
        # accounts for the transfer
        self.clock.discount(blocked_cpu)
        out: List[Optional[Tensor]] = [None] * self.world_size
        starts = [h.t_start]
        recv = resend_rounds = resend_bytes = 0
        for s, buf in h.recv_bufs.items():
            e = h.expect[s]
            fr = wire.decode(buf, seq=h.seq, src=s, **e)
            starts.append(fr.t_send)
            recv += buf.numel()
            t = wire.decode_tensor(fr)
            if fr.kind in wire.CODE_KINDS:
                self.codes_received += t.shape[0] * t.shape[1]
                if self.link is not None and self.link.loss > 0:
                    t, rounds, resent = self._drop(t, h.seq, s, fr)
                    resend_rounds, resend_bytes = max(resend_rounds, rounds), resend_bytes + resent
                    self.codes_lost += int((t[..., 0] < 0).sum())
            out[s] = t.to(self.device)
        link_s = wait_s = 0.0
        mbps = None
        if self.link is not None and self.link_mode != "none" and h.recv_bufs:
            if self.link_mode == "model":
                at = max(starts) + self.trace_base  # a bandwidth trace's time
                link_s = self._duration(h.seq, h.plan, at)
                if link_s > 0:  # the bandwidth its bytes took (the emulated link's, at)
                    mbps = self.link.bandwidth_at(at)
                if resend_rounds:  # NACK and resend: a latency and the bytes per round
                    link_s += resend_rounds * self._latency(h.seq) + \
                        self.link.serialization_s([(1, 0, resend_bytes)], at)
                wait_s = self.clock.wait_until(max(starts) + link_s)
            else:  # real shaped link: only the one-way latency is added here
                link_s = (1 + resend_rounds) * self._latency(h.seq)
                wait_s = self.clock.wait_until(self.clock.now() + link_s)
        self.stats.append(CollectiveStat(h.seq, h.what, h.sent, recv, link_s, wait_s, blocked_cpu,
                                         mbps))
        if h.own is not None:
            out[self.rank] = h.own
        for s in range(self.world_size):
            if out[s] is None and h.own is not None:  # not needed here (causal): empty
                B, _, W = h.own.shape
                out[s] = h.own.new_empty(B, 0, W)
        return out

    # ------------------------------------------------------------------ link model
    def _latency(self, seq: int) -> float:
        lk = self.link
        j = (random.Random(lk.seed * 1_000_003 + seq).uniform(0, lk.jitter_ms)
             if lk.jitter_ms else 0.0)
        return (lk.latency_ms + j) * 1e-3

    def _duration(self, seq: int, plan, at: Optional[float] = None) -> float:
        if not any(n > 0 and s != d for s, d, n in plan):
            return 0.0
        return self._latency(seq) + self.link.serialization_s(plan, at)

    def _drop(self, codes: Tensor, seq: int, src: int, fr: wire.Frame):
        """``(codes with lost tokens -1, resend rounds used, bytes resent)``."""
        lk = self.link
        rng = random.Random(((lk.seed * 1_000_003 + seq) * 4099 + src) * 4099 + self.rank)
        nbytes = fr.payload.numel()
        lost = [(a, min(a + lk.mtu, nbytes)) for a in range(0, nbytes, lk.mtu)
                if rng.random() < lk.loss]
        rounds = resent = 0
        while lost and rounds < lk.resend:  # ask again for what was lost
            rounds += 1
            resent += sum(b - a for a, b in lost)
            lost = [p for p in lost if rng.random() < lk.loss]
        if not lost:
            return codes, rounds, resent
        B, T, G = codes.shape
        per_token = fr.bits if fr.kind == "rcodes" else G * fr.bits  # rcodes: bits per token
        if per_token <= 0:
            return codes, rounds, resent
        idx = missing_tokens(lost, per_token, B * T)
        codes = codes.reshape(B * T, G).clone()
        codes[idx] = -1
        return codes.reshape(B, T, G), rounds, resent

    # ------------------------------------------------------------------ reporting
    def bytes_sent(self) -> int:
        return sum(s.bytes_sent for s in self.stats)

    def reset_stats(self) -> None:
        self.stats = []

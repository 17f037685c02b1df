"""Link models: how long a set of transfers takes on a slow network.

A transfer plan is a list of ``(src, dst, nbytes)``. :class:`LinkModel` turns it into
a duration:

- ``shared`` medium (Wi-Fi-like): every byte of every transfer takes turns on one
  channel, so the plan costs ``latency + 8 * total_bytes / bandwidth``;
- ``switched`` (full-duplex links to a switch): each rank's uplink and downlink run in
  parallel, so the plan costs ``latency + 8 * max(bytes through one port) / bandwidth``.

``latency_ms`` is the one-way latency of a transfer; ``jitter_ms`` adds a uniformly
random ``[0, jitter]`` to it; ``loss`` is the probability that a packet (``mtu`` bytes of
one payload) is lost. Loss is applied by the runner to the payload it received: tokens
whose bytes lie in a lost packet become missing codes (-1). ``resend`` rounds model a
receiver that asks for its lost packets again (a NACK per layer): each round costs one
more latency plus the resent bytes, and a packet lost in every round stays lost
(probability ``loss ** (1 + resend)``). ``trace``: a link whose bandwidth changes
during the run, ``((t, mbps), ...)``: from ``t`` seconds after the run started on, the
bandwidth is ``mbps`` (before the first entry: ``bandwidth_mbps``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple

Transfer = Tuple[int, int, int]  # (src rank, dst rank, bytes)


@dataclass
class LinkModel:
    """Bandwidth in Mbit/s (10**6 bits), one-way latency and jitter in ms."""

    bandwidth_mbps: float
    latency_ms: float = 0.0
    medium: str = "shared"
    jitter_ms: float = 0.0
    loss: float = 0.0
    mtu: int = 1500
    seed: int = 0
    resend: int = 0
    trace: Optional[Tuple[Tuple[float, float], ...]] = None
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self):
        if self.bandwidth_mbps <= 0:
            raise ValueError(f"bandwidth_mbps must be > 0, got {self.bandwidth_mbps}")
        if self.latency_ms < 0 or self.jitter_ms < 0:
            raise ValueError("latency_ms and jitter_ms must be >= 0")
        if self.medium not in ("shared", "switched"):
            raise ValueError(f"medium must be 'shared' or 'switched', got {self.medium!r}")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError(f"loss must be in [0, 1), got {self.loss}")
        if not isinstance(self.resend, int) or self.resend < 0:
            raise ValueError(f"resend must be an int >= 0, got {self.resend!r}")
        if self.trace is not None:
            self.trace = tuple((float(t), float(b)) for t, b in self.trace)
            if any(t < 0 or not b > 0 for t, b in self.trace) or \
                    [t for t, _ in self.trace] != sorted(t for t, _ in self.trace):
                raise ValueError(f"a bandwidth trace is (seconds >= 0, Mbit/s > 0) pairs in "
                                 f"time order, got {self.trace}")
        self._rng = random.Random(self.seed)

    def bandwidth_at(self, t: Optional[float] = None) -> float:
        """Mbit/s at ``t`` seconds after the run started (the trace's; without a trace or
        a time, ``bandwidth_mbps``)."""
        bw = self.bandwidth_mbps
        if self.trace and t is not None:
            for t_i, b in self.trace:
                if t >= t_i:
                    bw = b
        return bw

    def shifted(self, seconds: float) -> "LinkModel":
        """The same link ``seconds`` later (a later run continues the trace)."""
        if not self.trace or seconds <= 0:
            return self
        bw = self.bandwidth_at(seconds)
        trace = tuple((t - seconds, b) for t, b in self.trace if t > seconds)
        return LinkModel(bw, self.latency_ms, self.medium, self.jitter_ms, self.loss, self.mtu,
                         self.seed, self.resend, trace or None)

    def serialization_s(self, plan: Iterable[Transfer], at: Optional[float] = None) -> float:
        """Seconds the bytes of ``plan`` occupy the medium (no latency), at ``at`` seconds
        after the run started (for a trace)."""
        plan = [t for t in plan if t[2] > 0 and t[0] != t[1]]
        if not plan:
            return 0.0
        if self.medium == "shared":
            busiest = sum(n for _, _, n in plan)
        else:
            up, down = {}, {}
            for s, d, n in plan:
                up[s] = up.get(s, 0) + n
                down[d] = down.get(d, 0) + n
            busiest = max(max(up.values()), max(down.values()))
        return 8.0 * busiest / (self.bandwidth_at(at) * 1e6)

    def latency_s(self) -> float:
        """One-way latency of one transfer, with jitter drawn from the model's RNG."""
        jitter = self._rng.uniform(0.0, self.jitter_ms) if self.jitter_ms else 0.0
        return (self.latency_ms + jitter) * 1e-3

    def duration_s(self, plan: Sequence[Transfer], at: Optional[float] = None) -> float:
        """Seconds from the start of ``plan`` until its last byte has arrived."""
        if not any(n > 0 and s != d for s, d, n in plan):
            return 0.0
        return self.latency_s() + self.serialization_s(plan, at)

    def lost_packets(self, nbytes: int) -> List[Tuple[int, int]]:
        """Byte ranges ``[start, end)`` of a payload of ``nbytes`` lost on the way."""
        if not self.loss or nbytes <= 0:
            return []
        out = []
        for start in range(0, nbytes, self.mtu):
            if self._rng.random() < self.loss:
                out.append((start, min(start + self.mtu, nbytes)))
        return out


def all_gather_plan(nbytes: Sequence[int], receivers: Optional[Sequence[Sequence[int]]] = None
                    ) -> List[Transfer]:
    """Plan of an all-gather where rank r sends ``nbytes[r]`` to each receiver.

    ``receivers[r]`` lists who needs rank r's payload (default: every other rank; causal
    models send only to later ranks).
    """
    world = len(nbytes)
    plan = []
    for src in range(world):
        dsts = receivers[src] if receivers is not None else range(world)
        plan += [(src, dst, nbytes[src]) for dst in dsts if dst != src]
    return plan


def missing_tokens(lost: Sequence[Tuple[int, int]], bits_per_token: int, tokens: int) -> List[int]:
    """Indices of tokens whose packed bits overlap a lost byte range."""
    out = set()
    for start, end in lost:
        first = (start * 8) // bits_per_token
        last = min(tokens - 1, (end * 8 - 1) // bits_per_token)
        out.update(range(first, last + 1))
    return sorted(out)

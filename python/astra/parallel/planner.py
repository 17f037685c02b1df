"""The planner: which devices take part, how many tokens each holds, or one device alone.

For a request (a model's :class:`~astra.parallel.costmodel.ComputeCost` at its token
count, the devices' speeds, the link) :func:`plan` considers one device alone (the
fastest) and an ``astra`` split over the ``k`` fastest devices for every ``k``, with
chunks sized so that every rank's compute takes about as long (:func:`balanced_chunks`:
faster devices and, for causal models, earlier positions get more tokens), then moved
where the predicted time (link waits included) says so. It returns the plan the cost
model predicts to be fastest (ties: fewer devices). Decisions depend only on the costs
given: the same costs give the same plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from .costmodel import ComputeCost, predict_astra, predict_single, rank_compute
from .links import LinkModel

__all__ = ["Plan", "plan", "balanced_chunks", "check_speeds"]


@dataclass
class Plan:
    """``strategy`` (``single`` or ``astra``) on ``devices`` (indices into the speeds
    given, in rank order) holding ``chunks`` tokens (None for ``single``);
    ``predicted_s`` its predicted time, ``single_s`` the fastest device's alone;
    ``considered``: every candidate's ``(devices, predicted_s)``."""

    strategy: str
    devices: List[int]
    chunks: Optional[List[int]]
    predicted_s: float
    single_s: float
    speeds: List[float] = field(default_factory=list)
    considered: List[Dict[str, Any]] = field(default_factory=list)

    def line(self) -> str:
        """One line for the user: the devices, the chunks, predicted times."""
        devs = ",".join(map(str, self.devices))
        if self.strategy == "astra":
            return (f"plan: astra on devices {devs} (chunks {','.join(map(str, self.chunks))}), "
                    f"predicted {self.predicted_s * 1e3:.0f} ms; the fastest device alone "
                    f"{self.single_s * 1e3:.0f} ms")
        splits = [c for c in self.considered if c["chunks"]]
        best = min(splits, key=lambda c: c["predicted_ms"]) if splits else None
        return (f"plan: one device ({devs}) alone, predicted {self.predicted_s * 1e3:.0f} ms"
                + (f"; the best split ({len(best['devices'])} devices) "
                   f"{best['predicted_ms']:.0f} ms" if best else ""))

    def as_dict(self) -> Dict[str, Any]:
        return dict(strategy=self.strategy, devices=list(self.devices),
                    chunks=None if self.chunks is None else list(self.chunks),
                    predicted_ms=self.predicted_s * 1e3)


def check_speeds(speeds: Optional[Sequence[float]], devices: int) -> List[float]:
    """``speeds`` (one positive number per device) or all 1; ``ValueError`` otherwise."""
    if speeds is None:
        return [1.0] * devices
    speeds = [float(s) for s in speeds]
    if len(speeds) != devices:
        raise ValueError(f"--device-speeds has {len(speeds)} entries but there are {devices} "
                         "devices")
    if min(speeds) <= 0:
        raise ValueError(f"--device-speeds must be positive, got {speeds}")
    return speeds


def balanced_chunks(cost: ComputeCost, n: int, speeds: Sequence[float]) -> List[int]:
    """Contiguous chunks of ``n`` tokens for ranks of ``speeds`` that minimize the
    slowest rank's block time (compute only; each rank at least one token): a bisection
    on that time, each rank taking the most tokens that fit in it."""
    W = len(speeds)
    if n < W:
        raise ValueError(f"{n} tokens cannot be split over {W} devices")

    def fill(tau: float) -> Optional[List[int]]:
        out, lo = [], 0
        for r in range(W):
            cap = n - (W - r - 1)  # leave one token for every later rank
            if r == W - 1:
                hi = n
            else:
                a, b = lo + 1, cap  # largest hi in [a, b] that fits in tau
                if _time(cost, lo, a, n, speeds[r], W) > tau:
                    return None
                while a < b:
                    m = (a + b + 1) // 2
                    if _time(cost, lo, m, n, speeds[r], W) <= tau:
                        a = m
                    else:
                        b = m - 1
                hi = a
            if _time(cost, lo, hi, n, speeds[r], W) > tau:
                return None
            out.append(hi - lo)
            lo = hi
        return out

    lo_t, hi_t = 0.0, max(_time(cost, 0, n, n, s, W) for s in speeds) * 2 + 1e-9
    best = fill(hi_t)
    for _ in range(60):
        mid = (lo_t + hi_t) / 2
        got = fill(mid)
        if got is None:
            lo_t = mid
        else:
            hi_t, best = mid, got
    return best


def _time(cost: ComputeCost, lo: int, hi: int, n: int, speed: float, world: int) -> float:
    return rank_compute(cost, lo, hi, n, world) / speed


def _refine(cost: ComputeCost, chunks: List[int], speeds: Sequence[float],
            link: LinkModel) -> tuple:
    """Move chunk boundaries while the predicted time (link waits included) drops."""
    best_t = predict_astra(cost, chunks, speeds, link)
    step = max(1, sum(chunks) // 32)
    while step >= 1:
        improved = True
        while improved:
            improved = False
            for i in range(len(chunks) - 1):
                for d in (step, -step):
                    c = list(chunks)
                    c[i] += d
                    c[i + 1] -= d
                    if min(c) < 1:
                        continue
                    t = predict_astra(cost, c, speeds, link)
                    if t < best_t * (1 - 1e-9):
                        chunks, best_t, improved = c, t, True
        step //= 2
    return chunks, best_t


def plan(cost: ComputeCost, speeds: Sequence[float], link: LinkModel,
         n: Optional[int] = None, devices: Optional[Sequence[int]] = None) -> Plan:
    """The fastest predicted plan for ``n`` tokens (default ``cost.tokens``) on devices
    of ``speeds`` joined by ``link`` (see the module docstring); ``devices``: the
    indices that may take part (default all; a re-plan leaves the lost ones out)."""
    speeds = list(speeds)
    n = cost.tokens if n is None else n
    pool = list(range(len(speeds))) if devices is None else list(devices)
    if not pool:
        raise ValueError("no device to plan on")
    order = sorted(pool, key=lambda d: (-speeds[d], d))
    fastest = order[0]
    single_s = predict_single(cost, n, speeds[fastest])
    best = Plan("single", [fastest], None, single_s, single_s, [speeds[fastest]])
    considered = [dict(devices=[fastest], chunks=None, predicted_ms=single_s * 1e3)]
    top = min(len(order), n)
    for k in range(2, top + 1):
        devs = order[:k]
        sp = [speeds[d] for d in devs]
        chunks, t = _refine(cost, balanced_chunks(cost, n, sp), sp, link)
        considered.append(dict(devices=devs, chunks=chunks, predicted_ms=t * 1e3))
        if t < best.predicted_s * (1 - 1e-9):
            best = Plan("astra", devs, chunks, t, single_s, sp)
    best.considered = considered
    return best

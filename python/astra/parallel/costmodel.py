"""The cost model: how long a request takes on one device or split over several.

Pure arithmetic (no torch, no processes; the link is a
:class:`~astra.parallel.links.LinkModel` taken at its mean): the planner
(:mod:`astra.parallel.planner`) asks it for the time of every plan it considers;
:mod:`astra.parallel.probe` fits its compute part from short measured forwards.

**Compute.** One block on one device (speed 1) costs

    fixed + per_token · n + per_pair · local_pairs + per_remote_pair · remote_pairs

for a rank holding ``n`` tokens: ``local_pairs`` are the (query, key) pairs among its own
tokens (``n²``, causal ``n(n+1)/2``), ``remote_pairs`` those with the other ranks' tokens
it sees (``n·(T-n)``, causal ``n·lo``: only earlier positions). ``single`` is the plain
model's block on the whole sequence, ``astra`` one rank's block in distributed mode (the
encoder and the gathers from the projected tables included). A device of speed ``s``
takes ``1/s`` of these times. Embedding and tail cost ``head_per_token`` per token.

**The exchange, as the runner does it** (:class:`~astra.parallel.comm.DistCommunicator`):
per layer a rank normalizes and encodes its tokens (``pre``), starts the all-gather of
the codes, projects q/k/v and attends to its own tokens while they travel (``mid``: the
only work that hides under the link), waits for the codes of the ranks it sees, then
attends to them and runs the rest of the block (the output projection and the MLP: what
is left of ``astra``). The probe times ``pre`` and ``mid`` inside the block; a cost
given by hand may instead say which shares of the per-token cost they take
(``send_share``, ``local_share``; the fixed cost then counts after the wait). The collective
completes one link duration (latency + the serialization of every frame of the layer, on
a shared or switched medium: :class:`~astra.parallel.links.LinkModel`) after the last
send it waits for. At the end the ranks' summaries go to rank 0.

:func:`predict_single` and :func:`predict_astra` give seconds; the event recurrence in
:func:`predict_astra` follows every rank through every layer, so slow ranks, causal
waits (later ranks wait for all earlier ones) and the overlap come out as the runner
has them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Sequence

from .links import LinkModel

__all__ = ["BlockCost", "ComputeCost", "steady", "pairs", "frames", "predict_single",
           "predict_astra", "rank_compute"]

HEADER_BYTES = 44  # astra.parallel.wire.HEADER_BYTES (a test checks they agree)


@dataclass(frozen=True)
class BlockCost:
    """Seconds of one block at speed 1 (see the module docstring)."""

    fixed_s: float
    per_token_s: float
    per_pair_s: float
    per_remote_pair_s: float = 0.0

    def __call__(self, n: float, local_pairs: float, remote_pairs: float = 0.0) -> float:
        return (self.fixed_s + self.per_token_s * n + self.per_pair_s * local_pairs
                + self.per_remote_pair_s * remote_pairs)


@dataclass(frozen=True)
class ComputeCost:
    """A model's compute on one device at speed 1, for ``tokens`` content tokens.

    ``layers`` blocks; ``causal``; ``single`` / ``astra`` the block costs;
    ``pre`` / ``mid``: the parts of ``astra`` before the codes leave and between the
    send and the wait (measured; the rest comes after the wait); without them
    ``send_share`` / ``local_share`` of the per-token cost (plus the local pairs) stand
    for them; ``head_per_token_s``: embedding and tail; ``bits_per_token`` and ``dim``:
    what travels (codes per token per layer; the summary's width); ``exchange_s``: per
    layer, a rank's fixed cost of one exchange (framing, posting), and
    ``exchange_peer_s`` per frame it sends or receives."""

    layers: int
    causal: bool
    tokens: int
    single: BlockCost
    astra: BlockCost
    head_per_token_s: float
    bits_per_token: int
    dim: int
    send_share: float = 0.1
    local_share: float = 0.25
    exchange_s: float = 0.0
    exchange_peer_s: float = 0.0
    pre: Optional[BlockCost] = None
    mid: Optional[BlockCost] = None

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ComputeCost":
        d = dict(d)
        d["single"] = BlockCost(**d["single"])
        d["astra"] = BlockCost(**d["astra"])
        for k in ("pre", "mid"):
            if d.get(k) is not None:
                d[k] = BlockCost(**d[k])
        return cls(**d)

    def exchange(self, n_frames: int) -> float:
        """Seconds of one layer's exchange overhead for a rank posting ``n_frames``
        frames (sends and receives; see :func:`frames`)."""
        return self.exchange_s + self.exchange_peer_s * n_frames if n_frames else 0.0

    def phases(self, n: int, lp: float, rp: float) -> tuple:
        """``(pre, mid, post)`` seconds of one astra block at speed 1 for a rank of
        ``n`` tokens with ``lp`` local and ``rp`` remote pairs (no exchange overhead)."""
        if self.pre is not None and self.mid is not None:
            a, b = self.pre(n, 0.0), self.mid(n, lp)
        else:
            per_tok = self.astra.per_token_s * n
            a = self.send_share * per_tok
            b = self.local_share * per_tok + self.astra.per_pair_s * lp
        return a, b, max(0.0, self.astra(n, lp, rp) - a - b)


def steady(link: LinkModel) -> LinkModel:
    """``link`` without randomness: its mean latency, no jitter, no loss (what a plan
    expects on average)."""
    return LinkModel(link.bandwidth_mbps, link.latency_ms + link.jitter_ms / 2,
                     medium=link.medium)


def pairs(lo: int, hi: int, total: int, causal: bool) -> tuple:
    """``(local, remote)`` query-key pairs of the rank holding tokens ``[lo, hi)``."""
    n = hi - lo
    if causal:
        return n * (n + 1) / 2, n * lo
    return n * n, n * (total - n)


def predict_single(cost: ComputeCost, n: Optional[int] = None, speed: float = 1.0) -> float:
    """Seconds of the whole request on one device of ``speed`` (``n`` tokens)."""
    n = cost.tokens if n is None else n
    lp, _ = pairs(0, n, n, cost.causal)
    return (cost.head_per_token_s * n + cost.layers * cost.single(n, lp)) / speed


def frames(world: int, causal: bool) -> int:
    """Frames every rank of ``world`` posts per layer (sends and receives): causal ranks
    hear from the earlier ranks and send to the later ones, ``world - 1`` in all; the
    others exchange with everyone both ways."""
    return (world - 1) * (1 if causal else 2)


def rank_compute(cost: ComputeCost, lo: int, hi: int, n: int, world: int) -> float:
    """Seconds of one block (speed 1) of the astra rank holding tokens ``[lo, hi)`` of
    ``n`` in a run of ``world`` ranks, its exchange's overhead included."""
    lp, rp = pairs(lo, hi, n, cost.causal)
    return cost.astra(hi - lo, lp, rp) + cost.exchange(frames(world, cost.causal))


def _frame(cost: ComputeCost, tokens: int) -> int:
    return HEADER_BYTES + (tokens * cost.bits_per_token + 7) // 8


def predict_astra(cost: ComputeCost, chunks: Sequence[int], speeds: Sequence[float],
                  link: LinkModel, detail: bool = False):
    """Seconds of the request split as ``chunks`` over ranks of ``speeds`` on ``link``
    (rank 0's clock, as the runner measures it). ``detail``: also each rank's busy
    compute and link waits ``(seconds, [{"compute_s", "wait_s"}])``."""
    W = len(chunks)
    if W != len(speeds) or W < 1 or min(chunks) < 1:
        raise ValueError(f"chunks {list(chunks)} and speeds {list(speeds)} must have one "
                         "positive entry per rank")
    causal, T = cost.causal, sum(chunks)
    senders = [[q for q in range(W) if q != r and (not causal or q < r)] for r in range(W)]
    plan = [(s, d, _frame(cost, chunks[s])) for s in range(W) for d in range(W)
            if d != s and (not causal or d > s)]
    link = steady(link)
    dur = link.duration_s(plan) if W > 1 else 0.0
    pre, mid, post = [], [], []
    for r in range(W):
        lo = sum(chunks[:r])
        a, b, c = cost.phases(chunks[r], *pairs(lo, lo + chunks[r], T, causal))
        pre.append(a / speeds[r])
        mid.append((b + cost.exchange(frames(W, causal))) / speeds[r])
        post.append(c / speeds[r])
    end = [cost.head_per_token_s * chunks[r] / speeds[r] for r in range(W)]
    waits = [0.0] * W
    for _ in range(cost.layers):
        send = [end[r] + pre[r] for r in range(W)]
        for r in range(W):
            ready = send[r] + mid[r]
            if senders[r]:
                arrive = max(send[q] for q in senders[r] + [r]) + dur
                waits[r] += max(0.0, arrive - ready)
                ready = max(ready, arrive)
            end[r] = ready + post[r]
    gather = link.duration_s([(s, 0, HEADER_BYTES + 4 * cost.dim) for s in range(1, W)])
    total = max(end[0], max(end[1:], default=0.0) + gather)
    if not detail:
        return total
    busy = [(pre[r] + mid[r] + post[r]) * cost.layers for r in range(W)]
    return total, [dict(compute_s=b, wait_s=w) for b, w in zip(busy, waits)]

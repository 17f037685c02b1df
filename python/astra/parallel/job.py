"""What a run is: a :class:`Job` (one strategy on one input, its link and clock), the
chunks each rank holds, how codes travel, and the summary of a job's results."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..options import STRATEGIES

__all__ = ["Job", "RunnerError", "STRATEGIES", "default_chunks", "chunk_cost", "attn_per_key",
           "job_codebooks", "wire_bits", "check_device", "check_chunks", "summarize", "fidelity",
           "LOSS_WARNING"]


class RunnerError(RuntimeError):
    """A rank failed, hung or the run did not finish; the message names the rank.

    ``lost``: the ranks that dropped out (died without a Python error, were killed, or
    stopped answering), which a re-plan can do without; empty when a rank failed with
    an error of its own (a bug or bad input: every rank would fail the same way)."""

    def __init__(self, message: str, lost=()):
        super().__init__(message)
        self.lost = list(lost)


@dataclass
class Job:
    """One strategy run ``warmup + repeats`` times on ``inputs`` by every rank.

    ``codebooks`` (astra): a tensor ``[L, G, K, D/G]`` (grouped) or an
    :class:`astra.Codebooks` (grouped or residual), or a residual tensor with
    ``stage_sizes``. ``chunks``: content tokens per rank (default: balanced by
    estimated cost, :func:`default_chunks`: equal for non-causal models, earlier ranks
    more tokens for causal ones).
    ``output``: ``"full"`` hidden states / logits, or ``"compact"`` (what an application
    needs), or ``"nll"`` (causal LMs: each next token's negative log-likelihood
    ``[B, T-1]``, for perplexity). ``link`` a :class:`~astra.parallel.links.LinkModel`
    applied as ``link_mode``
    (``model``: bandwidth + latency, ``latency``: latency only, over a real link;
    ``none``). ``clock``: ``wall`` or ``virtual`` (each rank's CPU time on one timeline).
    ``fault`` is a test hook (:data:`astra.parallel.worker.FAULTS`): ``"die:<rank>"``,
    ``"hang:<rank>"``, ``"corrupt:<rank>"``, ``"truncate:<rank>"``.
    ``watch_link > 0``: after each timed pass the ranks compare the bandwidth the link's
    transfer times say with ``link.bandwidth_mbps`` and stop early when it differs by
    more than that fraction (the result then says where: ``link_changed``), so that the
    requests left can be re-planned.
    ``max_new_tokens > 0`` (causal LMs; ``single``, ``sp``, ``astra``): a generation
    job (:mod:`astra.parallel.generate`): the ranks prefill ``inputs`` but its last
    token, then the rank holding the last chunk generates with HF ``generate``
    keyword arguments ``generation`` (``do_sample``, ``temperature``, ... and
    ``seed``); ``decode_weights`` (``fp32``/``int8``): the Llama family decodes by
    :mod:`astra.decode` with those weights (None: HF's own forward).
    """

    strategy: str
    inputs: torch.Tensor
    wire: str = "fp32"
    codebooks: Optional[Any] = None
    stage_sizes: Optional[Sequence[Any]] = None
    chunks: Optional[List[int]] = None
    output: str = "full"
    link: Optional[Any] = None
    link_mode: str = "model"
    clock: str = "wall"
    repeats: int = 1
    warmup: int = 0
    timeout_s: float = 60.0
    fault: Optional[str] = None
    name: str = ""
    max_new_tokens: int = 0
    generation: Optional[Dict[str, Any]] = None
    decode_weights: Optional[str] = None
    watch_link: float = 0.0


def default_chunks(n_content: int, world: int, attn_per_key: float = 0.0) -> List[int]:
    """Contiguous chunks of ``n_content`` tokens over ``world`` ranks, balanced by cost.

    Cost model (per layer): the token at position ``p`` (0-based) costs
    ``1 + attn_per_key * (p + 1)`` in units of one token's linear FLOPs (projections and
    MLP): a causal query attends to ``p + 1`` keys (see :func:`attn_per_key`). With
    ``attn_per_key == 0`` (non-causal models: every query attends to every key, so
    all tokens cost alike) the chunks are ``torch.tensor_split``'s: equal, the first
    ``n % world`` one token longer. Otherwise the split minimizes the costliest rank's
    cost, then maximizes the cheapest's (so estimated costs lie within the last
    token's cost of each other); chunk sizes are non-increasing (earlier ranks, whose
    tokens see fewer keys, take more of them) and positive.
    """
    if attn_per_key < 0:
        raise ValueError(f"attn_per_key must be >= 0, got {attn_per_key}")
    if attn_per_key == 0 or world == 1 or n_content <= world:
        return [int(c.numel()) for c in torch.tensor_split(torch.arange(n_content), world)]
    bounds = _balanced_bounds(n_content, world, float(attn_per_key))
    if bounds is None:  # no candidate split (cannot happen for n > world; be safe)
        return default_chunks(n_content, world)
    # swapping an inverted adjacent pair never raises the pair's max nor lowers its min
    return sorted((bounds[i + 1] - bounds[i] for i in range(world)), reverse=True)


def chunk_cost(lo: int, hi: int, attn_per_key: float) -> float:
    """Estimated cost of tokens ``[lo, hi)`` under :func:`default_chunks`' model."""
    return (hi - lo) + attn_per_key * (hi * (hi + 1) - lo * (lo + 1)) / 2


def _balanced_bounds(n: int, world: int, w: float, reach: int = 2) -> Optional[List[int]]:
    """Chunk boundaries ``[0, b_1, ..., n]``: each ``b_k`` within ``reach`` tokens of
    where the cumulative cost reaches ``k/world`` of the total; among those, the least
    maximum cost, then the largest minimum (two exact passes over the candidates)."""
    total = chunk_cost(0, n, w)
    cand = [[0]]
    for k in range(1, world):  # cost(0, x) = k/world * total, solved for real x
        t = k * total / world
        x = (math.sqrt((1 + w / 2) ** 2 + 2 * w * t) - (1 + w / 2)) / w
        lo, hi = k, n - world + k  # room for one token on every rank
        cand.append(list(range(min(max(lo, math.floor(x) - reach), hi),
                               max(min(hi, math.ceil(x) + reach), lo) + 1)))
    cand.append([n])
    best = {0: 0.0}  # boundary -> least bottleneck of the chunks before it
    for k in range(1, world + 1):
        best = {b: min((max(m, chunk_cost(p, b, w)) for p, m in best.items() if p < b),
                       default=math.inf) for b in cand[k]}
    if best[n] == math.inf:
        return None
    cap = best[n] * (1 + 1e-12)
    rows = [{0: (math.inf, None)}]  # boundary -> (largest minimum, previous boundary)
    for k in range(1, world + 1):
        row = {}
        for b in cand[k]:
            pick = (-math.inf, None)
            for p, (low, _) in rows[-1].items():
                c = chunk_cost(p, b, w)
                if p < b and c <= cap and low > -math.inf and min(low, c) > pick[0]:
                    pick = (min(low, c), p)
            row[b] = pick
        rows.append(row)
    bounds = [n]
    for k in range(world, 0, -1):
        bounds.append(rows[k][bounds[-1]][1])
    return bounds[::-1]


def attn_per_key(model, adapter) -> float:
    """The causal cost weight of ``model`` for :func:`default_chunks`: attention FLOPs
    per key a query attends (``4·H·d``: scores and values) over the linear FLOPs of
    one token in a block (``2·`` the block's matrix weights: q/k/v/o projections and
    the MLP, whatever their shapes, GQA and gated MLPs included). 0 for non-causal
    models (all tokens cost alike) and models without the HF config fields."""
    if not adapter.causal:
        return 0.0
    cfg = getattr(model, "config", None)
    H = getattr(cfg, "num_attention_heads", None)
    if not H:
        return 0.0
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    linear = 2 * sum(p.numel() for p in adapter.layers(model)[0].parameters() if p.dim() >= 2)
    return 4.0 * H * d / linear if linear else 0.0


def job_codebooks(job: Job):
    """The job's codebooks as an :class:`astra.Codebooks` (None without)."""
    from astra.codebooks import Codebooks
    cb = job.codebooks
    if cb is None:
        return None
    if isinstance(cb, Codebooks):
        if job.stage_sizes is not None:
            raise ValueError("give stage_sizes with a codebooks tensor, not with a Codebooks")
        return cb
    return Codebooks(cb, stage_sizes=job.stage_sizes)


def wire_bits(cb) -> Dict[str, Any]:
    """How the codes of ``cb`` (an :class:`astra.Codebooks`) travel: grouped codebooks
    ``bits`` per code for all G columns (``stage_bits`` None); residual codebooks
    ``stage_bits[l][s] = ceil(log2 K_s)`` per layer and stage (0 for a size-1 stage)."""
    if cb.stages(0) is None:
        K = cb.codebook_size
        return dict(bits=max(1, (K - 1).bit_length()), stage_bits=None,
                    G=cb.codes_per_token, K=K)
    stage_bits = [tuple((int(k) - 1).bit_length() for k in cb.stages(i))
                  for i in range(cb.num_layers)]
    return dict(bits=0, stage_bits=stage_bits, G=cb.codes_per_token, K=cb.codebook_size)


def check_chunks(chunks: Optional[Sequence[int]], n_content: int, world: int) -> None:
    """Refuse a split that cannot run, before any rank starts: fewer tokens than
    ranks, or ``chunks`` (given) whose count is not ``world`` or whose sum is not
    ``n_content``. ``ValueError``."""
    if n_content < world:
        raise ValueError(f"{n_content} tokens cannot be split over {world} devices (each "
                         f"needs at least one); use more tokens or fewer devices")
    if chunks is None:
        return
    chunks = list(chunks)
    if len(chunks) != world:
        raise ValueError(f"--chunks has {len(chunks)} entries {chunks} but there are {world} "
                         f"devices")
    if min(chunks) < 1 or sum(chunks) != n_content:
        raise ValueError(f"--chunks {','.join(map(str, chunks))} must be positive and sum to "
                         f"the {n_content} tokens the devices split (sum is {sum(chunks)})")


def check_device(device: str, clocks: Sequence[str]) -> None:
    """Refuse what cannot run: an unknown ``device``, ``cuda`` where torch sees no GPU,
    or GPU ranks on the virtual clock (it counts a rank's CPU time, which says nothing
    of GPU work). ``ValueError``."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and "virtual" in clocks:
        raise ValueError("--clock virtual counts CPU time; use --clock wall with --device "
                         "cuda (clock='wall' with device='cuda')")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device on this host "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")


def summarize(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One job's per-rank results -> median latency (rank 0's clock), bytes per device,
    and the remote token codes each rank received and lost on the link (all passes)."""
    r0 = results[0]
    par = r0["strategy"] != "single"
    sent = [statistics.median(r["bytes_sent"]) for r in results] if par else [0]
    recv = [r.get("codes_received", 0) for r in results]
    lost = [r.get("codes_lost", 0) for r in results]
    return dict(strategy=r0["strategy"], wire=r0["wire"], latency_s=statistics.median(r0["times"]),
                times=r0["times"], bytes_per_device=max(sent),
                wait_s=statistics.median(r0["waits"]) if r0["waits"] else 0.0,
                codes_received=recv, codes_lost=lost, handshake=r0.get("handshake"),
                lost_fraction=sum(lost) / sum(recv) if sum(recv) else 0.0)


LOSS_WARNING = 0.2  # lost fraction of remote codes above which the output is called useless


def fidelity(out, ref, logits: bool = False) -> dict:
    """How close a run's compact output is to one device's: cosine and relative L2 error
    of the whole tensor, and for ``logits`` the share of rows whose top-1 agrees."""
    a, b = out.double().flatten(), ref.double().flatten()
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    row = dict(cosine=cos, rel_error=float((a - b).norm() / b.norm().clamp_min(1e-30)))
    if logits:
        row["top1"] = float((out.argmax(-1) == ref.argmax(-1)).double().mean())
    return row

"""What a run is: a :class:`Job` (one strategy on one input, its link and clock), the
chunks each rank holds, how codes travel, and the summary of a job's results."""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

__all__ = ["Job", "RunnerError", "STRATEGIES", "default_chunks", "job_codebooks", "wire_bits",
           "check_device", "summarize"]

STRATEGIES = ("single", "sp", "tp", "astra")


class RunnerError(RuntimeError):
    """A rank failed, hung or the run did not finish; the message names the rank."""


@dataclass
class Job:
    """One strategy run ``warmup + repeats`` times on ``inputs`` by every rank.

    ``codebooks`` (astra): a tensor ``[L, G, K, D/G]`` (grouped) or an
    :class:`astra.Codebooks` (grouped or residual), or a residual tensor with
    ``stage_sizes``. ``chunks``: content tokens per rank (default: balanced).
    ``output``: ``"full"`` hidden states / logits, or ``"compact"`` (what an application
    needs). ``link`` a :class:`~astra.parallel.links.LinkModel` applied as ``link_mode``
    (``model``: bandwidth + latency, ``latency``: latency only, over a real link;
    ``none``). ``clock``: ``wall`` or ``virtual`` (each rank's CPU time on one timeline).
    ``fault`` is a test hook (:data:`astra.parallel.worker.FAULTS`): ``"die:<rank>"``,
    ``"hang:<rank>"``, ``"corrupt:<rank>"``, ``"truncate:<rank>"``.
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


def default_chunks(n_content: int, world: int) -> List[int]:
    """Balanced contiguous chunks: ``n_content`` tokens over ``world`` ranks."""
    return [int(c.numel()) for c in torch.tensor_split(torch.arange(n_content), world)]


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


def check_device(device: str, clocks: Sequence[str]) -> None:
    """Refuse what cannot run: an unknown ``device``, or GPU ranks on the virtual clock
    (it counts a rank's CPU time, which says nothing of GPU work). ``ValueError``."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and "virtual" in clocks:
        raise ValueError("--clock virtual counts CPU time; use --clock wall with --device "
                         "cuda (clock='wall' with device='cuda')")


def summarize(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One job's per-rank results -> median latency (rank 0's clock), bytes per device."""
    r0 = results[0]
    par = r0["strategy"] != "single"
    sent = [statistics.median(r["bytes_sent"]) for r in results] if par else [0]
    return dict(strategy=r0["strategy"], wire=r0["wire"], latency_s=statistics.median(r0["times"]),
                times=r0["times"], bytes_per_device=max(sent),
                wait_s=statistics.median(r0["waits"]) if r0["waits"] else 0.0)

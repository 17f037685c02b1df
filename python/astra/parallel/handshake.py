"""Before the first layer: every rank proves it runs the same thing.

Codes decoded with another rank's codebook are not an error on the wire; they are a
silently wrong answer. So before any job runs, each rank computes a :func:`fingerprint`
of what it will run — the Astra and wire-format versions, the model (family identity
and a hash of the weights it loaded), and per job the options that must agree (strategy,
wire, inputs, chunks, output, codebooks as a hash of their tensor) — and
:func:`handshake` all-gathers them through the process group. Any difference stops
every rank with the same :class:`HandshakeError`, naming the ranks and the fields.
Rank 0's fingerprint is the reference. The cost (bytes, seconds) is returned.
"""
from __future__ import annotations

import hashlib
import time
from typing import Any, Dict, List, Sequence, Tuple

import torch

__all__ = ["HandshakeError", "fingerprint", "compare", "handshake", "tensor_hash"]


class HandshakeError(ValueError):
    """The ranks would run different things; the message names ranks and fields."""


def tensor_hash(*tensors: torch.Tensor) -> str:
    """A short SHA-1 of the tensors' dtypes, shapes and bytes (in order)."""
    h = hashlib.sha1()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:16]


def _weights_hash(model: torch.nn.Module) -> str:
    return tensor_hash(*[p for _, p in sorted(model.state_dict().items())])


def fingerprint(model: torch.nn.Module, jobs: Sequence[Any],
                chunks: Sequence[Sequence[int]], shared_codebooks: bool = False
                ) -> Dict[str, Any]:
    """What this rank will run: ``{field: value}`` (small, picklable).

    ``chunks``: each job's content tokens per rank, as this rank computed them.
    ``shared_codebooks``: the codebooks will come from rank 0 after the handshake (the
    field then says so instead of hashing a tensor the other ranks do not have yet)."""
    import astra_kernels
    from astra.models import resolve

    from . import wire
    from .job import job_codebooks
    ad = resolve(model)[1]
    ident = ad.identity(model)
    fp: Dict[str, Any] = {
        "astra version": astra_kernels.__version__, "wire format": wire.VERSION,
        "model": f"{ident['model']} {ident['name']}", "model config": ident["config_hash"],
        "weights": _weights_hash(model), "jobs": len(jobs)}
    for i, (job, ch) in enumerate(zip(jobs, chunks)):
        cbs = job_codebooks(job)
        p = f"job {i} " if len(jobs) > 1 else ""
        fp.update({
            f"{p}strategy": job.strategy, f"{p}wire": job.wire,
            f"{p}tokens": tuple(job.inputs.shape), f"{p}inputs": tensor_hash(job.inputs),
            f"{p}chunks": tuple(int(c) for c in ch), f"{p}output": job.output,
            f"{p}new tokens": job.max_new_tokens,
            f"{p}codebooks": "rank 0's, sent after the handshake" if shared_codebooks else
            "none" if cbs is None else
            f"{cbs.kind} {cbs.target} {tuple(cbs.tensor.shape)} {tensor_hash(cbs.tensor)}"})
    return fp


def compare(fps: Sequence[Dict[str, Any]]) -> List[Tuple[int, str, Any, Any]]:
    """``(rank, field, rank 0's value, that rank's value)`` for every difference."""
    ref = fps[0]
    out = []
    for r, fp in enumerate(fps[1:], start=1):
        for k in sorted(set(ref) | set(fp)):
            if ref.get(k) != fp.get(k):
                out.append((r, k, ref.get(k), fp.get(k)))
    return out


def describe(diffs: Sequence[Tuple[int, str, Any, Any]], world: int) -> str:
    ranks = sorted({r for r, *_ in diffs})
    fields = "; ".join(f"rank {r} {k}: {b!r} (rank 0: {a!r})" for r, k, a, b in diffs[:8])
    more = f"; and {len(diffs) - 8} more" if len(diffs) > 8 else ""
    return (f"the ranks would run different things: rank{'s' if len(ranks) > 1 else ''} "
            f"{', '.join(map(str, ranks))} of {world} differ from rank 0 — {fields}{more}. "
            "Every host needs the same model weights, codebooks file, options and Astra "
            "version")


def handshake(model: torch.nn.Module, jobs: Sequence[Any],
              chunks: Sequence[Sequence[int]], shared_codebooks: bool = False
              ) -> Dict[str, float]:
    """All-gather every rank's :func:`fingerprint` (the process group is up); raise
    :class:`HandshakeError` on every rank if any differs. Returns the cost:
    ``{"bytes": pickled fingerprint bytes per rank, "seconds": wall time}``."""
    import pickle

    import torch.distributed as dist
    t0 = time.perf_counter()
    fp = fingerprint(model, jobs, chunks, shared_codebooks)
    world = dist.get_world_size()
    got: List[Any] = [None] * world
    dist.all_gather_object(got, fp)
    diffs = compare(got)
    if diffs:
        raise HandshakeError(describe(diffs, world))
    return {"bytes": float(len(pickle.dumps(fp))), "seconds": time.perf_counter() - t0}

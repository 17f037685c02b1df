"""Measure a model's compute on this device: the :class:`~astra.parallel.costmodel.ComputeCost`
the planner predicts with.

A short probe, not a full forward: single blocks (each call the next block of the model,
so that its weights come from memory as in a forward; every block has the same shapes)
timed on a few chunk shapes, each the median of a few repeats, with one torch
thread (what each rank of a local run gets):

- ``single``: the block as one device runs it (the plain model, or for causal LMs the
  model patched for one device, as the runner's ``single`` strategy does) on the first
  ``n``, ``n/2``, ``n/4``, ``n/8`` tokens;
- ``astra``: the block in distributed mode as rank ``r`` of ``W`` equal chunks, for a few
  ``(W, r)``, behind a loopback communicator that hands back codes for the other ranks'
  tokens at once (so the time is the rank's compute without the link);
- the encoder alone (the share of a rank's work before its codes leave), the embedding
  and tail, and one exchange's framing.

The coefficients are fitted by least squares (non-negative). :func:`compute_cost`
caches the result under ``<cache>/costs`` keyed by the model, tokens, codebooks and the
machine, so only the first plan of a request shape pays the probe (seconds).
"""
from __future__ import annotations

import json
import platform
import time
from typing import Any, Callable, Sequence, Tuple

import numpy as np
import torch

from .costmodel import BlockCost, ComputeCost, pairs

__all__ = ["measure", "compute_cost", "fit_block"]


class _Done:
    def __init__(self, payloads):
        self.payloads = payloads

    def wait(self):
        return self.payloads


class _Loopback:
    """A communicator for rank ``rank`` of ``world_size`` with nobody on the other side:
    every exchange returns the local codes repeated to each other rank's token count."""

    def __init__(self, causal: bool):
        self.causal = causal
        self.rank, self.world_size, self.send_tokens = 0, 1, [1]

    def exchange_start(self, layer_idx: int, local: torch.Tensor) -> _Done:
        out = []
        for s in range(self.world_size):
            if s == self.rank:
                out.append(local)
            elif self.causal and s > self.rank:
                out.append(local[:, :0])
            else:
                reps = -(-int(self.send_tokens[s]) // max(1, local.shape[1]))
                out.append(local.repeat(1, reps, 1)[:, :int(self.send_tokens[s])])
        return _Done(out)

    def exchange(self, layer_idx: int, local: torch.Tensor):
        return self.exchange_start(layer_idx, local).wait()


def _median(fn: Callable[[], Any], repeats: int) -> float:
    """The median of ``repeats`` timed calls after one untimed (first-touch allocations)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]  # the median: what a run sees, noise included


def fit_block(rows: Sequence[Tuple[float, float, float]], times: Sequence[float],
              remote: bool = True) -> BlockCost:
    """Non-negative least squares of ``times`` on ``(n, local_pairs, remote_pairs)``
    plus a constant: a coefficient the data would make negative is dropped (0)."""
    X = np.array([[1.0, n, lp, rp] for n, lp, rp in rows])
    y = np.array(times, dtype=float)
    keep = [0, 1, 2, 3] if remote else [0, 1, 2]
    while True:
        scale = np.abs(X[:, keep]).max(0)
        scale[scale == 0] = 1.0
        coef, *_ = np.linalg.lstsq(X[:, keep] / scale, y, rcond=None)
        coef = coef / scale
        neg = [k for k, c in zip(keep, coef) if c < 0]
        if not neg:
            break
        keep = [k for k in keep if k != neg[0]]
        if not keep:
            coef = np.zeros(0)
            break
    full = dict.fromkeys(range(4), 0.0)
    full.update({k: float(c) for k, c in zip(keep, coef)})
    if not remote:
        full[3] = full[2]
    return BlockCost(full[0], full[1], full[2], full[3])


def measure(model, inputs: torch.Tensor, codebooks=None, *, repeats: int = 5,
            progress: bool = False) -> ComputeCost:
    """Probe ``model`` on ``inputs`` (one batch of the request) on this device; with
    ``codebooks`` (an :class:`astra.Codebooks` or a tensor) the astra rank too, else
    the astra coefficients are the single ones (no codes: nothing to encode).
    ``progress``: a progress bar over the shapes timed."""
    from tqdm import tqdm

    import astra
    from astra.models import resolve

    from .job import wire_bits
    ad = resolve(model)[1]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            with tqdm(total=4 + (0 if codebooks is None else 6), disable=not progress,
                      desc="measuring the model on this device (once; cached)") as bar:
                return _measure(model, ad, inputs, _codebooks(inputs, codebooks),
                                repeats, astra, wire_bits, bar)
    finally:
        torch.set_num_threads(threads)


def _measure(model, ad, inputs, cbs, repeats, astra, wire_bits, bar) -> ComputeCost:
    n = ad.n_content(model, inputs)
    cls = bool(ad.has_cls(model))
    blocks = ad.layers(model)
    L = len(blocks)
    causal = bool(ad.causal)
    turn = [0]

    def next_block(h):
        # every call runs the next block: its weights come from memory as in a forward,
        # not from the cache the previous call filled (the blocks' shapes are the same)
        turn[0] += 1
        return ad.run_block(model, blocks[turn[0] % L], h)

    def run(lo, hi):
        h = ad.embed(model, inputs, lo, hi, cls)
        t = _median(lambda: next_block(h), repeats)
        bar.update()
        return t

    # single: the runner's single strategy (causal LMs: the model patched for one device)
    sizes = sorted({max(1, n // f) for f in (8, 4, 2, 1)})
    if causal:
        astra.patch(model, None, devices=1)
    try:
        rows = [(s, pairs(0, s, s, causal)[0], 0.0) for s in sizes]
        single = fit_block(rows, [run(0, s) for s in sizes], remote=False)
        t_embed = _median(lambda: ad.embed(model, inputs, 0, n, cls), repeats)
        h = ad.embed(model, inputs, 0, n, cls)
        t_tail = _median(lambda: ad.finish_compact(model, [ad.summary(model, h, cls)], n + cls),
                       repeats)
    finally:
        if causal:
            astra.unpatch(model)
    head = (t_embed + t_tail) / n
    if cbs is None:
        return ComputeCost(L, causal, n, single, single, head, 0, ad.dim(model))

    comm = _Loopback(causal)
    astra.patch(model, cbs, communicator=comm, strict=False)
    try:
        rows, times = [], []
        for W, r in ((1, 0), (2, 0), (2, 1), (4, 0), (4, 3), (8, 7)):
            if n < W:
                continue
            chunks = [int(c.numel()) for c in torch.tensor_split(torch.arange(n), W)]
            lo = sum(chunks[:r])
            comm.rank, comm.world_size, comm.send_tokens = r, W, chunks
            rows.append((chunks[r],) + pairs(lo, lo + chunks[r], n, causal))
            times.append(run(lo, lo + chunks[r]))
        fitted = fit_block(rows, times)
        # the encoder's share of a rank's per-token cost (before its codes leave)
        attn = getattr(*ad.attention_slots(model)[0])
        x = torch.randn(1, n, ad.dim(model))
        t_enc = _median(lambda: attn.encode(x), repeats) / n
    finally:
        astra.unpatch(model)
    wb = wire_bits(cbs)
    bits = wb["bits"] * wb["G"] if wb["stage_bits"] is None else sum(wb["stage_bits"][0])
    send_share = min(0.9, t_enc / fitted.per_token_s) if fitted.per_token_s else 0.0
    return ComputeCost(L, causal, n, single, fitted, head, int(bits), ad.dim(model),
                       send_share=send_share, local_share=min(0.25, 1 - send_share),
                       exchange_s=_exchange_s(n, bits, repeats))


def _exchange_s(n: int, bits: int, repeats: int) -> float:
    """One exchange's framing on the sending and the receiving side (the codes of a
    quarter of the tokens), plus 0.1 ms for posting a send and a receive (an estimate)."""
    from . import wire
    if bits <= 0:
        return 0.0
    codes = torch.randint(0, 2, (1, max(1, n // 4), 1), dtype=torch.int32)

    def roundtrip():
        f = wire.encode(codes, "codes", seq=0, src=0, t_send=0.0, bits=1)
        wire.decode_tensor(wire.decode(f, seq=0, src=0, kind="codes", rows=1,
                                       tokens=codes.shape[1], width=1, bits=1))
    return _median(roundtrip, repeats) + 1e-4


def _codebooks(inputs, codebooks):
    """``codebooks`` (a tensor or :class:`astra.Codebooks`) as a Codebooks, or None."""
    from .job import Job, job_codebooks
    return None if codebooks is None else job_codebooks(Job("astra", inputs,
                                                            codebooks=codebooks))


def _machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                        "")
    except OSError:
        name = ""
    return f"{platform.machine()} {name or platform.processor()}"


def _describe(obj: Any) -> Any:
    """A process-independent description of a ModelSpec (functions by name)."""
    if callable(obj) and hasattr(obj, "__qualname__"):
        return f"{obj.__module__}.{obj.__qualname__}"
    if hasattr(obj, "factory") and hasattr(obj, "kwargs"):
        return [_describe(obj.factory), _describe(obj.kwargs)]
    if isinstance(obj, dict):
        return {str(k): _describe(v) for k, v in sorted(obj.items())}
    if isinstance(obj, (list, tuple)):
        return [_describe(v) for v in obj]
    return obj if isinstance(obj, (int, float, str, bool, type(None))) else str(obj)


def compute_cost(spec, inputs: torch.Tensor, codebooks=None, *,
                 model=None, refresh: bool = False, progress: bool = False) -> ComputeCost:
    """:func:`measure` for the model a :class:`~astra.catalog.ModelSpec` builds, cached
    under ``<cache>/costs`` by (model, inputs' shape, codebooks' bits, machine, torch
    version); ``model``: the built model (else built on a cache miss)."""
    from astra.cache import cache_path, write_atomic

    cb = _codebooks(inputs, codebooks)
    key = dict(spec=_describe(spec), shape=list(inputs.shape), dtype=str(inputs.dtype),
               codebooks=None if cb is None else f"{cb.kind} {tuple(cb.tensor.shape)} "
               f"{cb.stage_sizes}",
               machine=_machine(), torch=torch.__version__, version=2)
    path = cache_path("costs", "cost", key, suffix=".json")
    if path.exists() and not refresh:
        try:
            return ComputeCost.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError):
            pass  # a damaged or old entry: measure again
    if model is None:
        model = spec.build()
    cost = measure(model, inputs, codebooks, progress=progress)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(cost.as_dict(), f)
    write_atomic(path, write)
    return cost

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

The coefficients are fitted by least squares (non-negative). For the astra rank the
probe also times, inside the block, the work before the codes leave and the work
between the send and the wait (the part that hides under the link).

:func:`calibrate` then ties the probe to the runner with real launches of 2 and 4
ranks (a link that costs nothing): the one-device time scales every coefficient (the
machine runs faster or slower than while the probe ran), and what a rank's layer takes
beyond the scaled probe is the exchange's overhead (gloo posts, framing, ranks taking
turns on the cores), fitted as a constant plus a part per frame. :func:`compute_cost`
caches the result under ``<cache>/costs`` keyed by the model, tokens, codebooks and the
machine, so only the first plan of a request shape pays the probe (seconds) and the
calibration (two launches).
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import replace
from typing import Any, Callable, Sequence, Tuple

import numpy as np
import torch

from .costmodel import BlockCost, ComputeCost, frames, pairs

__all__ = ["measure", "calibrate", "compute_cost", "fit_block"]

CALIBRATION_TOKENS = 512  # causal LMs calibrate on this prefix (the scale is per machine)


class _Done:
    def __init__(self, payloads, mark):
        self.payloads, self.mark = payloads, mark

    def wait(self):
        self.mark.append(time.perf_counter())  # the rank stops to wait for the codes
        return self.payloads


class _Loopback:
    """A communicator for rank ``rank`` of ``world_size`` with nobody on the other side:
    every exchange returns the local codes repeated to each other rank's token count.
    ``marks``: per exchange, when it started and when the rank waited for it."""

    def __init__(self, causal: bool):
        self.causal = causal
        self.rank, self.world_size, self.send_tokens = 0, 1, [1]
        self.marks = []

    def exchange_start(self, layer_idx: int, local: torch.Tensor) -> _Done:
        self.marks.append([time.perf_counter()])
        out = []
        for s in range(self.world_size):
            if s == self.rank:
                out.append(local)
            elif self.causal and s > self.rank:
                out.append(local[:, :0])
            else:
                reps = -(-int(self.send_tokens[s]) // max(1, local.shape[1]))
                out.append(local.repeat(1, reps, 1)[:, :int(self.send_tokens[s])])
        return _Done(out, self.marks[-1])

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


def _median_phases(fn: Callable[[], Any], marks: list, repeats: int) -> Tuple[float, ...]:
    """Medians of ``(total, before the exchange, between the exchange and its wait)`` of
    ``repeats`` calls of ``fn`` (one astra block behind a :class:`_Loopback`) after one
    untimed call."""
    fn()
    rows = []
    for _ in range(repeats):
        marks.clear()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        start, waited = marks[0] if marks and len(marks[0]) == 2 else (t0, t0)
        rows.append((t1 - t0, start - t0, waited - start))
    return tuple(sorted(c)[len(c) // 2] for c in zip(*rows))


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

    def warm(h):
        # once through every block: lazily built state (the projected codebook tables,
        # one per layer) is made here, not inside a timed call
        for _ in range(L):
            next_block(h)

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
        warm(ad.embed(model, inputs, 0, sizes[0], cls))
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
        for i, (W, r) in enumerate(_RANK_SHAPES):
            if n < W:
                continue
            chunks = [int(c.numel()) for c in torch.tensor_split(torch.arange(n), W)]
            lo = sum(chunks[:r])
            comm.rank, comm.world_size, comm.send_tokens = r, W, chunks
            h = ad.embed(model, inputs, lo, lo + chunks[r], cls)
            if not rows:
                warm(h)
            rows.append((chunks[r],) + pairs(lo, lo + chunks[r], n, causal))
            times.append(_median_phases(lambda: next_block(h), comm.marks, repeats))
            bar.update()
    finally:
        astra.unpatch(model)
    # non-causal ranks at one length: remote pairs n(T-n) are a combination of n and n²,
    # so they are not a column of their own (the fit would be singular)
    fit_rows = rows if causal else [(k, lp, 0.0) for k, lp, _ in rows]
    fitted = fit_block(fit_rows, [t[0] for t in times], remote=causal)
    pre = fit_block([(k, 0.0, 0.0) for k, _, _ in rows], [t[1] for t in times], remote=False)
    mid = fit_block([(k, lp, 0.0) for k, lp, _ in rows], [t[2] for t in times], remote=False)
    if not causal:
        fitted = BlockCost(fitted.fixed_s, fitted.per_token_s, fitted.per_pair_s, 0.0)
    wb = wire_bits(cbs)
    bits = wb["bits"] * wb["G"] if wb["stage_bits"] is None else sum(wb["stage_bits"][0])
    return ComputeCost(L, causal, n, single, fitted, head, int(bits), ad.dim(model),
                       exchange_s=_exchange_s(n, bits, repeats),
                       pre=BlockCost(pre.fixed_s, pre.per_token_s, 0.0, 0.0),
                       mid=BlockCost(mid.fixed_s, mid.per_token_s, mid.per_pair_s, 0.0))


# (world size, rank) of the astra ranks timed: the shapes plans use (2..8 ranks; first,
# middle and last positions, which differ for causal models)
_RANK_SHAPES = ((2, 0), (2, 1), (3, 1), (4, 0), (4, 3), (8, 7))


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


def _scaled(cost: ComputeCost, k: float) -> ComputeCost:
    """``cost`` with every compute coefficient times ``k`` (a faster or slower machine)."""
    def sc(b):
        return None if b is None else BlockCost(*(k * v for v in (
            b.fixed_s, b.per_token_s, b.per_pair_s, b.per_remote_pair_s)))
    return replace(cost, single=sc(cost.single), astra=sc(cost.astra), pre=sc(cost.pre),
                   mid=sc(cost.mid), head_per_token_s=k * cost.head_per_token_s,
                   exchange_s=k * cost.exchange_s)


def calibrate(spec, inputs: torch.Tensor, codebooks, cost: ComputeCost, *,
              repeats: int = 2, timeout_s: float = 600.0) -> Tuple[ComputeCost, dict]:
    """Real launches on this machine (virtual clock, a link that costs nothing):
    ``single`` and an astra split over 2 ranks, then over 4. Returns ``(cost scaled so
    that it predicts the measured single time, with the exchange's overhead per layer
    fitted to what the ranks measured beyond the scaled probe: a constant plus a part
    per frame posted; what was measured)``. Causal LMs run on their first
    :data:`CALIBRATION_TOKENS` tokens (cheaper; the scale and the per-layer overhead do
    not depend on the length)."""
    import statistics

    from .costmodel import predict_astra, predict_single
    from .job import Job, summarize
    from .launcher import launch
    from .links import LinkModel

    n = cost.tokens
    if cost.causal and n > CALIBRATION_TOKENS:
        inputs, n = inputs[..., :CALIBRATION_TOKENS], CALIBRATION_TOKENS
    free = LinkModel(1e6, 0.0)
    kw = dict(output="compact", clock="virtual", repeats=repeats, warmup=1,
              timeout_s=timeout_s)

    def split(W):
        return Job("astra", inputs, codebooks=codebooks, link=free, chunks=[
            int(c.numel()) for c in torch.tensor_split(torch.arange(n), W)], **kw)
    worlds = [W for W in (2, 4) if n >= W]
    if not worlds:  # one token: nothing to split
        return cost, dict(tokens=n)
    runs = {}
    for W in worlds:
        jobs = ([Job("single", inputs, **kw)] if W == 2 else []) + [split(W)]
        got = launch(spec, jobs, W)
        if W == 2:
            single_s = summarize(got[0])["latency_s"]
        runs[W] = (jobs[-1].chunks, got[-1])
    scale = single_s / predict_single(cost, n)
    scaled = replace(_scaled(cost, scale), exchange_s=0.0, exchange_peer_s=0.0)
    # per world: the frames a rank posts per layer, and its layer's time beyond the probe
    rows, extra, info = [], [], dict(tokens=n, single_s=single_s, scale=scale)
    for W, (chunks, res) in runs.items():
        _, detail = predict_astra(scaled, chunks, [1.0] * W, free, detail=True)
        gap = statistics.median(
            statistics.median(t - w for t, w in zip(r["times"], r["waits"])) - d["compute_s"]
            for r, d in zip(res, detail)) / cost.layers
        rows.append((frames(W, cost.causal), 0.0, 0.0))
        extra.append(gap)
        info[f"astra{W}_gap_s"] = gap
    fit = fit_block(rows, [max(0.0, e) for e in extra], remote=False)
    out = replace(scaled, exchange_s=fit.fixed_s, exchange_peer_s=fit.per_token_s)
    info.update(exchange_s=out.exchange_s, exchange_peer_s=out.exchange_peer_s)
    return out, info


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


def compute_cost(spec, inputs: torch.Tensor, codebooks=None, *, model=None,
                 refresh: bool = False, progress: bool = False,
                 calibrated: bool = True) -> ComputeCost:
    """:func:`measure` for the model a :class:`~astra.catalog.ModelSpec` builds, then
    (``calibrated``, with codebooks) :func:`calibrate`, cached under ``<cache>/costs``
    by (model, inputs' shape, codebooks' bits, machine, torch version); ``model``: the
    built model (else built on a cache miss)."""
    from astra.cache import cache_path, write_atomic

    cb = _codebooks(inputs, codebooks)
    key = dict(spec=_describe(spec), shape=list(inputs.shape), dtype=str(inputs.dtype),
               codebooks=None if cb is None else f"{cb.kind} {tuple(cb.tensor.shape)} "
               f"{cb.stage_sizes}" + ("" if cb.target == "x" else f" {cb.target}"),
               machine=_machine(), torch=torch.__version__, version=4,
               calibrated=bool(calibrated and cb is not None))
    path = cache_path("costs", "cost", key, suffix=".json")
    if path.exists() and not refresh:
        try:
            return ComputeCost.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError):
            pass  # a damaged or old entry: measure again
    if model is None:
        model = spec.build()
    cost = measure(model, inputs, codebooks, progress=progress)
    if calibrated and cb is not None:
        from tqdm import tqdm
        with tqdm(total=1, disable=not progress,
                  desc="calibrating on 2- and 4-rank runs (once; cached)") as bar:
            cost, _ = calibrate(spec, inputs, cb, cost)
            bar.update()

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(cost.as_dict(), f)
    write_atomic(path, write)
    return cost

"""k-means for codebooks: Lloyd iterations on every group of a layer at once.

The assignment step is :func:`astra_kernels.vq_encode` (squared L2, ties to the lowest
index), so the codes k-means optimizes for are the codes the link sends. Used by
:meth:`astra.Codebooks.fit` (one call per layer) and through it by
:mod:`astra.calibrate`.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

import astra_kernels

__all__ = ["INITS", "kmeans", "init_random", "init_kmeanspp"]

INITS = ("k-means++", "sampled", "random")


def kmeans(x: Tensor, G: int, K: int, iters: int, gen: torch.Generator, init: str,
           bar) -> Tuple[Tensor, List[float], int]:
    """k-means of every group of ``x [M, D]`` at once -> ``(C [G, K, D/G], history,
    reseeded)``.

    ``init`` is one of :data:`INITS`; ``bar`` (a tqdm bar) advances once after the init
    and once per iteration. ``history`` holds the mean error per token after the init
    and after each iteration; ``reseeded`` counts the clusters that ended an iteration
    empty and were re-seeded with the point of largest error in their group.
    """
    M, D = x.shape
    dg = D // G
    xg = x.reshape(M, G, dg)
    if init == "k-means++":
        C = init_kmeanspp(xg, K, gen)
    elif init == "sampled":
        C = init_kmeanspp(xg, K, gen, rounds=32)
    else:
        C = init_random(xg, K, gen)
    garange = torch.arange(G, device=x.device)
    codes, err = astra_kernels.vq_encode(x, C, return_error=True)
    history = [float(err.double().mean())]
    bar.update(1)
    reseeded = 0
    for _ in range(iters):
        flat = (codes.long() + garange * K).reshape(-1)  # [M*G] cluster ids, group-major
        counts = torch.bincount(flat, minlength=G * K).reshape(G, K)
        sums = torch.zeros(G * K, dg, dtype=torch.float64, device=x.device)
        sums.index_add_(0, flat, xg.reshape(M * G, dg).double())
        sums = sums.reshape(G, K, dg)
        newC = torch.where(counts.unsqueeze(-1) > 0,
                           sums / counts.clamp_min(1).unsqueeze(-1), C.double()).float()
        empty = counts == 0
        if bool(empty.any()):
            reseeded += _reseed_empty(xg, C, codes, empty, newC)
        C = newC
        new_codes, err = astra_kernels.vq_encode(x, C, return_error=True)
        history.append(float(err.double().mean()))
        bar.update(1)
        changed = not torch.equal(new_codes, codes)
        codes = new_codes
        if not changed and not bool(empty.any()):
            bar.update(iters + 1 - len(history))
            break
    return C, history, reseeded


def _reseed_empty(xg: Tensor, C: Tensor, codes: Tensor, empty: Tensor, newC: Tensor) -> int:
    """Give each empty cluster of ``newC`` (in place) the point with the largest error
    under the current assignment in its group, distinct points for several; returns
    how many clusters were re-seeded."""
    M, G, _ = xg.shape
    garange = torch.arange(G, device=xg.device)
    gerr = ((xg - C[garange, codes.long()]) ** 2).sum(-1)  # [M, G]
    n = 0
    for g in torch.nonzero(empty.any(1)).flatten().tolist():
        ks = torch.nonzero(empty[g]).flatten()
        take = min(len(ks), M)
        # Stable descending sort: ties go to the lowest point index.
        order = torch.sort(gerr[:, g], descending=True, stable=True).indices[:take]
        newC[g, ks[:take]] = xg[order, g]
        n += take
    return n


def init_random(xg: Tensor, K: int, gen: torch.Generator) -> Tensor:
    """K distinct points per group ``xg [M, G, dg]``, sampled uniformly -> ``[G, K, dg]``
    (fewer points than K: repeated, so the surplus codewords are duplicates)."""
    M, G, dg = xg.shape
    C = torch.empty(G, K, dg, dtype=xg.dtype, device=xg.device)
    for g in range(G):
        idx = torch.randperm(M, generator=gen)[:K]
        if len(idx) < K:
            idx = idx[torch.arange(K) % len(idx)]
        C[g] = xg[idx.to(xg.device), g]
    return C


def init_kmeanspp(xg: Tensor, K: int, gen: torch.Generator,
                  rounds: Optional[int] = None) -> Tensor:
    """D²-sampling for every group at once, on at most ``max(8K, 4096)`` points.

    ``rounds``: None = one codeword per step (k-means++); else ``rounds`` steps that
    each draw ``ceil((K-1)/rounds)`` codewords (without replacement) from the same D²
    distribution, updating the distances once per step."""
    M, G, dg = xg.shape
    cap = max(8 * K, 4096)
    if M > cap:
        xg = xg[torch.randperm(M, generator=gen)[:cap].to(xg.device)]
        M = cap
    garange = torch.arange(G, device=xg.device)
    C = torch.empty(G, K, dg, dtype=xg.dtype, device=xg.device)
    first = torch.randint(M, (G,), generator=gen).to(xg.device)
    C[:, 0] = xg[first, garange]
    d2 = ((xg - C[:, 0].unsqueeze(0)) ** 2).sum(-1).double()  # [M, G]
    step = 1 if rounds is None else max(1, math.ceil((K - 1) / rounds))
    j = 1
    while j < K:
        n = min(step, K - j)
        w = d2.t().clone()  # [G, M]
        # Too few points with weight left (several already codewords): sample uniformly.
        dead = (w > 0).sum(1) < n
        w[dead] = 1.0
        pick = torch.multinomial(w.cpu(), n, replacement=n > M,
                                 generator=gen).to(xg.device)  # [G, n]
        new = xg[pick, garange.unsqueeze(1)]  # [G, n, dg]
        C[:, j:j + n] = new
        if n == 1:
            d2 = torch.minimum(d2, ((xg - new[:, 0].unsqueeze(0)) ** 2).sum(-1).double())
        else:
            dist = torch.cdist(xg.transpose(0, 1), new) ** 2  # [G, M, n]
            d2 = torch.minimum(d2, dist.min(-1).values.t().double())
        j += n
    return C

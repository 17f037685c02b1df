"""Timers for microbenchmarks: medians after warm-up, on CPU or CUDA."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_ms(fn: Callable[[], object], device: str = "cpu", min_time: float = 0.4,
              min_runs: int = 5, max_runs: int = 500, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in milliseconds.

    CUDA: ``triton.testing.do_bench`` (median over ``min_time`` seconds, with its L2
    flush between runs). CPU: repeated ``perf_counter`` timings until both
    ``min_runs`` and ``min_time`` are reached.
    """
    if device == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=max(25, int(min_time * 100)), rep=int(min_time * 1000),
                              return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs
                                     or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def matmul_peak_gflops(dtype: torch.dtype, device: str = "cpu", n: int = 0,
                       min_time: float = 0.4) -> float:
    """Measured GFLOP/s of one square ``torch.mm`` (the machine's practical peak)."""
    n = n or (8192 if device == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = median_ms(lambda: torch.mm(a, b), device, min_time=min_time)
    return 2 * n ** 3 / (ms * 1e-3) / 1e9

"""pytest-benchmark view of the kernel microbenchmarks (same cases and impls as
`astra bench kernels`, grouped by case so each op sits beside its anchors).

    pytest bench/ --benchmark-only [--benchmark-json out.json]
"""
import functools

import pytest
import torch

import astra_kernels as ak
from astra.bench import kernels as kb

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _impl_names(case):
    if isinstance(case, kb.LinearCase):
        return ["astra", "torch_fp32"] + (["torch_int8"] if DEVICE == "cpu" else [])
    if isinstance(case, kb.VQCase):
        names = ["astra", "astra_bf16", "torch_cdist"]
        if DEVICE == "cpu":
            names.append("faiss_flat" if case.G == 1 else "faiss_pq")
        return names
    return ["astra", "sdpa_dequant", "sdpa_full"]


@functools.lru_cache(maxsize=2)
def _impls(name):
    case = next(c for c in kb.VQ_CASES + kb.ATTN_CASES + kb.LINEAR_CASES if c.name == name)
    make = (kb._vq_impls if isinstance(case, kb.VQCase) else
            kb._linear_impls if isinstance(case, kb.LinearCase) else kb._attn_impls)
    return make(case, DEVICE)[0]


PARAMS = [(c.name, impl) for c in kb.VQ_CASES + kb.ATTN_CASES + kb.LINEAR_CASES
          if DEVICE in c.devices
          for impl in _impl_names(c)]


@pytest.mark.parametrize("case,impl", PARAMS, ids=[f"{c}-{i}" for c, i in PARAMS])
def test_kernel(benchmark, case, impl):
    fns = _impls(case)
    if impl not in fns:
        pytest.skip(f"{impl} is not installed here")
    benchmark.group = case
    ak.set_code_checks(False)
    try:
        if DEVICE == "cuda":
            fn = fns[impl]
            benchmark(lambda: (fn(), torch.cuda.synchronize()))
        else:
            benchmark(fns[impl])
    finally:
        ak.set_code_checks(True)

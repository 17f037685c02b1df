"""Kernel microbenchmarks: each Astra op beside its anchors, measured in one run.

Cases and impl names are stable (outside checks read the JSON):
- VQ encode: ``vq_a`` (M=4096, D=768, G=1, K=1024), ``vq_b`` (G=32), ``vq_c`` (M=1024,
  D=384, G=1, K=1024), ``vq_d`` (M=1024, D=384, G=16, K=256); GPU: ``vq_gpu``
  (M=65536, D=1024, G=1, K=1024). Impls ``astra`` (exact fp32), ``astra_bf16``,
  ``faiss_flat`` (G=1) / ``faiss_pq`` (G>1) on CPU, ``torch_cdist`` (cdist + argmin).
- Attention, remote tokens as G=1, K=1024 codes: ``attn_vit`` (B=1, H=12, d=64,
  Tq=Tl=50, Tr=147), ``attn_3k`` (Tq=Tl=1024, Tr=3072), ``attn_16k`` (Tr=16384), each
  also ``_bf16``; GPU: ``attn_gpt2m`` (B=8, H=16, d=64, Tq=Tl=256, Tr=768, fp16,
  causal), ``attn_long`` (B=4, H=32, d=128, Tq=Tl=2048, Tr=6144, bf16). Impls
  ``astra``, ``sdpa_dequant`` (gather remote K/V, concatenate, SDPA), ``sdpa_full``
  (SDPA over full-precision K/V of the same total length); on CUDA also one row per
  Astra backend (``astra_triton``, ``astra_cuda``).
- Weight-only int8 linear (decode: one token, SmolLM2's shapes): ``lin_down`` (M=1,
  N=576, K=1536), ``lin_gate_up`` (N=3072, K=576: gate and up stacked), ``lin_head``
  (N=49152, K=576). Each call reads another of 24 copies of the weights (round robin),
  so the weights come from memory as in a decode step. Impls ``astra`` (int8 as the
  decoder makes them, :func:`astra.decode.int8_weights`: a scale per 32 weights; on
  these random weights symmetric, so no offsets),
  ``torch_fp32`` (``F.linear``, the anchor), and on CPU ``torch_int8``
  (``torch._weight_int8pack_mm``: one scale per row, bf16 activations); ``weight_gbs``
  beside each: weight (and scale) bytes per second.

FLOPs: VQ 2·M·D·K; linear 2·M·N·K; attention 4·B·H·d·(visible query-key pairs) — the nominal count
over all Tl + Tr keys, also when the codebook-space path attends to fewer. Codes are
trusted (``set_code_checks(False)``), as in the runner, which produces them itself.

VQ quality, beside the timings: ``fp32_agreement`` (row ``astra``) and
``bf16_agreement`` (row ``astra_bf16``) are the fractions of codes equal to the exact
argmin (the fp64 reference); ``bf16_mse_increase`` is the relative increase of the
squared quantization error (fp64, on the fp32 values) of the bf16 codes over the exact
ones. ``python -m astra.bench.kernels --sweep`` prints how time grows with M, K, G, Tr.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import astra_kernels as ak

from ..decode import int8_weights
from .timing import matmul_peak_gflops, median_ms


@dataclass
class VQCase:
    name: str
    M: int
    D: int
    G: int
    K: int
    devices: tuple = ("cpu", "cuda")


@dataclass
class AttnCase:
    name: str
    B: int
    H: int
    d: int
    Tq: int
    Tr: int
    dtype: torch.dtype = torch.float32
    causal: bool = False
    G: int = 1
    K: int = 1024
    devices: tuple = ("cpu", "cuda")


VQ_CASES = [
    VQCase("vq_a", 4096, 768, 1, 1024),
    VQCase("vq_b", 4096, 768, 32, 1024),
    VQCase("vq_c", 1024, 384, 1, 1024),
    VQCase("vq_d", 1024, 384, 16, 256),
    VQCase("vq_gpu", 65536, 1024, 1, 1024, devices=("cuda",)),
]
ATTN_CASES = [
    AttnCase("attn_vit", 1, 12, 64, 50, 147),
    AttnCase("attn_3k", 1, 12, 64, 1024, 3072),
    AttnCase("attn_16k", 1, 12, 64, 1024, 16384),
    AttnCase("attn_vit_bf16", 1, 12, 64, 50, 147, torch.bfloat16),
    AttnCase("attn_3k_bf16", 1, 12, 64, 1024, 3072, torch.bfloat16),
    AttnCase("attn_16k_bf16", 1, 12, 64, 1024, 16384, torch.bfloat16),
    AttnCase("attn_gpt2m", 8, 16, 64, 256, 768, torch.float16, causal=True, devices=("cuda",)),
    AttnCase("attn_long", 4, 32, 128, 2048, 6144, torch.bfloat16, devices=("cuda",)),
]


@dataclass
class LinearCase:
    name: str
    M: int
    N: int
    K: int
    devices: tuple = ("cpu", "cuda")


LINEAR_CASES = [
    LinearCase("lin_down", 1, 576, 1536),
    LinearCase("lin_gate_up", 1, 3072, 576),
    LinearCase("lin_head", 1, 49152, 576),
]
LINEAR_COPIES = 24  # weight copies a case cycles through (cold weights, as in decode)
CASE_NAMES = [c.name for c in VQ_CASES + ATTN_CASES + LINEAR_CASES]


@dataclass
class Row:
    case: str
    impl: str
    median_ms: float
    gflops: float
    device: str
    extra: Dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"case": self.case, "impl": self.impl, "median_ms": round(self.median_ms, 4),
                "gflops": round(self.gflops, 1), "device": self.device, **self.extra}


def _cdist_argmin(x: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    G, K, dg = cb.shape
    xs = x.reshape(x.shape[0], G, dg).transpose(0, 1)  # [G, M, dg]
    return torch.cdist(xs, cb).argmin(-1).T


def _vq_impls(case: VQCase, device: str):
    gen = torch.Generator().manual_seed(0)
    # k-means-like data: points around the codewords, as calibration produces
    cb = torch.randn(case.G, case.K, case.D // case.G, generator=gen)
    pick = torch.randint(0, case.K, (case.M, case.G), generator=gen)
    x = torch.stack([cb[g][pick[:, g]] for g in range(case.G)], 1).reshape(case.M, case.D)
    x = x + 0.5 * torch.randn(case.M, case.D, generator=gen)
    x, cb = x.to(device), cb.to(device)
    impls: Dict[str, Callable] = {
        "astra": lambda: ak.vq_encode(x, cb),
        "astra_bf16": lambda: ak.vq_encode(x, cb, precision="bf16"),
        "torch_cdist": lambda: _cdist_argmin(x, cb),
    }
    if device == "cpu":
        try:
            import faiss
            import numpy as np
        except ImportError:
            faiss = None
        if faiss is not None and case.G == 1:
            index = faiss.IndexFlatL2(case.D)
            index.add(cb[0].numpy())
            xn = x.numpy()
            impls["faiss_flat"] = lambda: index.search(xn, 1)
        elif faiss is not None and math.log2(case.K).is_integer():
            pq = faiss.ProductQuantizer(case.D, case.G, int(math.log2(case.K)))
            faiss.copy_array_to_vector(cb.numpy().ravel(), pq.centroids)
            xn = np.ascontiguousarray(x.numpy())
            impls["faiss_pq"] = lambda: pq.compute_codes(xn)

    def quality() -> Dict[str, Dict[str, float]]:
        """Agreement with the exact argmin (fp64 reference) and the quantization error
        of the chosen codewords, in fp64 on the fp32 values, relative to the exact one."""
        from astra_kernels import reference
        xc, cbc = x.cpu(), cb.cpu()
        exact = reference.vq_encode(xc, cbc)[0]

        def sq_err(codes: torch.Tensor) -> float:
            xs = xc.double().reshape(case.M, case.G, -1)
            chosen = torch.stack([cbc[g].double()[codes[:, g].long()] for g in range(case.G)], 1)
            return float(((xs - chosen) ** 2).sum())

        e_exact = sq_err(exact)
        fp32 = ak.vq_encode(x, cb).cpu()
        fast = ak.vq_encode(x, cb, precision="bf16").cpu()
        return {"astra": {"fp32_agreement": float((fp32 == exact).float().mean())},
                "astra_bf16": {"bf16_agreement": float((fast == exact).float().mean()),
                               "bf16_mse_increase": sq_err(fast) / e_exact - 1}}
    return impls, 2.0 * case.M * case.D * case.K, quality


def _attn_impls(case: AttnCase, device: str):
    gen = torch.Generator().manual_seed(0)
    B, H, d, Tq, Tr = case.B, case.H, case.d, case.Tq, case.Tr
    r = lambda *s: torch.randn(*s, generator=gen).to(case.dtype).to(device)  # noqa: E731
    q, k, v = r(B, H, Tq, d), r(B, H, Tq, d), r(B, H, Tq, d)
    pk, pv = r(case.G, case.K, H, d), r(case.G, case.K, H, d)
    codes = torch.randint(0, case.K, (B, Tr, case.G), generator=gen, dtype=torch.int32).to(device)
    kw, mask = {}, None
    if case.causal:  # this device holds the last Tq positions; all remote tokens precede them
        kw = dict(causal=True, q_pos=torch.arange(Tr, Tr + Tq, device=device),
                  kv_pos=torch.arange(Tr, Tr + Tq, device=device),
                  remote_pos=torch.arange(Tr, device=device))
        from torch.nn.attention.bias import causal_lower_right
        mask = causal_lower_right(Tq, Tq + Tr)
    full_k, full_v = r(B, H, Tq + Tr, d), r(B, H, Tq + Tr, d)

    def dequant():
        rk = sum(pk[g][codes[..., g].long()] for g in range(case.G)).permute(0, 2, 1, 3)
        rv = sum(pv[g][codes[..., g].long()] for g in range(case.G)).permute(0, 2, 1, 3)
        # remote positions precede local ones: remote keys first, lower-right causal mask
        return F.scaled_dot_product_attention(q, torch.cat([rk, k], 2), torch.cat([rv, v], 2),
                                              attn_mask=mask)

    impls: Dict[str, Callable] = {
        "astra": lambda: ak.mixed_attention(q, k, v, codes, pk, pv, **kw),
        "sdpa_dequant": dequant,
        "sdpa_full": lambda: F.scaled_dot_product_attention(q, full_k, full_v, attn_mask=mask),
    }
    if device == "cuda":
        for name in ak.available_backends("cuda"):
            if name != "reference":
                impls[f"astra_{name}"] = _with_backend(name, impls["astra"])
    pairs = Tq * Tr + (Tq * (Tq + 1) // 2 if case.causal else Tq * Tq)
    return impls, 4.0 * B * H * d * pairs, None


def _linear_impls(case: LinearCase, device: str):
    gen = torch.Generator().manual_seed(0)
    copies = max(1, min(LINEAR_COPIES, (1 << 28) // (4 * case.N * case.K)))  # <= 256 MB fp32
    ws = [torch.randn(case.N, case.K, generator=gen).to(device) for _ in range(copies)]
    x = torch.randn(case.M, case.K, generator=gen).to(device)
    q8 = [int8_weights(w, None) for w in ws]  # as the decoder makes them
    turn = [0]

    def cycle(fn):
        def run():
            turn[0] = (turn[0] + 1) % copies
            return fn(turn[0])
        return run
    impls: Dict[str, Callable] = {
        "astra": cycle(lambda i: q8[i](x)),
        "torch_fp32": cycle(lambda i: F.linear(x, ws[i])),
    }
    if device == "cpu" and hasattr(torch, "_weight_int8pack_mm"):
        xb = x.bfloat16()
        rows = [ak.quantize_int8(w) for w in ws]  # torch's op takes one scale per row
        rows = [(q, s.bfloat16()) for q, s in rows]
        impls["torch_int8"] = cycle(lambda i: torch._weight_int8pack_mm(xb, *rows[i]))
    # the bytes each impl reads per call (weights, scales, offsets), for ``weight_gbs``
    nbytes = {"astra": q8[0].nbytes, "torch_fp32": 4 * case.N * case.K,
              "torch_int8": case.N * case.K + 2 * case.N}
    return (impls, 2.0 * case.M * case.N * case.K,
            lambda: {k: {"weight_bytes": v} for k, v in nbytes.items()})


def _with_backend(name: str, fn: Callable) -> Callable:
    def run():
        with ak.use_backend(name, "cuda"):
            return fn()
    return run


def run(device: Optional[str] = None, cases: Optional[List[str]] = None, quick: bool = False,
        progress: bool = True) -> List[Row]:
    """Time every case available on ``device``; returns rows (peaks first)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    min_time = 0.15 if quick else 0.5
    rows: List[Row] = []
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        peak = matmul_peak_gflops(dtype, device, min_time=min_time)
        rows.append(Row(f"matmul_peak_{label}", "torch_mm", 0.0, peak, device))
    todo = [c for c in VQ_CASES + ATTN_CASES + LINEAR_CASES
            if device in c.devices and (not cases or c.name in cases)]
    try:
        from tqdm import tqdm
        it = tqdm(todo, desc="bench kernels", disable=not progress, leave=False)
    except ImportError:
        it = todo
    old = ak.api._CHECK_CODES
    ak.set_code_checks(False)
    try:
        for case in it:
            make = (_vq_impls if isinstance(case, VQCase) else
                    _linear_impls if isinstance(case, LinearCase) else _attn_impls)
            impls, flops, quality = make(case, device)
            extra = quality() if quality else {}
            for impl, fn in impls.items():
                ms = median_ms(fn, device, min_time=min_time)
                more = dict(extra.get(impl, {}))
                if "weight_bytes" in more:  # linear cases: bytes read per second
                    more["weight_gbs"] = more.pop("weight_bytes") / (ms * 1e-3) / 1e9
                rows.append(Row(case.name, impl, ms, flops / (ms * 1e-3) / 1e9, device, more))
    finally:
        ak.set_code_checks(old)
    return rows


ANCHORS = ("faiss_flat", "faiss_pq", "torch_cdist", "sdpa_dequant", "sdpa_full", "torch_fp32",
           "torch_int8")


def format_table(rows: List[Row]) -> str:
    """case | impl | median | GFLOP/s | ratio to each anchor of the same case."""
    peaks = {r.case: r.gflops for r in rows if r.case.startswith("matmul_peak")}
    lines = [f"device: {rows[0].device}; threads: {torch.get_num_threads()}; "
             "measured matmul peaks: "
             + ", ".join(f"{k.split('_')[-1]} {v:,.0f} GFLOP/s" for k, v in peaks.items()), ""]
    head = f"{'case':<15}{'impl':<14}{'median ms':>11}{'GFLOP/s':>10}  ratio to anchors"
    lines += [head, "-" * len(head)]
    by_case: Dict[str, Dict[str, Row]] = {}
    for r in rows:
        if not r.case.startswith("matmul_peak"):
            by_case.setdefault(r.case, {})[r.impl] = r
    for case, impls in by_case.items():
        for impl, r in impls.items():
            ratios = [f"{r.median_ms / impls[a].median_ms:.3f}x {a}" for a in ANCHORS
                      if a in impls and a != impl]
            note = ""
            if r.extra:
                note = "  [" + ", ".join(f"{k}={v:.4g}" for k, v in r.extra.items()) + "]"
            ratio_txt = "" if impl in ANCHORS else ", ".join(ratios)
            lines.append(f"{case:<15}{impl:<14}{r.median_ms:>11.3f}{r.gflops:>10.1f}  "
                         f"{ratio_txt}{note}")
    return "\n".join(lines)


def main(device: Optional[str], json_path: Optional[str], quick: bool,
         cases: Optional[List[str]]) -> int:
    rows = run(device, cases, quick)
    print(format_table(rows))
    if json_path:
        with open(json_path, "w") as f:
            json.dump([r.as_dict() for r in rows], f, indent=1)
        print(f"\nwrote {json_path}")
    return 0


def sweep(device: str = "cpu", min_time: float = 0.3) -> List[str]:
    """How time grows with M, K, G (VQ encode) and Tr, G (attention): one line each.

    ``python -m astra.bench.kernels --sweep`` (bench/RESULTS_cpu.md quotes its output).
    Random data; codes uniform over K (so about K distinct codes once Tr >> K).
    """
    gen = torch.Generator().manual_seed(0)
    lines = [f"threads={torch.get_num_threads()}"]
    old = ak.api._CHECK_CODES
    ak.set_code_checks(False)
    try:
        for M, D, G, K in ((1024, 768, 1, 1024), (4096, 768, 1, 1024), (16384, 768, 1, 1024),
                           (4096, 768, 1, 256), (4096, 768, 1, 4096), (4096, 768, 8, 1024),
                           (4096, 768, 32, 1024), (4096, 768, 96, 1024)):
            cb = torch.randn(G, K, D // G, generator=gen).to(device)
            x = torch.randn(M, D, generator=gen).to(device)
            gf = 2 * M * D * K / 1e6
            t32 = median_ms(lambda: ak.vq_encode(x, cb), device, min_time=min_time)
            t16 = median_ms(lambda: ak.vq_encode(x, cb, precision="bf16"), device,
                            min_time=min_time)
            lines.append(f"vq   M={M:6d} D={D} G={G:3d} K={K:5d}: fp32 {t32:8.2f} ms "
                         f"({gf / t32:5.0f} GFLOP/s)  bf16 {t16:8.2f} ms ({gf / t16:5.0f} GFLOP/s)")
        for Tr, G, K, dtype in ((0, 1, 1024, torch.float32), (1024, 1, 1024, torch.float32),
                                (3072, 1, 1024, torch.float32), (16384, 1, 1024, torch.float32),
                                (65536, 1, 1024, torch.float32), (3072, 1, 4096, torch.float32),
                                (1024, 2, 1024, torch.float32), (3072, 2, 1024, torch.float32),
                                (16384, 2, 1024, torch.float32), (3072, 1, 1024, torch.bfloat16),
                                (16384, 1, 1024, torch.bfloat16)):
            r = lambda *s: torch.randn(*s, generator=gen).to(dtype).to(device)  # noqa: E731
            q, k, v = r(1, 12, 1024, 64), r(1, 12, 1024, 64), r(1, 12, 1024, 64)
            pk, pv = r(G, K, 12, 64), r(G, K, 12, 64)
            codes = torch.randint(0, K, (1, Tr, G), generator=gen, dtype=torch.int32).to(device)
            t = median_ms(lambda: ak.mixed_attention(q, k, v, codes, pk, pv), device,
                          min_time=min_time)
            lines.append(f"attn H=12 d=64 Tq=Tl=1024 Tr={Tr:6d} G={G} K={K:5d} "
                         f"{str(dtype).replace('torch.', ''):8s}: {t:8.2f} ms")
    finally:
        ak.set_code_checks(old)
    return lines


if __name__ == "__main__":
    import sys
    if "--sweep" in sys.argv:
        print("\n".join(sweep()))

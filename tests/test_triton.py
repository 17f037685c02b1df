"""Triton kernels against :mod:`astra_kernels.reference`.

- Without a GPU the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``,
  set by conftest) on small, awkward shapes.
- The cross-compile tests build every kernel for sm_90 and sm_80 in a subprocess
  without ``TRITON_INTERPRET`` (no GPU needed) and check the PTX/cubin.
- With a GPU (``-m gpu``) the same checks run on CUDA tensors at larger shapes,
  autotuning limited to the first config, plus one test that runs every config and one
  that traces the ops with ``torch.compile``.

Tolerances follow flash-attention: the kernel's error against the fp32 reference must
be at most twice the reference's own error at the input precision, plus a small atol.
"""
import json
import math
import os
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import astra_kernels
from astra_kernels import reference
from tests._util import HAS_CUDA, requires_cuda

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
requires_interpreter = pytest.mark.skipif(
    not INTERPRET, reason="interpreter tests need TRITON_INTERPRET=1 (conftest sets it "
    "when no GPU is visible); the gpu-marked tests cover this machine")
gpu = [pytest.mark.gpu, requires_cuda]

from astra_kernels import triton as tk  # noqa: E402  (after conftest set TRITON_INTERPRET)
from astra_kernels.triton import mixed_attention as tk_attn  # noqa: E402
from astra_kernels.triton import vq_encode as tk_vq  # noqa: E402

TUNED = {
    "vq_bf16": tk_vq._vq_encode_bf16_tuned,
    "vq_fp32": tk_vq._vq_encode_fp32_tuned,
    "attn": tk_attn._mixed_attention_fwd_tuned,
    "attn_fp32": tk_attn._mixed_attention_fwd_fp32_tuned,
}


@contextmanager
def only_configs(tuner, configs):
    """Restrict an autotuner to ``configs`` (and forget what it chose) inside the block."""
    old_cfgs, old_cache = tuner.configs, dict(tuner.cache)
    tuner.configs, tuner.cache = list(configs), {}
    try:
        yield
    finally:
        tuner.configs = old_cfgs
        tuner.cache.clear()
        tuner.cache.update(old_cache)


@pytest.fixture
def first_config_only():
    """GPU correctness grids: one config per kernel keeps compiles to one per shape."""
    with only_configs(TUNED["vq_bf16"], TUNED["vq_bf16"].configs[:1]), \
         only_configs(TUNED["vq_fp32"], TUNED["vq_fp32"].configs[:1]), \
         only_configs(TUNED["attn"], TUNED["attn"].configs[:1]), \
         only_configs(TUNED["attn_fp32"], TUNED["attn_fp32"].configs[:1]):
        yield


def _block_m(dtype):
    tuner = TUNED["attn_fp32" if dtype == torch.float32 else "attn"]
    return tuner.configs[0].kwargs["BLOCK_M"]


# ------------------------------------------------------------------------ vq_encode

def _sq_err(x, cb, codes):
    """Exact (fp64) squared error of ``codes`` for ``x``."""
    M, D = x.shape
    G, K, dg = cb.shape
    xs = x.double().reshape(M, G, dg)
    chosen = torch.stack([cb[g].double()[codes[:, g].long()] for g in range(G)], 1)
    return ((xs - chosen) ** 2).sum((1, 2))


def _check_vq_exact(device, M, K, G, dg, xdtype=torch.float32):
    x = torch.randn(M, G * dg, device=device).to(xdtype)
    cb = torch.randn(G, K, dg, device=device)
    # Exact ties across codeword tiles: the lowest index must win. The interpreter's
    # fp32 dot is numpy's BLAS, whose rounding may depend on a column's position in the
    # tile, so there the copies sit at the same offset in each tile; on the GPU the
    # ieee dot is a per-element FMA chain and copies may sit anywhere.
    bk = TUNED["vq_fp32"].configs[0].kwargs["BLOCK_K"]
    dups = list(range(1 + bk, K, bk)) + ([] if INTERPRET or K < 4 else [K // 2, K - 1])
    if dups:
        cb[:, dups] = cb[:, 1:2].clone()
        x[0] = cb[:, dups[-1]].reshape(-1).to(xdtype)
    codes, err = tk.IMPLS["vq_encode"](x, cb, "fp32", True)
    rcodes, rerr = reference.vq_encode(x, cb, "fp32", True)
    if dups:  # the reference's fp64 BLAS may split such ties too: canonicalize it
        assert (codes[0] == 1).all(), f"exact tie: got {codes[0].tolist()}, want all 1"
        assert not torch.isin(codes, torch.tensor(dups, device=device)).any()
        rcodes = torch.where(torch.isin(rcodes, torch.tensor(dups, device=device)), 1, rcodes)
    assert codes.dtype == torch.int32 and codes.shape == (M, G)
    assert err.dtype == torch.float32 and err.shape == (M,)
    mism = (codes != rcodes).any(1).nonzero().flatten().tolist()
    assert not mism, f"rows {mism[:5]}: kernel {codes[mism[:5]].tolist()} " \
                     f"vs reference {rcodes[mism[:5]].tolist()}"
    torch.testing.assert_close(err, rerr, rtol=1e-5, atol=1e-5)
    codes_only, empty = tk.IMPLS["vq_encode"](x, cb, "fp32", False)
    assert torch.equal(codes_only, codes) and empty.shape == (0,)


def _check_vq_bf16(device, M, K, G, dg):
    x = torch.randn(M, G * dg, device=device)
    cb = torch.randn(G, K, dg, device=device)
    codes, err = tk.IMPLS["vq_encode"](x, cb, "bf16", True)
    rcodes, rerr = reference.vq_encode(x, cb, "bf16", True)
    # bf16 products are exact in fp32; only fp32 accumulation order differs from the
    # fp64 reference, so codes agree except at near-ties...
    agree = (codes == rcodes).float().mean().item()
    assert agree >= 0.98, f"only {agree:.3f} of codes agree with the bf16 reference"
    torch.testing.assert_close(err, _sq_err(x.bfloat16().float(), cb.bfloat16().float(),
                                            codes).float(), rtol=1e-4, atol=1e-4)
    # ...and the chosen codewords are near-optimal for the unrounded inputs.
    _, opt = reference.vq_encode(x, cb, "fp32", True)
    got = _sq_err(x, cb, codes)
    slack = 0.02 * opt.double() + 0.05 * G
    assert (got <= opt.double() + slack).all(), (got - opt.double()).max().item()


@requires_interpreter
@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("K", [1, 2, 100])
@pytest.mark.parametrize("M", [1, 97])
def test_vq_encode_fp32_exact(M, K, G):
    _check_vq_exact("cpu", M, K, G, dg=20)


@requires_interpreter
@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16])
def test_vq_encode_fp32_exact_half_inputs(xdtype):
    _check_vq_exact("cpu", 33, 50, 2, dg=16, xdtype=xdtype)


@requires_interpreter
def test_vq_encode_fp32_exact_wide_groups():
    _check_vq_exact("cpu", 19, 40, 1, dg=70)  # d-chunks: group wider than BLOCK_D


@requires_interpreter
@pytest.mark.parametrize("M,K,G,dg", [(97, 100, 1, 20), (64, 70, 3, 8), (20, 33, 1, 150)])
def test_vq_encode_bf16_near_optimal(M, K, G, dg):
    _check_vq_bf16("cpu", M, K, G, dg)


@requires_interpreter
def test_vq_encode_through_dispatch():
    x = torch.randn(4, 5, 12)
    cb = torch.randn(3, 9, 4)
    with astra_kernels.use_backend("triton", "cpu"):
        codes, err = astra_kernels.vq_encode(x, cb, return_error=True)
    rcodes, rerr = reference.vq_encode(x.reshape(-1, 12), cb, "fp32", True)
    assert torch.equal(codes.reshape(-1, 3), rcodes)
    torch.testing.assert_close(err.reshape(-1), rerr, rtol=1e-5, atol=1e-5)


@requires_interpreter
def test_vq_encode_empty():
    codes, err = tk.IMPLS["vq_encode"](torch.randn(0, 8), torch.randn(2, 5, 4), "fp32", True)
    assert codes.shape == (0, 2) and err.shape == (0,)


# ------------------------------------------------------------------ mixed_attention

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
LSE_ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _assert_attention_close(got, args, dtype, what=""):
    """``got = (out, lse)`` vs the fp32 reference, within 2x the reference's own error at
    ``dtype`` (``upcast=False``) plus atol; masked rows must be exactly 0 / -inf.
    Out-of-range codes are masked by the kernels (the reference would clamp them), so
    the reference sees them as -1."""
    out, lse = got
    if args[3] is not None:
        K = args[4].shape[1]
        args = list(args)
        args[3] = torch.where((args[3] < 0) | (args[3] >= K), -1, args[3])
    ref_out, ref_lse = reference.mixed_attention(*args, upcast=True)
    lp_out, lp_lse = reference.mixed_attention(*args, upcast=False)
    assert out.dtype == dtype and out.shape == ref_out.shape, what
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape, what
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), f"{what}: masked rows differ"
    assert not out.isnan().any() and not lse.isnan().any(), f"{what}: NaN"
    assert (out[empty] == 0).all(), f"{what}: rows with no visible key must be 0"
    ok = ~empty
    e_out = (out.float() - ref_out.float()).abs().max().item() if out.numel() else 0.0
    r_out = (lp_out.float() - ref_out.float()).abs().max().item() if out.numel() else 0.0
    e_lse = (lse[ok] - ref_lse[ok]).abs().max().item() if ok.any() else 0.0
    r_lse = (lp_lse[ok] - ref_lse[ok]).abs().max().item() if ok.any() else 0.0
    assert e_out <= 2 * r_out + ATOL[dtype], \
        f"{what}: out error {e_out:.3g} > 2 x reference's {r_out:.3g} + {ATOL[dtype]}"
    assert e_lse <= 2 * r_lse + LSE_ATOL[dtype], \
        f"{what}: lse error {e_lse:.3g} > 2 x reference's {r_lse:.3g} + {LSE_ATOL[dtype]}"


def _positions(Tq, Tl, Tr, device, generator=None):
    """Interleaved global positions; query 0 comes first, so its row sees no key."""
    perm = torch.randperm(Tq + Tl + Tr - 1, generator=generator) + 1
    q_pos = torch.cat([torch.zeros(1, dtype=torch.int64), perm[:Tq - 1].sort().values])
    kv_pos = perm[Tq - 1:Tq - 1 + Tl].sort().values
    r_pos = perm[Tq - 1 + Tl:].sort().values
    return q_pos.to(device), kv_pos.to(device), r_pos.to(device)


def _make_case(device, dtype, form, causal, B=2, H=4, Hkv=2, Tq=37, Tl=29, Tr=41, d=32,
               G=1, K=10, missing=True):
    """Positional args of the ``mixed_attention`` schema for one remote ``form``:
    none | dense | gather | codebook (the last two carry codes)."""
    mk = lambda *s: torch.randn(*s, device=device).to(dtype)  # noqa: E731
    q, k, v = mk(B, H, Tq, d), mk(B, Hkv, Tl, d), mk(B, Hkv, Tl, d)
    codes = pk = pv = rk = rv = None
    if form in ("gather", "codebook"):
        codes = torch.randint(0, K, (B, Tr, G), dtype=torch.int32, device=device)
        if missing and Tr > 3:
            codes[0, 1, 0] = -1
            codes[-1, Tr - 2, G - 1] = -1
            codes[0, 3, 0] = K + 5  # out of range: masked, never read
        pk, pv = mk(G, K, Hkv, d), mk(G, K, Hkv, d)
    elif form == "dense":
        rk, rv = mk(B, Hkv, Tr, d), mk(B, Hkv, Tr, d)
    qp = kp = rp = None
    if causal:
        qp, kp, rp = _positions(Tq, Tl, Tr if form != "none" else 0, device)
        if form == "none":
            rp = torch.zeros(0, dtype=torch.int64, device=device)
    return [q, k, v, codes, pk, pv, rk, rv, causal, qp, kp, rp, 1.0 / math.sqrt(d)]


def _run_attention(args, form):
    path = {"gather": "gather", "codebook": "codebook"}.get(form, "auto")
    return tk.mixed_attention_triton(*args, remote_path=path)


def _check_attention(device, dtype, form, causal, **shape):
    args = _make_case(device, dtype, form, causal, **shape)
    _assert_attention_close(_run_attention(args, form), args, dtype,
                            f"{form} causal={causal} {dtype}")


@requires_interpreter
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("form", ["none", "dense", "gather", "codebook"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_attention(dtype, form, causal):
    _check_attention("cpu", dtype, form, causal)


@requires_interpreter
@pytest.mark.parametrize("form", ["gather", "codebook", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mixed_attention_head_dim_80(dtype, form):
    _check_attention("cpu", dtype, form, True, B=1, H=2, Hkv=1, Tq=20, Tl=13, Tr=23, d=80)


@requires_interpreter
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_mixed_attention_groups_gqa(causal):
    """G = 3 tables summed in fp32, 6 query heads on 3 kv heads, missing codes."""
    _check_attention("cpu", torch.float16, "gather", causal, B=2, H=6, Hkv=3, Tq=18,
                     Tl=11, Tr=26, G=3, K=7)


def _tile_positions(bm, device):
    """Causal positions that give the query tiles of size ``bm`` three different remote
    cases in one launch: tile 0 sees no remote token, tile 1 some (per-key masks),
    tile 2 all (codebook space)."""
    Tq = 3 * bm - 5
    q_pos = torch.arange(Tq, dtype=torch.int64) * 10
    lo, hi = int(q_pos[bm - 1]), int(q_pos[bm])  # tile 0 max, tile 1 min
    r_pos = torch.cat([torch.randint(lo + 1, hi, (30,)),  # between tiles 0 and 1
                       torch.tensor([hi + 5, int(q_pos[2 * bm - 2]) - 1])])  # in tile 1
    kv_pos = torch.arange(0, 10 * Tq, 7, dtype=torch.int64)
    return Tq, q_pos.to(device), kv_pos.to(device), r_pos.to(device)


def _check_codebook_tiles(device, dtype):
    bm = _block_m(dtype)
    Tq, q_pos, kv_pos, r_pos = _tile_positions(bm, device)
    B, H, Hkv, d, K = 2, 2, 1, 32, 6
    Tr, Tl = r_pos.numel(), kv_pos.numel()
    mk = lambda *s: torch.randn(*s, device=device).to(dtype)  # noqa: E731
    q, k, v = mk(B, H, Tq, d), mk(B, Hkv, Tl, d), mk(B, Hkv, Tl, d)
    codes = torch.randint(0, K, (B, Tr, 1), dtype=torch.int32, device=device)
    codes[1, :5] = -1  # missing tokens are not counted
    codes[1, 7] = K  # neither are out-of-range ones
    codes[0, :, 0] = torch.where(codes[0, :, 0] == 2, 3, codes[0, :, 0])  # an unused code
    pk, pv = mk(1, K, Hkv, d), mk(1, K, Hkv, d)
    args = [q, k, v, codes, pk, pv, None, None, True, q_pos, kv_pos, r_pos, 0.3]
    for path in ("codebook", "gather", "auto"):
        _assert_attention_close(tk.mixed_attention_triton(*args, remote_path=path), args,
                                dtype, f"tiles path={path}")


@requires_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_codebook_space_per_tile(dtype):
    _check_codebook_tiles("cpu", dtype)


def test_remote_path_rule():
    choose = tk.choose_remote_path
    assert choose(1, 64, 500) == "codebook"
    assert choose(1, 1024, 500) == "gather"
    assert choose(4, 64, 5000) == "gather"
    assert choose(1, 1024, 500, "codebook") == "codebook"
    assert choose(1, 64, 500, "gather") == "gather"
    with pytest.raises(ValueError):
        choose(2, 64, 500, "codebook")


@requires_interpreter
def test_code_counts():
    codes = torch.tensor([[3, 1, 3, -1, 7, 3], [0, 0, 9, 2, 2, 2]],
                         dtype=torch.int32).unsqueeze(-1)
    cnt = tk.code_counts(codes, K=8)  # -1 and the out-of-range 9 are not counted
    want = torch.zeros(2, 8)
    want[0, [1, 3, 7]] = torch.tensor([1.0, 3.0, 1.0])
    want[1, [0, 2]] = torch.tensor([2.0, 3.0])
    assert torch.equal(cnt, want)


def _check_edge_cases(device, dtype):
    mk = lambda *s: torch.randn(*s, device=device).to(dtype)  # noqa: E731
    B, H, Hkv, Tq, Tl, d, K = 2, 2, 1, 9, 6, 32, 5
    q, k, v = mk(B, H, Tq, d), mk(B, Hkv, Tl, d), mk(B, Hkv, Tl, d)
    pk, pv = mk(1, K, Hkv, d), mk(1, K, Hkv, d)
    i32 = dict(dtype=torch.int32, device=device)
    cases = {
        "Tr=0 codes": [q, k, v, torch.zeros(B, 0, 1, **i32), pk, pv, None, None, False,
                       None, None, None, 0.2],
        "Tr=0 dense": [q, k, v, None, None, None, mk(B, Hkv, 0, d), mk(B, Hkv, 0, d),
                       False, None, None, None, 0.2],
        "all missing": [q, k, v, torch.full((B, 12, 1), -1, **i32), pk, pv, None, None,
                        False, None, None, None, 0.2],
        "Tl=0 remote only": [q, mk(B, Hkv, 0, d), mk(B, Hkv, 0, d),
                             torch.randint(0, K, (B, 12, 1), **i32), pk, pv, None, None,
                             False, None, None, None, 0.2],
    }
    ar = lambda n, s=0: torch.arange(s, s + n, device=device)  # noqa: E731
    # causal: nothing visible for anyone (all keys later than all queries)
    cases["causal none visible"] = [q, k, v, torch.randint(0, K, (B, 12, 1), **i32), pk,
                                    pv, None, None, True, ar(Tq), ar(Tl, 100), ar(12, 200),
                                    0.2]
    # causal: remote all visible (codebook space), local partly
    cases["causal remote before"] = [q, k, v, torch.randint(0, K, (B, 12, 1), **i32), pk,
                                     pv, None, None, True, ar(Tq, 20), ar(Tl, 24), ar(12),
                                     0.2]
    for name, args in cases.items():
        for path in ("auto", "gather", "codebook"):
            got = tk.mixed_attention_triton(*args, remote_path=path)
            _assert_attention_close(got, args, dtype, f"{name} path={path}")


@requires_interpreter
def test_mixed_attention_edge_cases():
    _check_edge_cases("cpu", torch.float32)


@requires_interpreter
def test_mixed_attention_through_dispatch():
    args = _make_case("cpu", torch.float32, "gather", True, Tq=12, Tl=12, Tr=20)
    q, k, v, codes, pk, pv, _, _, causal, qp, kp, rp, scale = args
    with astra_kernels.use_backend("triton", "cpu"):
        astra_kernels.set_code_checks(False)  # let the out-of-range code reach the kernel
        try:
            got = astra_kernels.mixed_attention(q, k, v, codes, pk, pv, causal=True,
                                                q_pos=qp, kv_pos=kp, remote_pos=rp,
                                                scale=scale)
        finally:
            astra_kernels.set_code_checks(True)
    _assert_attention_close(got, args, torch.float32, "dispatch")


@requires_interpreter
def test_triton_ops_registered():
    """The launchers are also ``astra_triton::`` ops (triton_op) taking the astra schema's arguments."""
    for op in ("vq_encode", "mixed_attention", "merge_attention"):
        assert hasattr(torch.ops.astra_triton, op), op
    args = _make_case("cpu", torch.float32, "codebook", False, B=1, H=2, Hkv=1, Tq=5,
                      Tl=4, Tr=30, K=6)
    out, lse = torch.ops.astra_triton.mixed_attention(*args, remote_path="codebook")
    _assert_attention_close((out, lse), args, torch.float32, "astra_triton op")


# ----------------------------------------------------------------- merge_attention

def _check_merge(device, dtype, shape=(2, 3, 17), d=40):
    a, b = torch.randn(*shape, d, device=device).to(dtype), \
        torch.randn(*shape, d, device=device).to(dtype)
    la, lb = torch.randn(*shape, device=device), torch.randn(*shape, device=device)
    la[0, 0, :3] = float("-inf")
    lb[0, 0, 2:5] = float("-inf")  # row 2: both empty
    a[0, 0, :3] = 0
    b[0, 0, 2:5] = 0
    out, lse = tk.IMPLS["merge_attention"](a, la, b, lb)
    rout, rlse = reference.merge_attention(a, la, b, lb)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rlse))
    fin = ~torch.isneginf(rlse)
    torch.testing.assert_close(lse[fin], rlse[fin], rtol=1e-5, atol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), rout.float(), rtol=tol, atol=tol)


@requires_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_attention(dtype):
    _check_merge("cpu", dtype)


# ------------------------------------------------------------------- cross-compile

_XCOMPILE = textwrap.dedent('''
    import json, os, sys
    assert "TRITON_INTERPRET" not in os.environ
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from astra_kernels.triton import KERNELS

    def jit(k):
        while not isinstance(k, triton.runtime.jit.JITFunction):
            k = k.fn
        return k

    def attn_types(dt):
        t = {n: "*" + dt for n in ("q_ptr", "k_ptr", "v_ptr", "rk_ptr", "rv_ptr", "out_ptr")}
        t.update(codes_ptr="*i32", cnt_ptr="*fp32",
                 qpos_ptr="*i64", kvpos_ptr="*i64", rpos_ptr="*i64", rminmax_ptr="*i64",
                 lse_ptr="*fp32", qk_scale="fp32")
        t.update({n: "i32" for n in ("H", "HKV", "Tq", "Tl", "Tr", "G", "K", "TQ_BKT",
                                     "TKV_BKT")})
        return t

    def vq_types(xdt, cbdt):
        t = dict(x_ptr="*" + xdt, cb_ptr="*" + cbdt, cn_ptr="*fp32", codes_ptr="*i32",
                 err_ptr="*fp32")
        t.update({n: "i32" for n in ("M", "K", "DG", "G")})
        return t

    CASES = [
        ("vq_encode/bf16", "vq_encode", vq_types("bf16", "bf16"),
         dict(BLOCK_D=64, X_RESIDENT=True, PREC_BF16=True, RETURN_ERR=True, ERR_D=16,
              BLOCK_M=128, BLOCK_K=64), 8, 3),
        ("vq_encode/fp16-exact", "vq_encode", vq_types("fp16", "fp32"),
         dict(BLOCK_D=32, X_RESIDENT=False, PREC_BF16=False, RETURN_ERR=True, ERR_D=16,
              BLOCK_M=64, BLOCK_K=64), 4, 3),
        ("mixed_attention/fp16", "mixed_attention", attn_types("fp16"),
         dict(HEAD_D=128, BLOCK_D=128, REMOTE_MODE=3, IS_CAUSAL=True, IS_FP32=False,
              BLOCK_M=128, BLOCK_N=64), 8, 3),
        ("mixed_attention/bf16", "mixed_attention", attn_types("bf16"),
         dict(HEAD_D=80, BLOCK_D=128, REMOTE_MODE=2, IS_CAUSAL=False, IS_FP32=False,
              BLOCK_M=128, BLOCK_N=32), 8, 3),
        ("merge_attention/bf16", "merge_attention",
         dict(oa_ptr="*bf16", la_ptr="*fp32", ob_ptr="*bf16", lb_ptr="*fp32",
              out_ptr="*bf16", lse_ptr="*fp32", R="i32", D="i32"),
         dict(BLOCK_R=16, BLOCK_D=128), 4, 1),
        ("code_counts/i32", "code_counts",
         dict(codes_ptr="*i32", cnt_ptr="*fp32", Tr="i32", G="i32", K="i32"),
         dict(BLOCK=1024), 4, 1),
    ]
    res = {}
    for cc in (90, 80):
        for name, kname, types, consts, nw, ns in CASES:
            fn = jit(KERNELS[kname])
            sig = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
            attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                     if sig[n].startswith("*")}
            try:
                ck = triton.compile(ASTSource(fn, sig, consts, attrs),
                                    target=GPUTarget("cuda", cc, 32),
                                    options=dict(num_warps=nw, num_stages=ns))
                ptx = ck.asm["ptx"]
                res[f"{name}@sm_{cc}"] = dict(ptx=len(ptx), cubin=len(ck.asm["cubin"]),
                                              wgmma="wgmma.mma_async" in ptx,
                                              mma="mma.sync" in ptx)
            except Exception as e:  # reported per case by the test
                res[f"{name}@sm_{cc}"] = dict(error=f"{type(e).__name__}: {e}"[:2000])
    print("XCOMPILE" + json.dumps(res))
''')

XC_CASES = [f"{n}@sm_{cc}" for cc in (90, 80) for n in (
    "vq_encode/bf16", "vq_encode/fp16-exact", "mixed_attention/fp16",
    "mixed_attention/bf16", "merge_attention/bf16", "code_counts/i32")]


@pytest.fixture(scope="module")
def xcompiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("ASTRA_DISABLE_C", "1")
    proc = subprocess.run([sys.executable, "-c", _XCOMPILE], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("XCOMPILE")]
    assert proc.returncode == 0 and line, f"compile script failed:\n{proc.stderr[-4000:]}"
    return json.loads(line[-1][len("XCOMPILE"):])


@pytest.mark.parametrize("case", XC_CASES)
def test_cross_compile(xcompiled, case):
    r = xcompiled[case]
    assert "error" not in r, r.get("error")
    assert r["ptx"] > 0 and r["cubin"] > 0
    if case.startswith("mixed_attention") or case.startswith("vq_encode/bf16"):
        # 16-bit dots on tensor cores: wgmma on Hopper, mma.sync on Ampere
        assert r["wgmma"] if case.endswith("sm_90") else r["mma"], r


# ---------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("K", [1, 2, 100, 1024])
@pytest.mark.parametrize("M", [1, 97, 3001])
def test_gpu_vq_encode_fp32_exact(first_config_only, M, K, G):
    _check_vq_exact("cuda", M, K, G, dg=24)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("M,K,G,dg", [(4099, 1024, 1, 64), (1000, 256, 16, 48),
                                      (513, 1000, 1, 768), (64, 70, 3, 8)])
def test_gpu_vq_encode_bf16_near_optimal(first_config_only, M, K, G, dg):
    _check_vq_bf16("cuda", M, K, G, dg)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16])
def test_gpu_vq_encode_fp32_wide_half_inputs(first_config_only, xdtype):
    _check_vq_exact("cuda", 777, 300, 1, dg=200, xdtype=xdtype)


GPU_SHAPE = dict(B=2, H=8, Hkv=2, Tq=300, Tl=257, Tr=515, K=64)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("form", ["none", "dense", "gather", "codebook"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_mixed_attention(first_config_only, dtype, form, causal):
    _check_attention("cuda", dtype, form, causal, d=128, **GPU_SHAPE)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("d", [32, 64, 80])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_mixed_attention_head_dims(first_config_only, dtype, d):
    _check_attention("cuda", dtype, "gather", True, d=d, G=4, **GPU_SHAPE)
    _check_attention("cuda", dtype, "codebook", True, d=d, **GPU_SHAPE)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_codebook_space_per_tile(first_config_only, dtype):
    _check_codebook_tiles("cuda", dtype)


@pytest.mark.gpu
@requires_cuda
def test_gpu_mixed_attention_edge_cases(first_config_only):
    _check_edge_cases("cuda", torch.float16)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_merge_attention(dtype):
    _check_merge("cuda", dtype, shape=(2, 8, 333), d=128)


@pytest.mark.gpu
@requires_cuda
def test_gpu_every_autotune_config():
    """Each config of each autotune list gives correct results (the tuner may pick any)."""
    for key in ("vq_bf16", "vq_fp32"):
        for cfg in TUNED[key].configs:
            with only_configs(TUNED[key], [cfg]):
                if key == "vq_bf16":
                    _check_vq_bf16("cuda", 1000, 300, 2, 64)
                else:
                    _check_vq_exact("cuda", 1000, 300, 2, 40)
    for key, dtype in (("attn", torch.float16), ("attn_fp32", torch.float32)):
        for cfg in TUNED[key].configs:
            with only_configs(TUNED[key], [cfg]):
                _check_attention("cuda", dtype, "codebook", True, d=128, **GPU_SHAPE)
                _check_attention("cuda", dtype, "gather", True, d=80, G=2, **GPU_SHAPE)


@pytest.mark.gpu
@requires_cuda
def test_gpu_autotuned_and_compiled():
    """Full autotuning, then ``torch.compile(fullgraph=True)`` traces into the kernels."""
    args = _make_case("cuda", torch.bfloat16, "codebook", True, d=128, **GPU_SHAPE)

    def f(*a):
        out, lse = torch.ops.astra_triton.mixed_attention(*a)
        return torch.ops.astra_triton.merge_attention(out, lse, out, lse)

    eager = f(*args)
    compiled = torch.compile(f, fullgraph=True)(*args)
    _assert_attention_close((eager[0], eager[1] - math.log(2)), args, torch.bfloat16,
                            "eager")
    # inductor may autotune to another config: same result up to rounding
    torch.testing.assert_close(compiled[0], eager[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-4)
    x = torch.randn(2048, 256, device="cuda")
    cb = torch.randn(4, 512, 64, device="cuda")
    codes = torch.compile(lambda a, b: torch.ops.astra_triton.vq_encode(a, b, "bf16")[0],
                          fullgraph=True)(x, cb)
    agree = (codes == reference.vq_encode(x, cb, "bf16")[0]).float().mean().item()
    assert agree > 0.99


@pytest.mark.parametrize("triton_v,numpy_v,bad", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.8.0", "2.4.6", False),
    ("3.6.0+git1234", "2.5.0rc1", True), ("3.10.0", "3.0.0", False)])
def test_interpreter_version_warning(triton_v, numpy_v, bad):
    # checked on this machine: triton 3.6 + numpy 2.4 fails in the interpreter,
    # triton 3.6 + numpy 2.3 and triton 3.8 + numpy 2.4 pass
    msg = tk.interpreter_problem(triton_v, numpy_v)
    assert (msg is not None) == bad
    if bad:
        assert "numpy<2.4" in msg and triton_v in msg

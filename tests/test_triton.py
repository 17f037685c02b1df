"""Triton-specific paths (the grid every backend passes is in ``test_ops``).

- Without a GPU the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``,
  set by conftest) on small shapes: exact ties across codeword tiles, groups wider
  than one ``BLOCK_D``, the remote paths forced (gather / codebook space, per query
  tile), the code counts, edge cases on every path, the ``astra_triton::`` ops.
- The cross-compile tests build every kernel for sm_90 and sm_80 in a subprocess
  without ``TRITON_INTERPRET`` (no GPU needed) and check the PTX/cubin.
- With a GPU (``-m gpu``) the same checks run on CUDA tensors at larger shapes,
  autotuning limited to the first config, plus one test that runs every config and one
  that traces the ops with ``torch.compile``.

Comparison rules and tolerances: :mod:`tests.oracles`.
"""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from astra_kernels import reference
from tests._util import first_triton_configs, only_configs, require_backend, requires_cuda
from tests.oracles import (
    DTYPES,
    TOL,
    assert_codes_agree,
    assert_codes_exact,
    assert_codes_near_optimal,
    assert_vq_error,
    check_merge_attention,
    check_mixed_attention,
    interpreter_ulps,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def interpreter():
    """Triton kernels on CPU tensors: skips with the reason when the interpreter cannot
    run them here (no TRITON_INTERPRET, no triton, a numpy it cannot use)."""
    if not INTERPRET:
        pytest.skip("interpreter tests need TRITON_INTERPRET=1 (conftest sets it when no "
                    "GPU is visible); the gpu-marked tests cover this machine")
    require_backend("cpu", "triton")


from astra_kernels import triton as tk  # noqa: E402  (after conftest set TRITON_INTERPRET)
from astra_kernels.triton import mixed_attention as tk_attn  # noqa: E402
from astra_kernels.triton import vq_encode as tk_vq  # noqa: E402

TUNED = {
    "vq_bf16": tk_vq._vq_encode_bf16_tuned,
    "vq_fp32": tk_vq._vq_encode_fp32_tuned,
    "attn": tk_attn._mixed_attention_fwd_tuned,
    "attn_fp32": tk_attn._mixed_attention_fwd_fp32_tuned,
}


@pytest.fixture
def first_config_only():
    """GPU correctness grids: one config per kernel keeps compiles to one per shape."""
    with first_triton_configs():
        yield


def _block_m(dtype):
    tuner = TUNED["attn_fp32" if dtype == torch.float32 else "attn"]
    return tuner.configs[0].kwargs["BLOCK_M"]


# ------------------------------------------------------------------------ vq_encode

def _check_vq_exact(device, M, K, G, dg, xdtype=torch.float32):
    """fp32 codes equal the float64 nearest codeword, with exact ties across codeword
    tiles going to the lowest index. The interpreter's fp32 dot is numpy's BLAS, whose
    rounding may depend on a column's position in the tile, so there the copies sit at
    the same offset in each tile; on the GPU the ieee dot is a per-element FMA chain
    and copies may sit anywhere."""
    x = torch.randn(M, G * dg, device=device).to(xdtype)
    cb = torch.randn(G, K, dg, device=device)
    bk = TUNED["vq_fp32"].configs[0].kwargs["BLOCK_K"]
    dups = list(range(1 + bk, K, bk)) + ([] if INTERPRET or K < 4 else [K // 2, K - 1])
    if dups:
        cb[:, dups] = cb[:, 1:2].clone()
        x[0] = cb[:, dups[-1]].reshape(-1).to(xdtype)
    codes, err = tk.IMPLS["vq_encode"](x, cb, "fp32", True)
    what = f"triton vq_encode fp32 M={M} K={K} G={G} dg={dg} x {xdtype}"
    if dups:
        assert (codes[0] == 1).all(), f"{what}: exact tie gave {codes[0].tolist()}, want all 1"
    assert_codes_exact(codes, x, cb, what=what)
    assert_vq_error(err, codes, x, cb, what=what)
    codes_only, empty = tk.IMPLS["vq_encode"](x, cb, "fp32", False)
    assert torch.equal(codes_only, codes) and empty.shape == (0,)


def _check_vq_bf16(device, M, K, G, dg):
    x = torch.randn(M, G * dg, device=device)
    cb = torch.randn(G, K, dg, device=device)
    codes, err = tk.IMPLS["vq_encode"](x, cb, "bf16", True)
    what = f"triton vq_encode bf16 M={M} K={K} G={G} dg={dg}"
    # bf16 products are exact in fp32: nearest for the rounded operands up to fp32
    # accumulation order
    assert_codes_near_optimal(codes, x, cb, precision="bf16", what=what)
    assert_vq_error(err, codes, x, cb, precision="bf16", what=what, rtol=1e-4, atol=1e-4)
    assert_codes_agree(codes, reference.vq_encode(x, cb, "bf16")[0], 0.98, what)


@pytest.mark.parametrize("M,K,G,dg", [(1, 1, 1, 20), (97, 100, 3, 20), (33, 70, 2, 16)])
def test_vq_encode_fp32_ties_across_tiles(interpreter, M, K, G, dg):
    _check_vq_exact("cpu", M, K, G, dg)


@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16], ids=str)
def test_vq_encode_fp32_exact_half_inputs(interpreter, xdtype):
    _check_vq_exact("cpu", 33, 50, 2, dg=16, xdtype=xdtype)


def test_vq_encode_fp32_exact_wide_groups(interpreter):
    _check_vq_exact("cpu", 19, 40, 1, dg=70)  # d-chunks: group wider than BLOCK_D


def test_vq_encode_bf16_wide_groups(interpreter):
    _check_vq_bf16("cpu", 20, 33, 1, 150)


# ------------------------------------------------------------------ mixed_attention

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


def _ulps(device, dtype):
    return interpreter_ulps(dtype, device == "cpu")


def _check_attention(device, dtype, form, causal, **shape):
    args = _make_case(device, dtype, form, causal, **shape)
    check_mixed_attention(_run_attention(args, form), *args,
                            what=f"triton {form} causal={causal}", out_ulps=_ulps(device, dtype))


@pytest.mark.parametrize("form", ["gather", "codebook"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_remote_path_forced(interpreter, dtype, form):
    """Each remote path on its own (``auto`` is what the grid in test_ops runs): head
    dim 80 (masked d-tail), interleaved causal positions, lost and out-of-range codes."""
    _check_attention("cpu", dtype, form, True, B=1, H=2, Hkv=1, Tq=20, Tl=13, Tr=23, d=80)


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
        check_mixed_attention(tk.mixed_attention_triton(*args, remote_path=path), *args,
                                what=f"triton tiles path={path}", out_ulps=_ulps(device, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_codebook_space_per_tile(interpreter, dtype):
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
    # rotated (RoPE) keys differ per position: always the gather path
    assert choose(1, 64, 500, rope=True) == "gather"
    assert choose(1, 64, 500, "gather", rope=True) == "gather"
    with pytest.raises(ValueError, match="RoPE"):
        choose(1, 64, 500, "codebook", rope=True)


def _rope_args(device, dtype, form, B=2, H=4, Hkv=2, Tq=6, Tl=5, Tr=23, d=32, R=16, K=4):
    """Schema args with rope_cos/rope_sin ``[B, Tr, R]``; G = 1 with K << Tr, where the
    auto rule would take codebook space without rope; queries after every remote token."""
    args = _make_case(device, dtype, form, True, B=B, H=H, Hkv=Hkv, Tq=Tq, Tl=Tl, Tr=Tr,
                      d=d, K=K)
    ar = lambda n, s=0: torch.arange(s, s + n, device=device)  # noqa: E731
    args[9:12] = [ar(Tq, 3 * Tr), ar(Tl, 3 * Tr), ar(Tr) * 3]
    ang = (ar(Tr) * 3 + 11 * ar(B)[:, None]).double()[..., None] / \
        10000 ** (torch.arange(0, R, 2, device=device).double() / R)
    ang = torch.cat([ang, ang], -1)
    return args + [ang.cos().float(), ang.sin().float()]


@pytest.mark.parametrize("form", ["gather", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rope_takes_the_gather_path(interpreter, dtype, form):
    """With rope, ``auto`` (and ``gather``) rotate the remote keys; forcing codebook
    space raises; materialized remote keys (dense) are rotated too."""
    args = _rope_args("cpu", dtype, form)
    paths = ("auto", "gather") if form == "gather" else ("auto",)
    for path in paths:
        check_mixed_attention(tk.mixed_attention_triton(*args, remote_path=path), *args,
                              what=f"triton rope {form} path={path}",
                              out_ulps=_ulps("cpu", dtype))
    if form == "gather":
        with pytest.raises(ValueError, match="RoPE"):
            tk.mixed_attention_triton(*args, remote_path="codebook")


def test_code_counts(interpreter):
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
            check_mixed_attention(got, *args, what=f"triton {name} path={path}",
                                    out_ulps=_ulps(device, dtype))


def test_mixed_attention_edge_cases(interpreter):
    _check_edge_cases("cpu", torch.float32)


def test_triton_ops_registered(interpreter):
    """The launchers are also ``astra_triton::`` ops (``triton_op``) that take the
    arguments of the astra schema."""
    for op in ("vq_encode", "mixed_attention", "merge_attention"):
        assert hasattr(torch.ops.astra_triton, op), op
    args = _make_case("cpu", torch.float32, "codebook", False, B=1, H=2, Hkv=1, Tq=5,
                      Tl=4, Tr=30, K=6)
    got = torch.ops.astra_triton.mixed_attention(*args, remote_path="codebook")
    check_mixed_attention(got, *args, what="astra_triton op")


# ----------------------------------------------------------------- merge_attention

def _check_merge(device, dtype, shape=(2, 3, 17), d=40):
    a, b = torch.randn(*shape, d, device=device).to(dtype), \
        torch.randn(*shape, d, device=device).to(dtype)
    la, lb = torch.randn(*shape, device=device), torch.randn(*shape, device=device)
    la[0, 0, :3] = float("-inf")
    lb[0, 0, 2:5] = float("-inf")  # row 2: both empty
    a[0, 0, :3] = 0
    b[0, 0, 2:5] = 0
    got = tk.IMPLS["merge_attention"](a, la, b, lb)
    check_merge_attention(got, a, la, b, lb, what="triton merge", out_ulps=_ulps(device, dtype))


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
                 cos_ptr="*fp32", sin_ptr="*fp32", lse_ptr="*fp32", qk_scale="fp32")
        t.update({n: "i32" for n in ("H", "HKV", "Tq", "Tl", "Tr", "G", "K", "ROPE_R",
                                     "ROPE_BS", "TQ_BKT", "TKV_BKT")})
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
              HAS_ROPE=False, BLOCK_M=128, BLOCK_N=64), 8, 3),
        ("mixed_attention/bf16", "mixed_attention", attn_types("bf16"),
         dict(HEAD_D=80, BLOCK_D=128, REMOTE_MODE=2, IS_CAUSAL=False, IS_FP32=False,
              HAS_ROPE=True, BLOCK_M=128, BLOCK_N=32), 8, 3),
        ("mixed_attention/fp16-dense-rope", "mixed_attention", attn_types("fp16"),
         dict(HEAD_D=64, BLOCK_D=64, REMOTE_MODE=1, IS_CAUSAL=True, IS_FP32=False,
              HAS_ROPE=True, BLOCK_M=64, BLOCK_N=64), 4, 3),
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
            consts = {n: c for n, c in consts.items() if n in fn.arg_names}
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
    "mixed_attention/bf16", "mixed_attention/fp16-dense-rope", "merge_attention/bf16",
    "code_counts/i32")]


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


@pytest.mark.slow  # one subprocess compiles every kernel twice (~10 s)
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
@pytest.mark.parametrize("form", ["gather", "dense"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_mixed_attention_rope(first_config_only, dtype, form):
    args = _rope_args("cuda", dtype, form, B=2, H=9, Hkv=3, Tq=300, Tl=257, Tr=1500, d=128,
                      R=64, K=64)
    for path in ("auto", "gather") if form == "gather" else ("auto",):
        check_mixed_attention(tk.mixed_attention_triton(*args, remote_path=path), *args,
                              what=f"triton rope {form} path={path}")


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


@pytest.mark.slow  # compiles every config of every kernel
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


@pytest.mark.slow  # full autotuning, then torch.compile
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
    # merging a partial with itself: the same output, lse + log 2
    check_mixed_attention((eager[0], eager[1] - math.log(2)), *args, what="eager")
    # inductor may autotune to another config: same result up to rounding
    torch.testing.assert_close(compiled[0], eager[0], **TOL[torch.bfloat16].close)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-4)  # fp32 lse of bf16 dots
    x = torch.randn(2048, 256, device="cuda")
    cb = torch.randn(4, 512, 64, device="cuda")
    codes = torch.compile(lambda a, b: torch.ops.astra_triton.vq_encode(a, b, "bf16")[0],
                          fullgraph=True)(x, cb)
    assert_codes_near_optimal(codes, x, cb, precision="bf16", what="compiled vq_encode")


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

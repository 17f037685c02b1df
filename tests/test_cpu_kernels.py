"""The fast paths of the compiled CPU kernels (csrc/cpu), each against an oracle
(the grid every backend passes is in ``test_ops``; the rules in :mod:`tests.oracles`).

- ``vq_encode``: the exact fp32 path re-ranks near-ties (a codebook holding a token
  and a near-duplicate of it), the bf16 fast path agrees with the exact argmin, the
  per-codebook cache is rebuilt when the codebook changes in place or is replaced,
  row and codeword counts at the edges of the kernels' tiles.
- ``mixed_attention``: the codebook-space remote path (G = 1, fewer distinct codes
  than remote tokens) equals attention over materialized K/V; the causal rule per
  query tile (codebook space / per-key masks / nothing) matches the reference; key
  counts at the edges of the key tiles.

Skipped when the extension was not built; failed when it was built but does not load.
"""
import math

import pytest
import torch

import astra_kernels as ak
from astra_kernels import reference
from tests._util import require_compiled
from tests.oracles import (
    assert_codes_agree,
    assert_codes_exact,
    assert_codes_near_optimal,
    assert_vq_error,
    check_mixed_attention,
    nearest_codes,
    quantization_mse,
)


@pytest.fixture(autouse=True)
def _cpp():
    require_compiled()
    with ak.use_backend("cpp", "cpu"):
        yield


def _exact_codes(x, cb):
    """float64 nearest codewords (ties to the lowest index) and all distances."""
    return nearest_codes(x, cb)


def _clustered(n, d, centers, gen, spread):
    c = torch.randn(centers, d, generator=gen)
    pick = torch.randint(centers, (n,), generator=gen)
    return c[pick] + spread * torch.randn(n, d, generator=gen)


# ----------------------------------------------------------------------------- vq_encode

@pytest.mark.parametrize("G", [1, 4])
def test_fp32_near_ties_are_exact(G):
    """Each token's own value and a near-duplicate (distance ~1e-5 .. 1e-4) are both in
    the codebook, with large norms: ||c||^2 - 2 x.c alone picks the wrong one often."""
    gen = torch.Generator().manual_seed(0)
    M, dg, K = 96, 64, 256
    x = (torch.randn(M, G * dg, generator=gen) + 20.0)
    cb = torch.randn(G, K, dg, generator=gen) + 20.0
    xs = x.reshape(M, G, dg)
    for g in range(G):
        own = torch.randperm(K, generator=gen)[:2 * M].reshape(M, 2)
        cb[g, own[:, 0]] = xs[:, g]  # the token itself
        cb[g, own[:, 1]] = xs[:, g] + 1e-3 * torch.randn(M, dg, generator=gen)
    assert_codes_exact(ak.vq_encode(x, cb), x, cb, what=f"cpp near-ties G={G}")
    assert_codes_exact(reference.vq_encode(x, cb)[0], x, cb, what="reference near-ties")


@pytest.mark.parametrize("K", [1500, 20000])
def test_fp32_near_ties_are_exact_both_rerank_paths(K):
    """K=1500: the tile's dot products are kept and only the codewords within the
    rounding bound are re-ranked in fp64; K=20000 (K x rows past the kept-dots limit):
    direct distances to every codeword first. Both must give the fp64 argmin."""
    gen = torch.Generator().manual_seed(K)
    M, dg = 64, 16
    x = torch.randn(M, dg, generator=gen) + 30.0
    cb = torch.randn(1, K, dg, generator=gen) + 30.0
    own = torch.randperm(K, generator=gen)[:3 * M].reshape(M, 3)
    cb[0, own[:, 0]] = x + 1e-3 * torch.randn(M, dg, generator=gen)
    cb[0, own[:, 1]] = x + 1e-3 * torch.randn(M, dg, generator=gen)
    cb[0, own[:, 2]] = x + 2e-3 * torch.randn(M, dg, generator=gen)
    assert_codes_exact(ak.vq_encode(x, cb), x, cb, what=f"cpp re-rank K={K}")


def test_fp32_exact_ties_lowest_index_after_rerank():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 32, generator=gen) + 50.0
    cb = torch.randn(1, 64, 32, generator=gen) + 50.0
    cb[0, 10:50] = x  # 40 exact matches ...
    cb[0, 3] = x[7]   # ... and an exact duplicate of row 7's at a lower index
    codes = ak.vq_encode(x, cb)[:, 0]
    expect = torch.arange(10, 50, dtype=torch.int32)
    expect[7] = 3
    assert torch.equal(codes, expect)


@pytest.mark.parametrize("M,D,G,K", [(1024, 128, 1, 512), (600, 192, 8, 300), (37, 24, 3, 7)])
def test_bf16_fast_path_agrees(M, D, G, K):
    gen = torch.Generator().manual_seed(M + K)
    cb = _clustered(G * K, D // G, max(2, K // 4), gen, 0.3).reshape(G, K, D // G)
    pick = torch.randint(0, K, (M, G), generator=gen)
    x = torch.stack([cb[g][pick[:, g]] for g in range(G)], 1).reshape(M, D)
    x = x + 0.3 * torch.randn(M, D, generator=gen)
    exact = ak.vq_encode(x, cb)
    fast, err_fast = ak.vq_encode(x, cb, precision="bf16", return_error=True)
    what = f"cpp bf16 M={M} D={D} G={G} K={K}"
    assert_codes_near_optimal(fast, x, cb, precision="bf16", what=what)
    assert_codes_agree(fast, exact, 0.99, what)
    # quantization error of the chosen codewords, in fp64 on the fp32 values
    assert quantization_mse(fast, x, cb) <= quantization_mse(exact, x, cb) * (1 + 1e-4)
    # and the error output is the bf16-rounded distance to the chosen codewords
    assert_vq_error(err_fast, fast, x, cb, precision="bf16", what=what, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bf16_fast_path_low_precision_inputs(dtype):
    gen = torch.Generator().manual_seed(5)
    cb = torch.randn(2, 100, 40, generator=gen)
    x = (cb[:, torch.randint(0, 100, (300,), generator=gen)].permute(1, 0, 2).reshape(300, 80)
         + 0.2 * torch.randn(300, 80, generator=gen)).to(dtype)
    fast = ak.vq_encode(x, cb, precision="bf16")
    assert_codes_near_optimal(fast, x, cb, precision="bf16", what=f"cpp bf16 {dtype} input")
    assert_codes_agree(fast, _exact_codes(x.float(), cb)[0], 0.99, f"cpp bf16 {dtype} input")


# Tile edges of csrc/cpu/vq_encode.cpp: 128 rows per fp32 tile, 64 codewords per fp32
# brgemm; bf16: 256 rows per tile, 64-row x 6-codeword register blocks.
@pytest.mark.parametrize("M,K", [(127, 63), (128, 64), (129, 65), (63, 6), (65, 7), (257, 13),
                                 (256, 1)])
@pytest.mark.parametrize("dg", [16, 17])
def test_vq_encode_tile_edges(M, K, dg):
    gen = torch.Generator().manual_seed(M * K + dg)
    x, cb = torch.randn(M, 2 * dg, generator=gen), torch.randn(2, K, dg, generator=gen)
    codes, err = ak.vq_encode(x, cb, return_error=True)
    assert_codes_exact(codes, x, cb, what=f"cpp fp32 tile edge M={M} K={K} dg={dg}")
    assert_vq_error(err, codes, x, cb, what="cpp fp32 tile edge")
    codes, err = ak.vq_encode(x, cb, precision="bf16", return_error=True)
    what = f"cpp bf16 tile edge M={M} K={K} dg={dg}"
    assert_codes_near_optimal(codes, x, cb, precision="bf16", what=what)
    assert_vq_error(err, codes, x, cb, precision="bf16", what=what, rtol=1e-4, atol=1e-4)


def _stats():
    entries, hits, misses = torch.ops.astra_C.vq_cache_stats()
    return hits, misses


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_codebook_cache_invalidates_on_in_place_change(precision):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 32, generator=gen)
    cb = torch.randn(1, 50, 32, generator=gen) * 3
    first = ak.vq_encode(x, cb, precision=precision)
    h0, m0 = _stats()
    again = ak.vq_encode(x, cb, precision=precision)
    h1, m1 = _stats()
    assert torch.equal(first, again) and h1 == h0 + 1 and m1 == m0  # served from the cache
    cb[0, 17] = x[5]  # in place: row 5's own value becomes codeword 17
    cb[0, 30].mul_(-1.0)
    after = ak.vq_encode(x, cb, precision=precision)
    assert after[5, 0] == 17
    assert torch.equal(after, _exact_codes(x, cb)[0]) or precision == "bf16"
    assert _stats()[1] == m1 + 1  # rebuilt
    # a new tensor (possibly at the freed one's address) never reuses a stale entry
    del cb
    cb2 = torch.randn(1, 50, 32, generator=gen)
    assert torch.equal(ak.vq_encode(x, cb2, precision=precision)[:, 0],
                       _exact_codes(x, cb2)[0][:, 0]) or precision == "bf16"
    cb2[0].copy_(-cb2[0])
    flipped = ak.vq_encode(x, cb2, precision=precision)
    assert (flipped == _exact_codes(x, cb2)[0]).float().mean() >= 0.98


def test_cache_clear_and_inference_tensors():
    x = torch.randn(16, 8)
    cb = torch.randn(2, 10, 4)
    ak.vq_encode(x, cb)
    torch.ops.astra_C.vq_cache_clear()
    assert torch.ops.astra_C.vq_cache_stats()[0] == 0
    with torch.inference_mode():
        cbi = torch.randn(2, 10, 4)
        a = ak.vq_encode(x, cbi)
        cbi.mul_(-1)  # no version counter: must not be cached
        b = ak.vq_encode(x, cbi)
    assert torch.equal(b, _exact_codes(x, cbi)[0]) and not torch.equal(a, b)


def test_fast_paths_keep_input_checks():
    x = torch.randn(8, 48)
    with pytest.raises(ValueError, match="D/G"):
        ak.vq_encode(x, torch.randn(1, 4, 47), precision="bf16")
    with pytest.raises(ValueError, match="precision"):
        ak.vq_encode(x, torch.randn(1, 4, 48), precision="int8")
    q = torch.randn(1, 2, 4, 16)
    pk = torch.randn(1, 8, 2, 16)
    codes = torch.randint(0, 8, (1, 300, 1), dtype=torch.int32)
    codes[0, 5, 0] = 8
    with pytest.raises(ValueError, match="codes must lie in"):
        ak.mixed_attention(q, q, q, codes, pk, pk)


# ----------------------------------------------------------------------------- mixed_attention

def _inputs(B, H, Hkv, Tq, Tl, Tr, d, K, dtype, seed, missing=0.1):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    q, k, v = r(B, H, Tq, d), r(B, Hkv, Tl, d), r(B, Hkv, Tl, d)
    pk, pv = r(1, K, Hkv, d), r(1, K, Hkv, d)
    codes = torch.randint(0, K, (B, Tr, 1), generator=gen, dtype=torch.int32)
    codes[torch.rand(B, Tr, generator=gen) < missing] = -1
    return q, k, v, codes, pk, pv


@pytest.mark.parametrize("B,H,Hkv,Tq,Tl,Tr,d,K", [
    (1, 4, 4, 200, 150, 3000, 64, 64),   # codebook space: 64 codes << 3000 tokens
    (2, 6, 2, 33, 17, 500, 32, 7),       # GQA, several batches, tiny codebook
    (1, 2, 1, 5, 0, 40, 80, 3),          # no local keys, d = 80
])
def test_codebook_space_equals_gather(B, H, Hkv, Tq, Tl, Tr, d, K):
    q, k, v, codes, pk, pv = _inputs(B, H, Hkv, Tq, Tl, Tr, d, K, torch.float32, seed=Tr)
    out, lse = ak.mixed_attention(q, k, v, codes, pk, pv)
    rk, rv, missing = reference.dequantize_remote(codes, pk, pv)
    # materialized remote K/V take the dense tile loop (no codebook space); missing
    # tokens are dropped from them so both see the same keys. Two fp32 paths of one
    # kernel: tighter than the oracle's slack.
    keep = ~missing[0] if B == 1 else None
    if B == 1:
        out_m, lse_m = ak.mixed_attention(q, k, v, remote_k=rk[:, :, keep].contiguous(),
                                          remote_v=rv[:, :, keep].contiguous())
        torch.testing.assert_close(out, out_m, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(lse, lse_m, rtol=2e-6, atol=2e-5)
    check_mixed_attention((out, lse), q, k, v, codes, pk, pv, what="cpp codebook space")


def test_causal_tile_rule():
    """Query tiles before all remote tokens (nothing), straddling them (per-key masks)
    and after all of them (codebook space), in one call."""
    B, H, Hkv, d, K = 1, 2, 2, 32, 12
    Tq = Tl = 300
    Tr = 500
    q, k, v, codes, pk, pv = _inputs(B, H, Hkv, Tq, Tl, Tr, d, K, torch.float32, seed=3)
    q_pos = torch.cat([torch.arange(128), 1200 + torch.arange(128), 5000 + torch.arange(44)])
    remote_pos = 1000 + torch.arange(Tr)
    kw = dict(causal=True, q_pos=q_pos, kv_pos=q_pos.clone(), remote_pos=remote_pos)
    out, lse = ak.mixed_attention(q, k, v, codes, pk, pv, **kw)
    check_mixed_attention((out, lse), q, k, v, codes, pk, pv, **kw, what="cpp causal tiles")
    # shuffled remote positions inside the same range: same answer (visibility is per key)
    perm = torch.randperm(Tr, generator=torch.Generator().manual_seed(0))
    out_p, _ = ak.mixed_attention(q, k, v, codes[:, perm].contiguous(), pk, pv,
                                  **{**kw, "remote_pos": remote_pos[perm]})
    torch.testing.assert_close(out_p, out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_codebook_space_low_precision(dtype, causal):
    q, k, v, codes, pk, pv = _inputs(1, 4, 2, 150, 130, 1000, 64, 32, dtype, seed=7)
    kw = {}
    if causal:  # every remote token precedes every query
        kw = dict(causal=True, q_pos=1000 + torch.arange(150), kv_pos=1000 + torch.arange(130),
                  remote_pos=torch.arange(1000))
    out, lse = ak.mixed_attention(q, k, v, codes, pk, pv, **kw)
    check_mixed_attention((out, lse), q, k, v, codes, pk, pv, **kw,
                            what=f"cpp codebook space causal={causal}")


def test_all_codes_missing_codebook_space():
    q, k, v, codes, pk, pv = _inputs(1, 2, 2, 10, 6, 400, 16, 4, torch.float32, seed=9)
    codes[:] = -1
    out, lse = ak.mixed_attention(q, k, v, codes, pk, pv)
    out_l, lse_l = ak.mixed_attention(q, k, v)
    torch.testing.assert_close(out, out_l)
    torch.testing.assert_close(lse, lse_l)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_gather_path_reused_across_query_tiles(dtype, causal):
    """G > 1 (no codebook space): remote tiles are gathered once per head and thread and
    reused by its other query tiles; interleaved causal positions need per-key masks."""
    B, H, Hkv, Tq, Tl, Tr, d, G, K = 2, 4, 2, 300, 260, 333, 64, 2, 50
    gen = torch.Generator().manual_seed(11)
    r = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    q, k, v = r(B, H, Tq, d), r(B, Hkv, Tl, d), r(B, Hkv, Tl, d)
    pk, pv = r(G, K, Hkv, d) / math.sqrt(G), r(G, K, Hkv, d) / math.sqrt(G)
    codes = torch.randint(0, K, (B, Tr, G), generator=gen, dtype=torch.int32)
    codes[torch.rand(B, Tr, generator=gen) < 0.1, 1] = -1
    kw = {}
    if causal:
        perm = torch.randperm(Tl + Tr, generator=gen)
        kw = dict(causal=True, q_pos=perm[:Tq].sort().values, kv_pos=perm[:Tl],
                  remote_pos=perm[Tl:])
    out, lse = ak.mixed_attention(q, k, v, codes, pk, pv, **kw)
    check_mixed_attention((out, lse), q, k, v, codes, pk, pv, **kw,
                            what=f"cpp gather reuse causal={causal}")


def _rope(pos, R):
    ang = pos.double()[..., None] / 10000 ** (torch.arange(0, R, 2).double() / R)
    ang = torch.cat([ang, ang], -1)
    return ang.cos().float(), ang.sin().float()


@pytest.mark.parametrize("form", ["codes", "materialized"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("R", [64, 32])
def test_rope_never_codebook_space(form, dtype, R):
    """RoPE with G = 1 and far fewer distinct codes than remote tokens (codebook space
    without rope), several query tiles per head (remote tiles gathered, rotated and kept
    per thread), key tile edges (Tr = 257), a causal prefill chunk with per-batch cos/sin."""
    B, H, Hkv, Tq, Tr, d, K = 2, 9, 3, 150, 257, 64, 16
    q, k, v, codes, pk, pv = _inputs(B, H, Hkv, Tq, Tq, Tr, d, K, dtype, seed=R)
    pos = torch.arange(Tr)
    cos, sin = _rope(pos + 100 * torch.arange(B)[:, None], R)
    kw = dict(causal=True, q_pos=Tr + torch.arange(Tq), kv_pos=Tr + torch.arange(Tq),
              remote_pos=pos, rope_cos=cos, rope_sin=sin)
    if form == "codes":
        kw.update(codes=codes, pk=pk, pv=pv)
    else:
        rk, rv, _ = reference.dequantize_remote(codes, pk, pv)
        kw.update(remote_k=rk.contiguous(), remote_v=rv.contiguous())
    got = ak.mixed_attention(q, k, v, **kw)
    check_mixed_attention(got, q, k, v, **kw, what=f"cpp rope {form} R={R}")
    # one query tile per head (no per-thread cache), non-causal: the same keys
    kw1 = {n: t for n, t in kw.items() if n not in ("causal", "q_pos", "kv_pos", "remote_pos")}
    got1 = ak.mixed_attention(q[:, :, :5], k, v, **kw1)
    check_mixed_attention(got1, q[:, :, :5], k, v, **kw1, what=f"cpp rope {form} one tile")


# Key tiles of csrc/cpu/attention.cpp hold 128 keys; a work item ~128 query rows.
@pytest.mark.parametrize("Tl,Tr", [(127, 1), (128, 128), (129, 257), (0, 129)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_key_tile_edges(Tl, Tr, dtype):
    B, H, Hkv, Tq, d, G, K = 1, 3, 1, 129, 24, 2, 300
    q, k, v, codes, pk, pv = _inputs(B, H, Hkv, Tq, Tl, Tr, d, K, dtype, seed=Tl + Tr)
    codes = torch.cat([codes, torch.randint(0, K, (B, Tr, G - 1), dtype=torch.int32)], -1)
    pk, pv = torch.cat([pk, pk.flip(1)]), torch.cat([pv, pv.flip(1)])  # G = 2: gather path
    perm = torch.randperm(Tl + Tr, generator=torch.Generator().manual_seed(1))
    kv_pos, remote_pos = perm[:Tl], perm[Tl:]
    kw = dict(causal=True, q_pos=torch.arange(Tq) * (Tl + Tr) // Tq, kv_pos=kv_pos,
              remote_pos=remote_pos)
    for form in ("full", "causal"):
        args = {} if form == "full" else kw
        got = ak.mixed_attention(q, k, v, codes, pk, pv, **args)
        check_mixed_attention(got, q, k, v, codes, pk, pv, **args,
                                what=f"cpp key tile edge Tl={Tl} Tr={Tr} {form}")

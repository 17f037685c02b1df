"""The fast paths of the compiled CPU kernels (csrc/cpu), each against an oracle.

- ``vq_encode``: the exact fp32 path re-ranks near-ties (a codebook holding a token
  and a near-duplicate of it), the bf16 fast path agrees with the exact argmin, the
  per-codebook cache is rebuilt when the codebook changes in place or is replaced.
- ``mixed_attention``: the codebook-space remote path (G = 1, fewer distinct codes
  than remote tokens) equals attention over materialized K/V; the causal rule per
  query tile (codebook space / per-key masks / nothing) matches the reference.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import astra_kernels as ak
from astra_kernels import reference

pytestmark = pytest.mark.skipif("cpp" not in ak.available_backends("cpu"),
                                reason="compiled CPU kernels not built")


@pytest.fixture(autouse=True)
def _cpp():
    with ak.use_backend("cpp", "cpu"):
        yield


def _exact_codes(x, cb):
    """fp64 argmin by direct squared differences (independent of the kernels' form)."""
    G, K, dg = cb.shape
    xs = x.double().reshape(x.shape[0], G, dg)
    d = ((xs.unsqueeze(2) - cb.double().unsqueeze(0)) ** 2).sum(-1)  # [M, G, K]
    return d.argmin(-1).to(torch.int32), d


def _clustered(n, d, centers, gen, spread):
    c = torch.randn(centers, d, generator=gen)
    return c[torch.randint(centers, (n,), generator=gen)] + spread * torch.randn(n, d, generator=gen)


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
    exact, _ = _exact_codes(x, cb)
    codes = ak.vq_encode(x, cb)
    assert torch.equal(codes, exact)
    assert torch.equal(codes, reference.vq_encode(x, cb)[0])


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
    exact = torch.stack([((cb[0].double() - x[i].double()) ** 2).sum(-1).argmin()
                         for i in range(M)]).to(torch.int32)
    codes = ak.vq_encode(x, cb)[:, 0]
    assert torch.equal(codes, exact)


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
    assert fast.shape == (M, G) and fast.dtype == torch.int32
    assert (fast == exact).float().mean() >= 0.99
    # quantization error of the chosen codewords, in fp64 on the fp32 values
    _, d = _exact_codes(x, cb)
    mse = lambda c: d.gather(2, c.long().unsqueeze(-1)).sum()  # noqa: E731
    assert mse(fast) <= mse(exact) * (1 + 1e-4)
    # and the error output is the bf16-rounded distance to the chosen codewords
    _, ref_err = reference.vq_encode(x, cb, precision="bf16", return_error=True)
    ref_codes = reference.vq_encode(x, cb, precision="bf16")[0]
    same = (fast == ref_codes).all(1)
    torch.testing.assert_close(err_fast[same], ref_err[same], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bf16_fast_path_low_precision_inputs(dtype):
    gen = torch.Generator().manual_seed(5)
    cb = torch.randn(2, 100, 40, generator=gen)
    x = (cb[:, torch.randint(0, 100, (300,), generator=gen)].permute(1, 0, 2).reshape(300, 80)
         + 0.2 * torch.randn(300, 80, generator=gen)).to(dtype)
    fast = ak.vq_encode(x, cb, precision="bf16")
    exact, _ = _exact_codes(x.float(), cb)
    assert (fast == exact).float().mean() >= 0.99


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


def _oracle(q, k, v, codes, pk, pv, **kw):
    pos = {n: t for n, t in kw.items() if isinstance(t, torch.Tensor)}
    args = [t.double() if t.is_floating_point() else t for t in (q, k, v, codes, pk, pv)]
    out, lse = reference.mixed_attention(*args, causal=kw.get("causal", False), **pos)
    return out, lse


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
    # tokens are dropped from them so both see the same keys
    keep = ~missing[0] if B == 1 else None
    if B == 1:
        out_m, lse_m = ak.mixed_attention(q, k, v, remote_k=rk[:, :, keep].contiguous(),
                                          remote_v=rv[:, :, keep].contiguous())
        torch.testing.assert_close(out, out_m, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(lse, lse_m, rtol=2e-6, atol=2e-5)
    ref_out, ref_lse = _oracle(q, k, v, codes, pk, pv)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=1e-5, atol=1e-5)


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
    ref_out, ref_lse = _oracle(q, k, v, codes, pk, pv, **kw)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=1e-5, atol=1e-5)
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
    exact, exact_lse = _oracle(q, k, v, codes, pk, pv, **kw)
    pos = {n: t for n, t in kw.items() if isinstance(t, torch.Tensor)}
    same_prec, _ = reference.mixed_attention(q, k, v, codes, pk, pv, causal=causal, **pos,
                                             upcast=False)
    ref_err = (same_prec.double() - exact).abs().max().item()
    err = (out.double() - exact).abs().max().item()
    assert err <= 2 * ref_err + 1e-3, f"kernel error {err:.3g} vs PyTorch's own {ref_err:.3g}"
    torch.testing.assert_close(lse.double(), exact_lse.double(), rtol=1e-3, atol=1e-2)


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
    exact, exact_lse = _oracle(q, k, v, codes, pk, pv, **kw)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), exact, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lse.double(), exact_lse.double(), rtol=1e-5, atol=1e-5)
    else:
        pos = {n: t for n, t in kw.items() if isinstance(t, torch.Tensor)}
        same_prec, _ = reference.mixed_attention(q, k, v, codes, pk, pv, causal=causal, **pos,
                                                 upcast=False)
        ref_err = (same_prec.double() - exact).abs().max().item()
        assert (out.double() - exact).abs().max().item() <= 2 * ref_err + 1e-3

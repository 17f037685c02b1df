"""The op contract: every backend on this machine against independent oracles.

Oracles: faiss ``IndexFlatL2`` for ``vq_encode``, ``torch.nn.functional.
scaled_dot_product_attention`` over explicitly built K/V for ``mixed_attention``,
the bit-stream definition for ``pack_codes``. Each test runs once per backend that
can serve the device (``cpp`` and ``reference`` on CPU; ``cuda``/``triton`` on a GPU).
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import astra_kernels as ak
from astra_kernels import reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [(dev, b) for dev in DEVICES for b in ak.available_backends(dev) if b != "triton" or dev == "cuda"]


@pytest.fixture(params=CASES, ids=[f"{d}-{b}" for d, b in CASES])
def backend(request):
    dev, name = request.param
    with ak.use_backend(name, dev):
        yield dev


# ----------------------------------------------------------------------------- vq_encode

def _clustered(n, d, centers, gen, spread=0.05):
    c = torch.randn(centers, d, generator=gen)
    return c[torch.randint(centers, (n,), generator=gen)] + spread * torch.randn(n, d, generator=gen)


def _faiss_codes(x, cb):
    faiss = pytest.importorskip("faiss")
    G, K, dg = cb.shape
    out = np.empty((x.shape[0], G), dtype=np.int64)
    for g in range(G):
        index = faiss.IndexFlatL2(dg)
        index.add(cb[g].numpy())
        _, idx = index.search(np.ascontiguousarray(x[:, g * dg:(g + 1) * dg].numpy()), 1)
        out[:, g] = idx[:, 0]
    return torch.from_numpy(out)


def _dist64(x, cb, codes):
    """Exact squared distance of each row-group to the given codeword, and the scale."""
    G, K, dg = cb.shape
    xs = x.double().reshape(x.shape[0], G, dg)
    c = torch.stack([cb[g].double()[codes[:, g].long()] for g in range(G)], 1)
    return ((xs - c) ** 2).sum(-1), (xs ** 2).sum(-1) + (c ** 2).sum(-1)


@pytest.mark.parametrize("M,K,G,D", [(1, 1, 1, 16), (97, 2, 3, 48), (1025, 1000, 1, 64),
                                     (97, 1000, 4, 64), (1025, 37, 3, 24)])
@pytest.mark.parametrize("data", ["random", "clustered"])
def test_vq_encode_matches_faiss(backend, M, K, G, D, data):
    gen = torch.Generator().manual_seed(M * 7 + K)
    if data == "random":
        x, cb = torch.randn(M, D, generator=gen), torch.randn(G, K, D // G, generator=gen)
    else:
        cb = _clustered(G * K, D // G, max(1, K // 2), gen, 0.3).reshape(G, K, D // G)
        x = _clustered(M, D, max(1, K // 3), gen)
    oracle = _faiss_codes(x, cb)
    codes = ak.vq_encode(x.to(backend), cb.to(backend)).cpu()
    assert codes.dtype == torch.int32 and codes.shape == (M, G)
    assert int(codes.min()) >= 0 and int(codes.max()) < K
    differ = codes.long() != oracle
    if differ.any():  # only exact ties (equal up to fp32 rounding) may differ
        d_ours, scale = _dist64(x, cb, codes)
        d_faiss, _ = _dist64(x, cb, oracle.int())
        gap = (d_ours - d_faiss).abs()[differ]
        assert (gap <= 1e-5 * scale[differ]).all(), f"{int(differ.sum())} non-tie disagreements"
    assert differ.float().mean() < 0.01


def test_vq_encode_ties_go_to_lowest_index(backend):
    cb = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])
    x = torch.tensor([[0.5, 0.5], [2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    codes = ak.vq_encode(x.to(backend), cb.to(backend)).cpu()
    assert codes[:, 0].tolist() == [0, 0, 1, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_vq_encode_error_and_leading_dims(backend, dtype):
    x = torch.randn(3, 5, 48).to(dtype)
    cb = torch.randn(4, 50, 12)
    codes, err = ak.vq_encode(x.to(backend), cb.to(backend), return_error=True)
    assert codes.shape == (3, 5, 4) and err.shape == (3, 5) and err.dtype == torch.float32
    ref_codes, ref_err = reference.vq_encode(x.reshape(15, 48), cb, return_error=True)
    d_ours, _ = _dist64(x.reshape(15, 48).float(), cb, codes.cpu().reshape(15, 4))
    torch.testing.assert_close(d_ours, _dist64(x.reshape(15, 48).float(), cb, ref_codes)[0])
    torch.testing.assert_close(err.cpu().reshape(15).double(), d_ours.sum(1), rtol=1e-4, atol=1e-4)


def test_vq_encode_bf16_is_near_optimal(backend):
    gen = torch.Generator().manual_seed(3)
    x = _clustered(512, 64, 40, gen)
    cb = _clustered(256, 64, 128, gen, 0.2).reshape(1, 256, 64)
    exact = ak.vq_encode(x.to(backend), cb.to(backend)).cpu()
    fast = ak.vq_encode(x.to(backend), cb.to(backend), precision="bf16").cpu()
    d_exact, scale = _dist64(x, cb, exact)
    d_fast, _ = _dist64(x, cb, fast)
    assert (d_fast - d_exact <= 2 ** -7 * scale).all()
    assert (fast == exact).float().mean() >= 0.99
    assert d_fast.sum() <= d_exact.sum() * (1 + 1e-3)


# ----------------------------------------------------------------------------- pack / unpack

def test_pack_codes_bit_layout(backend):
    # code i at bits [i*b, (i+1)*b), least significant bit first:
    # 1 -> bits 0..1 = 1,0; 2 -> bits 2..3 = 0,1; 3 -> bits 4..5 = 1,1  => 0b00111001
    p = ak.pack_codes(torch.tensor([1, 2, 3], dtype=torch.int32, device=backend), 2)
    assert p.dtype == torch.uint8 and p.cpu().tolist() == [0b00111001]
    p = ak.pack_codes(torch.tensor([0x1FF, 0x001], dtype=torch.int32, device=backend), 9)
    assert p.cpu().tolist() == [0xFF, 0x03, 0x00]


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 16), n=st.integers(0, 300), seed=st.integers(0, 2 ** 16))
def test_pack_unpack_round_trip(bits, n, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n,), generator=gen, dtype=torch.int64).to(torch.int32)
    for dev, name in CASES:
        with ak.use_backend(name, dev):
            p = ak.pack_codes(codes.to(dev), bits)
            assert p.shape == (math.ceil(n * bits / 8),)
            assert torch.equal(p.cpu(), reference.pack_codes(codes, bits))
            assert torch.equal(ak.unpack_codes(p, (n,), bits).cpu(), codes)


def test_unpack_shape(backend):
    codes = torch.randint(0, 1024, (2, 33, 3), dtype=torch.int32, device=backend)
    out = ak.unpack_codes(ak.pack_codes(codes, 10), codes.shape, 10)
    assert out.dtype == torch.int32 and torch.equal(out, codes)


# ----------------------------------------------------------------------------- mixed_attention

def _inputs(B, H, Hkv, Tq, Tl, Tr, d, G, K, dtype, device, missing=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen).to(dtype).to(device)  # noqa: E731
    q, k, v = r(B, H, Tq, d), r(B, Hkv, Tl, d), r(B, Hkv, Tl, d)
    pk, pv = (r(G, K, Hkv, d) / math.sqrt(G)), (r(G, K, Hkv, d) / math.sqrt(G))
    codes = torch.randint(0, K, (B, Tr, G), generator=gen, dtype=torch.int32)
    if missing:
        lost = torch.rand(B, Tr, generator=gen) < missing
        codes[lost, torch.randint(0, G, (int(lost.sum()),), generator=gen)] = -1
    return q, k, v, codes.to(device), pk, pv


def _remote_kv(codes, pk, pv):
    """Remote K/V built independently of the kernels: one token at a time."""
    B, Tr, G = codes.shape
    _, K, Hkv, d = pk.shape
    rk = torch.zeros(B, Hkv, Tr, d, dtype=torch.float64)
    rv = torch.zeros_like(rk)
    for b in range(B):
        for j in range(Tr):
            for g in range(G):
                c = int(codes[b, j, g])
                if c >= 0:
                    rk[b, :, j] += pk[g, c].double().cpu()
                    rv[b, :, j] += pv[g, c].double().cpu()
    return rk, rv


def _sdpa_oracle(q, k, v, rk, rv, visible, scale):
    """fp64 SDPA over concatenated K/V with an explicit mask; rows seeing nothing -> 0/-inf."""
    B, H, Tq, d = q.shape
    rep = H // k.shape[1]
    keys = torch.cat([k.double().cpu(), rk], 2).repeat_interleave(rep, 1)
    vals = torch.cat([v.double().cpu(), rv], 2).repeat_interleave(rep, 1)
    mask = visible.unsqueeze(1).expand(B, H, Tq, keys.shape[2])
    out = F.scaled_dot_product_attention(q.double().cpu(), keys, vals, attn_mask=mask, scale=scale)
    scores = (q.double().cpu() @ keys.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    seen = mask.any(-1)
    return torch.where(seen.unsqueeze(-1), out, torch.zeros_like(out)), lse, seen


ATTN_SHAPES = [  # B, H, Hkv, Tq, Tl, Tr, d, G, K
    (1, 2, 2, 5, 7, 11, 32, 1, 16),
    (2, 4, 2, 33, 17, 65, 64, 3, 1000),
    (1, 4, 1, 1, 1, 0, 80, 1, 4),
    (2, 3, 3, 64, 100, 130, 128, 4, 2),
    (1, 8, 2, 17, 40, 9, 64, 1, 1),
]


@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("form", ["codes", "materialized"])
def test_mixed_attention_matches_sdpa(backend, shape, causal, form):
    B, H, Hkv, Tq, Tl, Tr, d, G, K = shape
    q, k, v, codes, pk, pv = _inputs(*shape, torch.float32, backend, missing=0.2 if form == "codes" else 0)
    gen = torch.Generator().manual_seed(1)
    # interleaved global positions: local and remote tokens alternate in the sequence
    perm = torch.randperm(Tl + Tr, generator=gen)
    kv_pos, remote_pos = perm[:Tl], perm[Tl:]
    q_pos = kv_pos[torch.randint(0, Tl, (Tq,), generator=gen)]
    rk, rv = _remote_kv(codes.cpu(), pk, pv)
    kw = dict(causal=causal)
    if causal:
        kw.update(q_pos=q_pos.to(backend), kv_pos=kv_pos.to(backend), remote_pos=remote_pos.to(backend))
    if form == "codes":
        out, lse = ak.mixed_attention(q, k, v, codes, pk, pv, **kw)
    else:
        out, lse = ak.mixed_attention(q, k, v, remote_k=rk.float().to(backend),
                                      remote_v=rv.float().to(backend), **kw)
    visible = torch.ones(B, Tq, Tl + Tr, dtype=torch.bool)
    if causal:
        visible &= torch.cat([kv_pos, remote_pos]).unsqueeze(0) <= q_pos.unsqueeze(1)
    if form == "codes":
        visible[:, :, Tl:] &= ~(codes.cpu() < 0).any(-1).unsqueeze(1)
    ref_out, ref_lse, seen = _sdpa_oracle(q, k, v, rk, rv, visible, 1 / math.sqrt(d))
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (B, H, Tq)
    torch.testing.assert_close(out.cpu().double(), ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, rtol=1e-5, atol=1e-5)
    assert torch.isneginf(lse.cpu()[~seen]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_mixed_attention_low_precision(backend, dtype, causal):
    shape = (2, 4, 2, 37, 29, 53, 64, 2, 100)
    q, k, v, codes, pk, pv = _inputs(*shape, dtype, backend, missing=0.1)
    kw = {}
    if causal:
        kw = dict(causal=True, q_pos=torch.arange(29, 29 + 37, device=backend)[:37] - 8,
                  kv_pos=torch.arange(29, device=backend) + 20, remote_pos=torch.arange(53, device=backend) * 2)
    out, lse = ak.mixed_attention(q, k, v, codes, pk, pv, **kw)
    args = [t.cpu() for t in (q, k, v, codes, pk, pv)]
    pos = {n: t.cpu() for n, t in kw.items() if isinstance(t, torch.Tensor)}
    exact, exact_lse = reference.mixed_attention(*args, causal=causal, **pos, upcast=True)
    same_prec, _ = reference.mixed_attention(*args, causal=causal, **pos, upcast=False)
    ref_err = (same_prec.float() - exact.float()).abs().max().item()
    err = (out.cpu().float() - exact.float()).abs().max().item()
    assert err <= 2 * ref_err + 1e-3, f"kernel error {err:.3g} vs PyTorch's own {ref_err:.3g}"
    finite = torch.isfinite(exact_lse)
    torch.testing.assert_close(lse.cpu()[finite], exact_lse[finite], rtol=1e-3, atol=1e-2)


def test_mixed_attention_all_missing_and_no_keys(backend):
    q, k, v, codes, pk, pv = _inputs(1, 2, 2, 4, 3, 5, 32, 2, 8, torch.float32, backend)
    codes[:] = -1
    out_codes, lse_codes = ak.mixed_attention(q, k, v, codes, pk, pv)
    out_local, lse_local = ak.mixed_attention(q, k, v)
    torch.testing.assert_close(out_codes, out_local)
    torch.testing.assert_close(lse_codes, lse_local)
    # causal, every key after every query: nothing visible
    out, lse = ak.mixed_attention(q, k, v, codes, pk, pv, causal=True,
                                  q_pos=torch.zeros(4, dtype=torch.long, device=backend),
                                  kv_pos=torch.full((3,), 5, device=backend),
                                  remote_pos=torch.full((5,), 9, device=backend))
    assert (out == 0).all() and torch.isneginf(lse).all()


# ----------------------------------------------------------------------------- merge_attention

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_of_halves_equals_whole(backend, dtype):
    q, k, v, _, _, _ = _inputs(2, 4, 2, 19, 50, 0, 64, 1, 1, dtype, backend)
    whole, whole_lse = ak.mixed_attention(q, k, v)
    a = ak.mixed_attention(q, k[:, :, :23], v[:, :, :23])
    b = ak.mixed_attention(q, k[:, :, 23:], v[:, :, 23:])
    out, lse = ak.merge_attention(*a, *b)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.float(), whole.float(), **tol)
    torch.testing.assert_close(lse, whole_lse, rtol=1e-5, atol=1e-5)


def test_merge_with_empty_side(backend):
    out_a = torch.randn(2, 3, 8, device=backend)
    lse_a = torch.randn(2, 3, device=backend)
    empty = torch.zeros_like(out_a), torch.full_like(lse_a, float("-inf"))
    out, lse = ak.merge_attention(out_a, lse_a, *empty)
    torch.testing.assert_close(out, out_a)
    torch.testing.assert_close(lse, lse_a)
    out, lse = ak.merge_attention(*empty, *empty)
    assert (out == 0).all() and torch.isneginf(lse).all()


# ----------------------------------------------------------------------------- opcheck

def _sample_args():
    q, k, v, codes, pk, pv = _inputs(1, 4, 2, 5, 6, 7, 32, 2, 9, torch.float32, "cpu", missing=0.2)
    pos = dict(q_pos=torch.arange(5) + 6, kv_pos=torch.arange(6) + 5, remote_pos=torch.arange(7))
    x = torch.randn(13, 24)
    cb = torch.randn(3, 10, 8)
    return {
        "vq_encode": (x, cb, "fp32", True),
        "pack_codes": (torch.randint(0, 512, (3, 7), dtype=torch.int32), 9),
        "unpack_codes": (torch.randint(0, 255, (24,), dtype=torch.uint8), [3, 7], 9),
        "mixed_attention": (q, k, v, codes, pk, pv, None, None, True, pos["q_pos"],
                            pos["kv_pos"], pos["remote_pos"], 0.2),
        "merge_attention": (torch.randn(2, 3, 8), torch.randn(2, 3), torch.randn(2, 3, 8),
                            torch.randn(2, 3)),
    }


@pytest.mark.parametrize("op", list(ak.ops.SCHEMAS))
def test_opcheck(backend, op):
    args = tuple(a.to(backend) if isinstance(a, torch.Tensor) else a for a in _sample_args()[op])
    torch.library.opcheck(getattr(torch.ops.astra, op).default, args)


# ----------------------------------------------------------------------------- bad input

def _bad_cases():
    q, k, v, codes, pk, pv = _inputs(1, 4, 2, 5, 6, 7, 32, 2, 9, torch.float32, "cpu")
    x, cb = torch.randn(10, 24), torch.randn(3, 10, 8)
    return [
        ("x 2-D wrong width", lambda: ak.vq_encode(torch.randn(10, 25), cb), ValueError, "G=3"),
        ("cb dim", lambda: ak.vq_encode(x, torch.randn(3, 10, 7)), ValueError, "codebooks"),
        ("cb ndim", lambda: ak.vq_encode(x, torch.randn(10, 8)), ValueError, "codebooks"),
        ("x int", lambda: ak.vq_encode(x.long(), cb), TypeError, "x"),
        ("precision", lambda: ak.vq_encode(x, cb, precision="fp8"), ValueError, "precision"),
        ("x not tensor", lambda: ak.vq_encode(x.numpy(), cb), TypeError, "x"),
        ("codes float", lambda: ak.pack_codes(torch.rand(5), 4), TypeError, "codes"),
        ("code too big", lambda: ak.pack_codes(torch.tensor([16]), 4), ValueError, "codes"),
        ("code negative", lambda: ak.pack_codes(torch.tensor([-1]), 4), ValueError, "codes"),
        ("bits range", lambda: ak.pack_codes(torch.tensor([1]), 17), ValueError, "bits"),
        ("bits type", lambda: ak.pack_codes(torch.tensor([1]), 2.0), TypeError, "bits"),
        ("payload length", lambda: ak.unpack_codes(torch.zeros(3, dtype=torch.uint8), (3,), 10),
         ValueError, "payload"),
        ("payload dtype", lambda: ak.unpack_codes(torch.zeros(4), (3,), 10), TypeError, "payload"),
        ("q ndim", lambda: ak.mixed_attention(q[0], k, v), ValueError, "q"),
        ("k dtype", lambda: ak.mixed_attention(q, k.half(), v), TypeError, "k"),
        ("heads", lambda: ak.mixed_attention(q[:, :3], k, v), ValueError, "heads"),
        ("v shape", lambda: ak.mixed_attention(q, k, v[:, :, :5]), ValueError, "v"),
        ("k head dim", lambda: ak.mixed_attention(q, k[..., :16], v[..., :16]), ValueError, "k"),
        ("codes >= K", lambda: ak.mixed_attention(q, k, v, codes.clamp_min(0) + 9, pk, pv),
         ValueError, "codes"),
        ("codes < -1", lambda: ak.mixed_attention(q, k, v, codes - 20, pk, pv), ValueError, "codes"),
        ("codes float", lambda: ak.mixed_attention(q, k, v, codes.float(), pk, pv), TypeError, "codes"),
        ("codes groups", lambda: ak.mixed_attention(q, k, v, codes[..., :1], pk, pv), ValueError, "codes"),
        ("pk missing", lambda: ak.mixed_attention(q, k, v, codes, pk, None), ValueError, "pk"),
        ("pk shape", lambda: ak.mixed_attention(q, k, v, codes, pk[..., :16], pv), ValueError, "pk"),
        ("pk dtype", lambda: ak.mixed_attention(q, k, v, codes, pk.double(), pv), TypeError, "pk"),
        ("both forms", lambda: ak.mixed_attention(q, k, v, codes, pk, pv, remote_k=k, remote_v=v),
         ValueError, "either"),
        ("remote pos", lambda: ak.mixed_attention(q, k, v, codes, pk, pv, causal=True,
                                                  q_pos=torch.arange(5), kv_pos=torch.arange(6)),
         ValueError, "remote_pos"),
        ("q_pos len", lambda: ak.mixed_attention(q, k, v, causal=True, q_pos=torch.arange(4),
                                                 kv_pos=torch.arange(6)), ValueError, "q_pos"),
        ("Tq != Tl", lambda: ak.mixed_attention(q, k, v, causal=True), ValueError, "q_pos"),
        ("merge shape", lambda: ak.merge_attention(torch.randn(2, 3, 8), torch.randn(2, 3),
                                                   torch.randn(2, 4, 8), torch.randn(2, 4)),
         ValueError, "out_b"),
        ("merge lse dtype", lambda: ak.merge_attention(torch.randn(2, 3, 8), torch.randn(2, 3).double(),
                                                       torch.randn(2, 3, 8), torch.randn(2, 3)),
         TypeError, "lse_a"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_raises_clearly(case):
    _, fn, exc, word = case
    with pytest.raises(exc, match=word):
        fn()


def test_mixed_devices_raise():
    other = "cuda" if torch.cuda.is_available() else "meta"
    x, cb = torch.randn(10, 24), torch.randn(3, 10, 8, device=other)
    with pytest.raises(ValueError, match="codebooks is on"):
        ak.vq_encode(x, cb)
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="v is on"):
        ak.mixed_attention(q, q, q.to(other))

"""The op contract: the grid every backend must pass, against independent oracles.

Each test runs once per backend, forced with :func:`astra_kernels.use_backend`:
``reference``, ``cpp`` (the compiled CPU kernels), ``triton`` (on CPU tensors in
Triton's interpreter; compiled on a GPU), and on a GPU ``cuda``, ``triton`` and
``reference``. A backend that is not available here skips with its reason (a
compiled extension that was built but does not load fails instead), and a backend
that has no kernel of its own for an op skips that op rather than falling back.
The interpreter is slow, so its shapes are the small ones of each list.

Oracles (:mod:`tests.oracles`): the float64 nearest codeword (and faiss
``IndexFlatL2``) for ``vq_encode``, the bit-stream definition for ``pack_codes``,
float64 SDPA over K/V built from the tables for ``mixed_attention``, the float64
merge formula for ``merge_attention``, the float64 product of x with the int8 rows
for ``int8_linear``. Backend-specific paths are tested in
``test_cpu_kernels``, ``test_triton`` and ``test_cuda``.
"""
import contextlib
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import astra_kernels as ak
from astra_kernels import _backends, reference
from tests._util import HAS_CUDA, first_triton_configs, require_backend, requires_cuda
from tests.oracles import (
    DTYPES,
    TOL,
    assert_codes_agree,
    assert_codes_exact,
    assert_codes_near_optimal,
    assert_differ_only_at_ties,
    assert_vq_error,
    check_merge_attention,
    check_mixed_attention,
    codeword_distances,
    faiss_codes,
    interpreter_ulps,
    nearest_codes,
    remote_kv64,
)


@dataclass(frozen=True)
class Backend:
    device: str
    name: str

    @property
    def interpreted(self) -> bool:
        """Triton kernels run in the CPU interpreter: small shapes only."""
        return self.device == "cpu" and self.name == "triton"

    @property
    def exact_vq(self) -> bool:
        """fp32 ``vq_encode`` re-ranks near-ties: codes equal the float64 argmin."""
        return self.name in ("reference", "cpp")

    def ulps(self, dtype) -> float:
        """Output slack in ulps beyond :data:`tests.oracles.TOL` (the interpreter's bf16)."""
        return interpreter_ulps(dtype, self.interpreted)

    def __str__(self) -> str:
        return f"{self.device}-{self.name}"


BACKENDS = [Backend("cpu", "reference"), Backend("cpu", "cpp"), Backend("cpu", "triton"),
            Backend("cuda", "cuda"), Backend("cuda", "triton"), Backend("cuda", "reference")]


def _marks(b: Backend):
    return [pytest.mark.gpu, requires_cuda] if b.device == "cuda" else []


def grid(cases=None, small=None, ids=None):
    """``pytest.param`` s of ``backend`` (and ``case``) for ``parametrize``: every
    backend times every case, except that the interpreter gets only ``small`` ones."""
    if cases is None:
        return [pytest.param(b, id=str(b), marks=_marks(b)) for b in BACKENDS]
    ids = ids or (lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else str(c))
    return [pytest.param(b, c, id=f"{b}-{ids(c)}", marks=_marks(b))
            for b in BACKENDS for c in cases if not b.interpreted or small is None or small(c)]


@pytest.fixture
def backend(request, monkeypatch):
    """The backend of this case, forced for its device inside the test (compiled
    Triton: the first autotune config only, one compile per shape). A call that the
    forced compiled backend refuses (``NotImplementedError``, which the library answers
    with another backend) skips the test with that reason instead."""
    b: Backend = request.param
    require_backend(b.device, b.name)
    if hasattr(_backends, "fallback_impl"):
        def refused(op, device_type):
            raise pytest.skip.Exception(
                f"{b} has no kernel for these {op} inputs (it raised NotImplementedError; "
                "another backend would serve them)")
        monkeypatch.setattr(_backends, "fallback_impl", refused)
    with contextlib.ExitStack() as stack:
        if b.name == "triton" and b.device == "cuda":
            stack.enter_context(first_triton_configs())
        stack.enter_context(ak.use_backend(b.name, b.device))
        yield b


def serves(b: Backend, *ops: str) -> None:
    """Skip unless ``b`` runs its own kernel for each of ``ops`` (never a fallback)."""
    info = ak.backend_info()
    for op in ops:
        got = info[op][b.device]
        if got != b.name:
            pytest.skip(f"{b.name} has no {op} kernel ({got} would serve it)")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- vq_encode

def _clustered(n, d, centers, gen, spread=0.05):
    c = torch.randn(centers, d, generator=gen)
    pick = torch.randint(centers, (n,), generator=gen)
    return c[pick] + spread * torch.randn(n, d, generator=gen)


VQ_SHAPES = [(1, 1, 1, 16), (97, 2, 3, 48), (1025, 1000, 1, 64), (97, 1000, 4, 64),
             (1025, 37, 3, 24), (33, 50, 2, 118)]  # M, K, G, D


@pytest.mark.parametrize("backend,shape", grid(VQ_SHAPES, small=lambda s: s[0] * s[1] <= 5000),
                         indirect=["backend"])
@pytest.mark.parametrize("data", ["random", "clustered"])
def test_vq_encode_nearest(backend, shape, data):
    """fp32: the float64 nearest codeword (exactly, for backends that re-rank near-ties),
    and faiss ``IndexFlatL2`` agrees except at near-ties."""
    serves(backend, "vq_encode")
    M, K, G, D = shape
    gen = _gen(M * 7 + K)
    if data == "random":
        x, cb = torch.randn(M, D, generator=gen), torch.randn(G, K, D // G, generator=gen)
    else:
        cb = _clustered(G * K, D // G, max(1, K // 2), gen, 0.3).reshape(G, K, D // G)
        x = _clustered(M, D, max(1, K // 3), gen)
    codes = ak.vq_encode(x.to(backend.device), cb.to(backend.device))
    what = f"{backend} vq_encode {shape} {data}"
    if backend.exact_vq:
        assert_codes_exact(codes, x, cb, what=what)
    else:
        assert_codes_near_optimal(codes, x, cb, what=what)
    faiss = faiss_codes(x, cb).int()
    assert_codes_near_optimal(faiss, x, cb, what="faiss IndexFlatL2")
    assert_differ_only_at_ties(codes, faiss, x, cb, what=f"{what} vs faiss")
    assert_codes_agree(codes, faiss, 0.99, f"{what} vs faiss")


@pytest.mark.parametrize("backend", grid(), indirect=True)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_vq_encode_ties_go_to_lowest_index(backend, precision):
    serves(backend, "vq_encode")
    cb = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])
    x = torch.tensor([[0.5, 0.5], [2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    codes = ak.vq_encode(x.to(backend.device), cb.to(backend.device), precision=precision)
    assert codes.cpu()[:, 0].tolist() == [0, 0, 1, 0]
    # exact duplicates of codeword 7 in its own tile and in later ones (tiles of 32 ..
    # 256 codewords). The interpreter's fp32 dot is numpy's BLAS, whose rounding may
    # depend on a column's place in the tile: there the copies keep 7's offset.
    G, K, dg = 2, 300, 8
    cb = torch.randn(G, K, dg, generator=_gen(3))
    dups = (39, 71, 135, 199, 263, 295) if backend.interpreted else (9, 40, 70, 129, 200, 257, 299)
    for dup in dups:
        cb[:, dup] = cb[:, 7]
    x = cb[:, 7].reshape(1, G * dg).repeat(3, 1)
    codes = ak.vq_encode(x.to(backend.device), cb.to(backend.device), precision=precision)
    assert (codes.cpu() == 7).all(), codes.tolist()


@pytest.mark.parametrize("backend", grid(), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vq_encode_input_dtypes_error_and_leading_dims(backend, dtype):
    serves(backend, "vq_encode")
    x = torch.randn(3, 5, 48, generator=_gen(1)).to(dtype)
    cb = torch.randn(4, 50, 12, generator=_gen(2))
    codes, err = ak.vq_encode(x.to(backend.device), cb.to(backend.device), return_error=True)
    assert codes.shape == (3, 5, 4) and err.shape == (3, 5)
    what = f"{backend} {dtype} input"
    flat = x.reshape(15, 48)
    codes = codes.reshape(15, 4)
    if backend.exact_vq:
        assert_codes_exact(codes, flat, cb, what=what)
    else:
        assert_codes_near_optimal(codes, flat, cb, what=what)
    assert_vq_error(err.reshape(15), codes, flat, cb, what=what, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", grid(), indirect=True)
def test_vq_encode_empty(backend):
    serves(backend, "vq_encode")
    codes, err = ak.vq_encode(torch.randn(0, 8, device=backend.device),
                              torch.randn(2, 5, 4, device=backend.device), return_error=True)
    assert codes.shape == (0, 2) and codes.dtype == torch.int32 and err.shape == (0,)


@pytest.mark.parametrize("backend,shape", grid([(512, 256, 1, 64), (64, 70, 3, 24)],
                                               small=lambda s: s[0] < 100),
                         indirect=["backend"])
def test_vq_encode_bf16_is_near_optimal(backend, shape):
    """bf16: nearest for the bf16-rounded operands up to fp32 accumulation, hence
    near-optimal for the unrounded ones."""
    serves(backend, "vq_encode")
    M, K, G, D = shape
    gen = _gen(3)
    x = _clustered(M, D, 40, gen)
    cb = _clustered(G * K, D // G, K // 2, gen, 0.2).reshape(G, K, D // G)
    dev = backend.device
    exact = ak.vq_encode(x.to(dev), cb.to(dev))
    fast, err = ak.vq_encode(x.to(dev), cb.to(dev), precision="bf16", return_error=True)
    what = f"{backend} bf16 {shape}"
    assert_codes_near_optimal(fast, x, cb, precision="bf16", what=what)
    assert_vq_error(err, fast, x, cb, precision="bf16", what=what, rtol=1e-4, atol=1e-4)
    # on the unrounded operands: per group within bf16 rounding, in total within 1e-3
    dist = codeword_distances(x, cb)
    pick = lambda c: dist.gather(-1, c.cpu().long().unsqueeze(-1)).squeeze(-1)  # noqa: E731
    xs, c = x.double().reshape(M, G, -1), cb.double()
    scale = (xs ** 2).sum(-1) + (c ** 2).sum(-1).gather(1, fast.cpu().long().t()).t()
    gap = pick(fast) - pick(exact)
    assert (gap <= 2 ** -7 * scale).all(), f"{what}: gap {gap.max():.3g} beyond bf16 rounding"
    assert pick(fast).sum() <= pick(exact).sum() * (1 + 1e-3)
    assert_codes_agree(fast, exact, 0.99, what)


# ----------------------------------------------------------------------------- pack / unpack

@pytest.mark.parametrize("backend", grid(), indirect=True)
def test_pack_codes_bit_layout(backend):
    serves(backend, "pack_codes")
    # code i at bits [i*b, (i+1)*b), least significant bit first:
    # 1 -> bits 0..1 = 1,0; 2 -> bits 2..3 = 0,1; 3 -> bits 4..5 = 1,1  => 0b00111001
    p = ak.pack_codes(torch.tensor([1, 2, 3], dtype=torch.int32, device=backend.device), 2)
    assert p.dtype == torch.uint8 and p.cpu().tolist() == [0b00111001]
    p = ak.pack_codes(torch.tensor([0x1FF, 0x001], dtype=torch.int32, device=backend.device), 9)
    assert p.cpu().tolist() == [0xFF, 0x03, 0x00]


@pytest.mark.parametrize("backend", grid(), indirect=True)
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bits=st.integers(1, 16), n=st.integers(0, 300), seed=st.integers(0, 2 ** 16))
def test_pack_unpack_round_trip(backend, bits, n, seed):
    serves(backend, "pack_codes", "unpack_codes")
    codes = torch.randint(0, 1 << bits, (n,), generator=_gen(seed), dtype=torch.int64).int()
    p = ak.pack_codes(codes.to(backend.device), bits)
    assert p.shape == (math.ceil(n * bits / 8),)
    assert torch.equal(p.cpu(), reference.pack_codes(codes, bits))
    assert torch.equal(ak.unpack_codes(p, (n,), bits).cpu(), codes)


@pytest.mark.parametrize("backend", grid(), indirect=True)
@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_unpack_shapes_and_arbitrary_payload(backend, bits):
    serves(backend, "pack_codes", "unpack_codes")
    dev = backend.device
    for shape in [(0,), (1,), (7,), (8,), (9,), (3, 333), (2, 1025, 3)]:
        codes = torch.randint(0, 1 << bits, shape, dtype=torch.int32, device=dev)
        payload = ak.pack_codes(codes, bits)
        n = codes.numel()
        assert payload.dtype == torch.uint8 and payload.shape == ((n * bits + 7) // 8,)
        assert torch.equal(payload.cpu(), reference.pack_codes(codes.cpu(), bits)), shape
        out = ak.unpack_codes(payload, shape, bits)
        assert out.dtype == torch.int32 and torch.equal(out, codes), shape
    # any payload of the right length decodes as the bit-stream definition says
    for n in [1, 5, 8, 1001]:
        payload = torch.randint(0, 256, ((n * bits + 7) // 8,), dtype=torch.uint8,
                                generator=_gen(n))
        got = ak.unpack_codes(payload.to(dev), (n,), bits)
        assert torch.equal(got.cpu(), reference.unpack_codes(payload, (n,), bits)), n


# ----------------------------------------------------------------------------- mixed_attention

def _inputs(B, H, Hkv, Tq, Tl, Tr, d, G, K, dtype, device, missing=0.0, seed=0):
    gen = _gen(seed)
    r = lambda *s: torch.randn(*s, generator=gen).to(dtype).to(device)  # noqa: E731
    q, k, v = r(B, H, Tq, d), r(B, Hkv, Tl, d), r(B, Hkv, Tl, d)
    pk, pv = (r(G, K, Hkv, d) / math.sqrt(G)), (r(G, K, Hkv, d) / math.sqrt(G))
    codes = torch.randint(0, K, (B, Tr, G), generator=gen, dtype=torch.int32)
    if missing and Tr:
        lost = torch.rand(B, Tr, generator=gen) < missing
        codes[lost, torch.randint(0, G, (int(lost.sum()),), generator=gen)] = -1
    return q, k, v, codes.to(device), pk, pv


def _interleaved(Tq, Tl, Tr, device, seed=1):
    """Global positions: local and remote tokens interleave; queries are local tokens."""
    gen = _gen(seed)
    perm = torch.randperm(Tl + Tr, generator=gen)
    kv_pos, remote_pos = perm[:Tl], perm[Tl:]
    q_pos = kv_pos[torch.randint(0, Tl, (Tq,), generator=gen)] if Tl else torch.arange(Tq)
    return dict(q_pos=q_pos.to(device), kv_pos=kv_pos.to(device),
                remote_pos=remote_pos.to(device))


ATTN_SHAPES = [  # B, H, Hkv, Tq, Tl, Tr, d, G, K
    (1, 2, 2, 5, 7, 11, 32, 1, 16),
    (2, 4, 2, 33, 17, 65, 64, 3, 1000),   # GQA, G = 3
    (1, 4, 1, 1, 1, 0, 80, 1, 4),         # one query, one key, no remote
    (2, 3, 3, 64, 100, 130, 128, 4, 2),
    (1, 8, 2, 17, 40, 9, 64, 1, 1),
    (1, 4, 2, 97, 97, 97, 59, 2, 33),     # seqlen 97, head dim 59
    (1, 2, 1, 19, 23, 29, 111, 1, 7),     # head dim 111
    (1, 2, 2, 6, 0, 14, 32, 3, 5),        # no local keys, G = 3
]


def _small(shape):
    B, H, Hkv, Tq, Tl, Tr, d, G, K = shape
    return B * H * Tq * (Tl + Tr) <= 12000


@pytest.mark.parametrize("backend,shape", grid(ATTN_SHAPES, small=_small), indirect=["backend"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("form", ["codes", "materialized"])
def test_mixed_attention_fp32(backend, shape, causal, form):
    """fp32, remote keys as codes (20% of tokens lost: -1) or materialized K/V; causal
    by interleaved global positions."""
    serves(backend, "mixed_attention")
    B, H, Hkv, Tq, Tl, Tr, d, G, K = shape
    dev = backend.device
    q, k, v, codes, pk, pv = _inputs(*shape, torch.float32, dev,
                                     missing=0.2 if form == "codes" else 0)
    kw = dict(causal=causal, **(_interleaved(Tq, Tl, Tr, dev) if causal else {}))
    if form == "codes":
        kw.update(codes=codes, pk=pk, pv=pv)
    else:
        rk, rv, _ = remote_kv64(codes, pk, pv)
        kw.update(remote_k=rk.float(), remote_v=rv.float())
    got = ak.mixed_attention(q, k, v, **kw)
    check_mixed_attention(got, q, k, v, **kw, what=f"{backend} {form} causal={causal}")


LOW_SHAPES = [(2, 4, 2, 37, 29, 53, 64, 2, 100), (1, 3, 1, 97, 40, 61, 59, 1, 20),
              (1, 4, 2, 21, 13, 17, 40, 2, 9)]


@pytest.mark.parametrize("backend,shape", grid(LOW_SHAPES, small=_small), indirect=["backend"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_mixed_attention_low_precision(backend, shape, dtype, causal):
    serves(backend, "mixed_attention")
    B, H, Hkv, Tq, Tl, Tr, d, G, K = shape
    dev = backend.device
    q, k, v, codes, pk, pv = _inputs(*shape, dtype, dev, missing=0.1)
    kw = {}
    if causal:  # remote tokens spread over the whole range, queries after some
        kw = dict(causal=True, q_pos=torch.arange(Tq, device=dev) + 21,
                  kv_pos=torch.arange(Tl, device=dev) + 20,
                  remote_pos=torch.arange(Tr, device=dev) * 2)
    got = ak.mixed_attention(q, k, v, codes, pk, pv, **kw)
    check_mixed_attention(got, q, k, v, codes, pk, pv, **kw, what=f"{backend} causal={causal}",
                            out_ulps=backend.ulps(dtype))


@pytest.mark.parametrize("backend", grid(), indirect=True)
def test_mixed_attention_all_missing_and_no_keys(backend):
    serves(backend, "mixed_attention")
    dev = backend.device
    q, k, v, codes, pk, pv = _inputs(1, 2, 2, 4, 3, 5, 32, 2, 8, torch.float32, dev)
    codes[:] = -1
    out_codes, lse_codes = ak.mixed_attention(q, k, v, codes, pk, pv)
    out_local, lse_local = ak.mixed_attention(q, k, v)
    torch.testing.assert_close(out_codes, out_local, **TOL[torch.float32].close)
    torch.testing.assert_close(lse_codes, lse_local, **TOL[torch.float32].close)
    # causal, every key after every query: nothing visible
    out, lse = ak.mixed_attention(q, k, v, codes, pk, pv, causal=True,
                                  q_pos=torch.zeros(4, dtype=torch.long, device=dev),
                                  kv_pos=torch.full((3,), 5, device=dev),
                                  remote_pos=torch.full((5,), 9, device=dev))
    assert (out == 0).all() and torch.isneginf(lse).all()
    # no keys at all
    e = k[:, :, :0]
    out, lse = ak.mixed_attention(q, e, e, codes[:, :0], pk, pv)
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("backend", grid(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_out_of_range_codes_are_missing_without_checks(backend, dtype):
    """With the range check off, codes outside [-1, K) are masked, never read."""
    serves(backend, "mixed_attention")
    q, k, v, codes, pk, pv = _inputs(2, 4, 2, 9, 6, 40, 32, 2, 10, dtype, backend.device)
    codes[0, 3, 1] = 10
    codes[1, 5, 0] = 1 << 30
    codes[0, 7, 0] = -7
    ak.set_code_checks(False)
    try:
        got = ak.mixed_attention(q, k, v, codes, pk, pv)
    finally:
        ak.set_code_checks(True)
    check_mixed_attention(got, q, k, v, codes, pk, pv, what=f"{backend} out-of-range codes",
                            out_ulps=backend.ulps(dtype))


# ----------------------------------------------------------------------------- RoPE

def rope_cos_sin(pos, R, base=10000.0):
    """HF-layout rotary ``(cos, sin)`` float32 ``[..., R]`` at integer positions ``pos``
    (``cat(freqs, freqs)``, as HF's rotary modules return them)."""
    inv = 1.0 / base ** (torch.arange(0, R, 2, dtype=torch.float64) / R)
    freqs = pos.double()[..., None] * inv
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos().float(), emb.sin().float()


ROPE_SHAPES = [  # B, H, Hkv, Tq (= Tl), Tr, d, R
    (1, 9, 3, 6, 13, 64, 64),
    (1, 9, 3, 6, 13, 64, 32),      # partial rotary
    (2, 4, 2, 5, 11, 64, 64),
    (2, 4, 2, 5, 11, 64, 32),
    (1, 9, 3, 33, 70, 128, 128),
    (2, 4, 2, 20, 45, 128, 64),
]
ROPE_FORMS = ["codes-G1", "codes-G2", "materialized"]


def _rope_case(shape, form, dtype, causal, device, seed=0):
    """A chunk of a causal prefill: remote tokens (earlier chunks, positions 0..Tr-1)
    as codes (G = 1 with K < Tr, which would take codebook space without rope; or G = 2;
    20% lost) or materialized K/V; local tokens and queries follow them. cos/sin are
    ``[B, Tr, R]`` (per-batch offsets) for B > 1, ``[1, Tr, R]`` for B = 1."""
    B, H, Hkv, Tq, Tr, d, R = shape
    G, K = (1, 5) if form == "codes-G1" else (2, 9)
    q, k, v, codes, pk, pv = _inputs(B, H, Hkv, Tq, Tq, Tr, d, G, K, dtype, device,
                                     missing=0.2, seed=seed)
    pos = torch.arange(Tr)
    cos, sin = rope_cos_sin(pos + 7 * torch.arange(B)[:, None] if B > 1 else pos[None], R)
    kw = dict(rope_cos=cos.to(device), rope_sin=sin.to(device))
    if causal:
        kw.update(causal=True, q_pos=(Tr + torch.arange(Tq)).to(device),
                  kv_pos=(Tr + torch.arange(Tq)).to(device), remote_pos=pos.to(device))
    if form == "materialized":
        rk, rv, _ = remote_kv64(codes, pk, pv)
        kw.update(remote_k=rk.to(dtype), remote_v=rv.to(dtype))
    else:
        kw.update(codes=codes, pk=pk, pv=pv)
    return q, k, v, kw


def _rope_small(case):
    (B, H, Hkv, Tq, Tr, d, R), form = case
    return d == 64


@pytest.mark.parametrize("backend,case",
                         grid([(s, f) for s in ROPE_SHAPES for f in ROPE_FORMS],
                              small=_rope_small,
                              ids=lambda c: f"{'x'.join(map(str, c[0]))}-{c[1]}"),
                         indirect=["backend"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_mixed_attention_rope(backend, case, dtype, causal):
    """RoPE on remote keys (GQA 9/3 and 4/2, full and partial rotary, codes G = 1 / 2
    with lost tokens, materialized K/V) against HF's ``apply_rotary_pos_emb`` on the
    float64 remote keys, then float64 SDPA."""
    serves(backend, "mixed_attention")
    if backend.interpreted and not causal and dtype == torch.bfloat16:
        pytest.skip("interpreter: bf16 runs the causal cases only (time)")
    shape, form = case
    q, k, v, kw = _rope_case(shape, form, dtype, causal, backend.device)
    got = ak.mixed_attention(q, k, v, **kw)
    check_mixed_attention(got, q, k, v, **kw, what=f"{backend} rope {shape} {form}",
                          out_ulps=backend.ulps(dtype))
    # the rotation matters: without it the answer is far off
    plain = {n: t for n, t in kw.items() if not n.startswith("rope_")}
    off = (ak.mixed_attention(q, k, v, **plain)[0].float() - got[0].float()).abs().max()
    assert off > 0.05, f"{backend}: rope changed the output by only {off:.3g}"


@pytest.mark.parametrize("backend", grid(), indirect=True)
def test_mixed_attention_rope_hf_llama_prefill(backend):
    """A causal prefill split in chunks, as the runner does: HF's own Llama rotary module
    (llama3 scaling) gives cos/sin; queries and local keys arrive rotated, remote keys
    raw (as the projected tables hold them) with cos/sin at their global positions.
    Equals causal SDPA over the HF-rotated keys of the whole sequence."""
    serves(backend, "mixed_attention")
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama as hf_llama
    cfg = transformers.LlamaConfig(
        hidden_size=9 * 64, num_attention_heads=9, num_key_value_heads=3,
        max_position_embeddings=256,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=64))
    rotary = hf_llama.LlamaRotaryEmbedding(cfg)
    B, H, Hkv, d, T, c0 = 1, 9, 3, 64, 29, 21  # this rank holds tokens c0..T-1
    gen = _gen(5)
    q_raw = torch.randn(B, H, T, d, generator=gen)
    k_raw, v = torch.randn(B, Hkv, T, d, generator=gen), torch.randn(B, Hkv, T, d, generator=gen)
    pos = torch.arange(T)
    cos, sin = rotary(q_raw, pos[None])
    q_rot, k_rot = hf_llama.apply_rotary_pos_emb(q_raw, k_raw, cos, sin)
    want = torch.nn.functional.scaled_dot_product_attention(
        q_rot.double(), k_rot.double().repeat_interleave(3, 1),
        v.double().repeat_interleave(3, 1), is_causal=True)[:, :, c0:]
    dev = backend.device
    to = lambda t: t.contiguous().to(dev)  # noqa: E731
    out, _ = ak.mixed_attention(
        to(q_rot[:, :, c0:]), to(k_rot[:, :, c0:]), to(v[:, :, c0:]),
        remote_k=to(k_raw[:, :, :c0]), remote_v=to(v[:, :, :c0]), causal=True,
        q_pos=to(pos[c0:]), kv_pos=to(pos[c0:]), remote_pos=to(pos[:c0]),
        rope_cos=to(cos[:, :c0]), rope_sin=to(sin[:, :c0]))
    torch.testing.assert_close(out.cpu().double(), want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", grid(), indirect=True)
def test_mixed_attention_rope_edge_cases(backend):
    """R = 2 (smallest), shared cos/sin ``[1, Tr, R]`` with B = 2, rope with no remote
    tokens (ignored), every remote key after every query (nothing to rotate is seen)."""
    serves(backend, "mixed_attention")
    dev = backend.device
    q, k, v, codes, pk, pv = _inputs(2, 4, 2, 5, 4, 9, 64, 2, 7, torch.float32, dev,
                                     missing=0.2, seed=3)
    cos, sin = rope_cos_sin(torch.arange(9)[None] * 5, 2)
    kw = dict(codes=codes, pk=pk, pv=pv, rope_cos=cos.to(dev), rope_sin=sin.to(dev))
    check_mixed_attention(ak.mixed_attention(q, k, v, **kw), q, k, v, **kw,
                          what=f"{backend} rope R=2 shared cos/sin")
    e = torch.zeros(2, 0, 64, device=dev)
    got = ak.mixed_attention(q, k, v, codes[:, :0], pk, pv, rope_cos=e, rope_sin=e)
    torch.testing.assert_close(got, ak.mixed_attention(q, k, v), **TOL[torch.float32].close)
    out, lse = ak.mixed_attention(q, k[:, :, :0], v[:, :, :0], **kw, causal=True,
                                  q_pos=torch.zeros(5, dtype=torch.long, device=dev),
                                  kv_pos=torch.zeros(0, dtype=torch.long, device=dev),
                                  remote_pos=torch.arange(9, device=dev) + 1)
    assert (out == 0).all() and torch.isneginf(lse).all()


DECODE_SHAPES = [  # B, H, Hkv, Tq, Tl, Tr, d, G, K
    (1, 9, 3, 1, 300, 700, 64, 1, 1024),  # GQA 9/3, one token; codebook space without rope
    (2, 8, 2, 2, 129, 257, 80, 1, 50),    # 8 rows per kv head, key tile edges, d = 80
    (1, 16, 2, 2, 60, 130, 128, 1, 40),   # 16 rows per kv head (the most that take rows)
    (1, 4, 4, 1, 5, 40, 59, 2, 9),        # MHA, G = 2, head dim 59 (not whole vectors)
]


@pytest.mark.parametrize("backend,shape",
                         grid(DECODE_SHAPES, small=lambda s: s[1] * s[3] * (s[4] + s[5]) <= 200),
                         indirect=["backend"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", ["codes", "codes-rope", "materialized-rope"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_mixed_attention_decode(backend, shape, dtype, form, causal):
    """Decode-sized queries (one or two tokens x the heads sharing a kv head; the CPU
    kernel's row loop): GQA, codes with lost (-1) and out-of-range tokens, rope on the
    remote keys, causal with interleaved positions."""
    serves(backend, "mixed_attention")
    B, H, Hkv, Tq, Tl, Tr, d, G, K = shape
    dev = backend.device
    q, k, v, codes, pk, pv = _inputs(*shape, dtype, dev, missing=0.1, seed=Tr)
    codes[0, 3, 0] = K + 5  # with the range check off: a missing token
    kw = dict(causal=causal, **(_interleaved(Tq, Tl, Tr, dev) if causal else {}))
    if form.endswith("rope"):
        pos = kw["remote_pos"].cpu() if causal else torch.arange(Tr) * 3
        cos, sin = rope_cos_sin(pos + 11 * torch.arange(B)[:, None], d - d % 2)
        kw.update(rope_cos=cos.to(dev), rope_sin=sin.to(dev))
    if form.startswith("materialized"):
        rk, rv, _ = remote_kv64(codes, pk, pv)
        kw.update(remote_k=rk.to(dtype), remote_v=rv.to(dtype))
    else:
        kw.update(codes=codes, pk=pk, pv=pv)
    ak.set_code_checks(False)
    try:
        got = ak.mixed_attention(q, k, v, **kw)
    finally:
        ak.set_code_checks(True)
    check_mixed_attention(got, q, k, v, **kw, what=f"{backend} decode {shape} {form}",
                          out_ulps=backend.ulps(dtype))


# ----------------------------------------------------------------------------- merge_attention

@pytest.mark.parametrize("backend", grid(), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_of_partials_equals_whole(backend, dtype):
    """Local-only and remote-only partial attentions (causal, lost tokens) merge into
    attention over all keys."""
    serves(backend, "mixed_attention", "merge_attention")
    dev = backend.device
    B, H, Hkv, Tq, Tl, Tr, d, G, K = 2, 4, 2, 19, 23, 27, 40, 2, 30
    q, k, v, codes, pk, pv = _inputs(B, H, Hkv, Tq, Tl, Tr, d, G, K, dtype, dev, missing=0.1)
    pos = _interleaved(Tq, Tl, Tr, dev)
    local = ak.mixed_attention(q, k, v, causal=True, q_pos=pos["q_pos"], kv_pos=pos["kv_pos"])
    e = k[:, :, :0]
    remote = ak.mixed_attention(q, e, e, codes, pk, pv, causal=True, q_pos=pos["q_pos"],
                                kv_pos=pos["kv_pos"][:0], remote_pos=pos["remote_pos"])
    got = ak.merge_attention(*local, *remote)
    check_merge_attention(got, *local, *remote, what=f"{backend} merge",
                            out_ulps=backend.ulps(dtype))
    check_mixed_attention(got, q, k, v, codes, pk, pv, causal=True, **pos,
                            what=f"{backend} merged partials vs whole",
                            out_ulps=backend.ulps(dtype))


@pytest.mark.parametrize("backend", grid(), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 17, 40), (5, 80), (3, 0), (1, 1)], ids=str)
def test_merge_attention(backend, dtype, shape):
    """Random partials with rows empty on one side or on both (0, -inf)."""
    serves(backend, "merge_attention")
    gen = _gen(len(shape))
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    out_a, out_b = r(*shape).to(dtype), r(*shape).to(dtype)
    lse_a, lse_b = r(*shape[:-1]) * 3, r(*shape[:-1]) * 3
    rows = math.prod(shape[:-1])
    fa, fb = lse_a.view(-1), lse_b.view(-1)
    oa, ob = out_a.view(rows, shape[-1]), out_b.view(rows, shape[-1])
    if rows >= 3:
        fa[0] = float("-inf")                  # only b
        fb[1] = float("-inf")                  # only a
        fa[2] = fb[2] = float("-inf")          # neither: zeros, -inf
        oa[0] = 0
        ob[1:3] = 0
    args = [t.to(backend.device) for t in (out_a, lse_a, out_b, lse_b)]
    check_merge_attention(ak.merge_attention(*args), *args, what=f"{backend} merge {shape}",
                            out_ulps=backend.ulps(dtype))


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
        "int8_linear": (torch.randn(3, 20), torch.randint(-127, 128, (7, 20), dtype=torch.int8),
                        torch.rand(7) + 0.1, torch.randn(7)),
    }


@pytest.mark.parametrize("backend", [p for p in grid() if not p.values[0].interpreted],
                         indirect=True)
@pytest.mark.parametrize("op", list(ak.ops.SCHEMAS))
def test_opcheck(backend, op):
    serves(backend, op)
    args = tuple(a.to(backend.device) if isinstance(a, torch.Tensor) else a
                 for a in _sample_args()[op])
    torch.library.opcheck(getattr(torch.ops.astra, op).default, args)


@pytest.mark.parametrize("backend", [p for p in grid() if not p.values[0].interpreted],
                         indirect=True)
@pytest.mark.parametrize("form", ["codes", "materialized"])
def test_opcheck_mixed_attention_rope(backend, form):
    serves(backend, "mixed_attention")
    q, k, v, codes, pk, pv = _inputs(1, 4, 2, 5, 6, 7, 32, 2, 9, torch.float32, "cpu",
                                     missing=0.2)
    cos, sin = rope_cos_sin(torch.arange(7)[None], 16)
    rk, rv, _ = remote_kv64(codes, pk, pv)
    remote = (codes, pk, pv, None, None) if form == "codes" else \
        (None, None, None, rk.float().contiguous(), rv.float().contiguous())
    args = (q, k, v, *remote, True, torch.arange(5) + 7, torch.arange(6) + 6, torch.arange(7),
            0.2, cos, sin)
    args = tuple(a.to(backend.device) if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.astra.mixed_attention.default, args)


# ----------------------------------------------------------------------------- bad input

def _bad_cases():
    q, k, v, codes, pk, pv = _inputs(1, 4, 2, 5, 6, 7, 32, 2, 9, torch.float32, "cpu")
    x, cb = torch.randn(10, 24), torch.randn(3, 10, 8)
    cos, sin = torch.ones(1, 7, 32), torch.zeros(1, 7, 32)
    attn = ak.mixed_attention
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
        ("q ndim", lambda: attn(q[0], k, v), ValueError, "q"),
        ("k dtype", lambda: attn(q, k.half(), v), TypeError, "k"),
        ("heads", lambda: attn(q[:, :3], k, v), ValueError, "heads"),
        ("v shape", lambda: attn(q, k, v[:, :, :5]), ValueError, "v"),
        ("k head dim", lambda: attn(q, k[..., :16], v[..., :16]), ValueError, "k"),
        ("codes >= K", lambda: attn(q, k, v, codes.clamp_min(0) + 9, pk, pv),
         ValueError, "codes"),
        ("codes < -1", lambda: attn(q, k, v, codes - 20, pk, pv), ValueError, "codes"),
        ("codes float", lambda: attn(q, k, v, codes.float(), pk, pv), TypeError, "codes"),
        ("codes groups", lambda: attn(q, k, v, codes[..., :1], pk, pv), ValueError, "codes"),
        ("pk missing", lambda: attn(q, k, v, codes, pk, None), ValueError, "pk"),
        ("pk shape", lambda: attn(q, k, v, codes, pk[..., :16], pv), ValueError, "pk"),
        ("pk dtype", lambda: attn(q, k, v, codes, pk.double(), pv), TypeError, "pk"),
        ("both forms", lambda: attn(q, k, v, codes, pk, pv, remote_k=k, remote_v=v),
         ValueError, "either"),
        ("remote pos", lambda: attn(q, k, v, codes, pk, pv, causal=True,
                                                  q_pos=torch.arange(5), kv_pos=torch.arange(6)),
         ValueError, "remote_pos"),
        ("q_pos len", lambda: attn(q, k, v, causal=True, q_pos=torch.arange(4),
                                                 kv_pos=torch.arange(6)), ValueError, "q_pos"),
        ("Tq != Tl", lambda: attn(q, k, v, causal=True), ValueError, "q_pos"),
        ("rope sin missing", lambda: attn(q, k, v, codes, pk, pv, rope_cos=cos),
         ValueError, "rope_cos was given without rope_sin"),
        ("rope R odd", lambda: attn(q, k, v, codes, pk, pv, rope_cos=cos[..., :3],
                                    rope_sin=sin[..., :3]), ValueError, "rope_cos has R=3"),
        ("rope R > d", lambda: attn(q, k, v, codes, pk, pv, rope_cos=torch.ones(1, 7, 34),
                                    rope_sin=torch.ones(1, 7, 34)), ValueError, "R=34"),
        ("rope Tr", lambda: attn(q, k, v, codes, pk, pv, rope_cos=cos[:, :6],
                                 rope_sin=sin[:, :6]), ValueError, "rope_cos has shape"),
        ("rope batch", lambda: attn(q, k, v, codes, pk, pv, rope_cos=cos.expand(3, 7, 32),
                                    rope_sin=sin.expand(3, 7, 32)), ValueError, "rope_cos"),
        ("rope sin shape", lambda: attn(q, k, v, codes, pk, pv, rope_cos=cos,
                                        rope_sin=sin[..., :16]), ValueError, "rope_sin"),
        ("rope dtype", lambda: attn(q, k, v, codes, pk, pv, rope_cos=cos.long(), rope_sin=sin),
         TypeError, "rope_cos"),
        ("rope ndim", lambda: attn(q, k, v, codes, pk, pv, rope_cos=cos[0], rope_sin=sin[0]),
         ValueError, "rope_cos"),
        ("merge shape", lambda: ak.merge_attention(torch.randn(2, 3, 8), torch.randn(2, 3),
                                                   torch.randn(2, 4, 8), torch.randn(2, 4)),
         ValueError, "out_b"),
        ("head dim 0", lambda: attn(q[..., :0], k[..., :0], v[..., :0]), ValueError,
         "head dim d=0"),
        ("scale nan", lambda: attn(q, k, v, scale=float("nan")), ValueError,
         "scale must be finite"),
        ("scale inf", lambda: attn(q, k, v, scale=float("-inf")), ValueError,
         "scale must be finite"),
        ("scale type", lambda: attn(q, k, v, scale="0.5"), TypeError, "scale must be a float"),
        ("unpack float shape", lambda: ak.unpack_codes(torch.zeros(38, dtype=torch.uint8),
                                                       (100.7, 3), 1),
         TypeError, "shape must hold ints, got 100.7"),
        ("unpack float tensor shape", lambda: ak.unpack_codes(
            torch.zeros(1, dtype=torch.uint8), (torch.tensor(2.0), 3), 1),
         TypeError, "shape must hold ints"),
        ("unpack bool shape", lambda: ak.unpack_codes(torch.zeros(1, dtype=torch.uint8),
                                                      (True, 3), 1),
         TypeError, "shape must hold ints"),
        ("unpack shape not a sequence", lambda: ak.unpack_codes(
            torch.zeros(1, dtype=torch.uint8), 3, 1), TypeError, "shape must be a sequence"),
        ("merge 0-D", lambda: ak.merge_attention(torch.tensor(1.0), torch.tensor(0.0),
                                                 torch.tensor(2.0), torch.tensor(0.0)),
         ValueError, "out_a is 0-D; expected out_a \\[..., d\\]"),
        ("merge lse dtype", lambda: ak.merge_attention(torch.randn(2, 3, 8),
                                                       torch.randn(2, 3).double(),
                                                       torch.randn(2, 3, 8), torch.randn(2, 3)),
         TypeError, "lse_a"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_raises_clearly(case):
    _, fn, exc, word = case
    with pytest.raises(exc, match=word):
        fn()


def test_shapes_of_ints_are_accepted():
    """unpack_codes takes any sequence of integers (ints, numpy ints, 0-D integer
    tensors, a 1-D integer tensor, torch.Size) as its shape."""
    np = pytest.importorskip("numpy")
    codes = torch.randint(0, 8, (4, 3), dtype=torch.int32)
    p = ak.pack_codes(codes, 3)
    for shape in [(4, 3), [4, 3], torch.Size([4, 3]), (np.int64(4), 3),
                  (torch.tensor(4), torch.tensor(3)), torch.tensor([4, 3])]:
        assert torch.equal(ak.unpack_codes(p, shape, 3), codes), shape


def test_mixed_devices_raise():
    other = "cuda" if HAS_CUDA else "meta"
    x, cb = torch.randn(10, 24), torch.randn(3, 10, 8, device=other)
    with pytest.raises(ValueError, match="codebooks is on"):
        ak.vq_encode(x, cb)
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="v is on"):
        ak.mixed_attention(q, q, q.to(other))


# ----------------------------------------------------------------------------- the oracles

def test_oracles_catch_a_wrong_kernel():
    """The rules fail on wrong answers (a shifted output, a wrong code) and print both
    errors."""
    q, k, v, codes, pk, pv = _inputs(1, 2, 2, 5, 7, 11, 32, 1, 16, torch.float16, "cpu")
    out, lse = reference.mixed_attention(q, k, v, codes, pk, pv)
    check_mixed_attention((out, lse), q, k, v, codes, pk, pv)
    with pytest.raises(AssertionError, match="kernel error .* PyTorch's own error"):
        check_mixed_attention((out + 0.01, lse), q, k, v, codes, pk, pv)
    cb = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])
    x = torch.tensor([[0.5, 0.5], [2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    assert nearest_codes(x, cb)[0][:, 0].tolist() == [0, 0, 1, 0]  # ties: lowest index
    x, cb = torch.randn(20, 8), torch.randn(1, 30, 8)
    good = nearest_codes(x, cb)[0]
    bad = good.clone()
    bad[3, 0] = (bad[3, 0] + 1) % 30
    with pytest.raises(AssertionError, match="not the exact nearest"):
        assert_codes_exact(bad, x, cb)
    with pytest.raises(AssertionError, match="not nearest"):
        assert_codes_near_optimal(bad, x, cb)


# ------------------------------------------------------------------------- int8_linear
# weight-only int8 linear: the float64 product of x with the int8 rows, times the scales

# M, N, K: decode (M = 1), a few rows, the GEMM path (M > 16), K past one 4096 block
INT8_SHAPES = [(1, 1, 1), (1, 7, 5), (1, 33, 100), (3, 17, 64), (16, 9, 31), (17, 40, 70),
               (2, 300, 48), (1, 5, 4100), (40, 3, 8)]
# scales per group of weights: (M, N, K, group)
INT8_GROUPED = [(1, 9, 64, 32), (1, 33, 192, 64), (5, 17, 96, 32), (17, 12, 64, 32),
                (1, 7, 4160, 64)]
INT8_OUT_ULP = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def _int8_inputs(M, N, K, dtype, bias, seed=0, group=None):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 4).to(dtype)
    w = torch.randn(N, K, generator=g) * torch.rand(1, K, generator=g)  # uneven columns
    b = torch.randn(N, generator=g) if bias else None
    q, s = ak.quantize_int8(w, group)
    return x, q, s, b


def _int8_weight64(q, s, o=None):
    """The weights the op multiplies by, float64: each int8 times its scale (plus its
    offset)."""
    N, K = q.shape
    s64 = s.double().reshape(N, -1, 1)
    w = q.double().reshape(N, s64.shape[1], -1) * s64
    if o is not None:
        w = w + o.double().reshape(N, -1, 1)
    return w.reshape(N, K)


def _int8_oracle(x, q, s, b, o=None):
    """float64 ``(x @ q^T) * s + b`` and a bound on what float32 sums and the CPU
    kernel's 16-bit rounding of each row of x may add to it."""
    x64, w64 = x.double(), _int8_weight64(q, s, o)
    y = x64 @ w64.t()
    if b is not None:
        y = y + b.double()
    mag = x64.abs() @ w64.abs().t()
    xs = x64.abs().amax(1, keepdim=True) / 32767  # the int16 step of each row
    rounding = 0.5 * xs * w64.abs().sum(1)[None, :]
    return y, 1e-5 * mag + rounding + 1e-6


@pytest.mark.parametrize("backend,case", grid(
    [(m, n, k, dt, bias) for (m, n, k) in INT8_SHAPES
     for dt in (torch.float32, torch.bfloat16, torch.float16) for bias in (False, True)
     if dt == torch.float32 or (m, n, k) in ((1, 33, 100), (17, 40, 70))],
    small=lambda c: c[0] * c[1] * c[2] <= 25000,
    ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{str(c[3])[6:]}-{'bias' if c[4] else 'nobias'}"),
    indirect=["backend"])
def test_int8_linear_matches_the_oracle(backend, case):
    serves(backend, "int8_linear")
    M, N, K, dtype, bias = case
    x, q, s, b = _int8_inputs(M, N, K, dtype, bias)
    dev = backend.device
    y = ak.int8_linear(x.to(dev), q.to(dev), s.to(dev), None if b is None else b.to(dev))
    assert y.shape == (M, N) and y.dtype == dtype and y.device.type == dev
    ref, tol = _int8_oracle(x, q, s, b)
    # rounding the output: half an ulp, a whole one where the interpreter truncates bf16
    tol = tol + ref.abs() * INT8_OUT_ULP[dtype] * (1 + 2 * backend.ulps(dtype))
    err = (y.cpu().double() - ref).abs()
    assert bool((err <= tol).all()), f"max excess {(err - tol).max().item():.3g}"


@pytest.mark.parametrize("backend,case",
                         grid(INT8_GROUPED, small=lambda c: c[0] * c[1] * c[2] <= 25000),
                         indirect=["backend"])
def test_int8_linear_grouped_scales_match_the_oracle(backend, case):
    """One scale per group of weights of a row (``scale [N, K/g]``)."""
    serves(backend, "int8_linear")
    M, N, K, group = case
    x, q, s, b = _int8_inputs(M, N, K, torch.float32, True, group=group)
    assert s.shape == (N, K // group)
    dev = backend.device
    y = ak.int8_linear(x.to(dev), q.to(dev), s.to(dev), b.to(dev)).cpu().double()
    ref, tol = _int8_oracle(x, q, s, b)
    assert bool(((y - ref).abs() <= tol).all()), f"max excess {((y - ref).abs() - tol).max():.3g}"


@pytest.mark.parametrize("backend,case",
                         grid([(1, 9, 64, 32), (3, 17, 96, 32), (1, 5, 40, None), (17, 12, 64, 32)],
                              small=lambda c: c[0] * c[1] * c[2] <= 25000),
                         indirect=["backend"])
def test_int8_linear_offsets_match_the_oracle(backend, case):
    """Asymmetric groups: ``weight * scale + offset``."""
    serves(backend, "int8_linear")
    M, N, K, group = case
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=g) * 3
    w = torch.randn(N, K, generator=g) + 2 * torch.rand(N, 1, generator=g)  # off-centre rows
    b = torch.randn(N, generator=g)
    q, s, o = ak.quantize_int8(w, group, asymmetric=True)
    dev = backend.device
    y = ak.int8_linear(x.to(dev), q.to(dev), s.to(dev), b.to(dev), o.to(dev)).cpu().double()
    ref, tol = _int8_oracle(x, q, s, b, o)
    # the offsets meet x's int16 rounding through each group's sum
    xs = x.double().abs().amax(1, keepdim=True) / 32767
    per = K / o.reshape(N, -1).shape[1]  # weights per offset
    tol = tol + 0.5 * xs * (o.double().abs().reshape(N, -1) * per).sum(1)
    assert bool(((y - ref).abs() <= tol).all()), f"max excess {((y - ref).abs() - tol).max():.3g}"


def test_quantize_int8_asymmetric_holds_q4_1_blocks_exactly():
    """Blocks of 32 weights on 16 evenly spaced levels (a GGUF's Q4_1) come back exactly
    (to float32 rounding), where symmetric int8 cannot place them."""
    g = torch.Generator().manual_seed(2)
    d = torch.rand(6, 4, 1, generator=g) * 0.1 + 0.01
    m = torch.randn(6, 4, 1, generator=g) * 0.1
    levels = torch.randint(0, 16, (6, 4, 32), generator=g)
    levels[..., 0], levels[..., 1] = 0, 15  # each block spans its 16 levels
    w = (levels * d + m).reshape(6, 128)
    q, s, o = ak.quantize_int8(w, 32, asymmetric=True)
    assert q.dtype == torch.int8 and s.shape == o.shape == (6, 4)
    err = (_int8_weight64(q, s, o) - w.double()).abs().max()
    assert err <= 4 * torch.finfo(torch.float32).eps * w.abs().max()
    sym = (_int8_weight64(*ak.quantize_int8(w, 32)) - w.double()).abs().max()
    assert sym > 1000 * err


@pytest.mark.parametrize("backend", grid(), indirect=True)
def test_int8_linear_nan_rows(backend):
    """A NaN in a row of x makes that row's outputs NaN, and only that row's."""
    serves(backend, "int8_linear")
    x, q, s, b = _int8_inputs(3, 11, 40, torch.float32, True)
    x[1, 7] = float("nan")
    dev = backend.device
    y = ak.int8_linear(x.to(dev), q.to(dev), s.to(dev), b.to(dev)).cpu()
    assert bool(y[1].isnan().all()) and bool(torch.isfinite(y[[0, 2]]).all())


def test_int8_linear_takes_leading_dims_and_matches_int8linear():
    x, q, s, b = _int8_inputs(6, 13, 24, torch.float32, True)
    x3 = x.reshape(2, 3, 24)
    y = ak.int8_linear(x3, q, s, b)
    assert y.shape == (2, 3, 13)
    torch.testing.assert_close(y.reshape(6, 13), ak.int8_linear(x, q, s, b))
    lin = ak.Int8Linear(q, s, b)
    assert torch.equal(lin(x3), y) and lin.nbytes == 13 * 24 + 4 * 13
    w = torch.randn(13, 24)
    lq = ak.Int8Linear.quantize(w)
    torch.testing.assert_close(lq(x), x @ (lq.weight.float() * lq.scale[:, None]).t(),
                               rtol=1e-4, atol=1e-3)


def test_quantize_int8_groups_round_each_group_to_its_own_scale():
    w = torch.randn(4, 128) * torch.logspace(-2, 2, 128)[None, :]
    q, s = ak.quantize_int8(w, 32)
    assert s.shape == (4, 4) and bool((q.reshape(4, 4, 32).abs().amax(-1) == 127).all())
    err = (_int8_weight64(q, s) - w.double()).abs().reshape(4, 4, 32)
    assert bool((err <= s.double()[..., None] / 2 + 1e-6).all())
    per_row = (_int8_weight64(*ak.quantize_int8(w)) - w.double()).abs().mean()
    assert err.mean() < 0.5 * per_row  # columns of uneven scale: groups pay off
    for bad in (16, 48, 100):
        with pytest.raises(ValueError, match="group_size"):
            ak.quantize_int8(w, bad)


def test_quantize_int8_rounds_each_row_to_its_own_scale():
    w = torch.randn(9, 50) * torch.logspace(-3, 2, 9)[:, None]
    w[4] = 0
    q, s = ak.quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (9,)
    assert s[4] == 1 and bool((q[4] == 0).all())
    assert bool((q.abs().amax(1)[[0, 1, 2, 3, 5, 6, 7, 8]] == 127).all())
    assert bool(((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-7 * w.abs()).all())


@pytest.mark.parametrize("args, err, msg", [
    (lambda x, q, s: (x, q.float(), s), TypeError, "weight has dtype"),
    (lambda x, q, s: (x[:, :5], q, s), ValueError, "last dim must be K"),
    (lambda x, q, s: (x, q, s[:3]), ValueError, "scale has shape"),
    (lambda x, q, s: (x, q, s[:, None].expand(4, 3).contiguous()), ValueError, "scale has shape"),
    (lambda x, q, s: (x, q, s, None, s[:2]), ValueError, "offset has shape"),
    (lambda x, q, s: (x, q, s, torch.zeros(2)), ValueError, "bias has shape"),
    (lambda x, q, s: (x.long(), q, s), TypeError, "x has dtype"),
])
def test_int8_linear_refuses_bad_input(args, err, msg):
    x, q, s, _ = _int8_inputs(2, 4, 8, torch.float32, False)
    with pytest.raises(err, match=msg):
        ak.int8_linear(*args(x, q, s))
    if err is ValueError and not any(a in msg for a in ("bias", "scale", "offset")):
        with pytest.raises(err, match=msg):
            ak.Int8Linear(q, s)(args(x, q, s)[0])


def test_quantize_int8_refuses_non_finite_weights():
    w = torch.randn(3, 4)
    w[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinity"):
        ak.quantize_int8(w)

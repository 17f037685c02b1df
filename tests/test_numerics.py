"""Numerics at the edges, on every backend (``tests.test_ops``'s grid and fixture):

- NaN in the attention inputs propagates as plain softmax attention (the reference)
  propagates it, and only to the outputs that depend on it; keys a query does not see
  never reach its ``lse``; rows that see no key stay zeros / ``-inf``;
- ``merge_attention`` with NaN ``lse`` or ``out``;
- ``vq_encode`` gives ``-1`` (and a NaN error) to a group holding a NaN or an infinity;
- unchecked int64 codes outside int32 are missing tokens, never wrapped into range;
- autograd: ``mixed_attention`` / ``merge_attention`` differentiate through the
  reference when an input requires grad; ``vq_encode``'s outputs never require grad;
- property tests (hypothesis, derandomized, bounded example counts): ``vq_encode`` and
  ``mixed_attention`` on random shapes (GQA, causal positions, -1 codes,
  fp32/fp16/bf16) against float64 ground truth (:mod:`tests.oracles`).
"""
import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import astra_kernels as ak
from astra_kernels import reference
from tests import test_ops
from tests.oracles import (
    DTYPES,
    assert_codes_exact,
    assert_codes_near_optimal,
    assert_vq_error,
    attention_truth,
    check_mixed_attention,
    nearest_codes,
    remote_kv64,
)

# NaN rows make Triton's interpreter (numpy) warn; the results are what is tested
pytestmark = [pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

backend = test_ops.backend  # the fixture: forces the backend of each case
grid, serves, _inputs = test_ops.grid, test_ops.serves, test_ops._inputs

NAN, INF = float("nan"), float("inf")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def _codes_off():
    """The code range check off inside the block (as the runner runs)."""
    ak.set_code_checks(False)
    try:
        yield
    finally:
        ak.set_code_checks(True)


# ----------------------------------------------------------------------------- NaN in attention

# (name, B, H, Hkv, Tq, Tl, Tr, d, G, K, form): the kernels' paths. 2 x 12 query rows
# per kv head take the CPU kernel's tile GEMMs; "decode" (3 x 1) its row loop.
NAN_CASES = [
    ("local", 1, 4, 2, 12, 9, 0, 32, 1, 1, "none"),
    ("gather", 1, 4, 2, 12, 5, 9, 32, 2, 7, "codes"),
    ("codebook", 1, 4, 2, 12, 5, 20, 32, 1, 4, "codes"),      # G = 1, K < Tr
    ("materialized", 1, 4, 2, 12, 5, 9, 32, 1, 7, "materialized"),
    ("decode", 1, 6, 2, 1, 5, 9, 32, 1, 4, "codes"),          # the CPU row loop
]


def _nan_case(case, dtype, device, seed=0):
    name, B, H, Hkv, Tq, Tl, Tr, d, G, K, form = case
    q, k, v, codes, pk, pv = _inputs(B, H, Hkv, Tq, Tl, Tr, d, G, K, dtype, device, seed=seed)
    kw = {}
    if form == "codes":
        kw = dict(codes=codes, pk=pk, pv=pv)
    elif form == "materialized":
        rk, rv, _ = remote_kv64(codes, pk, pv)
        kw = dict(remote_k=rk.to(dtype), remote_v=rv.to(dtype))
    return q, k, v, kw


def _rows_equal(got, want, rows, what):
    """``got`` and ``want`` (``(out, lse)``) agree on the query rows ``rows``
    (bool ``[B, H, Tq]``); the NaN elsewhere did not leak into them."""
    out, lse = (t.cpu() for t in got)
    wout, wlse = (t.cpu() for t in want)
    assert not out[rows].isnan().any() and not lse[rows].isnan().any(), f"{what}: NaN leaked"
    torch.testing.assert_close(out[rows], wout[rows], rtol=0, atol=0, msg=lambda m: f"{what}\n{m}")
    torch.testing.assert_close(lse[rows], wlse[rows], rtol=0, atol=0, msg=lambda m: f"{what}\n{m}")


def _all_nan(got, rows, what):
    """Every element of ``out`` and ``lse`` on the query rows ``rows`` is NaN."""
    out, lse = (t.cpu() for t in got)
    assert rows.any(), what
    assert out[rows].isnan().all(), f"{what}: out not NaN in every element of the rows"
    assert lse[rows].isnan().all(), f"{what}: lse not NaN"


@pytest.mark.parametrize("backend", grid(), indirect=True)
@pytest.mark.parametrize("case", NAN_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_query_gives_nan_row_only(backend, case, dtype):
    """NaN in one element of a query: that query's out and lse are NaN (reference
    semantics), every other row is bit-identical to the run without the NaN."""
    serves(backend, "mixed_attention")
    if backend.interpreted and dtype == torch.float16:
        pytest.skip("interpreter: fp32 and bf16 only (time)")
    dev = backend.device
    q, k, v, kw = _nan_case(case, dtype, dev)
    clean = ak.mixed_attention(q, k, v, **kw)
    qn = q.clone()
    qn[0, 1, 0, 3] = NAN
    qn[0, -1, -1, 0] = NAN
    got = ak.mixed_attention(qn, k, v, **kw)
    bad = torch.zeros(q.shape[:3], dtype=torch.bool)
    bad[0, 1, 0] = bad[0, -1, -1] = True
    _all_nan(got, bad, f"{backend} {case[0]} NaN q")
    _rows_equal(got, clean, ~bad, f"{backend} {case[0]} rows without NaN")
    # the reference agrees on which rows are NaN
    ref = reference.mixed_attention(qn.cpu(), k.cpu(), v.cpu(),
                                    **{n: t.cpu() for n, t in kw.items()})
    assert torch.equal(ref[1].isnan(), got[1].cpu().isnan())


@pytest.mark.parametrize("backend", grid(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_key_reaches_only_queries_that_see_it(backend, dtype):
    """Causal: a NaN in local key j makes out and lse NaN for the queries that see j
    (every head of its kv-head group) and nothing else; those before it are
    bit-identical to the run without the NaN (a masked key is replaced, not added)."""
    serves(backend, "mixed_attention")
    dev = backend.device
    B, H, Hkv, T, d = 1, 4, 2, 9, 32
    q, k, v, *_ = _inputs(B, H, Hkv, T, T, 0, d, 1, 1, dtype, dev, seed=2)
    clean = ak.mixed_attention(q, k, v, causal=True)
    kn = k.clone()
    kn[0, 1, 5, 7] = NAN  # kv head 1 = query heads 2, 3; seen by queries 5..8
    got = ak.mixed_attention(q, kn, v, causal=True)
    bad = torch.zeros(B, H, T, dtype=torch.bool)
    bad[0, 2:, 5:] = True
    _all_nan(got, bad, f"{backend} NaN key")
    _rows_equal(got, clean, ~bad, f"{backend} rows that do not see the NaN key")


@pytest.mark.parametrize("backend", grid(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_nan_value_gives_nan_out_finite_lse(backend, dtype):
    """A NaN in dim 2 of a value: out NaN in dim 2 for the queries that see it, every
    other dim and every lse unchanged. (Dim 2 of queries that do not see it is
    unspecified: 0 x NaN where a kernel reads the masked tile, as the reference.)"""
    serves(backend, "mixed_attention")
    dev = backend.device
    B, H, Hkv, T, d = 1, 2, 1, 7, 16
    q, k, v, *_ = _inputs(B, H, Hkv, T, T, 0, d, 1, 1, dtype, dev, seed=4)
    clean = ak.mixed_attention(q, k, v, causal=True)
    vn = v.clone()
    vn[0, 0, 4, 2] = NAN
    out, lse = ak.mixed_attention(q, k, vn, causal=True)
    sees = torch.zeros(B, H, T, dtype=torch.bool)
    sees[..., 4:] = True
    out_c, clean_c = out.cpu(), clean[0].cpu()
    assert out_c[..., 2][sees].isnan().all(), f"{backend}: NaN value did not reach out"
    other = [c for c in range(d) if c != 2]
    torch.testing.assert_close(out_c[..., other], clean_c[..., other], rtol=0, atol=0)
    torch.testing.assert_close(lse.cpu(), clean[1].cpu(), rtol=0, atol=0)  # lse untouched


@pytest.mark.parametrize("backend", grid(), indirect=True)
@pytest.mark.parametrize("path", ["gather", "codebook"])
def test_nan_in_code_tables(backend, path):
    """NaN in the pk row of a code that visible tokens use: NaN for the queries that
    see them; NaN in the pk row of a code no token uses (codebook space scores every
    codeword, with bias -inf for unused ones): no effect at all."""
    serves(backend, "mixed_attention")
    dev = backend.device
    case = NAN_CASES[1] if path == "gather" else NAN_CASES[2]
    _, B, H, Hkv, Tq, Tl, Tr, d, G, K, _ = case
    q, k, v, codes, pk, pv = _inputs(B, H, Hkv, Tq, Tl, Tr, d, G, K, torch.float32, dev,
                                     seed=5)
    codes[..., 0] = codes[..., 0] % (K - 1)  # code K-1 of group 0 is used by no token
    codes[0, 3, 0] = 0                       # and code 0 by token 3 at least
    rpos = torch.full((Tr,), 3)
    rpos[(codes[0, :, 0] == 0).cpu()] = 12  # the tokens of code 0: seen from 12 on
    pos = dict(q_pos=torch.arange(Tq) + 10, kv_pos=torch.arange(Tl), remote_pos=rpos)
    kw = dict(codes=codes, pk=pk, pv=pv, causal=True, **{n: t.to(dev) for n, t in pos.items()})
    clean = ak.mixed_attention(q, k, v, **kw)
    unused = pk.clone()
    unused[0, K - 1, 0, 0] = NAN
    everyone = torch.ones(B, H, Tq, dtype=torch.bool)
    _rows_equal(ak.mixed_attention(q, k, v, **dict(kw, pk=unused)), clean, everyone,
                f"{backend} {path} unused NaN row, causal")
    _rows_equal(ak.mixed_attention(q, k, v, codes, unused, pv),
                ak.mixed_attention(q, k, v, codes, pk, pv), everyone,
                f"{backend} {path} unused NaN row, full attention")
    used = pk.clone()
    used[0, 0, 1, 0] = NAN  # kv head 1: query heads 2, 3; queries at positions >= 12
    got = ak.mixed_attention(q, k, v, **dict(kw, pk=used))
    bad = torch.zeros(B, H, Tq, dtype=torch.bool)
    bad[0, 2:, 2:] = True
    _all_nan(got, bad, f"{backend} {path} used NaN row")
    _rows_equal(got, clean, ~bad, f"{backend} {path} rows that see no NaN token")
    # without causal masks (codebook space for every query) the same holds per head
    kw = dict(codes=codes, pk=used, pv=pv)
    got = ak.mixed_attention(q, k, v, **kw)
    bad[:] = False
    bad[0, 2:] = True
    _all_nan(got, bad, f"{backend} {path} used NaN row, full attention")


@pytest.mark.parametrize("backend", grid(), indirect=True)
def test_nan_rope_and_nan_query_that_sees_nothing(backend):
    """NaN in rope_cos at a visible remote key: NaN for its viewers. A NaN query that
    sees no key at all still gets zeros and lse = -inf (as the reference)."""
    serves(backend, "mixed_attention")
    dev = backend.device
    q, k, v, codes, pk, pv = _inputs(1, 2, 1, 4, 3, 6, 16, 1, 9, torch.float32, dev, seed=6)
    cos, sin = test_ops.rope_cos_sin(torch.arange(6)[None], 16)
    cos[0, 2, 1] = NAN
    got = ak.mixed_attention(q, k, v, codes, pk, pv, rope_cos=cos.to(dev), rope_sin=sin.to(dev))
    _all_nan(got, torch.ones(1, 2, 4, dtype=torch.bool), f"{backend} NaN rope")
    qn = q.clone()
    qn[0, 0, 0, 0] = NAN
    out, lse = ak.mixed_attention(qn, k, v, causal=True,
                                  q_pos=torch.tensor([0, 5, 5, 5], device=dev),
                                  kv_pos=torch.tensor([1, 2, 3], device=dev))
    assert (out[0, :, 0] == 0).all() and torch.isneginf(lse[0, :, 0]).all()
    assert torch.isfinite(lse[0, 1, 1:]).all()


# ----------------------------------------------------------------------------- merge

@pytest.mark.parametrize("backend", grid(), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_attention_nan(backend, dtype):
    """A NaN lse on either side (the other side empty, finite or NaN): the row is NaN.
    A NaN in out_a where side a has weight: NaN there only. Both sides empty: zeros."""
    serves(backend, "merge_attention")
    dev = backend.device
    gen = _gen(7)
    rows, d = 8, 5
    oa, ob = torch.randn(rows, d, generator=gen), torch.randn(rows, d, generator=gen)
    la, lb = torch.randn(rows, generator=gen), torch.randn(rows, generator=gen)
    la[0], lb[0] = NAN, -INF
    la[1], lb[1] = -INF, NAN
    la[2], lb[2] = NAN, 0.5
    la[3], lb[3] = 0.5, NAN
    la[4], lb[4] = NAN, NAN
    la[5], lb[5] = -INF, -INF
    oa[5] = ob[5] = 0
    oa[6, 2] = NAN
    args = [t.to(dev) for t in (oa.to(dtype), la, ob.to(dtype), lb)]
    out, lse = (t.cpu() for t in ak.merge_attention(*args))
    ref_out, ref_lse = reference.merge_attention(*(t.cpu() for t in args))
    assert out[:5].isnan().all() and lse[:5].isnan().all(), f"{backend}: {out[:5]} {lse[:5]}"
    assert (out[5] == 0).all() and torch.isneginf(lse[5])
    assert out[6, 2].isnan() and not out[6, [0, 1, 3, 4]].isnan().any()
    assert torch.isfinite(lse[6:]).all()
    torch.testing.assert_close(lse, ref_lse, equal_nan=True)
    torch.testing.assert_close(out, ref_out, equal_nan=True)


# ----------------------------------------------------------------------------- vq_encode

@pytest.mark.parametrize("backend", grid(), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_vq_encode_non_finite_rows_get_minus_one(backend, dtype, precision):
    """A group holding a NaN, +inf or -inf gets code -1 and its row a NaN error; the
    other groups of that row, and the other rows, are encoded as usual."""
    serves(backend, "vq_encode")
    dev = backend.device
    gen = _gen(8)
    G, K, dg, M = 3, 37, 8, 11
    cb = torch.randn(G, K, dg, generator=gen)
    x = torch.randn(M, G * dg, generator=gen)
    x[1, 0] = NAN                  # row 1, group 0
    x[2, dg + 3] = INF             # row 2, group 1
    x[3, 2 * dg + 7] = -INF        # row 3, group 2
    x[4, :] = NAN                  # row 4, every group
    x[5, 1] = INF                  # row 5, groups 0 and 2
    x[5, 2 * dg] = NAN
    x = x.to(dtype)
    codes, err = ak.vq_encode(x.to(dev), cb.to(dev), precision=precision, return_error=True)
    codes, err = codes.cpu(), err.cpu()
    bad = ~torch.isfinite(x.reshape(M, G, dg)).all(-1)
    assert torch.equal(codes == -1, bad), f"{backend}: {codes.tolist()}"
    rows = bad.any(1)
    assert err[rows].isnan().all() and not err[~rows].isnan().any()
    # the finite groups: the nearest codewords of the same rows with the bad groups zeroed
    fixed = x.float().reshape(M, G, dg).masked_fill(bad[..., None], 0).reshape(M, G * dg)
    want = nearest_codes(fixed, cb, precision)[0]
    filled = torch.where(bad, want, codes)
    if precision == "fp32" and backend.exact_vq:
        assert_codes_exact(filled, fixed, cb, what=f"{backend} finite groups")
    else:
        assert_codes_near_optimal(filled, fixed, cb, precision, what=f"{backend} finite groups")
    assert_vq_error(err[~rows], codes[~rows], x[~rows], cb, precision, what=f"{backend} err",
                    rtol=1e-4, atol=1e-4)
    # the reference says the same
    ref = reference.vq_encode(x, cb, precision, True)
    assert torch.equal(ref[0] == -1, bad) and torch.equal(ref[1].isnan(), rows)


def test_pack_codes_explains_minus_one():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\).*-1 marks a missing"):
        ak.pack_codes(torch.tensor([3, -1, 2]), 4)


def test_vq_encode_outputs_do_not_require_grad():
    x = torch.randn(5, 8, requires_grad=True)
    cb = torch.randn(2, 6, 4, requires_grad=True)
    codes, err = ak.vq_encode(x, cb, return_error=True)
    assert not codes.requires_grad and not err.requires_grad and err.grad_fn is None


# ----------------------------------------------------------------------------- codes

@pytest.mark.parametrize("backend", grid(), indirect=True)
def test_unchecked_int64_codes_never_wrap(backend):
    """With the range check off, int64 codes outside int32 (2**32 + 3 would wrap to the
    valid code 3) are missing tokens, as every other out-of-range code."""
    serves(backend, "mixed_attention")
    dev = backend.device
    q, k, v, codes, pk, pv = _inputs(1, 2, 1, 3, 4, 6, 16, 2, 5, torch.float32, dev, seed=9)
    codes = codes.long()
    codes[0, 1, 0] = (1 << 32) + 3
    codes[0, 2, 1] = -(1 << 32) + 1   # wraps to 1
    codes[0, 4, 0] = (1 << 63) - 1
    with _codes_off():
        got = ak.mixed_attention(q, k, v, codes, pk, pv)
    check_mixed_attention(got, q, k, v, codes, pk, pv, what=f"{backend} int64 codes")
    gone = codes.clone()
    gone[0, 1, 0] = gone[0, 2, 1] = gone[0, 4, 0] = -1
    want = ak.mixed_attention(q, k, v, gone, pk, pv)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- autograd

@pytest.mark.parametrize("form", ["codes", "materialized-rope"])
def test_mixed_attention_autograd_through_reference(form):
    """Inputs that require grad: the reference computes the result and autograd
    differentiates it; gradients match float64 autograd of the independent oracle."""
    q, k, v, codes, pk, pv = _inputs(1, 4, 2, 5, 6, 7, 16, 2, 9, torch.float32, "cpu",
                                     missing=0.2, seed=10)
    pos = dict(q_pos=torch.arange(5) + 6, kv_pos=torch.arange(6) + 5,
               remote_pos=torch.arange(7) * 2)
    if form == "codes":
        leaves = dict(q=q, k=k, v=v, pk=pk, pv=pv)
        extra = dict(codes=codes)
    else:
        rk, rv, _ = remote_kv64(codes, pk, pv)
        cos, sin = test_ops.rope_cos_sin(torch.arange(7)[None], 8)
        leaves = dict(q=q, k=k, v=v, remote_k=rk.float(), remote_v=rv.float(), rope_cos=cos)
        extra = dict(rope_sin=sin)
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in leaves.items()}
    out, lse = ak.mixed_attention(**leaves, **extra, causal=True, **pos, scale=0.3)
    assert out.requires_grad and out.grad_fn is not None
    gen = _gen(11)
    w_out, w_lse = torch.randn(out.shape, generator=gen), torch.randn(lse.shape, generator=gen)
    (out * w_out).sum().add((lse * w_lse).sum()).backward()
    leaves64 = {n: t.detach().double().requires_grad_(True) for n, t in leaves.items()}
    extra64 = {n: (t.double() if t.is_floating_point() else t) for n, t in extra.items()}
    o64, l64 = attention_truth(**leaves64, **extra64, causal=True, **pos, scale=0.3)
    (o64 * w_out.double()).sum().add((l64 * w_lse.double()).sum()).backward()
    for n, t in leaves.items():
        assert t.grad is not None, n
        torch.testing.assert_close(t.grad.double(), leaves64[n].grad, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"grad of {n}\n{m}")
    # no grad needed: the kernels serve, and the output carries no graph
    with torch.no_grad():
        out2, _ = ak.mixed_attention(**leaves, **extra, causal=True, **pos, scale=0.3)
    assert not out2.requires_grad
    torch.testing.assert_close(out2, out.detach(), rtol=1e-5, atol=1e-5)


def test_merge_attention_autograd_through_reference():
    gen = _gen(12)
    oa, ob = torch.randn(3, 4, 6, generator=gen), torch.randn(3, 4, 6, generator=gen)
    la, lb = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    lb[0, 0] = -INF
    leaves = [t.clone().requires_grad_(True) for t in (oa, la, ob, lb)]
    out, lse = ak.merge_attention(*leaves)
    (out.sum() + lse.sum()).backward()
    l64 = [t.detach().double().requires_grad_(True) for t in leaves]
    lse64 = torch.logaddexp(l64[1], l64[3])
    out64 = (torch.exp(l64[1] - lse64)[..., None] * l64[0]
             + torch.exp(l64[3] - lse64)[..., None] * l64[2])
    (out64.sum() + lse64.sum()).backward()
    for t, t64 in zip(leaves, l64):
        torch.testing.assert_close(t.grad.double(), t64.grad, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- property tests

def _examples(b, interpreted: int = 8, other: int = 40) -> int:
    """Hypothesis examples per backend: the Triton interpreter is slow."""
    return interpreted if b.interpreted else other


def _property_settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("backend", grid(), indirect=True)
def test_vq_encode_property(backend):
    """Random M, G, K, group width, x dtype, precision, duplicate codewords (ties) and
    non-finite groups: -1 exactly where a group is not finite, and elsewhere the
    float64 nearest codeword (exact for re-ranking backends at fp32, else up to fp32
    accumulation error), with the error of the chosen codewords."""
    serves(backend, "vq_encode")
    dev = backend.device

    @_property_settings(_examples(backend, 10, 60))
    @given(M=st.integers(0, 40), G=st.integers(1, 3), K=st.integers(1, 40),
           dg=st.integers(1, 12), dtype=st.sampled_from(DTYPES),
           precision=st.sampled_from(["fp32", "bf16"]), dups=st.integers(0, 3),
           n_bad=st.integers(0, 3), seed=st.integers(0, 2 ** 16))
    def run(M, G, K, dg, dtype, precision, dups, n_bad, seed):
        gen = _gen(seed)
        cb = torch.randn(G, K, dg, generator=gen)
        for _ in range(dups if K > 1 else 0):  # exact duplicates: ties to the lowest index
            a, b = torch.randint(0, K, (2,), generator=gen).tolist()
            cb[:, b] = cb[:, a]
        x = torch.randn(M, G * dg, generator=gen)
        if M:
            x[: M // 2] = cb[:, torch.randint(0, K, (1,), generator=gen)].reshape(1, -1)
            x[: M // 2] += 1e-3 * torch.randn(M // 2, G * dg, generator=gen)
            for _ in range(n_bad):
                i = torch.randint(0, M * G * dg, (1,), generator=gen).item()
                x.view(-1)[i] = (NAN, INF, -INF)[i % 3]
        x = x.to(dtype)
        codes, err = ak.vq_encode(x.to(dev), cb.to(dev), precision=precision, return_error=True)
        codes, err = codes.cpu(), err.cpu()
        assert codes.shape == (M, G) and codes.dtype == torch.int32
        xs = x.reshape(M, G, dg)
        if precision == "bf16":
            xs = xs.to(torch.bfloat16)
        bad = ~torch.isfinite(xs).all(-1)
        assert torch.equal(codes == -1, bad)
        rows = ~bad.any(1)
        what = f"{backend} M={M} G={G} K={K} dg={dg} {dtype} {precision}"
        xo, co = x[rows], codes[rows]
        if precision == "fp32" and backend.exact_vq:
            assert_codes_exact(co, xo, cb, what=what)
        else:
            assert_codes_near_optimal(co, xo, cb, precision, what=what)
        assert_vq_error(err[rows], co, xo, cb, precision, what=what, rtol=1e-4, atol=1e-4)
        assert err[~rows].isnan().all()

    run()


@pytest.mark.parametrize("backend", grid(), indirect=True)
def test_mixed_attention_property(backend):
    """Random shapes (GQA H = rep x Hkv, empty local or remote sets, head dims that are
    not powers of two), remote keys as codes with lost (-1) and out-of-range tokens
    (range check off) or materialized, causal with random global positions (ties
    included), fp32/fp16/bf16, random scale: the 2x rule of :mod:`tests.oracles`
    against float64 SDPA, rows that see no key exactly 0 / -inf. The reference at
    float64 equals that float64 truth too."""
    serves(backend, "mixed_attention")
    dev = backend.device
    small = backend.interpreted

    @_property_settings(_examples(backend, 8, 40))
    @given(B=st.integers(1, 2), Hkv=st.integers(1, 2), rep=st.integers(1, 3),
           Tq=st.integers(1, 4 if small else 9), Tl=st.integers(0, 6 if small else 12),
           Tr=st.integers(0, 6 if small else 12),
           d=st.sampled_from([8, 16, 24] if small else [8, 16, 24, 40, 64]),
           G=st.integers(1, 3), K=st.integers(1, 9), dtype=st.sampled_from(DTYPES),
           form=st.sampled_from(["codes", "materialized"]), causal=st.booleans(),
           missing=st.sampled_from([0.0, 0.3]), scale=st.one_of(st.none(), st.floats(0.05, 2.0)),
           seed=st.integers(0, 2 ** 16))
    def run(B, Hkv, rep, Tq, Tl, Tr, d, G, K, dtype, form, causal, missing, scale, seed):
        H = Hkv * rep
        q, k, v, codes, pk, pv = _inputs(B, H, Hkv, Tq, Tl, Tr, d, G, K, dtype, dev,
                                         missing=missing, seed=seed)
        gen = _gen(seed + 1)
        if Tr and missing:
            codes[0, 0, -1] = K + 2  # out of range: missing with the check off
        kw = dict(scale=scale)
        if form == "codes":
            kw.update(codes=codes, pk=pk, pv=pv)
        else:
            rk, rv, _ = remote_kv64(codes, pk, pv)
            kw.update(remote_k=rk.to(dtype), remote_v=rv.to(dtype))
        if causal:
            span = Tl + Tr + 2
            kw.update(causal=True,
                      q_pos=torch.randint(0, span, (Tq,), generator=gen).to(dev),
                      kv_pos=torch.randint(0, span, (Tl,), generator=gen).to(dev),
                      remote_pos=torch.randint(0, span, (Tr,), generator=gen).to(dev))
        with _codes_off():
            got = ak.mixed_attention(q, k, v, **kw)
        what = f"{backend} B={B} H={H}/{Hkv} Tq={Tq} Tl={Tl} Tr={Tr} d={d} {form} c={causal}"
        check_mixed_attention(got, q, k, v, **kw, what=what, out_ulps=backend.ulps(dtype))
        # the reference computed at float64 is the float64 truth
        kw64 = {n: (t.cpu().double() if torch.is_tensor(t) and t.is_floating_point()
                    else t.cpu() if torch.is_tensor(t) else t) for n, t in kw.items()}
        r_out, r_lse = reference.mixed_attention(q.cpu().double(), k.cpu().double(),
                                                 v.cpu().double(), **kw64)
        t_out, t_lse = attention_truth(q.cpu(), k.cpu(), v.cpu(), **{
            n: (t.cpu() if torch.is_tensor(t) else t) for n, t in kw.items()})
        # (its scores are float32 whatever the input dtype: fp32-level agreement)
        torch.testing.assert_close(r_out, t_out, rtol=1e-5, atol=1e-5)
        assert torch.equal(torch.isneginf(r_lse), torch.isneginf(t_lse))
        fin = torch.isfinite(t_lse)
        torch.testing.assert_close(r_lse[fin].double(), t_lse[fin], rtol=1e-5, atol=1e-5)

    run()

"""GPU tests of the compiled CUDA kernels (csrc/cuda) against astra_kernels.reference.

Every test runs the public ``astra_kernels.<op>`` functions with the ``cuda`` backend
forced, on CUDA tensors, over awkward shapes (tails of every tile size, GQA, empty
local or remote sets, missing codes, causal masks over interleaved and shuffled
positions). Attention is judged as flash-attention's tests do: ground truth is the
reference on the same inputs cast to float64, and the kernel's error must be at most
twice the error of the reference run at the input precision (``upcast=False``) plus a
small absolute slack. Skipped without a CUDA device.
"""
import math

import pytest
import torch

import astra_kernels
from astra_kernels import reference
from tests._util import requires_cuda

pytestmark = [pytest.mark.gpu, requires_cuda]

DEV = "cuda"
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@pytest.fixture(autouse=True)
def _cuda_backend():
    """Serve every op on CUDA tensors with the compiled kernels (fails if not built)."""
    with astra_kernels.use_backend("cuda", "cuda"):
        yield


# ---------------------------------------------------------------------------
# vq_encode
# ---------------------------------------------------------------------------
def _all_distances64(x, cb, precision):
    """Exact squared distances [M, G, K] of the (rounded, for bf16) operands."""
    M, D = x.shape
    G, K, dg = cb.shape
    xs = x.reshape(M, G, dg)
    c = cb
    if precision == "bf16":
        xs, c = xs.to(torch.bfloat16), c.to(torch.bfloat16)
    xs, c = xs.double(), c.double()
    xn = (xs * xs).sum(-1, keepdim=True)            # [M, G, 1]
    cn = (c * c).sum(-1)                            # [G, K]
    dist = xn + cn.unsqueeze(0) - 2.0 * torch.einsum("mgd,gkd->mgk", xs, c)
    return dist, xn.squeeze(-1), cn


def _check_codes(x, cb, codes, precision):
    """Each code is the nearest codeword up to fp32-accumulation error."""
    dist, xn, cn = _all_distances64(x, cb, precision)
    M, G = codes.shape
    dg = cb.shape[2]
    assert codes.dtype == torch.int32 and codes.shape == (x.shape[0], cb.shape[0])
    assert int(codes.min()) >= 0 and int(codes.max()) < cb.shape[1]
    chosen = dist.gather(-1, codes.long().unsqueeze(-1)).squeeze(-1)
    best = dist.min(-1).values
    tol = 1e-6 * dg * (xn + cn.max(-1).values.unsqueeze(0)) + 1e-6
    gap = chosen - best
    bad = gap > tol
    assert not bad.any(), (f"{int(bad.sum())} of {M * G} codes are not nearest; worst gap "
                           f"{float(gap.max()):.3g} vs tol {float(tol.flatten()[0]):.3g}")
    return chosen


# (x dtype, precision): fp32 FMA on fp32/fp16 input; bf16 tensor cores on bf16 input
# (used in place when D/G % 32 == 0) and on fp32 input (converted).
VQ_MODES = [(F32, "fp32"), (F16, "fp32"), (BF16, "bf16"), (F32, "bf16")]
VQ_DG = {1: 64, 3: 20, 4: 32}  # dims per group: in-place bf16, padded, in-place


@pytest.mark.parametrize("xdtype,precision", VQ_MODES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("G", [1, 3, 4])
@pytest.mark.parametrize("K", [1, 2, 1000])
@pytest.mark.parametrize("M", [1, 97, 1025])
def test_vq_encode_nearest(M, K, G, xdtype, precision):
    dg = VQ_DG[G]
    x = torch.randn(M, G * dg, device=DEV).to(xdtype)
    cb = torch.randn(G, K, dg, device=DEV)
    codes, err = astra_kernels.vq_encode(x, cb, precision=precision, return_error=True)
    chosen = _check_codes(x, cb, codes, precision)
    ref_codes, ref_err = reference.vq_encode(x, cb, precision, True)
    assert (codes == ref_codes).float().mean().item() >= 0.98
    # err is the exact squared distance to the chosen codewords, summed over groups.
    torch.testing.assert_close(err, chosen.sum(-1).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(err, ref_err, rtol=1e-4, atol=1e-4)
    assert astra_kernels.vq_encode(x, cb, precision=precision).shape == (M, G)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("xdtype", [F32, BF16])
def test_vq_encode_ties_go_to_lowest_index(xdtype, precision):
    G, K, dg = 2, 300, 32
    cb = torch.randn(G, K, dg, device=DEV)
    cb[:, 200] = cb[:, 7]        # exact duplicates in different code tiles (128 per tile)
    cb[:, 9] = cb[:, 7]          # ... and in the same tile
    x = cb[:, 7].reshape(1, G * dg).repeat(5, 1).to(xdtype)  # every group equals code 7
    codes = astra_kernels.vq_encode(x, cb, precision=precision)
    assert (codes == 7).all(), codes


def test_vq_encode_one_dim_groups_and_large_rows():
    # dg = 1 (every group one dim) and a wide row with many k-chunks.
    x = torch.randn(257, 4, device=DEV)
    cb = torch.randn(4, 17, 1, device=DEV)
    for precision in ("fp32", "bf16"):
        codes = astra_kernels.vq_encode(x, cb, precision=precision)
        _check_codes(x, cb, codes, precision)
    x = torch.randn(300, 1024, device=DEV, dtype=BF16)
    cb = torch.randn(1, 1024, 1024, device=DEV)
    for precision in ("fp32", "bf16"):
        codes = astra_kernels.vq_encode(x, cb, precision=precision)
        _check_codes(x, cb, codes, precision)


def test_vq_encode_leading_dims_and_empty():
    x = torch.randn(3, 5, 48, device=DEV, dtype=F16)
    cb = torch.randn(3, 10, 16, device=DEV)
    codes, err = astra_kernels.vq_encode(x, cb, return_error=True)
    assert codes.shape == (3, 5, 3) and err.shape == (3, 5)
    chosen = _check_codes(x.reshape(15, 48), cb, codes.reshape(15, 3), "fp32")
    torch.testing.assert_close(err.reshape(15), chosen.sum(-1).float(), rtol=1e-5, atol=1e-5)
    codes, err = astra_kernels.vq_encode(torch.randn(0, 48, device=DEV), cb, return_error=True)
    assert codes.shape == (0, 3) and err.shape == (0,)


# ---------------------------------------------------------------------------
# pack_codes / unpack_codes
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("bits", list(range(1, 17)))
def test_pack_unpack_round_trip(bits):
    for shape in [(0,), (1,), (7,), (8,), (9,), (3, 333), (2, 1025, 3)]:
        codes = torch.randint(0, 1 << bits, shape, device=DEV, dtype=torch.int32)
        payload = astra_kernels.pack_codes(codes, bits)
        n = codes.numel()
        assert payload.dtype == torch.uint8 and payload.shape == ((n * bits + 7) // 8,)
        assert torch.equal(payload, reference.pack_codes(codes, bits)), shape
        back = astra_kernels.unpack_codes(payload, shape, bits)
        assert back.dtype == torch.int32 and torch.equal(back, codes), shape


@pytest.mark.parametrize("bits", [1, 3, 7, 10, 13, 16])
def test_unpack_arbitrary_payload(bits):
    # Any payload of the right length decodes as the reference does (padding ignored).
    for n in [1, 5, 8, 1001]:
        nbytes = (n * bits + 7) // 8
        payload = torch.randint(0, 256, (nbytes,), device=DEV, dtype=torch.uint8)
        got = astra_kernels.unpack_codes(payload, (n,), bits)
        assert torch.equal(got, reference.unpack_codes(payload, (n,), bits))


# ---------------------------------------------------------------------------
# mixed_attention
# ---------------------------------------------------------------------------
# Absolute slack: half an ulp of the output dtype at 1 (scaled by the largest output
# below), so rounding the result to the output dtype alone never fails a test.
ATOL_OUT = {F32: 1e-5, F16: 2.0 ** -11, BF16: 2.0 ** -8}
ATOL_LSE = {F32: 1e-5, F16: 1e-3, BF16: 1e-2}


def _positions(kind, Tq, Tl, Tr, gen):
    """(q_pos, kv_pos, remote_pos) int64; 'interleaved': 3 devices own every third token."""
    if kind == "interleaved":
        q_pos = torch.arange(Tq) * 3 + 1
        kv_pos = torch.arange(Tl) * 3 + 1
        remote_pos = torch.arange(Tr) * 3 + torch.randint(0, 2, (Tr,), generator=gen) * 2
    else:  # shuffled, with repeats
        span = 2 * (Tq + Tl + Tr)
        q_pos = torch.randint(0, span, (Tq,), generator=gen)
        kv_pos = torch.randint(0, span, (Tl,), generator=gen)
        remote_pos = torch.randint(0, span, (Tr,), generator=gen)
    if Tq >= 2:
        q_pos[0] = -1           # sees no key: zeros and lse = -inf
        q_pos[-1] = 10 ** 9     # sees every key
    return q_pos.to(DEV), kv_pos.to(DEV), remote_pos.to(DEV)


def _case(dtype, d, *, B=2, H=4, Hkv=2, Tq=97, Tl=130, Tr=70, remote="codes", G=1, K=50,
          causal=None, missing=0.0, scale=None, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(DEV, dtype)

    kw = dict(q=rnd(B, H, Tq, d), k=rnd(B, Hkv, Tl, d), v=rnd(B, Hkv, Tl, d))
    if remote == "codes":
        codes = torch.randint(0, K, (B, Tr, G), generator=gen, dtype=torch.int32)
        if missing:
            lost = torch.rand(B, Tr, G, generator=gen) < missing
            codes[lost] = -1
        kw.update(codes=codes.to(DEV), pk=rnd(G, K, Hkv, d) / math.sqrt(G),
                  pv=rnd(G, K, Hkv, d) / math.sqrt(G))
    elif remote == "dense":
        kw.update(remote_k=rnd(B, Hkv, Tr, d), remote_v=rnd(B, Hkv, Tr, d))
    else:
        Tr = 0
    if causal is not None:
        q_pos, kv_pos, remote_pos = _positions(causal, Tq, Tl, Tr, gen)
        kw.update(causal=True, q_pos=q_pos, kv_pos=kv_pos, remote_pos=remote_pos)
    if scale is not None:
        kw.update(scale=scale)
    return kw


def _to64(kw):
    return {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
            for n, t in kw.items()}


def _check_attention(kw):
    q = kw["q"]
    dtype = q.dtype
    out, lse = astra_kernels.mixed_attention(**kw)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    truth_out, truth_lse = reference.mixed_attention(**_to64(kw))
    ref_out, ref_lse = reference.mixed_attention(**kw, upcast=False)

    assert torch.isfinite(out).all()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(truth_lse)), "rows that see no key"
    assert not torch.isnan(lse).any() and not torch.isposinf(lse).any()
    err = (out.double() - truth_out).abs().max().item()
    ref_err = (ref_out.double() - truth_out).abs().max().item()
    atol = ATOL_OUT[dtype] * max(1.0, truth_out.abs().max().item())
    assert err <= 2 * ref_err + atol, f"out error {err:.3g} vs reference {ref_err:.3g}"
    fin = torch.isfinite(truth_lse)
    if fin.any():
        lerr = (lse[fin].double() - truth_lse[fin].double()).abs().max().item()
        ref_lerr = (ref_lse[fin].double() - truth_lse[fin].double()).abs().max().item()
        assert lerr <= 2 * ref_lerr + ATOL_LSE[dtype], f"lse error {lerr:.3g} vs {ref_lerr:.3g}"
    return out, lse


ATTN_CONFIGS = {
    "codes-G1-gqa": dict(remote="codes", G=1, K=1000, Hkv=2),
    "codes-G3-missing-causal": dict(remote="codes", G=3, K=2, Hkv=1, causal="interleaved",
                                    missing=0.15),
    "dense-causal-shuffled": dict(remote="dense", Hkv=4, causal="shuffled"),
    "local-only": dict(remote=None, Hkv=2),
    "remote-only-G4-missing": dict(remote="codes", Tl=0, G=4, K=1, Hkv=4, missing=0.3),
    "tq1": dict(remote="codes", Tq=1, Tl=5, Tr=3, G=1, K=7, causal="interleaved"),
}


@pytest.mark.parametrize("config", list(ATTN_CONFIGS))
@pytest.mark.parametrize("d", [32, 64, 80, 128])
@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=["fp16", "bf16", "fp32"])
def test_mixed_attention_matches_reference(dtype, d, config):
    _check_attention(_case(dtype, d, **ATTN_CONFIGS[config]))


# Head dims padded to the next tensor-core tile (8, 40, 96), and ones served by the
# generic CUDA-core kernel (36: not a multiple of 8; 160, 256: above 128; fp32).
@pytest.mark.parametrize("dtype,d", [(F16, 8), (BF16, 40), (F16, 96), (F16, 36), (BF16, 160),
                                     (F32, 256), (F32, 1)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_mixed_attention_other_head_dims(dtype, d):
    _check_attention(_case(dtype, d, remote="codes", G=3, K=20, Hkv=1, causal="shuffled",
                           missing=0.1, B=1, Tq=70, Tl=65, Tr=33))


@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=["fp16", "bf16", "fp32"])
def test_mixed_attention_long_and_sharp(dtype):
    # Many key tiles (online-softmax rescaling, causal tile skipping) and a large scale.
    _check_attention(_case(dtype, 64, B=1, H=2, Hkv=1, Tq=300, Tl=1025, Tr=513, remote="codes",
                           G=1, K=1000, causal="interleaved", scale=0.5))


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
def test_mixed_attention_misaligned_inputs(dtype):
    # Contiguous views that start 2 bytes into their storage take the generic kernel.
    kw = _case(dtype, 64, remote="dense", causal="shuffled")
    for name in ("q", "k", "remote_v"):
        t = kw[name]
        buf = torch.empty(t.numel() + 1, device=DEV, dtype=dtype)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        assert view.is_contiguous() and view.data_ptr() % 16 != 0
        kw[name] = view
    _check_attention(kw)


@pytest.mark.parametrize("dtype", [F16, F32], ids=["fp16", "fp32"])
def test_mixed_attention_out_of_range_codes_are_missing(dtype):
    # With the range check off, codes outside [-1, K) must be masked, never read.
    kw = _case(dtype, 64, remote="codes", G=2, K=10, Tr=40)
    codes = kw["codes"].clone()
    codes[0, 3, 1] = 10
    codes[1, 5, 0] = 1 << 30
    codes[0, 7, 0] = -7
    kw["codes"] = codes
    astra_kernels.set_code_checks(False)
    try:
        out, lse = astra_kernels.mixed_attention(**kw)
    finally:
        astra_kernels.set_code_checks(True)
    expected = dict(kw, codes=torch.where((codes < 0) | (codes >= 10), -1, codes))
    exp_out, exp_lse = _check_attention(expected)
    torch.testing.assert_close(out, exp_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, exp_lse, rtol=0, atol=0)


def test_mixed_attention_no_keys():
    kw = _case(F16, 64, remote="codes", Tl=0, Tr=0)
    out, lse = astra_kernels.mixed_attention(**kw)
    assert (out == 0).all() and torch.isneginf(lse).all()


# ---------------------------------------------------------------------------
# merge_attention
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 4, 97, 64), (5, 80), (3, 0), (1, 1)], ids=str)
@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=["fp16", "bf16", "fp32"])
def test_merge_attention_matches_reference(dtype, shape):
    out_a = torch.randn(shape, device=DEV).to(dtype)
    out_b = torch.randn(shape, device=DEV).to(dtype)
    lse_a = torch.randn(shape[:-1], device=DEV) * 3
    lse_b = torch.randn(shape[:-1], device=DEV) * 3
    flat_a, flat_b = lse_a.view(-1), lse_b.view(-1)
    if flat_a.numel() >= 3:
        flat_a[0] = float("-inf")                              # only b
        flat_b[1] = float("-inf")                              # only a
        flat_a[2] = flat_b[2] = float("-inf")                  # neither: zeros, -inf
    out, lse = astra_kernels.merge_attention(out_a, lse_a, out_b, lse_b)
    ref_out, ref_lse = reference.merge_attention(out_a, lse_a, out_b, lse_b)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.parametrize("dtype", [F16, F32], ids=["fp16", "fp32"])
def test_merged_partials_equal_full_attention(dtype):
    # Local-only and remote-only partial attentions merge into the full one.
    kw = _case(dtype, 64, remote="codes", G=2, K=30, causal="interleaved", missing=0.1)
    full_out, full_lse = astra_kernels.mixed_attention(**kw)
    local = {n: t for n, t in kw.items() if n not in ("codes", "pk", "pv", "remote_pos")}
    out_l, lse_l = astra_kernels.mixed_attention(**local)
    empty = kw["k"][:, :, :0]
    remote = dict(kw, k=empty, v=empty, kv_pos=kw["kv_pos"][:0])
    out_r, lse_r = astra_kernels.mixed_attention(**remote)
    out, lse = astra_kernels.merge_attention(out_l, lse_l, out_r, lse_r)
    tol = dict(rtol=2e-3, atol=2e-3) if dtype == F16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, full_out, **tol)
    torch.testing.assert_close(lse, full_lse, **tol)

"""GPU tests of the compiled CUDA kernels (csrc/cuda): their own tile sizes and paths.

The grid every backend passes (``test_ops``, including ``cuda``) covers pack/unpack,
merge, lost and out-of-range codes, empty inputs. Here the public ``astra_kernels.<op>``
functions run with the ``cuda`` backend forced, on CUDA tensors, over what the CUDA
kernels do differently: the bf16 tensor-core VQ path in place or padded, code tiles of
128, tensor-core head dims and the generic CUDA-core kernel, many key tiles,
misaligned views. Comparison rules and tolerances (flash-attention's: at most twice
PyTorch's own error at the input precision plus a small slack): :mod:`tests.oracles`.
Skipped without a CUDA device; failed when ``_C`` was built but does not load.
"""
import math

import pytest
import torch

import astra_kernels
from astra_kernels import reference
from tests._util import require_backend, requires_cuda
from tests.oracles import (
    assert_codes_agree,
    assert_codes_near_optimal,
    assert_vq_error,
    check_mixed_attention,
)

pytestmark = [pytest.mark.gpu, requires_cuda]

DEV = "cuda"
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@pytest.fixture(autouse=True)
def _cuda_backend():
    """Serve every op on CUDA tensors with the compiled kernels."""
    require_backend("cuda", "cuda")
    with astra_kernels.use_backend("cuda", "cuda"):
        yield


# ---------------------------------------------------------------------------
# vq_encode
# ---------------------------------------------------------------------------
def _check_codes(x, cb, codes, precision, what=""):
    """Each code is the nearest codeword up to fp32-accumulation error."""
    return assert_codes_near_optimal(codes, x, cb, precision=precision, what=what)


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
    what = f"cuda vq_encode M={M} K={K} G={G} {xdtype} {precision}"
    _check_codes(x, cb, codes, precision, what)
    ref_codes, ref_err = reference.vq_encode(x, cb, precision, True)
    assert_codes_agree(codes, ref_codes, 0.98, what)
    # err is the exact squared distance to the chosen codewords, summed over groups.
    assert_vq_error(err, codes, x, cb, precision=precision, what=what)
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


# ---------------------------------------------------------------------------
# mixed_attention
# ---------------------------------------------------------------------------
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


def _check_attention(kw, what=""):
    """Run the kernel on ``kw`` and judge it by :func:`tests.oracles.check_mixed_attention`."""
    out, lse = astra_kernels.mixed_attention(**kw)
    check_mixed_attention((out, lse), **kw, what=f"cuda {what}")
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
    _check_attention(_case(dtype, d, **ATTN_CONFIGS[config]), f"{config} d={d}")


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
    check_mixed_attention((out, lse), **kw, what="cuda out-of-range codes")
    # bitwise the same as marking them -1
    expected = dict(kw, codes=torch.where((codes < 0) | (codes >= 10), -1, codes))
    exp_out, exp_lse = astra_kernels.mixed_attention(**expected)
    torch.testing.assert_close(out, exp_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, exp_lse, rtol=0, atol=0)


# RoPE on remote keys: the generic kernel serves every dtype (fp16/bf16 leave the
# tensor-core kernel); full and partial rotary, codes G = 1 / 2 with lost tokens, dense.
@pytest.mark.parametrize("remote,G", [("codes", 1), ("codes", 2), ("dense", 1)])
@pytest.mark.parametrize("d,R", [(64, 64), (64, 32), (128, 128), (128, 64)])
@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=["fp16", "bf16", "fp32"])
def test_mixed_attention_rope(dtype, d, R, remote, G):
    Tr = 70
    kw = _case(dtype, d, H=9, Hkv=3, remote=remote, G=G, K=10, Tr=Tr, missing=0.1,
               causal="interleaved")
    pos = (torch.arange(Tr) * 3 + 11 * torch.arange(2)[:, None]).double()
    ang = pos[..., None] / 10000 ** (torch.arange(0, R, 2).double() / R)
    ang = torch.cat([ang, ang], -1)
    kw.update(rope_cos=ang.cos().float().to(DEV), rope_sin=ang.sin().float().to(DEV))
    _check_attention(kw, f"rope d={d} R={R} {remote} G={G}")

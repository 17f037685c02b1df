"""Test oracles: every comparison rule of the kernel tests, written once.

Every backend's tests (``test_ops`` for the grid all backends share, ``test_cpu_kernels``,
``test_triton``, ``test_cuda`` for backend-specific paths) call these, so a tolerance
is decided here and nowhere else.

- **Attention** follows flash-attention's tests: ground truth is computed in float64
  from an independent formulation (remote K/V gathered from the tables in float64,
  then ``scaled_dot_product_attention`` with an explicit mask), and a kernel's error
  against it must be at most twice PyTorch's own error at the input precision
  (:func:`astra_kernels.reference.mixed_attention` with ``upcast=False``) plus the
  slack of :data:`TOL`. Rows that see no key must be exactly 0 with ``lse = -inf``.
- **merge_attention**: the same rule against the float64 merge formula.
- **vq_encode**: the nearest codeword by direct squared differences in float64, ties
  to the lowest index (:func:`nearest_codes`); checked exactly
  (:func:`assert_codes_exact`) or up to fp32 accumulation error
  (:func:`assert_codes_near_optimal`, for kernels that do not re-rank near-ties and
  for ``precision="bf16"``, whose operands are rounded to bf16 first).

Failure messages print the kernel's error beside the reference's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import pytest
import torch
import torch.nn.functional as F

from astra_kernels import reference

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = (F32, F16, BF16)


# ----------------------------------------------------------------------------- tolerances

@dataclass(frozen=True)
class Tol:
    """Tolerances for one input dtype.

    ``out`` and ``lse`` (float32 in every dtype) are the absolute slack added to twice
    PyTorch's own error (:func:`assert_within_2x`): a floor for outputs whose
    same-precision reference happens to be nearly exact, the strictest of the slacks
    the backend test files used before they shared this table. Rounding to a 16-bit
    output dtype is covered by the 2x term: the reference rounds its output too.
    ``rtol``/``atol`` compare two kernel runs of the same computation (two paths,
    layouts, configs) elementwise.
    """

    out: float
    lse: float
    rtol: float
    atol: float

    @property
    def close(self) -> dict:
        """``rtol``/``atol`` for :func:`torch.testing.assert_close` of two kernel runs."""
        return dict(rtol=self.rtol, atol=self.atol)


TOL = {
    F32: Tol(out=1e-5, lse=1e-5, rtol=1e-5, atol=1e-5),
    F16: Tol(out=2.0 ** -11, lse=1e-3, rtol=2e-3, atol=2e-3),
    BF16: Tol(out=1e-3, lse=1e-2, rtol=2e-2, atol=2e-2),
}


def interpreter_ulps(dtype: torch.dtype, interpreted: bool) -> float:
    """Extra output slack, in ulps, for Triton's CPU interpreter: it converts float32
    to bfloat16 by truncation (round toward zero), up to one ulp where a GPU rounds to
    nearest (half an ulp). 0 everywhere else."""
    return 1.0 if interpreted and dtype == BF16 else 0.0


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def ulp(magnitude: float, dtype: torch.dtype) -> float:
    """The spacing of ``dtype`` numbers at ``magnitude`` (one unit in the last place)."""
    if magnitude <= 0:
        return 0.0
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(magnitude))


# ----------------------------------------------------------------------------- the 2x rule

def max_abs_err(got: torch.Tensor, truth: torch.Tensor) -> float:
    """``max |got - truth|`` in float64 (0 for empty tensors)."""
    if got.numel() == 0:
        return 0.0
    return (got.detach().double().cpu() - truth.detach().double().cpu()).abs().max().item()


def assert_within_2x(got: torch.Tensor, truth: torch.Tensor, same_precision: torch.Tensor,
                     atol: float, what: str = "") -> Tuple[float, float]:
    """The one comparison rule: the kernel's error against ``truth`` is at most twice the
    error of PyTorch's own computation at the same precision (``same_precision``) plus
    ``atol``. Errors are max-abs over the tensor. Returns ``(err, ref_err)``."""
    assert got.shape == truth.shape, f"{what}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    err = max_abs_err(got, truth)
    ref_err = max_abs_err(same_precision, truth)
    assert err <= 2 * ref_err + atol, (
        f"{what}: kernel error {err:.3g} > 2 x PyTorch's own error {ref_err:.3g} "
        f"+ {atol:.3g} (bound {2 * ref_err + atol:.3g})")
    return err, ref_err


# ----------------------------------------------------------------------------- attention

def _filled_positions(q, k, causal, q_pos, kv_pos, remote_pos, Tr):
    """Positions as :func:`astra_kernels.mixed_attention` fills them in."""
    if not causal:
        return None, None, None
    dev = q.device
    if q_pos is None:
        q_pos = torch.arange(q.shape[2], device=dev)
    if kv_pos is None:
        kv_pos = torch.arange(k.shape[2], device=dev)
    if remote_pos is None:
        assert Tr == 0, "causal attention with remote tokens needs remote_pos"
        remote_pos = torch.zeros(0, dtype=torch.int64, device=dev)
    return q_pos, kv_pos, remote_pos


def remote_kv64(codes: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor):
    """Remote K/V in float64: ``k[b, :, j] = sum_g pk[g, codes[b, j, g]]``, and which
    tokens are missing (a code of -1, or any code outside ``[0, K)``, in some group).
    Returns ``(k, v [B, Hkv, Tr, d] float64 on codes' device, missing [B, Tr])``."""
    B, Tr, G = codes.shape
    K = pk.shape[1]
    missing = ((codes < 0) | (codes >= K)).any(-1)
    safe = codes.clamp(0, K - 1).long()
    rk = sum(pk[g].double()[safe[:, :, g]] for g in range(G))  # [B, Tr, Hkv, d]
    rv = sum(pv[g].double()[safe[:, :, g]] for g in range(G))
    keep = (~missing).to(torch.float64)[:, :, None, None]
    return (rk * keep).permute(0, 2, 1, 3), (rv * keep).permute(0, 2, 1, 3), missing


def rope_keys64(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """float64 RoPE of ``keys [B, Hkv, T, d]`` on their first ``R`` dims by HF's own
    ``apply_rotary_pos_emb`` (``cos, sin [B or 1, T, R]``, the layout HF's rotary
    modules return); dims ``R..d`` pass through, as HF's partial-rotary models do."""
    try:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    except ImportError:  # HF's formula, verbatim
        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
            def rotate_half(x):
                x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
                return torch.cat((-x2, x1), dim=-1)
            cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
            return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    R = cos.shape[-1]
    k = keys.double()
    k_rot, _ = apply_rotary_pos_emb(k[..., :R], k[..., :R], cos.double().to(k.device),
                                    sin.double().to(k.device))
    return torch.cat([k_rot, k[..., R:]], dim=-1)


def attention_truth(q, k, v, codes=None, pk=None, pv=None, remote_k=None, remote_v=None,
                    causal=False, q_pos=None, kv_pos=None, remote_pos=None, scale=None,
                    rope_cos=None, rope_sin=None):
    """float64 ``(out, lse)`` of ``mixed_attention`` computed independently of the
    library: remote K/V built in float64 (remote keys rotated by HF's
    ``apply_rotary_pos_emb`` when ``rope_cos``/``rope_sin`` are given, see
    :func:`rope_keys64`), SDPA over all keys with an explicit mask.
    Arguments as :func:`astra_kernels.mixed_attention` (or its schema, positionally);
    computed on the inputs' device. Rows that see no key give 0 and ``-inf``."""
    B, H, Tq, d = q.shape
    Tl = k.shape[2]
    keys, vals = k.double(), v.double()
    missing = None
    if codes is not None:
        rk, rv, missing = remote_kv64(codes, pk, pv)
    elif remote_k is not None:
        rk, rv = remote_k.double(), remote_v.double()
    else:
        rk = rv = keys[:, :, :0]
    Tr = rk.shape[2]
    if rope_cos is not None and Tr:
        rk = rope_keys64(rk, rope_cos, rope_sin)
    keys, vals = torch.cat([keys, rk], 2), torch.cat([vals, rv], 2)
    visible = torch.ones(B, Tq, Tl + Tr, dtype=torch.bool, device=q.device)
    q_pos, kv_pos, remote_pos = _filled_positions(q, k, causal, q_pos, kv_pos, remote_pos, Tr)
    if causal:
        pos = torch.cat([kv_pos.long(), remote_pos.long()])
        visible &= pos[None, None, :] <= q_pos.long()[None, :, None]
    if missing is not None:
        visible[:, :, Tl:] &= ~missing[:, None, :]
    rep = H // k.shape[1]
    keys, vals = keys.repeat_interleave(rep, 1), vals.repeat_interleave(rep, 1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    mask = visible[:, None].expand(B, H, Tq, Tl + Tr)
    seen = mask.any(-1)
    scores = (q.double() @ keys.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    if keys.shape[2]:
        out = F.scaled_dot_product_attention(q.double(), keys, vals, attn_mask=mask,
                                             scale=scale)
    else:
        out = torch.zeros_like(q, dtype=torch.float64)
    out = torch.where(seen[..., None], out, torch.zeros_like(out))
    return out, lse


_ATTN_ARGS = ("q", "k", "v", "codes", "pk", "pv", "remote_k", "remote_v", "causal", "q_pos",
              "kv_pos", "remote_pos", "scale", "rope_cos", "rope_sin")


def attention_inputs(*args, **kwargs) -> dict:
    """``mixed_attention`` arguments (schema order, or by name) as one dict."""
    assert len(args) <= len(_ATTN_ARGS), f"too many positional arguments: {len(args)}"
    inputs = dict(zip(_ATTN_ARGS, args))
    inputs.update(kwargs)
    return inputs


def check_mixed_attention(got: Tuple[torch.Tensor, torch.Tensor], *args, what: str = "",
                          out_ulps: float = 0, **kwargs) -> None:
    """``got = (out, lse)`` of ``mixed_attention`` on the given arguments (schema order or
    by name, as for :func:`astra_kernels.mixed_attention`): dtypes and shapes, rows that
    see no key exactly 0 / ``-inf``, no NaN, and out and lse within twice PyTorch's own
    error at the input precision (:func:`assert_within_2x`) plus :data:`TOL`.
    ``out_ulps`` adds that many ulps of the largest output (:func:`interpreter_ulps`)."""
    inp = attention_inputs(*args, **kwargs)
    out, lse = got
    q = inp["q"]
    dtype = q.dtype
    what = f"{what} [{_dtype_name(dtype)}]"
    assert out.dtype == dtype and out.shape == q.shape, \
        f"{what}: out is {_dtype_name(out.dtype)} {tuple(out.shape)}, want {tuple(q.shape)}"
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3], \
        f"{what}: lse is {_dtype_name(lse.dtype)} {tuple(lse.shape)}, want {tuple(q.shape[:3])}"
    truth_out, truth_lse = attention_truth(**inp)
    truth_out, truth_lse = truth_out.cpu(), truth_lse.cpu()
    Tr = 0
    if inp.get("codes") is not None:
        Tr = inp["codes"].shape[1]
    elif inp.get("remote_k") is not None:
        Tr = inp["remote_k"].shape[2]
    qp, kp, rp = _filled_positions(q, inp["k"], inp.get("causal", False), inp.get("q_pos"),
                                   inp.get("kv_pos"), inp.get("remote_pos"), Tr)
    ref_inp = dict(inp, q_pos=qp, kv_pos=kp, remote_pos=rp)
    same_out, same_lse = reference.mixed_attention(**ref_inp, upcast=False)
    out, lse = out.detach().cpu(), lse.detach().cpu()
    same_out, same_lse = same_out.cpu(), same_lse.cpu()

    empty = torch.isneginf(truth_lse)
    assert not out.isnan().any() and not lse.isnan().any(), f"{what}: NaN in out or lse"
    assert not torch.isposinf(lse).any(), f"{what}: lse = +inf"
    wrong = torch.isneginf(lse) != empty
    assert not wrong.any(), (f"{what}: {int(wrong.sum())} rows disagree on seeing no key "
                             f"(lse = -inf), first at {wrong.nonzero()[0].tolist()}")
    assert (out[empty] == 0).all(), f"{what}: rows that see no key must be exactly 0"
    tol = TOL[dtype]
    slack = tol.out + out_ulps * ulp(truth_out.abs().max().item() if out.numel() else 0, dtype)
    assert_within_2x(out, truth_out, same_out, slack, f"{what} out")
    ok = ~empty
    if ok.any():
        assert_within_2x(lse[ok], truth_lse[ok], same_lse[ok], tol.lse, f"{what} lse")


def merge_truth(out_a, lse_a, out_b, lse_b):
    """float64 ``(out, lse)`` of merging two partial attentions (both empty: 0, -inf)."""
    oa, ob = out_a.double(), out_b.double()
    la, lb = lse_a.double(), lse_b.double()
    lse = torch.logaddexp(la, lb)
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    out = torch.exp(la - safe)[..., None] * oa + torch.exp(lb - safe)[..., None] * ob
    return out, lse


def check_merge_attention(got, out_a, lse_a, out_b, lse_b, what: str = "",
                          out_ulps: float = 0) -> None:
    """``got = (out, lse)`` of ``merge_attention``: within twice the error of the
    reference merge (float32 arithmetic, rounded to the output dtype) plus :data:`TOL`
    (and ``out_ulps``) of the float64 formula, and elementwise within rounding of the
    reference; rows empty on both sides exactly 0 / ``-inf``."""
    out, lse = (t.detach().cpu() for t in got)
    dtype = out_a.dtype
    what = f"{what} [{_dtype_name(dtype)}]"
    assert out.dtype == dtype and out.shape == out_a.shape, what
    assert lse.dtype == torch.float32 and lse.shape == lse_a.shape, what
    args = [t.detach().cpu() for t in (out_a, lse_a, out_b, lse_b)]
    truth_out, truth_lse = merge_truth(*args)
    same_out, same_lse = reference.merge_attention(*args)
    empty = torch.isneginf(truth_lse)
    assert torch.equal(torch.isneginf(lse), empty), f"{what}: rows empty on both sides differ"
    assert (out[empty] == 0).all(), f"{what}: rows empty on both sides must be exactly 0"
    assert not out.isnan().any() and not lse.isnan().any(), f"{what}: NaN"
    tol = TOL[dtype]
    slack = tol.out + out_ulps * ulp(truth_out.abs().max().item() if out.numel() else 0, dtype)
    assert_within_2x(out, truth_out, same_out, slack, f"{what} out")
    ok = ~empty
    assert_within_2x(lse[ok], truth_lse[ok], same_lse[ok], tol.lse, f"{what} lse")
    # one fp32 formula rounded once to the output dtype: elementwise within rounding
    # of the reference too (torch's default tolerances per dtype)
    torch.testing.assert_close(out, same_out, msg=lambda m: f"{what}: out vs reference\n{m}")
    torch.testing.assert_close(lse[ok], same_lse[ok],
                               msg=lambda m: f"{what}: lse vs reference\n{m}")


# ----------------------------------------------------------------------------- vq_encode

# Near-tie slack of fp32 distance arithmetic, per dim of a group and unit of
# ||x||^2 + ||c||^2 (about 8 float32 ulps per summed dim).
NEAR_TIE = 1e-6
_VQ_CHUNK_ELEMS = 1 << 22  # rows x G x K distances computed at once


def _vq_operands(x: torch.Tensor, cb: torch.Tensor, precision: str):
    G, K, dg = cb.shape
    xs = x.detach().reshape(-1, G, dg)
    c = cb.detach()
    if precision == "bf16":  # the operands the bf16 fast paths multiply
        xs, c = xs.to(torch.bfloat16), c.to(torch.bfloat16)
    return xs.double(), c.to(xs.device).double()


def codeword_distances(x: torch.Tensor, cb: torch.Tensor, precision: str = "fp32"):
    """Squared distances ``[M, G, K]`` (float64, computed on x's device, returned on
    the CPU) of ``x [M, D]`` to every codeword of ``cb [G, K, D/G]``; with
    ``precision="bf16"`` both operands are rounded to bf16 first. Every distance within
    1e-9 (relative) of its row's minimum is the exact direct sum of squared
    differences, so equal codewords give equal distances and ``argmin`` finds the
    lowest index among ties; the rest come from the float64 expanded form (far below
    any fp32 rounding)."""
    G, K, dg = cb.shape
    xs, c = _vq_operands(x, cb, precision)
    M = xs.shape[0]
    xn = (xs * xs).sum(-1)                                   # [M, G]
    cn = (c * c).sum(-1)                                     # [G, K]
    dist = torch.empty(M, G, K, dtype=torch.float64, device=xs.device)
    rows = max(1, _VQ_CHUNK_ELEMS // max(1, G * K))
    for s in range(0, M, rows):
        xc = xs[s:s + rows]
        dist[s:s + rows] = (xn[s:s + rows, :, None] + cn[None]
                            - 2.0 * torch.einsum("mgd,gkd->mgk", xc, c))
    if M and K:
        margin = 1e-9 * (xn[..., None] + cn[None]) + 1e-300
        near = dist <= dist.min(-1, keepdim=True).values + margin
        m, g, k = near.nonzero(as_tuple=True)
        diff = xs[m, g] - c[g, k]
        dist[m, g, k] = (diff * diff).sum(-1)
    return dist.cpu()


def nearest_codes(x: torch.Tensor, cb: torch.Tensor, precision: str = "fp32"):
    """``(codes int32 [M, G], dist float64 [M, G, K])``: the nearest codeword of each
    group by :func:`codeword_distances`, ties to the lowest index."""
    dist = codeword_distances(x, cb, precision)
    return dist.argmin(-1).to(torch.int32), dist  # argmin returns the first minimum


def _vq_check_shape(codes, x, cb, what):
    G, K, _ = cb.shape
    assert codes.dtype == torch.int32, f"{what}: codes are {_dtype_name(codes.dtype)}"
    assert codes.shape == (x.shape[0], G), \
        f"{what}: codes shape {tuple(codes.shape)}, want {(x.shape[0], G)}"
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        assert 0 <= lo and hi < K, f"{what}: codes in [{lo}, {hi}], outside [0, {K})"


def assert_codes_exact(codes: torch.Tensor, x: torch.Tensor, cb: torch.Tensor,
                       precision: str = "fp32", what: str = "") -> torch.Tensor:
    """``codes`` equal the exact nearest codewords (float64, ties to the lowest index).
    Returns the float64 distances ``[M, G, K]``."""
    _vq_check_shape(codes, x, cb, what)
    want, dist = nearest_codes(x, cb, precision)
    codes = codes.cpu()
    bad = (codes != want).any(1).nonzero().flatten()[:5].tolist()
    if bad:
        rows = [(r, codes[r].tolist(), want[r].tolist(),
                 [f"{dist[r, g, int(codes[r, g])] - dist[r, g, int(want[r, g])]:.3g}"
                  for g in range(codes.shape[1])]) for r in bad]
        n = int((codes != want).any(1).sum())
        raise AssertionError(f"{what}: {n} of {codes.shape[0]} rows are not the exact "
                             "nearest codewords (row, kernel, float64 argmin, distance "
                             f"gap per group): {rows}")
    return dist


def near_tie_slack(x: torch.Tensor, cb: torch.Tensor, dist: torch.Tensor,
                   codes: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """``[M, G]``: how far (squared distance) a chosen codeword may be from the nearest
    one through fp32 accumulation error alone: ``NEAR_TIE * dg * (||x||^2 +
    max(||c_chosen||^2, ||c_best||^2)) + 1e-6``."""
    G, K, dg = cb.shape
    xs, c = _vq_operands(x, cb, precision)
    xn = (xs * xs).sum(-1).cpu()                 # [M, G]
    cn = (c * c).sum(-1).cpu()                   # [G, K]
    best = dist.argmin(-1)
    cn_of = lambda idx: cn.gather(1, idx.long().t()).t()  # noqa: E731  [M, G]
    return NEAR_TIE * dg * (xn + torch.maximum(cn_of(codes), cn_of(best))) + 1e-6


def assert_codes_near_optimal(codes: torch.Tensor, x: torch.Tensor, cb: torch.Tensor,
                              precision: str = "fp32", what: str = "") -> torch.Tensor:
    """Each code is a nearest codeword up to fp32 accumulation error
    (:func:`near_tie_slack`): exact except at near-ties, where either side may win.
    ``precision="bf16"`` judges the bf16-rounded operands, as the fast paths multiply
    them. Returns the float64 distances of the chosen codewords ``[M, G]``."""
    _vq_check_shape(codes, x, cb, what)
    codes = codes.cpu()
    dist = codeword_distances(x, cb, precision)
    chosen = dist.gather(-1, codes.long().unsqueeze(-1)).squeeze(-1)
    gap = chosen - dist.min(-1).values
    slack = near_tie_slack(x, cb, dist, codes, precision)
    bad = gap > slack
    if bad.any():
        i = (gap - slack).flatten().argmax()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} codes are not nearest "
            f"({precision} operands); worst gap {gap.flatten()[i]:.3g} vs slack "
            f"{slack.flatten()[i]:.3g}")
    return chosen


def assert_vq_error(err: torch.Tensor, codes: torch.Tensor, x: torch.Tensor,
                    cb: torch.Tensor, precision: str = "fp32", what: str = "",
                    rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """``err`` (``return_error=True``) is the squared distance to the chosen codewords
    summed over groups, float32 ``[M]`` (of the bf16-rounded operands for bf16)."""
    assert err.dtype == torch.float32 and err.shape == (x.shape[0],), \
        f"{what}: err is {_dtype_name(err.dtype)} {tuple(err.shape)}, want float32 {(x.shape[0],)}"
    G, K, dg = cb.shape
    xs, c = _vq_operands(x, cb, precision)
    codes = codes.to(xs.device).long()
    chosen = torch.stack([c[g][codes[:, g]] for g in range(G)], 1)  # [M, G, dg]
    want = ((xs - chosen) ** 2).sum((1, 2)).cpu()
    torch.testing.assert_close(err.detach().cpu().double(), want, rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: err is not the chosen distance\n{m}")


def quantization_mse(codes: torch.Tensor, x: torch.Tensor, cb: torch.Tensor) -> float:
    """Summed exact squared error (float64, unrounded operands) of ``codes`` for ``x``."""
    dist = codeword_distances(x, cb, "fp32")
    return dist.gather(-1, codes.cpu().long().unsqueeze(-1)).sum().item()


def assert_codes_agree(codes: torch.Tensor, other: torch.Tensor, min_agree: float,
                       what: str = "") -> None:
    """At least ``min_agree`` of the codes equal ``other`` (another implementation or
    precision): bounds how often near-ties split where either side is correct."""
    agree = (codes.cpu() == other.cpu()).float().mean().item()
    assert agree >= min_agree, f"{what}: only {agree:.4f} of codes agree (want >= {min_agree})"


def assert_differ_only_at_ties(codes: torch.Tensor, other: torch.Tensor, x: torch.Tensor,
                               cb: torch.Tensor, rel: float = 1e-5, what: str = "") -> None:
    """Where ``codes`` and ``other`` (another implementation) differ, both codewords are
    equally near up to ``rel * (||x||^2 + ||c||^2)`` (float64): they split a tie."""
    codes, other = codes.cpu().long(), other.cpu().long()
    differ = codes != other
    if not differ.any():
        return
    xs, c = _vq_operands(x, cb, "fp32")
    xs, c = xs.cpu(), c.cpu()
    dist = codeword_distances(x, cb)
    d_a = dist.gather(-1, codes.unsqueeze(-1)).squeeze(-1)
    d_b = dist.gather(-1, other.unsqueeze(-1)).squeeze(-1)
    cn = (c * c).sum(-1)
    scale = (xs * xs).sum(-1) + cn.gather(1, codes.t()).t()
    gap = (d_a - d_b).abs()
    bad = differ & (gap > rel * scale)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {int(differ.sum())} differing codes "
                           f"are not ties; worst gap {gap[bad].max():.3g} vs "
                           f"{rel:g} x scale {scale[bad].max():.3g}")


def faiss_codes(x: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """faiss ``IndexFlatL2`` nearest codeword per group (int64 ``[M, G]``); skips the
    test when faiss is not installed."""
    faiss = pytest.importorskip("faiss")
    import numpy as np
    G, K, dg = cb.shape
    xc, cc = x.detach().float().cpu(), cb.detach().float().cpu()
    out = np.empty((xc.shape[0], G), dtype=np.int64)
    for g in range(G):
        index = faiss.IndexFlatL2(dg)
        index.add(cc[g].numpy())
        _, idx = index.search(np.ascontiguousarray(xc[:, g * dg:(g + 1) * dg].numpy()), 1)
        out[:, g] = idx[:, 0]
    return torch.from_numpy(out)

"""How remote tokens reach :func:`astra_kernels.mixed_attention`, and one chunk's call.

A remote token arrives as codes, whose keys and values the kernel gathers from the
layer's projected tables (:class:`CodeSource`), or as keys and values computed
beforehand (:class:`KVSource`: projected from ``X̂`` where a layer has no tables, or
exact where it has no codebook). :func:`chunk_kernel` runs one chunk's queries against
its local keys and a remote source.

RoPE models: queries and local keys arrive rotated; a remote token's key is rotated at
its global position (:class:`Rope`: the model's own cos/sin). Keys from ``X̂`` are
rotated before they become a :class:`KVSource`; codes carry their cos/sin in the
:class:`CodeSource` and the kernel rotates the gathered keys (``rope_cos``/``rope_sin``
of :func:`astra_kernels.mixed_attention`) once :data:`ROPE_IN_KERNEL` is on.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

import astra_kernels

__all__ = ["CodeSource", "KVSource", "RemoteSource", "Rope", "chunk_kernel", "chunk_torch",
           "ROPE_IN_KERNEL",
           "ProjectedTables", "KernelTables", "affine_tables", "kv_tables", "fold_stages"]

# Whether the kernels rotate remote keys gathered from the projected tables (the
# ``rope_cos``/``rope_sin`` arguments of ``mixed_attention``). Off: RoPE layers hand the
# kernels remote keys projected from X̂ and rotated beforehand (a KVSource); on: codes
# and tables (a CodeSource with its cos/sin), and the overlapped distributed path.
ROPE_IN_KERNEL = True


class ProjectedTables(NamedTuple):
    """Each codeword through W_k / W_v: ``pk, pv [G, K, Hkv, d]`` (biases in group 0)."""

    pk: Tensor
    pv: Tensor


class KernelTables(NamedTuple):
    """The tables the kernels gather from and the code columns they read (None: all)."""

    cols: Optional[List[int]]
    pk: Tensor
    pv: Tensor


def affine_tables(codebook: Tensor, stage_sizes: Optional[Sequence[int]],
                  aff: Tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]],
                  hkv: int, d: int) -> ProjectedTables:
    """Codeword g of ``codebook [G, K, D/G]`` through the matching rows of
    ``aff = (W_k, b_k, W_v, b_v)`` (``[Hkv*d, D]``), biases folded into group 0; a
    residual codebook (``stage_sizes``) has every stage span all of D."""
    G, K, dg = codebook.shape
    cb = codebook.float()
    Wk, bk, Wv, bv = aff
    tabs = []
    for W, b in ((Wk, bk), (Wv, bv)):
        if stage_sizes is not None:
            t = torch.einsum("gkc,oc->gko", cb, W.float())
        else:
            t = torch.einsum("gkc,ogc->gko", cb, W.float().reshape(W.shape[0], G, dg))
        if b is not None:
            t[0] += b.float()
        tabs.append(t.reshape(G, K, hkv, d).to(W.dtype))
    return ProjectedTables(tabs[0], tabs[1])


def kv_tables(codebook: Tensor, stage_sizes: Optional[Sequence[int]], hkv: int,
              d: int) -> ProjectedTables:
    """The tables of a ``"kv"`` codebook ``[G, K, 2·Hkv·d/G]``: a codeword is (a slice
    of) ``[k; v]``, so group g's row is its codeword placed at the group's dims of that
    vector, split into the key half and the value half (zeros outside the group); a
    residual codebook (``stage_sizes``) has every stage span the whole vector."""
    G, K, dg = codebook.shape
    full = codebook
    if stage_sizes is None and G > 1:
        full = codebook.new_zeros(G, K, G * dg)
        for g in range(G):
            full[g, :, g * dg:(g + 1) * dg] = codebook[g]
    half = hkv * d
    return ProjectedTables(full[..., :half].reshape(G, K, hkv, d).contiguous(),
                           full[..., half:].reshape(G, K, hkv, d).contiguous())


def fold_stages(tabs: ProjectedTables, stage_sizes: Optional[Sequence[int]]) -> KernelTables:
    """Every residual stage of size 1 folded into stage 0's table (its code is always 0,
    so its row is a constant offset); ``cols`` the code columns that remain."""
    st = stage_sizes
    if st is None or all(k > 1 for k in st[1:]):
        return KernelTables(None, tabs.pk, tabs.pv)
    cols = [0] + [i for i in range(1, len(st)) if st[i] > 1]
    fixed = [i for i in range(1, len(st)) if st[i] == 1]
    out = []
    for t in tabs:
        f = t[cols].float()
        f[0] += t[fixed, 0].float().sum(0)
        out.append(f.to(t.dtype))
    return KernelTables(cols, out[0], out[1])


class Rope(NamedTuple):
    """Rotary cos/sin of some tokens, ``[B|1, T, R]`` each (HF layout)."""

    cos: Tensor
    sin: Tensor

    def take(self, idx: Tensor) -> "Rope":
        """The tokens ``idx`` only."""
        return Rope(self.cos[:, idx], self.sin[:, idx])


class CodeSource(NamedTuple):
    """Remote tokens as codes ``[B, Tr, G]`` (-1: missing); the kernel gathers their keys
    and values from the tables ``pk``/``pv`` (and rotates the keys by ``rope``)."""

    codes: Tensor
    pk: Tensor
    pv: Tensor
    rope: Optional[Rope] = None

    def take(self, idx: Tensor) -> "CodeSource":
        """The tokens ``idx`` only."""
        return self._replace(codes=self.codes[:, idx],
                             rope=None if self.rope is None else self.rope.take(idx))

    def row(self, b: int) -> "CodeSource":
        """Batch row ``b`` only."""
        r = self.rope
        if r is not None and r.cos.shape[0] > 1:
            r = Rope(r.cos[b:b + 1], r.sin[b:b + 1])
        return self._replace(codes=self.codes[b:b + 1], rope=r)

    def kwargs(self) -> dict:
        """The kernel's ``rope_cos``/``rope_sin`` (empty without rope)."""
        r = self.rope
        return {} if r is None else dict(rope_cos=r.cos, rope_sin=r.sin)


class KVSource(NamedTuple):
    """Remote tokens as keys and values ``[B, Hkv, Tr, d]`` (projected from X̂ or exact)."""

    k: Tensor
    v: Tensor

    def take(self, idx: Tensor) -> "KVSource":
        """The tokens ``idx`` only."""
        return KVSource(self.k[:, :, idx], self.v[:, :, idx])


RemoteSource = Union[CodeSource, KVSource]


def chunk_kernel(q, k, v, remote: Optional[RemoteSource], lvalid, rvalid, causal, qpos, rpos,
                 scale) -> Tensor:
    """One chunk through :func:`astra_kernels.mixed_attention`; ``[B, H, Tq, d]``.

    ``remote`` is None, a :class:`CodeSource` or a :class:`KVSource`.
    Padding: padded remote tokens get code -1 (or are dropped); local key padding has
    no kernel argument, so a batch row with padded local keys runs alone with those
    keys dropped.
    """
    kw = dict(causal=causal, scale=scale)

    def call(qb, kb, vb, rem, kvpos, rp):
        extra = dict(kw)
        if causal:
            extra.update(q_pos=qpos, kv_pos=kvpos, remote_pos=rp)
        if rem is None:
            return astra_kernels.mixed_attention(qb, kb, vb, **extra)[0]
        if isinstance(rem, CodeSource):
            return astra_kernels.mixed_attention(qb, kb, vb, rem.codes, rem.pk, rem.pv,
                                                 **rem.kwargs(), **extra)[0]
        return astra_kernels.mixed_attention(qb, kb, vb, remote_k=rem.k, remote_v=rem.v,
                                             **extra)[0]

    if isinstance(remote, CodeSource) and rvalid is not None:
        remote = remote._replace(codes=remote.codes.masked_fill(~rvalid.unsqueeze(-1), -1))
        rvalid_kv = None
    else:
        rvalid_kv = rvalid
    if (lvalid is None or bool(lvalid.all())) and (rvalid_kv is None or bool(rvalid_kv.all())):
        return call(q, k, v, remote, qpos, rpos)
    outs = []
    for b in range(q.shape[0]):
        lv = lvalid[b] if lvalid is not None else slice(None)
        rem, rp = None, rpos
        if isinstance(remote, CodeSource):
            rem = remote.row(b)
        elif remote is not None:
            rv = rvalid_kv[b] if rvalid_kv is not None else slice(None)
            rem = KVSource(remote.k[b:b + 1, :, rv], remote.v[b:b + 1, :, rv])
            rp = rpos[rv]
        outs.append(call(q[b:b + 1], k[b:b + 1, :, lv], v[b:b + 1, :, lv], rem, qpos[lv], rp))
    return torch.cat(outs, dim=0)


def chunk_torch(q, k, v, kr, vr, bias, rvalid, causal, qpos, rpos, scale: float,
                dropout: float = 0.0) -> Tensor:
    """One chunk in plain differentiable torch: queries ``q [B, H, Tq, d]`` against the
    local keys ``k, v`` (at the queries' positions ``qpos``; ``bias`` added to their
    scores) and the remote ``kr, vr [B, Hkv, Tr, d]`` (positions ``rpos``, ``rvalid``
    the real ones); ``[B, H, Tq, d]``. ``dropout``: attention dropout (training)."""
    rep = q.shape[1] // k.shape[1]
    keys = torch.cat([k, kr], dim=2)
    vals = torch.cat([v, vr], dim=2)
    if rep > 1:
        keys, vals = keys.repeat_interleave(rep, dim=1), vals.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
    Tl = k.shape[2]
    B, H, Tq, Tk = scores.shape
    add = torch.zeros(B, 1, Tq, Tk, dtype=scores.dtype, device=scores.device)
    if bias is not None:
        add[..., :Tl] = add[..., :Tl] + bias
    scores = scores + add
    visible = torch.ones(B, 1, Tq, Tk, dtype=torch.bool, device=q.device)
    if rvalid is not None:
        visible[..., Tl:] &= rvalid[:, None, None, :]
    if causal:
        kpos = torch.cat([qpos, rpos])
        visible &= (kpos.unsqueeze(0) <= qpos.unsqueeze(1))
    scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout > 0:
        p = torch.nn.functional.dropout(p, dropout, training=True)
    return torch.matmul(p, vals)

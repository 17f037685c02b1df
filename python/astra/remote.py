"""How remote tokens reach :func:`astra_kernels.mixed_attention`, and one chunk's call.

A remote token arrives as codes, whose keys and values the kernel gathers from the
layer's projected tables (:class:`CodeSource`), or as keys and values computed
beforehand (:class:`KVSource`: projected from ``X̂`` where a layer has no tables, or
exact where it has no codebook). :func:`chunk_kernel` runs one chunk's queries against
its local keys and a remote source.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

import astra_kernels

__all__ = ["CodeSource", "KVSource", "RemoteSource", "chunk_kernel"]


class CodeSource(NamedTuple):
    """Remote tokens as codes ``[B, Tr, G]`` (-1: missing); the kernel gathers their keys
    and values from the tables ``pk``/``pv``."""

    codes: Tensor
    pk: Tensor
    pv: Tensor

    def take(self, idx: Tensor) -> "CodeSource":
        """The tokens ``idx`` only."""
        return self._replace(codes=self.codes[:, idx])


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
                                                 **extra)[0]
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
            rem = remote._replace(codes=remote.codes[b:b + 1])
        elif remote is not None:
            rv = rvalid_kv[b] if rvalid_kv is not None else slice(None)
            rem = KVSource(remote.k[b:b + 1, :, rv], remote.v[b:b + 1, :, rv])
            rp = rpos[rv]
        outs.append(call(q[b:b + 1], k[b:b + 1, :, lv], v[b:b + 1, :, lv], rem, qpos[lv], rp))
    return torch.cat(outs, dim=0)

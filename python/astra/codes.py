"""The codebook side of :class:`astra.AstraAttention`: what a layer sends for its tokens
and how received codes become keys and values.

A layer's codebook quantizes its :attr:`~LayerCodes.target`: the attention input X
(``"x"``), whose codewords reach keys and values through W_k / W_v, or each token's
pre-RoPE key and value ``[k; v]`` (``"kv"``), whose codewords are keys and values. Both
give the kernels the same thing: per code group a table of keys and one of values
(:meth:`LayerCodes.projected_tables`), gathered by code and summed over groups.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

import astra_kernels

from . import remote as _remote
from .remote import CodeSource, KernelTables, ProjectedTables, Rope

__all__ = ["LayerCodes", "TABLE_BUDGET_ELEMS"]

# Projected tables pk/pv (2·G·K·Hkv·d elements) are built and cached per layer when
# they fit this budget; larger ones are not built: the kernel path then gets remote
# K/V projected from X̂ instead (the "plain path" of DESIGN.md).
TABLE_BUDGET_ELEMS = 1 << 24


class LayerCodes:
    """Mixin of :class:`astra.AstraAttention`: encoding, decoding and the tables of one
    layer's codebook. Reads the module's ``codebook``, ``stage_sizes``, ``target``,
    ``num_kv_heads``, ``head_dim`` and its family's ``project_kv`` / ``kv_affine``;
    caches the tables in ``_tables`` / ``_tables_key`` / ``_folded``."""
    def kv_vector(self, k: Tensor, v: Tensor) -> Tensor:
        """``k, v [B, Hkv, T, d]`` -> ``[k; v] [B, T, 2·Hkv·d]`` (heads side by side)."""
        B, _, T, _ = k.shape
        return torch.cat([k.transpose(1, 2).reshape(B, T, -1),
                          v.transpose(1, 2).reshape(B, T, -1)], dim=-1)

    def split_kv(self, u: Tensor) -> Tuple[Tensor, Tensor]:
        """The inverse of :meth:`kv_vector`: ``[B, T, 2·Hkv·d]`` -> ``k, v [B, Hkv, T, d]``."""
        B, T, _ = u.shape
        k, v = u.view(B, T, 2, self.num_kv_heads, self.head_dim).unbind(2)
        return k.transpose(1, 2), v.transpose(1, 2)

    def quant_input(self, x: Tensor, kv: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        """What the codebook quantizes for the attention input ``x [B, T, D]``: ``x``
        itself, or (``"kv"`` codebooks) ``[k; v]`` of its pre-RoPE keys and values
        (``kv``: those already projected, else projected here)."""
        if self.target == "x":
            return x
        k, v = self.project_kv(x) if kv is None else kv
        return self.kv_vector(k, v)

    def encode(self, x: Tensor, kv: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        """Codes ``int32 [..., G]`` of the attention input ``x [..., D]`` (``"kv"``
        codebooks: of its keys and values, ``kv`` if already projected)."""
        return self.vq(self.quant_input(x, kv))

    def vq(self, u: Tensor) -> Tensor:
        """Codes ``int32 [..., G]`` of vectors ``u`` in the codebook's own space (X, or
        ``[k; v]``): the nearest codeword per group, or per residual stage."""
        if self.stage_sizes is not None:
            cb = self.codebook.detach()
            r = u.detach().float()
            codes = []
            for s, k in enumerate(self.stage_sizes):  # each stage codes the residual left
                c = astra_kernels.vq_encode(r, cb[s:s + 1, :k])
                r = r - cb[s, c[..., 0].long()]
                codes.append(c)
            return torch.cat(codes, dim=-1)
        return astra_kernels.vq_encode(u.detach(), self.codebook)

    def remote_kv(self, xq: Tensor) -> Tuple[Tensor, Tensor]:
        """Pre-RoPE keys and values ``[B, Hkv, T, d]`` of remote tokens from what
        :meth:`dequantize` (or the link, without a codebook) gave: ``X̂`` through
        W_k / W_v, or the halves of ``[k; v]`` for ``"kv"`` codebooks."""
        if self.codebook is not None and self.target == "kv":
            return self.split_kv(xq)
        return self.project_kv(xq)

    def dequantize(self, codes: Tensor, dtype: torch.dtype) -> Tensor:
        """``X̂ [..., D]`` (``"kv"``: ``[k; v]``) from codes (differentiable in the
        codebook; -1 reads codeword 0: callers mask those tokens)."""
        cb = self.codebook
        G, K, dg = cb.shape
        safe = codes.long().clamp(0, K - 1)
        xq = cb[torch.arange(G, device=cb.device), safe]  # [..., G, dg]
        if self.stage_sizes is not None:
            return xq.sum(-2).to(dtype)
        return xq.reshape(*codes.shape[:-1], G * dg).to(dtype)

    def projected_tables(self) -> Optional[ProjectedTables]:
        """``(pk, pv) [G, K, Hkv, d]``: codeword g of the codebook through the matching
        rows of W_k / W_v, biases folded into group 0; cached until the weights or the
        codebook change. A key map that is not affine (e.g. a key norm) gets exact tables
        only with one group and one stage (a remote token is then one codeword: its row
        is the codeword's key). ``"kv"`` codebooks: the codewords' own key and value
        halves (no projection, no bias). None when there is no codebook, no exact table,
        or the tables exceed :data:`TABLE_BUDGET_ELEMS`."""
        if self.codebook is None:
            return None
        kv = self.target == "kv"
        aff = None if kv else self.kv_affine()
        G, K, dg = self.codebook.shape
        whole = aff is None and G == 1 and self.stage_sizes is None
        if (aff is None and not whole and not kv) or \
                2 * G * K * self.num_kv_heads * self.head_dim > TABLE_BUDGET_ELEMS:
            return None
        deps = [t for t in (aff or ([self._ref_param()] if kv else self.parameters()))
                if t is not None]
        key = (self.codebook.data_ptr(), self.codebook._version, self.stage_sizes,
               tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in deps))
        if self._tables_key == key:
            return self._tables
        with torch.no_grad():
            if kv:  # a codeword is a key and a value already
                tabs = _remote.kv_tables(self.codebook, self.stage_sizes, self.num_kv_heads,
                                         self.head_dim)
                tabs = ProjectedTables(*(t.to(self._ref_param().dtype) for t in tabs))
            elif whole:  # each codeword through the module's own key/value map
                ref = self._ref_param()
                k, v = self.project_kv(self.codebook.to(ref.dtype))  # [1, Hkv, K, d]
                tabs = ProjectedTables(k.transpose(1, 2), v.transpose(1, 2))
            else:
                tabs = _remote.affine_tables(self.codebook, self.stage_sizes, aff,
                                             self.num_kv_heads, self.head_dim)
        self._tables, self._tables_key = tabs, key
        self._folded = None
        return self._tables

    def kernel_tables(self) -> Optional[KernelTables]:
        """``(cols, pk, pv)`` for the kernels: :meth:`projected_tables` with every
        residual stage of size 1 folded into stage 0's table (its code is always 0, so
        its row is a constant offset), ``cols`` the code columns that remain (None: all).
        Layers given more stages elsewhere (per-layer budgets) then run as G=1 again,
        which keeps the kernels' codebook-space path. None where
        :meth:`projected_tables` is None."""
        tabs = self.projected_tables()
        if tabs is None:
            return None
        if self._folded is None:
            self._folded = _remote.fold_stages(tabs, self.stage_sizes)
        return self._folded

    def _code_source(self, codes: Tensor, dtype: torch.dtype,
                     rope: Optional[Rope] = None) -> Optional[CodeSource]:
        """``codes`` for the kernels (the columns that :meth:`kernel_tables` keeps) with
        their tables (and the remote tokens' cos/sin), or None without tables or when
        the kernels do not rotate remote keys (:data:`astra.remote.ROPE_IN_KERNEL`)."""
        if rope is not None and not _remote.ROPE_IN_KERNEL:
            return None
        kt = self.kernel_tables()
        if kt is None:
            return None
        return CodeSource(codes if kt.cols is None else codes[..., kt.cols],
                          kt.pk.to(dtype), kt.pv.to(dtype), rope)

"""Generation after a (simulated or distributed) prefill: the device's KV cache.

After the prefill the device holding the last chunk has everything it needs to
generate alone: its own tokens' keys and values exactly, every earlier token as codes
(per layer), and it appends each new token's keys and values exactly. Nothing crosses
the link while it decodes.

:class:`AstraCache` is an HF :class:`~transformers.Cache` of such a device (one
:class:`AstraLayer` per layer), so ``model.generate(..., past_key_values=AstraCache())``
works with greedy decoding, sampling, stop strings and streamers as usual. A remote
token costs its codes only: ``G·ceil(log2 K)`` bits per layer, bit-packed
(:func:`astra_kernels.pack_codes`), unpacked at attention time, its key and value
gathered from the layer's projected tables and the key rotated at its position inside
the kernel (:func:`astra_kernels.mixed_attention`); never expanded to fp16 K/V.
Where a layer has no codes (no codebook: ``sp``, or no projected tables) its remote
keys and values are kept as tensors, and counted as such.

The attention module (:mod:`astra.attention`) calls :func:`record_simulated` /
:func:`record` while it prefills and :func:`attend_cached` once the cache holds the
layer's tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

import astra_kernels

from .remote import KVSource, Rope

__all__ = ["AstraCache", "AstraLayer", "greedy", "record", "record_simulated",
           "attend_cached", "attend_layer", "cache_kw"]


@dataclass
class PackedCodes:
    """Remote codes ``[B, Tr, G]`` bit-packed at ``bits`` per code (``payload`` uint8),
    or kept as int32 (``bits`` 0) where some are -1 (missing). ``sizes``: the columns'
    codebook sizes when they are packed as one mixed-radix number per token
    (``((c0 * K1) + c1) * K2 + ...``, ``ceil(log2(K0 * K1 * ...))`` bits: a 1,024-word
    stage and a 64-word one take 16 bits, not 2 x 10)."""

    payload: Tensor
    shape: tuple
    bits: int
    sizes: Optional[tuple] = None

    @classmethod
    def pack(cls, codes: Tensor, sizes) -> "PackedCodes":
        """``codes [B, Tr, G]``; ``sizes``: each column's codebook size (an int: all)."""
        G = codes.shape[-1]
        sizes = tuple(int(k) for k in (sizes if isinstance(sizes, (list, tuple)) else
                                       [sizes] * G))
        codes = codes.to(torch.int32).contiguous()
        if bool((codes < 0).any()):
            return cls(codes, tuple(codes.shape), 0)
        total = math.prod(sizes)
        if G > 1 and total <= 1 << 16:
            combined = codes[..., :1].to(torch.int64)
            for g in range(1, G):
                combined = combined * sizes[g] + codes[..., g:g + 1]
            bits = max(1, (total - 1).bit_length())
            return cls(astra_kernels.pack_codes(combined.to(torch.int32), bits),
                       tuple(codes.shape), bits, sizes)
        bits = max(1, (max(sizes) - 1).bit_length())
        if bits > 16:
            return cls(codes, tuple(codes.shape), 0)
        return cls(astra_kernels.pack_codes(codes, bits), tuple(codes.shape), bits)

    def unpack(self) -> Tensor:
        if self.bits == 0:
            return self.payload
        if self.sizes is None:
            return astra_kernels.unpack_codes(self.payload, list(self.shape), self.bits)
        rest = astra_kernels.unpack_codes(self.payload, [*self.shape[:-1], 1], self.bits)
        cols = []
        for k in reversed(self.sizes[1:]):
            cols.append(rest % k)
            rest = rest // k
        cols.append(rest)
        return torch.cat(cols[::-1], -1)

    @property
    def nbytes(self) -> int:
        return self.payload.numel() * self.payload.element_size()


class AstraLayer(DynamicLayer):
    """One layer of a device's cache: exact keys/values of its own tokens (the
    :class:`~transformers.cache_utils.DynamicLayer` part, positions ``pos``) and the
    remote tokens (positions ``remote_pos``) as packed codes, or as keys/values
    (``remote_kv``) where the layer has no codes."""

    # buffers grow in steps of this many rows (and at least double), so that a decode
    # step writes its token in place instead of copying the whole cache (torch.cat)
    ROWS = 256
    # the position of a row not written yet: after every query, so causal masking
    # hides it (and the kernels skip whole tiles of such rows)
    UNSET = torch.iinfo(torch.int64).max

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pos: Optional[Tensor] = None
        self.codes: Optional[PackedCodes] = None
        self.remote_kv: Optional[KVSource] = None
        self.remote_pos: Optional[Tensor] = None
        self.rope: Optional[Rope] = None
        self._buf: Optional[tuple] = None  # (keys, values [B, Hkv, cap, d], positions [cap])

    @property
    def n_remote(self) -> int:
        return 0 if self.remote_pos is None else int(self.remote_pos.numel())

    def get_seq_length(self) -> int:
        return super().get_seq_length() + self.n_remote

    def _n(self) -> int:
        return 0 if self.keys is None or self.keys.numel() == 0 else int(self.keys.shape[-2])

    def _buffered(self) -> bool:
        """Whether ``keys``/``values``/``pos`` are still the views of the buffers
        (HF's own methods, e.g. ``batch_select_indices``, replace them with copies)."""
        if self._buf is None or self.keys is None or self.pos is None:
            return False
        kb, vb, pb = self._buf
        n = self._n()
        return (self.keys.data_ptr() == kb.data_ptr() and self.values.data_ptr() == vb.data_ptr()
                and self.keys.shape == kb[:, :, :n].shape and self.pos.data_ptr() == pb.data_ptr()
                and self.pos.shape[0] == n)

    def _reserve(self, like: Tensor, extra: int) -> None:
        """Buffers with room for ``extra`` more rows, holding what the layer holds, and
        ``keys``/``values``/``pos`` as their views (``like``: a ``[B, Hkv, *, d]``
        tensor of the dtype and device to allocate)."""
        n = self._n()
        if self._buffered() and self._buf[0].shape[2] >= n + extra:
            return
        # at least ROWS rows of room after the request: a prefill's buffers take the
        # first decode steps without growing
        cap = -(-max(n + extra + self.ROWS, 2 * n) // self.ROWS) * self.ROWS
        B, Hkv, _, d = like.shape
        kb, vb = like.new_zeros(B, Hkv, cap, d), like.new_zeros(B, Hkv, cap, d)
        pb = torch.full((cap,), self.UNSET, dtype=torch.int64, device=like.device)
        if n:
            kb[:, :, :n], vb[:, :, :n] = self.keys, self.values
            pb[:n] = (self.pos[:n] if self.pos is not None
                      else torch.arange(n, device=like.device))
        self._buf = (kb, vb, pb)
        self.keys, self.values, self.pos = kb[:, :, :n], vb[:, :, :n], pb[:n]

    def append(self, k: Tensor, v: Tensor, pos: Tensor):
        """Add exact keys/values ``[B, Hkv, T, d]`` at positions ``pos [T]``; every
        local key/value. Written in place into buffers that grow geometrically; returns
        the layer's keys and values (views of them)."""
        if not self.is_initialized:
            self.lazy_initialization(k, v)
        n, T = self._n(), k.shape[2]
        self._reserve(k, T)
        kb, vb, pb = self._buf
        kb[:, :, n:n + T], vb[:, :, n:n + T], pb[n:n + T] = k, v, pos
        self.keys, self.values, self.pos = kb[:, :, :n + T], vb[:, :, :n + T], pb[:n + T]
        return self.keys, self.values

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        """HF's entry: append at the next positions (no remote tokens after them)."""
        n = self.get_seq_length()
        pos = torch.arange(n, n + key_states.shape[2], device=key_states.device)
        return self.append(key_states, value_states, pos)

    def buffers(self) -> tuple:
        """``(keys, values [B, Hkv, cap, d], positions [cap])``: the whole buffers, rows
        not written yet at position :attr:`UNSET` (hidden by causal masking). A kernel
        reads them without a copy, where ``keys``/``values`` views would need one."""
        self._reserve(self.keys, 0)
        return self._buf

    def reset(self) -> None:
        super().reset()
        self.pos = self.codes = self.remote_kv = self.remote_pos = self.rope = None
        self._buf = None

    def remote_bytes(self) -> int:
        """Bytes the remote tokens take in this layer (codes packed, or K/V tensors)."""
        if self.codes is not None:
            return self.codes.nbytes
        if self.remote_kv is not None:
            return sum(t.numel() * t.element_size() for t in self.remote_kv)
        return 0


class AstraCache(DynamicCache):
    """The KV cache of one device after an Astra prefill (see the module docstring):
    pass it as ``past_key_values`` to a model patched by :func:`astra.patch`."""

    def __init__(self):
        Cache.__init__(self, layer_class_to_replicate=AstraLayer)
        self._ropes = {}

    def layer(self, idx: int) -> AstraLayer:
        while len(self.layers) <= idx:
            self.layers.append(AstraLayer())
        return self.layers[idx]

    def shared_rope(self, m, x: Tensor, pos: Tensor) -> Optional[Rope]:
        """cos/sin at ``pos`` from ``m``'s rotary module, one copy for all layers (a
        function of the positions alone, like llama.cpp's rope cache)."""
        if m.rotary is None or pos.numel() == 0:
            return None
        key = (id(getattr(m.rotary, "__self__", m.rotary)), x.dtype,
               hash(pos.cpu().numpy().tobytes()))
        if key not in self._ropes:
            cos, sin = m.rotary(x, pos.unsqueeze(0))
            self._ropes[key] = Rope(cos.float().contiguous(), sin.float().contiguous())
        return self._ropes[key]

    def remote_bytes(self) -> int:
        """Bytes the remote tokens take, all layers."""
        return sum(ly.remote_bytes() for ly in self.layers if isinstance(ly, AstraLayer))

    def remote_tokens(self) -> int:
        return max((ly.n_remote for ly in self.layers if isinstance(ly, AstraLayer)), default=0)

    def local_tokens(self) -> int:
        return max((DynamicLayer.get_seq_length(ly) for ly in self.layers), default=0)


def cache_kw(model: nn.Module) -> str:
    """The name HF's forward takes the cache by: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (earlier)."""
    import inspect
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def greedy(model: nn.Module, input_ids: Tensor, max_new_tokens: int) -> Tensor:
    """The first ``max_new_tokens`` greedy tokens after ``input_ids [B, T]``:
    ``LongTensor [B, max_new_tokens]`` (HF ``generate``, no stop at EOS). A patched
    model generates as the device holding the last chunk (:class:`AstraCache`; for an
    unpatched model it is HF's dynamic cache: nothing remote, every layer exact)."""
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                         max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=0, **{cache_kw(model): AstraCache()})
    return out[:, input_ids.shape[1]:]


# ------------------------------------------------------------------- prefill side

def _codes_or_kv(m, codes: Optional[Tensor], kv_fn) -> tuple:
    """(packed codes, None) where ``m`` has kernel tables, else (None, KVSource)."""
    kt = m.kernel_tables() if codes is not None else None
    if kt is not None:
        cols = codes if kt.cols is None else codes[..., kt.cols]
        sizes = int(kt.pk.shape[1])  # grouped: every column one codebook's size
        if m.stage_sizes is not None:  # residual: each stage its own
            sizes = [m.stage_sizes[c] for c in (kt.cols or range(len(m.stage_sizes)))]
        return PackedCodes.pack(cols, sizes), None
    return None, KVSource(*kv_fn())


def record(m, cache, k: Tensor, v: Tensor, pos: Tensor, x: Tensor,
           remote_codes: Optional[Tensor] = None, remote_kv=None,
           remote_pos: Optional[Tensor] = None) -> None:
    """What a prefilling device keeps: its keys/values ``k, v`` (rotated) at global
    positions ``pos``, and the remote tokens at ``remote_pos``: ``remote_codes``
    ``[B, Tr, G]`` (the layer's codes) or ``remote_kv() -> (k, v)`` (rotated; called
    only where the layer keeps no codes). A plain HF cache gets ``k, v`` only (it
    cannot decode for several devices: :func:`cached_layer` refuses it)."""
    if cache is None:
        return
    c = getattr(cache, "self_attention_cache", cache)
    if not isinstance(c, AstraCache):  # HF's own cache (HF creates one on every forward)
        c.update(k, v, m.layer_idx)
        return
    layer = c.layer(m.layer_idx)
    if layer.get_seq_length() > 0:
        raise RuntimeError(f"layer {m.layer_idx}: the cache already holds tokens")
    layer.append(k, v, pos)
    if remote_pos is None or remote_pos.numel() == 0:
        return
    keep = remote_pos < pos.min() if m.causal else None  # later tokens: never seen again
    if keep is not None and not bool(keep.all()):
        kv_all, remote_pos = remote_kv, remote_pos[keep]
        remote_codes = None if remote_codes is None else remote_codes[:, keep]
        remote_kv = lambda: tuple(t[:, :, keep] for t in kv_all())  # noqa: E731
        if remote_pos.numel() == 0:
            return
    layer.remote_pos = remote_pos
    layer.codes, layer.remote_kv = _codes_or_kv(m, remote_codes, remote_kv)
    if layer.codes is not None:
        layer.rope = c.shared_rope(m, x, remote_pos)


def projected(m, xr: Tensor, rope: Optional[Rope]) -> tuple:
    """Keys (rotated by ``rope``) and values of remote tokens from ``xr``: their
    attention inputs (X̂, or X without a codebook) or, for ``"kv"`` codebooks, ``[k; v]``."""
    k, v = m.remote_kv(xr)
    return m._rot_k(k, rope), v


def record_simulated(m, cache, x: Tensor, k: Tensor, v: Tensor, layout, rope) -> None:
    """Simulate mode: keep what the device holding the last chunk would (its chunk's
    keys/values, the earlier chunks' codes)."""
    if cache is None:
        return
    if layout.devices == 1 or not isinstance(getattr(cache, "self_attention_cache", cache),
                                               AstraCache):
        record(m, cache, k, v, layout.orig_index, x)
        return
    if layout.copies:
        raise ValueError("generation with distributed class tokens is not supported")
    li, ri = layout.local_idx[-1], layout.remote_idx[-1]
    pos = layout.orig_index
    codes = m.encode(x[:, ri]) if m.codebook is not None else None

    def remote_kv():
        if codes is None:
            return k[:, :, ri], v[:, :, ri]
        return projected(m, m.dequantize(codes, x.dtype), None if rope is None else rope.take(ri))
    record(m, cache, k[:, :, li], v[:, :, li], pos[li], x, codes, remote_kv, pos[ri])


# -------------------------------------------------------------------- decode side

def cached_layer(m, cache):
    """``m``'s layer of ``cache`` when it already holds tokens (decode), else None.
    HF's own cache serves one device only (N = 1, no communicator)."""
    if cache is None:
        return None
    c = getattr(cache, "self_attention_cache", cache)
    if len(c.layers) <= m.layer_idx or c.layers[m.layer_idx].get_seq_length() == 0:
        return None
    if not isinstance(c, AstraCache) and (m.devices > 1 or m.communicator is not None):
        raise ValueError("a model patched for several devices generates with "
                         "past_key_values=astra.AstraCache() (astra.generation.greedy "
                         "passes one)")
    return c.layers[m.layer_idx]


class _Plain:
    """What :func:`attend_cached` reads of a layer, for HF's own cache layers."""

    def __init__(self, pos):
        self.pos, self.codes, self.remote_kv, self.n_remote = pos, None, None, 0


def _check_mask(mask: Optional[Tensor]) -> None:
    """Decoding takes no padding: the last query row of the mask must see every key."""
    if mask is None:
        return
    row = mask[..., -1, :] if mask.dim() == 4 else mask
    ok = bool(row.all()) if row.dtype == torch.bool else bool((row == 0).all())
    if not ok:
        raise NotImplementedError("generation from a padded batch is not supported")


def attend_cached(m, x: Tensor, layer, mask: Optional[Tensor],
                  rope: Optional[tuple]) -> Tensor:
    """New tokens ``x [B, T, D]`` against the cache: their queries see the local
    keys (exact, themselves included, causally) and the remote tokens (codes gathered
    and rotated in the kernel); their keys/values join the cache. ``[B, T, H*d]``."""
    if torch.is_grad_enabled() and any(p.requires_grad for p in m.parameters()):
        raise RuntimeError("generation runs under torch.no_grad()")
    _check_mask(mask)
    T = x.shape[1]
    start = layer.get_seq_length()
    pos = torch.arange(start, start + T, device=x.device)
    rope = Rope(*rope) if rope is not None else m._rope_at(x, pos)
    q, k, v = m.project_qkv(x)
    q, k = m._rot(q, k, rope)
    return attend_layer(m, q, k, v, layer, pos)


def attend_layer(m, q: Tensor, k: Tensor, v: Tensor, layer, pos: Tensor) -> Tensor:
    """The attention half of :func:`attend_cached`: queries ``q [B, H, T, d]`` and the
    new keys/values ``k, v [B, Hkv, T, d]`` (rotated, at positions ``pos [T]``, which
    follow every cached token) against ``layer``, which keeps ``k, v``. ``[B, T, H*d]``."""
    B, _, T, _ = q.shape
    kw = dict(scale=m.scale, causal=T > 1)
    if not isinstance(layer, AstraLayer):  # HF's own layer: one device, positions 0..
        keys, values = layer.update(k, v)
        layer = _Plain(torch.arange(keys.shape[2], device=q.device))
        kv_pos = layer.pos
    else:
        # the whole buffers, rows not yet written masked by their positions: no copy
        layer.append(k, v, pos)
        keys, values, kv_pos = layer.buffers()
        kw["causal"] = True
    if kw["causal"]:
        kw.update(q_pos=pos, kv_pos=kv_pos,
                  remote_pos=layer.remote_pos if layer.n_remote else pos[:0])
    kt = m.kernel_tables() if layer.codes is not None else None
    if kt is not None and T == 1 and q.dtype == kt.pk.dtype == torch.float32 and \
            not torch.is_grad_enabled():
        # a decode step: every input is already in the op's form (positions int64, codes
        # int32 in range, tables and rope fp32, contiguous), so the op is called without
        # the wrapper's checks, which cost as much as the kernel's own time per layer
        r = layer.rope
        o = torch.ops.astra.mixed_attention(
            q.contiguous(), keys, values, layer.codes.unpack(), kt.pk, kt.pv, None, None,
            True, pos, kv_pos, layer.remote_pos, float(m.scale),
            None if r is None else r.cos, None if r is None else r.sin)[0]
    elif layer.codes is not None:
        r = layer.rope
        extra = {} if r is None else dict(rope_cos=r.cos, rope_sin=r.sin)
        o = astra_kernels.mixed_attention(q, keys, values, layer.codes.unpack(),
                                          kt.pk.to(q.dtype), kt.pv.to(q.dtype), **extra, **kw)[0]
    elif layer.remote_kv is not None:
        o = astra_kernels.mixed_attention(q, keys, values, remote_k=layer.remote_kv.k,
                                          remote_v=layer.remote_kv.v, **kw)[0]
    else:
        o = astra_kernels.mixed_attention(q, keys, values, **kw)[0]
    return o.transpose(1, 2).reshape(B, T, m.num_heads * m.head_dim)

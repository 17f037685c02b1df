"""``AstraAttention``: mixed-precision sequence-parallel attention, as a drop-in module.

A sequence of T tokens is split into N contiguous chunks, one per (simulated) device,
like ``torch.tensor_split`` (the first ``T % N`` chunks get one token more). The
queries of chunk n attend to

- the keys/values of chunk n at full precision (``K = X W_k + b_k``), and
- the keys/values of every other chunk through vector-quantized copies of their
  attention input: ``X̂`` is ``X`` with each of its G groups replaced by the nearest
  codeword of this layer's codebook, and ``K̂ = X̂ W_k + b_k``, ``V̂ = X̂ W_v + b_v``
  (equivalently ``K̂ = Σ_g P_k[g, c_g] + b_k`` with the projected tables of
  :meth:`AstraAttention.projected_tables`).

Modes
-----
*simulate* (no communicator): the module receives the whole sequence and emulates N
devices. With autograd on, it uses plain differentiable torch ops: scores against the
exact and the quantized keys are both computed and selected per (query chunk, key
chunk) by a block mask, so gradients reach the weights and the codebook (the codes
themselves are a non-differentiable argmin). Without autograd (``torch.no_grad()``,
eval) it calls :func:`astra_kernels.mixed_attention` once per chunk with the codes and
the projected tables; both paths compute the same function (tested).

*distributed* (a :class:`Communicator` is given): the module receives only this rank's
chunk, encodes it, exchanges codes with :meth:`Communicator.exchange` and attends to
its own tokens at full precision and to the received ones through the codebook.

RoPE (families that define :meth:`AstraAttention.rotate` and set ``rotary``, the
model's own rotary module): queries and keys are rotated at their tokens' positions,
remote keys (from ``X̂``) at theirs. In simulate mode the cos/sin are the caller's
(HF's ``position_embeddings`` for the whole sequence) or, without them, the rotary
module's at the layout's positions; in distributed mode always the rotary module's at
global positions (rank offsets from the exchanged chunk lengths).

Distributed class tokens (models with a [CLS] token, when ``distributed_cls``)
----------------------------------------------------------------------------
Each device keeps its own copy of the class token. Copy n is a query of device n like
any of its tokens: it attends to itself and to device n's tokens at full precision and
to the other devices' tokens through their codes. Device n's tokens see copy n (at full
precision, it is a local key) and no other copy: copies are never encoded and never
sent, so they cost no bandwidth. At the end of the layer stack the N copies are pooled
by their mean (in simulate mode by :func:`astra.patch`'s hooks; in distributed mode this
is the runner's job: one D-vector per device, once per sequence). In simulate mode the
layers see the sequence ``[cls_0, ..., cls_{N-1}, t_1, ..., t_{T-1}]`` (``T + N - 1``
tokens); the T-1 other tokens are split into N chunks. With ``distributed_cls=False``
the one class token is an ordinary token of chunk 0 (encoded and sent like the others).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import astra_kernels

from . import remote as _remote
from .codes import LayerCodes
from .layout import ChunkLayout, chunk_layout, key_padding, mask_bias
from .options import QUANTIZE_TARGETS
from .remote import KVSource, RemoteSource, Rope, chunk_kernel

ProjectedTables, KernelTables = _remote.ProjectedTables, _remote.KernelTables

__all__ = ["AstraAttention", "Communicator", "ChunkLayout", "chunk_layout", "ProjectedTables",
           "KernelTables"]

@runtime_checkable
class Communicator(Protocol):
    """What a distributed :class:`AstraAttention` needs from the runner.

    ``exchange`` is a collective: every rank calls it once per layer and forward, in the
    same order, with its local payload, and gets every rank's payload back (its own at
    index ``rank``). The payload is ``int32 [B, T_r, G]`` codes (-1 = padding/missing)
    when the layer has a codebook, else the float attention input ``[B, T_r, D]``
    (full-precision sequence parallelism). ``T_r`` may differ between ranks; ranks are
    in sequence order (rank r holds the r-th chunk).
    """

    rank: int
    world_size: int

    def exchange(self, layer_idx: int, local: Tensor) -> List[Tensor]: ...


# --------------------------------------------------------------------------- helpers

def _repeat_kv(t: Tensor, rep: int) -> Tensor:
    return t if rep == 1 else t.repeat_interleave(rep, dim=1)


def _softmax(scores: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)


class AstraAttention(LayerCodes, nn.Module):
    """Self-attention that emulates (or runs) N devices joined by a VQ link.

    A base class: one subclass per model family (:mod:`astra.models`) provides the
    projections (:meth:`project_q`, :meth:`project_kv`, :meth:`kv_affine`), the output
    (:meth:`output`) and a ``forward`` with the signature of the module it replaces,
    and registers the original's submodules under their original names, so the
    patched model's ``state_dict`` keys do not change. The codebook is a
    non-persistent buffer (``codebook [G, K, D/G]``, or None: remote tokens then cross
    at full precision).

    Distributed class tokens (``distributed_cls``): copy n of the class token is a
    query of device n; it sees itself and device n's tokens at full precision and the
    other devices' tokens through their codes; device n's tokens see copy n only.
    Copies are never encoded or sent; the patched model pools them (mean) after the
    last block. In distributed mode local token 0 is this rank's copy and is not sent.

    Set up by :func:`astra.patch` through :meth:`configure`.
    """

    def __init__(self, *, layer_idx: int, num_heads: int, head_dim: int, scale: float,
                 causal: bool = False, num_kv_heads: Optional[int] = None,
                 attn_dropout: float = 0.0):
        super().__init__()
        self.layer_idx = int(layer_idx)
        self.num_heads = int(num_heads)
        self.num_kv_heads = int(num_kv_heads or num_heads)
        self.head_dim = int(head_dim)
        self.scale = float(scale)
        self.causal = bool(causal)
        self.attn_dropout_p = float(attn_dropout)  # (GPT-2 has a submodule attn_dropout)
        self.register_buffer("codebook", None, persistent=False)
        self.stage_sizes: Optional[Tuple[int, ...]] = None  # residual codebook (configure)
        self.target = "x"  # what the codebook quantizes: X, or "kv" ([k; v], configure)
        self.devices = 1
        self.distributed_cls = False
        self.communicator: Optional[Communicator] = None
        self.use_kernels: Optional[bool] = None
        self._cls_state = None
        self._tables = None
        self._tables_key = None
        self._folded = None  # kernel_tables(), rebuilt with the tables
        # Training-time quantizer of the remote embeddings (fine-tuning: straight-through
        # estimator, noise augmentation; see astra.finetune). Used only while
        # ``self.training`` in simulate mode; None: plain nearest-codeword lookup.
        self.quantizer: Optional[Callable[["AstraAttention", Tensor, ChunkLayout], Tensor]] = None
        # RoPE: ``rotary(x, position_ids [1, T]) -> (cos, sin)``, the model's own module
        # (set by the family; None: no RoPE); ``window``: a sliding window (longer
        # sequences are refused: not implemented).
        self.rotary: Optional[Callable[[Tensor, Tensor], Tuple[Tensor, Tensor]]] = None
        self.window: Optional[int] = None

    # ------------------------------------------------------------ family interface
    def project_q(self, x: Tensor) -> Tensor:
        """``[B, T, D] -> [B, H, T, d]``."""
        raise NotImplementedError

    def project_kv(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """``[B, T, D] -> (k, v)``, each ``[B, Hkv, T, d]`` (post any key norm)."""
        raise NotImplementedError

    def project_qkv(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        k, v = self.project_kv(x)
        return self.project_q(x), k, v

    def kv_affine(self) -> Optional[Tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]]:
        """``(W_k, b_k, W_v, b_v)`` in ``nn.Linear`` layout (``[Hkv*d, D]``) when
        ``k = X W_k^T + b_k`` exactly (no key norm); None otherwise."""
        return None

    def output(self, o: Tensor, x: Tensor) -> Tensor:
        """Attention output ``[B, T, H*d]`` -> what the replaced module returns."""
        return o

    def rotate(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor]:
        """RoPE families: ``q [B, H, T, d]``, ``k [B, Hkv, T, d]`` rotated by
        ``cos, sin [B|1, T, R]`` (the model's own ``apply_rotary_pos_emb``)."""
        raise NotImplementedError(f"{type(self).__name__} has no rotary embedding")

    # ------------------------------------------------------------------- RoPE
    def _rot(self, q: Tensor, k: Tensor, rope: Optional[Rope]) -> Tuple[Tensor, Tensor]:
        return (q, k) if rope is None else self.rotate(q, k, rope.cos, rope.sin)

    def _rot_k(self, k: Tensor, rope: Optional[Rope]) -> Tensor:
        return k if rope is None else self.rotate(k[:, :0], k, rope.cos, rope.sin)[1]

    def _rope_at(self, x: Tensor, pos: Tensor) -> Optional[Rope]:
        """cos/sin of positions ``pos [T]`` from the model's rotary module (None: no RoPE)."""
        if self.rotary is None:
            return None
        return Rope(*self.rotary(x, pos.unsqueeze(0)))

    def _check_window(self, n: int) -> None:
        if self.window is not None and n > self.window:
            raise NotImplementedError(f"a {n}-token sequence exceeds layer {self.layer_idx}'s "
                                      f"sliding window ({self.window}): not supported")

    # ------------------------------------------------------------------- set-up
    def configure(self, *, codebook: Optional[Tensor] = None, devices: int = 1,
                  distributed_cls: bool = False, communicator: Optional[Communicator] = None,
                  use_kernels: Optional[bool] = None, cls_state=None,
                  stage_sizes: Optional[Sequence[int]] = None,
                  target: str = "x") -> "AstraAttention":
        """Set the layer's codebook ``[G, K, D/G]`` (or None), device count and mode.

        ``stage_sizes``: the codebook is *residual* ``[S, K, D]``: stage s (its first
        ``stage_sizes[s]`` rows; the rest is padding, never selected) quantizes what
        the stages before it left; ``X̂`` is the sum of the S chosen rows. A token is
        still S codes and a remote key still a sum of S table rows (see
        :meth:`projected_tables`), so the ops take it as G=S groups.

        ``target``: what the codebook quantizes: ``"x"`` (the attention input, width D)
        or ``"kv"`` (the token's pre-RoPE key and value, ``[k; v]`` of width
        ``2·Hkv·d``; see :meth:`kv_vector`).
        """
        if target not in QUANTIZE_TARGETS:
            raise ValueError(f"target must be one of {QUANTIZE_TARGETS}, got {target!r}")
        if codebook is not None:
            if codebook.dim() != 3:
                raise ValueError(f"codebook must be [G, K, D/G], got {tuple(codebook.shape)}")
            ref = self._ref_param()
            codebook = codebook.detach().to(device=ref.device, dtype=torch.float32)
        if stage_sizes is not None:
            stage_sizes = tuple(int(k) for k in stage_sizes)
            if codebook is None or len(stage_sizes) != codebook.shape[0] or \
                    not all(1 <= k <= codebook.shape[1] for k in stage_sizes):
                raise ValueError(f"stage_sizes {stage_sizes} do not fit the codebook "
                                 f"{None if codebook is None else tuple(codebook.shape)}")
        if codebook is not None and target == "kv":
            width = codebook.shape[-1] * (1 if stage_sizes is not None else codebook.shape[0])
            if width != 2 * self.num_kv_heads * self.head_dim:
                raise ValueError(f"a 'kv' codebook of layer {self.layer_idx} must be "
                                 f"{2 * self.num_kv_heads * self.head_dim} wide (2 x "
                                 f"{self.num_kv_heads} KV heads x {self.head_dim}), got "
                                 f"{tuple(codebook.shape)}")
        self.codebook = codebook
        self.stage_sizes = stage_sizes
        self.target = target
        self.devices = int(devices)
        self.distributed_cls = bool(distributed_cls)
        self.communicator = communicator
        self.use_kernels = use_kernels
        self._cls_state = cls_state
        self._tables = self._tables_key = self._folded = None
        return self

    def _ref_param(self) -> Tensor:
        return next(self.parameters())

    def extra_repr(self) -> str:
        cb = "none" if self.codebook is None else "x".join(map(str, self.codebook.shape))
        mode = "distributed" if self.communicator is not None else "simulate"
        if self.codebook is not None and self.target != "x":
            cb += f" ({self.target})"
        return (f"layer={self.layer_idx}, heads={self.num_heads}, head_dim={self.head_dim}, "
                f"causal={self.causal}, devices={self.devices}, codebook={cb}, mode={mode}, "
                f"distributed_cls={self.distributed_cls}")

    # ----------------------------------------------------------------- forward
    def attend(self, x: Tensor, mask: Optional[Tensor] = None, *, cache=None,
               causal: Optional[bool] = None,
               rope: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        """Mixed-precision attention of ``x [B, T, D]``; returns ``[B, T, H*d]``.

        ``mask`` is the HF/timm attention mask (bool, True = attend, or additive float;
        broadcastable to ``[B, H, T, T]``); ``causal`` overrides the module's flag.
        ``rope``: RoPE cos/sin ``[B|1, T, R]`` of the tokens of ``x`` (simulate mode;
        default: the rotary module's at the layout's positions; ignored in distributed
        mode, which takes global positions from the exchange).
        """
        causal = self.causal if causal is None else bool(causal)
        if cache is not None:  # generation (astra.generation: imports transformers)
            from . import generation as _gen
            layer = _gen.cached_layer(self, cache)
            if layer is not None:  # decoding
                return _gen.attend_cached(self, x, layer, mask, rope)
        if self.communicator is not None:
            return self._attend_distributed(x, mask, cache, causal)
        layout = self._layout(x)
        self._check_window(layout.orig_length)
        bias = mask_bias(mask, x.dtype, layout)
        rope = Rope(*rope) if rope is not None else self._rope_at(x, layout.orig_index)
        if rope is not None and layout.copies:
            raise ValueError("RoPE with distributed class tokens is not supported")
        q, k, v = self.project_qkv(x)
        q, k = self._rot(q, k, rope)
        if cache is not None:
            _gen.record_simulated(self, cache, x, k, v, layout, rope)
        if self._kernel_ok(x):
            pos = layout.orig_index
            ok, valid = key_padding(bias, causal, pos, pos)
            if ok:
                return self._simulate_kernel(x, q, k, v, layout, valid, causal, rope)
        return self._simulate_torch(x, q, k, v, layout, bias, causal, rope)

    def _layout(self, x: Tensor) -> ChunkLayout:
        T = x.shape[1]
        copies = self.distributed_cls and self.devices > 1
        if copies:
            state = self._cls_state
            orig = None if state is None else state.orig_len
            if orig is None or T != orig + self.devices - 1:
                raise RuntimeError(
                    "distributed class tokens: this layer got a sequence that was not "
                    "expanded by the patched model (call the whole patched model, not a "
                    "single layer, or patch with distributed_cls=False)")
            return chunk_layout(orig, self.devices, True, x.device)
        return chunk_layout(T, self.devices, self.distributed_cls and self.devices == 1,
                            x.device)

    def _kernel_ok(self, x: Tensor) -> bool:
        if self.use_kernels is False:
            return False
        if self.training and (self.attn_dropout_p > 0 or self.quantizer is not None):
            return False
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
            or (self.codebook is not None and self.codebook.requires_grad))
        if needs_grad:
            if self.use_kernels:
                raise RuntimeError("use_kernels=True but autograd is on: the kernels are "
                                   "forward-only (use torch.no_grad() or use_kernels=None)")
            return False
        return True

    # -- simulate, differentiable -----------------------------------------------------
    def _simulate_torch(self, x, q, k, v, layout: ChunkLayout, bias, causal,
                        rope: Optional[Rope] = None) -> Tensor:
        B, H, T, d = q.shape
        rep = self.num_heads // self.num_kv_heads
        k, v = _repeat_kv(k, rep), _repeat_kv(v, rep)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        same = layout.same_device()
        quantized = self.codebook is not None and layout.devices > 1
        if quantized:
            if self.training and self.quantizer is not None:
                xq = self.quantizer(self, self.quant_input(x), layout)  # STE (+ noise)
            else:
                xq = self.dequantize(self.encode(x), x.dtype)
            kq, vq = self.remote_kv(xq)
            kq, vq = _repeat_kv(self._rot_k(kq, rope), rep), _repeat_kv(vq, rep)
            scores_q = torch.matmul(q, kq.transpose(-1, -2)) * self.scale
            scores = torch.where(same, scores, scores_q)  # exact within a device
        if bias is not None:
            scores = scores + bias
        visible = same | ~layout.is_copy.unsqueeze(0)  # copies are never sent
        if causal:
            pos = layout.orig_index
            visible = visible & (pos.unsqueeze(0) <= pos.unsqueeze(1))
        if not bool(visible.all()):
            scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
        p = _softmax(scores, q.dtype)
        if self.training and self.attn_dropout_p > 0:
            p = F.dropout(p, self.attn_dropout_p, training=True)
        if quantized:
            sd = same.to(p.dtype)
            out = torch.matmul(p * sd, v) + torch.matmul(p * (1 - sd), vq)
        else:
            out = torch.matmul(p, v)
        return out.transpose(1, 2).reshape(B, T, H * d)

    # -- simulate, kernels ---------------------------------------------------------------
    def _remote_source(self, x: Tensor, rope: Optional[Rope]) -> Optional[RemoteSource]:
        """What the kernels get for the tokens of ``x`` as remote tokens: their codes, or
        ``k̂, v̂`` projected from ``X̂`` (k̂ rotated) where the kernels cannot gather them
        (None: no codebook)."""
        if self.codebook is None:
            return None
        codes = self.encode(x)
        src = self._code_source(codes, x.dtype, rope)
        if src is not None:
            return src
        kq, vq = self.remote_kv(self.dequantize(codes, x.dtype))
        return KVSource(self._rot_k(kq, rope), vq)

    def _simulate_kernel(self, x, q, k, v, layout: ChunkLayout, valid, causal,
                         rope: Optional[Rope] = None) -> Tensor:
        B, H, T, d = q.shape
        src = self._remote_source(x, rope) if layout.devices > 1 else None
        out = q.new_empty(B, H, T, d)
        pos = layout.orig_index
        for n in range(layout.devices):
            li, ri = layout.local_idx[n], layout.remote_idx[n]
            if src is None and layout.devices > 1:
                remote = KVSource(k, v).take(ri)  # no codebook: exact remote
            elif src is None:
                remote = None
            else:
                remote = src.take(ri)
            o = chunk_kernel(q[:, :, li], k[:, :, li], v[:, :, li], remote,
                             None if valid is None else valid[:, li],
                             None if valid is None else valid[:, ri],
                             causal, pos[li], pos[ri], self.scale)
            out[:, :, li] = o
        return out.transpose(1, 2).reshape(B, T, H * d)

    # -- distributed -----------------------------------------------------------------------
    def _attend_distributed(self, x: Tensor, mask, cache, causal) -> Tensor:
        comm = self.communicator
        B, Tn, _ = x.shape
        r, W = int(comm.rank), int(comm.world_size)
        bias = mask_bias(mask, x.dtype, None)
        lpos = torch.arange(Tn, device=x.device)
        ok, valid = key_padding(bias, causal, lpos, lpos)
        first = 1 if self.distributed_cls else 0  # the local class-token copy stays here
        if Tn - first < 1:
            raise ValueError(f"rank {r} got no tokens to attend with")
        send = x[:, first:]
        qkv = None
        if self.codebook is not None:
            if self.target == "kv":  # the codes are of the keys/values attention needs too
                qkv = self.project_qkv(x)
                payload = self.vq(self.kv_vector(qkv[1][:, :, first:], qkv[2][:, :, first:]))
            else:
                payload = self.encode(send)
            if valid is not None:
                payload = payload.masked_fill(~valid[:, first:].unsqueeze(-1), -1)
        else:
            payload = send.detach() if not torch.is_grad_enabled() else send
        start = getattr(comm, "exchange_start", None)
        rope_ok = self.rotary is None or (hasattr(comm, "send_tokens") and (
            self.codebook is None or _remote.ROPE_IN_KERNEL))  # positions known up front
        if (start is not None and ok and valid is None and self._kernel_ok(x) and rope_ok
                and (self.codebook is None or self.projected_tables() is not None)):
            return self._attend_overlapped(x, payload, start, causal, first, cache, qkv)
        got = list(comm.exchange(self.layer_idx, payload))
        if len(got) != W:
            raise RuntimeError(f"communicator returned {len(got)} payloads for world_size={W}")
        lens = [int(t.shape[1]) for t in got]
        offs = [sum(lens[:j]) for j in range(W)]
        qpos = offs[r] + lpos - first
        qpos = qpos.clamp_min(0)  # the class-token copy sits at position 0
        others = [j for j in range(W) if j != r]
        rpos = (torch.cat([offs[j] + torch.arange(lens[j], device=x.device) for j in others])
                if others else torch.empty(0, dtype=torch.long, device=x.device))
        self._check_window(sum(lens))
        rope = self._rope_at(x, torch.arange(sum(lens), device=x.device))
        rl, rr = (None, None) if rope is None else (rope.take(qpos), rope.take(rpos))
        q, k, v = self.project_qkv(x) if qkv is None else qkv
        q, k = self._rot(q, k, rl)
        remote_payload = (torch.cat([got[j].to(x.device) for j in others], dim=1)
                          if others else payload[:, :0])
        if self.codebook is not None:
            rvalid = (remote_payload >= 0).all(-1)
            xr = self.dequantize(remote_payload, x.dtype)
        else:
            rvalid = None
            xr = remote_payload.to(x.dtype)
        if cache is not None:
            from . import generation as _gen
            _gen.record(self, cache, k, v, qpos, x, remote_payload if self.codebook is not None
                        else None, lambda: _gen.projected(self, xr, rr), rpos)
        if ok and self._kernel_ok(x):
            remote = (self._code_source(remote_payload, x.dtype, rr)
                      if self.codebook is not None else None)
            if remote is None:
                kr, vr = self.remote_kv(xr)
                remote = KVSource(self._rot_k(kr, rr), vr)
            o = chunk_kernel(q, k, v, remote, valid, rvalid, causal, qpos, rpos, self.scale)
        else:
            kr, vr = self.remote_kv(xr)
            kr = self._rot_k(kr, rr)
            drop = self.attn_dropout_p if self.training else 0.0
            o = _remote.chunk_torch(q, k, v, kr, vr, bias, rvalid, causal, qpos, rpos,
                                    self.scale, drop)
        return o.transpose(1, 2).reshape(B, Tn, self.num_heads * self.head_dim)

    def _attend_overlapped(self, x: Tensor, payload: Tensor, start, causal: bool,
                           first: int, cache=None, qkv=None) -> Tensor:
        """Distributed, overlapped: start the exchange, attend to the local tokens while
        the bytes travel, then to the received ones, and merge the two partials by their
        log-sum-exp (no padding; kernels; remote K/V from the projected tables).
        ``qkv``: the unrotated projections when the payload needed them already."""
        comm = self.communicator
        B, Tn, _ = x.shape
        r, W = int(comm.rank), int(comm.world_size)
        handle = start(self.layer_idx, payload)
        q, k, v = self.project_qkv(x) if qkv is None else qkv
        lpos = (torch.arange(Tn, device=x.device) - first).clamp_min(0)
        rope = None
        if self.rotary is not None:  # no class copies with RoPE: send_tokens are the chunks
            sent = [int(t) for t in comm.send_tokens]
            rope = self._rope_at(x, torch.arange(sum(sent), device=x.device))
            q, k = self._rot(q, k, rope.take(sum(sent[:r]) + lpos))
        extra = dict(causal=causal, scale=self.scale)
        if causal:
            extra.update(q_pos=lpos, kv_pos=lpos)
        o_loc, lse_loc = astra_kernels.mixed_attention(q, k, v, **extra)
        got = list(handle.wait())
        if len(got) != W:
            raise RuntimeError(f"communicator returned {len(got)} payloads for world_size={W}")
        others = [j for j in range(W) if j != r and got[j].shape[1] > 0]
        lens = [int(t.shape[1]) for t in got]
        offs = [sum(lens[:j]) for j in range(W)]
        qpos = offs[r] + lpos
        if cache is not None:
            from . import generation as _gen
        if not others:
            if cache is not None:
                _gen.record(self, cache, k, v, qpos, x)
            return o_loc.transpose(1, 2).reshape(B, Tn, self.num_heads * self.head_dim)
        rpos = torch.cat([offs[j] + torch.arange(lens[j], device=x.device) for j in others])
        remote = torch.cat([got[j].to(x.device) for j in others], dim=1)
        rr = None if rope is None else rope.take(rpos)
        if cache is not None:
            _gen.record(self, cache, k, v, qpos, x, remote if self.codebook is not None
                        else None, lambda: _gen.projected(self, remote.to(x.dtype), rr), rpos)
        extra = dict(causal=causal, scale=self.scale)
        if causal:
            extra.update(q_pos=qpos, kv_pos=qpos[:0], remote_pos=rpos)
        k0, v0 = k[:, :, :0], v[:, :, :0]
        if self.codebook is not None:
            src = self._code_source(remote, x.dtype, rr)
            o_rem, lse_rem = astra_kernels.mixed_attention(
                q, k0, v0, src.codes.contiguous(), src.pk, src.pv, **src.kwargs(), **extra)
        else:
            kr, vr = self.project_kv(remote.to(x.dtype))
            o_rem, lse_rem = astra_kernels.mixed_attention(
                q, k0, v0, remote_k=self._rot_k(kr, rr), remote_v=vr, **extra)
        o, _ = astra_kernels.merge_attention(o_loc, lse_loc, o_rem, lse_rem)
        return o.transpose(1, 2).reshape(B, Tn, self.num_heads * self.head_dim)

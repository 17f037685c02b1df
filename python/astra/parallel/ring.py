"""``ring``: exact sequence-parallel prefill of causal LMs, K/V on the wire.

The datacenter baseline (ring attention, as Megatron's context parallelism and the
ring-attention papers run it), on the runner's communicator. Each rank holds its
contiguous chunk and runs every layer on it; in each layer it computes q, k, v of its
own tokens (the family's projections and key/query norms, RoPE at the tokens'
*global* positions with the model's own rotary module, as the Llama family's
distributed path does), sends its rotated keys and its values to the ranks that need
them, and attends

- to its own keys, causally, while the bytes travel (``mixed_attention``), then
- to the keys of every earlier rank (all at earlier positions: no mask),

merging the two partials by their log-sum-exp (``merge_attention``). The result is
exact attention (fp32 wire); fp16/int8 wires round the remote keys and values only (a
rank's own K/V never leave it).

What travels: per layer, rank r sends ``K‖V`` of its ``T_r`` tokens, a ``[2B, T_r,
Hkv·d]`` payload (keys in rows ``0..B-1``, values in ``B..2B-1``; keys after the
rotation, so receivers need no positions), as one frame per receiver through
:meth:`~astra.parallel.comm.DistCommunicator.exchange_start`: causal, so only to the
``N-1-r`` later ranks. Bytes sent by rank r per layer::

    (N - 1 - r) * (HEADER_BYTES + payload_nbytes(wire, 2B, T_r, Hkv*d))
    fp32: 4·2B·T_r·Hkv·d; fp16: 2·2B·T_r·Hkv·d; int8: 2B·T_r·(Hkv·d + 4)

(int8: one symmetric absmax scale per token for its keys and one for its values,
:mod:`astra.parallel.wire`). This is the ring's all-gather form: a ring passes block j
from rank to rank, ``N-1-j`` hops, to the same ``N-1-j`` later ranks, so both move the
same bytes in total (``Σ_j (N-1-j)·|KV_j|``); the all-gather sends each block straight
to its readers in one collective per layer (one link latency instead of N-1), and the
link model (bandwidth, latency, shared or switched medium, clock) applies to it like to
every collective of the communicator. Compare sp: the attention input ``[B, T_r, D]``,
i.e. ``D`` values per token instead of ``2·Hkv·d`` (GQA models send less K/V than X).

Supported: causal language models whose attention is an :class:`astra.AstraAttention`
(GPT-2 and the Llama family: llama, mistral, qwen2, qwen3); others are refused with a
``ValueError`` before any work. Sequences longer than a sliding window are refused
(``NotImplementedError``), as everywhere in Astra; so are padding masks and KV caches
(prefill only).
"""
from __future__ import annotations

import types
from typing import Any

import torch
from torch import Tensor

import astra_kernels
from astra.layout import key_padding, mask_bias

__all__ = ["check_ring", "setup_ring", "ring_attend"]


def check_ring(model, adapter) -> None:
    """``ValueError`` (one line) unless ``ring`` can run ``model``: a causal LM without
    a class token (GPT-2, the Llama family)."""
    if not adapter.causal or adapter.has_cls(model):
        mt = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
        raise ValueError(f"strategy 'ring' runs causal language models only (gpt2, llama, "
                         f"mistral, qwen2, qwen3); {mt!r} ({adapter.family}) is not one")


def setup_ring(run, codebooks: Any = None) -> bool:
    """The ``ring`` strategy's set-up on one rank: patch the model in distributed mode
    (no codebooks) and give every layer's attention :func:`ring_attend` (on the
    instances, which :func:`astra.unpatch` drops). Returns True: patched."""
    import astra
    check_ring(run.model, run.adapter)
    astra.patch(run.model, None, communicator=run.comm, strict=False)
    for parent, name in run.adapter.attention_slots(run.model):
        attn = getattr(parent, name)
        attn.attend = types.MethodType(ring_attend, attn)
    return True


def _split_kv(payload: Tensor, B: int, Hkv: int, d: int):
    """``[2B, T, Hkv·d]`` -> ``k, v [B, Hkv, T, d]``."""
    kv = payload.reshape(2 * B, payload.shape[1], Hkv, d).transpose(1, 2)
    return kv[:B].contiguous(), kv[B:].contiguous()


def ring_attend(attn, x: Tensor, mask=None, *, cache=None, causal=None, rope=None) -> Tensor:
    """:meth:`astra.AstraAttention.attend` for ``ring``: this rank's ``x [B, T_r, D]`` ->
    ``[B, T_r, H·d]``, attending exactly to every key at or before each query."""
    if cache is not None:
        raise NotImplementedError("strategy 'ring' runs prefill only: no KV cache")
    comm = attn.communicator
    B, T, _ = x.shape
    r = int(comm.rank)
    sent = [int(t) for t in comm.send_tokens]
    lpos = torch.arange(T, device=x.device)
    ok, valid = key_padding(mask_bias(mask, x.dtype, None), True, lpos, lpos)
    if not ok or valid is not None:
        raise NotImplementedError("strategy 'ring' does not support attention masks (padding)")
    attn._check_window(sum(sent))
    lo = sum(sent[:r])
    q, k, v = attn.project_qkv(x)
    q, k = attn._rot(q, k, attn._rope_at(x, lo + lpos))
    Hkv, d = attn.num_kv_heads, attn.head_dim
    payload = torch.cat([k, v], 0).transpose(1, 2).reshape(2 * B, T, Hkv * d)
    handle = comm.exchange_start(attn.layer_idx, payload.detach())
    o, lse = astra_kernels.mixed_attention(q, k, v, causal=True, q_pos=lpos, kv_pos=lpos,
                                           scale=attn.scale)
    got = handle.wait()
    earlier = [got[j] for j in range(r) if got[j].shape[1] > 0]
    if earlier:  # every earlier rank's keys precede all of ours: visible, unmasked
        kr, vr = _split_kv(torch.cat(earlier, 1).to(device=x.device, dtype=q.dtype), B, Hkv, d)
        o_rem, lse_rem = astra_kernels.mixed_attention(q, k[:, :, :0], v[:, :, :0],
                                                       remote_k=kr, remote_v=vr,
                                                       scale=attn.scale)
        o, _ = astra_kernels.merge_attention(o, lse, o_rem, lse_rem)
    return o.transpose(1, 2).reshape(B, T, attn.num_heads * d)

"""Which simulated device owns each token, and the attention masks the kernels take.

A sequence of T tokens is split into N contiguous chunks, one per (simulated) device,
like ``torch.tensor_split`` (the first ``T % N`` chunks get one token more). With
distributed class tokens, the layers see ``[cls_0, ..., cls_{N-1}, t_1, ..., t_{T-1}]``
(``T + N - 1`` tokens): copy n of the class token belongs to device n and the T-1 other
tokens are split into N chunks (see :mod:`astra.attention`).

:func:`mask_bias` turns an HF/timm attention mask into an additive bias over that
sequence; :func:`key_padding` tells whether the bias is only key padding (what
:func:`astra_kernels.mixed_attention` can express) and returns it as a bool mask.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["ChunkLayout", "chunk_layout", "mask_bias", "key_padding"]


@dataclass(frozen=True)
class ChunkLayout:
    """Which simulated device owns each token of the sequence the layers see.

    ``length`` tokens; the first ``copies`` are class-token copies (copy n belongs to
    device n), the rest are split contiguously. ``orig_index[t]`` is the token's index
    in the original sequence (copies map to 0), used for masks and causal positions.
    """

    devices: int
    length: int
    copies: int
    owner: Tensor        # [length] long
    is_copy: Tensor      # [length] bool
    orig_index: Tensor   # [length] long
    local_idx: Tuple[Tensor, ...]   # per device: its tokens (copy first), ascending
    remote_idx: Tuple[Tensor, ...]  # per device: other devices' non-copy tokens

    @property
    def orig_length(self) -> int:
        return self.length - max(self.copies - 1, 0)

    def same_device(self) -> Tensor:
        """``[length, length]`` bool: query and key on the same device."""
        return self.owner.unsqueeze(1) == self.owner.unsqueeze(0)


@functools.lru_cache(maxsize=128)
def _layout(orig_len: int, devices: int, cls_copies: bool, device: str) -> ChunkLayout:
    content_start = 1 if cls_copies else 0
    n_content = orig_len - content_start
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    if n_content < devices:
        what = (f"{orig_len} tokens, {n_content} besides the class token" if cls_copies
                else f"{orig_len} tokens")
        raise ValueError(f"devices={devices} is larger than the sequence ({what}): every "
                         "device needs at least one token")
    copies = devices if cls_copies else 0
    length = copies + n_content
    chunks = torch.tensor_split(torch.arange(n_content), devices)
    owner = torch.empty(length, dtype=torch.long)
    owner[:copies] = torch.arange(copies)
    orig = torch.empty(length, dtype=torch.long)
    orig[:copies] = 0
    orig[copies:] = torch.arange(n_content) + content_start
    local, content = [], []
    for n, c in enumerate(chunks):
        idx = c + copies
        owner[idx] = n
        content.append(idx)
        local.append(torch.cat([torch.tensor([n]), idx]) if copies else idx)
    remote = [torch.cat([content[m] for m in range(devices) if m != n])
              if devices > 1 else torch.empty(0, dtype=torch.long) for n in range(devices)]
    is_copy = torch.zeros(length, dtype=torch.bool)
    is_copy[:copies] = True
    dev = torch.device(device)
    return ChunkLayout(devices, length, copies, owner.to(dev), is_copy.to(dev), orig.to(dev),
                       tuple(t.to(dev) for t in local), tuple(t.to(dev) for t in remote))


def chunk_layout(orig_len: int, devices: int, cls_copies: bool = False,
                 device="cpu") -> ChunkLayout:
    """The :class:`ChunkLayout` of an ``orig_len``-token sequence over ``devices``.

    Raises ``ValueError`` when a device would get no token.
    """
    return _layout(int(orig_len), int(devices), bool(cls_copies), str(torch.device(device)))


# ------------------------------------------------------------------------------ masks

def mask_bias(mask: Optional[Tensor], dtype: torch.dtype,
               layout: Optional[ChunkLayout]) -> Optional[Tensor]:
    """An HF/timm attention mask as an additive 4-D bias ``[B|1, H|1, Tq, Tk]``.

    Bool masks (True = attend) become 0 / dtype-min; float masks are additive already.
    Dims of the original sequence length are re-indexed for class-token copies.
    """
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        bias = bias.masked_fill(~mask, torch.finfo(dtype).min)
    else:
        bias = mask.to(dtype)
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    if layout is not None and layout.copies > 1:
        T0 = layout.orig_length
        for dim in (-2, -1):
            if bias.shape[dim] == T0:
                bias = bias.index_select(dim, layout.orig_index)
    return bias


def key_padding(bias: Optional[Tensor], causal: bool, qpos: Tensor,
                 kpos: Tensor) -> Tuple[bool, Optional[Tensor]]:
    """Split an additive bias into a key-padding mask (what the kernel can express).

    Returns ``(ok, valid [B, Tk] bool or None)``; ``ok`` is False when the bias says
    more than "these keys are padding" (+ causal): the caller then uses the torch path.
    """
    if bias is None:
        return True, None
    lo = torch.finfo(bias.dtype).min / 2
    allowed = bias > lo
    if not bool(((bias == 0) | ~allowed).all()):
        return False, None  # a real additive bias (ALiBi-like): not a padding mask
    if allowed.shape[1] > 1 and not bool((allowed == allowed[:, :1]).all()):
        return False, None
    allowed = allowed[:, 0]  # [B|1, Tq|1, Tk]
    B, Tq, Tk = allowed.shape
    if Tq != qpos.numel() and Tq != 1:
        return False, None
    valid = allowed[:, -1, :] if causal else allowed.all(dim=1)
    if Tq > 1:
        same = allowed == valid.unsqueeze(1)
        if causal:  # the module masks later keys itself: only the lower triangle counts
            same = same | (kpos.unsqueeze(0) > qpos.unsqueeze(1)).unsqueeze(0)
        # Rows of padding queries may be anything (HF may unmask them): check real rows.
        if Tq == Tk:
            same = same | ~valid.unsqueeze(-1)
        if not bool(same.all()):
            return False, None
    return True, (None if bool(valid.all()) else valid)

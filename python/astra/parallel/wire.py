"""The wire format: one frame per (sender, receiver, collective step).

A frame is a fixed little-endian header followed by the payload bytes::

    offset size field
    0      4    magic     b"ASTR"
    4      1    version   1
    5      1    kind      0 codes (bit-packed), 1 fp32, 2 fp16, 3 int8 (+ fp32 scale per row),
                          4 rcodes (residual codes: one bit width per column)
    6      1    bits      bits per code (kind 0), bits per token (kind 4), else 0
    7      1    reserved  0
    8      4    seq       collective sequence number (the same on every rank)
    12     2    src       sending rank
    14     2    reserved  0
    16     4    rows      B (batch)
    20     4    tokens    T (tokens of the sender in this frame)
    24     4    width     G (codes), S stages (rcodes) or D (floats)
    28     4    nbytes    payload bytes that follow
    32     8    t_send    sender's clock when the collective started (s; link emulation)
    40     4    crc32     of the payload bytes
    = 44 bytes (HEADER_BYTES)

Payload sizes: codes ``ceil(B*T*G*bits/8)`` (exactly G·log2 K bits per token, padded
only to the byte, :func:`astra_kernels.pack_codes`); fp32 ``4·B·T·D``; fp16 ``2·B·T·D``;
int8 ``B·T·(D + 4)`` (per-token absmax scale as fp32, then D int8 values).

Residual codes (``rcodes``, codes ``[B, T, S]`` of residual codebooks): column s has its
own width ``w_s = ceil(log2 K_s)`` (0 for a stage of size 1: its code is always 0 and
is not sent). The payload is one little-endian bit stream (the layout of
:func:`astra_kernels.pack_codes`), token after token, each token's columns in order at
their widths: ``ceil(B*T*sum(w_s)/8)`` bytes; the header's ``bits`` is ``sum(w_s)``. The
widths themselves are part of the run's set-up (per layer), like the chunk sizes: the
receiver passes them to :func:`decode`, which checks them against the header.

:func:`decode` checks every field against what the receiver expects and raises
:class:`PayloadError` on any mismatch, so a malformed or truncated frame is rejected,
never decoded into garbage.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

import astra_kernels

__all__ = ["HEADER_BYTES", "KINDS", "PayloadError", "Frame", "encode", "decode",
           "payload_nbytes", "frame_nbytes", "pack_columns", "unpack_columns"]

MAGIC = b"ASTR"
VERSION = 1
_HDR = struct.Struct("<4sBBBBIHHIIIIdI")
HEADER_BYTES = _HDR.size  # 44
KINDS = {"codes": 0, "fp32": 1, "fp16": 2, "int8": 3, "rcodes": 4}
CODE_KINDS = ("codes", "rcodes")
_KIND_NAMES = {v: k for k, v in KINDS.items()}


class PayloadError(RuntimeError):
    """A frame that is malformed, truncated or not the one this receiver expects."""


@dataclass
class Frame:
    kind: str
    bits: int
    seq: int
    src: int
    rows: int
    tokens: int
    width: int
    t_send: float
    payload: Tensor  # uint8, the nbytes that follow the header
    widths: Optional[Tuple[int, ...]] = None  # rcodes: bits of each column


def payload_nbytes(kind: str, rows: int, tokens: int, width: int, bits: int = 0) -> int:
    n = rows * tokens
    if kind == "codes":
        return (n * width * bits + 7) // 8
    if kind == "rcodes":  # bits: per token (the sum of the column widths)
        return (n * bits + 7) // 8
    if kind == "fp32":
        return 4 * n * width
    if kind == "fp16":
        return 2 * n * width
    if kind == "int8":
        return n * (width + 4)
    raise ValueError(f"unknown wire kind {kind!r}; expected one of {sorted(KINDS)}")


def frame_nbytes(kind: str, rows: int, tokens: int, width: int, bits: int = 0) -> int:
    return HEADER_BYTES + payload_nbytes(kind, rows, tokens, width, bits)


def _bytes_of(t: Tensor) -> Tensor:
    return t.contiguous().view(torch.uint8).reshape(-1)


def _check_widths(widths: Optional[Sequence[int]], width: int) -> Tuple[int, ...]:
    if widths is None:
        raise ValueError("rcodes payloads need the bit width of each column (widths)")
    widths = tuple(int(w) for w in widths)
    if len(widths) != width or any(w < 0 or w > 16 for w in widths):
        raise ValueError(f"rcodes widths {widths} do not fit {width} code columns "
                         "(one width in 0..16 per column)")
    return widths


def pack_columns(x: Tensor, widths: Sequence[int]) -> Tensor:
    """Codes ``x [..., S]``, column s at ``widths[s]`` bits -> ``ceil(n*sum(widths)/8)``
    bytes: one little-endian bit stream, token after token (columns of width 0 are
    dropped; equal widths give exactly :func:`astra_kernels.pack_codes`)."""
    widths = _check_widths(widths, x.shape[-1])
    keep = [s for s, w in enumerate(widths) if w > 0]
    n = x.numel() // max(1, x.shape[-1])
    if not keep:
        return torch.empty(0, dtype=torch.uint8)
    cols = x.reshape(n, x.shape[-1])[:, keep].to(torch.int32)
    ws = [widths[s] for s in keep]
    if len(set(ws)) == 1:
        return astra_kernels.pack_codes(cols.contiguous(), ws[0])
    # mixed widths: every bit as a 1-bit code, in stream order
    bits = torch.cat([(cols[:, j:j + 1] >> torch.arange(w, dtype=torch.int32)) & 1
                      for j, w in enumerate(ws)], dim=1)
    return astra_kernels.pack_codes(bits.reshape(-1).contiguous(), 1)


def unpack_columns(data: Tensor, shape: Sequence[int], widths: Sequence[int]) -> Tensor:
    """Inverse of :func:`pack_columns`: int32 codes of ``shape [..., S]`` (columns of
    width 0 come back as 0)."""
    widths = _check_widths(widths, shape[-1])
    S = shape[-1]
    n = 1
    for d in shape[:-1]:
        n *= int(d)
    out = torch.zeros(n, S, dtype=torch.int32)
    keep = [s for s, w in enumerate(widths) if w > 0]
    if not keep or n == 0:
        return out.reshape(*shape)
    ws = [widths[s] for s in keep]
    if len(set(ws)) == 1:
        out[:, keep] = astra_kernels.unpack_codes(data, (n, len(keep)), ws[0]).to(torch.int32)
        return out.reshape(*shape)
    total = sum(ws)
    bits = astra_kernels.unpack_codes(data, (n * total,), 1).to(torch.int32).reshape(n, total)
    at = 0
    for s, w in zip(keep, ws):
        weights = torch.ones(1, dtype=torch.int32) << torch.arange(w, dtype=torch.int32)
        out[:, s] = (bits[:, at:at + w] * weights).sum(1, dtype=torch.int32)
        at += w
    return out.reshape(*shape)


def encode_payload(x: Tensor, kind: str, bits: int = 0,
                   widths: Optional[Sequence[int]] = None) -> Tensor:
    """``x [B, T, W]`` (int codes for kinds "codes"/"rcodes", float otherwise) -> uint8
    bytes. ``widths``: rcodes only, the bit width of each of the W columns."""
    if kind == "rcodes":
        widths = _check_widths(widths, x.shape[-1])
        if x.numel():
            hi = torch.tensor([1 << w for w in widths], dtype=torch.int64)
            xl = x.reshape(-1, x.shape[-1]).long()
            if bool((xl < 0).any()) or bool((xl >= hi).any()):
                raise ValueError(f"codes outside [0, 2**width) for the column widths {widths} "
                                 "cannot go on the wire (padding/missing tokens are not sent)")
        return pack_columns(x, widths)
    if kind == "codes":
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= (1 << bits)):
            raise ValueError(f"codes outside [0, 2**{bits}) cannot go on the wire "
                             "(padding/missing tokens are not sent)")
        return astra_kernels.pack_codes(x, bits)
    x = x.detach()
    if kind == "fp32":
        return _bytes_of(x.float())
    if kind == "fp16":
        return _bytes_of(x.half())
    if kind == "int8":
        xf = x.float().reshape(-1, x.shape[-1])
        scale = xf.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127.0
        q = torch.round(xf / scale).clamp(-127, 127).to(torch.int8)
        return torch.cat([_bytes_of(scale), _bytes_of(q)])
    raise ValueError(f"unknown wire kind {kind!r}")


def decode_payload(data: Tensor, kind: str, rows: int, tokens: int, width: int,
                   bits: int = 0, widths: Optional[Sequence[int]] = None) -> Tensor:
    shape = (rows, tokens, width)
    if kind == "rcodes":
        return unpack_columns(data, shape, widths)
    if kind == "codes":
        return astra_kernels.unpack_codes(data, shape, bits)
    if kind == "fp32":
        return data.view(torch.float32).reshape(shape).clone()
    if kind == "fp16":
        return data.view(torch.float16).reshape(shape).float()
    if kind == "int8":
        n = rows * tokens
        scale = data[: 4 * n].view(torch.float32).reshape(n, 1)
        q = data[4 * n:].view(torch.int8).reshape(n, width).float()
        return (q * scale).reshape(shape)
    raise ValueError(f"unknown wire kind {kind!r}")


def encode(x: Tensor, kind: str, *, seq: int, src: int, t_send: float, bits: int = 0,
           widths: Optional[Sequence[int]] = None) -> Tensor:
    """One frame (header + payload) as a uint8 tensor for ``x [B, T, W]``.

    ``rcodes``: ``widths`` gives each column's bits; ``bits`` is their sum."""
    if x.dim() != 3:
        raise ValueError(f"wire payloads are [B, T, W], got {tuple(x.shape)}")
    if kind == "rcodes":
        widths = _check_widths(widths, x.shape[-1])
        if bits != sum(widths):
            raise ValueError(f"rcodes: bits={bits} is not the sum of the widths {widths}")
        if bits > 255:
            raise ValueError(f"rcodes: {bits} bits per token do not fit the header's bits byte")
    body = encode_payload(x, kind, bits, widths)
    B, T, W = x.shape
    expect = payload_nbytes(kind, B, T, W, bits)
    assert body.numel() == expect, (body.numel(), expect)
    crc = zlib.crc32(body.numpy().tobytes()) if body.numel() else 0
    hdr = _HDR.pack(MAGIC, VERSION, KINDS[kind], bits, 0, seq & 0xFFFFFFFF, src, 0,
                    B, T, W, expect, float(t_send), crc)
    head = torch.frombuffer(bytearray(hdr), dtype=torch.uint8)
    return torch.cat([head, body])


def peek_header(buf: Tensor) -> tuple:
    if buf.numel() < HEADER_BYTES:
        raise PayloadError(f"frame of {buf.numel()} bytes is shorter than the "
                           f"{HEADER_BYTES}-byte header")
    return _HDR.unpack(buf[:HEADER_BYTES].numpy().tobytes())


def decode(buf: Tensor, *, kind: str, seq: int, src: int, rows: int, tokens: int,
           width: int, bits: int = 0, widths: Optional[Sequence[int]] = None) -> Frame:
    """Check a received frame against what was expected and decode it.

    Raises :class:`PayloadError` naming the first field that does not match.
    ``widths``: rcodes only, the column widths the receiver expects (their sum must be
    ``bits``).
    """
    if kind == "rcodes":
        widths = _check_widths(widths, width)
        if bits != sum(widths):
            raise ValueError(f"rcodes: bits={bits} is not the sum of the widths {widths}")
    magic, ver, k, b, _, s, sr, _, B, T, W, nbytes, t_send, crc = peek_header(buf)
    where = f"frame from rank {src} (collective {seq})"
    if magic != MAGIC:
        raise PayloadError(f"{where}: bad magic {magic!r}, not an Astra frame")
    if ver != VERSION:
        raise PayloadError(f"{where}: wire version {ver}, this build speaks {VERSION}")
    got = {"kind": _KIND_NAMES.get(k, f"?{k}"), "bits": b, "seq": s, "src": sr,
           "rows": B, "tokens": T, "width": W}
    want = {"kind": kind, "bits": bits if kind in CODE_KINDS else 0, "seq": seq & 0xFFFFFFFF,
            "src": src, "rows": rows, "tokens": tokens, "width": width}
    for f in want:
        if got[f] != want[f]:
            raise PayloadError(f"{where}: header field {f}={got[f]}, expected {want[f]}")
    expect = payload_nbytes(kind, rows, tokens, width, bits)
    if nbytes != expect:
        raise PayloadError(f"{where}: header declares {nbytes} payload bytes, "
                           f"{expect} expected for {rows}x{tokens}x{width} {kind}")
    have = buf.numel() - HEADER_BYTES
    if have < nbytes:
        raise PayloadError(f"{where}: truncated: {have} of {nbytes} payload bytes")
    body = buf[HEADER_BYTES:HEADER_BYTES + nbytes]
    if (zlib.crc32(body.numpy().tobytes()) if nbytes else 0) != crc:
        raise PayloadError(f"{where}: payload checksum mismatch (corrupted in transit)")
    return Frame(kind, b, s, sr, B, T, W, t_send, body,
                 tuple(widths) if kind == "rcodes" else None)


def decode_tensor(frame: Frame) -> Tensor:
    return decode_payload(frame.payload, frame.kind, frame.rows, frame.tokens, frame.width,
                          frame.bits, frame.widths)

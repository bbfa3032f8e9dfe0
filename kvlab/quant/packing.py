"""Bit packing of integer codes into bytes, little-endian within each byte.

Layout (shared by the torch quantizers and the Triton kernels): codes run along the last dimension;
for ``bits`` in {1, 2, 4, 8} byte ``j`` holds codes ``j*k .. j*k+k-1`` with ``k = 8 // bits``, code
``j*k + i`` in bits ``[i*bits, (i+1)*bits)``. For 3, 5, 6 and 7 bits the codes form one little-endian bit
stream per row (code ``n`` occupies stream bits ``[n*bits, (n+1)*bits)``; stream bit ``b`` is bit
``b % 8`` of byte ``b // 8``), padded with zero bits to a whole byte.
"""

from __future__ import annotations

import torch

__all__ = ["pack_bits", "unpack_bits", "packed_len"]

_ALLOWED = (1, 2, 3, 4, 5, 6, 7, 8)


def _check_bits(bits: int) -> None:
    if bits not in _ALLOWED:
        raise ValueError(f"bits={bits!r} cannot be packed; allowed: {_ALLOWED}")


def packed_len(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take in one packed row."""
    _check_bits(bits)
    return (n * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes`` (..., N) of values in [0, 2**bits) into uint8 (..., packed_len(N, bits))."""
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    n = codes.shape[-1]
    if bits == 8:
        return codes.contiguous()
    if 8 % bits == 0:
        k = 8 // bits
        pad = (-n) % k
        c = torch.nn.functional.pad(codes, (0, pad)) if pad else codes
        c = c.reshape(*c.shape[:-1], c.shape[-1] // k, k).to(torch.int32)  # explicit: rows may be 0
        shifts = torch.arange(k, device=c.device, dtype=torch.int32) * bits
        return (c << shifts).sum(-1).to(torch.uint8)
    # generic bit stream: expand every code into its bits, then gather 8 bits per byte
    bit_idx = torch.arange(bits, device=codes.device, dtype=torch.int32)
    stream = ((codes.to(torch.int32).unsqueeze(-1) >> bit_idx) & 1).flatten(-2)  # (..., N*bits)
    pad = (-stream.shape[-1]) % 8
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    stream = stream.reshape(*stream.shape[:-1], stream.shape[-1] // 8, 8)
    weights = torch.arange(8, device=codes.device, dtype=torch.int32)
    return (stream << weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 (..., packed_len(n, bits)) -> uint8 codes (..., n)."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_len(n, bits):
        raise ValueError(
            f"packed row has {packed.shape[-1]} bytes, expected {packed_len(n, bits)} for n={n}, bits={bits}"
        )
    if bits == 8:
        return packed.contiguous()
    p = packed.to(torch.int32)
    if 8 % bits == 0:
        k = 8 // bits
        shifts = torch.arange(k, device=p.device, dtype=torch.int32) * bits
        codes = (p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.flatten(-2)[..., :n].to(torch.uint8)
    weights = torch.arange(8, device=p.device, dtype=torch.int32)
    stream = ((p.unsqueeze(-1) >> weights) & 1).flatten(-2)[..., : n * bits]
    stream = stream.reshape(*stream.shape[:-1], n, bits)
    bit_idx = torch.arange(bits, device=p.device, dtype=torch.int32)
    return (stream << bit_idx).sum(-1).to(torch.uint8)

"""Buffer shapes and byte counts of every packed KV layout the kernels read: one place for each layout.

The fused cache (:mod:`kvlab.storage.fused`), the kernel tests and the benchmarks build their buffers from
here rather than each spelling a layout out. This module imports torch only (no triton), so shapes and byte
counts can be asked for anywhere.

KIVI (``bits`` 2 or 4, ``group``, ``residual``), for B sequences, H kv heads, head_dim D, room for ``cap_k``
quantized K tokens and ``cap_v`` quantized V tokens (:data:`KIVI_BUFFERS`, in the kernels' argument order)::

    k_codes  (B, H, D, cap_k * bits / 8)   uint8  K per channel: the codes of consecutive tokens packed in bytes
    k_scale  (B, H, cap_k / group, D)      fp16   one scale and one minimum per (group of tokens, channel)
    k_min    (B, H, cap_k / group, D)      fp16
    k_fp16   (B, H, residual, D)           fp16   the last L mod residual K tokens, unquantized
    v_codes  (B, H, cap_v, D * bits / 8)   uint8  V per token: the codes of consecutive channels packed in bytes
    v_scale  (B, H, cap_v, D / group)      fp16   one scale and one minimum per (token, group of channels)
    v_min    (B, H, cap_v, D / group)      fp16
    v_fp16   (B, H, residual, D)           fp16   the last min(L, residual) V tokens, unquantized

A sequence of L tokens holds ``nk, nv = kivi_counts(L, residual)`` quantized K and V tokens.

llama.cpp ``q4_0`` / ``q8_0`` (:func:`ggml_shapes`): per token, blocks of 32 along head_dim, one fp16 scale each.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["FORMATS", "KIVI_BUFFERS", "KiviBuffers", "QK", "ggml_bytes", "ggml_shapes", "kivi_bytes",
           "kivi_counts", "kivi_empty", "kivi_shapes"]

FORMATS = ("q4_0", "q8_0")
QK = 32  # ggml: elements per block


class KiviBuffers(NamedTuple):
    """A KIVI cache's eight tensors in the order the kernels take them: ``kivi_decode_attention(q, *buffers,
    lengths, ...)``."""

    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_min: torch.Tensor
    k_fp16: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_min: torch.Tensor
    v_fp16: torch.Tensor


KIVI_BUFFERS = KiviBuffers._fields


def kivi_counts(L: int, residual: int) -> tuple[int, int]:
    """(quantized K tokens, quantized V tokens) of a sequence of ``L`` tokens: K in whole ``residual``
    blocks, V all but the last ``residual``."""
    return L // residual * residual, max(0, L - residual)


def kivi_shapes(B: int, H: int, D: int, *, bits: int, group: int, residual: int, cap_k: int,
                cap_v: int | None = None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (shape, dtype)} of the KIVI buffers (module docstring) with room for ``cap_k`` quantized K tokens
    (a multiple of ``group``) and ``cap_v`` quantized V tokens (default ``cap_k``). Shapes only: the kernels'
    wrappers check what they can serve (tests build caches the kernels must refuse)."""
    cap_v = cap_k if cap_v is None else cap_v
    f16, u8 = torch.float16, torch.uint8
    return {
        "k_codes": ((B, H, D, cap_k * bits // 8), u8),
        "k_scale": ((B, H, cap_k // group, D), f16),
        "k_min": ((B, H, cap_k // group, D), f16),
        "k_fp16": ((B, H, residual, D), f16),
        "v_codes": ((B, H, cap_v, D * bits // 8), u8),
        "v_scale": ((B, H, cap_v, D // group), f16),
        "v_min": ((B, H, cap_v, D // group), f16),
        "v_fp16": ((B, H, residual, D), f16),
    }


def kivi_empty(B: int, H: int, D: int, *, bits: int, group: int, residual: int, cap_k: int,
               cap_v: int | None = None, device=None, zero: bool = False) -> KiviBuffers:
    """Allocated KIVI buffers (:func:`kivi_shapes`), uninitialised or zeroed (``zero``)."""
    make = torch.zeros if zero else torch.empty
    shapes = kivi_shapes(B, H, D, bits=bits, group=group, residual=residual, cap_k=cap_k, cap_v=cap_v)
    return KiviBuffers(**{n: make(s, dtype=t, device=device) for n, (s, t) in shapes.items()})


def kivi_bytes(B: int, H: int, D: int, L: int, *, bits: int, group: int, residual: int) -> dict[str, int]:
    """Bytes of the stored data of B sequences of ``L`` tokens (not of the room beyond them): ``codes``,
    ``metadata`` (scales and minima) and ``fp16`` (the windows' tokens); what a decode call reads of the cache."""
    nk, nv = kivi_counts(L, residual)
    return {"codes": B * H * (nk + nv) * D * bits // 8,
            "metadata": B * H * 2 * 2 * (nk // group * D + nv * (D // group)),
            "fp16": B * H * 2 * D * ((L - nk) + (L - nv))}


def ggml_shapes(fmt: str, B: int, H: int, cap: int, D: int) -> dict:
    """Shapes and dtypes of the ``codes`` and ``d`` buffers of a (B, H, cap, D) cache in format ``fmt``:
    q8_0 int8 codes (B, H, cap, D), q4_0 uint8 (B, H, cap, D / 2) (two codes a byte), fp16 ``d`` (B, H, cap, D / 32)."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} is not allowed; allowed: {', '.join(FORMATS)}")
    width, dtype = (D // 2, torch.uint8) if fmt == "q4_0" else (D, torch.int8)
    return {"codes": ((B, H, cap, width), dtype), "d": ((B, H, cap, D // QK), torch.float16)}


def ggml_bytes(k_fmt: str, v_fmt: str, B: int, H: int, D: int, L: int) -> dict[str, int]:
    """Bytes of the stored data of B sequences of ``L`` tokens with K in ``k_fmt`` and V in ``v_fmt``:
    ``codes``, ``metadata`` (the block scales), ``fp16`` (none: every token is quantized on arrival)."""
    codes = 0
    for fmt in (k_fmt, v_fmt):
        (_, _, _, width), dtype = ggml_shapes(fmt, 1, 1, 1, D)["codes"]
        codes += width * dtype.itemsize
    return {"codes": B * H * L * codes, "metadata": B * H * L * 2 * (D // QK) * 2, "fp16": 0}

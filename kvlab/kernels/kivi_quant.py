"""KIVI quantize-and-pack on append: new K or V tokens written straight into a preallocated packed cache.

Layout (shared with the torch quantizers; KIVI, Liu et al., ICML 2024): asymmetric round-to-nearest
codes, ``x_hat = code * scale + min`` with fp16 ``scale`` and ``min``, where ``min`` is the group minimum
rounded to fp16, ``scale = ((max - min_fp16) / (2**bits - 1))`` rounded to fp16, and a zero scale is
replaced by 1 (as :func:`kvlab.quant.uniform.affine_params`). Codes are packed with
:mod:`kvlab.quant.packing`'s convention (little-endian within a byte, along the last dim).

- K, per channel, groups of ``group`` tokens: ``k_codes`` uint8 ``(B, H, D, cap * bits / 8)`` holds the
  codes transposed to ``(B, H, D, cap)`` and packed along tokens; ``k_scale``, ``k_min`` fp16
  ``(B, H, cap / group, D)``. An append writes whole groups: ``Tn`` new tokens (a multiple of ``group``)
  at a token offset that is a multiple of ``group``.
- V, per token, groups of ``group`` channels: ``v_codes`` uint8 ``(B, H, cap, D * bits / 8)`` packed along
  D; ``v_scale``, ``v_min`` fp16 ``(B, H, cap, D / group)``. Any number of tokens at any offset.

``offset`` is an int (all sequences) or a (B,) int32 tensor (one per sequence); a negative entry leaves
that sequence untouched, so sequences of a batch can fill their groups at different steps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant.packing import pack_bits
from ._common import (
    FLOATS,
    cdiv,
    check_arg,
    check_choice,
    check_devices,
    check_pow2,
    check_rank,
    next_pow2,
    offsets_tensor,
)
from ._common import div_correct as _div
from ._common import round_to_code as _round_to_code

__all__ = ["kivi_pack_k", "kivi_pack_k_ref", "kivi_pack_v", "kivi_pack_v_ref"]

BITS = (2, 4)


# ---- K: per-channel groups of `group` tokens --------------------------------------------------------


@triton.jit
def _kivi_pack_k_kernel(
    x_ptr,  # (B, H, Tn, D) new keys, any float dtype; Tn a multiple of GROUP
    codes_ptr,  # (B, H, D, cap * BITS / 8) uint8 packed cache, written in place
    scale_ptr,  # (B, H, cap / GROUP, D) fp16 scales, written in place
    min_ptr,  # (B, H, cap / GROUP, D) fp16 minima, written in place
    off_ptr,  # (B,) int32 token offset of x[:, :, 0] in the cache (a multiple of GROUP; < 0: skip)
    H,  # kv heads
    sx_b, sx_h, sx_t,  # strides of x (last stride 1)
    sc_b, sc_h, sc_d,  # strides of codes
    ss_b, ss_h, ss_g,  # strides of scale and min
    D: tl.constexpr,  # head_dim
    BITS: tl.constexpr,  # 2 or 4
    GROUP: tl.constexpr,  # tokens per group (power of two)
    BLOCK_D: tl.constexpr,  # channels per program
):
    pid_bh = tl.program_id(0)
    g = tl.program_id(1)  # group index among the new tokens
    pid_d = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    off = tl.load(off_ptr + b)
    PER_BYTE: tl.constexpr = 8 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1

    t = tl.arange(0, GROUP)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    wm = d < tl.where(off >= 0, D, 0)  # store mask: a skipped sequence writes nothing
    x_base = x_ptr + b.to(tl.int64) * sx_b + h.to(tl.int64) * sx_h
    # (BLOCK_D, GROUP): channels by tokens, so that the codes come out along tokens
    x = tl.load(x_base + (g * GROUP + t)[None, :] * sx_t + d[:, None], mask=dm[:, None], other=0.0).to(tl.float32)
    lo = tl.min(x, axis=1).to(tl.float16)
    hi = tl.max(x, axis=1)
    scale = tl.math.div_rn(hi - lo.to(tl.float32), QMAX * 1.0).to(tl.float16)
    scale = tl.where(scale == 0.0, 1.0, scale).to(tl.float16)
    sf = scale.to(tl.float32)
    q = _div(x - lo.to(tl.float32)[:, None], sf[:, None], tl.math.div_rn(1.0, sf)[:, None])
    q = _round_to_code(q, QMAX)
    # pack PER_BYTE consecutive tokens per byte, the first in the low bits
    q = tl.reshape(q, (BLOCK_D, GROUP // PER_BYTE, PER_BYTE))
    shifts = tl.arange(0, PER_BYTE) * BITS
    packed = tl.sum(q << shifts[None, None, :], axis=2).to(tl.uint8)  # (BLOCK_D, GROUP / PER_BYTE)

    j = tl.arange(0, GROUP // PER_BYTE)
    c_base = codes_ptr + b.to(tl.int64) * sc_b + h.to(tl.int64) * sc_h
    byte0 = (off + g * GROUP) // PER_BYTE
    tl.store(c_base + d[:, None] * sc_d + (byte0 + j)[None, :], packed, mask=wm[:, None])
    row = off // GROUP + g
    s_off = b.to(tl.int64) * ss_b + h.to(tl.int64) * ss_h + row * ss_g + d
    tl.store(scale_ptr + s_off, scale, mask=wm)
    tl.store(min_ptr + s_off, lo, mask=wm)


def check_k_cache(k_codes, k_scale, k_min, B, H, D, bits, group) -> int:
    """Shapes and dtypes of a packed K cache (``k_codes`` already of rank 4); returns its capacity in tokens."""
    cap = k_codes.shape[-1] * 8 // bits
    check_arg("k_codes", k_codes, (torch.uint8,), (B, H, D, k_codes.shape[-1]), "(B, H, D, cap * bits / 8)")
    if cap % group:
        raise ValueError(f"k_codes holds cap={cap} tokens, not a multiple of group={group}")
    check_arg("k_scale", k_scale, (torch.float16,), (B, H, cap // group, D), "(B, H, cap / group, D)")
    check_arg("k_min", k_min, (torch.float16,), (B, H, cap // group, D), "(B, H, cap / group, D)")
    return cap


def check_v_cache(v_codes, v_scale, v_min, B, H, D, bits, group) -> int:
    """Shapes and dtypes of a packed V cache (``v_codes`` already of rank 4); returns its capacity in tokens."""
    cap = v_codes.shape[2]
    check_arg("v_codes", v_codes, (torch.uint8,), (B, H, cap, D * bits // 8), "(B, H, cap, D * bits / 8)")
    check_arg("v_scale", v_scale, (torch.float16,), (B, H, cap, D // group), "(B, H, cap, D / group)")
    check_arg("v_min", v_min, (torch.float16,), (B, H, cap, D // group), "(B, H, cap, D / group)")
    return cap


def _check_k(k_new, k_codes, k_scale, k_min, offset, bits, group):
    check_choice("bits", bits, BITS)
    check_rank("k_new", k_new, 4, "(B, H, Tn, D)")
    check_arg("k_new", k_new, FLOATS)
    B, H, Tn, D = k_new.shape
    check_pow2("head_dim D", D, 16, 256)
    check_pow2("group", group, 8 // bits, 1024)
    if Tn % group:
        raise ValueError(f"k_new holds Tn={Tn} tokens; K is appended in whole groups: a multiple of group={group}")
    check_rank("k_codes", k_codes, 4, "(B, H, D, cap * bits / 8)")
    cap = check_k_cache(k_codes, k_scale, k_min, B, H, D, bits, group)
    if isinstance(offset, int) and offset % group:
        raise ValueError(f"offset={offset} is not a multiple of group={group}; K groups start at such offsets")
    return B, H, Tn, D, cap, offsets_tensor(offset, B, k_new.device)


def kivi_pack_k(k_new, k_codes, k_scale, k_min, offset, *, bits: int, group: int) -> None:
    """Quantize ``k_new`` (B, H, Tn, D) per channel in groups of ``group`` tokens and write it into the
    packed cache at token ``offset`` (a multiple of ``group``; int or (B,) int32, negative = skip).

    ``k_codes`` (B, H, D, cap * bits / 8) uint8, ``k_scale`` / ``k_min`` (B, H, cap / group, D) fp16 are
    written in place; the caller keeps ``offset + Tn <= cap``.
    """
    B, H, Tn, D, cap, offs = _check_k(k_new, k_codes, k_scale, k_min, offset, bits, group)
    check_devices(dict(k_new=k_new, k_codes=k_codes, k_scale=k_scale, k_min=k_min, offset=offs))
    block_d = min(D, max(16, 4096 // group))
    grid = (B * H, Tn // group, cdiv(D, block_d))
    _kivi_pack_k_kernel[grid](
        k_new, k_codes, k_scale, k_min, offs, H,
        *k_new.stride()[:3], *k_codes.stride()[:3], *k_scale.stride()[:3],
        D=D, BITS=bits, GROUP=group, BLOCK_D=block_d, enable_fp_fusion=False,
    )


def _quant_params(x: torch.Tensor, dim: int, bits: int):
    """fp16 (scale, min) over ``dim`` of float32 ``x`` and the codes (uint8), as the kernels compute them."""
    lo = x.amin(dim=dim, keepdim=True).half()
    hi = x.amax(dim=dim, keepdim=True)
    scale = ((hi - lo.float()) / (2**bits - 1)).half()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.round((x - lo.float()) / scale.float()).clamp(0, 2**bits - 1).to(torch.uint8)
    return scale, lo, codes


def kivi_pack_k_ref(k_new, k_codes, k_scale, k_min, offset, *, bits: int, group: int) -> None:
    """Pure-torch reference of :func:`kivi_pack_k` (same arguments, same in-place writes)."""
    B, H, Tn, D, cap, offs = _check_k(k_new, k_codes, k_scale, k_min, offset, bits, group)
    offs = offs.tolist()
    x = k_new.float().reshape(B, H, Tn // group, group, D)
    scale, lo, codes = _quant_params(x, 3, bits)  # (B, H, n, 1, D) and codes (B, H, n, group, D)
    codes = pack_bits(codes.transpose(-1, -2).transpose(2, 3).reshape(B, H, D, Tn).contiguous(), bits)
    for b, off in enumerate(offs):
        if off < 0:
            continue
        k_codes[b, :, :, off * bits // 8 : (off + Tn) * bits // 8] = codes[b]
        k_scale[b, :, off // group : off // group + Tn // group] = scale[b, :, :, 0]
        k_min[b, :, off // group : off // group + Tn // group] = lo[b, :, :, 0]


# ---- V: per-token groups of `group` channels ----------------------------------------------------------


@triton.jit
def _kivi_pack_v_kernel(
    x_ptr,  # (B, H, Tn, D) new values, any float dtype
    codes_ptr,  # (B, H, cap, D * BITS / 8) uint8 packed cache, written in place
    scale_ptr,  # (B, H, cap, D / GROUP) fp16 scales, written in place
    min_ptr,  # (B, H, cap, D / GROUP) fp16 minima, written in place
    off_ptr,  # (B,) int32 token offset of x[:, :, 0] in the cache (< 0: skip)
    H,  # kv heads
    Tn,  # new tokens
    sx_b, sx_h, sx_t,  # strides of x (last stride 1)
    sc_b, sc_h, sc_t,  # strides of codes
    ss_b, ss_h, ss_t,  # strides of scale and min
    D: tl.constexpr,  # head_dim (power of two)
    BITS: tl.constexpr,  # 2 or 4
    GROUP: tl.constexpr,  # channels per group (power of two dividing D)
    BLOCK_T: tl.constexpr,  # tokens per program
):
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    off = tl.load(off_ptr + b)
    PER_BYTE: tl.constexpr = 8 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    NG: tl.constexpr = D // GROUP

    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < tl.where(off >= 0, Tn, 0)  # a skipped sequence writes nothing
    d = tl.arange(0, D)
    x_base = x_ptr + b.to(tl.int64) * sx_b + h.to(tl.int64) * sx_h
    x = tl.load(x_base + t[:, None] * sx_t + d[None, :], mask=tm[:, None], other=0.0).to(tl.float32)
    x = tl.reshape(x, (BLOCK_T, NG, GROUP))
    lo = tl.min(x, axis=2).to(tl.float16)  # (BLOCK_T, NG)
    hi = tl.max(x, axis=2)
    scale = tl.math.div_rn(hi - lo.to(tl.float32), QMAX * 1.0).to(tl.float16)
    scale = tl.where(scale == 0.0, 1.0, scale).to(tl.float16)
    sf = scale.to(tl.float32)
    q = _div(x - lo.to(tl.float32)[:, :, None], sf[:, :, None], tl.math.div_rn(1.0, sf)[:, :, None])
    q = _round_to_code(q, QMAX)
    q = tl.reshape(q, (BLOCK_T, D // PER_BYTE, PER_BYTE))
    shifts = tl.arange(0, PER_BYTE) * BITS
    packed = tl.sum(q << shifts[None, None, :], axis=2).to(tl.uint8)  # (BLOCK_T, D / PER_BYTE)

    row = (off + t).to(tl.int64)
    j = tl.arange(0, D // PER_BYTE)
    c_base = codes_ptr + b.to(tl.int64) * sc_b + h.to(tl.int64) * sc_h
    tl.store(c_base + row[:, None] * sc_t + j[None, :], packed, mask=tm[:, None])
    gi = tl.arange(0, NG)
    s_off = b.to(tl.int64) * ss_b + h.to(tl.int64) * ss_h + row[:, None] * ss_t + gi[None, :]
    tl.store(scale_ptr + s_off, scale, mask=tm[:, None])
    tl.store(min_ptr + s_off, lo, mask=tm[:, None])


def _check_v(v_new, v_codes, v_scale, v_min, offset, bits, group):
    check_choice("bits", bits, BITS)
    check_rank("v_new", v_new, 4, "(B, H, Tn, D)")
    check_arg("v_new", v_new, FLOATS)
    B, H, Tn, D = v_new.shape
    check_pow2("head_dim D", D, 16, 256)
    check_pow2("group", group, 8 // bits, D)
    check_rank("v_codes", v_codes, 4, "(B, H, cap, D * bits / 8)")
    cap = check_v_cache(v_codes, v_scale, v_min, B, H, D, bits, group)
    return B, H, Tn, D, cap, offsets_tensor(offset, B, v_new.device)


def kivi_pack_v(v_new, v_codes, v_scale, v_min, offset, *, bits: int, group: int) -> None:
    """Quantize ``v_new`` (B, H, Tn, D) per token in groups of ``group`` channels and write it into the
    packed cache at token ``offset`` (int or (B,) int32, negative = skip).

    ``v_codes`` (B, H, cap, D * bits / 8) uint8, ``v_scale`` / ``v_min`` (B, H, cap, D / group) fp16 are
    written in place; the caller keeps ``offset + Tn <= cap``.
    """
    B, H, Tn, D, cap, offs = _check_v(v_new, v_codes, v_scale, v_min, offset, bits, group)
    check_devices(dict(v_new=v_new, v_codes=v_codes, v_scale=v_scale, v_min=v_min, offset=offs))
    block_t = max(1, min(next_pow2(Tn), 4096 // D))
    grid = (B * H, cdiv(Tn, block_t))
    _kivi_pack_v_kernel[grid](
        v_new, v_codes, v_scale, v_min, offs, H, Tn,
        *v_new.stride()[:3], *v_codes.stride()[:3], *v_scale.stride()[:3],
        D=D, BITS=bits, GROUP=group, BLOCK_T=block_t, enable_fp_fusion=False,
    )


def kivi_pack_v_ref(v_new, v_codes, v_scale, v_min, offset, *, bits: int, group: int) -> None:
    """Pure-torch reference of :func:`kivi_pack_v` (same arguments, same in-place writes)."""
    B, H, Tn, D, cap, offs = _check_v(v_new, v_codes, v_scale, v_min, offset, bits, group)
    offs = offs.tolist()
    x = v_new.float().reshape(B, H, Tn, D // group, group)
    scale, lo, codes = _quant_params(x, 4, bits)
    codes = pack_bits(codes.reshape(B, H, Tn, D).contiguous(), bits)
    for b, off in enumerate(offs):
        if off < 0:
            continue
        v_codes[b, :, off : off + Tn] = codes[b]
        v_scale[b, :, off : off + Tn] = scale[b, ..., 0]
        v_min[b, :, off : off + Tn] = lo[b, ..., 0]

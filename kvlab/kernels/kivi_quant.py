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

from kvlab.kernels._common import (
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
from kvlab.kernels._common import div_correct as _div
from kvlab.kernels._common import round_to_code as _round_to_code
from kvlab.quant.packing import pack_bits

__all__ = ["kivi_pack_k", "kivi_pack_k_ref", "kivi_pack_v", "kivi_pack_v_ref"]

BITS = (2, 4)


# ---- K: per-channel groups of `group` tokens --------------------------------------------------------


@triton.jit
def _min_combine(a, b):
    return tl.minimum(a, b)


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


# Combine functions for tl.reduce: plain min / max in the input dtype (tl.min / tl.max widen 16-bit floats
# to fp32 first: twice the registers and no packed half min/max). Triton's own are preferred because its
# interpreter reduces them with numpy, and any other one element by element (minutes for a test).
_min2 = getattr(tl.standard, "_elementwise_min", _min_combine)
_max2 = getattr(tl.standard, "_elementwise_max", _max_combine)


@triton.jit
def _kivi_pack_k_kernel(
    x_ptr,  # (B, H, Tn, D) new keys, any float dtype; Tn a multiple of GROUP
    codes_ptr,  # (B, H, D, cap * BITS / 8) uint8 packed cache, written in place
    scale_ptr,  # (B, H, cap / GROUP, D) fp16 scales, written in place
    min_ptr,  # (B, H, cap / GROUP, D) fp16 minima, written in place
    off_ptr,  # (B,) int32 token offset of x[:, :, 0] in the cache (a multiple of GROUP; < 0: skip)
    H,  # kv heads
    Tn,  # new tokens (a multiple of GROUP)
    sx_b, sx_h, sx_t,  # strides of x (last stride 1)
    sc_b, sc_h, sc_d,  # strides of codes
    ss_b, ss_h, ss_g,  # strides of scale and min
    D: tl.constexpr,  # head_dim
    BITS: tl.constexpr,  # 2 or 4
    GROUP: tl.constexpr,  # tokens per group (power of two)
    BLOCK_T: tl.constexpr,  # tokens per program: whole groups (a multiple of GROUP)
    BLOCK_D: tl.constexpr,  # channels per program
    R: tl.constexpr,  # consecutive tokens per thread: a power of two dividing GROUP, >= 8 / BITS
):
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_d = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    off = tl.load(off_ptr + b)
    PER_BYTE: tl.constexpr = 8 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    L: tl.constexpr = BLOCK_T // R  # runs of R consecutive tokens
    NG: tl.constexpr = BLOCK_T // GROUP  # groups per program
    GL: tl.constexpr = GROUP // R  # runs per group
    RB: tl.constexpr = R // PER_BYTE  # code bytes per run and channel

    # The tile is (R, L * BLOCK_D): token t0 + l * R + r, channel d0 + c. It is loaded along its flat
    # second dim (the memory order within a token: 16-byte vectors of channels, lanes then warps along D
    # then l), so the R tokens of a run stay in one thread's registers. Min/max are then mostly in-thread
    # (GL lanes finish each group), the codes of a run pack into bytes without leaving the thread, and each
    # channel row of k_codes gets BLOCK_T * BITS / 8 contiguous bytes (staged through shared memory by
    # Triton into wide stores). A flat second dim, not (R, L, BLOCK_D): the compiler puts the threads
    # along the most contiguous dim and then, between two equally non-contiguous ones, in an order that
    # differs between Triton versions.
    tl.static_assert(D % BLOCK_D == 0)
    t0 = pid_t * BLOCK_T
    d0 = pid_d * BLOCK_D
    r = tl.arange(0, R)
    c = tl.arange(0, L * BLOCK_D)
    live = off >= 0  # a skipped sequence reads and writes nothing
    n_live = tl.where(live, Tn - t0, 0)  # tokens of this tile to quantize (beyond the tile: all)
    tok = (c // BLOCK_D)[None, :] * R + r[:, None]
    x_base = x_ptr + b.to(tl.int64) * sx_b + h.to(tl.int64) * sx_h + t0.to(tl.int64) * sx_t + d0
    x = tl.load(x_base + tok * sx_t + (c % BLOCK_D)[None, :], mask=tok < n_live, other=0.0)
    if x.dtype == tl.bfloat16:  # Triton 3.6 widens bf16 in tl.minimum / tl.maximum anyway
        x = x.to(tl.float32)
    x = tl.reshape(x, (R, NG, GL, BLOCK_D))
    # min and max are exact in the input dtype (tl.min / tl.max would widen fp16 to fp32 first)
    lo = tl.reduce(tl.reduce(x, 0, _min2), 1, _min2).to(tl.float32).to(tl.float16)  # (NG, BLOCK_D)
    hi = tl.reduce(tl.reduce(x, 0, _max2), 1, _max2).to(tl.float32)
    scale = tl.math.div_rn(hi - lo.to(tl.float32), QMAX * 1.0).to(tl.float16)
    scale = tl.where(scale == 0.0, 1.0, scale).to(tl.float16)
    sf = scale.to(tl.float32)
    # (NG, BLOCK_D) -> (1, NG, 1, BLOCK_D), expanded in the reverse order of the reductions: no relayout
    lo4 = tl.expand_dims(tl.expand_dims(lo.to(tl.float32), 1), 0)
    sf4 = tl.expand_dims(tl.expand_dims(sf, 1), 0)
    inv4 = tl.expand_dims(tl.expand_dims(tl.math.div_rn(1.0, sf), 1), 0)
    q = _round_to_code(_div(x.to(tl.float32) - lo4, sf4, inv4), QMAX)
    # PER_BYTE consecutive tokens per byte, the first in the low bits: (RB, L, BLOCK_D) bytes, then
    # (BLOCK_D, BLOCK_T / PER_BYTE), byte l * RB + rb of a channel row
    q = tl.reshape(q, (RB, PER_BYTE, L, BLOCK_D))
    shifts = tl.arange(0, PER_BYTE) * BITS
    packed = tl.sum(q << shifts[None, :, None, None], axis=1).to(tl.uint8)
    packed = tl.reshape(tl.permute(packed, (2, 1, 0)), (BLOCK_D, BLOCK_T // PER_BYTE))

    # offsets in whole groups, so that the compiler sees the codes' alignment (GROUP * BITS / 8 bytes)
    GB: tl.constexpr = GROUP // PER_BYTE  # code bytes per group and channel
    d = d0 + tl.arange(0, BLOCK_D)
    j = tl.arange(0, BLOCK_T // PER_BYTE)
    c_base = codes_ptr + b.to(tl.int64) * sc_b + h.to(tl.int64) * sc_h
    byte0 = (off // GROUP) * GB + t0 // PER_BYTE
    cm = (j // GB < n_live // GROUP)[None, :]
    tl.store(c_base + d[:, None] * sc_d + (byte0 + j)[None, :], packed, mask=cm)
    gi = tl.arange(0, NG)
    row = off // GROUP + t0 // GROUP + gi
    s_off = b.to(tl.int64) * ss_b + h.to(tl.int64) * ss_h + row[:, None] * ss_g + d[None, :]
    sm = (gi < n_live // GROUP)[:, None]
    tl.store(scale_ptr + s_off, scale, mask=sm)
    tl.store(min_ptr + s_off, lo, mask=sm)


def _k_config(Tn: int, D: int, group: int, itemsize: int):
    """(BLOCK_T, BLOCK_D, R, num_warps) of :func:`_kivi_pack_k_kernel`. A thread holds runs of R = 16
    tokens (fewer for smaller groups) x one 16-byte vector of channels, a program 16384 elements: up to 16
    vectors across (128 fp16 channels; at most 16 lanes across, so that a warp spans two runs, a group of
    32 tokens) by 128 tokens (int4: 64 code bytes per channel row, int2: 32), more tokens for narrower
    tiles or longer groups (whole groups per program), fewer when Tn is smaller. On an H100 (fp16, group
    32, 8 x 8 heads x 8192 tokens) tiles 128 channels wide reached ~80% of the copy bandwidth, 64 wide
    ~78%, 32 wide ~62%."""
    vec = 16 // itemsize
    r = min(group, 16)
    block_d = min(D, 16 * vec)
    block_t = max(group, min(16384 // block_d, next_pow2(Tn)))
    block_d = min(block_d, max(vec, 16384 // block_t))
    threads = (block_t // r) * max(1, block_d // vec)
    return block_t, block_d, r, max(1, min(8, threads // 32))


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
    block_t, block_d, r, num_warps = _k_config(Tn, D, group, k_new.element_size())
    grid = (B * H, cdiv(Tn, block_t), cdiv(D, block_d))
    _kivi_pack_k_kernel[grid](
        k_new, k_codes, k_scale, k_min, offs, H, Tn,
        *k_new.stride()[:3], *k_codes.stride()[:3], *k_scale.stride()[:3],
        D=D, BITS=bits, GROUP=group, BLOCK_T=block_t, BLOCK_D=block_d, R=r, num_warps=num_warps,
        enable_fp_fusion=False,
    )


def _quant_params(x: torch.Tensor, dim: int, bits: int):
    """fp16 (scale, min) over ``dim`` of float32 ``x`` and the codes (uint8), as the kernels compute them."""
    lo = x.amin(dim=dim, keepdim=True).half()
    hi = x.amax(dim=dim, keepdim=True)
    # divided by a tensor: CUDA torch divides by a Python number as a product with its reciprocal, which can be
    # an ulp off the IEEE quotient that the kernels compute (and then an fp16 ulp off in the scale)
    scale = ((hi - lo.float()) / torch.full_like(hi, 2**bits - 1)).half()
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

"""llama.cpp ``q4_0`` / ``q8_0`` quantize-and-pack on append, byte-identical to ggml's reference rows.

Blocks of 32 along head_dim, one fp16 scale ``d`` per block, stored per token:

- ``q8_0``: int8 ``codes`` (B, H, cap, D), ``d`` fp16 (B, H, cap, D / 32); ``x_hat = code * d``.
  ggml: ``amax = max |x|``, ``d = amax / 127``, ``id = d ? 1 / d : 0`` (fp32), ``code = roundf(x * id)``.
- ``q4_0``: uint8 ``codes`` (B, H, cap, D / 2), ``d`` fp16 (B, H, cap, D / 32); within each block byte
  ``j`` (0..15) holds element ``j`` in its low nibble and element ``j + 16`` in its high nibble;
  ``x_hat = (code - 8) * d``. ggml: ``m`` = the first element of largest ``|x|`` (signed),
  ``d = m / -8``, ``id = d ? 1 / d : 0``, ``code = min(15, (int8_t)(x * id + 8.5f))``.

The fp32 ``d`` gives ``id``; fp16 ``d`` is stored. The kernel is launched with ``enable_fp_fusion=False``
so ``x * id + 8.5`` is rounded twice, as in ggml's C.
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
from kvlab.kernels._common import round_half_away as _round_half_away
from kvlab.kernels.layout import FORMATS, QK, ggml_shapes  # the layout lives in kvlab.kernels.layout

__all__ = ["FORMATS", "ggml_pack", "ggml_pack_ref", "ggml_shapes"]


@triton.jit
def _ggml_pack_kernel(
    x_ptr,  # (B, H, Tn, D) new keys or values, any float dtype
    codes_ptr,  # (B, H, cap, D / 2) uint8 for q4_0, (B, H, cap, D) int8 for q8_0; written in place
    d_ptr,  # (B, H, cap, D / 32) fp16 block scales, written in place
    off_ptr,  # (B,) int32 token offset of x[:, :, 0] in the cache (< 0: skip)
    H,  # kv heads
    Tn,  # new tokens
    sx_b, sx_h, sx_t,  # strides of x (last stride 1)
    sc_b, sc_h, sc_t,  # strides of codes
    sd_b, sd_h, sd_t,  # strides of d
    D: tl.constexpr,  # head_dim (a power of two >= 32)
    Q4: tl.constexpr,  # True: q4_0, False: q8_0
    BLOCK_T: tl.constexpr,  # tokens per program
):
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    off = tl.load(off_ptr + b)
    NB: tl.constexpr = D // 32

    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < tl.where(off >= 0, Tn, 0)  # a skipped sequence writes nothing
    dd = tl.arange(0, D)
    x_base = x_ptr + b.to(tl.int64) * sx_b + h.to(tl.int64) * sx_h
    x = tl.load(x_base + t[:, None] * sx_t + dd[None, :], mask=tm[:, None], other=0.0).to(tl.float32)
    x = tl.reshape(x, (BLOCK_T, NB, 32))
    ax = tl.abs(x)
    amax = tl.max(ax, axis=2)  # (BLOCK_T, NB)
    row = (off + t).to(tl.int64)
    c_base = codes_ptr + b.to(tl.int64) * sc_b + h.to(tl.int64) * sc_h
    if Q4:
        j = tl.arange(0, 32)
        first = tl.min(tl.where(ax == amax[:, :, None], j[None, None, :], 32), axis=2)
        m = tl.sum(tl.where(j[None, None, :] == first[:, :, None], x, 0.0), axis=2)
        m = tl.where(amax > 0.0, m, 0.0)  # ggml keeps max = +0.0 when every |x| is 0
        d = tl.math.div_rn(m, -8.0)
        inv = tl.where(d != 0.0, tl.math.div_rn(1.0, tl.where(d != 0.0, d, 1.0)), 0.0)
        code = (x * inv[:, :, None] + 8.5).to(tl.int32)  # C's (int8_t) cast truncates toward zero
        code = tl.minimum(code, 15)
        # byte j of a block: element j low, element j + 16 high
        code = tl.reshape(code, (BLOCK_T, NB, 2, 16))
        sh = tl.arange(0, 2) * 4
        packed = tl.sum(code << sh[None, None, :, None], axis=2).to(tl.uint8)  # (BLOCK_T, NB, 16)
        packed = tl.reshape(packed, (BLOCK_T, D // 2))
        jj = tl.arange(0, D // 2)
        tl.store(c_base + row[:, None] * sc_t + jj[None, :], packed, mask=tm[:, None])
    else:
        d = tl.math.div_rn(amax, 127.0)
        inv = tl.where(d != 0.0, tl.math.div_rn(1.0, tl.where(d != 0.0, d, 1.0)), 0.0)
        code = _round_half_away(x * inv[:, :, None]).to(tl.int8)
        code = tl.reshape(code, (BLOCK_T, D))
        tl.store(c_base + row[:, None] * sc_t + dd[None, :], code, mask=tm[:, None])
    nb = tl.arange(0, NB)
    d_off = b.to(tl.int64) * sd_b + h.to(tl.int64) * sd_h + row[:, None] * sd_t + nb[None, :]
    tl.store(d_ptr + d_off, d.to(tl.float16), mask=tm[:, None])


def _check(x, codes, d, offset, fmt):
    check_choice("fmt", fmt, FORMATS)
    check_rank("x", x, 4, "(B, H, Tn, D)")
    check_arg("x", x, FLOATS)
    B, H, Tn, D = x.shape
    check_pow2("head_dim D", D, 32, 256)
    check_rank("codes", codes, 4, "(B, H, cap, D / 2) for q4_0 or (B, H, cap, D) for q8_0")
    cap = codes.shape[2]
    shapes = ggml_shapes(fmt, B, H, cap, D)
    check_arg("codes", codes, (shapes["codes"][1],), shapes["codes"][0], f"for {fmt}")
    check_arg("d", d, (torch.float16,), shapes["d"][0], "(B, H, cap, D / 32)")
    return B, H, Tn, D, offsets_tensor(offset, B, x.device)


def ggml_pack(x, codes, d, offset, *, fmt: str) -> None:
    """Quantize ``x`` (B, H, Tn, D) to ``fmt`` (``"q4_0"`` or ``"q8_0"``) and write it into the cache
    buffers ``codes`` and ``d`` (see :func:`ggml_shapes`) at token ``offset`` (int or (B,) int32,
    negative = skip). The caller keeps ``offset + Tn <= cap``."""
    B, H, Tn, D, offs = _check(x, codes, d, offset, fmt)
    check_devices(dict(x=x, codes=codes, d=d, offset=offs))
    block_t = max(1, min(next_pow2(Tn), 4096 // D))
    grid = (B * H, cdiv(Tn, block_t))
    _ggml_pack_kernel[grid](
        x, codes, d, offs, H, Tn, *x.stride()[:3], *codes.stride()[:3], *d.stride()[:3],
        D=D, Q4=fmt == "q4_0", BLOCK_T=block_t, enable_fp_fusion=False,
    )


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf``: nearest integer, ties away from zero (``torch.round`` rounds ties to even)."""
    t = torch.trunc(x)
    return t + torch.where((x - t).abs() >= 0.5, torch.sign(x), torch.zeros_like(x))


def _quantize_rows(x: torch.Tensor, fmt: str):
    """x (..., D) float32 -> (codes, d fp16) in ggml's layout."""
    xb = x.reshape(*x.shape[:-1], -1, QK)  # (..., D/32, 32)
    ax = xb.abs()
    amax = ax.amax(-1)
    if fmt == "q8_0":
        d = amax / 127
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        codes = _roundf(xb * inv[..., None]).to(torch.int8).reshape(x.shape)
        return codes, d.half()
    first = (ax == amax[..., None]).to(torch.int8).argmax(-1, keepdim=True)  # first index of the max
    m = torch.where(amax > 0, xb.gather(-1, first)[..., 0], torch.zeros_like(amax))
    d = m / -8
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    codes = (xb * inv[..., None] + 8.5).to(torch.int32).clamp(max=15)  # trunc toward zero, then min 15
    packed = (codes[..., :16] | (codes[..., 16:] << 4)).to(torch.uint8)  # (..., D/32, 16)
    return packed.reshape(*x.shape[:-1], -1), d.half()


def ggml_pack_ref(x, codes, d, offset, *, fmt: str) -> None:
    """Pure-torch reference of :func:`ggml_pack` (same arguments, same in-place writes)."""
    B, H, Tn, D, offs = _check(x, codes, d, offset, fmt)
    c, dd = _quantize_rows(x.float(), fmt)
    for b, off in enumerate(offs.tolist()):
        if off >= 0:
            codes[b, :, off : off + Tn] = c[b]
            d[b, :, off : off + Tn] = dd[b]


def ggml_dequantize_ref(codes: torch.Tensor, d: torch.Tensor, fmt: str) -> torch.Tensor:
    """codes, d of ``fmt`` (..., T, D / 2 or D), (..., T, D / 32) -> float32 (..., T, D)."""
    check_choice("fmt", fmt, FORMATS)
    scale = d.float().repeat_interleave(QK, dim=-1)
    if fmt == "q8_0":
        return codes.float() * scale
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], -1, 16)
    q = torch.cat([c & 15, c >> 4], dim=-1).reshape(*codes.shape[:-1], -1)  # (..., D)
    return (q.float() - 8) * scale

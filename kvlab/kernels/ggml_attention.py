"""Fused decode attention over a llama.cpp-style cache: K and V each in ``q4_0`` or ``q8_0`` blocks.

Cache layout (see :mod:`kvlab.kernels.ggml_quant`): every token ``[0, L)`` of sequence ``b`` is quantized,
per token, in blocks of 32 channels. Queries ``q`` (B, Hq, n, D) are the last ``n`` tokens
(``L >= n``); query ``i`` of ``n`` sees cache tokens ``0 .. L - n + i``; query head ``hq`` reads kv head
``hq // (Hq / H)``.

Kernel: flash-decoding as in :mod:`kvlab.kernels.kivi_attention`. A ``q4_0`` byte holds channels ``j``
and ``j + 16`` of its block, so each head is handled as two halves of D/2 channels, A (channels
``32 * blk + j``) and B (``32 * blk + 16 + j``): the scores are ``q_A . k_A + q_B . k_B`` and the output
accumulates per half, stored back to its channels at the end. ``q8_0`` uses the same halves (16-byte runs),
so both formats share one code path and no nibble has to be shuffled.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvlab.kernels._common import (
    FLOATS,
    call_signature,
    check_arg,
    check_choice,
    check_devices,
    check_pow2,
    check_rank,
    check_window,
    checked_once,
    next_pow2,
)
from kvlab.kernels._common import torch_to_tl as _torch_to_tl
from kvlab.kernels.ggml_quant import FORMATS, ggml_dequantize_ref, ggml_shapes
from kvlab.kernels.kivi_attention import LOG2E, attention_ref
from kvlab.kernels.splitk import split_decode

__all__ = ["ggml_decode_attention", "ggml_decode_attention_ref"]


@triton.jit
def _dequant(codes, scale, Q4: tl.constexpr, DT: tl.constexpr):
    """q4_0 nibbles (0..15) -> (c - 8) * d, q8_0 int8 -> c * d, as dtype DT; scale fp16 broadcastable."""
    if DT == tl.float16:
        if Q4:  # 1024 + c in the fp16 mantissa, minus 1032: c - 8 exactly
            c = (codes.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1032.0
        else:  # c + 128 = the byte with its top bit flipped; 1024 + (c + 128) - 1152 = c exactly
            u = codes.to(tl.uint8, bitcast=True) ^ 0x80
            c = (u.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1152.0
        return c * scale
    else:
        if Q4:
            c = codes.to(tl.float32) - 8.0
        else:
            c = codes.to(tl.float32)
        return (c * scale.to(tl.float32)).to(DT)


@triton.jit
def _ld(ptr, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr, mask=mask, other=0)
    else:
        return tl.load(ptr)


@triton.jit
def _load_halves(c_base, d_base, t, c, st, sdt, tm, MASKED: tl.constexpr, Q4: tl.constexpr,
                 TRANS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr):
    """Dequantized halves A and B of tokens ``t`` (BLOCK_N,): (D/2, BLOCK_N) each when TRANS (for K),
    else (BLOCK_N, D/2). ``c`` (D/2,) is 0..D/2-1; ``tm`` (BLOCK_N,) masks tokens when MASKED."""
    NB: tl.constexpr = D // 32
    col_a = (c // 16) * 32 + c % 16
    blk = tl.arange(0, NB)
    if TRANS:
        tok = t[None, :]
        ch = c[:, None]
        ca = col_a[:, None]
        m2 = tm[None, :]
        dd = _ld(d_base + tok * sdt + blk[:, None], m2, MASKED)
        dd = tl.reshape(tl.broadcast_to(dd[:, None, :], (NB, 16, BLOCK_N)), (D // 2, BLOCK_N))
    else:
        tok = t[:, None]
        ch = c[None, :]
        ca = col_a[None, :]
        m2 = tm[:, None]
        dd = _ld(d_base + tok * sdt + blk[None, :], m2, MASKED)
        dd = tl.reshape(tl.broadcast_to(dd[:, :, None], (BLOCK_N, NB, 16)), (BLOCK_N, D // 2))
    if Q4:
        raw = _ld(c_base + tok * st + ch, m2, MASKED)  # byte c: channel col_a low, col_a + 16 high
        a = _dequant(raw & 15, dd, True, DT)
        bb = _dequant(raw >> 4, dd, True, DT)
    else:
        a = _dequant(_ld(c_base + tok * st + ca, m2, MASKED), dd, False, DT)
        bb = _dequant(_ld(c_base + tok * st + ca + 16, m2, MASKED), dd, False, DT)
    return a, bb


@triton.jit
def _dot(a, b, DT: tl.constexpr):
    if DT == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a.to(DT), b)


@triton.jit
def _ggml_attn_kernel(
    q_ptr,  # (B, Hq, NQ, D) queries
    kc_ptr,  # (B, H, cap, D / 2) uint8 (q4_0) or (B, H, cap, D) int8 (q8_0) K codes
    kd_ptr,  # (B, H, cap, D / 32) fp16 K block scales
    vc_ptr,  # V codes, as K's
    vd_ptr,  # (B, H, cap, D / 32) fp16 V block scales
    len_ptr,  # (B,) int32 tokens per sequence
    o_ptr,  # ONE_SPLIT: (B, Hq, NQ, D) output; else (B, Hq, NQ, SPLITS, D) fp32 partial outputs
    lse_ptr,  # (B, Hq, NQ, SPLITS) fp32 partial log2-sum-exp2 (unused with ONE_SPLIT)
    qk_scale,  # softmax scale * log2(e)
    H,  # kv heads
    SPLITS,  # programs along the sequence (grid axis 1)
    SPLIT_LEN,  # tokens per split (a multiple of BLOCK_N)
    WINDOW,  # HAS_WINDOW: a sliding window; row i sees tokens last_i - WINDOW < t <= last_i
    sq_b, sq_h, sq_t,  # strides of q
    skc_b, skc_h, skc_t,  # strides of K codes
    skd_b, skd_h, skd_t,  # strides of K scales
    svc_b, svc_h, svc_t,  # strides of V codes
    svd_b, svd_h, svd_t,  # strides of V scales
    D: tl.constexpr,  # head_dim (power of two >= 32)
    K_Q4: tl.constexpr,  # K format: True q4_0, False q8_0
    V_Q4: tl.constexpr,  # V format
    GQA: tl.constexpr,  # query heads per kv head
    NQ: tl.constexpr,  # query tokens per sequence
    BLOCK_M: tl.constexpr,  # >= GQA * NQ, a power of two >= 16
    BLOCK_N: tl.constexpr,  # tokens per block
    DT: tl.constexpr,  # dtype of the dot operands (q's dtype)
    ONE_SPLIT: tl.constexpr,  # SPLITS == 1: write the normalised output itself
    HAS_WINDOW: tl.constexpr,  # a sliding-window layer: mask the tokens older than WINDOW
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    L = tl.load(len_ptr + b)
    lo = split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, L)

    r = tl.arange(0, BLOCK_M)
    rm = r < GQA * NQ
    head = h * GQA + r // NQ
    qi = r % NQ
    c = tl.arange(0, D // 2)
    col_a = (c // 16) * 32 + c % 16
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q_row = q_ptr + b64 * sq_b + head[:, None] * sq_h + qi[:, None] * sq_t
    q_a = tl.load(q_row + col_a[None, :], mask=rm[:, None], other=0.0).to(DT)
    q_b = tl.load(q_row + col_a[None, :] + 16, mask=rm[:, None], other=0.0).to(DT)
    last = L - NQ + qi

    kc_base = kc_ptr + b64 * skc_b + h64 * skc_h
    kd_base = kd_ptr + b64 * skd_b + h64 * skd_h
    vc_base = vc_ptr + b64 * svc_b + h64 * svc_h
    vd_base = vd_ptr + b64 * svd_b + h64 * svd_h

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc_a = tl.zeros((BLOCK_M, D // 2), tl.float32)
    acc_b = tl.zeros((BLOCK_M, D // 2), tl.float32)
    n = tl.arange(0, BLOCK_N)

    # full blocks that every query row sees: unmasked; then the rest, masked (bounds and causality)
    main_hi = lo + (tl.maximum(tl.minimum(hi, L - NQ + 1) - lo, 0) // BLOCK_N) * BLOCK_N
    for t0 in range(lo, hi, BLOCK_N):
        t = t0 + n
        masked = t0 >= main_hi
        tm = t < hi
        if masked:
            k_a, k_b = _load_halves(kc_base, kd_base, t, c, skc_t, skd_t, tm, True, K_Q4, True, D, BLOCK_N, DT)
            v_a, v_b = _load_halves(vc_base, vd_base, t, c, svc_t, svd_t, tm, True, V_Q4, False, D, BLOCK_N, DT)
        else:
            k_a, k_b = _load_halves(kc_base, kd_base, t, c, skc_t, skd_t, tm, False, K_Q4, True, D, BLOCK_N, DT)
            v_a, v_b = _load_halves(vc_base, vd_base, t, c, svc_t, svd_t, tm, False, V_Q4, False, D, BLOCK_N,
                                    DT)
        s = (_dot(q_a, k_a, DT) + _dot(q_b, k_b, DT)) * qk_scale
        valid = tm[None, :] & (t[None, :] <= last[:, None])
        if HAS_WINDOW:
            valid = valid & (t[None, :] > (last - WINDOW)[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc_a = acc_a * alpha[:, None] + _dot(p, v_a, DT)
        acc_b = acc_b * alpha[:, None] + _dot(p, v_b, DT)
        m_i = m_new

    row = (b64 * (H * GQA) + head) * NQ + qi
    if ONE_SPLIT:
        o_a = acc_a / l_i[:, None]
        o_b = acc_b / l_i[:, None]
        o_row = o_ptr + row[:, None] * D
    else:
        seen = l_i > 0.0
        inv = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
        o_a = acc_a * inv[:, None]
        o_b = acc_b * inv[:, None]
        prow = row * SPLITS + split
        o_row = o_ptr + prow[:, None] * D
        tl.store(lse_ptr + prow, tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf")), mask=rm)
    tl.store(o_row + col_a[None, :], o_a.to(o_ptr.dtype.element_ty), mask=rm[:, None])
    tl.store(o_row + col_a[None, :] + 16, o_b.to(o_ptr.dtype.element_ty), mask=rm[:, None])


def _check(q, k_codes, k_d, v_codes, v_d, lengths, k_fmt, v_fmt, out):
    check_choice("k_fmt", k_fmt, FORMATS)
    check_choice("v_fmt", v_fmt, FORMATS)
    check_rank("q", q, 4, "(B, Hq, n, D)")
    check_arg("q", q, FLOATS)
    B, Hq, NQ, D = q.shape
    check_pow2("head_dim D", D, 32, 256)
    for name, codes, d, fmt in (("k", k_codes, k_d, k_fmt), ("v", v_codes, v_d, v_fmt)):
        check_rank(f"{name}_codes", codes, 4, f"(B, H, cap, D / 2 or D) for {fmt}")
        H, cap = codes.shape[1], codes.shape[2]
        shapes = ggml_shapes(fmt, B, H, cap, D)
        check_arg(f"{name}_codes", codes, (shapes["codes"][1],), shapes["codes"][0], f"for {fmt}")
        check_arg(f"{name}_d", d, (torch.float16,), shapes["d"][0], "(B, H, cap, D / 32)")
    H = k_codes.shape[1]
    if v_codes.shape[1] != H:
        raise ValueError(f"k_codes has H={H} kv heads but v_codes has {v_codes.shape[1]}")
    if H < 1 or Hq % H:
        raise ValueError(f"q has Hq={Hq} heads and the cache H={H} kv heads; Hq must be a positive multiple of H")
    check_arg("lengths", lengths, (torch.int32,), (B,), "(B,): tokens per sequence")
    if out is not None:
        check_arg("out", out, (q.dtype,), tuple(q.shape), "(B, Hq, n, D), q's dtype")
    return B, Hq, NQ, D, H


_VALIDATED: dict = {}  # call_signature -> what _validate found (a decode loop calls on the same buffers)


def _validate(q, k_codes, k_d, v_codes, v_d, lengths, k_fmt, v_fmt, out, block_n):
    """Check a :func:`ggml_decode_attention` call (ValueError naming the bad argument); return its geometry."""
    found = _check(q, k_codes, k_d, v_codes, v_d, lengths, k_fmt, v_fmt, out)
    check_pow2("block_n", block_n, 16, 256)
    check_devices(dict(q=q, k_codes=k_codes, k_d=k_d, v_codes=v_codes, v_d=v_d, lengths=lengths))
    return found


def ggml_decode_attention(q, k_codes, k_d, v_codes, v_d, lengths, *, k_fmt: str = "q8_0", v_fmt: str = "q8_0",
                          sm_scale: float | None = None, out: torch.Tensor | None = None,
                          max_len: int | None = None, num_splits: int | None = None, block_n: int = 64,
                          num_warps: int = 4, num_stages: int | None = 2,
                          max_regs: int | None = 128, window: int | None = None) -> torch.Tensor:
    """Attention of ``q`` (B, Hq, n, D) over a q4_0/q8_0 cache, returned in q's dtype as (B, Hq, n, D).

    ``k_codes``/``k_d`` and ``v_codes``/``v_d`` in the layouts of :func:`kvlab.kernels.ggml_shapes` for
    ``k_fmt`` / ``v_fmt``; ``lengths`` (B,) int32. ``sm_scale`` defaults to ``D ** -0.5``; ``max_len``,
    ``num_splits``, ``block_n``, ``num_warps``, ``num_stages``, ``max_regs`` as in
    :func:`kivi_decode_attention`; ``window`` (a sliding-window layer's ``sliding_window``): query row ``i``
    sees only the tokens ``t`` with ``L - n + i - window < t <= L - n + i``.
    """
    check_window(window)
    key = call_signature((q, k_codes, k_d, v_codes, v_d, lengths, out), (k_fmt, v_fmt, block_n))
    B, Hq, NQ, D, H = checked_once(_VALIDATED, key, _validate, q, k_codes, k_d, v_codes, v_d, lengths, k_fmt,
                                   v_fmt, out, block_n)
    if max_len is None:
        max_len = int(lengths.max())
    out = torch.empty_like(q) if out is None else out
    strides = {}
    for prefix, t in (("sq", q), ("skc", k_codes), ("skd", k_d), ("svc", v_codes), ("svd", v_d)):
        strides.update({f"{prefix}_{n}": st for n, st in zip("bht", t.stride()[:3])})
    args = dict(q_ptr=q, kc_ptr=k_codes, kd_ptr=k_d, vc_ptr=v_codes, vd_ptr=v_d, len_ptr=lengths,
                qk_scale=(D**-0.5 if sm_scale is None else sm_scale) * LOG2E, H=H, WINDOW=window or 0, **strides)
    static = dict(D=D, K_Q4=k_fmt == "q4_0", V_Q4=v_fmt == "q4_0", GQA=Hq // H, NQ=NQ, HAS_WINDOW=window is not None,
                  BLOCK_M=max(16, next_pow2(Hq // H * NQ)), BLOCK_N=block_n,
                  DT=_torch_to_tl(q.dtype), num_warps=num_warps, enable_fp_fusion=True)
    if num_stages is not None:
        static["num_stages"] = num_stages
    if max_regs is not None:
        static["maxnreg"] = max_regs
    return split_decode(_ggml_attn_kernel, q, out, B * H, max_len, block_n, num_splits, args, static)


def ggml_decode_attention_ref(q, k_codes, k_d, v_codes, v_d, lengths, *, k_fmt: str = "q8_0",
                              v_fmt: str = "q8_0", sm_scale: float | None = None,
                              out: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """Pure-torch reference of :func:`ggml_decode_attention`: dequantize, then fp32 softmax attention."""
    B, Hq, NQ, D, H = _check(q, k_codes, k_d, v_codes, v_d, lengths, k_fmt, v_fmt, out)
    check_window(window)
    out = torch.empty_like(q) if out is None else out
    scale = D**-0.5 if sm_scale is None else sm_scale
    for b, L in enumerate(lengths.tolist()):
        k = ggml_dequantize_ref(k_codes[b, :, :L], k_d[b, :, :L], k_fmt)
        v = ggml_dequantize_ref(v_codes[b, :, :L], v_d[b, :, :L], v_fmt)
        out[b] = attention_ref(q[b], k, v, scale, window).to(out.dtype)
    return out

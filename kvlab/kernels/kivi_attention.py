"""Fused decode attention over a KIVI cache: packed int2/int4 K and V, fp16 scales, fp16 residual windows.

Cache layout (see :mod:`kvlab.kernels.kivi_quant`), for sequence ``b`` of length ``L = lengths[b]`` and
residual ``R`` (a multiple of ``group``):

- K: tokens ``[0, nk)`` with ``nk = (L // R) * R`` are quantized (``k_codes``, ``k_scale``, ``k_min``), tokens
  ``[nk, L)`` sit in ``k_fp16[b, :, : L - nk]``.
- V: tokens ``[0, nv)`` with ``nv = max(0, L - R)`` are quantized (``v_codes``, ``v_scale``, ``v_min``),
  tokens ``[nv, L)`` sit in ``v_fp16[b, :, : L - nv]``.

Queries ``q`` (B, Hq, n, D) hold the last ``n`` tokens of each sequence (``1 <= n <= R``, ``L >= n``);
``Hq = H * gqa`` and query head ``hq`` reads kv head ``hq // gqa``. Causal rule among the few queries:
query ``i`` of ``n`` sees cache tokens ``0 .. L - n + i`` (its own token included).

Kernel: flash-decoding. One program per (sequence, kv head, split of the tokens) serves all ``gqa * n``
query rows of that kv head, so each packed byte is read and dequantized once. Full blocks of the
quantized region are read unmasked as int32 words and turned into fp16 codes two at a time with the
``0x6400`` mantissa trick (:func:`_words_to_codes`), which leaves tokens (and V's channels) permuted
within each word; attention does not mind the order of tokens as long as K and V agree, and V's channel
order is undone when the output is stored. The last ``R`` (+ a partial block) tokens go through a masked
gather path that also reads the windows. Scores and the output accumulate in fp32; the split plan and the
merge of the splits are in :mod:`kvlab.kernels.splitk`. ``group`` must be at least ``32 / bits`` (the codes
of one word share a group) and the K capacity a multiple of ``group``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvlab.kernels import kivi_cuda
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
from kvlab.kernels.kivi_quant import check_k_cache, check_v_cache
from kvlab.kernels.splitk import split_decode
from kvlab.quant.packing import unpack_bits

LOG2E = 1.4426950408889634

__all__ = ["kivi_decode_attention", "kivi_decode_attention_ref", "kivi_dequantize_k_ref", "kivi_dequantize_v_ref"]


@triton.jit
def _code_halves(w, SHIFT: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr):
    """Codes ``i = SHIFT / BITS`` (low half) and ``i + 16 / BITS`` (high half) of every int32 word of ``w``
    (R, W), as two (R, W) int16 tensors: for fp16 (bf16) one AND and one OR per word put both codes into the
    mantissas of the two halves of 1024.0 (128.0), so that each half is ``1024 + code`` exactly, with no
    conversion instruction and the two values already side by side in one register."""
    MASK: tl.constexpr = ((1 << BITS) - 1) * 65537  # the code's bits in both 16-bit halves
    x = (w >> SHIFT) & MASK
    if DT == tl.float16:
        x = x | 0x64006400
    elif DT == tl.bfloat16:
        x = x | 0x43004300
    return x.to(tl.int16), (x >> 16).to(tl.int16)


@triton.jit
def _words_to_codes(w, BITS: tl.constexpr, DT: tl.constexpr):
    """int32 words (R, W) of packed codes -> codes (R, W * 32 / BITS) of DT, in *pair order*: slot
    ``2 * i + e`` of a word holds its code ``i + e * 16 / BITS`` (see :func:`_pair_order`). Each
    ``tl.join`` adds the lowest register bit, so the joins below (the last one joining the halves) lay
    the slots out in this order in consecutive registers, each pair of halves in the register it was
    computed in."""
    R: tl.constexpr = w.shape[0]
    W: tl.constexpr = w.shape[1]
    if BITS == 4:
        l0, h0 = _code_halves(w, 0, 4, DT)
        l1, h1 = _code_halves(w, 4, 4, DT)
        l2, h2 = _code_halves(w, 8, 4, DT)
        l3, h3 = _code_halves(w, 12, 4, DT)
        lo = tl.join(tl.join(l0, l2), tl.join(l1, l3))  # [.., u, v] = code 2u + v
        hi = tl.join(tl.join(h0, h2), tl.join(h1, h3))
        c = tl.reshape(tl.join(lo, hi), (R, W * 8))
    else:
        l0, h0 = _code_halves(w, 0, 2, DT)
        l1, h1 = _code_halves(w, 2, 2, DT)
        l2, h2 = _code_halves(w, 4, 2, DT)
        l3, h3 = _code_halves(w, 6, 2, DT)
        l4, h4 = _code_halves(w, 8, 2, DT)
        l5, h5 = _code_halves(w, 10, 2, DT)
        l6, h6 = _code_halves(w, 12, 2, DT)
        l7, h7 = _code_halves(w, 14, 2, DT)
        lo = tl.join(tl.join(tl.join(l0, l4), tl.join(l2, l6)), tl.join(tl.join(l1, l5), tl.join(l3, l7)))
        hi = tl.join(tl.join(tl.join(h0, h4), tl.join(h2, h6)), tl.join(tl.join(h1, h5), tl.join(h3, h7)))
        c = tl.reshape(tl.join(lo, hi), (R, W * 16))
    if DT == tl.float16:
        return c.to(tl.float16, bitcast=True) - 1024.0
    elif DT == tl.bfloat16:
        return c.to(tl.bfloat16, bitcast=True) - 128.0
    else:
        return c.to(tl.float32)


@triton.jit
def _dequant(codes, scale, zero, DT: tl.constexpr):
    """``codes * scale + zero`` as DT: one fp16 FMA (on register pairs) for fp16, fp32 math otherwise."""
    if DT == tl.float16:
        return codes * scale.to(tl.float16) + zero.to(tl.float16)
    else:
        return (codes.to(tl.float32) * scale.to(tl.float32) + zero.to(tl.float32)).to(DT)


@triton.jit
def _pair_order(p, BITS: tl.constexpr):
    """Which code of its word the pair-order position ``p`` holds, plus the word's first code index."""
    PER_WORD: tl.constexpr = 32 // BITS
    return (p // PER_WORD) * PER_WORD + (p % PER_WORD) // 2 + (16 // BITS) * (p % 2)


@triton.jit
def _softmax_step(q, k, v, valid, m_i, l_i, acc, qk_scale, MASKED: tl.constexpr, DT: tl.constexpr):
    """One online-softmax step: q (M, D), k (D, N), v (N, D) of dtype DT; valid (M, N) when MASKED."""
    if DT == tl.float32:
        s = tl.dot(q, k, input_precision="ieee") * qk_scale
    else:
        s = tl.dot(q, k) * qk_scale
    if MASKED:
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if DT == tl.float32:
        pv = tl.dot(p, v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(DT), v)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def _kivi_attn_kernel(
    q_ptr,  # (B, Hq, NQ, D) queries
    kc_ptr,  # (B, H, D, capk * BITS / 8) uint8 K codes, packed along tokens
    kcw_ptr,  # the same bytes as int32 words (the main loop reads whole words)
    ks_ptr,  # (B, H, capk / GROUP, D) fp16 K scales
    km_ptr,  # (B, H, capk / GROUP, D) fp16 K minima
    kw_ptr,  # (B, H, RK, D) K residual window (fp16 / bf16 / fp32)
    vc_ptr,  # (B, H, capv, D * BITS / 8) uint8 V codes, packed along channels
    vcw_ptr,  # the same bytes as int32 words
    vs_ptr,  # (B, H, capv, D / GROUP) fp16 V scales
    vm_ptr,  # (B, H, capv, D / GROUP) fp16 V minima
    vw_ptr,  # (B, H, RV, D) V residual window
    len_ptr,  # (B,) int32 tokens per sequence
    o_ptr,  # ONE_SPLIT: (B, Hq, NQ, D) output; else (B, Hq, NQ, SPLITS, D) fp32 partial outputs
    lse_ptr,  # (B, Hq, NQ, SPLITS) fp32 partial log2-sum-exp2 (unused with ONE_SPLIT)
    qk_scale,  # softmax scale * log2(e)
    H,  # kv heads
    SPLITS,  # programs along the sequence (grid axis 1)
    SPLIT_LEN,  # tokens per split (a multiple of BLOCK_N)
    RESIDUAL,  # R: window length rule (a multiple of GROUP)
    WINDOW,  # HAS_WINDOW: a sliding window; row i sees tokens last_i - WINDOW < t <= last_i
    sq_b, sq_h, sq_t,  # strides of q
    skc_b, skc_h, skc_d,  # strides of k_codes (bytes; the word strides are these / 4)
    sks_b, sks_h, sks_g,  # strides of k_scale / k_min
    skw_b, skw_h, skw_t,  # strides of k_fp16
    svc_b, svc_h, svc_t,  # strides of v_codes (bytes; the word strides are these / 4)
    svs_b, svs_h, svs_t,  # strides of v_scale / v_min
    svw_b, svw_h, svw_t,  # strides of v_fp16
    D: tl.constexpr,  # head_dim
    BITS: tl.constexpr,  # 2 or 4
    GROUP: tl.constexpr,  # KIVI group (tokens for K, channels for V)
    GQA: tl.constexpr,  # query heads per kv head
    NQ: tl.constexpr,  # query tokens per sequence
    BLOCK_M: tl.constexpr,  # >= GQA * NQ, a power of two >= 16
    BLOCK_N: tl.constexpr,  # tokens per block of the quantized region
    BLOCK_T: tl.constexpr,  # tokens per block of the masked tail (small: gathers take registers)
    DT: tl.constexpr,  # dtype of the dot operands (q's dtype)
    ONE_SPLIT: tl.constexpr,  # SPLITS == 1: write the normalised output itself
    HAS_WINDOW: tl.constexpr,  # a sliding-window layer: mask the tokens older than WINDOW (in every block)
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    PER_BYTE: tl.constexpr = 8 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    NGK: tl.constexpr = BLOCK_N // GROUP if BLOCK_N > GROUP else 1  # K groups per block
    NGV: tl.constexpr = D // GROUP  # V groups per token

    L = tl.load(len_ptr + b)
    nk = (L // RESIDUAL) * RESIDUAL
    nv = tl.maximum(L - RESIDUAL, 0)
    lo = split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, L)

    r = tl.arange(0, BLOCK_M)
    rm = r < GQA * NQ
    head = h * GQA + r // NQ
    qi = r % NQ
    d = tl.arange(0, D)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q = tl.load(q_ptr + b64 * sq_b + head[:, None] * sq_h + qi[:, None] * sq_t + d[None, :],
                mask=rm[:, None], other=0.0).to(DT)
    last = L - NQ + qi  # (BLOCK_M,) last visible token of each row

    kc_base = kc_ptr + b64 * skc_b + h64 * skc_h
    ks_base = ks_ptr + b64 * sks_b + h64 * sks_h
    km_base = km_ptr + b64 * sks_b + h64 * sks_h
    kw_base = kw_ptr + b64 * skw_b + h64 * skw_h
    vc_base = vc_ptr + b64 * svc_b + h64 * svc_h
    vs_base = vs_ptr + b64 * svs_b + h64 * svs_h
    vm_base = vm_ptr + b64 * svs_b + h64 * svs_h
    vw_base = vw_ptr + b64 * svw_b + h64 * svw_h

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)

    # ---- full blocks where K and V are both quantized: unmasked, whole int32 words ----
    # The codes come out in pair order (see _words_to_codes): a block's tokens and V's channels are
    # permuted within each word. Attention does not care about the order of tokens as long as K and V
    # agree, so V rows are read in the same order; the channel order of V is carried by the accumulator
    # and undone when the output is stored (column c of acc is channel vch[c]).
    PER_WORD: tl.constexpr = 32 // BITS
    jk = tl.arange(0, BLOCK_N // PER_WORD)
    jv = tl.arange(0, D // PER_WORD)
    gk = tl.arange(0, NGK)
    gv = tl.arange(0, NGV)
    n = tl.arange(0, BLOCK_N)
    tperm = _pair_order(n, BITS)  # token (within the block) at each pair-order position
    vch = _pair_order(d, BITS)  # channel held by each column of V and of acc
    kcw_base = kcw_ptr + b64 * (skc_b // 4) + h64 * (skc_h // 4)
    vcw_base = vcw_ptr + b64 * (svc_b // 4) + h64 * (svc_h // 4)
    main_hi = lo + (tl.maximum(tl.minimum(hi, nv) - lo, 0) // BLOCK_N) * BLOCK_N
    for t0 in range(lo, main_hi, BLOCK_N):
        kw = tl.load(kcw_base + d[:, None] * (skc_d // 4) + (t0 // PER_WORD + jk)[None, :])  # (D, BLOCK_N/w)
        krow = (t0 // GROUP + gk)[None, :] * sks_g + d[:, None]  # (D, NGK)
        ksc = tl.load(ks_base + krow)
        kmn = tl.load(km_base + krow)
        if NGK > 1:
            ksc = tl.reshape(tl.broadcast_to(ksc[:, :, None], (D, NGK, GROUP)), (D, BLOCK_N))
            kmn = tl.reshape(tl.broadcast_to(kmn[:, :, None], (D, NGK, GROUP)), (D, BLOCK_N))
        k = _dequant(_words_to_codes(kw, BITS, DT), ksc, kmn, DT)  # (D, BLOCK_N), pair order

        t = t0 + tperm
        vw = tl.load(vcw_base + t[:, None] * (svc_t // 4) + jv[None, :])  # (BLOCK_N, D/w)
        vrow = t[:, None] * svs_t + gv[None, :]  # (BLOCK_N, NGV)
        vsc = tl.load(vs_base + vrow)
        vmn = tl.load(vm_base + vrow)
        if NGV > 1:
            vsc = tl.reshape(tl.broadcast_to(vsc[:, :, None], (BLOCK_N, NGV, GROUP)), (BLOCK_N, D))
            vmn = tl.reshape(tl.broadcast_to(vmn[:, :, None], (BLOCK_N, NGV, GROUP)), (BLOCK_N, D))
        v = _dequant(_words_to_codes(vw, BITS, DT), vsc, vmn, DT)  # (BLOCK_N, D), channels in pair order
        if HAS_WINDOW:  # t: the token of each pair-order column, as for V's rows
            m_i, l_i, acc = _softmax_step(q, k, v, t[None, :] > (last - WINDOW)[:, None], m_i, l_i, acc, qk_scale,
                                          True, DT)
        else:
            m_i, l_i, acc = _softmax_step(q, k, v, None, m_i, l_i, acc, qk_scale, False, DT)

    # ---- the rest (the last R tokens, partial blocks): masked gathers, windows included; V columns
    # in the accumulator's channel order ----
    nt = tl.arange(0, BLOCK_T)
    for t0 in range(main_hi, hi, BLOCK_T):
        t = t0 + nt
        tm = t < hi
        kq = t < nk
        mk = (tm & kq)[None, :]
        kraw = tl.load(kc_base + d[:, None] * skc_d + (t // PER_BYTE)[None, :], mask=mk, other=0)
        kcode = (kraw.to(tl.int32) >> ((t % PER_BYTE) * BITS)[None, :]) & QMAX
        krow = (t // GROUP)[None, :] * sks_g + d[:, None]
        ksc = tl.load(ks_base + krow, mask=mk, other=0.0).to(tl.float32)
        kmn = tl.load(km_base + krow, mask=mk, other=0.0).to(tl.float32)
        kwin = tl.load(kw_base + (t - nk)[None, :] * skw_t + d[:, None], mask=(tm & ~kq)[None, :], other=0.0)
        k = tl.where(kq[None, :], kcode.to(tl.float32) * ksc + kmn, kwin.to(tl.float32)).to(DT)

        vq = t < nv
        mv = (tm & vq)[:, None]
        vraw = tl.load(vc_base + t[:, None] * svc_t + (vch // PER_BYTE)[None, :], mask=mv, other=0)
        vcode = (vraw.to(tl.int32) >> ((vch % PER_BYTE) * BITS)[None, :]) & QMAX
        vrow = t[:, None] * svs_t + (vch // GROUP)[None, :]
        vsc = tl.load(vs_base + vrow, mask=mv, other=0.0).to(tl.float32)
        vmn = tl.load(vm_base + vrow, mask=mv, other=0.0).to(tl.float32)
        vwin = tl.load(vw_base + (t - nv)[:, None] * svw_t + vch[None, :], mask=(tm & ~vq)[:, None], other=0.0)
        v = tl.where(vq[:, None], vcode.to(tl.float32) * vsc + vmn, vwin.to(tl.float32)).to(DT)

        valid = tm[None, :] & (t[None, :] <= last[:, None])
        if HAS_WINDOW:
            valid = valid & (t[None, :] > (last - WINDOW)[:, None])
        m_i, l_i, acc = _softmax_step(q, k, v, valid, m_i, l_i, acc, qk_scale, True, DT)

    # ---- write: the output itself (one split) or this split's normalised partial and its lse ----
    row = (b64 * (H * GQA) + head) * NQ + qi  # (BLOCK_M,) row of (B * Hq * NQ)
    if ONE_SPLIT:
        out = acc / l_i[:, None]
        tl.store(o_ptr + row[:, None] * D + vch[None, :], out.to(o_ptr.dtype.element_ty), mask=rm[:, None])
    else:
        seen = l_i > 0.0
        out = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        prow = row * SPLITS + split
        tl.store(o_ptr + prow[:, None] * D + vch[None, :], out, mask=rm[:, None])
        tl.store(lse_ptr + prow, lse, mask=rm)


def _check(q, k_codes, k_scale, k_min, k_fp16, v_codes, v_scale, v_min, v_fp16, lengths, bits, group, residual,
           out):
    check_choice("bits", bits, (2, 4))
    check_rank("q", q, 4, "(B, Hq, n, D)")
    check_arg("q", q, FLOATS)
    B, Hq, NQ, D = q.shape
    check_pow2("head_dim D", D, 16, 256)
    check_pow2("group", group, 32 // bits, D)  # whole 32-bit words of codes share a group
    check_rank("k_codes", k_codes, 4, "(B, H, D, capk * bits / 8)")
    H = k_codes.shape[1]
    if H < 1 or Hq % H:
        raise ValueError(f"q has Hq={Hq} heads and k_codes H={H} kv heads; Hq must be a positive multiple of H")
    check_k_cache(k_codes, k_scale, k_min, B, H, D, bits, group)
    if not isinstance(residual, int) or residual < group or residual % group:
        raise ValueError(f"residual={residual!r} is not allowed; allowed: a positive multiple of group={group}")
    if NQ > residual:
        raise ValueError(f"q holds n={NQ} query tokens; allowed: 1 .. residual={residual}")
    check_rank("k_fp16", k_fp16, 4, "(B, H, RK, D)")
    check_arg("k_fp16", k_fp16, FLOATS, (B, H, k_fp16.shape[2], D), "(B, H, RK, D)")
    if k_fp16.shape[2] < residual - 1 or k_fp16.shape[2] < 1:
        raise ValueError(f"k_fp16 window holds RK={k_fp16.shape[2]} tokens; allowed: RK >= max(1, residual - 1)"
                         f" = {max(1, residual - 1)}")
    check_rank("v_codes", v_codes, 4, "(B, H, capv, D * bits / 8)")
    check_v_cache(v_codes, v_scale, v_min, B, H, D, bits, group)
    check_rank("v_fp16", v_fp16, 4, "(B, H, RV, D)")
    check_arg("v_fp16", v_fp16, FLOATS, (B, H, v_fp16.shape[2], D), "(B, H, RV, D)")
    if v_fp16.shape[2] < residual:
        raise ValueError(f"v_fp16 window holds RV={v_fp16.shape[2]} tokens; allowed: RV >= residual={residual}")
    check_arg("lengths", lengths, (torch.int32,), (B,), "(B,): tokens per sequence")
    if out is not None:
        check_arg("out", out, (q.dtype,), tuple(q.shape), "(B, Hq, n, D), q's dtype")
    return B, Hq, NQ, D, H


_VALIDATED: dict = {}  # call_signature -> what _validate found (a decode loop calls on the same buffers)


def _validate(q, k_codes, k_scale, k_min, k_fp16, v_codes, v_scale, v_min, v_fp16, lengths, bits, group, residual,
              out, backend, cuda_variant, block_n):
    """Check a :func:`kivi_decode_attention` call (ValueError naming the bad argument); return its geometry, why
    the CUDA kernel cannot serve it (None when it can) and the CUDA variant that would, or why the variant asked
    for cannot (raised only if the call reaches the CUDA kernel: without the extension, "auto" takes Triton)."""
    B, Hq, NQ, D, H = _check(q, k_codes, k_scale, k_min, k_fp16, v_codes, v_scale, v_min, v_fp16, lengths,
                             bits, group, residual, out)
    check_choice("backend", backend, ("auto", "cuda", "triton"))
    check_choice("cuda_variant", cuda_variant, ("auto", "staged", "registers", "folded"))
    check_pow2("block_n", block_n, 32, 256)
    check_devices(dict(q=q, k_codes=k_codes, k_scale=k_scale, k_min=k_min, k_fp16=k_fp16, v_codes=v_codes,
                       v_scale=v_scale, v_min=v_min, v_fp16=v_fp16, lengths=lengths))
    why, variant = "not asked for", None
    if backend != "triton" and q.numel():
        why = kivi_cuda.unsupported(q, k_codes, k_scale, k_min, k_fp16, v_codes, v_scale, v_min, v_fp16, lengths,
                                    bits, group)
        if why is None:
            try:
                variant = kivi_cuda.choose_variant(q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, bits, group,
                                                   cuda_variant)
            except ValueError as e:  # kept without its traceback (whose frames hold the tensors)
                variant = ValueError(str(e))
    return B, Hq, NQ, D, H, why, variant


def kivi_decode_attention(q, k_codes, k_scale, k_min, k_fp16, v_codes, v_scale, v_min, v_fp16, lengths, *,
                          bits: int, group: int, residual: int, sm_scale: float | None = None,
                          out: torch.Tensor | None = None, max_len: int | None = None,
                          num_splits: int | None = None, block_n: int = 64, num_warps: int = 4,
                          num_stages: int | None = 2, max_regs: int | None = 128,
                          backend: str = "auto", cuda_variant: str = "auto",
                          window: int | None = None) -> torch.Tensor:
    """Attention of ``q`` (B, Hq, n, D) over a KIVI cache, returned in q's dtype as (B, Hq, n, D).

    Cache tensors as in the module docstring; ``lengths`` (B,) int32 on the same device. ``sm_scale``
    defaults to ``D ** -0.5``. ``max_len`` (a bound on ``lengths``, e.g. the cache class's host-side
    counter) avoids reading ``lengths`` back to the host to plan the splits.

    ``backend``: ``"cuda"`` the CUDA C++ kernel (:mod:`.kivi_cuda`; fp16, head_dim 64/128, <= 16 query
    rows per kv head, compiled on first use), ``"triton"`` the Triton kernel of this module, ``"auto"``
    (default) the CUDA kernel where it can serve the call and was built, else Triton. ``"cuda"`` raises
    ValueError saying why when it cannot. ``cuda_variant`` picks the CUDA kernel's variant: ``"registers"``
    (everything through registers; serves every CUDA call), ``"staged"`` (K codes and scales staged in shared
    memory by cp.async; one query-row tile, D / group in 1, 2, 4, 8, 16-byte aligned K rows and scales, V scales
    contiguous per token), ``"folded"`` (staged loads, raw codes into the matrix unit, scales folded into the
    query and P operands; besides what staged needs, at most min(group, 64) / 8 query rows per kv head, group
    16, 32 or a multiple of 64, V codes contiguous per token), or ``"auto"`` (default): the first of folded,
    staged, registers that can serve the call, for int2 and int4 (the fastest first on an H200,
    benchmarks/KERNEL_NOTES.md, v11).

    ``window`` (a sliding-window layer's ``sliding_window``): query row ``i`` sees only the tokens ``t`` with
    ``L - n + i - window < t <= L - n + i``, as transformers' sliding mask; served by the Triton kernel (the CUDA
    kernel has no window: ``"auto"`` takes Triton, ``"cuda"`` raises).

    Tuning: ``num_splits`` (None: one full wave of programs; both backends), and for Triton only
    ``block_n`` (tokens per block, a power of two), ``num_warps``, ``num_stages``, ``max_regs`` (a register
    cap per thread: 128 lets 4 programs of 4 warps share an SM). The defaults are the fastest of a sweep on
    an H100 (benchmarks/KERNEL_NOTES.md).
    """
    cache = (q, k_codes, k_scale, k_min, k_fp16, v_codes, v_scale, v_min, v_fp16, lengths)
    key = call_signature((*cache, out), (bits, group, residual, backend, cuda_variant, block_n))
    B, Hq, NQ, D, H, cuda_why, variant = checked_once(_VALIDATED, key, _validate, *cache, bits, group, residual,
                                                       out, backend, cuda_variant, block_n)
    check_window(window)
    out = torch.empty_like(q) if out is None else out
    if q.numel() == 0:  # no sequences, heads or query tokens: nothing to attend
        return out
    if max_len is None:
        max_len = int(lengths.max())
    qk_scale = (D**-0.5 if sm_scale is None else sm_scale) * LOG2E
    if backend != "triton":
        why = cuda_why if window is None else "a sliding window (the CUDA kernel attends to every token)"
        if why is None and kivi_cuda.ops() is None:
            why = "the CUDA extension is not available (disabled by KVLAB_CUDA_KERNELS=0, or it failed to build)"
        if why is None:
            if isinstance(variant, ValueError):  # the cuda_variant asked for cannot serve the call
                raise ValueError(*variant.args)
            return kivi_cuda.kivi_decode_attention_cuda(*cache, bits=bits, group=group, residual=residual,
                                                        qk_scale=qk_scale, out=out, max_len=max_len,
                                                        num_splits=num_splits, variant=variant, chosen=True)
        if backend == "cuda":
            raise ValueError(f"backend='cuda' cannot serve this call: {why}; allowed: backend='triton' or 'auto'")
    strides = {}
    for prefix, t in (("sq", q), ("skc", k_codes), ("sks", k_scale), ("skw", k_fp16), ("svc", v_codes),
                      ("svs", v_scale), ("svw", v_fp16)):
        names = ("b", "h", "d" if prefix == "skc" else "g" if prefix == "sks" else "t")
        strides.update({f"{prefix}_{n}": st for n, st in zip(names, t.stride()[:3])})
    args = dict(q_ptr=q, kc_ptr=k_codes, kcw_ptr=k_codes.view(torch.int32), ks_ptr=k_scale, km_ptr=k_min,
                kw_ptr=k_fp16, vc_ptr=v_codes, vcw_ptr=v_codes.view(torch.int32), vs_ptr=v_scale, vm_ptr=v_min,
                vw_ptr=v_fp16, len_ptr=lengths, qk_scale=qk_scale,
                H=H, RESIDUAL=residual, WINDOW=window or 0, **strides)
    static = dict(D=D, BITS=bits, GROUP=group, GQA=Hq // H, NQ=NQ, HAS_WINDOW=window is not None,
                  BLOCK_M=max(16, next_pow2(Hq // H * NQ)), BLOCK_N=block_n, BLOCK_T=16,
                  DT=_torch_to_tl(q.dtype), num_warps=num_warps, enable_fp_fusion=True)
    if num_stages is not None:
        static["num_stages"] = num_stages
    if max_regs is not None:
        static["maxnreg"] = max_regs
    return split_decode(_kivi_attn_kernel, q, out, B * H, max_len, block_n, num_splits, args, static)


# ---- pure-torch reference ------------------------------------------------------------------------------


def kivi_dequantize_k_ref(k_codes, k_scale, k_min, n: int, *, bits: int, group: int) -> torch.Tensor:
    """First ``n`` (a multiple of group) quantized K tokens: codes (..., D, capk * bits / 8), scale and min
    (..., capk / group, D) -> float32 (..., n, D)."""
    codes = unpack_bits(k_codes[..., : n * bits // 8].contiguous(), bits, n).float().transpose(-1, -2)
    scale = k_scale[..., : n // group, :].float().repeat_interleave(group, dim=-2)
    zero = k_min[..., : n // group, :].float().repeat_interleave(group, dim=-2)
    return codes * scale + zero


def kivi_dequantize_v_ref(v_codes, v_scale, v_min, n: int, *, bits: int, group: int) -> torch.Tensor:
    """First ``n`` quantized V tokens: codes (..., capv, D * bits / 8), scale and min (..., capv, D / group)
    -> float32 (..., n, D)."""
    D = v_codes.shape[-1] * 8 // bits
    codes = unpack_bits(v_codes[..., :n, :].contiguous(), bits, D).float()
    scale = v_scale[..., :n, :].float().repeat_interleave(group, dim=-1)
    zero = v_min[..., :n, :].float().repeat_interleave(group, dim=-1)
    return codes * scale + zero


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float,
                  window: int | None = None) -> torch.Tensor:
    """fp32 softmax attention of one sequence: q (Hq, n, D), k and v (H, L, D); query i of n sees
    tokens 0 .. L - n + i (with ``window``, only the last ``window`` of them); query head hq reads kv head
    hq // (Hq / H)."""
    Hq, NQ, _ = q.shape
    L = k.shape[1]
    k = k.float().repeat_interleave(Hq // k.shape[0], dim=0)
    v = v.float().repeat_interleave(Hq // v.shape[0], dim=0)
    s = q.float() @ k.transpose(-1, -2) * sm_scale  # (Hq, n, L)
    t, last = torch.arange(L, device=q.device)[None, :], (L - NQ + torch.arange(NQ, device=q.device))[:, None]
    hidden = t > last
    if window is not None:
        hidden |= t <= last - window
    s = s.masked_fill(hidden, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def kivi_decode_attention_ref(q, k_codes, k_scale, k_min, k_fp16, v_codes, v_scale, v_min, v_fp16, lengths, *,
                              bits: int, group: int, residual: int, sm_scale: float | None = None,
                              out: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """Pure-torch reference of :func:`kivi_decode_attention`: dequantize, then fp32 softmax attention."""
    B, Hq, NQ, D, H = _check(q, k_codes, k_scale, k_min, k_fp16, v_codes, v_scale, v_min, v_fp16, lengths,
                             bits, group, residual, out)
    check_window(window)
    out = torch.empty_like(q) if out is None else out
    scale = D**-0.5 if sm_scale is None else sm_scale
    for b, L in enumerate(lengths.tolist()):
        nk = L // residual * residual
        nv = max(0, L - residual)
        k = torch.cat([kivi_dequantize_k_ref(k_codes[b], k_scale[b], k_min[b], nk, bits=bits, group=group),
                       k_fp16[b, :, : L - nk].float()], dim=1)
        v = torch.cat([kivi_dequantize_v_ref(v_codes[b], v_scale[b], v_min[b], nv, bits=bits, group=group),
                       v_fp16[b, :, : L - nv].float()], dim=1)
        out[b] = attention_ref(q[b], k, v, scale, window).to(out.dtype)
    return out

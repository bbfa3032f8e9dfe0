"""llama.cpp / ggml block formats ``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1`` (as in its KV cache).

Gerganov et al., ggml and llama.cpp (github.com/ggml-org/ggml, ``ggml/src/ggml-quants.c``:
``quantize_row_q4_0_ref`` and siblings; ``llama.cpp --cache-type-k q4_0``). Blocks of 32 values along
head_dim, one fp16 scale ``d`` per block (and one fp16 minimum ``m`` for the ``_1`` formats). Codes and
dequantized values are identical to ggml's reference quantization, including its float32 details:

* ``_0`` (symmetric): ``max`` is the block value of largest ``|x|``, *with its sign*; ``d = max / -2**(b-1)``,
  ``id = d ? 1/d : 0`` in float32, ``q = min(2**b - 1, (int8_t)(x*id + 2**(b-1) + 0.5))`` (truncation);
  decode ``(q - 2**(b-1)) * d``;
* ``_1`` (asymmetric): ``d = (max - min) / (2**b - 1)``, ``q = min(2**b - 1, (int8_t)((x - min)*id + 0.5))``;
  decode ``q * d + m``;
* ``q8_0``: ``d = max|x| / 127``, ``q = roundf(x * id)`` (round half away from zero, not ``torch.round``).

The scale used for the codes is the float32 ``d``; the fp16 ``d`` (and ``m``) is what is stored and decoded.

Storage, byte-identical to ggml within a block (the block's ``d``/``m``/``qh``/``qs`` fields are split into
separate tensors): ``codes`` uint8 (B, H, T, D/2) with ``qs[j] = q[j] & 15 | (q[j+16] & 15) << 4`` per block
(``q8_0``: (B, H, T, D), the int8 codes as bytes); ``qh`` uint8 (B, H, T, D/8) for q5, the fifth bits as
ggml's little-endian 32-bit ``qh`` (bit j = fifth bit of ``q[j]``); ``scale`` fp16 (B, H, T, D/32); ``min``
fp16 (B, H, T, D/32) for ``_1``. Every token is quantized (no fp16 window).

Two options reproduce what llama.cpp itself computes, beside what it stores (both off by default):

* ``order=interleaved``: blocks are cut in the channel order llama.cpp holds K in for a model whose GGUF file
  stores Q/K with interleaved RoPE pairs (the Llama family: ``convert_hf_to_gguf`` permutes the Q and K
  projections so that channels ``i`` and ``i + D/2`` of the Hugging Face layout sit side by side). A block of
  32 then holds channels ``16b .. 16b+15`` and their partners ``+ D/2``, not 32 neighbours, which changes which
  outlier channels share a scale. V is not permuted in GGUF: use it on K only (``k=q4_0:order=interleaved``).
  The Hadamard rotation, where set, applies after the reordering, as llama.cpp rotates its own layout.
* ``compute=llama.cpp``: the query meets K as llama.cpp's CPU flash-attention kernel computes the dot product:
  converted to the K type's ``vec_dot_type`` (q8_0 for the ``_0`` types and q8_0 itself, q8_1 for the ``_1``
  types, both 32 int8 codes and a scale per block, in the same basis as K), so Q is rounded too. Emulation only
  (``Quantizer.query``); a cache stores K/V and never sees Q, and refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from kvlab.quant.base import Layout, Quantizer
from kvlab.quant.packing import pack_bits, unpack_bits
from kvlab.quant.registry import register

BLOCK = 32
ORDERS = ("contiguous", "interleaved")
COMPUTES = ("kvlab", "llama.cpp")


def roundf(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf``: round half away from zero, exact in float32 (as ``gguf.quants.np_roundf``)."""
    a = x.abs()
    f = a.floor()
    return torch.sign(x) * (f + (2 * (a - f)).floor())


def interleave_order(D: int, device=None) -> torch.Tensor:
    """(D,) long: the Hugging Face channel at each position of llama.cpp's K for a GGUF file holding
    interleaved RoPE pairs: position j holds channel (j % 2) * D/2 + j // 2."""
    j = torch.arange(D, device=device)
    return (j % 2) * (D // 2) + j // 2


def _recip(d: torch.Tensor) -> torch.Tensor:  # ggml: id = d ? 1.0f/d : 0.0f
    safe = torch.where(d == 0, torch.ones_like(d), d)
    return torch.where(d == 0, torch.zeros_like(d), torch.ones_like(d) / safe)


@dataclass
class _GGMLBlock(Quantizer):
    """A ggml block format; subclasses set the code width and whether a block minimum is stored."""

    nbits: ClassVar[int]
    asym: ClassVar[bool]
    choices: ClassVar[dict[str, tuple]] = {"order": ORDERS, "compute": COMPUTES}

    # added after results were keyed: left out of the spec at their defaults
    order: str = field(default="contiguous", metadata={"spec": "non-default"})
    compute: str = field(default="kvlab", metadata={"spec": "non-default"})

    def layout(self):
        if self.nbits == 5 or self.rotate != "none" or self.order != "contiguous" or self.compute != "kvlab":
            return None  # the kernels read unrotated 4- and 8-bit blocks in the model's order, and kvlab's Q
        return Layout("block", self.nbits, fmt=self.name, asym=self.asym, group=BLOCK, along="channel")

    @property
    def max_abs(self):  # fp16 block scale d = amax / 127 (q8_0) or max / -2**(b-1); fp16 minima (q4_1, q5_1)
        return 65504.0 if self.asym else 65504.0 * (127 if self.nbits == 8 else 2 ** (self.nbits - 1))

    def _check_dims(self, T, D):
        if D % BLOCK:
            raise ValueError(f"{self.name}: head_dim D={D} is not a multiple of the block size {BLOCK}; "
                             f"allowed: D a multiple of {BLOCK}")
        if self.order == "interleaved" and D % 2:
            raise ValueError(f"{self.name}: order=interleaved pairs channel i with i + D/2 and needs an even "
                             f"head_dim, got D={D}")

    # ---- llama.cpp's channel order and compute path -------------------------------------------
    def rotated(self, x):
        if self.order == "interleaved":  # (..., D): HF channel (j % 2) * D/2 + j // 2 at GGUF position j
            x = x[..., interleave_order(x.shape[-1], x.device)]
        return super().rotated(x)

    def dequantize(self, packed):
        y = super().dequantize(packed)
        if self.order == "interleaved":
            y = y[..., interleave_order(y.shape[-1], y.device).argsort()]
        return y

    @property
    def query_is_identity(self):
        return self.compute == "kvlab"

    def query(self, q):
        """q (B, Hq, Tq, D). ``compute=llama.cpp``: q rounded as q8_0 stores a value in K's basis (reordered and
        rotated as K is; ``quantize_row_q8_0``: d = max|x| / 127, codes roundf(x / d); q8_1 has the same codes
        and d), taken back to the model's basis."""
        if self.compute == "kvlab":
            return q
        return Q8_0(order=self.order, rotate=self.rotate).roundtrip(q)

    def _params(self, xb):
        """Blocks (..., 32) float32 -> (d, min, q): float32 d and min as ggml computes them, and the codes
        as float32 (``_0``/``_1``: unsigned, in [0, 2**b); ``q8_0``: signed, in [-127, 127])."""
        b = self.nbits
        if self.asym:
            lo, hi = xb.amin(-1, keepdim=True), xb.amax(-1, keepdim=True)
            d = (hi - lo) / (2**b - 1)
            q = torch.trunc((xb - lo) * _recip(d) + 0.5).clamp(max=2**b - 1)
        elif b == 8:
            lo = None
            d = xb.abs().amax(-1, keepdim=True) / 127
            q = roundf(xb * _recip(d))
        else:
            lo = None
            signed_max = xb.gather(-1, xb.abs().argmax(-1, keepdim=True))  # first largest |x|, sign kept
            d = signed_max / -(2 ** (b - 1))
            q = torch.trunc(xb * _recip(d) + (2 ** (b - 1) + 0.5)).clamp(0, 2**b - 1)
        return d, lo, q

    def _quantize(self, x):
        B, H, T, D = x.shape
        xb = x.reshape(B, H, T, D // BLOCK, BLOCK)
        d, lo, q = self._params(xb)
        out = {}
        if self.nbits == 8:
            out["codes"] = q.to(torch.int8).view(torch.uint8).reshape(B, H, T, D)
        else:
            q = q.to(torch.uint8)
            low = q & 15
            out["codes"] = (low[..., :16] | (low[..., 16:] << 4)).reshape(B, H, T, D // 2)
            if self.nbits == 5:
                out["qh"] = pack_bits(q >> 4, 1).reshape(B, H, T, D // 8)
        out["scale"] = d.half().reshape(B, H, T, D // BLOCK)
        if self.asym:
            out["min"] = lo.half().reshape(B, H, T, D // BLOCK)
        return out

    def _codes(self, tensors, shape):  # -> codes (B, H, T, D/32, 32): uint8, or int8 for q8_0
        B, H, T, D = shape
        if self.nbits == 8:
            return tensors["codes"].view(torch.int8).reshape(B, H, T, D // BLOCK, BLOCK)
        qs = tensors["codes"].reshape(B, H, T, D // BLOCK, BLOCK // 2)
        q = torch.cat([qs & 15, qs >> 4], dim=-1)
        if self.nbits == 5:
            qh = unpack_bits(tensors["qh"].reshape(B, H, T, D // BLOCK, 4), 1, BLOCK)
            q = q | (qh << 4)
        return q

    def _dequantize(self, tensors, shape):
        B, H, T, D = shape
        q = self._codes(tensors, shape).float()
        d = tensors["scale"].float().unsqueeze(-1)
        if self.asym:
            y = d * q + tensors["min"].float().unsqueeze(-1)
        elif self.nbits == 8:
            y = d * q
        else:
            y = d * (q - 2 ** (self.nbits - 1))
        return y.reshape(B, H, T, D)

    def _bits(self, T, D):
        per_block = BLOCK * self.nbits + 16 + (16 if self.asym else 0)
        return T * (D // BLOCK) * per_block

    def error_bound(self, x):
        """Half a (float32) step, plus the top code's clamp for ``_0`` formats (the value ``-max`` reads back
        as ``(2**(b-1) - 1) * d``), plus the fp16 rounding of ``d`` (and ``m``) times the largest code."""
        B, H, T, D = x.shape
        xb = x.reshape(B, H, T, D // BLOCK, BLOCK)
        d, lo, _ = self._params(xb)
        d16 = d.half().float()
        a = d.abs()
        if self.asym:
            qmax = 2**self.nbits - 1
            meta = qmax * (d - d16).abs() + (lo - lo.half().float()).abs()
            extra = 0
        elif self.nbits == 8:
            qmax = 127
            meta = qmax * (d - d16).abs()
            extra = 0
        else:
            half = 2 ** (self.nbits - 1)
            qmax = half
            meta = qmax * (d - d16).abs()
            extra = a * (xb * _recip(d) - (half - 0.5)).clamp(min=0)  # clamp of the top code
        slack = 1e-6 * (xb.abs() + qmax * a + (0 if lo is None else lo.abs()))
        return (0.5 * a + extra + meta + slack).reshape(x.shape)


@register
@dataclass
class Q8_0(_GGMLBlock):
    """ggml q8_0: 32 int8 codes (roundf) and an fp16 scale per block: 8.5 bits per value."""

    name = "q8_0"
    nbits = 8
    asym = False


@register
@dataclass
class Q4_0(_GGMLBlock):
    """ggml q4_0: 32 4-bit codes and an fp16 scale per block: 4.5 bits per value."""

    name = "q4_0"
    nbits = 4
    asym = False


@register
@dataclass
class Q4_1(_GGMLBlock):
    """ggml q4_1: 32 4-bit codes, an fp16 scale and an fp16 minimum per block: 5 bits per value."""

    name = "q4_1"
    nbits = 4
    asym = True


@register
@dataclass
class Q5_0(_GGMLBlock):
    """ggml q5_0: 32 5-bit codes (4 low bits in qs, fifth bits in qh) and an fp16 scale: 5.5 bits."""

    name = "q5_0"
    nbits = 5
    asym = False


@register
@dataclass
class Q5_1(_GGMLBlock):
    """ggml q5_1: 32 5-bit codes, an fp16 scale and an fp16 minimum per block: 6 bits per value."""

    name = "q5_1"
    nbits = 5
    asym = True

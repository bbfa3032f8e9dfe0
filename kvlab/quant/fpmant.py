"""``fpmant``: fp16 with its 10-bit mantissa rounded to ``mantissa`` bits (a light, per-value lossy float).

A value is cast to fp16 (round to nearest even), then its mantissa is rounded to ``m`` bits, again to
nearest even, keeping fp16's sign and 5-bit exponent: a (1 + 5 + m)-bit float with fp16's range,
subnormals included. The rounding works on the fp16 bit pattern: the 15-bit magnitude pattern is an
integer that grows with the value, so rounding its low ``10 - m`` bits to nearest even *is* rounding the
value to the nearest m-bit-mantissa float (a carry out of the mantissa steps the exponent up, as it
should). A carry into the infinity exponent saturates at the largest finite m-bit value. With
``mantissa=4`` a value takes 10 bits: the "light lossy" half of a mixed lossless/lossy cache.

Storage: codes ``sign << (5 + m) | exponent << m | mantissa_top_m`` of ``b = 6 + m`` bits, bit-packed
along head_dim: for ``b <= 8`` one ``b``-bit stream ``codes`` uint8 (B, H, T, packed_len(D, b)); for
``b > 8`` the low 8 bits as ``lo`` uint8 (B, H, T, D) and the top ``b - 8`` bits packed as ``hi`` uint8
(B, H, T, packed_len(D, b - 8)). No scales: ``bits_per_value`` is ``b`` plus row padding to whole bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.quant.base import Quantizer
from kvlab.quant.packing import pack_bits, packed_len, unpack_bits
from kvlab.quant.registry import register

MANTISSA = tuple(range(10))  # 10 would be fp16 itself (the ``fp16`` scheme)
_FP16_MAX = torch.finfo(torch.float16).max


def round_mantissa(pattern: torch.Tensor, m: int) -> torch.Tensor:
    """fp16 bit patterns (int32, values in [0, 2**16)) -> (sign (0/1), magnitude code of 5 + m bits).

    Rounds the 10-bit mantissa to ``m`` bits, to nearest even, saturating below infinity.
    """
    shift = 10 - m
    sign = pattern >> 15
    mag = pattern & 0x7FFF  # (exponent << 10) | mantissa
    half = (1 << (shift - 1)) - 1
    code = (mag + half + ((mag >> shift) & 1)) >> shift  # round to nearest, ties to even
    return sign, code.clamp(max=(31 << m) - 1)  # exponent 31 is inf/NaN: saturate


def max_value(m: int) -> float:
    """Largest finite value with an m-bit mantissa and fp16's exponent."""
    return (2 - 2.0**-m) * 2.0**15


@register
@dataclass
class FPMant(Quantizer):
    """fp16 with the mantissa rounded to ``mantissa`` bits, stored as packed (6 + m)-bit codes."""

    name = "fpmant"
    choices = {"mantissa": MANTISSA}

    mantissa: int = 4

    @property
    def code_bits(self) -> int:
        return 6 + self.mantissa

    def _codes(self, x):  # x (B, H, T, D) float32 -> int32 codes of code_bits bits
        x16 = x.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)
        pattern = x16.view(torch.int16).to(torch.int32) & 0xFFFF
        sign, code = round_mantissa(pattern, self.mantissa)
        return (sign << (5 + self.mantissa)) | code

    def _quantize(self, x):
        codes, b = self._codes(x), self.code_bits
        if b <= 8:
            return {"codes": pack_bits(codes.to(torch.uint8), b)}
        return {"lo": (codes & 0xFF).to(torch.uint8), "hi": pack_bits((codes >> 8).to(torch.uint8), b - 8)}

    def _dequantize(self, tensors, shape):
        D, m, b = shape[-1], self.mantissa, self.code_bits
        if b <= 8:
            codes = unpack_bits(tensors["codes"], b, D).to(torch.int32)
        else:
            codes = tensors["lo"].to(torch.int32) | (unpack_bits(tensors["hi"], b - 8, D).to(torch.int32) << 8)
        sign = codes >> (5 + m)
        mag = (codes & ((1 << (5 + m)) - 1)) << (10 - m)
        pattern = (sign << 15) | mag
        return pattern.to(torch.int16).view(torch.float16).float()  # int16 wraps the sign bit in

    @property
    def max_abs(self):  # the values are fp16 bit patterns
        return _FP16_MAX

    def _bits(self, T, D):
        b = self.code_bits
        row = packed_len(D, b) if b <= 8 else D + packed_len(D, b - 8)
        return T * row * 8

    def error_bound(self, x):
        """Half a step of the m-bit mantissa (2**-(m+1) relative, 2**-(15+m) absolute among subnormals),
        plus the fp16 cast before it (double rounding), plus saturation beyond the largest value."""
        m, a = self.mantissa, x.float().abs()
        fi = torch.finfo(torch.float16)
        step = a * 2.0 ** -(m + 1) + 2.0 ** -(15 + m)
        cast = a * fi.eps + fi.smallest_normal * fi.eps  # covers the step growing with the cast
        return step + cast + (a - max_value(m)).clamp(min=0)

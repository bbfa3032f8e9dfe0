"""Plumbing checks and float baselines: ``none`` (keeps the input as is), ``fp16`` and ``bf16`` casts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvlab.quant.base import Layout, Packed, Quantizer, cast_bound
from kvlab.quant.registry import register


@register
@dataclass
class NoQuant(Quantizer):
    """Identity: stores the tensor unchanged, in its own dtype. For checking that hooks change nothing."""

    name = "none"
    window_dtype = None  # the cache holds the caller's values as they are

    def layout(self):
        return Layout("cast", 32, fmt=self.name)

    def _quantize(self, x):  # not reached: quantize is overridden (no float32 detour)
        return {"x": x.clone()}

    def _dequantize(self, tensors, shape):
        return tensors["x"].clone()

    def quantize(self, x):  # no float32 detour: the caller's bits come back exactly
        self.check(x)
        return Packed({"x": x.clone()}, tuple(x.shape), x.dtype)

    def dequantize(self, packed):
        return packed.tensors["x"].clone()

    def stored_input(self, x):
        return x

    def _bits(self, T, D):
        return T * D * 32  # accounted as float32, the dtype the study's models run in

    def error_bound(self, x):
        return torch.zeros_like(x)


@dataclass
class _Cast(Quantizer):
    """Round to a 16-bit float format and back."""

    store: ClassVar[torch.dtype]

    def _quantize(self, x):
        return {"x": x.to(self.store)}

    def _dequantize(self, tensors, shape):
        return tensors["x"].float()

    def layout(self):
        return Layout("cast", 16, fmt=self.name) if self.rotate == "none" else None

    @property
    def max_abs(self):  # beyond it the cast gives Inf
        return torch.finfo(self.store).max

    def _bits(self, T, D):
        return T * D * 16

    def error_bound(self, x):
        return cast_bound(x, self.store)


@register
@dataclass
class FP16(_Cast):
    """IEEE half-precision cast: the usual KV-cache baseline (every delta PPL is measured against it)."""

    name = "fp16"
    store = torch.float16


@register
@dataclass
class BF16(_Cast):
    """bfloat16 cast (8-bit exponent, 7-bit mantissa)."""

    name = "bf16"
    store = torch.bfloat16

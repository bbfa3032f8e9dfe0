"""``fp8``: 8-bit floating-point KV cache, as vLLM stores it (``kv_cache_dtype="fp8_e4m3"|"fp8_e5m2"``).

Formats from Micikevicius et al., "FP8 Formats for Deep Learning" (arXiv:2209.05433): ``e4m3`` is
``torch.float8_e4m3fn`` (max 448, no infinities), ``e5m2`` is ``torch.float8_e5m2`` (max 57344). Scaling
follows vLLM (``vllm/_custom_ops.py: scaled_fp8_quant``; ``k_scale``/``v_scale`` in ``Attention``):
``scale = amax / fmt_max``, codes ``fp8(clamp(x / scale, -fmt_max, fmt_max))``, decode ``fp8 * scale``.

``scale=none`` casts directly (saturating at +-fmt_max); ``scale=tensor`` uses one amax over the whole
(B, H, T, D) tensor, ``scale=head`` one per (batch, head) slice. Both see the whole sequence, so they are
not causal. Scales are fp32, as in vLLM. The per-tensor scale is stored once per (batch, head) slice
(B*H identical copies) so that every slice decodes alone and ``bits_per_value`` does not depend on B*H.

Storage: ``codes`` uint8 (B, H, T, D) (the fp8 bytes), ``scale`` float32 (B, H, 1, 1) unless none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvlab.quant.base import Quantizer
from kvlab.quant.registry import register

FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


@register
@dataclass
class FP8(Quantizer):
    """FP8 (e4m3 / e5m2) cast with an optional per-tensor or per-head fp32 scale (vLLM style)."""

    name = "fp8"
    choices = {"fmt": tuple(FORMATS), "scale": ("none", "tensor", "head")}

    fmt: str = "e4m3"
    scale: str = "none"

    @property
    def causal(self) -> bool:  # an amax over the tensor or the head sees every token
        return self.scale == "none"

    @property
    def _finfo(self):
        return torch.finfo(FORMATS[self.fmt])

    def _scale(self, x):  # (B, H, T, D) -> float32 (B, H, 1, 1), or None
        if self.scale == "none":
            return None
        B, H = x.shape[:2]
        if self.scale == "tensor":
            amax = x.abs().amax().expand(B, H).reshape(B, H, 1, 1)
        else:
            amax = x.abs().amax(dim=(-2, -1), keepdim=True)
        s = amax / self._finfo.max
        return torch.where(s == 0, torch.ones_like(s), s).contiguous()  # all-zero: any scale

    def _quantize(self, x):
        s = self._scale(x)
        fmax = self._finfo.max
        y = (x if s is None else x / s).clamp(-fmax, fmax)
        out = {"codes": y.to(FORMATS[self.fmt]).view(torch.uint8)}
        if s is not None:
            out["scale"] = s
        return out

    def _dequantize(self, tensors, shape):
        y = tensors["codes"].view(FORMATS[self.fmt]).float()
        return y if "scale" not in tensors else y * tensors["scale"]

    def concat(self, packs):  # runs with their own scale do not join (the default would stack 1-token runs)
        return super().concat(packs) if self.scale == "none" or len(packs) == 1 else None

    @property
    def max_abs(self):  # a direct cast saturates at the format's max; an fp32 scale maps any amax onto it
        return self._finfo.max if self.scale == "none" else math.inf

    def _bits(self, T, D):
        return T * D * 8 + (0 if self.scale == "none" else 32)

    def error_bound(self, x):
        fi = self._finfo
        s = self._scale(x)
        s = torch.ones((), dtype=torch.float32) if s is None else s
        # half an fp8 ulp (relative eps/2; subnormals: half the step), saturation, fp32 slack
        y = (x.abs() / s).clamp(max=fi.max)
        rounding = s * (y * fi.eps / 2 + fi.smallest_normal * fi.eps / 2)
        saturation = (x.abs() - fi.max * s).clamp(min=0)
        return rounding + saturation + 1e-6 * x.abs()

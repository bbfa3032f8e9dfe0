"""``int``: uniform integer quantization with per-token, per-channel or per-head (global) scales.

Covers kvmix's strategies 1 (one global scale per head) and 2 (per-token / per-channel groups), and
the ``rounding=truncate`` variant that reproduces the C cast bug ``(int8_t)(x / scale)`` (truncation
toward zero instead of ``nearbyintf``: about 4x the MSE). Uniform affine quantization as in Jacob et
al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference"
(CVPR 2018); per-token and per-channel grouping as in KIVI (Liu et al., ICML 2024).

Layout: ``axis=token`` groups run along head_dim (scale per token per group); ``axis=channel`` groups run
along tokens (scale per channel per group of tokens); ``group=0`` is the whole axis; ``group=global`` is
one scale per (batch, head). Codes are stored unsigned and bit-packed along the grouped axis; scales
(and, for ``sym=false``, minima) are fp16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.quant.base import Quantizer
from kvlab.quant.packing import pack_bits, packed_len, unpack_bits
from kvlab.quant.registry import register

BITS = (2, 3, 4, 5, 6, 8)


def affine_params(x: torch.Tensor, dim, bits: int, sym: bool):
    """Scale (and minimum) over ``dim`` of float32 ``x``, rounded to fp16 as they are stored."""
    if sym:
        qmax = 2 ** (bits - 1) - 1
        scale = (x.abs().amax(dim=dim, keepdim=True) / qmax).half()
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # all-zero group: any scale
        return scale, None
    lo = x.amin(dim=dim, keepdim=True).half()
    hi = x.amax(dim=dim, keepdim=True)
    # clamp: a nearly constant group's fp16 minimum can round above its maximum (no negative scales)
    scale = ((hi - lo.float()).clamp(min=0) / (2**bits - 1)).half()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale, lo


def to_codes(x, scale, lo, bits: int, rounding: str) -> torch.Tensor:
    """float32 x -> unsigned codes in [0, 2**bits) (symmetric codes are offset by 2**(bits-1))."""
    if lo is None:
        q = x / scale.float()
        q = torch.round(q) if rounding == "nearest" else torch.trunc(q)
        q = q.clamp(-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) + 2 ** (bits - 1)
    else:
        q = (x - lo.float()) / scale.float()
        q = torch.round(q) if rounding == "nearest" else torch.trunc(q)
        q = q.clamp(0, 2**bits - 1)
    return q.to(torch.uint8)


def from_codes(codes, scale, lo, bits: int) -> torch.Tensor:
    if lo is None:
        return (codes.float() - 2 ** (bits - 1)) * scale.float()
    return codes.float() * scale.float() + lo.float()


def affine_bound(x, scale, lo, bits: int, rounding: str) -> torch.Tensor:
    """Element-wise bound on ``|x - from_codes(to_codes(x))|`` for the stored (fp16) scale and minimum.

    Half a step inside the representable range (a whole step when truncating), plus the distance to that
    range outside it (clamping: an fp16 scale rounded down, a subnormal scale, an fp16 minimum rounded
    above the true minimum), plus float32 arithmetic slack.
    """
    s = scale.float()
    step = s * (0.5 if rounding == "nearest" else 1.0)
    if lo is None:
        top = (2 ** (bits - 1) - 1) * s
        outside = (x.abs() - top).clamp(min=0)
        slack = 1e-6 * (x.abs() + top)
    else:
        lo = lo.float()
        top = lo + (2**bits - 1) * s
        outside = (lo - x).clamp(min=0) + (x - top).clamp(min=0)
        slack = 1e-6 * (x.abs() + lo.abs() + top.abs())
    return step + outside + slack


@register
@dataclass
class IntQuant(Quantizer):
    """Uniform integer quantization (see module docstring)."""

    name = "int"
    choices = {"bits": BITS, "axis": ("token", "channel"), "sym": (True, False),
               "rounding": ("nearest", "truncate")}

    bits: int = 8
    axis: str = "token"
    group: int | str = 0
    sym: bool = True
    rounding: str = "nearest"

    def __post_init__(self):
        super().__post_init__()
        if self.group != "global" and (not isinstance(self.group, int) or self.group < 0):
            raise ValueError(f"int: group={self.group!r} is not allowed; allowed: 0 (whole axis), a positive "
                             "integer, or 'global'")

    @property
    def causal(self) -> bool:  # whole-axis channel scales and global scales see the whole sequence
        return self.axis == "token" and self.group != "global"

    def family_label(self) -> str:
        return "int (truncate)" if self.rounding == "truncate" else super().family_label()

    def _check_dims(self, T, D):
        if self.axis == "token" and isinstance(self.group, int) and self.group and D % self.group:
            raise ValueError(f"int: group={self.group} does not divide head_dim D={D}; "
                             f"allowed: a divisor of {D}, or 0 for the whole head_dim")

    def _group_len(self, n: int) -> int:
        return n if self.group == 0 else min(self.group, n)

    def _grouped(self, x):  # (B, H, T, D) -> (B, H, rows, n_groups, g) with groups on the last dim
        B, H, T, D = x.shape
        if self.group == "global":
            return x.reshape(B, H, 1, 1, T * D)
        rows = x if self.axis == "token" else x.transpose(-1, -2)  # (B, H, rows, n)
        n = rows.shape[-1]
        g = self._group_len(n)
        pad = (-n) % g
        if pad:  # a trailing partial group along tokens: pad with a copy of its last value
            rows = torch.cat([rows, rows[..., -1:].expand(*rows.shape[:-1], pad)], -1)
        return rows.reshape(*rows.shape[:-1], -1, g)

    def _quantize(self, x):
        xg = self._grouped(x)
        scale, lo = affine_params(xg, -1, self.bits, self.sym)
        codes = to_codes(xg, scale, lo, self.bits, self.rounding).flatten(-2)
        n = x.shape[-1] if self.axis == "token" else x.shape[-2]
        if self.group == "global":
            n = x.shape[-1] * x.shape[-2]
        out = {"codes": pack_bits(codes[..., :n].contiguous(), self.bits), "scale": scale}
        if lo is not None:
            out["min"] = lo
        return out

    def _dequantize(self, tensors, shape):
        B, H, T, D = shape
        n = D if self.axis == "token" else T
        if self.group == "global":
            n = T * D
        codes = unpack_bits(tensors["codes"], self.bits, n)
        scale, lo = tensors["scale"], tensors.get("min")
        g = scale.shape[-2]
        pad = g * (self._group_len(n) if self.group != "global" else n) - n
        if pad:
            codes = torch.cat([codes, codes[..., -1:].expand(*codes.shape[:-1], pad)], -1)
        codes = codes.reshape(*codes.shape[:-1], g, -1)
        y = from_codes(codes, scale, lo, self.bits).flatten(-2)[..., :n]
        if self.group == "global":
            return y.reshape(B, H, T, D)
        return y if self.axis == "token" else y.transpose(-1, -2)

    def concat(self, packs):
        """Only per-token layouts join (tokens on dim 2); channel groups and global scales span a run."""
        if len(packs) > 1 and (self.axis != "token" or self.group == "global"):
            return None
        return super().concat(packs)

    @property
    def max_abs(self):  # fp16 scales (amax / qmax when symmetric) and fp16 minima
        return 65504.0 * (2 ** (self.bits - 1) - 1) if self.sym else 65504.0

    def _bits(self, T, D):
        meta = 16 if self.sym else 32
        if self.group == "global":
            return packed_len(T * D, self.bits) * 8 + meta
        rows, n = (T, D) if self.axis == "token" else (D, T)
        groups = -(-n // self._group_len(n))
        return rows * (packed_len(n, self.bits) * 8 + groups * meta)

    def error_bound(self, x):
        xg = self._grouped(x.float())
        scale, lo = affine_params(xg, -1, self.bits, self.sym)
        bound = affine_bound(xg, scale, lo, self.bits, self.rounding).flatten(-2)
        if self.group == "global":
            return bound[..., : x.shape[-1] * x.shape[-2]].reshape(x.shape)
        n = x.shape[-1] if self.axis == "token" else x.shape[-2]
        bound = bound[..., :n]
        return bound if self.axis == "token" else bound.transpose(-1, -2)

"""``signmag``: 1- and 2-bit sign + magnitude codes (the kv-compressor family, versions ``v=1..4``).

Each row is one token's head_dim vector. A value is stored as its sign (and, in v4, one level bit) and read
back as ``sign * magnitude``; the magnitudes are fp16 means of ``|x|``, the L1-optimal amplitude for a sign
code (the same estimator as 1-bit sign compression of gradients: Bernstein et al., "signSGD", ICML 2018;
Seide et al., "1-Bit Stochastic Gradient Descent", Interspeech 2014).

* ``v=1``: one sign bit per value, one fp16 magnitude per row: ``mean |row|``;
* ``v=2``: v1 plus the ``outliers`` channels of largest ``|x|`` per row kept exactly (fp16 value + uint8
  channel index), excluded from the magnitude mean;
* ``v=3``: v2 with one inlier magnitude per ``group`` channels instead of one per row (a group whose
  channels are all outliers gets magnitude 0);
* ``v=4``: two bits per value, the sign and a level bit choosing between two per-row magnitudes: the mean
  ``|x|`` of the inliers at or below the row's (lower) median inlier ``|x|``, and of those above it; plus
  the outliers of v2.

Zero reads back as ``+magnitude``. The error of an inlier is ``||x| - m| <= max(|x|, m)`` (the sign is
always right), which is what :meth:`SignMag.error_bound` returns; outliers carry fp16 rounding only.

Storage: ``codes`` uint8 (B, H, T, D/8) packed sign bits (1 = non-negative), v4: (B, H, T, D/4) 2-bit codes
``sign | level << 1``; ``mag`` fp16 (B, H, T, M) with M = 1 (v1, v2), D/group (v3), 2 (v4: low, high);
``out_val`` fp16 and ``out_idx`` uint8 (B, H, T, outliers) for v >= 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.quant.base import Quantizer, cast_bound
from kvlab.quant.packing import pack_bits, packed_len, unpack_bits
from kvlab.quant.registry import register


def _masked_mean(a, mask, dim=-1):
    """Mean of ``a`` over ``dim`` where ``mask``; 0 where the mask is empty."""
    n = mask.sum(dim, keepdim=True)
    return torch.where(mask, a, 0).sum(dim, keepdim=True) / n.clamp(min=1)


@register
@dataclass
class SignMag(Quantizer):
    """Sign + magnitude codes, 1 or 2 bits per value, with optional exact outliers (see module docstring)."""

    name = "signmag"
    choices = {"v": (1, 2, 3, 4)}

    v: int = 1
    outliers: int = 4  # used by v >= 2
    group: int = 16  # used by v = 3

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.outliers, int) or self.outliers < 0:
            raise ValueError(f"signmag: outliers={self.outliers!r} is not allowed; allowed: an integer >= 0 "
                             "(and < head_dim)")
        if not isinstance(self.group, int) or self.group < 1:
            raise ValueError(f"signmag: group={self.group!r} is not allowed; allowed: a positive divisor of "
                             "head_dim")

    @property
    def n_outliers(self) -> int:
        return 0 if self.v == 1 else self.outliers

    @property
    def code_bits(self) -> int:
        return 2 if self.v == 4 else 1

    @property
    def max_abs(self):  # fp16 magnitudes and outliers
        return 65504.0

    def _check_dims(self, T, D):
        k = self.n_outliers
        if k and k >= D:
            raise ValueError(f"signmag: outliers={k} must be < head_dim D={D}; allowed: 0 .. {D - 1}")
        if k and D > 256:
            raise ValueError(f"signmag: head_dim D={D} > 256 cannot be indexed by uint8 outlier indices; "
                             "allowed: D <= 256, or v=1")
        if self.v == 3 and D % self.group:
            raise ValueError(f"signmag: group={self.group} does not divide head_dim D={D}; allowed: a "
                             f"divisor of {D}")

    def _encode(self, x):
        """x (B, H, T, D) float32 -> dict of codes (uint8), magnitudes (fp16), outliers and, for the
        bound, the per-value magnitude ``m`` (float32) and the inlier mask."""
        B, H, T, D = x.shape
        a = x.abs()
        k = self.n_outliers
        inlier = torch.ones_like(x, dtype=torch.bool)
        idx = torch.zeros(B, H, T, 0, dtype=torch.long)
        if k:
            idx = a.topk(k, dim=-1).indices
            inlier.scatter_(-1, idx, False)
        level = None
        if self.v in (1, 2):
            mag = _masked_mean(a, inlier).half()  # (B, H, T, 1)
            m = mag.float().expand_as(x)
        elif self.v == 3:
            g = self.group
            mag = _masked_mean(a.reshape(B, H, T, D // g, g), inlier.reshape(B, H, T, D // g, g))
            mag = mag.squeeze(-1).half()  # (B, H, T, D/g)
            m = mag.float().repeat_interleave(g, dim=-1)
        else:
            # lower median of the inliers (outliers sort last as +inf)
            median = torch.where(inlier, a, torch.inf).kthvalue((D - k + 1) // 2, dim=-1, keepdim=True).values
            level = a > median
            lo = _masked_mean(a, inlier & ~level)
            hi = _masked_mean(a, inlier & level)
            mag = torch.cat([lo, hi], -1).half()  # (B, H, T, 2)
            m = torch.where(level, mag[..., 1:].float(), mag[..., :1].float())
        codes = (x >= 0).to(torch.uint8)
        if level is not None:
            codes = codes | ((level & inlier).to(torch.uint8) << 1)
        return {"codes": codes, "mag": mag, "idx": idx, "m": m, "inlier": inlier}

    def _quantize(self, x):
        e = self._encode(x)
        out = {"codes": pack_bits(e["codes"], self.code_bits), "mag": e["mag"]}
        if self.n_outliers:
            out["out_val"] = x.gather(-1, e["idx"]).half()
            out["out_idx"] = e["idx"].to(torch.uint8)
        return out

    def _dequantize(self, tensors, shape):
        B, H, T, D = shape
        codes = unpack_bits(tensors["codes"], self.code_bits, D)
        mag = tensors["mag"].float()
        if self.v == 3:
            m = mag.repeat_interleave(self.group, dim=-1)
        elif self.v == 4:
            m = torch.where((codes >> 1) == 1, mag[..., 1:], mag[..., :1])
        else:
            m = mag
        y = torch.where((codes & 1) == 1, m, -m).expand(B, H, T, D).contiguous()
        if self.n_outliers:
            y.scatter_(-1, tensors["out_idx"].long(), tensors["out_val"].float())
        return y

    def _bits(self, T, D):
        n_mag = {1: 1, 2: 1, 3: D // self.group, 4: 2}[self.v]
        return T * (packed_len(D, self.code_bits) * 8 + n_mag * 16 + self.n_outliers * (16 + 8))

    def error_bound(self, x):
        e = self._encode(x)
        exact = cast_bound(x)  # outliers: fp16 rounding
        return torch.where(e["inlier"], torch.maximum(x.abs(), e["m"]) * (1 + 1e-6), exact)

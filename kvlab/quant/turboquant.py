"""``turboquant``: a random rotation, then a Lloyd-Max scalar codebook per coordinate (TurboQuant: Zandieh
et al., "TurboQuant: Online Vector Quantization with Near-optimal Distortion Rate", 2025), with an optional
1-bit QJL sketch of the residual (Zandieh et al., "QJL: 1-Bit Quantized JL Transform for KV Cache
Quantization with Zero Overhead", 2024).

Each token's head_dim vector x (one row of (B, H, T, D)) is stored as its norm ``||x||`` (fp16) and the
codes of ``y = P x / ||x||``, where P is a random orthogonal D x D matrix drawn from ``seed`` (QR of a
Gaussian matrix with the signs of R's diagonal folded in, so P is Haar-distributed). P is not stored: any
reader regenerates it from the seed. After the rotation every coordinate of y follows the distribution of
one coordinate of a uniform point on the sphere, density proportional to (1 - t^2)^((D-3)/2) on [-1, 1]
(near N(0, 1/D)), whatever x was; each coordinate is rounded to the nearest level of the Lloyd-Max
(MSE-optimal) codebook of that density, computed once per (D, bits) on a fine grid.

``qjl=true`` (TurboQuant's inner-product variant): the codebook gets ``bits - 1`` bits and the last bit of
each coordinate is a sign of ``S r``, where ``r = y - y_hat`` is the codebook's residual and S a Gaussian
D x D matrix drawn from the seed; the residual reads back as ``sqrt(pi/2) / D * ||r|| * S^T sign(S r)``,
an unbiased estimate of r (so of every inner product with it), with ``||r||`` stored in fp16.

Storage per token and head: ``codes`` uint8 (B, H, T, packed_len(D, b)) with b = bits (bits - 1 with qjl),
``norm`` fp16 (B, H, T, 1); with qjl also ``sign`` uint8 (B, H, T, packed_len(D, 1)) and ``rnorm`` fp16
(B, H, T, 1). Bits per value: b + 16/D, plus 1 + 16/D with qjl (whole bytes per row counted). Every token
is coded alone with fixed matrices, so the scheme is causal: the cache stores it token by token. A norm
beyond fp16's range is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvlab.quant.base import Quantizer
from kvlab.quant.packing import pack_bits, packed_len, unpack_bits
from kvlab.quant.registry import register

BITS = (1, 2, 3, 4)
_GRID = 1 << 16  # points of the grid on which the codebook is fitted
_LLOYD_STEPS = 300
_FP16_MAX = float(torch.finfo(torch.float16).max)

_CODEBOOKS: dict[tuple[int, int], torch.Tensor] = {}
_MATRICES: dict[tuple[str, int, int, str], torch.Tensor] = {}


def sphere_codebook(D: int, bits: int) -> torch.Tensor:
    """The 2**bits Lloyd-Max levels (float64, ascending) for one coordinate of a uniform point on the unit
    sphere in D dimensions: Lloyd's iterations on a fine grid weighted by the density, over [-1, 1] cut to
    12 standard deviations (1/sqrt(D) each; the mass beyond is below 1e-30)."""
    key = (D, bits)
    if key not in _CODEBOOKS:
        lim = min(1.0, 12 / math.sqrt(D))
        t = torch.linspace(-lim, lim, _GRID + 2, dtype=torch.float64)[1:-1]
        w = (1 - t * t).clamp(min=0) ** ((D - 3) / 2) if D > 3 else torch.ones_like(t)
        cdf = torch.cumsum(w, 0) / w.sum()
        n = 2**bits
        levels = t[torch.searchsorted(cdf, (torch.arange(n, dtype=torch.float64) + 0.5) / n).clamp(max=t.numel() - 1)]
        for _ in range(_LLOYD_STEPS):
            cell = torch.bucketize(t, (levels[1:] + levels[:-1]) / 2)
            mass = torch.bincount(cell, weights=w, minlength=n)
            new = torch.bincount(cell, weights=w * t, minlength=n) / mass.clamp(min=1e-300)
            levels = torch.where(mass > 0, new, levels)
        _CODEBOOKS[key] = levels
    return _CODEBOOKS[key]


def _matrix(kind: str, D: int, seed: int, device) -> torch.Tensor:
    """The seeded D x D float64 matrix ``kind``: "rotation" (Haar-random orthogonal) or "sketch" (Gaussian).
    Products with it run in float64, so a row's result does not depend on how many rows share the call (a
    cache codes tokens a few at a time, the emulation a whole window at once: the codes must agree)."""
    key = (kind, D, seed, str(device))
    if key not in _MATRICES:
        g = torch.Generator().manual_seed(seed * 2 + (kind == "sketch"))
        m = torch.randn(D, D, generator=g, dtype=torch.float64)
        if kind == "rotation":
            q, r = torch.linalg.qr(m)
            m = q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1)
        _MATRICES[key] = m.to(device=device)
    return _MATRICES[key]


@register
@dataclass
class TurboQuant(Quantizer):
    """Random rotation + Lloyd-Max scalar codebook per coordinate, per-vector fp16 norm, optional 1-bit QJL
    residual sketch (see module docstring)."""

    name = "turboquant"
    choices = {"bits": BITS, "qjl": (False, True)}

    bits: int = 4
    qjl: bool = False
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.qjl and self.bits < 2:
            raise ValueError(f"turboquant: bits={self.bits} with qjl=true leaves no codebook bit; allowed: bits "
                             "2, 3, 4 with qjl=true (1 bit of them is the sign sketch)")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"turboquant: seed={self.seed!r} is not allowed; allowed: an integer >= 0")

    @property
    def codebook_bits(self) -> int:
        return self.bits - 1 if self.qjl else self.bits

    def _check_dims(self, T, D):
        if D < 2:
            raise ValueError(f"turboquant: head_dim D={D} is too small to rotate; allowed: D >= 2")

    def _encode(self, x: torch.Tensor):
        """x (B, H, T, D) float32 -> (norm fp16 (B, H, T, 1), codes (.., D) int64, y the rotated unit rows and
        y_hat their codebook values in float64)."""
        D = x.shape[-1]
        x = x.double()
        norm = x.norm(dim=-1, keepdim=True)
        big = norm > _FP16_MAX
        if big.any():
            raise ValueError(f"turboquant: a token's head vector has norm {norm.max().item():.6g}, beyond the fp16 "
                             f"range of the stored norm (at most {_FP16_MAX:g}); allowed: finite K/V whose per-"
                             "token head-vector norm fits in fp16")
        y = (x / norm.clamp(min=torch.finfo(torch.float64).tiny)) @ _matrix("rotation", D, self.seed, x.device).T
        levels = sphere_codebook(D, self.codebook_bits).to(device=x.device)
        codes = torch.bucketize(y, (levels[1:] + levels[:-1]) / 2)
        return norm.to(torch.float16), codes, y, levels[codes]

    def _quantize(self, x):
        norm, codes, y, y_hat = self._encode(x)
        out = {"codes": pack_bits(codes.to(torch.uint8), self.codebook_bits), "norm": norm}
        if self.qjl:
            r = y - y_hat
            proj = r @ _matrix("sketch", x.shape[-1], self.seed, x.device).T
            out["sign"] = pack_bits((proj >= 0).to(torch.uint8), 1)
            out["rnorm"] = r.norm(dim=-1, keepdim=True).to(torch.float16)
        return out

    def _dequantize(self, tensors, shape):
        D = shape[-1]
        device = tensors["codes"].device
        levels = sphere_codebook(D, self.codebook_bits).to(device=device)
        y_hat = levels[unpack_bits(tensors["codes"], self.codebook_bits, D).long()]
        if self.qjl:
            signs = unpack_bits(tensors["sign"], 1, D).double() * 2 - 1
            sketch = _matrix("sketch", D, self.seed, device)
            y_hat = y_hat + math.sqrt(math.pi / 2) / D * tensors["rnorm"].double() * (signs @ sketch)
        return (tensors["norm"].double() * (y_hat @ _matrix("rotation", D, self.seed, device))).float()

    def _bits(self, T, D):
        row = 8 * packed_len(D, self.codebook_bits) + 16
        if self.qjl:
            row += 8 * packed_len(D, 1) + 16
        return T * row

    def error_bound(self, x):
        """|x_i - x_hat_i| <= ||x - x_hat||_2 <= | ||x|| - norm16 | * ||y_hat|| + norm16 * ||y - y_hat||_2 (the
        rotation keeps lengths), with the QJL estimate's own error bounded by ||r|| (1 + sqrt(pi/2)/D *
        max_i sum_j |S_ji|); plus float32 matmul rounding."""
        D = x.shape[-1]
        norm16, _, y, y_hat = self._encode(x)
        n, n16 = x.double().norm(dim=-1, keepdim=True), norm16.double()
        if self.qjl:
            r = (y - y_hat).norm(dim=-1, keepdim=True)
            col = _matrix("sketch", D, self.seed, x.device).abs().sum(0).max()
            rn16 = r.to(torch.float16).double()
            resid = r + rn16 * math.sqrt(math.pi / 2) / D * col * math.sqrt(D)
            y_len = y_hat.norm(dim=-1, keepdim=True) + rn16 * math.sqrt(math.pi / 2) / D * col * math.sqrt(D)
        else:
            resid = (y - y_hat).norm(dim=-1, keepdim=True)
            y_len = y_hat.norm(dim=-1, keepdim=True)
        rounding = torch.finfo(torch.float32).eps * (n + n16) * (1 + y_len)  # the float32 result's rounding
        return (((n - n16).abs() * y_len + n16 * resid) * (1 + 1e-9) + rounding).float() + 0 * x

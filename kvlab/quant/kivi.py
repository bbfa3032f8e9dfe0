"""``kivi``: KIVI's tuning-free asymmetric 2/4-bit KV cache (per-channel K, per-token V, fp16 window).

Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (ICML 2024), reference code
github.com/jy-yuan/KIVI (``models/llama_kivi.py``, ``quant/new_pack.py``).

Quantization: asymmetric, round to nearest, an fp16 scale and an fp16 minimum per group, as
:func:`kvlab.quant.uniform.affine_params` computes them (``min`` rounded to fp16 first, then
``scale = max(max - min, 0) / (2**bits - 1)`` rounded to fp16, a zero scale replaced by 1;
``code = clamp(round((x - min) / scale), 0, 2**bits - 1)``, ``x_hat = code * scale + min``). K is quantized per
channel, each group spanning ``group`` consecutive tokens of one channel; V per token, each group spanning
``group`` consecutive channels of one token's head_dim vector.

Streaming rule, exactly as KIVI's reference code (prefill and decode agree on it): when the cache holds
L tokens,

* K: the first ``floor(L / residual) * residual`` tokens are quantized (prefill quantizes every full
  ``residual`` block; in decode the fp16 window grows until it holds ``residual`` tokens and is then
  quantized as a whole), the remaining ``L mod residual`` tokens are an fp16 window;
* V: the first ``max(0, L - residual)`` tokens are quantized, the last ``min(L, residual)`` are fp16 (in
  decode, the oldest window token is quantized each time the window would exceed ``residual``).

``quantize(x)`` with x of T tokens stores exactly that state at L = T. Storage (the Triton kernels read
this layout), with Tq the number of quantized tokens:

* K: ``codes`` uint8 (B, H, D, Tq*bits/8), the codes transposed to (B, H, D, Tq) and packed along tokens
  with :func:`~kvlab.quant.packing.pack_bits`; ``scale``, ``min`` fp16 (B, H, Tq/group, D);
* V: ``codes`` uint8 (B, H, Tq, D*bits/8), packed along head_dim; ``scale``, ``min`` fp16
  (B, H, Tq, D/group);
* both: ``fp16`` fp16 (B, H, T - Tq, D), the unquantized window.

A cache that moves tokens out of its window calls :meth:`KIVI.quantize_all` on them (every token quantized,
an empty ``fp16``) and :meth:`KIVI.concat` to append the run to the ones before, in the same layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.quant.base import Layout, Packed, Quantizer, cast_bound
from kvlab.quant.packing import pack_bits, packed_len, unpack_bits
from kvlab.quant.registry import register
from kvlab.quant.uniform import affine_bound, affine_params, from_codes, to_codes


@register
@dataclass
class KIVI(Quantizer):
    """KIVI (Liu et al., ICML 2024): per-channel K, per-token V, asymmetric, recent tokens in fp16."""

    name = "kivi"
    choices = {"bits": (2, 4), "tensor": ("k", "v")}

    bits: int = 2
    group: int = 32
    residual: int = 128
    tensor: str = "k"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.group, int) or self.group < 1:
            raise ValueError(f"kivi: group={self.group!r} is not allowed; allowed: a positive integer")
        if not isinstance(self.residual, int) or self.residual < 1:
            raise ValueError(f"kivi: residual={self.residual!r} is not allowed; allowed: a positive integer")
        if self.residual % self.group:  # name group first: residual is often the default the user never set
            up = -(-self.residual // self.group) * self.group
            raise ValueError(f"kivi: group={self.group} does not divide residual={self.residual} (K is quantized in "
                             f"blocks of residual tokens made of whole groups); allowed: a residual that is a multiple of "
                             f"group={self.group} (e.g. residual={up}), or a group that divides {self.residual}")

    def layout(self):
        if self.rotate != "none":  # the kernels read unrotated codes
            return None
        return Layout("group", self.bits, fmt="kivi", asym=True, group=self.group,
                      along="token" if self.tensor == "k" else "channel", window=self.residual)

    @property
    def max_abs(self):  # fp16 minima
        return 65504.0

    def _check_dims(self, T, D):
        if self.tensor == "v" and D % self.group:
            raise ValueError(f"kivi: group={self.group} does not divide head_dim D={D} (V is grouped along "
                             f"head_dim); allowed: a group that divides {D}")

    def n_quantized(self, L: int) -> int:
        """Tokens quantized when the cache holds L tokens (the rest are the fp16 window)."""
        if self.tensor == "k":
            return L // self.residual * self.residual
        return max(0, L - self.residual)

    def fp16_tokens(self, L):
        return torch.arange(L) >= self.n_quantized(L)

    def _groups(self, xq):  # quantized part (B, H, Tq, D) -> (B, H, rows, n_groups, group)
        B, H, Tq, D = xq.shape
        if self.tensor == "k":  # (B, H, Tq/g, g, D) -> groups of tokens on the last dim
            return xq.reshape(B, H, Tq // self.group, self.group, D).transpose(-1, -2)
        return xq.reshape(B, H, Tq, D // self.group, self.group)

    def _quantize(self, x):
        return self._pack(x, self.n_quantized(x.shape[-2]))

    def quantize_all(self, x):
        """Quantize every token of x (B, H, T, D), no fp16 window: what a cache stores for tokens leaving
        its window. K needs whole groups (T a multiple of ``group``). Runs join with :meth:`concat`."""
        self.check(x)
        if self.tensor == "k" and x.shape[-2] % self.group:
            raise ValueError(f"kivi: quantize_all of K needs whole groups of tokens; got T={x.shape[-2]}, "
                             f"allowed: a multiple of group={self.group}")
        return Packed(self._pack(self.rotated(x), x.shape[-2]), tuple(x.shape), x.dtype)

    def concat(self, packs):
        """Join runs of consecutive tokens from :meth:`quantize_all` (no fp16 window) into one Packed in
        the layout above; None if a run holds a window or K runs do not end on whole bytes."""
        if len(packs) == 1:
            return packs[0]
        if any(p.tensors["fp16"].shape[-2] for p in packs) or (
            self.tensor == "k" and any(p.shape[2] * self.bits % 8 for p in packs)
        ):
            return None
        code_dim = 3 if self.tensor == "k" else 2  # K codes run along tokens on the last dim
        tensors = {name: torch.cat([p.tensors[name] for p in packs], dim=code_dim if name == "codes" else 2)
                   for name in packs[0].tensors}
        shape = (*packs[0].shape[:2], sum(p.shape[2] for p in packs), packs[0].shape[3])
        return Packed(tensors, shape, packs[0].dtype)

    def _pack(self, x, Tq):  # x (B, H, T, D) float32; the first Tq tokens are quantized
        xq, window = x[..., :Tq, :], x[..., Tq:, :]
        xg = self._groups(xq)
        scale, lo = affine_params(xg, -1, self.bits, sym=False)
        codes = to_codes(xg, scale, lo, self.bits, "nearest")
        if self.tensor == "k":  # (B, H, Tq/g, D, g) -> (B, H, D, Tq), packed along tokens
            codes = codes.permute(0, 1, 3, 2, 4).flatten(-2)
        else:  # (B, H, Tq, D/g, g) -> (B, H, Tq, D), packed along head_dim
            codes = codes.flatten(-2)
        return {
            "codes": pack_bits(codes.contiguous(), self.bits),
            "scale": scale.squeeze(-1),
            "min": lo.squeeze(-1),
            "fp16": window.half(),
        }

    def _dequantize(self, tensors, shape):
        B, H, T, D = shape
        Tq = T - tensors["fp16"].shape[-2]
        scale, lo = tensors["scale"].unsqueeze(-1), tensors["min"].unsqueeze(-1)
        if self.tensor == "k":
            codes = unpack_bits(tensors["codes"], self.bits, Tq)  # (B, H, D, Tq)
            codes = codes.reshape(B, H, D, Tq // self.group, self.group).transpose(2, 3)
            xq = from_codes(codes, scale, lo, self.bits).transpose(-1, -2).reshape(B, H, Tq, D)
        else:
            codes = unpack_bits(tensors["codes"], self.bits, D).reshape(B, H, Tq, D // self.group, self.group)
            xq = from_codes(codes, scale, lo, self.bits).reshape(B, H, Tq, D)
        return torch.cat([xq, tensors["fp16"].float()], dim=-2)

    def _bits(self, T, D):
        Tq = self.n_quantized(T)
        window = (T - Tq) * D * 16
        if self.tensor == "k":
            return D * packed_len(Tq, self.bits) * 8 + (Tq // self.group) * D * 32 + window
        return Tq * packed_len(D, self.bits) * 8 + Tq * (D // self.group) * 32 + window

    def error_bound(self, x):
        Tq = self.n_quantized(x.shape[-2])
        xg = self._groups(x[..., :Tq, :])
        scale, lo = affine_params(xg, -1, self.bits, sym=False)
        bound = affine_bound(xg, scale, lo, self.bits, "nearest")
        if self.tensor == "k":
            bound = bound.transpose(-1, -2)
        bound = bound.reshape(*x.shape[:2], Tq, x.shape[-1])
        window = x[..., Tq:, :]
        return torch.cat([bound, cast_bound(window)], dim=-2)

"""``kvquant``: non-uniform codebook quantization with dense-and-sparse outliers and attention sinks.

Hooper et al., "KVQuant: Towards 10 Million Context Length LLM Inference with KV Cache Quantization"
(NeurIPS 2024), github.com/SqueezeAILab/KVQuant. What is kept from the paper, and what is simplified:

* K per channel, before RoPE (``prerope`` is True for K), V per token. Each vector (one channel of K over
  the tokens, one token of V over head_dim) is normalized to [-1, 1] by the fp16 midpoint ``zero`` and
  half-range ``scale`` of its inliers (a constant vector gets ``scale = 0`` and decodes to ``zero``). The
  paper calibrates the K ranges offline; here they are computed from the tensor, so K is never causal.
* Non-uniform datatype: a codebook of ``2**bits`` fp16 levels in normalized space, fit by 1-D k-means
  (Lloyd, deterministic init at the quantiles ``(i + 1/2) / 2**bits``, at most 25 iterations) on the
  normalized inliers. The paper weights k-means by Fisher information; this is unweighted. ``calibrate(x)``
  returns a copy holding one codebook fit on calibration tensors (one per layer and K/V, as in the paper).
  Uncalibrated, ``quantize`` fits one codebook per (batch, head) slice on the input itself, so it is not
  causal. Codes are the nearest level.
* Dense-and-sparse: the ``ceil(outlier_frac * L)`` values of largest ``|x|`` in each vector of length L are
  kept in fp16 with their positions in the vector (uint8 when L <= 256, else int16, else int32), and
  excluded from the range and the codebook fit.
* Attention sinks: the first ``sinks`` tokens (default 0) are kept in fp16 (``fp16_tokens``) and not
  quantized. Defaults: ``bits=3`` (the paper's headline), ``outlier_frac=0.01``.

Storage, with Tq = T - min(sinks, T) quantized tokens and vectors (n, L) = (D, Tq) for K, (Tq, D) for V:
``codes`` uint8 (B, H, n, packed_len(L, bits)) packed along each vector; ``scale``, ``zero`` fp16 (B, H, n);
``out_val`` fp16 and ``out_idx`` (B, H, n, n_outliers); ``codebook`` fp16 (B, H, 2**bits) (a calibrated
codebook is stored once per slice so that each slice decodes alone); ``fp16`` fp16 (B, H, min(sinks, T),
D). With Tq = 0 only ``fp16`` is stored. Every one of these bytes is counted by ``bits_per_value``.
``quantize_all`` (for a cache) quantizes sinks too; its runs keep their own ranges and do not ``concat``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from kvlab.quant.base import Packed, Quantizer, cast_bound, check_choice
from kvlab.quant.packing import pack_bits, packed_len, unpack_bits
from kvlab.quant.registry import register

KMEANS_ITERS = 25


def kmeans_1d(u: torch.Tensor, valid: torch.Tensor, k: int, iters: int = KMEANS_ITERS) -> torch.Tensor:
    """Lloyd's 1-D k-means on each row. u, valid (S, N) float32 / bool -> sorted centroids (S, k).

    Deterministic: starts at the quantiles ``(i + 1/2) / k`` of each row's valid values; an empty cluster
    keeps its centroid; a row with no valid value gets ``linspace(-1, 1, k)``. A value goes to the nearest
    centroid (the lower one on a tie), as in quantization. In 1-D each cluster is a run of the sorted
    values, so one sort and prefix sums make an iteration O(k log N).
    """
    S, N = u.shape
    n = valid.sum(-1, keepdim=True)  # (S, 1)
    srt = torch.where(valid, u, torch.inf).sort(-1).values  # valid values first
    csum = torch.cat([torch.zeros(S, 1, dtype=torch.float64),
                      torch.where(srt.isfinite(), srt, 0).double().cumsum(-1)], -1)  # (S, N + 1)
    pos = ((torch.arange(k, device=u.device) + 0.5) / k * n).long().clamp(max=(n - 1).clamp(min=0))
    c = srt.gather(-1, pos)
    c = torch.where(n > 0, c, torch.linspace(-1, 1, k, device=u.device))
    for _ in range(iters):
        mid = (c[:, 1:] + c[:, :-1]) / 2  # cluster i holds mid[i-1] < v <= mid[i]
        ends = torch.cat([torch.searchsorted(srt, mid, right=True).clamp(max=n), n], -1)  # (S, k)
        starts = torch.cat([torch.zeros_like(n), ends[:, :-1]], -1)
        cnt = ends - starts
        tot = csum.gather(-1, ends) - csum.gather(-1, starts)
        new = torch.where(cnt > 0, (tot / cnt.clamp(min=1)).float(), c).sort(-1).values
        if torch.equal(new, c):
            break
        c = new
    return c


def _index_dtype(L: int) -> torch.dtype:
    return torch.uint8 if L <= 256 else torch.int16 if L <= 2**15 else torch.int32


@register
@dataclass
class KVQuant(Quantizer):
    """KVQuant (Hooper et al., NeurIPS 2024): per-channel pre-RoPE K, per-token V, k-means codebook,
    dense-and-sparse outliers, fp16 attention sinks (see module docstring)."""

    name = "kvquant"
    choices = {"bits": (2, 3, 4), "tensor": ("k", "v")}

    bits: int = 3
    tensor: str = "k"
    outlier_frac: float = 0.01
    sinks: int = 0
    #: fitted by :meth:`calibrate`: (2**bits,) fp16 levels; not part of the spec
    codebook: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.outlier_frac, (int, float)) or not 0 <= self.outlier_frac < 1:
            raise ValueError(f"kvquant: outlier_frac={self.outlier_frac!r} is not allowed; allowed: a number "
                             "in [0, 1)")
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"kvquant: sinks={self.sinks!r} is not allowed; allowed: an integer >= 0")

    @property
    def n_sinks(self) -> int:
        return self.sinks

    @property
    def prerope(self) -> bool:
        return self.tensor == "k"

    @property
    def causal(self) -> bool:  # per-channel K ranges and a self-fit codebook see every token
        return self.tensor == "v" and self.codebook is not None

    def for_tensor(self, which):
        check_choice(self.name, "tensor", which, ("k", "v"))
        return self if which == self.tensor else super().for_tensor(which)  # a codebook fits one tensor

    def fp16_tokens(self, L):
        return torch.arange(L) < self.sinks

    def n_outliers(self, L: int) -> int:
        return min(L, math.ceil(round(self.outlier_frac * L, 9)))

    # ---- normalization and codebook ----------------------------------------------------------
    def _vectors(self, xq):  # quantized tokens (B, H, Tq, D) -> vectors (B, H, n, L)
        return xq.transpose(-1, -2) if self.tensor == "k" else xq

    def _normalize(self, vec):
        """vec (B, H, n, L) -> dict: u (normalized), inlier mask, outlier idx, fp16 zero/scale, inlier lo/hi."""
        k = self.n_outliers(vec.shape[-1])
        inlier = torch.ones_like(vec, dtype=torch.bool)
        idx = vec.abs().topk(k, dim=-1).indices
        inlier.scatter_(-1, idx, False)
        any_in = inlier.any(-1, keepdim=True)
        lo = torch.where(any_in, torch.where(inlier, vec, torch.inf).amin(-1, keepdim=True), 0)
        hi = torch.where(any_in, torch.where(inlier, vec, -torch.inf).amax(-1, keepdim=True), 0)
        zero = ((hi + lo) / 2).half()
        scale = ((hi - lo) / 2).half()  # 0 for a constant vector: it decodes to ``zero`` whatever its codes
        u = (vec - zero.float()) / torch.where(scale == 0, 1, scale.float())
        return {"u": u, "inlier": inlier, "idx": idx, "zero": zero, "scale": scale, "lo": lo, "hi": hi}

    def _split(self, x):
        s = min(self.sinks, x.shape[-2])
        return x[..., :s, :], x[..., s:, :]

    def calibrate(self, x: torch.Tensor) -> KVQuant:
        """A copy holding one codebook fit on calibration data x (B, H, T, D) of this tensor (K or V)."""
        self.check(x)
        _, xq = self._split(self.rotated(x))
        if xq.shape[-2] == 0:
            raise ValueError(f"kvquant: calibration tensor has T={x.shape[-2]} tokens, all of them sinks "
                             f"(sinks={self.sinks}); allowed: T > sinks")
        nz = self._normalize(self._vectors(xq))
        c = kmeans_1d(nz["u"].reshape(1, -1), nz["inlier"].reshape(1, -1), 2**self.bits)
        out = dataclasses.replace(self)
        out.codebook = c[0].half()
        return out

    def _codebook(self, nz):  # -> fp16 (B, H, 2**bits)
        B, H = nz["u"].shape[:2]
        if self.codebook is not None:
            return self.codebook.to(nz["u"].device).expand(B, H, -1).contiguous()
        c = kmeans_1d(nz["u"].reshape(B * H, -1), nz["inlier"].reshape(B * H, -1), 2**self.bits)
        return c.half().sort(-1).values.reshape(B, H, -1)

    # ---- the interface ------------------------------------------------------------------------
    def _quantize(self, x):
        return self._pack(*self._split(x))

    def quantize_all(self, x):
        """Quantize every token of x (B, H, T, D), sinks included (what a cache stores for tokens that
        leave its fp16 part). Each run has its own ranges (and codebook if uncalibrated): runs do not join."""
        self.check(x)
        xf = self.rotated(x)
        return Packed(self._pack(xf[..., :0, :], xf), tuple(x.shape), x.dtype)

    def concat(self, packs):
        return packs[0] if len(packs) == 1 else None

    def _pack(self, sink, xq):  # fp16 sink tokens (B, H, s, D) and the tokens to quantize (B, H, Tq, D)
        out = {"fp16": sink.half()}
        if xq.shape[-2] == 0:
            return out
        nz = self._normalize(self._vectors(xq))
        cb = self._codebook(nz)
        B, H, n, L = nz["u"].shape
        c = cb.float()
        codes = torch.searchsorted((c[..., 1:] + c[..., :-1]) / 2, nz["u"].reshape(B, H, n * L))
        vec = self._vectors(xq)
        out.update(
            codes=pack_bits(codes.reshape(B, H, n, L).to(torch.uint8), self.bits),
            scale=nz["scale"].squeeze(-1),
            zero=nz["zero"].squeeze(-1),
            out_val=vec.gather(-1, nz["idx"]).half(),
            out_idx=nz["idx"].to(_index_dtype(L)),
            codebook=cb,
        )
        return out

    def _dequantize(self, tensors, shape):
        B, H, T, D = shape
        sink = tensors["fp16"].float()
        Tq = T - sink.shape[-2]
        if Tq == 0:
            return sink
        n, L = (D, Tq) if self.tensor == "k" else (Tq, D)
        codes = unpack_bits(tensors["codes"], self.bits, L).long().reshape(B, H, n * L)
        y = tensors["codebook"].float().gather(-1, codes).reshape(B, H, n, L)
        y = y * tensors["scale"].float().unsqueeze(-1) + tensors["zero"].float().unsqueeze(-1)
        y.scatter_(-1, tensors["out_idx"].long(), tensors["out_val"].float())
        xq = y.transpose(-1, -2) if self.tensor == "k" else y
        return torch.cat([sink, xq], dim=-2)

    @property
    def max_abs(self):  # fp16 zero, scale, outliers and sinks
        return 65504.0

    def _bits(self, T, D):
        s = min(self.sinks, T)
        Tq = T - s
        sinks = s * D * 16
        if Tq == 0:
            return sinks
        n, L = (D, Tq) if self.tensor == "k" else (Tq, D)
        k = self.n_outliers(L)
        index_bits = torch.iinfo(_index_dtype(L)).bits
        codes = n * packed_len(L, self.bits) * 8
        return codes + n * 32 + n * k * (16 + index_bits) + 2**self.bits * 16 + sinks

    def error_bound(self, x):
        """Inliers: ``scale`` times the largest distance from the vector's normalized inlier range to the
        nearest level (below the first level, above the last, or half the widest gap); outliers and
        sinks: fp16 rounding."""
        fp16_bound = cast_bound(x)
        sink, xq = self._split(x)
        if xq.shape[-2] == 0:
            return fp16_bound
        vec = self._vectors(xq)
        nz = self._normalize(vec)
        c = self._codebook(nz).float().unsqueeze(-2)  # (B, H, 1, K)
        s, z = nz["scale"].float(), nz["zero"].float()
        s_safe = torch.where(s == 0, 1, s)
        u_lo, u_hi = (nz["lo"] - z) / s_safe, (nz["hi"] - z) / s_safe
        gap = (c[..., 1:] - c[..., :-1]).amax(-1, keepdim=True) / 2
        worst = torch.maximum(torch.maximum(c[..., :1] - u_lo, u_hi - c[..., -1:]), gap)
        constant = torch.where(s == 0, self._vectors(fp16_bound[..., sink.shape[-2]:, :]), 0)  # x -> fp16 zero
        bound = s * worst + constant + 1e-6 * (vec.abs() + z.abs() + s)
        s_tok = sink.shape[-2]
        bound = torch.where(nz["inlier"], bound, self._vectors(fp16_bound[..., s_tok:, :]))
        return torch.cat([fp16_bound[..., :s_tok, :], self._vectors(bound)], dim=-2)

"""``kvquantc``: KVQuant made causal by offline calibration, as the paper deploys it.

Hooper et al., "KVQuant" (NeurIPS 2024). The ``kvquant`` scheme fits K's per-channel ranges and its codebook
on the window it quantizes (an oracle). Here everything that spans tokens comes from a calibration file fitted
offline on other text (:func:`fit_calibration`; ``kvlab calibrate`` runs it on WikiText-2's validation split),
so a token's stored value depends on that token alone (``causal``):

* K, per channel and before RoPE: channel ``c`` of kv head ``h`` of layer ``l`` is normalized to [-1, 1] by
  the calibrated thresholds ``lo``, ``hi`` (the ``outlier_frac / 2`` and ``1 - outlier_frac / 2`` quantiles of
  that channel over the calibration tokens) through fp16 ``zero = (hi + lo) / 2`` and ``scale = (hi - lo) / 2``.
* V, per token: a token's own range, after setting aside its own largest values (as ``kvquant``'s V).
* Non-uniform codes: the nearest of ``2**bits`` fp16 levels of a per-layer codebook (one for K, one for V),
  fit offline by :func:`~kvlab.quant.kvquant.kmeans_1d` on the normalized calibration inliers.
* Dense-and-sparse, with a fixed budget per token so that the bits are exact: the ``n = ceil(outlier_frac * D)``
  values of each token with the largest normalized magnitude ``|u|`` (K: relative to the calibrated channel
  range, so values beyond the thresholds come first; V: ``|x|``) are kept in fp16 with their channel index.
  The paper keeps every K value beyond the thresholds (a data-dependent count); here a token with more
  than ``n`` of them keeps the ``n`` furthest out and the others saturate at the outermost levels.
  :meth:`KVQuantC.outlier_counts` measures how often that happens (values beyond the thresholds, and those
  left over the budget) so a study can report it.
* Attention sinks: the first ``sinks`` tokens (default 1, the paper keeps the first) stay fp16.

Storage per token (D channels, ``n`` outliers): ``codes`` uint8 (B, H, T, packed_len(D, bits)) packed along
head_dim; ``out_val`` fp16 and ``out_idx`` uint8/int16 (B, H, T, n); V also ``scale``, ``zero`` fp16 (B, H, T).
:meth:`~kvlab.quant.base.Quantizer.quantize` adds the sinks as ``fp16`` (B, H, s, D). ``bits_per_value``
counts exactly these bytes. Not counted: the calibration tables (K thresholds, two codebooks per layer), which
are constants of the model held once for every sequence and batch, like its weights (:meth:`table_nbytes`).

The spec names the calibration by its content id (``kvquantc:bits=3,calib=<id>``), so a results key pins it.
The file ``<id>.safetensors`` is looked up in ``$KVLAB_CALIBRATION_DIR`` or else ``data/calibration/`` of the
repository, read with safetensors only, and its tensors are checked against the id. The quantizer of one
layer comes from :meth:`KVQuantC.for_layer` (``Policy.quantizer`` calls it); it holds that layer's tables for
every kv head and slices them by the head axis (:meth:`KVQuantC.for_heads` for a subset).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvlab.quant.base import Packed, Quantizer, cast_bound, check_choice
from kvlab.quant.kvquant import kmeans_1d
from kvlab.quant.packing import pack_bits, packed_len, unpack_bits
from kvlab.quant.registry import register

__all__ = ["CALIBRATION_DIR_ENV", "Calibration", "KVQuantC", "calibration_dir", "fit_calibration"]

CALIBRATION_DIR_ENV = "KVLAB_CALIBRATION_DIR"
DEFAULT_OUTLIER_FRAC = 0.01
_TENSORS = ("k_lo", "k_hi", "k_codebook", "v_codebook")


def calibration_dir() -> Path:
    """Where calibration files are looked up: ``$KVLAB_CALIBRATION_DIR``, else ``data/calibration`` of the repo."""
    env = os.environ.get(CALIBRATION_DIR_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data" / "calibration"


def _index_dtype(D: int) -> torch.dtype:
    return torch.uint8 if D <= 256 else torch.int16


def n_outliers(outlier_frac: float, D: int) -> int:
    """Outlier slots per token of D values: ``ceil(outlier_frac * D)`` (0 when outlier_frac is 0)."""
    return min(D, math.ceil(round(outlier_frac * D, 9)))


@dataclass(frozen=True)
class Calibration:
    """One calibration: ``tensors`` {k_lo, k_hi: float32 (L, H, D) pre-RoPE K thresholds; k_codebook,
    v_codebook: fp16 (L, 2**bits) levels in normalized space} and ``metadata`` (str -> str: bits,
    outlier_frac, model fingerprint, corpus, split, ctx, windows, sample, seed...)."""

    tensors: dict
    metadata: dict

    def __post_init__(self):
        missing = [n for n in _TENSORS if n not in self.tensors]
        if missing or "bits" not in self.metadata or "outlier_frac" not in self.metadata:
            raise ValueError(f"calibration: missing tensors {missing} or metadata bits/outlier_frac; a kvquantc "
                             f"calibration holds {', '.join(_TENSORS)} and metadata bits, outlier_frac")

    @property
    def id(self) -> str:
        """16 hex digits of a sha256 over every tensor (name, dtype, shape, bytes) and the sorted metadata."""
        h = hashlib.sha256()
        for name in sorted(self.tensors):
            t = self.tensors[name].contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        h.update(json.dumps(self.metadata, sort_keys=True).encode())
        return h.hexdigest()[:16]

    @property
    def bits(self) -> int:
        return int(self.metadata["bits"])

    @property
    def outlier_frac(self) -> float:
        return float(self.metadata["outlier_frac"])

    @property
    def spec(self) -> str:
        """The scheme spec naming this calibration (``outlier_frac`` written only when not the default)."""
        extra = "" if self.outlier_frac == DEFAULT_OUTLIER_FRAC else f",outlier_frac={self.outlier_frac}"
        return f"kvquantc:bits={self.bits},calib={self.id}{extra}"

    @property
    def geometry(self) -> tuple[int, int, int]:
        """(layers, kv heads, head_dim)."""
        return tuple(self.tensors["k_lo"].shape)

    def save(self, folder: str | Path | None = None) -> Path:
        """Write ``<folder>/<id>.safetensors`` atomically (folder: :func:`calibration_dir`); returns the path."""
        from kvlab._io import atomic_save_tensors

        path = Path(folder or calibration_dir()) / f"{self.id}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors({n: t.contiguous() for n, t in self.tensors.items()}, path, dict(self.metadata))
        return path

    @classmethod
    def load(cls, calib_id: str, folder: str | Path | None = None) -> Calibration:
        """The calibration ``calib_id`` from ``folder`` (default :func:`calibration_dir`); ValueError naming
        the id and the path when it is missing or its content does not hash to its id."""
        folder = Path(folder or calibration_dir())
        if not isinstance(calib_id, str) or len(calib_id) != 16 or any(c not in "0123456789abcdef" for c in calib_id):
            raise ValueError(f"kvquantc: calib={calib_id!r} is not a calibration id; allowed: the 16 hex digits "
                             f"of a file <id>.safetensors under {folder} (made by `kvlab calibrate`)")
        if calib_id in _MEMORY:
            return _MEMORY[calib_id]
        path = folder / f"{calib_id}.safetensors"
        key = (str(path.resolve()), path.stat().st_mtime_ns if path.is_file() else None)
        if key in _LOADED:
            return _LOADED[key]
        if not path.is_file():
            have = sorted(p.stem for p in folder.glob("*.safetensors")) if folder.is_dir() else []
            raise ValueError(f"kvquantc: calibration {calib_id!r} not found: no {path} (looked in {folder}, "
                             f"${CALIBRATION_DIR_ENV} or data/calibration/; there: {', '.join(have) or 'none'}); "
                             "make one with `kvlab calibrate`")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            cal = cls({n: f.get_tensor(n) for n in f.keys()}, dict(f.metadata() or {}))
        if cal.id != calib_id:
            raise ValueError(f"kvquantc: {path} holds calibration {cal.id}, not {calib_id} (renamed or edited)")
        _LOADED[key] = cal
        return cal


    def register(self) -> Calibration:
        """Make this calibration loadable by its id without a file (tests, notebooks); returns self."""
        _MEMORY[self.id] = self
        return self


_LOADED: dict = {}  # (resolved path, mtime) -> Calibration read from that file
_MEMORY: dict = {}  # id -> Calibration registered in memory


def _normalize_v(x: torch.Tensor, n: int):
    """x (..., D) -> (u, idx, zero, scale): the token's own range without its ``n`` largest |x| (idx (..., n)),
    fp16 zero/scale (..., 1), u = (x - zero) / scale (a constant token: scale 0, decodes to zero)."""
    idx = x.abs().topk(n, dim=-1).indices
    inlier = torch.ones_like(x, dtype=torch.bool).scatter_(-1, idx, False)
    any_in = inlier.any(-1, keepdim=True)
    lo = torch.where(any_in, torch.where(inlier, x, torch.inf).amin(-1, keepdim=True), 0)
    hi = torch.where(any_in, torch.where(inlier, x, -torch.inf).amax(-1, keepdim=True), 0)
    zero, scale = ((hi + lo) / 2).half(), ((hi - lo) / 2).half()
    u = (x - zero.float()) / torch.where(scale == 0, 1, scale.float())
    return u, idx, inlier, zero, scale


def _k_zero_scale(lo: torch.Tensor, hi: torch.Tensor):
    """Calibrated thresholds (..., D) -> fp16 (zero, scale) as the quantizer uses them."""
    return ((hi + lo) / 2).half(), ((hi - lo) / 2).half()


def fit_calibration(k_pre: list[torch.Tensor], v: list[torch.Tensor], bits: int, outlier_frac: float = 0.01,
                    metadata: dict | None = None) -> Calibration:
    """Fit a calibration from one layer's calibration tokens per list entry: ``k_pre[l]`` pre-RoPE K and
    ``v[l]`` V, each (H, N, D) (N calibration tokens). K thresholds: the per-channel quantiles
    ``outlier_frac / 2`` and ``1 - outlier_frac / 2`` (lower order statistics, no interpolation); codebooks:
    1-D k-means on every normalized inlier of the layer (K: within the thresholds; V: each token without its
    own ``ceil(outlier_frac * D)`` largest values). Deterministic."""
    KVQuantC(bits=bits, outlier_frac=outlier_frac)  # the scheme's own checks of both
    if len(k_pre) != len(v) or not k_pre:
        raise ValueError(f"fit_calibration: {len(k_pre)} K and {len(v)} V layers; allowed: the same number, >= 1")
    los, his, kcb, vcb = [], [], [], []
    for k_l, v_l in zip(k_pre, v):
        if k_l.dim() != 3 or k_l.shape != v_l.shape:
            raise ValueError(f"fit_calibration: K {tuple(k_l.shape)} and V {tuple(v_l.shape)}; allowed: equal (H, N, D)")
        H, N, D = k_l.shape
        srt = k_l.float().transpose(1, 2).sort(-1).values  # (H, D, N)
        a = min(N - 1, int(math.floor(outlier_frac / 2 * (N - 1))))
        b = max(0, int(math.ceil((1 - outlier_frac / 2) * (N - 1))))
        lo, hi = srt[..., a].contiguous(), srt[..., b].contiguous()  # (H, D)
        zero, scale = _k_zero_scale(lo, hi)
        u = (k_l.float() - zero.float()[:, None]) / torch.where(scale == 0, 1, scale.float())[:, None]  # (H, N, D)
        kcb.append(kmeans_1d(u.reshape(1, -1), (u.abs() <= 1).reshape(1, -1), 2**bits)[0].half())
        uv, _, inl, _, _ = _normalize_v(v_l.float(), n_outliers(outlier_frac, D))
        vcb.append(kmeans_1d(uv.reshape(1, -1), inl.reshape(1, -1), 2**bits)[0].half())
        los.append(lo)
        his.append(hi)
    meta = {str(k): str(val) for k, val in (metadata or {}).items()}
    meta.update(bits=str(bits), outlier_frac=repr(float(outlier_frac)), scheme="kvquantc")
    tensors = {"k_lo": torch.stack(los), "k_hi": torch.stack(his), "k_codebook": torch.stack(kcb),
               "v_codebook": torch.stack(vcb)}
    return Calibration(tensors, meta)


@register
@dataclass
class KVQuantC(Quantizer):
    """KVQuant calibrated offline, causal: per-channel pre-RoPE K thresholds and k-means codebooks from a
    calibration file, per-token V ranges, fixed per-token fp16 outliers, fp16 sinks (see module docstring)."""

    name = "kvquantc"
    choices = {"bits": (2, 3, 4), "tensor": ("k", "v")}

    bits: int = 3
    calib: str = ""
    tensor: str = "k"
    outlier_frac: float = DEFAULT_OUTLIER_FRAC
    sinks: int = 1
    #: set by for_layer / for_heads / with_calibration: not part of the spec (the calibration id is)
    layer: int | None = field(default=None, init=False, compare=False)
    heads: tuple | None = field(default=None, init=False, compare=False)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.outlier_frac, (int, float)) or not 0 <= self.outlier_frac < 1:
            raise ValueError(f"kvquantc: outlier_frac={self.outlier_frac!r} is not allowed; allowed: a number in [0, 1)")
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"kvquantc: sinks={self.sinks!r} is not allowed; allowed: an integer >= 0")
        if self.calib:
            self._check_calibration(Calibration.load(self.calib))

    def _check_calibration(self, cal: Calibration) -> None:
        if cal.bits != self.bits or cal.outlier_frac != float(self.outlier_frac):
            raise ValueError(f"kvquantc: calibration {cal.id} was fitted for bits={cal.bits}, outlier_frac="
                             f"{cal.outlier_frac}, not bits={self.bits}, outlier_frac={self.outlier_frac}; allowed: "
                             "the spec's bits and outlier_frac equal to the calibration's")

    # ---- calibration and geometry --------------------------------------------------------------
    def with_calibration(self, cal: Calibration) -> KVQuantC:
        """A copy using ``cal``, registered in memory (:meth:`Calibration.register`): its ``calib`` is ``cal.id``."""
        self._check_calibration(cal)
        return dataclasses.replace(self, calib=cal.register().id)

    def _cal(self) -> Calibration:
        if not self.calib:
            raise ValueError("kvquantc: no calibration; allowed: calib=<id> of a file made by `kvlab calibrate`")
        return Calibration.load(self.calib)

    def _keep(self, out: KVQuantC) -> KVQuantC:
        out.layer, out.heads = self.layer, self.heads
        return out

    def for_tensor(self, which):
        check_choice(self.name, "tensor", which, ("k", "v"))
        return self if which == self.tensor else self._keep(dataclasses.replace(self, tensor=which))

    def for_layer(self, layer: int) -> KVQuantC:
        n_layers = self._cal().geometry[0]
        if not isinstance(layer, int) or not 0 <= layer < n_layers:
            raise ValueError(f"kvquantc: layer {layer!r} is not in calibration {self.calib} (layers 0..{n_layers - 1})")
        out = self._keep(dataclasses.replace(self))
        out.layer, out.heads = layer, None
        return out

    def for_heads(self, heads) -> KVQuantC:
        n_heads = self._cal().geometry[1]
        heads = tuple(heads)
        if any(not 0 <= h < n_heads for h in heads):
            raise ValueError(f"kvquantc: heads {heads} not in calibration {self.calib} (kv heads 0..{n_heads - 1})")
        out = self._keep(dataclasses.replace(self))
        out.heads = heads if self.heads is None else tuple(self.heads[h] for h in heads)
        return out

    def check_geometry(self, n_layers: int, n_kv_heads: int, head_dim: int | None = None) -> None:
        cal = self._cal()
        L, H, D = cal.geometry
        if (L, H) != (n_layers, n_kv_heads) or (head_dim is not None and D != head_dim):
            raise ValueError(f"kvquantc: calibration {cal.id} ({cal.metadata.get('model', '?')}) is for {L} layers x "
                             f"{H} kv heads x head_dim {D}; the model has {n_layers} x {n_kv_heads} x "
                             f"{head_dim if head_dim is not None else '?'}; allowed: a calibration of this model")

    def _tables(self, H: int, D: int):
        """This layer's tables for the H heads the input holds: K (zero, scale) fp16 (H, D) or None for V, and
        the codebook float32 (2**bits,)."""
        cal = self._cal()
        if self.layer is None:
            if cal.geometry[0] != 1:
                raise ValueError(f"kvquantc: calibration {cal.id} has {cal.geometry[0]} layers; the quantizer needs its "
                                 "layer (Policy.quantizer sets it through for_layer)")
            layer = 0
        else:
            layer = self.layer
        heads = list(range(cal.geometry[1])) if self.heads is None else list(self.heads)
        if (len(heads), D) != (H, cal.geometry[2]):
            raise ValueError(f"kvquantc: calibration {cal.id} layer {layer} holds {len(heads)} kv heads x head_dim "
                             f"{cal.geometry[2]} here, the tensor {H} x {D}; allowed: K/V of this model's layer")
        cb = cal.tensors[f"{self.tensor}_codebook"][layer].float()
        if self.tensor == "v":
            return None, cb
        zero, scale = _k_zero_scale(cal.tensors["k_lo"][layer, heads].float(), cal.tensors["k_hi"][layer, heads].float())
        return (zero, scale), cb

    def table_nbytes(self) -> int:
        """Bytes of this tensor's calibration tables for the whole model (held once, not in bits_per_value):
        K: fp16 zero and scale per channel and kv head, plus a codebook per layer; V: the codebooks."""
        L, H, D = self._cal().geometry
        return L * 2**self.bits * 2 + (L * H * D * 4 if self.tensor == "k" else 0)

    # ---- capabilities --------------------------------------------------------------------------
    @property
    def prerope(self) -> bool:
        return self.tensor == "k"

    @property
    def n_sinks(self) -> int:
        return self.sinks

    def fp16_tokens(self, L):
        return torch.arange(L) < self.sinks

    @property
    def max_abs(self):
        return 65504.0

    # ---- quantization --------------------------------------------------------------------------
    def _normalized(self, x):
        """x (B, H, T, D) float32 -> (u, outlier idx (B, H, T, n), zero, scale broadcastable to x, codebook)."""
        B, H, T, D = x.shape
        k, cb = self._tables(H, D)
        n = n_outliers(self.outlier_frac, D)
        if k is None:
            u, idx, _, zero, scale = _normalize_v(x, n)
        else:
            zero, scale = (t[None, :, None, :] for t in k)  # (1, H, 1, D)
            u = (x - zero.float()) / torch.where(scale == 0, 1, scale.float())
            idx = u.abs().topk(n, dim=-1).indices
        return u, idx, zero, scale, cb

    def _encode(self, x):  # quantized tokens (B, H, Tq, D) -> their tensors
        u, idx, zero, scale, cb = self._normalized(x)
        codes = torch.searchsorted((cb[1:] + cb[:-1]) / 2, u.contiguous()).to(torch.uint8)
        out = {"codes": pack_bits(codes, self.bits), "out_val": x.gather(-1, idx).half(),
               "out_idx": idx.to(_index_dtype(x.shape[-1]))}
        if self.tensor == "v":
            out.update(scale=scale.squeeze(-1), zero=zero.squeeze(-1))
        return out

    def _quantize(self, x):
        s = min(self.sinks, x.shape[-2])
        out = {"fp16": x[..., :s, :].half()}
        if x.shape[-2] > s:
            out.update(self._encode(x[..., s:, :]))
        return out

    def quantize_all(self, x):
        """Every token of x (B, H, T, D), sinks included (what a cache stores for tokens leaving its fp16
        part). Every tensor is per token, so runs join by concatenation along the tokens."""
        self.check(x)
        return Packed(self._encode(self.rotated(x)), tuple(x.shape), x.dtype)

    def _dequantize(self, tensors, shape):
        B, H, T, D = shape
        sink = tensors["fp16"].float() if "fp16" in tensors else torch.zeros(B, H, 0, D)
        Tq = T - sink.shape[-2]
        if Tq == 0:
            return sink
        k, cb = self._tables(H, D)
        codes = unpack_bits(tensors["codes"], self.bits, D).long()
        if k is None:
            zero, scale = tensors["zero"].float().unsqueeze(-1), tensors["scale"].float().unsqueeze(-1)
        else:
            zero, scale = (t.float()[None, :, None, :] for t in k)
        y = cb[codes] * scale + zero
        y.scatter_(-1, tensors["out_idx"].long(), tensors["out_val"].float())
        return torch.cat([sink.to(y.device), y], dim=-2)

    def _bits(self, T, D):
        s = min(self.sinks, T)
        n = n_outliers(self.outlier_frac, D)
        per_token = packed_len(D, self.bits) * 8 + n * (16 + torch.iinfo(_index_dtype(D)).bits)
        per_token += 32 if self.tensor == "v" else 0
        return s * D * 16 + (T - s) * per_token

    def error_bound(self, x):
        """Outliers and sinks: fp16 rounding. Other values: ``scale`` times the distance from ``u`` to the
        farther of the levels around it (below the first level or above the last one: to that level), plus
        float32 rounding."""
        fp16 = cast_bound(x)
        s = min(self.sinks, x.shape[-2])
        if x.shape[-2] == s:
            return fp16
        xq = x[..., s:, :]
        u, idx, zero, scale, cb = self._normalized(xq)
        sc = scale.float()
        gap = (cb[1:] - cb[:-1]).amax() / 2 if cb.numel() > 1 else torch.tensor(0.0)
        dist = torch.maximum(torch.maximum(cb[0] - u, u - cb[-1]), gap.expand_as(u))
        bound = torch.where(sc == 0, cast_bound(xq), sc * dist) + 1e-6 * (xq.abs() + zero.float().abs() + sc)
        outlier = torch.zeros_like(xq, dtype=torch.bool).scatter_(-1, idx, True)
        bound = torch.where(outlier, fp16[..., s:, :], bound)
        return torch.cat([fp16[..., :s, :], bound], dim=-2)

    def outlier_counts(self, x: torch.Tensor) -> dict[str, int]:
        """Of the quantized tokens of x (B, H, T, D) (pre-RoPE for K): ``values``; those ``beyond`` the
        calibrated thresholds (K: |u| > 1; V, whose range is the token's own: its outlier slots); ``kept`` in
        the fp16 slots among them; ``saturated``: beyond but over the per-token budget, so coded as the
        outermost level (always 0 for V)."""
        s = min(self.sinks, x.shape[-2])
        xq = self.rotated(x)[..., s:, :]
        u, idx, _, _, cb = self._normalized(xq)
        slot = torch.zeros_like(u, dtype=torch.bool).scatter_(-1, idx, True)
        beyond = u.abs() > 1 if self.tensor == "k" else slot
        return {"values": int(xq.numel()), "beyond": int(beyond.sum()), "kept": int((beyond & slot).sum()),
                "saturated": int((beyond & ~slot).sum())}

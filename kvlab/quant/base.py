"""The one quantizer interface: validation, rotation, spec strings and byte accounting live here once.

A quantizer works on K or V of one attention layer, shape (B, H, T, D) = (batch, kv heads, tokens,
head_dim). Subclasses are small dataclasses that must implement ``_quantize`` / ``_dequantize``,
``_bits(T, D)`` (the bits stored for one (T, D) head slice) and ``error_bound`` (abstract methods), plus
``_check_dims`` where the scheme has a grouping.

What storage and analysis may ask of a scheme is declared here, never read off its name:

- ``causal``: a token's stored value depends only on tokens up to its own group, so a cache can quantize
  tokens as they arrive; False for an *oracle*, which looks at the whole window (whole-axis ranges, a
  codebook fitted on the window): usable in emulation as a ceiling, refused by the cache.
- ``prerope``: K is quantized before RoPE.
- ``choices``: the allowed values of the parameters that have a closed set (``kvlab schemes`` lists them).
- ``n_sinks``: leading tokens kept in fp16 (attention sinks).
- ``layout()``: the packed layout the compiled CPU kernels and the fused GPU kernels read, or None where
  only the scheme's own ``dequantize`` knows how (the fast packed path).
- ``window_dtype``, ``stored_input``: what the cache holds for tokens waiting unquantized.
- ``family_label()``: the family a study groups the scheme with (for colours and tables).
- ``query(q)``: the query as the attention's dot product with this K format meets it; the identity (kvlab's
  attention in the model's dtype) unless a scheme emulates another engine's compute path (llama.cpp's
  ``compute=llama.cpp``). Only emulation applies it; a cache, which stores K/V and never sees Q, refuses a
  scheme whose ``query`` is not the identity (``query_is_identity``).
- ``max_abs``: the largest magnitude the stored format represents (fp16 or fp8 values, scales or minima
  bound it); ``quantize`` refuses a finite value beyond it, naming the value, the scheme and the range,
  instead of returning Inf/NaN or a saturated value.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

__all__ = ["Layout", "Packed", "Quantizer", "cast_bound", "check_tensor", "hadamard", "parse_spec", "tensor_bytes"]


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class Packed:
    """Real storage of one quantized (B, H, T, D) tensor: every byte that must be kept to decode it."""

    tensors: dict[str, torch.Tensor]
    shape: tuple[int, ...]
    dtype: torch.dtype
    info: dict = field(default_factory=dict)  # small non-tensor facts (e.g. fp16 window length)

    def nbytes(self) -> int:
        return sum(tensor_bytes(t) for t in self.tensors.values())


@dataclass(frozen=True)
class Layout:
    """A packed layout that kernels outside :mod:`kvlab.quant` read directly (the fast packed path).

    ``kind``: ``"cast"`` (values held as a float dtype, ``fmt`` "fp16" / "bf16" / "none"), ``"block"``
    (llama.cpp blocks of 32 values along head_dim: ``bits``-bit codes, an fp16 scale and with ``asym`` an
    fp16 minimum per block; ``fmt`` the ggml type name), or ``"group"`` (KIVI: ``bits``-bit affine codes in
    groups of ``group`` along ``along`` ("token" for K, "channel" for V), an fp16 scale and minimum per group,
    the last ``window`` tokens in fp16).
    """

    kind: str
    bits: int
    fmt: str = ""
    asym: bool = False
    group: int = 0
    along: str = ""
    window: int = 0


def check_tensor(x: torch.Tensor, what: str = "x") -> None:
    """Raise ``ValueError`` unless ``x`` is a finite, non-empty floating (B, H, T, D) tensor."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor of shape (B, H, T, D), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{what} must have rank 4 (B, H, T, D), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(x.shape)}); every dimension must be >= 1")
    if not x.is_floating_point():
        raise ValueError(f"{what} must be floating point (float32/float16/bfloat16), got {x.dtype}")
    if not torch.isfinite(x).all():
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{what} contains {n_nan} NaN and {n_inf} Inf values; only finite values are allowed")


_H_CACHE: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}


def _hadamard_matrix(d: int, device, dtype) -> torch.Tensor:
    key = (d, str(device), dtype)
    if key not in _H_CACHE:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < d:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _H_CACHE[key] = (h / math.sqrt(d)).to(device=device, dtype=dtype)
    return _H_CACHE[key]


def cast_bound(x: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Element-wise bound on the rounding of a cast of ``x`` to ``dtype``: half an ulp relative to |x|, plus
    the format's subnormal step."""
    fi = torch.finfo(dtype)
    return x.abs() * fi.eps / 2 + fi.smallest_normal * fi.eps


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard rotation over the last dim (a power of two). It is its own inverse."""
    d = x.shape[-1]
    if d & (d - 1):
        raise ValueError(f"rotate=hadamard needs head_dim a power of two, got D={d}")
    return x @ _hadamard_matrix(d, x.device, x.dtype)


_BOOL = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"int:bits=4,axis=token"`` -> ``("int", {"bits": "4", "axis": "token"})``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"scheme spec must be a non-empty string like 'int:bits=4', got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    kwargs: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"bad item {item!r} in spec {spec!r}; expected key=value")
        if key.strip() in kwargs:
            raise ValueError(f"spec {spec!r} sets {key.strip()} twice ({key.strip()}={kwargs[key.strip()]} and "
                             f"{item!r}); allowed: each key once")
        kwargs[key.strip()] = value.strip()
    return name.strip(), kwargs


def _convert(cls, key: str, value: str):
    f = {f.name: f for f in dataclasses.fields(cls)}[key]
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind.startswith("bool"):
        if value.lower() not in _BOOL:
            raise ValueError(f"{cls.name}: {key}={value!r} is not a boolean; allowed: true, false")
        return _BOOL[value.lower()]
    if kind.startswith("int"):
        try:
            return int(value)
        except ValueError:
            if "str" in kind:  # e.g. group: "int | str" accepts a keyword such as "global"
                return value
            raise ValueError(f"{cls.name}: {key}={value!r} is not an integer") from None
    if kind.startswith("float"):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{cls.name}: {key}={value!r} is not a number") from None
    return value


def _check_choice(owner: str, key: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}: {key}={value!r} is not allowed; allowed: {', '.join(map(str, allowed))}")


@dataclass
class Quantizer(abc.ABC):
    """Base class. Subclasses set ``name`` and implement ``_quantize``, ``_dequantize``, ``_bits`` and
    ``error_bound``; the capabilities of the module docstring have defaults here.

    ``rotate="hadamard"`` rotates head_dim by an orthonormal Walsh-Hadamard matrix before quantizing and
    rotates back after dequantizing; in attention this equals rotating Q (for K) and the output (for V).
    """

    name: ClassVar[str] = ""
    #: quantize K before RoPE (the model hooks undo RoPE, quantize, and re-apply it)
    prerope: ClassVar[bool] = False
    #: a token's stored value never depends on tokens after the group it is quantized with; False
    #: for schemes that use statistics of the whole sequence (whole-axis or global scales)
    causal: ClassVar[bool] = True
    #: allowed values of the parameters that have a closed set, {field: (values...)}
    choices: ClassVar[dict[str, tuple]] = {}
    #: dtype of the tokens the cache holds unquantized (fp16 window, sinks); None: the input's own dtype
    window_dtype: ClassVar[torch.dtype | None] = torch.float16

    rotate: str = "none"

    def __post_init__(self) -> None:
        _check_choice(self.name, "rotate", self.rotate, ("none", "hadamard"))
        fields = {f.name for f in dataclasses.fields(self)}
        for key, allowed in self.choices.items():  # every declared closed set, checked here once for all schemes
            if key in fields:
                _check_choice(self.name, key, getattr(self, key), allowed)

    # ---- to implement -------------------------------------------------------------------------
    @abc.abstractmethod
    def _quantize(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, H, T, D) float32 (rotated when rotate=hadamard) -> the tensors to store."""

    @abc.abstractmethod
    def _dequantize(self, tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        """The stored tensors of a (B, H, T, D) ``shape`` -> x_hat (B, H, T, D) float32."""

    @abc.abstractmethod
    def _bits(self, T: int, D: int) -> float:
        """Bits stored for one head's (T, D) slice, every code, scale, index and window counted."""

    @abc.abstractmethod
    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise bound on |x - roundtrip(x)| in the basis the scheme quantizes in, x given in that basis
        (``rotated(x)``: Hadamard-rotated when rotate=hadamard, channels reordered where a scheme does so)."""

    def _check_dims(self, T: int, D: int) -> None:  # noqa: B027 (optional: schemes without a grouping accept any)
        """Raise ValueError if the scheme cannot hold a (T, D) head slice (group vs head_dim, ...)."""

    # ---- optional capabilities (defaults) -----------------------------------------------------
    @property
    def oracle(self) -> bool:
        """True when the scheme looks at the whole window (not causal): a ceiling, not a deployable cache."""
        return not self.causal

    @property
    def n_sinks(self) -> int:
        """Leading tokens held in fp16 (attention sinks)."""
        return 0

    def layout(self) -> Layout | None:
        """The packed layout kernels outside kvlab.quant read directly, or None (see :class:`Layout`)."""
        return None

    @property
    def max_abs(self) -> float:
        """Largest |x| (after the rotation, where one is set) the stored format represents; inf: no bound."""
        return math.inf

    def _refuse_range(self, m: str, what: str = "") -> None:
        raise ValueError(
            f"{self.spec}: a value of {m}{what} is beyond the range this scheme stores (|x| <= "
            f"{self.max_abs:.6g}: its values, scales or minima are held as fp16/fp8); allowed: finite values "
            f"within +-{self.max_abs:.6g} (scale K/V down, or use a scheme with float32 scales, bf16 or none)")

    def family_label(self) -> str:
        """The family a study groups this scheme with: its name, ``+hadamard`` when it rotates."""
        return self.name + ("+hadamard" if self.rotate == "hadamard" else "")

    def for_tensor(self, which: str) -> Quantizer:
        """The quantizer to use for K (``"k"``) or V (``"v"``). Schemes that treat K and V differently
        (KIVI, KVQuant) declare a ``tensor`` field and get a copy with it set; others return self."""
        _check_choice(self.name, "tensor", which, ("k", "v"))
        if "tensor" in {f.name for f in dataclasses.fields(self)}:
            return dataclasses.replace(self, tensor=which)
        return self

    def for_layer(self, layer: int) -> Quantizer:
        """The quantizer for one layer (``Policy.quantizer`` calls it). Schemes with per-layer tables (a
        calibration) return a copy holding that layer's, for every kv head; others return self."""
        return self

    def for_heads(self, heads) -> Quantizer:
        """The quantizer for tensors that hold only the kv heads ``heads`` (indices into the heads the
        quantizer covers), for callers that give one scheme a subset of a layer's heads. Schemes with
        per-head tables slice them; others return self."""
        return self

    def check_geometry(self, n_layers: int, n_kv_heads: int, head_dim: int | None = None) -> None:  # noqa: B027
        """Raise ValueError if the scheme's tables do not fit the model (a calibration of another model)."""

    def quantize_all(self, x: torch.Tensor) -> Packed:
        """Quantize every token of x (B, H, T, D), ignoring fp16 windows and sinks: what a cache stores
        for tokens as they leave its window. Schemes with windows or sinks override this."""
        return self.quantize(x)

    def concat(self, packs: list[Packed]) -> Packed | None:
        """Join runs of consecutive tokens from :meth:`quantize_all` into one Packed, or None when the
        layout cannot be joined (the caller keeps the runs apart). Default: per-token layouts, whose
        tensors all hold their tokens on dim 2."""
        if len(packs) == 1:
            return packs[0]
        if any(p.tensors[k].shape[2] != p.shape[2] for p in packs for k in p.tensors):
            return None
        tensors = {k: torch.cat([p.tensors[k] for p in packs], dim=2) for k in packs[0].tensors}
        shape = (*packs[0].shape[:2], sum(p.shape[2] for p in packs), packs[0].shape[3])
        return Packed(tensors, shape, packs[0].dtype)

    @property
    def query_is_identity(self) -> bool:
        """False where :meth:`query` changes the query (the scheme emulates another engine's compute path)."""
        return True

    def query(self, q: torch.Tensor) -> torch.Tensor:
        """q (B, Hq, Tq, D), the queries reading this K format -> the query the attention's dot product uses.
        kvlab's own attention computes in the model's dtype: the identity."""
        return q

    def stored_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the scheme receives from the model: the values an fp16 deployment holds (x cast to fp16 and
        back to x's dtype). ``none`` overrides it to keep x as it is."""
        h = x.to(torch.float16)
        if x.dtype != torch.float16 and x.numel() and not bool(torch.isfinite(h).all()):
            m = float(x.abs().amax())
            if math.isfinite(m):
                raise ValueError(f"{self.spec}: a value of {m:.6g} is beyond fp16 (|x| <= 65504), the dtype an fp16 "
                                 "deployment holds K/V in before the scheme sees them; allowed: values within "
                                 "+-65504 (or the none scheme, which keeps the model's dtype)")
        return h.to(x.dtype)

    def fp16_tokens(self, L: int) -> torch.Tensor:
        """(L,) bool: tokens held unquantized (fp16 window, sinks) when the cache holds L tokens."""
        return torch.zeros(L, dtype=torch.bool)

    # ---- the interface ------------------------------------------------------------------------
    @property
    def spec(self) -> str:
        """Canonical spec string: every init field, in declaration order (stable, so it can key results).
        Fields declared with ``init=False`` (fitted state such as a calibrated codebook) are not part of it,
        nor are fields added after results were keyed (``metadata={"spec": "non-default"}``) while they hold
        their default, so adding an option keeps every earlier key."""
        names = [f.name for f in dataclasses.fields(self) if f.init and f.name != "rotate"
                 and not (f.metadata.get("spec") == "non-default" and getattr(self, f.name) == f.default)]
        names += ["rotate"]
        values = [getattr(self, n) for n in names]
        items = ",".join(f"{n}={str(v).lower() if isinstance(v, bool) else v}" for n, v in zip(names, values))
        return f"{self.name}:{items}" if items else self.name

    def check(self, x: torch.Tensor, what: str = "x") -> None:
        check_tensor(x, what)
        T, D = x.shape[-2], x.shape[-1]
        if self.rotate == "hadamard" and D & (D - 1):
            raise ValueError(f"{self.name}: rotate=hadamard needs head_dim a power of two, got D={D}")
        self._check_dims(T, D)

    def quantize(self, x: torch.Tensor) -> Packed:
        """x (B, H, T, D) -> Packed with real storage (uint8/int8/fp16 tensors)."""
        self.check(x)
        xf = self.rotated(x)
        if self.max_abs < math.inf and float(xf.abs().amax()) > self.max_abs:
            big = f"{float(x.abs().amax()):.6g}"
            if self.rotate != "none":
                big += f" ({float(xf.abs().amax()):.6g} after the hadamard rotation)"
            self._refuse_range(big)
        tensors = self._quantize(xf)
        for name, t in tensors.items():  # the stored floats overflowed: a bound above is too generous
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{self.spec}: its stored {name} overflowed (largest |x| {float(xf.abs().amax()):.6g}, "
                                 f"{t.dtype}); allowed: smaller values")
        return Packed(tensors, tuple(x.shape), x.dtype)

    def dequantize(self, packed: Packed) -> torch.Tensor:
        """Packed -> x_hat (B, H, T, D) in the original dtype."""
        y = self._dequantize(packed.tensors, packed.shape)
        if self.rotate == "hadamard":
            y = hadamard(y.float())
        return y.to(packed.dtype)

    def rotated(self, x: torch.Tensor) -> torch.Tensor:
        """x as float32 in the basis the scheme quantizes in (Hadamard-rotated when rotate=hadamard)."""
        return hadamard(x.float()) if self.rotate == "hadamard" else x.float()

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.quantize(x))

    def nbytes(self, packed: Packed) -> int:
        return packed.nbytes()

    def bits_per_value(self, T: int, D: int) -> float:
        """Stored bits per K/V value for a (T, D) head slice, metadata and windows included."""
        if T < 1 or D < 1:
            raise ValueError(f"T and D must be >= 1, got T={T}, D={D}")
        self._check_dims(T, D)
        return self._bits(T, D) / (T * D)

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, str]) -> Quantizer:
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise ValueError(
                f"{cls.name}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(names) or '(none)'}"
            )
        return cls(**{k: _convert(cls, k, v) for k, v in kwargs.items()})


check_choice = _check_choice

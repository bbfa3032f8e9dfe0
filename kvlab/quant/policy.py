"""Policies: which scheme compresses K or V of each (layer, kv head).

A policy spec is a scheme spec (one scheme everywhere, e.g. ``"q4_0"``) or ``;``-separated items:

- ``kv=SPEC`` / ``k=SPEC`` / ``v=SPEC``: the scheme for both, for K, for V;
- ``keep_first=N`` / ``keep_last=N``: the first / last N layers keep ``keep=SPEC`` (default ``fp16``);
- ``keep_heads=L.H+L.H``: those (layer, kv head) pairs keep ``keep`` for K and V
  (``keep_k_heads=`` / ``keep_v_heads=`` for one of them): kvmix's strategy 3;
- ``recent=W;old=SPEC``: recency: a token more than W tokens older than the newest one is re-quantized
  with ``old`` (applied to what the main scheme stored, as a real cache would demote it).

Example: ``"k=kivi:bits=2,group=32;v=kivi:bits=2;keep_first=2;keep_heads=3.0+7.1"``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

from kvlab.quant import registry as quant
from kvlab.quant.base import Quantizer

__all__ = ["Policy", "parse_policy"]

_KEYS = ("kv", "k", "v", "keep", "keep_first", "keep_last", "keep_heads", "keep_k_heads", "keep_v_heads",
         "recent", "old")


def _pairs(text: str, key: str) -> frozenset[tuple[int, int]]:
    out = set()
    for item in filter(None, text.split("+")):
        layer, dot, head = item.partition(".")
        if not dot or not layer.isdigit() or not head.isdigit():
            raise ValueError(f"policy: {key}={text!r}: item {item!r} is not LAYER.HEAD (e.g. 3.0+7.1)")
        out.add((int(layer), int(head)))
    return frozenset(out)


@dataclass(frozen=True)
class Policy:
    """Maps (layer, kv head, "k"|"v") to a quantizer. Build with :func:`parse_policy`."""

    k: str = "fp16"
    v: str = "fp16"
    keep: str = "fp16"
    keep_first: int = 0
    keep_last: int = 0
    keep_k_heads: frozenset = field(default_factory=frozenset)
    keep_v_heads: frozenset = field(default_factory=frozenset)
    recent: int = 0
    old: str | None = None

    def __post_init__(self):
        for name in ("keep_first", "keep_last", "recent"):
            if getattr(self, name) < 0:
                raise ValueError(f"policy: {name}={getattr(self, name)} is not allowed; allowed: an integer >= 0")
        if (self.recent > 0) != (self.old is not None):
            raise ValueError("policy: recent=W and old=SPEC go together (tokens older than W use old)")
        for spec in (self.k, self.v, self.keep, self.old):  # fail early on a bad scheme spec
            if spec is not None:
                quant.get(spec)

    @cached_property
    def _quantizers(self) -> dict[str, Quantizer]:
        q = {"k": quant.get(self.k).for_tensor("k"), "v": quant.get(self.v).for_tensor("v"),
             "keep_k": quant.get(self.keep).for_tensor("k"), "keep_v": quant.get(self.keep).for_tensor("v")}
        if self.old:
            q["old_k"] = quant.get(self.old).for_tensor("k")
            q["old_v"] = quant.get(self.old).for_tensor("v")
        return q

    @property
    def spec(self) -> str:
        """Canonical spec string (keys sorted into a fixed order; stable, so it can key results)."""
        items = [f"k={self._quantizers['k'].spec}", f"v={self._quantizers['v'].spec}"]
        if self.keep_first or self.keep_last or self.keep_k_heads or self.keep_v_heads:
            items.append(f"keep={quant.get(self.keep).spec}")
        for name in ("keep_first", "keep_last"):
            if getattr(self, name):
                items.append(f"{name}={getattr(self, name)}")
        for name in ("keep_k_heads", "keep_v_heads"):
            if getattr(self, name):
                items.append(f"{name}=" + "+".join(f"{a}.{b}" for a, b in sorted(getattr(self, name))))
        if self.recent:
            items += [f"recent={self.recent}", f"old={quant.get(self.old).spec}"]
        return ";".join(items)

    def check_model(self, n_layers: int, n_kv_heads: int, head_dim: int | None = None) -> None:
        """Raise ValueError if a listed layer or head does not exist in the model, or (given ``head_dim``)
        if a scheme cannot hold the model's head_dim (a group that does not divide it, a rotation)."""
        for q in self._quantizers.values():  # per-layer tables (a calibration) against the model
            q.check_geometry(n_layers, n_kv_heads, head_dim)
        if head_dim is not None:
            for q in self._quantizers.values():
                if q.rotate == "hadamard" and head_dim & (head_dim - 1):
                    raise ValueError(f"{q.spec}: rotate=hadamard needs head_dim a power of two; the model's "
                                     f"head_dim is {head_dim}")
                q.bits_per_value(1, head_dim)  # each scheme's own check of head_dim
        for name in ("keep_k_heads", "keep_v_heads"):
            for layer, head in sorted(getattr(self, name)):
                if not 0 <= layer < n_layers or not 0 <= head < n_kv_heads:
                    raise ValueError(f"policy: {name} names layer {layer} head {head}, but the model has "
                                     f"layers 0..{n_layers - 1} and kv heads 0..{n_kv_heads - 1}")
        if self.keep_first + self.keep_last > n_layers:
            raise ValueError(f"policy: keep_first={self.keep_first} + keep_last={self.keep_last} exceeds the "
                             f"model's {n_layers} layers")

    def kept(self, layer: int, head: int, which: str, n_layers: int) -> bool:
        """True where the policy keeps this (layer, kv head) at ``keep`` instead of the main scheme."""
        if layer < self.keep_first or layer >= n_layers - self.keep_last:
            return True
        return (layer, head) in (self.keep_k_heads if which == "k" else self.keep_v_heads)

    def quantizer(self, layer: int, head: int, which: str, n_layers: int) -> Quantizer:
        """The quantizer for K (``which="k"``) or V of one (layer, kv head): the scheme's
        :meth:`~kvlab.quant.base.Quantizer.for_layer` of that layer (it covers every kv head of the layer)."""
        name = ("keep_" if self.kept(layer, head, which, n_layers) else "") + which
        key = (name, layer)
        if key not in self._layer_quantizers:
            self._layer_quantizers[key] = self._quantizers[name].for_layer(layer)
        return self._layer_quantizers[key]

    @cached_property
    def _layer_quantizers(self) -> dict:  # (name, layer) -> quantizer of that layer
        return {}

    def old_quantizer(self, which: str) -> Quantizer | None:
        return self._quantizers.get(f"old_{which}")

    def bits_per_value(self, n_layers: int, n_kv_heads: int, T: int, D: int) -> float:
        """Mean stored bits per K/V value over every layer, head, K and V at sequence length T
        (recency: tokens older than ``recent`` counted at the old scheme's rate)."""
        total = 0.0
        for layer in range(n_layers):
            for head in range(n_kv_heads):
                for which in ("k", "v"):
                    q = self.quantizer(layer, head, which, n_layers)
                    old = self.old_quantizer(which)
                    if old is not None and T > self.recent and not self.kept(layer, head, which, n_layers):
                        n_old = T - self.recent
                        total += old.bits_per_value(n_old, D) * n_old * D
                        total += q.bits_per_value(self.recent, D) * self.recent * D
                    else:
                        total += q.bits_per_value(T, D) * T * D
        return total / (n_layers * n_kv_heads * 2 * T * D)

    def bytes_per_token(self, n_layers: int, n_kv_heads: int, T: int, D: int) -> float:
        """Bytes of KV cache per token for the whole model at sequence length T."""
        return self.bits_per_value(n_layers, n_kv_heads, T, D) * n_layers * n_kv_heads * 2 * D / 8


def parse_policy(spec: str | Policy) -> Policy:
    """Build a :class:`Policy` from a spec string (see the module docstring)."""
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"policy spec must be a non-empty string, got {spec!r}")
    if "=" not in spec.split(":")[0] and ";" not in spec:
        quant.get(spec)  # a plain scheme spec: raises a clear error when unknown
        return Policy(k=spec, v=spec)
    kw: dict = {}
    items = [s.strip() for s in spec.split(";") if s.strip()]
    if not items:
        raise ValueError(f"policy spec {spec!r} has no items; allowed: a scheme spec or KEY=VALUE items "
                         f"separated by ';' (keys: {', '.join(_KEYS)})")
    seen: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in _KEYS:
            raise ValueError(f"policy: bad item {item!r} in {spec!r}; allowed keys: {', '.join(_KEYS)}")
        value = value.strip()
        for name in {"kv": ("k", "v"), "keep_heads": ("keep_k_heads", "keep_v_heads")}.get(key, (key,)):
            if name in seen:
                raise ValueError(f"policy: {key}= in {spec!r} sets {name} again (already set by {seen[name]!r}); "
                                 "allowed: each key once")
            seen[name] = item
        if key == "kv":
            kw["k"] = kw["v"] = value
        elif key in ("keep_first", "keep_last", "recent"):
            if not re.fullmatch(r"-?[0-9]+", value):
                raise ValueError(f"policy: {key}={value!r} is not an integer; allowed: an integer >= 0")
            kw[key] = int(value)
        elif key == "keep_heads":
            kw["keep_k_heads"] = kw["keep_v_heads"] = _pairs(value, key)
        elif key in ("keep_k_heads", "keep_v_heads"):
            kw[key] = _pairs(value, key)
        else:
            kw[key] = value
    return Policy(**kw)

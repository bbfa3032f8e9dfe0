"""Quantizer zoo: every scheme behind one interface (see :mod:`kvlab.quant.base`)."""

from __future__ import annotations

from .base import Packed, Quantizer, check_tensor, hadamard, parse_spec
from .packing import pack_bits, packed_len, unpack_bits

_REGISTRY: dict[str, type[Quantizer]] = {}


def register(cls: type[Quantizer]) -> type[Quantizer]:
    """Class decorator: make ``cls`` reachable by ``get(cls.name + ':...')``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"cannot register quantizer name {cls.name!r} (empty or taken)")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    """Names of every registered scheme."""
    return sorted(_REGISTRY)


def get(spec: str | Quantizer) -> Quantizer:
    """Build a quantizer from a spec string such as ``"kivi:bits=2,group=32"``."""
    if isinstance(spec, Quantizer):
        return spec
    name, kwargs = parse_spec(spec)
    if name not in _REGISTRY:
        raise ValueError(f"unknown scheme {name!r} in spec {spec!r}; available: {', '.join(available())}")
    return _REGISTRY[name].from_kwargs(kwargs)


# importing the scheme modules registers them (one scheme, or one family, per file)
from . import fp8, fpmant, ggml, identity, kivi, kvquant, signmag, uniform  # noqa: E402,F401

__all__ = [
    "Packed",
    "Quantizer",
    "available",
    "check_tensor",
    "get",
    "hadamard",
    "pack_bits",
    "packed_len",
    "parse_spec",
    "register",
    "unpack_bits",
]

"""The scheme registry: ``@register`` on a Quantizer subclass makes it reachable by its spec string."""

from __future__ import annotations

from kvlab.quant.base import Quantizer, parse_spec

__all__ = ["available", "get", "register"]

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

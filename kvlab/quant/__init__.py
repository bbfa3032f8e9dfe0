"""Quantizer zoo: every scheme behind one interface (:mod:`kvlab.quant.base`), one scheme (or one family)
per file. Every module of this folder other than the infrastructure below is a scheme file and is
imported here, which registers it: adding a scheme is adding one file."""

from __future__ import annotations

import importlib
import pkgutil

from kvlab.quant.base import Packed, Quantizer, check_tensor, hadamard, parse_spec
from kvlab.quant.packing import pack_bits, packed_len, unpack_bits
from kvlab.quant.registry import available, get, register

#: modules of this folder that are not schemes
INFRASTRUCTURE = frozenset({"base", "catalog", "packing", "policy", "registry"})

for _m in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _m not in INFRASTRUCTURE and not _m.startswith("_"):
        importlib.import_module(f"{__name__}.{_m}")

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

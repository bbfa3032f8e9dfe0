"""Compiled CPU kernels of :class:`kvlab.CompressedCache` (``kvlab/kernels/csrc/cache_cpu.cpp``), with the torch
fallback they must equal.

Quantizing the new tokens of a step and decoding a layer's packed runs take a dozen torch ops each (bit
unpacking, subtracting, scaling, packing); on CPU those passes, not the bytes, are what a compressed cache
costs per step. The C++ functions do each in one pass and are bit-identical to the torch quantizers in
:mod:`kvlab.quant` (same float32 operations in the same order, no fused multiply-add; tested).

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` (needs a C++ compiler and
``ninja``, installed by ``pip install kvlab``; about a minute, then cached under ``TORCH_EXTENSIONS_DIR``
or ``~/.cache/torch_extensions``). Where it cannot be built, or with ``KVLAB_CPU_KERNELS=0``, :func:`ops`
returns None and the cache runs the torch code, with one warning saying why.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

__all__ = ["ops", "enabled", "usable", "reset"]

_SOURCE = Path(__file__).parent / "csrc" / "cache_cpu.cpp"
_state: dict = {}


def enabled() -> bool:
    """False when ``KVLAB_CPU_KERNELS`` is set to 0/false/no/off."""
    return os.environ.get("KVLAB_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def ops():
    """The compiled module (functions ``ggml_quantize``, ``ggml_read``, ``kivi_quantize``, ``kivi_read``), or
    None where disabled or not buildable (warned once). Decided at the first call; :func:`reset` forgets."""
    if "module" in _state:
        return _state["module"]
    if not enabled():
        _state["module"] = None
    else:
        try:
            from torch.utils.cpp_extension import load

            _state["module"] = load(
                name="kvlab_cache_cpu",
                sources=[str(_SOURCE)],
                extra_cflags=["-O3", "-ffp-contract=off"],
                verbose=False,
            )
        except Exception as e:  # no compiler, no ninja, no headers: the torch path still works
            _state["module"] = None
            warnings.warn(f"kvlab: the CPU cache kernels could not be built ({type(e).__name__}: {e}); "
                          "CompressedCache falls back to torch ops (slower, same results)", stacklevel=2)
    return _state["module"]


def reset() -> None:
    """Forget the decision of :func:`ops` (after changing ``KVLAB_CPU_KERNELS``)."""
    _state.clear()


def usable(*tensors: torch.Tensor) -> bool:
    """True when the compiled kernels exist and every tensor is on the CPU."""
    return all(t.device.type == "cpu" for t in tensors) and ops() is not None

"""Triton kernels for quantized KV caches, each beside its pure-torch reference (``*_ref``, same arguments).

- :mod:`.kivi_quant`: KIVI int2/int4 quantize-and-pack on append (K per channel, V per token).
- :mod:`.ggml_quant`: llama.cpp ``q4_0`` / ``q8_0`` quantize-and-pack on append, byte-identical to ggml.
- :mod:`.kivi_attention`, :mod:`.ggml_attention`: fused flash-decoding attention straight from the
  packed caches (GQA, per-sequence lengths, a few causal query tokens).
- :mod:`.splitk`: the split plan and the log-sum-exp merge of flash-decoding.

The kernels need a CUDA device (:func:`available`), or CPU tensors with ``TRITON_INTERPRET=1`` set before
the first kernel is used (tests). Elsewhere use the references. The names below are imported on first use,
so ``import kvlab`` (and the study support, which reads saved results) never imports triton; the compiled
CPU kernels of the cache are :mod:`.cpu`, the CUDA C++ loader :mod:`.kivi_cuda`, and every packed layout's
buffer shapes live in :mod:`.layout`.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FLOATS": "_common",
    "available": "_common",
    "check_pow2": "_common",
    "interpreted": "_common",
    "ggml_decode_attention": "ggml_attention",
    "ggml_decode_attention_ref": "ggml_attention",
    "FORMATS": "layout",
    "ggml_dequantize_ref": "ggml_quant",
    "ggml_pack": "ggml_quant",
    "ggml_pack_ref": "ggml_quant",
    "ggml_shapes": "layout",
    "KIVI_BUFFERS": "layout",
    "KiviBuffers": "layout",
    "ggml_bytes": "layout",
    "kivi_bytes": "layout",
    "kivi_counts": "layout",
    "kivi_empty": "layout",
    "kivi_shapes": "layout",
    "attention_ref": "kivi_attention",
    "kivi_decode_attention": "kivi_attention",
    "kivi_decode_attention_ref": "kivi_attention",
    "kivi_dequantize_k_ref": "kivi_attention",
    "kivi_dequantize_v_ref": "kivi_attention",
    "kivi_pack_k": "kivi_quant",
    "kivi_pack_k_ref": "kivi_quant",
    "kivi_pack_v": "kivi_quant",
    "kivi_pack_v_ref": "kivi_quant",
    "merge_splits": "splitk",
    "merge_splits_ref": "splitk",
    "plan_splits": "splitk",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

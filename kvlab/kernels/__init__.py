"""Triton kernels for quantized KV caches, each beside its pure-torch reference (``*_ref``, same arguments).

- :mod:`.kivi_quant`: KIVI int2/int4 quantize-and-pack on append (K per channel, V per token).
- :mod:`.ggml_quant`: llama.cpp ``q4_0`` / ``q8_0`` quantize-and-pack on append, byte-identical to ggml.
- :mod:`.kivi_attention`, :mod:`.ggml_attention`: fused flash-decoding attention straight from the
  packed caches (GQA, per-sequence lengths, a few causal query tokens).
- :mod:`.splitk`: the split plan and the log-sum-exp merge of flash-decoding.

The kernels need a CUDA device (:func:`available`), or CPU tensors with ``TRITON_INTERPRET=1`` set before
this package is imported (tests). Elsewhere use the references.
"""

from ._common import available, interpreted
from .ggml_attention import ggml_decode_attention, ggml_decode_attention_ref
from .ggml_quant import FORMATS, ggml_dequantize_ref, ggml_pack, ggml_pack_ref, ggml_shapes
from .kivi_attention import (
    attention_ref,
    kivi_decode_attention,
    kivi_decode_attention_ref,
    kivi_dequantize_k_ref,
    kivi_dequantize_v_ref,
)
from .kivi_quant import kivi_pack_k, kivi_pack_k_ref, kivi_pack_v, kivi_pack_v_ref
from .splitk import merge_splits, merge_splits_ref, plan_splits

__all__ = [
    "FORMATS",
    "attention_ref",
    "available",
    "ggml_decode_attention",
    "ggml_decode_attention_ref",
    "ggml_dequantize_ref",
    "ggml_pack",
    "ggml_pack_ref",
    "ggml_shapes",
    "interpreted",
    "kivi_decode_attention",
    "kivi_decode_attention_ref",
    "kivi_dequantize_k_ref",
    "kivi_dequantize_v_ref",
    "kivi_pack_k",
    "kivi_pack_k_ref",
    "kivi_pack_v",
    "kivi_pack_v_ref",
    "merge_splits",
    "merge_splits_ref",
    "plan_splits",
]

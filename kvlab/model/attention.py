"""The attention functions kvlab registers with transformers, and the SDPA they fall back to: one place for
what the emulation's hooks and the fused cache both need. No forked model files: transformers calls a
registered function by name from every attention layer."""

from __future__ import annotations

__all__ = ["register_attention", "sdpa"]


def register_attention(name: str, fn) -> None:
    """Register ``fn`` as attention implementation ``name`` with transformers, with the SDPA mask builder (so
    padded batches keep their mask); select it with ``model.set_attn_implementation(name)``."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)


def sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention (query (B, Hq, n, D), key/value (B, Hkv, L, D), GQA repeated inside)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

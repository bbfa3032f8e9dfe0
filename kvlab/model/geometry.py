"""A model's attention geometry read off its transformers config, once for every layer above."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Geometry", "geometry", "text_config"]


class Geometry(NamedTuple):
    layers: int
    kv_heads: int
    head_dim: int


def text_config(config):
    """The decoder's config of ``config`` (the text part of a multimodal config; itself otherwise)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def geometry(config) -> Geometry:
    """(layers, kv heads, head_dim) of a causal LM's config (a model's ``config``, or a model). head_dim is the
    config's own where it declares one (Gemma's differs from hidden_size / heads), else hidden / heads."""
    config = getattr(config, "config", config)
    text = text_config(config)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return Geometry(text.num_hidden_layers, getattr(text, "num_key_value_heads", None) or heads, head_dim)

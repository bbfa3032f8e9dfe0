"""Model access: loading any Hugging Face causal LM (hub id, folder or GGUF), RoPE, and the attention
functions kvlab registers with transformers."""

from kvlab.model.loading import DEFAULT_MODEL, embedded_gguf_path, load_model
from kvlab.model.rope import apply_rope, invert_rope, rope_cos_sin

__all__ = ["DEFAULT_MODEL", "apply_rope", "embedded_gguf_path", "invert_rope", "load_model", "rope_cos_sin"]

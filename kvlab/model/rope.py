"""Rotary position embedding helpers (the ``rotate_half`` convention of Llama-family models)."""

from __future__ import annotations

import torch

__all__ = ["apply_rope", "invert_rope", "rope_cos_sin"]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D), cos/sin (B, T, R) -> x rotated by each token's angle. With R < D (partial rotary:
    Phi, GPT-NeoX) only the first R dims rotate."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat([x[..., :r] * cos + _rotate_half(x[..., :r]) * sin, x[..., r:]], dim=-1)
    return x * cos + _rotate_half(x) * sin


def invert_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo :func:`apply_rope` (rotation by minus the angle): post-RoPE -> pre-RoPE."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat([x[..., :r] * cos - _rotate_half(x[..., :r]) * sin, x[..., r:]], dim=-1)
    return x * cos - _rotate_half(x) * sin


def rope_cos_sin(model, x: torch.Tensor, position_ids: torch.Tensor):
    """(cos, sin) of shape (B, T, D) from the model's own rotary module."""
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    if rotary is None:
        raise ValueError(f"{type(model).__name__} has no model.rotary_emb; pre-RoPE schemes and captures need "
                         "a Llama-style rotary module")
    return rotary(x, position_ids)

"""``CompressedCache``: a drop-in transformers ``Cache`` that really stores the packed KV of a policy.

Usage::

    cache = kvlab.CompressedCache("kivi:bits=2", config=model.config)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=64)
    cache.nbytes()  # {"codes": ..., "metadata": ..., "fp16": ..., "total": ...}

Each layer keeps, for K and for V of every group of kv heads sharing a scheme, a *stream*: the fp16
sinks, the packed runs of quantized tokens (``kvlab.quant`` storage, never dequantized copies) and the
fp16 window. On every update the new tokens join the window; tokens that the scheme's
``fp16_tokens(L)`` rule says are quantized at the new length L leave the window and are quantized
together (KIVI: K in whole ``residual`` blocks, V one token at a time; llama.cpp blocks: every token on
arrival). Attention reads the dequantized tensors (on CPU in torch). Incoming K/V are cast to fp16
first, as an fp16 deployment would hold them (the ``none`` scheme keeps them as they are).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .policy import Policy, parse_policy
from .quant import Packed, Quantizer

__all__ = ["CompressedCache", "stored_input"]

_CODE_NAMES = ("codes", "qh")
_FP16_NAMES = ("fp16",)


def stored_input(q: Quantizer, x: torch.Tensor) -> torch.Tensor:
    """What a scheme receives from the model: fp16 values (an fp16 deployment), except ``none``."""
    return x if q.name == "none" else x.to(torch.float16).to(x.dtype)


class _Stream:
    """K or V of some kv heads of one layer under one quantizer."""

    def __init__(self, q: Quantizer, heads: list[int]):
        self.q, self.heads = q, heads
        self.length = 0
        self.sinks: torch.Tensor | None = None  # (B, h, S, D) fp16
        self.window: torch.Tensor | None = None  # (B, h, W, D) fp16 (or the input dtype for `none`)
        self.runs: list[Packed] = []
        self.n_quantized = 0
        self.dtype = None

    def _split(self, L: int) -> tuple[int, int]:
        """(sinks, quantized) token counts at length L from the scheme's rule [sinks | quantized | window]."""
        fp16 = self.q.fp16_tokens(L)
        n_sinks = min(int(getattr(self.q, "sinks", 0)), L)
        n_q = int((~fp16).sum())
        if not bool(fp16[:n_sinks].all()) or bool(fp16[n_sinks : n_sinks + n_q].any()):
            raise ValueError(f"{self.q.spec}: its fp16 tokens at L={L} are not [sinks | quantized | window]")
        return n_sinks, n_q

    def update(self, x: torch.Tensor) -> None:  # x (B, h, t, D)
        self.dtype = x.dtype
        x = stored_input(self.q, x)
        x = x if self.q.name == "none" else x.to(torch.float16)
        self.window = x if self.window is None else torch.cat([self.window, x], dim=2)
        self.length += x.shape[2]
        n_sinks, n_q = self._split(self.length)
        have_sinks = 0 if self.sinks is None else self.sinks.shape[2]
        if n_sinks > have_sinks:  # sinks fill first, from the oldest window tokens
            take = n_sinks - have_sinks
            head, self.window = self.window[:, :, :take], self.window[:, :, take:]
            self.sinks = head if self.sinks is None else torch.cat([self.sinks, head], dim=2)
        if n_q < self.n_quantized:
            raise ValueError(f"{self.q.spec}: quantized tokens went from {self.n_quantized} to {n_q}")
        if n_q > self.n_quantized:
            take = n_q - self.n_quantized
            chunk, self.window = self.window[:, :, :take], self.window[:, :, take:]
            self.runs.append(self.q.quantize_all(chunk.to(self.dtype)))
            merged = self.q.concat(self.runs)
            if merged is not None:
                self.runs = [merged]
            self.n_quantized = n_q

    def read(self) -> torch.Tensor:
        """(B, h, L, D) in the model's dtype: sinks, dequantized runs, window."""
        parts = [] if self.sinks is None else [self.sinks.to(self.dtype)]
        parts += [self.q.dequantize(r).to(self.dtype) for r in self.runs]
        if self.window is not None and self.window.shape[2]:
            parts.append(self.window.to(self.dtype))
        return torch.cat(parts, dim=2)

    def nbytes(self) -> dict[str, int]:
        out = {"codes": 0, "metadata": 0, "fp16": 0}
        for t in (self.sinks, self.window):
            if t is not None:
                out["fp16"] += t.numel() * t.element_size()
        for r in self.runs:
            for name, t in r.tensors.items():
                kind = "codes" if name in _CODE_NAMES else "fp16" if name in _FP16_NAMES else "metadata"
                out[kind] += t.numel() * t.element_size()
        return out


class CompressedLayer(DynamicLayer):
    """One attention layer's compressed K/V."""

    is_croppable = False

    def __init__(self, policy: Policy, layer_idx: int, n_layers: int):
        super().__init__()
        self.policy, self.layer_idx, self.n_layers = policy, layer_idx, n_layers
        self.streams: dict[str, list[_Stream]] = {}
        self.cumulative_length = 0

    def lazy_initialization(self, key_states, value_states):
        self.device = key_states.device
        self.keys = torch.tensor([], dtype=key_states.dtype, device=self.device)  # unused, kept for the API
        self.values = torch.tensor([], dtype=value_states.dtype, device=self.device)
        n_heads = key_states.shape[1]
        for which in ("k", "v"):
            groups: dict[str, _Stream] = {}
            for h in range(n_heads):
                q = self.policy.quantizer(self.layer_idx, h, which, self.n_layers)
                if q.spec not in groups:
                    groups[q.spec] = _Stream(q, [])
                groups[q.spec].heads.append(h)
            self.streams[which] = list(groups.values())
        self.is_initialized = True

    def _update_one(self, which: str, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], x.shape[1], self.cumulative_length, x.shape[3], dtype=x.dtype, device=x.device)
        for s in self.streams[which]:
            s.update(x[:, s.heads])
            out[:, s.heads] = s.read()
        return out

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        return self._update_one("k", key_states), self._update_one("v", value_states)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def reset(self) -> None:
        self.streams, self.cumulative_length, self.is_initialized = {}, 0, False

    def offload(self):  # the packed streams stay where they are
        pass

    def prefetch(self):
        pass

    def nbytes(self) -> dict[str, int]:
        out = {"codes": 0, "metadata": 0, "fp16": 0}
        for streams in self.streams.values():
            for s in streams:
                for k, v in s.nbytes().items():
                    out[k] += v
        return out


class CompressedCache(Cache):
    """A transformers cache holding every layer's K/V compressed by ``policy`` (a spec or Policy).

    ``config`` (the model's config) lets the cache check the model up front (layer count for
    ``keep_last``, no sliding-window layers); without it, policies that need the layer count are refused.
    """

    def __init__(self, policy, config=None):
        self.policy = parse_policy(policy)
        self.n_layers = None
        if config is not None:
            text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            types = set(getattr(text, "layer_types", None) or ["full_attention"])
            if types != {"full_attention"} or getattr(text, "sliding_window", None) and getattr(
                    text, "use_sliding_window", True) and "sliding_attention" in types:
                raise ValueError(f"CompressedCache supports models whose layers all use full attention; this "
                                 f"model has layer types {sorted(types)} (sliding-window layers would be "
                                 "silently wrong)")
            self.n_layers = text.num_hidden_layers
            self.policy.check_model(self.n_layers, text.num_key_value_heads)
        elif self.policy.keep_last:
            raise ValueError("CompressedCache: a policy with keep_last needs the model's layer count; pass "
                             "config=model.config")
        super().__init__(layers=[])

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(CompressedLayer(self.policy, len(self.layers), self.n_layers or 10**9))
        return self.layers[layer_idx].update(key_states, value_states)

    def nbytes(self) -> dict[str, int]:
        """Bytes actually held, split into codes, metadata (scales, minima, outliers) and fp16 tensors."""
        out = {"codes": 0, "metadata": 0, "fp16": 0}
        for layer in self.layers:
            for k, v in layer.nbytes().items():
                out[k] += v
        out["total"] = sum(out.values())
        return out

"""``CompressedCache``: a drop-in transformers ``Cache`` that really stores the packed KV of a policy.

Usage::

    cache = kvlab.CompressedCache("kivi:bits=2", config=model.config)
    out = model.generate(ids, max_new_tokens=64, **{cache_kwarg(model): cache})
    cache.nbytes()  # {"codes": ..., "metadata": ..., "fp16": ..., "total": ..., "reserved": ...}

(``cache_kwarg(model)`` is ``"cache"`` on transformers >= 5.2x, whose ``past_key_values`` still works but
is deprecated, and ``"past_key_values"`` before, which knows no ``cache``.)

Each layer keeps, for K and for V of every group of kv heads sharing a scheme, a *stream*: the fp16
sinks, the packed runs of quantized tokens (``kvlab.quant`` storage, never dequantized copies) and the
fp16 window. On every update the new tokens join the window; tokens that the scheme's
``fp16_tokens(L)`` rule says are quantized at the new length L leave the window and are quantized
together (KIVI: K in whole ``residual`` blocks, V one token at a time; llama.cpp blocks: every token on
arrival). Incoming K/V are cast to fp16 first, as an fp16 deployment would hold them (the ``none``
scheme keeps them as they are).

Runs that the scheme's ``concat`` joins by plain concatenation are appended in place into storage with
spare room on the token axis (a run's bytes are copied once, not the whole prefix on every step); that
room is reported as ``reserved`` by :meth:`CompressedCache.nbytes`, apart from the bytes of the data.
Attention reads the dequantized tensors, computed on every step from the packed storage straight into
the returned (B, H, L, D) tensor; for ``q4_0``/``q4_1``/``q8_0``, ``kivi`` and the float casts this
decoding is done here in fewer passes, with the same float32 operations as the scheme's
``dequantize`` (bit-identical results, tested), and every other scheme goes through its ``dequantize``.
On CPU, for ``q4_0``/``q4_1``/``q8_0`` and 2/4-bit ``kivi`` (no rotation), both quantizing the new tokens
and decoding a run are one call each into compiled kernels (:mod:`kvlab.cpu_kernels`, bit-identical to the
torch code, which stays the fallback: ``KVLAB_CPU_KERNELS=0`` or no C++ compiler).

Sliding-window and chunked attention layers (the config's ``layer_types``) are
:class:`~kvlab.storage.layers.CompressedSlidingLayer` layers, with transformers' own ``DynamicSlidingWindowLayer``
semantics: such a layer holds its last ``window - 1`` tokens and drops the older ones from its storage.

With ``fused=True`` (and in :class:`FusedCache`) sliding-window layers are fused layers too
(:class:`~kvlab.storage.fused.FusedLayer` with ``sliding_window``: the kernels mask what the window leaves out and
the layer drops it from its storage).

Refused up front with a ValueError (they would be silently wrong): layer types other than full, sliding
and chunked attention, chunked layers and logit soft-capping (Gemma 2) with ``fused=True``, recency policies
(``recent=``/``old=``),
schemes that are not causal (their stored values depend on later tokens), and schemes that quantize K
before RoPE unless the cache is given the model's rotary embedding (``rope=model``: such a K stream undoes
RoPE on the tokens it quantizes and re-applies it when it reads; full-attention models only).
"""

from __future__ import annotations

import inspect
import warnings

import torch
import transformers
from transformers.cache_utils import Cache

from kvlab import kernels as K
from kvlab import quant
from kvlab.model.geometry import geometry
from kvlab.quant import Quantizer
from kvlab.quant.policy import parse_policy
from kvlab.storage.fused import FusedKiviLayer, FusedLayer, check_fused_config, fused_layer
from kvlab.storage.layers import (
    CompressedLayer,
    CompressedSlidingLayer,
    PaddedRowsLayer,
    RopeTable,
    layers_nbytes,
    left_padding,
    read_packed,
    stored_input,
)

__all__ = ["CompressedCache", "FusedCache", "cache_kwarg", "read_packed", "stored_input"]

def cache_kwarg(model) -> str:
    """The keyword under which ``model.generate`` / ``model(...)`` take a cache in the installed
    transformers: ``"cache"`` where the model's forward declares it, else ``"past_key_values"``."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _layer_types(text_config) -> list[str]:
    """The attention type of every layer: ``layer_types`` where the config lists them, else inferred as
    transformers does (a ``sliding_window`` or ``attention_chunk_size`` on the config applies to every
    layer, unless ``use_sliding_window`` is False)."""
    types = getattr(text_config, "layer_types", None)
    if types:
        return list(types)
    if getattr(text_config, "sliding_window", None) is not None and getattr(text_config, "use_sliding_window", True):
        kind = "sliding_attention"
    elif getattr(text_config, "attention_chunk_size", None) is not None:
        kind = "chunked_attention"
    else:
        kind = "full_attention"
    return [kind] * text_config.num_hidden_layers


_WINDOW_OF = {"sliding_attention": "sliding_window", "chunked_attention": "attention_chunk_size"}


def _layer_windows(text_config) -> list[int | None]:
    """Per layer, the window of a sliding-window layer (the chunk size of a chunked one; transformers caches
    both alike, only their masks differ) or None for full attention; ValueError for other layer types."""
    types = _layer_types(text_config)
    other = sorted(set(types) - {"full_attention", *_WINDOW_OF})
    if other:
        raise ValueError(f"CompressedCache stores full, sliding-window and chunked attention layers; this model "
                         f"({getattr(text_config, 'model_type', '?')}) has {', '.join(f'{types.count(t)} {t}' for t in other)} "
                         f"layers of {len(types)}")
    windows = []
    for t in types:
        w = getattr(text_config, _WINDOW_OF[t], None) if t in _WINDOW_OF else None
        if t in _WINDOW_OF and not (isinstance(w, int) and w >= 1):
            raise ValueError(f"CompressedCache: the config lists {t} layers but {_WINDOW_OF[t]}={w!r}; allowed: "
                             "an integer >= 1")
        windows.append(w)
    return windows


def _check_scheme(q: Quantizer, which: str, rope: bool = False) -> None:
    if not q.causal:
        raise ValueError(f"CompressedCache: scheme {q.spec} for {which.upper()} is not causal (its scales see the "
                         "whole sequence), so a cache that quantizes tokens as they arrive cannot store it; "
                         "allowed: causal schemes (per-token groups, kivi, llama.cpp blocks, casts)")
    if not q.query_is_identity:
        raise ValueError(f"CompressedCache: scheme {q.spec} for {which.upper()} changes the query the attention "
                         "computes with (an emulation of another engine's compute path, e.g. compute=llama.cpp), "
                         "which a cache that stores K/V cannot do; allowed: the scheme without that option "
                         "(emulate it with kvlab.compress)")
    if which == "k" and q.prerope and not rope:
        raise ValueError(f"CompressedCache: scheme {q.spec} quantizes K before RoPE; the cache receives post-RoPE K, "
                         "so it needs the model's rotary embedding to undo and redo it: pass rope=model (or emulate "
                         "it with kvlab.emulation.hooks.compress)")


class CompressedCache(Cache):
    """A transformers cache holding every layer's K/V compressed by ``policy`` (a spec or Policy).

    ``config`` (the model's config) lets the cache check the model up front (layer count for
    ``keep_last``, listed heads) and tells it which layers are sliding-window or chunked; without it, every
    layer is taken for full attention and policies that need the layer count are refused. Shapes: ``update``
    takes and returns K/V as (B, kv heads, T, D).

    ``fused=True`` (CUDA): layers whose heads share one scheme the fused kernels serve (``kivi`` 2/4-bit,
    ``q4_0``/``q8_0``) are stored in the kernels' packed layout and attended by the fused decode kernel
    (:mod:`kvlab.fused_cache`); other layers stay as here. Needs the model's attention implementation set
    to ``"kvlab_fused"`` first (``kvlab.storage.fused.use_fused_attention(model)``); ``max_len`` preallocates
    that many tokens (else the buffers grow).

    ``rope``: the model (anything :func:`kvlab.model.rope.rope_cos_sin` reads its rotary module from), needed
    by K schemes that quantize before RoPE (``kvquantc``); their runs are stored pre-RoPE.
    """

    def __init__(self, policy, config=None, *, fused: bool = False, max_len: int | None = None, rope=None):
        self.policy = parse_policy(policy)
        if self.policy.recent:
            raise ValueError(f"CompressedCache: recency policies (recent={self.policy.recent}, old=...) are not "
                             "stored by the cache; allowed: policies without recent/old (use kvlab.emulation.hooks.compress "
                             "to emulate them)")
        for which in ("k", "v"):
            for spec in (getattr(self.policy, which), self.policy.keep):
                _check_scheme(quant.get(spec).for_tensor(which), which, rope is not None)
        prerope = any(quant.get(spec).for_tensor("k").prerope for spec in (self.policy.k, self.policy.keep))
        self._rope = RopeTable(rope) if prerope else None
        self.n_layers = None
        self._windows: list[int | None] = []  # per layer: its sliding window (or chunk), None for full attention
        self._types: list[str] = []  # per layer: its attention type (full_attention, sliding_attention, ...)
        self._geometry: tuple[int, int] | None = None  # (kv heads, head_dim) the config promises
        self._pads: list[int] | None = None  # left padding per row, read at the first update
        if config is not None:
            text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            if not all(isinstance(getattr(text, a, None), int) for a in ("num_hidden_layers", "num_attention_heads")):
                raise ValueError(f"CompressedCache: config={config!r} is not a model config (it needs "
                                 "num_hidden_layers and num_attention_heads); pass config=model.config")
            heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
            head_dim = getattr(text, "head_dim", None) or getattr(text, "hidden_size", 0) // text.num_attention_heads
            self._geometry = (heads, head_dim or None)
            self._windows = _layer_windows(text)
            self._types = _layer_types(text)
            self.n_layers = text.num_hidden_layers
            self.policy.check_model(self.n_layers, getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
            if self._rope is not None and set(self._types) != {"full_attention"}:
                raise ValueError("CompressedCache: a K scheme that quantizes before RoPE on a model with "
                                 f"{', '.join(sorted(set(self._types) - {'full_attention'}))} layers, whose rotary "
                                 "embedding may differ by layer type and whose eviction the pre-RoPE runs do not "
                                 "follow; allowed: models of full-attention layers only")
        elif self.policy.keep_last:
            raise ValueError("CompressedCache: a policy with keep_last needs the model's layer count; pass "
                             "config=model.config")
        self._splits: dict = {}
        self.fused, self.max_len = bool(fused), max_len
        if self.fused:
            chunked = self._types.count("chunked_attention")
            if chunked:
                raise ValueError(f"{type(self).__name__}(fused=True): this model has {chunked} chunked-attention "
                                 f"layers of {len(self._types)}, whose mask (a query sees its own chunk) the fused "
                                 "kernels do not apply; allowed: fused=False (CompressedCache stores them), or a "
                                 "model of full and sliding-window layers")
            cap = getattr(text, "attn_logit_softcapping", None) if config is not None else None
            if cap is not None:
                raise ValueError(f"{type(self).__name__}(fused=True): this model soft-caps its attention logits "
                                 f"(attn_logit_softcapping={cap}, Gemma 2), which the fused kernels do not; "
                                 "allowed: fused=False (CompressedCache), or a model without soft-capping")
            check_fused_config(config, type(self).__name__)
        super().__init__(layers=[])

    def _new_layer(self, idx: int, n_heads: int):
        """Layer ``idx``: with ``fused``, a :mod:`kvlab.fused_cache` layer (packed for the fused kernels) where
        the policy gives every head of the layer one scheme the kernels serve; else a CompressedLayer (whose
        full K/V the fused attention function hands to SDPA)."""
        n = self.n_layers or 10**9
        window = self._windows[idx] if idx < len(self._windows) else None
        if self.fused and self._pads is None:  # (a padded batch: refused below, or stored per row)
            ks = {self.policy.quantizer(idx, h, "k", n).spec for h in range(n_heads)}
            vs = {self.policy.quantizer(idx, h, "v", n).spec for h in range(n_heads)}
            if len(ks) == 1 and len(vs) == 1:
                try:
                    return fused_layer(self.policy.quantizer(idx, 0, "k", n), self.policy.quantizer(idx, 0, "v", n),
                                       self.max_len, window)
                except ValueError:  # a scheme the kernels do not serve (fp16 layers of keep_first, ...)
                    pass
        if self._pads is not None:
            if window is not None or self.fused:
                raise ValueError(f"CompressedCache: a left-padded batch (pads {self._pads}) on layer {idx}, a "
                                 f"{'fused' if self.fused else 'sliding-window'} layer, which is not stored per row; "
                                 "allowed: an unpadded batch, or fused=False on full-attention layers")
            return PaddedRowsLayer(self.policy, idx, n, self._splits, self._pads,
                                   lambda: CompressedLayer(self.policy, idx, n, self._splits, self._rope))
        if window is not None:
            return CompressedSlidingLayer(self.policy, idx, n, self._splits, sliding_window=window)
        return CompressedLayer(self.policy, idx, n, self._splits, self._rope)

    def _check_update(self, key_states, value_states, layer_idx: int) -> None:
        """The model's K/V against the config the cache was built for (a wrong config would move keep_last
        or keep_heads to other layers silently)."""
        if not (isinstance(key_states, torch.Tensor) and isinstance(value_states, torch.Tensor)
                and key_states.dim() == 4 and value_states.dim() == 4 and key_states.shape[:3] == value_states.shape[:3]):
            raise ValueError("CompressedCache.update: K and V must be (B, kv heads, t, D) tensors of one batch, head "
                             f"and token count, got {getattr(key_states, 'shape', key_states)!r} and "
                             f"{getattr(value_states, 'shape', value_states)!r}")
        if self.n_layers is None:
            return
        if not 0 <= layer_idx < self.n_layers:
            raise ValueError(f"CompressedCache: the model updates layer {layer_idx}, but the config it was built with "
                             f"has {self.n_layers} layers; pass config=model.config")
        heads, head_dim = self._geometry
        if key_states.shape[1] != heads or (head_dim is not None and key_states.shape[3] != head_dim):
            raise ValueError(f"CompressedCache: layer {layer_idx} gets K of {key_states.shape[1]} kv heads x head_dim "
                             f"{key_states.shape[3]}, but the config it was built with says {heads} x {head_dim}; pass "
                             "config=model.config")
        if layer_idx == 0 and self.layers and len(self.layers) < self.n_layers:
            raise ValueError(f"CompressedCache: the config it was built with has {self.n_layers} layers, but the model "
                             f"updated only layers 0..{len(self.layers) - 1} before coming back to layer 0 (the "
                             "policy's keep_last and layer lists were placed for the wrong count); pass "
                             "config=model.config")

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Store new K/V (B, kv heads, t, D) of layer ``layer_idx``; return all of it (B, kv heads, L, D), or
        with ``fused`` for a fused layer the new tokens only, tagged for the fused attention function.

        A left-padded batch (generate() with an attention mask) is stored per row, each row's real tokens
        only (:class:`~kvlab.storage.layers.PaddedRowsLayer`), so a row stores what it would alone. The pads
        are read off the ``position_ids`` transformers passes along (generate() derives them from the mask;
        a direct ``model(...)`` call on a padded batch must pass them too, as ``mask.cumsum(-1) - 1``)."""
        self._check_update(key_states, value_states, layer_idx)
        if layer_idx == 0 and not self.layers:
            extra = kwargs.get("kwargs") if isinstance(kwargs.get("kwargs"), dict) else kwargs
            if extra.get("position_ids") is None and key_states.shape[0] > 1 and not self.fused:
                warnings.warn("CompressedCache: the model passed no position_ids to Cache.update (transformers "
                              f"{transformers.__version__}; its generate() passes them from 5.24 on), so a left-padded batch cannot "
                              "be told from an unpadded one here: its pad tokens would be stored with the real ones "
                              "(and enter the groups of schemes that group tokens, such as KIVI's K); for padded "
                              "batches use transformers >= 5.24 (which hands the cache the position_ids generate() derives "
                              "from the mask, or that a direct call passes)", stacklevel=2)
            self._pads = left_padding(extra.get("position_ids"), key_states.shape[0], key_states.shape[2])
        while len(self.layers) <= layer_idx:
            self.layers.append(self._new_layer(len(self.layers), key_states.shape[1]))
        return self.layers[layer_idx].update(key_states, value_states)

    def nbytes(self) -> dict[str, int]:
        """Bytes held: ``codes`` (packed codes), ``metadata`` (scales, minima, outliers), ``fp16``
        (values held unquantized: fp16 windows and sinks; every value of the fp16/bf16/none casts),
        ``total`` (their sum) and ``reserved`` (allocated room for later runs, not in ``total``)."""
        return layers_nbytes(self.layers)


class FusedCache(CompressedCache):
    """A CompressedCache whose every layer is packed for the fused kernels (see the module docstring), refusing
    up front what ``CompressedCache(fused=True)`` would leave unfused. ``policy``: one scheme for K and V of
    every layer and head (``"kivi:bits=4"``, ``"kivi:bits=2,group=32,residual=128"``, ``"q4_0"``,
    ``"k=q8_0;v=q4_0"``); ``config``: the model's config, whose attention implementation must be
    ``"kvlab_fused"`` (:func:`use_fused_attention`); ``max_len``: tokens to preallocate for (prompt + new
    tokens), else buffers grow as needed.
    """

    def __init__(self, policy, config, max_len: int | None = None):
        super().__init__(policy, config, fused=True, max_len=max_len)  # the model, policy and device checks
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        n_layers, n_heads = text.num_hidden_layers, text.num_key_value_heads
        self.k, self.v = (self.policy.quantizer(0, 0, w, n_layers) for w in "kv")
        for w in "kv":
            specs = {self.policy.quantizer(layer, h, w, n_layers).spec for layer in range(n_layers)
                     for h in range(n_heads)}
            if len(specs) > 1:
                raise ValueError(f"FusedCache: the policy uses {len(specs)} schemes for {w.upper()} "
                                 f"({', '.join(sorted(specs))}); allowed: one scheme for every layer and head "
                                 "(kvlab.CompressedCache stores mixed policies)")
        layer = fused_layer(self.k, self.v, max_len)  # validates the pair and max_len
        if isinstance(layer, FusedKiviLayer):
            D = geometry(text).head_dim
            K.check_pow2("head_dim", D, 16, 256)
            if D % layer.group:
                raise ValueError(f"FusedCache: kivi group={layer.group} does not divide head_dim={D}")
        else:
            K.check_pow2("head_dim", geometry(text).head_dim, 32, 256)

    def _new_layer(self, idx: int, n_heads: int) -> FusedLayer:
        if self._pads is not None:
            raise ValueError(f"FusedCache: a left-padded batch (pads {self._pads}): the fused layout holds one token "
                             "count for every row, so pads would enter KIVI's groups and windows; allowed: an "
                             "unpadded batch, or kvlab.CompressedCache (which stores padded rows apart)")
        return fused_layer(self.k, self.v, self.max_len, self._windows[idx] if idx < len(self._windows) else None)

"""A transformers cache whose decode attention runs the fused kernels straight on the packed KV.

Usage::

    from kvlab.storage import FusedCache, use_fused_attention

    use_fused_attention(model)  # registers "kvlab_fused" and selects it; returns the previous name
    cache = FusedCache("kivi:bits=4", config=model.config)
    out = model.generate(ids, max_new_tokens=64, **{cache_kwarg(model): cache})
    cache.nbytes()  # {"codes", "metadata", "fp16", "reserved", "total"}, as CompressedCache.nbytes()

Each layer (:class:`FusedKiviLayer`, :class:`FusedGgmlLayer`) keeps its K/V in the kernels' packed,
preallocated layout (:mod:`kvlab.kernels.kivi_quant`, :mod:`kvlab.kernels.ggml_quant`) and appends with
the pack kernels. The stored values follow :class:`kvlab.CompressedCache` exactly: incoming K/V are
cast to fp16; KIVI quantizes K in whole ``residual`` blocks (``floor(L / residual) * residual`` tokens)
and V one token at a time (``max(0, L - residual)`` tokens), the rest waiting in fp16 windows; q4_0 and
q8_0 quantize every token on arrival. The codes are those of the torch quantizers (tested).

How attention finds the cache. The attention function that transformers calls receives the module, q,
the K/V returned by ``cache.update`` and ``**kwargs``, but not the cache (transformers 5.24 passes
``update`` the same ``kwargs`` dict, 5.17 does not). So ``update`` returns the new K/V tokens tagged with
their layer (an attribute on the returned tensor), and :func:`fused_attention` reads the layer from the
tag: no global state, any number of caches and models side by side. K/V without a tag (a
``DynamicCache``, no cache, or a ``CompressedCache`` layer) go to transformers' SDPA unchanged, so a
model left on ``"kvlab_fused"`` still runs with other caches.

With a tag: few query tokens (``n <= 16`` and, for KIVI, ``n <= residual``) under a plain causal mask
(None, or one that hides only the future) go to the fused decode kernel over the packed cache
(``kivi_decode_attention``, which takes the CUDA C++ kernel for fp16 caches on a GPU where it was built and
the Triton one otherwise, / ``ggml_decode_attention``); anything else (the prefill, a padded batch)
dequantizes the whole layer with the pure-torch references, bit-identical to CompressedCache's reads,
and runs transformers' SDPA with the given mask.

Limits: the returned K/V hold only the new tokens, so any other attention implementation would attend
to those alone. :class:`FusedCache` therefore refuses a model config whose attention implementation is
not ``"kvlab_fused"``, and a layer refuses a second ``update`` before the fused attention has read the
first (the usual symptom of switching implementations after building the cache). The kernels need a
CUDA device, or CPU tensors with ``TRITON_INTERPRET=1`` set before triton is imported (tests).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from kvlab import kernels as K  # imported on first use: building a cache never imports triton
from kvlab.kernels import layout  # buffer shapes and byte counts (torch only)
from kvlab.model.attention import register_attention, sdpa
from kvlab.quant import Quantizer
from kvlab.storage.layers import PackedBatchOps

__all__ = ["NAME", "FusedGgmlLayer", "FusedKiviLayer", "FusedLayer", "capture_decode_steps", "fused_attention",
           "fused_layer", "use_fused_attention"]

NAME = "kvlab_fused"
_TAG = "_kvlab_fused_layer"  # attribute of the K tensor returned by FusedLayer.update: the layer itself
MAX_FUSED_QUERIES = 16  # more query tokens than this per step: dequantize + SDPA (a prefill, a long chunk)
_ROOM = 256  # tokens of room added (at least) when a packed buffer grows


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _plain_causal(mask: torch.Tensor | None, n: int, L: int, window: int | None = None) -> bool:
    """Whether ``mask`` (None, or (B, 1 or Hq, n, L) bool / additive float) hides exactly the future of
    the last ``n`` of ``L`` tokens (with ``window``: and the tokens a sliding window leaves out), what the
    fused kernels apply on their own."""
    if mask is None:
        return True
    if mask.dim() != 4 or mask.shape[-2] != n or mask.shape[-1] != L:
        return False
    visible = mask if mask.dtype == torch.bool else mask == 0
    pos = torch.arange(L, device=mask.device)[None, :]
    last = (L - n + torch.arange(n, device=mask.device))[:, None]
    expected = pos <= last  # (n, L)
    if window is not None:
        expected &= pos > last - window
    return bool((visible == expected).all())


def _hides_past(mask: torch.Tensor | None, n: int, L: int, window: int | None = None) -> bool:
    """Whether ``mask`` ((B, 1 or Hq, n, L), the last ``n`` of ``L`` tokens querying) hides from some query a
    past token that the causal (sliding) rule shows: the mark of a left-padded batch, whatever transformers
    passed to ``update``."""
    if mask is None or mask.dim() != 4 or mask.shape[-2:] != (n, L):
        return False
    visible = mask if mask.dtype == torch.bool else mask == 0
    last = L - n + torch.arange(n, device=mask.device)  # (n,) the column of each query's own token
    expected = last + 1 if window is None else (last + 1).clamp(max=window)
    return bool((visible.sum(-1) < expected).any())


def _sdpa(module, query, key, value, attention_mask, scaling, **kwargs):
    return sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling, **kwargs)


class FusedLayer(PackedBatchOps, DynamicLayer):
    """One attention layer's K/V in a kernel layout. Subclasses implement ``_allocate`` (buffers for B
    sequences), ``_append`` (new fp16 tokens), ``_decode`` (the fused kernel), ``_dequantize`` (the whole
    layer, float32) and ``_used_bytes``; the base does the bookkeeping, the tag, the dispatch between
    the fused and the dequantizing path, growth, batch reordering and byte accounting.

    ``max_len`` (optional): tokens to preallocate for, so that no buffer grows during generation.
    Shapes: ``update`` takes K/V (B, kv heads, t, D); the cache has seen ``cumulative_length`` tokens and holds
    the last ``held`` of them (all, unless ``sliding_window``).

    ``sliding_window`` (a sliding-window layer's window W, as transformers' ``DynamicSlidingWindowLayer``):
    attention sees the last W tokens up to each query (the kernels' ``window``), and after each attention the
    layer drops from its front what no later query can see, in the units its layout can lose without
    touching later tokens (``_evictable``): the tokens kept are stored exactly as in a full-attention layer
    (KIVI's K groups and windows follow the full length, as in a decode loop), and ``nbytes`` counts only
    what is held. The dequantizing path hands SDPA the last ``min(seen, W - 1) + n`` tokens, what
    :meth:`get_mask_sizes` told transformers to build the mask for.
    """

    is_croppable = False
    is_sliding = False

    def __init__(self, max_len: int | None = None, sliding_window: int | None = None):
        super().__init__()
        if max_len is not None and (not isinstance(max_len, int) or max_len < 1):
            raise ValueError(f"max_len={max_len!r} is not allowed; allowed: None or an int >= 1")
        if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                           or sliding_window < 1):
            raise ValueError(f"sliding_window={sliding_window!r} is not allowed; allowed: None or an int >= 1")
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.max_len = max_len
        self.cumulative_length = 0
        self.offset = 0  # tokens dropped from the front (a sliding layer's eviction); held = seen - offset
        self.bufs: dict[str, torch.Tensor] = {}  # every stored tensor, by name
        self.n_fused = 0  # attention calls served by the fused kernel
        self.n_dequant = 0  # attention calls served by dequantize + SDPA
        self._unread = False  # update() returned K/V that no fused attention has read yet
        self._causal_trusted = False  # set by capture_decode_steps: the mask is known plain causal, skip the check

    # ---- to implement -----------------------------------------------------------------------------
    def _allocate(self, B: int, H: int, D: int, device: torch.device) -> None:
        raise NotImplementedError

    def _append(self, k: torch.Tensor, v: torch.Tensor, L0: int, L1: int) -> None:
        """Store new fp16 tokens k, v (B, H, t, D), the cache going from L0 to L1 = L0 + t tokens."""
        raise NotImplementedError

    def _decode(self, q: torch.Tensor, scaling: float) -> torch.Tensor:
        """Fused attention of the contiguous queries q (B, Hq, n, D) over the cache: (B, Hq, n, D)."""
        raise NotImplementedError

    def _dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole cache as float32 K, V (B, H, L, D), as CompressedCache reads it."""
        raise NotImplementedError

    def _used_bytes(self) -> dict[str, int]:
        """{"codes", "metadata", "fp16"}: bytes of the stored data (not of the room beyond it)."""
        raise NotImplementedError

    def _evictable(self, held: int, keep: int) -> int:
        """How many of the ``held`` oldest tokens the layout can drop, all of them older than the last ``keep``
        (a sliding layer; the base drops none)."""
        return 0

    def _drop_front(self, k: int) -> None:
        """Drop the ``k`` oldest held tokens (as ``_evictable`` allowed), moving the rest to the buffers' front."""
        raise NotImplementedError

    @property
    def held(self) -> int:
        """Tokens stored: those seen, less those a sliding layer dropped."""
        return self.cumulative_length - self.offset

    # ---- the cache-layer interface ------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states):
        device = key_states.device
        if not (device.type == "cuda" or (device.type == "cpu" and K.interpreted())):
            raise ValueError(f"{type(self).__name__}: K/V are on {device}; the fused kernels need a CUDA device "
                             "(or CPU tensors with TRITON_INTERPRET=1 set before triton is imported); use "
                             "kvlab.CompressedCache elsewhere")
        if key_states.dtype not in K.FLOATS:
            raise ValueError(f"{type(self).__name__}: K/V have dtype {key_states.dtype}; allowed: float16, "
                             "bfloat16, float32")
        B, H, _, D = key_states.shape
        self.dtype, self.device, self.shape = key_states.dtype, device, (B, H, D)
        self.keys = torch.tensor([], dtype=self.dtype, device=device)  # unused, kept for the API
        self.values = torch.tensor([], dtype=self.dtype, device=device)
        self._allocate(B, H, D, device)
        self.lengths = torch.zeros(B, dtype=torch.int32, device=device)  # the kernels' per-sequence lengths
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Store new K/V (B, kv heads, t, D); return them (only the new tokens) tagged with this layer."""
        if self._unread:
            raise ValueError(f"{type(self).__name__}: update() called again before attention read the last one: "
                             f"the model's attention implementation must be {NAME!r} (kvlab.fused_cache."
                             "use_fused_attention(model)) for as long as it uses this cache")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape != value_states.shape or (key_states.shape[0], key_states.shape[1],
                                                      key_states.shape[3]) != self.shape:
            raise ValueError(f"{type(self).__name__}: K {tuple(key_states.shape)} and V {tuple(value_states.shape)} "
                             f"must both be (B, H, t, D) with (B, H, D) = {self.shape}")
        L0 = self.held
        L1 = L0 + key_states.shape[2]
        self._append(key_states.to(torch.float16), value_states.to(torch.float16), L0, L1)
        self.cumulative_length += key_states.shape[2]
        self.lengths.fill_(L1)
        k, v = key_states.view(key_states.shape), value_states.view(value_states.shape)  # views, so the tag is ours
        setattr(k, _TAG, self)
        self._unread = True
        return k, v

    def attend(self, module, query, attention_mask, scaling, **kwargs):
        """Attention of ``query`` (B, Hq, n, D) over the cache; returns ((B, n, Hq, D), None) as
        transformers' attention functions do."""
        self._unread = False
        n, W = query.shape[2], self.sliding_window
        # the tokens the mask covers: every held one, or a sliding layer's min(seen before, W - 1) + n
        L = self.held if W is None else min(self.cumulative_length - n, W - 1) + n
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        if n <= self._max_queries() and (self._causal_trusted or _plain_causal(attention_mask, n, L, W)):
            self.n_fused += 1
            out = self._decode(query.contiguous(), scaling).transpose(1, 2), None
        else:
            if self.n_dequant + self.n_fused == 0 and _hides_past(attention_mask, n, L, W):
                raise ValueError("FusedCache: a left-padded batch (the mask hides past tokens from a row's last "
                                 "query): the fused layout holds one token count for every row, so pads would enter "
                                 "KIVI's groups and windows; allowed: an unpadded batch, or kvlab.CompressedCache "
                                 "(which stores padded rows apart)")
            self.n_dequant += 1
            k, v = self._dequantize()
            k, v = k[:, :, k.shape[2] - L :], v[:, :, v.shape[2] - L :]
            out = _sdpa(module, query, k.to(query.dtype), v.to(query.dtype), attention_mask, scaling, **kwargs)
        if W is not None:  # what no later query sees (all of them come after the last token held)
            drop = self._evictable(self.held, W - 1)
            if drop:
                self._drop_front(drop)
                self.offset += drop
                self.lengths.fill_(self.held)
        return out

    def _max_queries(self) -> int:
        return MAX_FUSED_QUERIES

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window

    def get_max_cache_shape(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window

    def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
        """(kv_length, kv_offset) of the next update's mask: a full layer's, or as ``DynamicSlidingWindowLayer``
        gives them for a sliding one (transformers before 5 pass the cache positions, whose count is the query
        length)."""
        if self.sliding_window is None:
            return super().get_mask_sizes(query_length, *args)
        q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        W = self.sliding_window
        return min(self.cumulative_length, W - 1) + q, max(self.cumulative_length - W + 1, 0)

    def reset(self) -> None:
        self.bufs, self.cumulative_length, self.is_initialized, self._unread = {}, 0, False, False
        self.offset = 0

    def _map_batch(self, fn) -> None:
        self.bufs = {name: fn(t).contiguous() for name, t in self.bufs.items()}
        B = next(iter(self.bufs.values())).shape[0]
        self.shape = (B, *self.shape[1:])
        self.lengths = torch.full((B,), self.held, dtype=torch.int32, device=self.device)

    def nbytes(self) -> dict[str, int]:
        """Bytes held: ``codes``, ``metadata`` (scales, minima), ``fp16`` (the fp16 windows) and
        ``reserved`` (allocated room beyond the stored tokens: preallocated capacity, window slots)."""
        if not self.is_initialized:
            return {"codes": 0, "metadata": 0, "fp16": 0, "reserved": 0}
        out = self._used_bytes()
        allocated = sum(t.numel() * t.element_size() for t in self.bufs.values())
        out["reserved"] = allocated - sum(out.values())
        return out

    # ---- helpers for the subclasses -----------------------------------------------------------------
    def _capacity(self, need: int, have: int, multiple: int) -> int:
        """Tokens to allocate for ``need`` when ``have`` are allocated: max_len's worth at first, then an
        eighth more (at least _ROOM tokens); a multiple of ``multiple``."""
        want = max(need, have + max(have // 8, _ROOM))
        if have == 0 and self.max_len is not None:
            want = max(need, self.max_len)
        return _round_up(want, multiple)

    def _grow(self, names: tuple[str, ...], dim: int, per_token: float, used: int, cap: int) -> None:
        """Reallocate buffers ``names`` to ``cap`` tokens along ``dim`` (``per_token`` entries a token
        there), keeping the first ``used`` tokens."""
        for name in names:
            old = self.bufs[name]
            shape = list(old.shape)
            shape[dim] = int(cap * per_token)
            new = torch.empty(shape, dtype=old.dtype, device=old.device)
            keep = int(used * per_token)
            if keep:
                new.narrow(dim, 0, keep).copy_(old.narrow(dim, 0, keep))
            self.bufs[name] = new

    def _shift(self, names: tuple[str, ...], dim: int, per_token: float, used: int, k: int) -> None:
        """Move tokens ``k .. used`` of buffers ``names`` (``per_token`` entries a token along ``dim``) to
        their front: the ``k`` oldest go."""
        a, n = int(k * per_token), int((used - k) * per_token)
        for name in names:
            buf = self.bufs[name]
            if n:
                buf.narrow(dim, 0, n).copy_(buf.narrow(dim, a, n).clone())


def _shift_window(win: torch.Tensor, held: int, new: torch.Tensor, leave: int):
    """A window buffer (B, H, W, D) holding ``held`` tokens, then the ``new`` tokens (B, H, t, D): the first
    ``leave`` of the held + t tokens leave. Returns (the leaving tokens, contiguous, or None; the window
    buffer holding the rest from its start), writing in place when nothing leaves."""
    t = new.shape[2]
    if leave == 0:
        win[:, :, held : held + t].copy_(new)
        return None, win
    if leave <= held:
        gone = win[:, :, :leave].contiguous()
    else:
        gone = torch.cat([win[:, :, :held], new[:, :, : leave - held]], dim=2) if held else new[:, :, :leave]
        gone = gone.contiguous()
    out = torch.empty_like(win)
    a = max(held - leave, 0)
    if a:
        out[:, :, :a].copy_(win[:, :, leave:held])
    rest = new[:, :, max(leave - held, 0) :]
    out[:, :, a : a + rest.shape[2]].copy_(rest)
    return gone, out


class FusedKiviLayer(FusedLayer):
    """KIVI (2 or 4 bits, ``group``, ``residual``): packed K (per channel, groups of tokens) and V (per
    token, groups of channels) as :mod:`kvlab.kernels.layout` lays them out, plus fp16 windows of
    ``residual`` tokens each (``k_fp16`` holds ``L mod residual`` tokens, ``v_fp16`` ``min(L, residual)``)."""

    def __init__(self, bits: int, group: int, residual: int, max_len: int | None = None,
                 sliding_window: int | None = None):
        super().__init__(max_len, sliding_window)
        _check_kivi(bits, group, residual)
        self.bits, self.group, self.residual = bits, group, residual
        if sliding_window is not None and max_len is not None:  # held <= R + max(W - 1, R) + a step's tokens
            self.max_len = min(max_len, residual + max(sliding_window, residual) + MAX_FUSED_QUERIES)

    def _evictable(self, held, keep):
        """Whole residual blocks (so the kernels' rule nk = L // R * R, nv = L - R holds for what stays) that
        both K and V hold quantized, all older than the last ``keep`` tokens."""
        R = self.residual
        return max(0, min(held - keep, held - R)) // R * R

    def _drop_front(self, k):
        nk, nv = self._counts(self.held)
        self._shift(("k_codes",), 3, self.bits / 8, nk, k)
        self._shift(("k_scale", "k_min"), 2, 1 / self.group, nk, k)
        self._shift(("v_codes", "v_scale", "v_min"), 2, 1, nv, k)

    def _counts(self, L: int) -> tuple[int, int]:  # (quantized K tokens, quantized V tokens)
        return layout.kivi_counts(L, self.residual)

    def _max_queries(self) -> int:
        return min(MAX_FUSED_QUERIES, self.residual)

    def _allocate(self, B, H, D, device):
        K.check_pow2("head_dim", D, 16, 256)
        if D % self.group or self.group > D:
            raise ValueError(f"kivi group={self.group} must divide head_dim={D} (V is grouped along head_dim)")
        # one residual block of K room from the start: the kernels view the K codes as int32 words, which an
        # empty (B, H, D, 0) buffer cannot be (a prompt shorter than the residual, then a decode step)
        self.bufs = layout.kivi_empty(B, H, D, bits=self.bits, group=self.group, residual=self.residual,
                                      cap_k=_round_up(self.max_len or 1, self.residual),
                                      device=device)._asdict()

    def _caps(self) -> tuple[int, int]:
        return self.bufs["k_codes"].shape[-1] * 8 // self.bits, self.bufs["v_codes"].shape[2]

    def _append(self, k, v, L0, L1):
        (nk0, nv0), (nk1, nv1) = self._counts(L0), self._counts(L1)
        capk, capv = self._caps()
        if nk1 > capk:  # K capacity: whole residual blocks (so whole groups and whole int32 words)
            cap = self._capacity(nk1, capk, self.residual)
            self._grow(("k_codes",), 3, self.bits / 8, nk0, cap)
            self._grow(("k_scale", "k_min"), 2, 1 / self.group, nk0, cap)
        if nv1 > capv:
            cap = self._capacity(nv1, capv, 64)
            self._grow(("v_codes", "v_scale", "v_min"), 2, 1, nv0, cap)
        b = self.bufs
        gone, b["k_fp16"] = _shift_window(b["k_fp16"], L0 - nk0, k, nk1 - nk0)
        if gone is not None:
            K.kivi_pack_k(gone, b["k_codes"], b["k_scale"], b["k_min"], nk0, bits=self.bits, group=self.group)
        gone, b["v_fp16"] = _shift_window(b["v_fp16"], L0 - nv0, v, nv1 - nv0)
        if gone is not None:
            K.kivi_pack_v(gone, b["v_codes"], b["v_scale"], b["v_min"], nv0, bits=self.bits, group=self.group)

    def _decode(self, q, scaling):
        b = self.bufs
        return K.kivi_decode_attention(q, *[b[n] for n in layout.KIVI_BUFFERS], self.lengths, bits=self.bits,
                                       group=self.group, residual=self.residual, sm_scale=scaling,
                                       max_len=self.held, window=self.sliding_window)

    def _dequantize(self):
        b, L = self.bufs, self.held
        nk, nv = self._counts(L)
        kw = dict(bits=self.bits, group=self.group)
        k = torch.cat([K.kivi_dequantize_k_ref(b["k_codes"], b["k_scale"], b["k_min"], nk, **kw),
                       b["k_fp16"][:, :, : L - nk].float()], dim=2)
        v = torch.cat([K.kivi_dequantize_v_ref(b["v_codes"], b["v_scale"], b["v_min"], nv, **kw),
                       b["v_fp16"][:, :, : L - nv].float()], dim=2)
        return k, v

    def _used_bytes(self):
        (B, H, D), L = self.shape, self.held
        return layout.kivi_bytes(B, H, D, L, bits=self.bits, group=self.group, residual=self.residual)


class FusedGgmlLayer(FusedLayer):
    """llama.cpp ``q4_0`` / ``q8_0`` (K and V each): every token quantized on arrival into the layout of
    :func:`kvlab.kernels.layout.ggml_shapes`; no fp16 window."""

    def __init__(self, k_fmt: str, v_fmt: str, max_len: int | None = None, sliding_window: int | None = None):
        super().__init__(max_len, sliding_window)
        for name, fmt in (("k_fmt", k_fmt), ("v_fmt", v_fmt)):
            if fmt not in _GGML:
                raise ValueError(f"{name}={fmt!r} is not allowed; allowed: {', '.join(_GGML)}")
        self.k_fmt, self.v_fmt = k_fmt, v_fmt
        if sliding_window is not None and max_len is not None:  # held <= W - 1 + _EVICT_UNIT + a step's tokens
            self.max_len = min(max_len, sliding_window + _EVICT_UNIT + MAX_FUSED_QUERIES)

    def _evictable(self, held, keep):
        """Every token is quantized on its own; they go in units of _EVICT_UNIT (a copy every so many steps)."""
        return max(0, held - keep) // _EVICT_UNIT * _EVICT_UNIT

    def _drop_front(self, k):
        self._shift(tuple(self.bufs), 2, 1, self.held, k)

    def _allocate(self, B, H, D, device):
        K.check_pow2("head_dim", D, 32, 256)
        self.bufs = {}
        for n, fmt in (("k", self.k_fmt), ("v", self.v_fmt)):
            shapes = layout.ggml_shapes(fmt, B, H, 0, D)
            self.bufs[f"{n}_codes"] = torch.empty(shapes["codes"][0], dtype=shapes["codes"][1], device=device)
            self.bufs[f"{n}_d"] = torch.empty(shapes["d"][0], dtype=torch.float16, device=device)

    def _append(self, k, v, L0, L1):
        cap = self.bufs["k_codes"].shape[2]
        if L1 > cap:
            self._grow(tuple(self.bufs), 2, 1, L0, self._capacity(L1, cap, 64))
        b = self.bufs
        K.ggml_pack(k.contiguous(), b["k_codes"], b["k_d"], L0, fmt=self.k_fmt)
        K.ggml_pack(v.contiguous(), b["v_codes"], b["v_d"], L0, fmt=self.v_fmt)

    def _decode(self, q, scaling):
        b = self.bufs
        return K.ggml_decode_attention(q, b["k_codes"], b["k_d"], b["v_codes"], b["v_d"], self.lengths,
                                     k_fmt=self.k_fmt, v_fmt=self.v_fmt, sm_scale=scaling,
                                     max_len=self.held, window=self.sliding_window)

    def _dequantize(self):
        b, L = self.bufs, self.held
        return (K.ggml_dequantize_ref(b["k_codes"][:, :, :L], b["k_d"][:, :, :L], self.k_fmt),
                K.ggml_dequantize_ref(b["v_codes"][:, :, :L], b["v_d"][:, :, :L], self.v_fmt))

    def _used_bytes(self):
        (B, H, D), L = self.shape, self.held
        return layout.ggml_bytes(self.k_fmt, self.v_fmt, B, H, D, L)


_GGML = ("q4_0", "q8_0")
_EVICT_UNIT = 64  # tokens a sliding q4_0 / q8_0 layer drops at once


def _check_kivi(bits, group, residual) -> None:
    if bits not in (2, 4):
        raise ValueError(f"kivi bits={bits!r} is not allowed by the fused kernels; allowed: 2, 4")
    try:
        K.check_pow2("group", group, 32 // bits, 256)
    except ValueError as e:
        raise ValueError(f"kivi {e} (the fused kernels read the codes of one 32-bit word from one group)") from None
    if not isinstance(residual, int) or residual < group or residual % group:
        raise ValueError(f"kivi residual={residual!r} is not allowed; allowed: a positive multiple of group={group}")


def fused_layer(k: Quantizer, v: Quantizer, max_len: int | None = None,
                sliding_window: int | None = None) -> FusedLayer:
    """The fused layer storing K with quantizer ``k`` and V with ``v`` (as ``Policy.quantizer`` returns
    them), a sliding-window layer with ``sliding_window``; ValueError naming what is allowed when the kernels
    cannot serve that pair."""
    allowed = ("allowed: kivi for K and V with the same bits (2, 4), group and residual; or q4_0 / q8_0 "
               "for each of K and V")
    for q in (k, v):
        if q.rotate != "none":
            raise ValueError(f"fused cache: {q.spec} rotates head_dim; the fused kernels read unrotated codes; "
                             + allowed)
    lk, lv = k.layout(), v.layout()
    if lk is not None and lv is not None and lk.kind == lv.kind == "group":
        if (lk.bits, lk.group, lk.window) != (lv.bits, lv.group, lv.window):
            raise ValueError(f"fused cache: K {k.spec} and V {v.spec} differ in bits, group or residual; " + allowed)
        return FusedKiviLayer(lk.bits, lk.group, lk.window, max_len, sliding_window)
    if lk is not None and lv is not None and lk.kind == lv.kind == "block" and {lk.fmt, lv.fmt} <= set(_GGML):
        return FusedGgmlLayer(lk.fmt, lv.fmt, max_len, sliding_window)
    raise ValueError(f"fused cache: no fused kernel for K {k.spec} with V {v.spec}; " + allowed)


# ---------------------------------------------------------------------------------------------------
# the attention function and the cache
# ---------------------------------------------------------------------------------------------------
def fused_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function ``"kvlab_fused"``: K/V tagged by a :class:`FusedLayer` are
    attended through that layer (fused kernel or dequantize + SDPA); any other K/V through SDPA."""
    layer = getattr(key, _TAG, None)
    if layer is None:
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if dropout:
        raise ValueError(f"{NAME} attention: dropout={dropout} is not supported (the fused cache is for inference)")
    return layer.attend(module, query, attention_mask, scaling, **kwargs)


def use_fused_attention(model) -> str:
    """Register ``"kvlab_fused"`` with transformers (attention function, and the SDPA mask builder) and
    select it on ``model``; returns the previous implementation's name (to restore it with
    ``model.set_attn_implementation(previous)``)."""
    if not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"{type(model).__name__} has no set_attn_implementation: the fused cache needs a "
                         "transformers model that calls the configurable attention interface")
    register_attention(NAME, fused_attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    return previous


def _tensors_of(layer) -> list[torch.Tensor]:
    """Every tensor a cache layer holds (attributes, and the values of dict attributes such as ``bufs``)."""
    out = []
    for v in vars(layer).values():
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, dict):
            out += [t for t in v.values() if isinstance(t, torch.Tensor)]
    return out


def capture_decode_steps(model, cache_kw: str, cache, tok: torch.Tensor, steps: int, warmup: int = 1,
                         per_step: bool = True):
    """Run ``warmup`` greedy decode steps of ``model`` through ``cache``, then capture the next ``steps`` into
    CUDA graphs: one graph per step, or (``per_step=False``) all of them in one graph.

    ``tok`` (B, 1): the last token of each sequence, the batch unpadded (no attention mask is passed);
    ``cache_kw``: the keyword the model takes the cache under (``kvlab.storage.cache_kwarg(model)``). The warm-up
    steps run eagerly on the stream the graphs are then captured on, as PyTorch asks (library handles and
    workspaces for that stream exist before the capture, the kernels are compiled and their split plans known);
    at least one is required, and in each of them every fused layer must have taken the fused kernel. While
    capturing, the fused layers skip their check that the mask is plain causal (a device-to-host read, not
    allowed in a capture): with no padding, transformers builds that mask for every decode step.

    A step's host-side logic (where the cache appends, which window tokens are packed) runs once, during its
    capture, and is baked into its graph: so the graphs must be replayed once each, in order, after which
    ``tokens`` (B, steps) holds the greedy tokens of those steps and the cache the ``warmup + steps`` new tokens,
    as an eager loop would leave them. The graphs share one memory pool (safe because they replay in the order
    they were captured), and each keeps alive the tensors the cache held before the capture (``g.keepalive``):
    a step frees what it replaces, and memory allocated outside the pool and freed during a capture could
    otherwise be reused or released before the graph that still reads it replays (seen: an illegal address in
    ``torch.cat`` of a DynamicCache, replaying the second of several per-step graphs). A cache whose decode step
    makes no other device-to-host read can be captured (DynamicCache, a FusedCache). Returns (graphs, tokens)."""
    if warmup < 1:
        raise ValueError(f"warmup={warmup} is not allowed; allowed: an int >= 1 (eager steps on the capture stream)")
    layers = list(getattr(cache, "layers", []))
    fused = [layer for layer in layers if isinstance(layer, FusedLayer)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graphs = []
    with torch.no_grad(), torch.cuda.stream(stream):
        before = [layer.n_fused for layer in fused]
        for _ in range(warmup):
            tok = model(input_ids=tok, logits_to_keep=1, **{cache_kw: cache}).logits[:, -1].argmax(-1, keepdim=True)
        if any(layer.n_fused - n < warmup for layer, n in zip(fused, before)):
            raise ValueError("capture_decode_steps: a warm-up step did not take the fused kernel in every fused layer "
                             "(a padded batch, or more query tokens than the kernel serves); its graphs would bake "
                             "that choice in")
        static_tok = tok.clone()
        tokens = torch.full((tok.shape[0], steps), -1, dtype=tok.dtype, device=tok.device)  # -1: not written yet
        keepalive = [tok, static_tok, *(t for layer in layers for t in _tensors_of(layer))]
        stream.synchronize()
        pool = torch.cuda.graph_pool_handle()

        def step(i):
            logits = model(input_ids=static_tok, logits_to_keep=1, **{cache_kw: cache}).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            static_tok.copy_(nxt)
            tokens[:, i : i + 1].copy_(nxt)

        for layer in fused:
            layer._causal_trusted = True
        try:
            for i in range(steps) if per_step else range(1):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, stream=stream):
                    for j in (i,) if per_step else range(steps):
                        step(j)
                g.keepalive = keepalive
                graphs.append(g)
        finally:
            for layer in fused:
                layer._causal_trusted = False
    torch.cuda.current_stream().wait_stream(stream)
    return graphs, tokens


def check_fused_config(config, who: str) -> None:
    """ValueError unless the kernels can run here and ``config`` selects the ``"kvlab_fused"`` attention."""
    if not (torch.cuda.is_available() or K.interpreted()):
        raise ValueError(f"{who} needs a CUDA device (or TRITON_INTERPRET=1 set before triton is imported, "
                         "for CPU tests); use kvlab.CompressedCache without fused elsewhere")
    impl = getattr(config, "_attn_implementation", None)
    if impl != NAME:
        raise ValueError(f"{who}: the model's attention implementation is {impl!r}, not {NAME!r}; call "
                         "kvlab.storage.fused.use_fused_attention(model) first (another implementation would "
                         "attend to the new tokens only)")

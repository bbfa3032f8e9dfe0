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

Refused up front with a ValueError (they would be silently wrong): models with sliding-window or chunked
attention layers, recency policies (``recent=``/``old=``), schemes that are not causal (their stored
values depend on later tokens) and schemes that quantize K before RoPE.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from transformers.cache_utils import Cache, DynamicLayer

from . import cpu_kernels, quant
from .policy import Policy, parse_policy
from .quant import Packed, Quantizer

__all__ = ["CompressedCache", "cache_kwarg", "stored_input"]

_CODE_NAMES = ("codes", "qh")
_FP16_NAMES = ("fp16", "x")  # a scheme's fp16 window; the values of the fp16/bf16/none casts


def stored_input(q: Quantizer, x: torch.Tensor) -> torch.Tensor:
    """What a scheme receives from the model: fp16 values (an fp16 deployment), except ``none``."""
    return x if q.name == "none" else x.to(torch.float16).to(x.dtype)


def cache_kwarg(model) -> str:
    """The keyword under which ``model.generate`` / ``model(...)`` take a cache in the installed
    transformers: ``"cache"`` where the model's forward declares it, else ``"past_key_values"``."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


# ---------------------------------------------------------------------------------------------------
# decoding packed runs into the output
# ---------------------------------------------------------------------------------------------------
def _unpack_into(packed: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Codes packed as :func:`kvlab.quant.pack_bits` (bits 2 or 4; uint8 (..., n)) -> ``out`` (..., n, 8/bits)
    of any dtype: code ``i`` of each byte goes to ``out[..., i]``."""
    k, mask = 8 // bits, 2**bits - 1
    torch.bitwise_and(packed, mask, out=out[..., 0])
    for i in range(1, k - 1):
        torch.bitwise_and(packed >> (bits * i), mask, out=out[..., i])
    torch.bitwise_right_shift(packed, bits * (k - 1), out=out[..., k - 1])


def _read_cast(q, t, shape, out):  # fp16 / bf16 / none: the stored values, converted
    out.copy_(t["x"])


def _read_ggml(q, t, shape, out):  # q4_0 / q4_1 / q8_0: d * (q - 2**(b-1)), or d * q + m
    if out.dtype == torch.float32 and cpu_kernels.usable(out):
        cpu_kernels.ops().ggml_read(t["codes"], t["scale"], t.get("min"), q.nbits, out)
        return
    B, H, T, D = shape
    o = out.view(B, H, T, D // 32, 32)
    if q.nbits == 8:
        o.copy_(t["codes"].view(torch.int8).view(B, H, T, D // 32, 32))
    else:
        qs = t["codes"].view(B, H, T, D // 32, 16)  # ggml's qs[j] = q[j] | q[j + 16] << 4
        torch.bitwise_and(qs, 15, out=o[..., :16])
        torch.bitwise_right_shift(qs, 4, out=o[..., 16:])
        if not q.asym:
            o.sub_(8)
    o.mul_(t["scale"].unsqueeze(-1))  # fp16 scale and minimum: exact in float32
    if q.asym:
        o.add_(t["min"].unsqueeze(-1))


def _read_kivi(q, t, shape, out):  # codes * scale + min, K grouped along tokens, V along head_dim
    if out.dtype == torch.float32 and cpu_kernels.usable(out):
        cpu_kernels.ops().kivi_read(t["codes"], t["scale"], t["min"], q.bits, q.group, q.tensor == "k", out)
        return
    B, H, T, D = shape
    g, k = q.group, 8 // q.bits
    if q.tensor == "k":  # codes (B, H, D, T*bits/8) packed along tokens; scale, min (B, H, T/g, D)
        _unpack_into(t["codes"], q.bits, out.transpose(-1, -2).view(B, H, D, T // k, k))
        o, scale, lo = out.view(B, H, T // g, g, D), t["scale"].unsqueeze(3), t["min"].unsqueeze(3)
    else:  # codes (B, H, T, D*bits/8) packed along head_dim; scale, min (B, H, T, D/g)
        _unpack_into(t["codes"], q.bits, out.view(B, H, T, D // k, k))
        o, scale, lo = out.view(B, H, T, D // g, g), t["scale"].unsqueeze(-1), t["min"].unsqueeze(-1)
    o.mul_(scale).add_(lo)  # fp16 scale and minimum: exact in float32


def _reader(q: Quantizer):
    """A function ``(q, tensors, shape, out)`` that writes the dequantized run into the float32 ``out``,
    bit-identical to ``q.dequantize``; None where only ``q.dequantize`` knows how. Except ``_read_cast``
    they run on CPU only (integer ops written into float ``out=`` tensors, which CUDA refuses)."""
    if q.rotate != "none":
        return None
    if q.name in ("fp16", "bf16", "none"):
        return _read_cast
    if q.name in ("q4_0", "q4_1", "q8_0"):
        return _read_ggml
    if q.name == "kivi" and q.bits in (2, 4):
        return _read_kivi
    return None


def read_packed(q: Quantizer, packed: Packed, out: torch.Tensor) -> None:
    """Write ``q.dequantize(packed)`` into ``out`` (B, H, T, D), a view of any float dtype, without
    building the dequantized tensor first where the scheme has a fast path here."""
    reader = _reader(q)
    if reader is _read_kivi and packed.tensors["fp16"].shape[-2]:  # a run with its own window: not from a cache
        reader = None
    if reader is not _read_cast and out.device.type != "cpu":
        reader = None
    if reader is None:
        out.copy_(q.dequantize(packed))
        return
    if reader is _read_cast or out.dtype == torch.float32:
        reader(q, packed.tensors, packed.shape, out)
        return
    tmp = torch.empty(out.shape, dtype=torch.float32, device=out.device)  # the schemes decode in float32
    reader(q, packed.tensors, packed.shape, tmp)
    out.copy_(tmp)


def _quantize_cpu(q: Quantizer, x: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """``q.quantize_all(x).tensors`` from the compiled CPU kernels (bit-identical) for q4_0 / q4_1 / q8_0 and
    KIVI 2/4-bit on CPU; None where they do not apply (other schemes, rotations, shapes the scheme refuses,
    non-finite values: the scheme's own code then raises its error)."""
    if q.rotate != "none" or x.dim() != 4 or x.dtype not in (torch.float16, torch.float32) or not x.numel():
        return None
    B, H, T, D = x.shape
    if q.name in ("q4_0", "q4_1", "q8_0") and D % 32 == 0:
        if not cpu_kernels.usable(x):
            return None
        out = cpu_kernels.ops().ggml_quantize(x, q.nbits, q.asym)
        names = ("codes", "scale", "min")
    elif q.name == "kivi" and q.bits in (2, 4) and (T % q.group == 0 if q.tensor == "k" else D % q.group == 0):
        if (T if q.tensor == "k" else D) % (8 // q.bits) or not cpu_kernels.usable(x):
            return None
        out = cpu_kernels.ops().kivi_quantize(x, q.bits, q.group, q.tensor == "k")
        names = ("codes", "scale", "min")
        if out:
            out = [*out, x.new_empty(B, H, 0, D, dtype=torch.float16)]
            names = (*names, "fp16")
    else:
        return None
    return dict(zip(names, out)) if out else None


# ---------------------------------------------------------------------------------------------------
# packed storage of one stream
# ---------------------------------------------------------------------------------------------------
def _join_dims(q: Quantizer, a: Packed, b: Packed) -> dict[str, int] | None:
    """The dim along which ``q.concat`` joins each tensor of runs a and b, where it joins every tensor by
    plain concatenation (checked); None otherwise."""
    merged = q.concat([a, b])
    if merged is None or set(merged.tensors) != set(a.tensors):
        return None
    dims = {}
    for name, m in merged.tensors.items():
        ta, tb = a.tensors[name], b.tensors[name]
        found = [d for d in range(m.dim()) if m.shape[d] == ta.shape[d] + tb.shape[d]
                 and all(m.shape[e] == ta.shape[e] == tb.shape[e] for e in range(m.dim()) if e != d)]
        if len(found) != 1 or not torch.equal(m, torch.cat([ta, tb], dim=found[0])):
            return None
        dims[name] = found[0]
    return dims


class _Runs:
    """The packed runs of one stream. Runs that ``q.concat`` joins by concatenation live in one set of
    tensors with spare room along their join dim (grown by an eighth, and by at least 64 tokens' worth,
    when full), so an append copies only the new run; other runs stay a list."""

    def __init__(self, q: Quantizer):
        self.q = q
        self.runs: list[Packed] = []  # before the first join, or when runs do not join
        self.dims: dict[str, int] | None = None  # join dim of each tensor, once the runs are joined
        self.buffers: dict[str, torch.Tensor] = {}
        self.used: dict[str, int] = {}
        self.shape: tuple[int, ...] = ()
        self.dtype = None
        self._joined: Packed | None = None  # views of the storage, until the next append

    def append(self, run: Packed) -> None:
        if self.dims is None:
            if len(self.runs) == 1:
                dims = _join_dims(self.q, self.runs[0], run)
                if dims is not None:
                    first = self.runs.pop()
                    self.dims, self.shape, self.dtype = dims, (*first.shape[:2], 0, first.shape[3]), first.dtype
                    self.buffers = {n: t.narrow(dims[n], 0, 0) for n, t in first.tensors.items()}  # no room yet
                    self.used = dict.fromkeys(first.tensors, 0)
                    self._append(first)
                    self._append(run)
                    return
            self.runs.append(run)
            return
        self._append(run)

    def _append(self, run: Packed) -> None:
        for name, t in run.tensors.items():
            d, used, buf = self.dims[name], self.used[name], self.buffers[name]
            n = t.shape[d]
            if n == 0:  # e.g. KIVI's empty fp16 window
                continue
            if used + n > buf.shape[d]:
                grown = list(t.shape)
                grown[d] = used + n + max((used + n) // 8, -(-64 * n // run.shape[2]))
                new = torch.empty(grown, dtype=t.dtype, device=t.device)
                new.narrow(d, 0, used).copy_(buf.narrow(d, 0, used))
                self.buffers[name] = buf = new
            buf.narrow(d, used, n).copy_(t)
            self.used[name] = used + n
        self.shape = (*self.shape[:2], self.shape[2] + run.shape[2], self.shape[3])
        self._joined = None

    def packs(self) -> list[Packed]:
        """The stored runs, oldest first (views of the storage)."""
        if self.dims is None:
            return self.runs
        if self._joined is None:
            tensors = {n: b.narrow(self.dims[n], 0, self.used[n]) for n, b in self.buffers.items()}
            self._joined = Packed(tensors, self.shape, self.dtype)
        return [self._joined]

    def reserved(self) -> int:
        """Bytes of room allocated beyond the stored runs."""
        return sum((b.numel() - b.numel() // b.shape[self.dims[n]] * self.used[n]) * b.element_size()
                   for n, b in self.buffers.items() if b.shape[self.dims[n]])

    def map_batch(self, fn) -> None:
        """Apply ``fn`` (a function of a tensor along its batch dim 0) to every stored tensor."""
        runs = []
        for p in self.runs:
            tensors = {n: fn(t) for n, t in p.tensors.items()}
            runs.append(Packed(tensors, (next(iter(tensors.values())).shape[0], *p.shape[1:]), p.dtype))
        self.runs = runs
        self.buffers = {n: fn(b.narrow(self.dims[n], 0, self.used[n])) for n, b in self.buffers.items()}
        if self.buffers:
            self.shape = (next(iter(self.buffers.values())).shape[0], *self.shape[1:])
        self._joined = None


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied when it is a view holding on to a storage over twice its size (a window sliced out of
    a long prefill), so that the bytes held are the bytes counted."""
    return t.clone() if t.untyped_storage().nbytes() > 2 * t.numel() * t.element_size() else t


class _Stream:
    """K or V of some kv heads of one layer under one quantizer."""

    def __init__(self, q: Quantizer, heads: list[int], splits: dict):
        self.q, self.heads = q, heads
        self.spec = q.spec
        self.splits = splits  # (spec, L) -> (sinks, quantized), shared by the cache's streams
        self.length = 0
        self.sinks: torch.Tensor | None = None  # (B, h, S, D) fp16
        self.window: torch.Tensor | None = None  # (B, h, W, D) fp16 (or the input dtype for `none`)
        self.runs = _Runs(q)
        self.n_quantized = 0
        self.dtype = None

    def _split(self, L: int) -> tuple[int, int]:
        """(sinks, quantized) token counts at length L from the scheme's rule [sinks | quantized | window]."""
        key = (self.spec, L)
        if key not in self.splits:
            fp16 = self.q.fp16_tokens(L)
            n_sinks = min(int(getattr(self.q, "sinks", 0)), L)
            n_q = int((~fp16).sum())
            if not bool(fp16[:n_sinks].all()) or bool(fp16[n_sinks : n_sinks + n_q].any()):
                raise ValueError(f"{self.q.spec}: its fp16 tokens at L={L} are not [sinks | quantized | window]")
            self.splits[key] = (n_sinks, n_q)
        return self.splits[key]

    def admit(self, x: torch.Tensor) -> torch.Tensor | None:
        """Add new tokens x (B, h, t, D) of the model's dtype to the window (as fp16); return the tokens
        that the scheme's rule now quantizes, taken out of the window, or None."""
        self.dtype = x.dtype
        x = x if self.q.name == "none" else x.to(torch.float16)
        self.window = x if self.window is None or not self.window.shape[2] else torch.cat([self.window, x], dim=2)
        self.length += x.shape[2]
        n_sinks, n_q = self._split(self.length)
        have_sinks = 0 if self.sinks is None else self.sinks.shape[2]
        if n_sinks > have_sinks:  # sinks fill first, from the oldest window tokens
            take = n_sinks - have_sinks
            head, self.window = self.window[:, :, :take], _compact(self.window[:, :, take:])
            self.sinks = _compact(head) if self.sinks is None else torch.cat([self.sinks, head], dim=2)
        if n_q < self.n_quantized:
            raise ValueError(f"{self.q.spec}: quantized tokens went from {self.n_quantized} to {n_q}")
        if n_q == self.n_quantized:
            return None
        take = n_q - self.n_quantized
        if take == self.window.shape[2]:
            chunk, self.window = self.window, None
        else:
            chunk, self.window = self.window[:, :, :take], _compact(self.window[:, :, take:])
        self.n_quantized = n_q
        return chunk

    def quantize(self, chunk: torch.Tensor) -> Packed:
        """The scheme's storage of ``chunk`` (fp16 values, as admitted), decoding to the model's dtype."""
        fast = _quantize_cpu(self.q, chunk)
        if fast is not None:
            return Packed(fast, tuple(chunk.shape), self.dtype)
        return dataclasses.replace(self.q.quantize_all(chunk), dtype=self.dtype)

    def update(self, x: torch.Tensor) -> None:  # x (B, h, t, D) in the model's dtype
        chunk = self.admit(x)
        if chunk is not None:
            self.runs.append(self.quantize(chunk))

    def read_into(self, out: torch.Tensor) -> None:
        """Write sinks, dequantized runs and window into ``out`` (B, h, L, D) of the model's dtype."""
        at = 0
        if self.sinks is not None:
            out[:, :, : self.sinks.shape[2]].copy_(self.sinks)
            at = self.sinks.shape[2]
        for p in self.runs.packs():
            read_packed(self.q, p, out[:, :, at : at + p.shape[2]])
            at += p.shape[2]
        if self.window is not None and self.window.shape[2]:
            out[:, :, at:].copy_(self.window)

    def nbytes(self) -> dict[str, int]:
        out = {"codes": 0, "metadata": 0, "fp16": 0}
        for t in (self.sinks, self.window):
            if t is not None:
                out["fp16"] += t.numel() * t.element_size()
        for r in self.runs.packs():
            for name, t in r.tensors.items():
                kind = "codes" if name in _CODE_NAMES else "fp16" if name in _FP16_NAMES else "metadata"
                out[kind] += t.numel() * t.element_size()
        return out

    def map_batch(self, fn) -> None:
        self.sinks = None if self.sinks is None else fn(self.sinks)
        self.window = None if self.window is None else fn(self.window)
        self.runs.map_batch(fn)


class PackedBatchOps:
    """The batch operations of generate() (beam search reordering, repeats, selection) for a cache layer
    whose stored tensors ``_map_batch(fn)`` rewrites along their batch dim; its packed storage stays where it
    is (no offloading). Mixed into CompressedLayer and the fused layers of :mod:`kvlab.fused_cache`."""

    def _map_batch(self, fn) -> None:
        raise NotImplementedError

    def offload(self):
        pass

    def prefetch(self):
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: reorder the batch of every stored tensor (codes and scales included)."""
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])


class CompressedLayer(PackedBatchOps, DynamicLayer):
    """One attention layer's compressed K/V."""

    is_croppable = False

    def __init__(self, policy: Policy, layer_idx: int, n_layers: int, splits: dict | None = None):
        super().__init__()
        self.policy, self.layer_idx, self.n_layers = policy, layer_idx, n_layers
        self.splits = {} if splits is None else splits
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
                    groups[q.spec] = _Stream(q, [], self.splits)
                groups[q.spec].heads.append(h)
            self.streams[which] = list(groups.values())
        self.is_initialized = True

    def _update_one(self, which: str, x: torch.Tensor) -> torch.Tensor:  # x (B, H, t, D)
        B, H, _, D = x.shape
        streams = self.streams[which]
        if len(streams) == 1 and len(streams[0].heads) == H:  # one scheme for every head
            streams[0].update(x)
            return self._read_one(which, x)
        out = torch.empty(B, H, self.cumulative_length, D, dtype=x.dtype, device=x.device)
        for s in streams:
            lo, hi = s.heads[0], s.heads[-1] + 1
            if s.heads == list(range(lo, hi)):  # a run of heads: views, no gather / scatter
                s.update(x[:, lo:hi])
                s.read_into(out[:, lo:hi])
            else:
                s.update(x[:, s.heads])
                part = torch.empty(B, len(s.heads), self.cumulative_length, D, dtype=x.dtype, device=x.device)
                s.read_into(part)
                out[:, s.heads] = part
        return out

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        (ks, *k_rest), (vs, *v_rest) = self.streams["k"], self.streams["v"]
        if not k_rest and not v_rest and ks.spec == vs.spec and len(ks.heads) == key_states.shape[1]:
            self._update_pair(ks, vs, key_states, value_states)
            return self._read_one("k", key_states), self._read_one("v", value_states)
        return self._update_one("k", key_states), self._update_one("v", value_states)

    @staticmethod
    def _update_pair(ks: _Stream, vs: _Stream, k: torch.Tensor, v: torch.Tensor) -> None:
        """K and V under one scheme, every head: their tokens are quantized in one call, stacked on the
        batch dim (a causal scheme quantizes each (batch, head) slice on its own), halving the calls."""
        ck, cv = ks.admit(k), vs.admit(v)
        if ck is None or cv is None or ck.shape != cv.shape:
            for s, c in ((ks, ck), (vs, cv)):
                if c is not None:
                    s.runs.append(s.quantize(c))
            return
        run, B = ks.quantize(torch.cat([ck, cv])), ck.shape[0]
        for s, rows in ((ks, slice(0, B)), (vs, slice(B, 2 * B))):
            s.runs.append(Packed({n: t[rows] for n, t in run.tensors.items()}, (B, *run.shape[1:]), run.dtype))

    def _read_one(self, which: str, x: torch.Tensor) -> torch.Tensor:
        """(B, H, L, D) from the one stream of ``which`` (K or V), shaped and typed like ``x``."""
        out = torch.empty(x.shape[0], x.shape[1], self.cumulative_length, x.shape[3], dtype=x.dtype, device=x.device)
        self.streams[which][0].read_into(out)
        return out

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def reset(self) -> None:
        self.streams, self.cumulative_length, self.is_initialized = {}, 0, False

    def _map_batch(self, fn) -> None:
        for streams in self.streams.values():
            for s in streams:
                s.map_batch(fn)

    def nbytes(self) -> dict[str, int]:
        out = {"codes": 0, "metadata": 0, "fp16": 0, "reserved": 0}
        for streams in self.streams.values():
            for s in streams:
                for k, v in s.nbytes().items():
                    out[k] += v
                out["reserved"] += s.runs.reserved()
        return out


def layers_nbytes(layers) -> dict[str, int]:
    """Sum of the layers' ``nbytes()`` (codes, metadata, fp16, reserved), plus ``total`` (held bytes:
    codes + metadata + fp16; ``reserved`` room is not held data)."""
    out = {"codes": 0, "metadata": 0, "fp16": 0, "reserved": 0}
    for layer in layers:
        for k, v in layer.nbytes().items():
            out[k] += v
    out["total"] = out["codes"] + out["metadata"] + out["fp16"]
    return out


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


def _check_scheme(q: Quantizer, which: str) -> None:
    if not q.causal:
        raise ValueError(f"CompressedCache: scheme {q.spec} for {which.upper()} is not causal (its scales see the "
                         "whole sequence), so a cache that quantizes tokens as they arrive cannot store it; "
                         "allowed: causal schemes (per-token groups, kivi, llama.cpp blocks, casts)")
    if which == "k" and q.prerope:
        raise ValueError(f"CompressedCache: scheme {q.spec} quantizes K before RoPE; the cache holds post-RoPE K "
                         "(use kvlab.hooks.compress to emulate it)")


class CompressedCache(Cache):
    """A transformers cache holding every layer's K/V compressed by ``policy`` (a spec or Policy).

    ``config`` (the model's config) lets the cache check the model up front (layer count for
    ``keep_last``, listed heads, no sliding-window layers); without it, policies that need the layer
    count are refused. Shapes: ``update`` takes and returns K/V as (B, kv heads, T, D).

    ``fused=True`` (CUDA): layers whose heads share one scheme the fused kernels serve (``kivi`` 2/4-bit,
    ``q4_0``/``q8_0``) are stored in the kernels' packed layout and attended by the fused decode kernel
    (:mod:`kvlab.fused_cache`); other layers stay as here. Needs the model's attention implementation set
    to ``"kvlab_fused"`` first (``kvlab.fused_cache.use_fused_attention(model)``); ``max_len`` preallocates
    that many tokens (else the buffers grow).
    """

    def __init__(self, policy, config=None, *, fused: bool = False, max_len: int | None = None):
        self.policy = parse_policy(policy)
        if self.policy.recent:
            raise ValueError(f"CompressedCache: recency policies (recent={self.policy.recent}, old=...) are not "
                             "stored by the cache; allowed: policies without recent/old (use kvlab.hooks.compress "
                             "to emulate them)")
        for which in ("k", "v"):
            for spec in (getattr(self.policy, which), self.policy.keep):
                _check_scheme(quant.get(spec).for_tensor(which), which)
        self.n_layers = None
        if config is not None:
            text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            types = _layer_types(text)
            other = sorted(set(types) - {"full_attention"})
            if other:
                raise ValueError(f"CompressedCache supports models whose layers all use full attention; this model "
                                 f"has {', '.join(f'{types.count(t)} {t}' for t in other)} layers of "
                                 f"{len(types)} (sliding-window layers would be silently wrong)")
            self.n_layers = text.num_hidden_layers
            self.policy.check_model(self.n_layers, text.num_key_value_heads)
        elif self.policy.keep_last:
            raise ValueError("CompressedCache: a policy with keep_last needs the model's layer count; pass "
                             "config=model.config")
        self._splits: dict = {}
        self.fused, self.max_len = bool(fused), max_len
        if self.fused:
            from .fused_cache import check_fused_config

            check_fused_config(config, type(self).__name__)
        super().__init__(layers=[])

    def _new_layer(self, idx: int, n_heads: int):
        """Layer ``idx``: with ``fused``, a :mod:`kvlab.fused_cache` layer (packed for the fused kernels) where
        the policy gives every head of the layer one scheme the kernels serve; else a CompressedLayer (whose
        full K/V the fused attention function hands to SDPA)."""
        n = self.n_layers or 10**9
        if self.fused:
            from .fused_cache import fused_layer

            ks = {self.policy.quantizer(idx, h, "k", n).spec for h in range(n_heads)}
            vs = {self.policy.quantizer(idx, h, "v", n).spec for h in range(n_heads)}
            if len(ks) == 1 and len(vs) == 1:
                try:
                    return fused_layer(self.policy.quantizer(idx, 0, "k", n), self.policy.quantizer(idx, 0, "v", n),
                                       self.max_len)
                except ValueError:  # a scheme the kernels do not serve (fp16 layers of keep_first, ...)
                    pass
        return CompressedLayer(self.policy, idx, n, self._splits)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Store new K/V (B, kv heads, t, D) of layer ``layer_idx``; return all of it (B, kv heads, L, D), or
        with ``fused`` for a fused layer the new tokens only, tagged for the fused attention function."""
        while len(self.layers) <= layer_idx:
            self.layers.append(self._new_layer(len(self.layers), key_states.shape[1]))
        return self.layers[layer_idx].update(key_states, value_states)

    def nbytes(self) -> dict[str, int]:
        """Bytes held: ``codes`` (packed codes), ``metadata`` (scales, minima, outliers), ``fp16``
        (values held unquantized: fp16 windows and sinks; every value of the fp16/bf16/none casts),
        ``total`` (their sum) and ``reserved`` (allocated room for later runs, not in ``total``)."""
        return layers_nbytes(self.layers)

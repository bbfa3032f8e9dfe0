"""The packed storage of :class:`kvlab.CompressedCache`: one layer's streams of packed runs and fp16
windows, the fast readers that decode runs straight into the returned tensor, and the batch operations
generate() calls. See :mod:`kvlab.storage.cache` for the storage rules."""

from __future__ import annotations

import dataclasses
import math

import torch
from transformers.cache_utils import DynamicLayer

from kvlab.kernels import cpu as cpu_kernels
from kvlab.model.rope import apply_rope, invert_rope, rope_cos_sin
from kvlab.quant import Packed, Quantizer
from kvlab.quant.policy import Policy

__all__ = ["CompressedLayer", "CompressedSlidingLayer", "PackedBatchOps", "PaddedRowsLayer", "RopeTable", "layers_nbytes",
           "left_padding", "read_packed", "stored_input"]

_CODE_NAMES = ("codes", "qh")
_CHUNK_SEARCH = 4096  # how many lengths ahead a sliding layer's evict looks for a scheme's next chunks
_FP16_NAMES = ("fp16", "x")  # a scheme's fp16 window; the values of the fp16/bf16/none casts


def stored_input(q: Quantizer, x: torch.Tensor) -> torch.Tensor:
    """What a scheme receives from the model (:meth:`Quantizer.stored_input`)."""
    return q.stored_input(x)


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


def _read_cast(lay, t, shape, out):  # fp16 / bf16 / none: the stored values, converted
    out.copy_(t["x"])


def _read_ggml(lay, t, shape, out):  # llama.cpp blocks: d * (q - 2**(b-1)), or d * q + m
    if out.dtype == torch.float32 and cpu_kernels.usable(out):
        cpu_kernels.ops().ggml_read(t["codes"], t["scale"], t.get("min"), lay.bits, out)
        return
    B, H, T, D = shape
    o = out.view(B, H, T, D // 32, 32)
    if lay.bits == 8:
        o.copy_(t["codes"].view(torch.int8).view(B, H, T, D // 32, 32))
    else:
        qs = t["codes"].view(B, H, T, D // 32, 16)  # ggml's qs[j] = q[j] | q[j + 16] << 4
        torch.bitwise_and(qs, 15, out=o[..., :16])
        torch.bitwise_right_shift(qs, 4, out=o[..., 16:])
        if not lay.asym:
            o.sub_(8)
    o.mul_(t["scale"].unsqueeze(-1))  # fp16 scale and minimum: exact in float32
    if lay.asym:
        o.add_(t["min"].unsqueeze(-1))


def _read_kivi(lay, t, shape, out):  # codes * scale + min, K grouped along tokens, V along head_dim
    if out.dtype == torch.float32 and cpu_kernels.usable(out):
        cpu_kernels.ops().kivi_read(t["codes"], t["scale"], t["min"], lay.bits, lay.group, lay.along == "token", out)
        return
    B, H, T, D = shape
    g, k = lay.group, 8 // lay.bits
    if lay.along == "token":  # codes (B, H, D, T*bits/8) packed along tokens; scale, min (B, H, T/g, D)
        _unpack_into(t["codes"], lay.bits, out.transpose(-1, -2).view(B, H, D, T // k, k))
        o, scale, lo = out.view(B, H, T // g, g, D), t["scale"].unsqueeze(3), t["min"].unsqueeze(3)
    else:  # codes (B, H, T, D*bits/8) packed along head_dim; scale, min (B, H, T, D/g)
        _unpack_into(t["codes"], lay.bits, out.view(B, H, T, D // k, k))
        o, scale, lo = out.view(B, H, T, D // g, g), t["scale"].unsqueeze(-1), t["min"].unsqueeze(-1)
    o.mul_(scale).add_(lo)  # fp16 scale and minimum: exact in float32


_READERS = {"cast": _read_cast, "block": _read_ggml, "group": _read_kivi}


def read_packed(q: Quantizer, packed: Packed, out: torch.Tensor) -> None:
    """Write ``q.dequantize(packed)`` into ``out`` (B, H, T, D), a view of any float dtype, without
    building the dequantized tensor first where the scheme has a fast path here: a reader
    ``(layout, tensors, shape, out)`` for the packed layout the scheme declares (:meth:`Quantizer.layout`),
    bit-identical to ``q.dequantize``. Except ``_read_cast`` the readers run on CPU only (integer ops
    written into float ``out=`` tensors, which CUDA refuses)."""
    lay = q.layout()
    reader = None if lay is None else _READERS.get(lay.kind)
    if reader is _read_kivi and packed.tensors["fp16"].shape[-2]:  # a run with its own window: not from a cache
        reader = None
    if reader is not _read_cast and out.device.type != "cpu":
        reader = None
    if reader is None:
        out.copy_(q.dequantize(packed))
        return
    if reader is _read_cast or out.dtype == torch.float32:
        reader(lay, packed.tensors, packed.shape, out)
        return
    tmp = torch.empty(out.shape, dtype=torch.float32, device=out.device)  # the schemes decode in float32
    reader(lay, packed.tensors, packed.shape, tmp)
    out.copy_(tmp)


def _quantize_cpu(q: Quantizer, x: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """``q.quantize_all(x).tensors`` from the compiled CPU kernels (bit-identical) for the llama.cpp 4/8-bit
    block and KIVI 2/4-bit group layouts on CPU; None where they do not apply (other layouts, shapes the
    scheme refuses, non-finite values: the scheme's own code then raises its error)."""
    lay = q.layout()
    if lay is None or x.dim() != 4 or x.dtype not in (torch.float16, torch.float32) or not x.numel():
        return None
    B, H, T, D = x.shape
    if lay.kind == "block" and lay.bits in (4, 8) and D % lay.group == 0:
        if not cpu_kernels.usable(x):
            return None
        out = cpu_kernels.ops().ggml_quantize(x, lay.bits, lay.asym)
        names = ("codes", "scale", "min")
    elif (lay.kind == "group" and lay.bits in (2, 4)
          and (T % lay.group == 0 if lay.along == "token" else D % lay.group == 0)):
        if (T if lay.along == "token" else D) % (8 // lay.bits) or not cpu_kernels.usable(x):
            return None
        out = cpu_kernels.ops().kivi_quantize(x, lay.bits, lay.group, lay.along == "token")
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
        self._split_dims = None  # (run, its tensors' token dims or None): for dropping part of a list run

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
        """Bytes of room allocated beyond the stored runs (after them, and before them where a sliding
        layer's oldest runs were dropped and the storage is not yet reallocated)."""
        return sum(b.untyped_storage().nbytes() - b.numel() // b.shape[self.dims[n]] * self.used[n] * b.element_size()
                   for n, b in self.buffers.items() if b.shape[self.dims[n]])

    def drop_front(self, n: int) -> int:
        """Drop up to ``n`` of the oldest stored tokens; return how many went. Only what the storage can lose
        without touching later tokens goes: whole runs of a list, and of a run that ``q.concat`` joins by
        plain concatenation (a prefill's, or joined runs) whole multiples of the tokens a unit of every
        tensor covers (a KIVI K group shares one scale: it goes whole or stays)."""
        if self.dims is None:
            dropped = 0
            while self.runs and self.runs[0].shape[2] <= n - dropped:
                dropped += self.runs.pop(0).shape[2]
            if self.runs and n > dropped:  # the oldest run in part, where its tensors split along tokens
                first = self.runs[0]
                if self._split_dims is None or self._split_dims[0] is not first:
                    self._split_dims = (first, _join_dims(self.q, first, first))  # once per run
                dims = self._split_dims[1]
                k = 0 if dims is None else _granular(first.shape[2], [t.shape[dims[m]] for m, t in
                                                                      first.tensors.items()], n - dropped)
                if k:
                    tensors = {m: t.narrow(dims[m], t.shape[dims[m]] * k // first.shape[2],
                                           t.shape[dims[m]] - t.shape[dims[m]] * k // first.shape[2]).clone()
                               for m, t in first.tensors.items()}
                    self.runs[0] = Packed(tensors, (*first.shape[:2], first.shape[2] - k, first.shape[3]), first.dtype)
                    dropped += k
            return dropped
        T = self.shape[2]
        k = T if n >= T else _granular(T, list(self.used.values()), n)
        if k == 0:
            return 0
        for name, b in self.buffers.items():
            d, u = self.dims[name], self.used[name] * k // T
            self.buffers[name] = b.narrow(d, u, b.shape[d] - u) if k < T else b.narrow(d, 0, 0).clone()
            self.used[name] -= u
        self.shape = (*self.shape[:2], T - k, self.shape[3])
        self._joined = None
        return k

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


def _granular(T: int, sizes: list[int], n: int) -> int:
    """The most tokens, up to ``n`` of ``T``, whose storage is whole units of every tensor (sizes along the
    token dim): a multiple of T / gcd(T, size) for each."""
    gran = math.lcm(*(T // math.gcd(T, u) for u in sizes if u))
    return min(n, T) // gran * gran


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied when it is a view holding on to a storage over twice its size (a window sliced out of
    a long prefill), so that the bytes held are the bytes counted."""
    return t.clone() if t.untyped_storage().nbytes() > 2 * t.numel() * t.element_size() else t


class RopeTable:
    """(cos, sin) of a model's rotary embedding by position, for K schemes that quantize before RoPE: the
    cache receives post-RoPE K, so such a stream undoes RoPE before quantizing and re-applies it when it reads
    (as :mod:`kvlab.emulation.hooks` does). Computed by the model's own rotary module for positions
    ``0..n-1`` (each angle is one product position x frequency, so a table of n positions holds the values a
    forward over fewer positions gives), and grown by doubling."""

    def __init__(self, model):
        self.model = model
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, start: int, end: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (1, end - start, R) of positions [start, end), in ``like``'s dtype and device."""
        t = self._table
        if t is None or t[0].shape[1] < end or t[0].dtype != like.dtype or t[0].device != like.device:
            n = max(end, 2 * (t[0].shape[1] if t is not None else 0), 64)
            self._table = t = rope_cos_sin(self.model, like, torch.arange(n, device=like.device).unsqueeze(0))
        return t[0][:, start:end], t[1][:, start:end]


class _Stream:
    """K or V of some kv heads of one layer under one quantizer. With ``rope`` (a :class:`RopeTable`), the
    quantized runs hold pre-RoPE values (sinks and window stay post-RoPE fp16, as they arrived)."""

    def __init__(self, q: Quantizer, heads: list[int], splits: dict, rope: RopeTable | None = None):
        self.q, self.heads = q, heads
        self.rope = rope
        self.spec = q.spec
        self.splits = splits  # (spec, L) -> (sinks, quantized), shared by the cache's streams
        self.length = 0
        self.sinks: torch.Tensor | None = None  # (B, h, S, D) fp16
        self.window: torch.Tensor | None = None  # (B, h, W, D) fp16 (or the input dtype for `none`)
        self.runs = _Runs(q)
        self.n_quantized = 0  # tokens after the sinks that left the window: quantized, or dropped by evict
        self.n_sinks = 0  # sinks taken (some may have been evicted since)
        self._dropped_to = 0  # n_quantized after the last evict that dropped window tokens
        self.dtype = None

    def _split(self, L: int) -> tuple[int, int]:
        """(sinks, quantized) token counts at length L from the scheme's rule [sinks | quantized | window]."""
        key = (self.spec, L)
        if key not in self.splits:
            fp16 = self.q.fp16_tokens(L)
            n_sinks = min(self.q.n_sinks, L)
            n_q = int((~fp16).sum())
            if not bool(fp16[:n_sinks].all()) or bool(fp16[n_sinks : n_sinks + n_q].any()):
                raise ValueError(f"{self.q.spec}: its fp16 tokens at L={L} are not [sinks | quantized | window]")
            self.splits[key] = (n_sinks, n_q)
        return self.splits[key]

    def admit(self, x: torch.Tensor) -> torch.Tensor | None:
        """Add new tokens x (B, h, t, D) of the model's dtype to the window (as fp16); return the tokens
        that the scheme's rule now quantizes, taken out of the window, or None."""
        self.dtype = x.dtype
        if self.q.window_dtype is not None:
            held = x.to(self.q.window_dtype)
            if held.dtype != x.dtype and not bool(torch.isfinite(held).all()) and bool(torch.isfinite(x).all()):
                raise ValueError(f"CompressedCache: {self.q.spec}: a K/V value of {float(x.abs().amax()):.6g} is "
                                 f"beyond {self.q.window_dtype}, the dtype the cache holds incoming tokens in (|x| <= "
                                 f"{torch.finfo(self.q.window_dtype).max:.6g}); allowed: values within that range, or "
                                 "the none scheme (which keeps the model's dtype)")
            x = held
        self.window = x if self.window is None or not self.window.shape[2] else torch.cat([self.window, x], dim=2)
        self.length += x.shape[2]
        n_sinks, n_q = self._split(self.length)
        if n_sinks > self.n_sinks:  # sinks fill first, from the oldest window tokens
            take = n_sinks - self.n_sinks
            head, self.window = self.window[:, :, :take], _compact(self.window[:, :, take:])
            self.sinks = _compact(head) if self.sinks is None else torch.cat([self.sinks, head], dim=2)
            self.n_sinks = n_sinks
        if n_q < self.n_quantized and self.n_quantized > self._dropped_to:
            raise ValueError(f"{self.q.spec}: quantized tokens went from {self.n_quantized} to {n_q}")
        if n_q <= self.n_quantized:  # (below it: window tokens that evict dropped before their chunk came)
            return None
        take = n_q - self.n_quantized
        if take == self.window.shape[2]:
            chunk, self.window = self.window, None
        else:
            chunk, self.window = self.window[:, :, :take], _compact(self.window[:, :, take:])
        self.n_quantized = n_q
        return chunk

    def quantize(self, chunk: torch.Tensor) -> Packed:
        """The scheme's storage of ``chunk`` (fp16 values, as admitted), decoding to the model's dtype. With
        ``rope``, ``chunk`` holds the last tokens taken from the window: RoPE is undone first."""
        if self.rope is not None:
            x = chunk.to(self.dtype)
            start = self.n_sinks + self.n_quantized - chunk.shape[2]
            cos, sin = self.rope(start, start + chunk.shape[2], x)
            return dataclasses.replace(self.q.quantize_all(invert_rope(x, cos, sin)), dtype=self.dtype)
        fast = _quantize_cpu(self.q, chunk)
        if fast is not None:
            return Packed(fast, tuple(chunk.shape), self.dtype)
        return dataclasses.replace(self.q.quantize_all(chunk), dtype=self.dtype)

    def update(self, x: torch.Tensor) -> None:  # x (B, h, t, D) in the model's dtype
        chunk = self.admit(x)
        if chunk is not None:
            self.runs.append(self.quantize(chunk))

    def held(self) -> int:
        """Tokens held: sinks, runs and window."""
        return sum(0 if t is None else t.shape[2] for t in (self.sinks, self.window)) + \
            sum(p.shape[2] for p in self.runs.packs())

    def read_into(self, out: torch.Tensor) -> None:
        """Write the last ``n`` held tokens (sinks, dequantized runs, window) into ``out`` (B, h, n, D) of the
        model's dtype; ``n`` is every held token but those a sliding layer could not yet drop."""
        skip, at = self.held() - out.shape[2], 0
        if self.sinks is not None and self.sinks.shape[2] > skip:
            part = self.sinks[:, :, skip:]
            out[:, :, : part.shape[2]].copy_(part)
            at = part.shape[2]
        skip = max(0, skip - (0 if self.sinks is None else self.sinks.shape[2]))
        pos = self.n_sinks  # position of the first run's first token (streams with rope)
        for p in self.runs.packs():
            n = p.shape[2]
            if skip >= n:
                skip -= n
                continue
            if skip:  # the run's first tokens are evicted but held (a group that goes whole)
                tmp = torch.empty(*out.shape[:2], n, out.shape[3], dtype=out.dtype, device=out.device)
                read_packed(self.q, p, tmp)
                out[:, :, at : at + n - skip].copy_(tmp[:, :, skip:])
            else:
                read_packed(self.q, p, out[:, :, at : at + n])
                if self.rope is not None:  # runs hold pre-RoPE K (a stream with rope never evicts: skip is 0)
                    cos, sin = self.rope(pos, pos + n, out)
                    out[:, :, at : at + n] = apply_rope(out[:, :, at : at + n], cos, sin)
            at, skip, pos = at + n - skip, 0, pos + n
        if self.window is not None and self.window.shape[2]:
            out[:, :, at:].copy_(self.window[:, :, skip:])

    def evict(self, keep: int) -> None:
        """A sliding layer's eviction: drop the oldest held tokens beyond the last ``keep``, all that the
        storage can lose (see :meth:`_Runs.drop_front`). A window token goes unquantized only if the whole
        chunk the scheme would later quantize it in goes too: a chunk's scales depend on all its tokens, so
        the tokens kept are stored exactly as a full-attention cache stores them."""
        drop = self.held() - keep
        if drop <= 0:
            return
        if self.sinks is not None and self.sinks.shape[2]:
            k = min(drop, self.sinks.shape[2])
            self.sinks, drop = _compact(self.sinks[:, :, k:]), drop - k
        in_runs = sum(p.shape[2] for p in self.runs.packs())
        drop -= self.runs.drop_front(min(drop, in_runs))
        if drop <= 0 or self.window is None or any(p.shape[2] for p in self.runs.packs()):
            return  # nothing more to drop, or a run's group still held: the window's tokens come after it
        cut, end = self.n_quantized, self.n_quantized + min(drop, self.window.shape[2])  # end: first kept
        for L in range(self.length + 1, self.length + 1 + _CHUNK_SEARCH):  # the chunks to come, as they grow
            n_q = self._split(L)[1]
            if n_q > end:
                break
            cut = max(cut, n_q)
        if cut > self.n_quantized:
            k = cut - self.n_quantized
            self.window = None if k == self.window.shape[2] else _compact(self.window[:, :, k:])
            self.n_quantized = self._dropped_to = cut

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

    def __init__(self, policy: Policy, layer_idx: int, n_layers: int, splits: dict | None = None,
                 rope: RopeTable | None = None):
        super().__init__()
        self.policy, self.layer_idx, self.n_layers = policy, layer_idx, n_layers
        self.rope = rope  # for K schemes that quantize before RoPE
        self.splits = {} if splits is None else splits
        self.streams: dict[str, list[_Stream]] = {}
        self.cumulative_length = 0
        self._visible = 0

    def lazy_initialization(self, key_states, value_states):
        self.device = key_states.device
        self.keys = torch.tensor([], dtype=key_states.dtype, device=self.device)  # unused, kept for the API
        self.values = torch.tensor([], dtype=value_states.dtype, device=self.device)
        n_heads = key_states.shape[1]
        for which in ("k", "v"):
            groups: dict[str, tuple[Quantizer, list[int]]] = {}
            for h in range(n_heads):
                q = self.policy.quantizer(self.layer_idx, h, which, self.n_layers)
                groups.setdefault(q.spec, (q, []))[1].append(h)
            # a stream of a subset of the layer's heads gets the scheme's tables for those heads
            self.streams[which] = [_Stream(q if len(heads) == n_heads else q.for_heads(heads), heads, self.splits,
                                           self.rope if which == "k" and q.prerope else None)
                                   for q, heads in groups.values()]
        self.is_initialized = True

    def _update_one(self, which: str, x: torch.Tensor) -> torch.Tensor:  # x (B, H, t, D)
        B, H, _, D = x.shape
        streams = self.streams[which]
        if len(streams) == 1 and len(streams[0].heads) == H:  # one scheme for every head
            streams[0].update(x)
            return self._read_one(which, x)
        out = torch.empty(B, H, self._visible, D, dtype=x.dtype, device=x.device)
        for s in streams:
            lo, hi = s.heads[0], s.heads[-1] + 1
            if s.heads == list(range(lo, hi)):  # a run of heads: views, no gather / scatter
                s.update(x[:, lo:hi])
                s.read_into(out[:, lo:hi])
            else:
                s.update(x[:, s.heads])
                part = torch.empty(B, len(s.heads), self._visible, D, dtype=x.dtype, device=x.device)
                s.read_into(part)
                out[:, s.heads] = part
        return out

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        self._visible = self._visible_length(key_states.shape[-2])
        (ks, *k_rest), (vs, *v_rest) = self.streams["k"], self.streams["v"]
        if (not k_rest and not v_rest and ks.spec == vs.spec and len(ks.heads) == key_states.shape[1]
                and ks.rope is None):
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
        out = torch.empty(x.shape[0], x.shape[1], self._visible, x.shape[3], dtype=x.dtype, device=x.device)
        self.streams[which][0].read_into(out)
        return out

    def _visible_length(self, new: int) -> int:
        """Tokens ``update`` returns, ``new`` of them just added: all (a sliding layer: its window)."""
        return self.cumulative_length

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


class CompressedSlidingLayer(CompressedLayer):
    """A sliding-window (or chunked) attention layer's compressed K/V, with the semantics of transformers'
    ``DynamicSlidingWindowLayer``: ``update`` returns the held tokens and the new ones (all of a prefill;
    ``sliding_window - 1`` held ones at most), then only the last ``sliding_window - 1`` stay. Which tokens
    a scheme quantizes, and how they group, follow its rule at the full length, as in a full-attention
    layer; what is evicted is dropped from the storage (``nbytes`` counts what is held), except the older
    tokens of a quantization group partly in the window, which go with the group."""

    is_sliding = True

    def __init__(self, policy: Policy, layer_idx: int, n_layers: int, splits: dict | None = None, *,
                 sliding_window: int):
        super().__init__(policy, layer_idx, n_layers, splits)
        self.sliding_window = int(sliding_window)

    def _visible_length(self, new: int) -> int:
        return min(self.cumulative_length - new, self.sliding_window - 1) + new

    def update(self, key_states, value_states, *args, **kwargs):
        k, v = super().update(key_states, value_states)
        for streams in self.streams.values():
            for s in streams:
                s.evict(self.sliding_window - 1)
        return k, v

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        """(kv_length, kv_offset) of the next update, as ``DynamicSlidingWindowLayer`` gives them (transformers
        before 5 pass the cache positions, whose count is the query length)."""
        q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        kv_offset = max(self.cumulative_length - self.sliding_window + 1, 0)
        return min(self.cumulative_length, self.sliding_window - 1) + q, kv_offset

    def get_max_cache_shape(self) -> int:
        return self.sliding_window

    def get_max_length(self) -> int:
        return self.sliding_window


def layers_nbytes(layers) -> dict[str, int]:
    """Sum of the layers' ``nbytes()`` (codes, metadata, fp16, reserved), plus ``total`` (held bytes:
    codes + metadata + fp16; ``reserved`` room is not held data)."""
    out = {"codes": 0, "metadata": 0, "fp16": 0, "reserved": 0}
    for layer in layers:
        for k, v in layer.nbytes().items():
            out[k] += v
    out["total"] = out["codes"] + out["metadata"] + out["fp16"]
    return out


def left_padding(position_ids, batch: int, length: int) -> list[int] | None:
    """Per row, the left-padding tokens of a first (prefill) update of ``length`` tokens, read off the
    position ids that generate() derives from the attention mask (``cumsum - 1``, 0 at pads): a row whose
    last ``n < length`` positions are ``0..n-1`` has ``length - n`` pads. None when no row is padded or the
    ids do not tell (none given, one row of ids shared by the batch, offsets)."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or position_ids.shape != (batch, length):
        return None
    pads = []
    for p in position_ids.detach().cpu():
        n = int(p[-1]) + 1
        padded = 0 < n < length and torch.equal(p[length - n :], torch.arange(n, dtype=p.dtype))
        pads.append(length - n if padded else 0)
    return pads if any(pads) else None


class PaddedRowsLayer(CompressedLayer):
    """One layer of a left-padded batch: every row is its own layer (``make_row()``, batch 1) holding only
    its real tokens, so pad positions never enter a scheme's groups or its fp16 window count, and each row
    stores exactly what it would alone. ``update`` returns (B, H, L, D) over the padded length, the pads as
    zeros (the attention mask hides them)."""

    def __init__(self, policy: Policy, layer_idx: int, n_layers: int, splits: dict, pads: list[int], make_row):
        super().__init__(policy, layer_idx, n_layers, splits)
        self.pads = list(pads)
        self.rows = [make_row() for _ in self.pads]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.device, self.is_initialized = key_states.device, True
            self.keys = torch.tensor([], dtype=key_states.dtype, device=self.device)  # unused, kept for the API
            self.values = torch.tensor([], dtype=value_states.dtype, device=self.device)
        if key_states.shape[0] != len(self.rows):
            raise ValueError(f"CompressedCache: layer {self.layer_idx} holds a padded batch of {len(self.rows)} rows, "
                             f"got K/V of batch {key_states.shape[0]}")
        first = self.cumulative_length == 0
        self.cumulative_length += key_states.shape[-2]
        B, H, _, D = key_states.shape
        L = self.cumulative_length
        k = key_states.new_zeros(B, H, L, D)
        v = value_states.new_zeros(B, value_states.shape[1], L, value_states.shape[3])
        for b, row in enumerate(self.rows):
            start = self.pads[b] if first else 0
            rk, rv = row.update(key_states[b : b + 1, :, start:], value_states[b : b + 1, :, start:])
            k[b, :, L - rk.shape[2] :] = rk[0]
            v[b, :, L - rv.shape[2] :] = rv[0]
        return k, v

    def reset(self) -> None:
        for row in self.rows:
            row.reset()
        self.cumulative_length = 0

    def _map_batch(self, fn) -> None:
        import copy

        order = [int(i) for i in fn(torch.arange(len(self.rows))).reshape(-1)]
        used, rows = set(), []
        for j in order:  # a row used twice (beam search, repeats) is copied, its storage included
            rows.append(self.rows[j] if j not in used else copy.deepcopy(self.rows[j], {id(self.splits): self.splits}))
            used.add(j)
        self.rows, self.pads = rows, [self.pads[j] for j in order]

    def nbytes(self) -> dict[str, int]:
        out = {"codes": 0, "metadata": 0, "fp16": 0, "reserved": 0}
        for row in self.rows:
            for k, n in row.nbytes().items():
                out[k] += n
        return out

"""Lossless coding of fp16 / bf16 K/V tensors, and mixed lossless/lossy caches: how far entropy coding goes.

A codec is a pipeline over the 16-bit patterns of a tensor: an optional **delta along tokens** (dim -2 of
a (B, H, T, D) tensor: ``xor`` of each token's pattern with the previous token's in the same channel,
or ``sub``, their difference modulo 2**16), then a **split into planes**, each coded on its own:

- ``none``: one plane of 16-bit symbols (the little-endian bytes, as they lie in memory);
- ``bytes``: high byte and low byte (the "gear split");
- ``fields``: sign+exponent and mantissa; a field wider than 8 bits is cut into its top bits and its
  low byte (fp16: ``sign_exp`` 6 bits, ``mant_hi`` 2, ``mant_lo`` 8; bf16: ``sign_exp_hi`` 1 (the sign),
  ``sign_exp_lo`` 8 (the exponent), ``mant`` 7), one byte per symbol;

then a coder: ``zstd`` (the ``zstandard`` library at a fixed level, single-threaded, deterministic) or
``store``. Codec names list the stages in order: ``"xor+bytes+zstd"``; :data:`CODECS` holds them all.

The order-0 **entropy bound** of a codec is ``sum over planes of n_symbols * H0(plane) / 8`` bytes, with
``H0`` the empirical Shannon entropy of the plane's symbols in bits: what a symbol-by-symbol coder
(Huffman, arithmetic, rANS) could reach on those planes with a free code table. An LZ coder such as zstd
can beat it when values repeat; a real entropy coder also pays for its table.

Every byte needed to decode is counted: ratio = original bytes / ``len(encode(t, codec))``.

Container (little-endian), built so that a corrupted or truncated blob is rejected, never decoded:

====== ======= =============================================================================
offset size    field
====== ======= =============================================================================
0      4       magic ``b"KVLZ"``
4      1       container version (1)
5      1       dtype id (1: float16, 2: bfloat16)
6      1       delta id (0: none, 1: xor, 2: sub)
7      1       split id (0: none, 1: bytes, 2: fields)
8      1       coder id (0: store, 1: zstd)
9      1       zstd level (int8; informational, not needed to decode)
10     1       ndim n
11     1       number of planes p
12     4 n     shape (uint32 each)
12+4n  4 p     coded length of each plane (uint32)
...    4       crc32 of the original tensor bytes (checked after decoding: end to end)
...    sum     the coded planes, in order
end-4  4       crc32 of every byte before it (checked before decoding)
====== ======= =============================================================================

Mixed caches: a layer held losslessly reads back exactly its fp16 values, so its numerics are the
``fp16`` scheme's and the policy ``kv=fpmant:mantissa=4;keep_first=N;keep=fp16`` runs in the model through
:func:`kvlab.emulation.hooks.compress` as is; :func:`mixed_bits_per_value` then prices its ``fp16`` layers at their
measured lossless ratio and the others at the lossy scheme's ``bits_per_value``.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import zstandard

from kvlab.evaluation.dump import load_dump
from kvlab.metrics import paired_delta_ci
from kvlab.quant.policy import parse_policy

__all__ = [
    "CODECS",
    "Codec",
    "ZSTD_LEVEL",
    "decode",
    "encode",
    "entropy_bits",
    "entropy_bound_bytes",
    "evaluate_policies",
    "layer_ratios",
    "mixed_bits_per_value",
    "mixed_ratio",
    "plane_table",
    "planes",
    "ratio_table",
    "summarize",
]

MAGIC = b"KVLZ"
VERSION = 1
ZSTD_LEVEL = 3

_DTYPES = {torch.float16: 1, torch.bfloat16: 2}
_DELTAS = ("none", "xor", "sub")
_SPLITS = ("none", "bytes", "fields")
_CODERS = ("store", "zstd")
_HEAD = struct.Struct("<4sBBBBBbBB")  # magic, version, dtype, delta, split, coder, level, ndim, planes
_U32 = struct.Struct("<I")

# planes of each split: (name, shift, bits) of the 16-bit pattern, value = (pattern >> shift) & mask
_PLANES = {
    ("none", torch.float16): (("all", 0, 16),),
    ("none", torch.bfloat16): (("all", 0, 16),),
    ("bytes", torch.float16): (("hi", 8, 8), ("lo", 0, 8)),
    ("bytes", torch.bfloat16): (("hi", 8, 8), ("lo", 0, 8)),
    ("fields", torch.float16): (("sign_exp", 10, 6), ("mant_hi", 8, 2), ("mant_lo", 0, 8)),
    ("fields", torch.bfloat16): (("sign_exp_hi", 15, 1), ("sign_exp_lo", 7, 8), ("mant", 0, 7)),
}


@dataclass(frozen=True)
class Codec:
    """One pipeline: ``delta`` along tokens, ``split`` into planes, ``coder`` per plane."""

    delta: str = "none"
    split: str = "none"
    coder: str = "zstd"

    def __post_init__(self):
        for key, allowed in (("delta", _DELTAS), ("split", _SPLITS), ("coder", _CODERS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"codec: {key}={getattr(self, key)!r} is not allowed; allowed: {', '.join(allowed)}")

    @property
    def name(self) -> str:
        return "+".join([s for s in (self.delta, self.split) if s != "none"] + [self.coder])


CODECS: dict[str, Codec] = {c.name: c for c in (
    Codec("none", "none", "store"),
    Codec("none", "none"),
    Codec("none", "bytes"),
    Codec("none", "fields"),
    Codec("xor", "none"),
    Codec("xor", "bytes"),
    Codec("xor", "fields"),
    Codec("sub", "none"),
    Codec("sub", "bytes"),
    Codec("sub", "fields"),
)}


def _codec(codec: str | Codec) -> Codec:
    if isinstance(codec, Codec):
        return codec
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; allowed: {', '.join(CODECS)}")
    return CODECS[codec]


# ---- the pipeline stages ------------------------------------------------------------------------
def _patterns(t: torch.Tensor) -> np.ndarray:
    """fp16/bf16 tensor -> uint16 array of its bit patterns, same shape."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor of dtype float16 or bfloat16, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise ValueError(f"lossless codecs code the 16-bit patterns of float16 / bfloat16 tensors, got {t.dtype}; "
                         "cast first (the cast itself is lossy)")
    if t.dim() > 255:
        raise ValueError(f"tensor rank {t.dim()} is too large; allowed: at most 255 dims")
    return t.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16)


def _token_axis(ndim: int) -> int | None:
    """Tokens run along dim -2 of (B, H, T, D); a 1-D tensor along its only dim; a scalar has none."""
    return ndim - 2 if ndim >= 2 else (0 if ndim == 1 else None)


def _delta(x: np.ndarray, kind: str) -> np.ndarray:
    """Each token's pattern combined with the previous token's in the same channel (the first kept)."""
    axis = _token_axis(x.ndim)
    if kind == "none" or axis is None or x.shape[axis] < 2:
        return x
    cur = (slice(None),) * axis + (slice(1, None),)
    prev = (slice(None),) * axis + (slice(None, -1),)
    d = x.copy()
    d[cur] = np.bitwise_xor(x[cur], x[prev]) if kind == "xor" else x[cur] - x[prev]  # uint16: wraps
    return d


def _undelta(d: np.ndarray, kind: str) -> np.ndarray:
    axis = _token_axis(d.ndim)
    if kind == "none" or axis is None or d.shape[axis] < 2:
        return d
    if kind == "xor":
        return np.bitwise_xor.accumulate(d, axis=axis)
    return np.cumsum(d, axis=axis, dtype=np.uint16)  # wraps modulo 2**16, undoing np.diff's wrap


def planes(t: torch.Tensor, codec: str | Codec = "bytes+zstd") -> list[tuple[str, int, np.ndarray]]:
    """The planes ``codec`` codes, before coding: [(name, bits, symbols)], symbols a flat uint8 array
    (uint16 for the ``none`` split's 16-bit plane). t: any shape, float16 or bfloat16."""
    c = _codec(codec)
    x = _delta(_patterns(t), c.delta).ravel()
    out = []
    for name, shift, bits in _PLANES[(c.split, t.dtype)]:
        if bits == 16:
            out.append((name, bits, x))
        else:
            out.append((name, bits, ((x >> shift) & ((1 << bits) - 1)).astype(np.uint8)))
    return out


_COMPRESSORS: dict[int, zstandard.ZstdCompressor] = {}


def _zstd(level: int) -> zstandard.ZstdCompressor:
    if level not in _COMPRESSORS:
        _COMPRESSORS[level] = zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=True,
                                                       write_dict_id=False, threads=0)
    return _COMPRESSORS[level]


def _plane_bytes(symbols: np.ndarray) -> bytes:
    return symbols.astype("<u2" if symbols.dtype == np.uint16 else np.uint8, copy=False).tobytes()


# ---- container ----------------------------------------------------------------------------------
def encode(t: torch.Tensor, codec: str | Codec = "bytes+zstd", level: int = ZSTD_LEVEL) -> bytes:
    """Losslessly encode a float16 / bfloat16 tensor of any shape (K/V: (B, H, T, D), tokens on dim -2)
    into a self-describing blob that :func:`decode` turns back into the identical tensor."""
    c = _codec(codec)
    if not isinstance(level, int) or not -127 <= level <= 22:
        raise ValueError(f"level={level!r} is not allowed; allowed: an integer zstd level in -127..22")
    raw = _patterns(t)
    payloads = []
    for _, _, symbols in planes(t, c):
        data = _plane_bytes(symbols)
        payloads.append(_zstd(level).compress(data) if c.coder == "zstd" else data)
    if any(len(p) >= 2**32 for p in payloads) or any(s >= 2**32 for s in t.shape):
        raise ValueError("tensor too large for the container (a dimension or a plane of >= 2**32 bytes)")
    head = _HEAD.pack(MAGIC, VERSION, _DTYPES[t.dtype], _DELTAS.index(c.delta), _SPLITS.index(c.split),
                      _CODERS.index(c.coder), level if c.coder == "zstd" else 0, t.dim(), len(payloads))
    head += struct.pack(f"<{t.dim()}I", *t.shape) + struct.pack(f"<{len(payloads)}I", *map(len, payloads))
    head += _U32.pack(zlib.crc32(_plane_bytes(raw.ravel())))
    body = head + b"".join(payloads)
    return body + _U32.pack(zlib.crc32(body))


def _corrupt(msg: str) -> ValueError:
    return ValueError(f"corrupted kvlab lossless blob: {msg}; refusing to decode")


def decode(blob: bytes) -> torch.Tensor:
    """Inverse of :func:`encode`. Raises ``ValueError`` on a blob that is not one, is truncated or
    extended, fails its checksums, or does not decode to its declared size."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise ValueError(f"expected bytes from kvlab.evaluation.lossless.encode, got {type(blob).__name__}")
    blob = bytes(blob)
    if len(blob) < _HEAD.size + 8:
        raise _corrupt(f"{len(blob)} bytes is shorter than the smallest container ({_HEAD.size + 8} bytes): "
                       "truncated")
    magic, version, dtype_id, delta_id, split_id, coder_id, _, ndim, n_planes = _HEAD.unpack_from(blob)
    if magic != MAGIC:
        raise ValueError(f"not a kvlab lossless blob: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise ValueError(f"kvlab lossless container version {version} is not supported; this kvlab reads "
                         f"version {VERSION}")
    pos = _HEAD.size
    n_head = pos + 4 * ndim + 4 * n_planes + 4
    if len(blob) < n_head + 4:
        raise _corrupt(f"{len(blob)} bytes cannot hold its own header ({n_head + 4} bytes): truncated")
    shape = struct.unpack_from(f"<{ndim}I", blob, pos)
    lengths = struct.unpack_from(f"<{n_planes}I", blob, pos + 4 * ndim)
    (crc_raw,) = _U32.unpack_from(blob, n_head - 4)
    expected = n_head + sum(lengths) + 4
    if len(blob) != expected:
        raise _corrupt(f"it holds {len(blob)} bytes but its header describes {expected}: truncated, extended or "
                       "a damaged header")
    (crc_blob,) = _U32.unpack_from(blob, len(blob) - 4)
    if zlib.crc32(blob[:-4]) != crc_blob:
        raise _corrupt("crc32 mismatch (a byte was changed)")
    # the checksum passed: the ids below were written by encode(), barring a different kvlab
    dtypes = {v: k for k, v in _DTYPES.items()}
    if dtype_id not in dtypes or delta_id >= len(_DELTAS) or split_id >= len(_SPLITS) or coder_id >= len(_CODERS):
        raise _corrupt(f"unknown ids dtype={dtype_id} delta={delta_id} split={split_id} coder={coder_id}")
    dtype = dtypes[dtype_id]
    c = Codec(_DELTAS[delta_id], _SPLITS[split_id], _CODERS[coder_id])
    spec = _PLANES[(c.split, dtype)]
    if len(spec) != n_planes:
        raise _corrupt(f"{n_planes} planes for split {c.split!r}, which has {len(spec)}")
    n = int(np.prod(shape, dtype=np.int64))
    x = np.zeros(n, dtype=np.uint16)
    pos = n_head
    for (name, shift, bits), length in zip(spec, lengths):
        data = blob[pos:pos + length]
        pos += length
        size = n * (2 if bits == 16 else 1)
        if c.coder == "zstd":
            try:
                data = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
            except zstandard.ZstdError as e:
                raise _corrupt(f"plane {name!r} does not decompress ({e})") from None
        if len(data) != size:
            raise _corrupt(f"plane {name!r} holds {len(data)} bytes, expected {size}")
        symbols = np.frombuffer(data, dtype="<u2" if bits == 16 else np.uint8).astype(np.uint16)
        x |= symbols << np.uint16(shift)
    x = _undelta(x.reshape(shape), c.delta)
    if zlib.crc32(_plane_bytes(x.ravel())) != crc_raw:
        raise _corrupt("the decoded tensor fails the crc32 of the original")
    return torch.from_numpy(x.view(np.int16).copy()).view(dtype).reshape(shape)


# ---- entropy ------------------------------------------------------------------------------------
def entropy_bits(symbols: np.ndarray) -> float:
    """Empirical order-0 Shannon entropy of an integer array, in bits per symbol (0 for a constant)."""
    symbols = np.asarray(symbols).ravel()
    if symbols.size == 0:
        return 0.0
    counts = np.bincount(symbols)
    p = counts[counts > 0] / symbols.size
    return max(0.0, float(-(p * np.log2(p)).sum()))


def entropy_bound_bytes(t: torch.Tensor, codec: str | Codec = "bytes+zstd") -> float:
    """Order-0 entropy bound of ``codec``'s planes of ``t``, in bytes (see the module docstring)."""
    return sum(s.size * entropy_bits(s) / 8 for _, _, s in planes(t, codec))


# ---- tables over a dump -------------------------------------------------------------------------
_TENSORS = ("k_pre", "k_post", "v")


def _dump_tensors(dump_folder, layers, tensors):
    bad = [n for n in tensors if n not in ("q_pre", "q_post") + _TENSORS]
    if bad:
        raise ValueError(f"tensor {bad[0]!r} is not allowed; allowed: k_pre, k_post, v, q_pre, q_post")
    _, dumped = load_dump(dump_folder, layers)
    for layer, held in sorted(dumped.items()):
        for name in tensors:
            if name not in held:
                raise ValueError(f"the dump at {dump_folder} has no {name!r} for layer {layer} (it holds "
                                 f"{sorted(held)}); dump with which=('k', 'v') and rope=('pre', 'post')")
            yield layer, name, held[name]


def _kind(name: str) -> tuple[str, str]:  # "k_pre" -> ("k", "pre"); "v" -> ("v", "post")
    kv, _, rope = name.partition("_")
    return kv, rope or "post"


def ratio_table(dump_folder: str | Path, layers=None, tensors=_TENSORS, codecs=None, level: int = ZSTD_LEVEL,
                verify: bool = True) -> pd.DataFrame:
    """Lossless ratio of every codec on every dumped layer and tensor, as a tidy table.

    Columns: layer, tensor (k_pre / k_post / v), kv, rope, codec, dtype, bytes_in, bytes_out (the whole
    blob), ratio = bytes_in / bytes_out, entropy_bytes and entropy_ratio (the codec's order-0 bound).
    ``verify`` decodes every blob and checks it is bit-identical to the input.
    """
    codecs = list(CODECS) if codecs is None else [_codec(c).name for c in codecs]
    rows = []
    for layer, name, t in _dump_tensors(dump_folder, layers, tensors):
        n_in = t.numel() * t.element_size()
        for codec in codecs:
            blob = encode(t, codec, level)
            if verify and not torch.equal(decode(blob).view(torch.int16), t.view(torch.int16)):
                raise AssertionError(f"codec {codec} does not round-trip layer {layer} {name}")
            ent = entropy_bound_bytes(t, codec)
            kv, rope = _kind(name)
            rows.append({"layer": layer, "tensor": name, "kv": kv, "rope": rope, "codec": codec,
                         "dtype": str(t.dtype).replace("torch.", ""), "bytes_in": n_in, "bytes_out": len(blob),
                         "ratio": n_in / len(blob), "entropy_bytes": ent,
                         "entropy_ratio": n_in / ent if ent > 0 else float("inf")})
    return pd.DataFrame(rows)


def plane_table(dump_folder: str | Path, layers=None, tensors=_TENSORS, codecs=None,
                level: int = ZSTD_LEVEL) -> pd.DataFrame:
    """One row per plane: layer, tensor, codec, plane, bits (plane width), entropy_bits (order-0 bits per
    symbol), zstd_bits (zstd-coded bits per symbol of that plane alone)."""
    codecs = [c for c in CODECS.values() if c.coder == "zstd"] if codecs is None else [_codec(c) for c in codecs]
    rows = []
    for layer, name, t in _dump_tensors(dump_folder, layers, tensors):
        for c in codecs:
            for plane, bits, s in planes(t, c):
                rows.append({"layer": layer, "tensor": name, "codec": c.name, "plane": plane, "bits": bits,
                             "entropy_bits": entropy_bits(s),
                             "zstd_bits": 8 * len(_zstd(level).compress(_plane_bytes(s))) / s.size})
    return pd.DataFrame(rows)


def summarize(table: pd.DataFrame, by=("tensor", "codec")) -> pd.DataFrame:
    """Pool a :func:`ratio_table` over layers (sum of bytes, not mean of ratios): ratio and entropy_ratio
    per ``by`` group."""
    g = table.groupby(list(by), sort=False)[["bytes_in", "bytes_out", "entropy_bytes"]].sum().reset_index()
    g["ratio"] = g["bytes_in"] / g["bytes_out"]
    g["entropy_ratio"] = g["bytes_in"] / g["entropy_bytes"]
    return g


# ---- mixed lossless / lossy policies ------------------------------------------------------------
def layer_ratios(table: pd.DataFrame, codec: str = "best", k_tensor: str = "k_post") -> dict[tuple[int, str], float]:
    """{(layer, "k" | "v"): lossless ratio} from a :func:`ratio_table`. ``codec="best"`` takes each
    (layer, K/V)'s best codec (the container names its codec, so a cache may choose per tensor); else one
    codec everywhere. K is read from ``k_tensor`` (``k_post``: the cache holds post-RoPE K)."""
    if k_tensor not in ("k_pre", "k_post"):
        raise ValueError(f"k_tensor={k_tensor!r} is not allowed; allowed: k_pre, k_post")
    rows = table[table["tensor"].isin([k_tensor, "v"])]
    if codec != "best":
        rows = rows[rows["codec"] == _codec(codec).name]
    if rows.empty:
        raise ValueError(f"the table has no rows for codec {codec!r} with tensors {k_tensor}, v")
    best = rows.groupby(["layer", "tensor"])["ratio"].max()
    return {(int(layer), "v" if name == "v" else "k"): float(r) for (layer, name), r in best.items()}


def _lossless(q) -> bool:
    lay = q.layout()  # held as plain fp16 values: the tensors this module codes losslessly
    return lay is not None and lay.kind == "cast" and lay.bits == 16 and lay.fmt == "fp16"


def mixed_bits_per_value(policy, lossless: dict[tuple[int, str], float], n_layers: int, n_kv_heads: int,
                         T: int, D: int, unmeasured: float | None = None) -> float:
    """Mean stored bits per K/V value of ``policy`` when its ``fp16`` (layer, K/V) slices are held
    losslessly at the measured ratios ``lossless`` {(layer, "k" | "v"): ratio} (16 / ratio bits) and the
    others at their scheme's ``bits_per_value(T, D)``. An ``fp16`` slice with no measured ratio takes
    ``unmeasured`` (e.g. 1.0: stored as plain fp16), or raises ValueError when it is None."""
    p = parse_policy(policy)
    p.check_model(n_layers, n_kv_heads)
    if p.recent:
        raise ValueError("mixed_bits_per_value does not model recency (recent=/old=) policies; allowed: "
                         "policies without them")
    total = 0.0
    for layer in range(n_layers):
        for head in range(n_kv_heads):
            for which in ("k", "v"):
                q = p.quantizer(layer, head, which, n_layers)
                if not _lossless(q):
                    total += q.bits_per_value(T, D)
                elif (layer, which) in lossless:
                    total += 16 / lossless[(layer, which)]
                elif unmeasured is not None:
                    total += 16 / unmeasured
                else:
                    have = sorted({la for la, _ in lossless})
                    raise ValueError(f"no measured lossless ratio for layer {layer} {which.upper()}, which "
                                     f"{p.spec!r} holds as fp16; measured layers: {have}")
    return total / (n_layers * n_kv_heads * 2)


def mixed_ratio(policy, lossless: dict[tuple[int, str], float], n_layers: int, n_kv_heads: int, T: int,
                D: int, unmeasured: float | None = None) -> float:
    """Compression ratio vs an fp16 cache: 16 / :func:`mixed_bits_per_value`."""
    return 16 / mixed_bits_per_value(policy, lossless, n_layers, n_kv_heads, T, D, unmeasured)


def evaluate_policies(model, windows: torch.Tensor, policies, lossless: dict[tuple[int, str], float],
                      baseline: str = "fp16", seed: int = 0, progress: bool = False,
                      unmeasured: float | None = None) -> pd.DataFrame:
    """Perplexity of each policy run inside the model (:func:`kvlab.emulation.hooks.compress`) on the same (n, ctx)
    ``windows``, its delta vs ``baseline`` with a paired bootstrap 95% CI over windows, and its storage
    (:func:`mixed_bits_per_value` with ``unmeasured``). One row per policy, baseline first."""
    from kvlab.emulation.hooks import attention_modules, compress
    from kvlab.evaluation.ppl import window_nll
    from kvlab.model.geometry import geometry

    n_layers, n_kv, D = len(attention_modules(model)), *geometry(model)[1:]
    T = int(windows.shape[1])
    nll = {}
    for spec in [baseline] + [p for p in policies if p != baseline]:
        with compress(model, spec):
            nll[spec] = window_nll(model, windows, progress=progress, desc=spec)
    rows = []
    for spec, v in nll.items():
        delta, lo, hi = paired_delta_ci(nll[baseline], v, seed=seed)
        bpv = mixed_bits_per_value(spec, lossless, n_layers, n_kv, T, D, unmeasured)
        rows.append({"policy": spec, "bits_per_value": bpv, "ratio": 16 / bpv, "ppl": math.exp(float(v.mean())),
                     "delta_ppl": delta, "ci_lo": lo, "ci_hi": hi, "window_nll": v.tolist()})
    return pd.DataFrame(rows)

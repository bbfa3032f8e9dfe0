"""Encode / decode throughput (MB/s of original fp16 bytes) of every lossless codec on real K/V.

Usage: python benchmarks/bench_lossless.py [--ctx 512] [--windows 4] [--layers 0,15,29] [--repeats 5]
Dumps K (pre and post RoPE) and V of the embedded model on WikiText-2 (pydoc if WikiText-2 is not
reachable), then times ``kvlab.evaluation.lossless.encode`` / ``decode`` on each tensor. Prints per codec the pooled
ratio, the median throughputs, and their ratio to the ``store`` codec (container and crc32s only, no
coding) measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402,F401  (puts the repository root on sys.path)
import torch
import zstandard

import kvlab
import kvlab.evaluation.lossless as L
from kvlab.evaluation.dump import dump, load_dump
from kvlab.evaluation.evaluate import load_windows


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--layers", default="0,15,29")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--level", type=int, default=L.ZSTD_LEVEL)
    a = ap.parse_args()
    layers = [int(x) for x in a.layers.split(",")]
    model, tok = kvlab.load_model()
    corpus, w = load_windows(tok, "auto", a.ctx, a.windows)
    with tempfile.TemporaryDirectory() as tmp:
        dump(model, w, tmp, layers=layers, which=("k", "v"), corpus=corpus)
        _, held = load_dump(tmp)
    tensors = [t for layer in layers for t in held[layer].values()]  # k_pre, k_post, v per layer
    n_in = sum(t.numel() * t.element_size() for t in tensors)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, zstandard {zstandard.__version__} (zstd {zstandard.ZSTD_VERSION}), level {a.level}")
    print(f"data: {corpus}, {w.shape[0]} windows x ctx {a.ctx}, layers {layers}, K pre/post + V: "
          f"{len(tensors)} tensors of {tuple(tensors[0].shape)} {tensors[0].dtype}, {n_in / 1e6:.2f} MB; "
          f"median of {a.repeats} runs")
    rows = {}
    for codec in L.CODECS:
        blobs = [L.encode(t, codec, a.level) for t in tensors]
        enc = _median_s(lambda c=codec: [L.encode(t, c, a.level) for t in tensors], a.repeats)
        dec = _median_s(lambda b=blobs: [L.decode(x) for x in b], a.repeats)
        assert all(torch.equal(L.decode(b).view(torch.int16), t.view(torch.int16)) for b, t in zip(blobs, tensors))
        rows[codec] = (n_in / sum(map(len, blobs)), n_in / enc / 1e6, n_in / dec / 1e6)
    base_enc, base_dec = rows["store"][1], rows["store"][2]
    print(f"{'codec':<18}{'ratio':>7}{'encode MB/s':>13}{'x store':>9}{'decode MB/s':>13}{'x store':>9}")
    for codec, (ratio, enc, dec) in rows.items():
        print(f"{codec:<18}{ratio:>7.3f}{enc:>13.1f}{enc / base_enc:>9.3f}{dec:>13.1f}{dec / base_dec:>9.3f}")


if __name__ == "__main__":
    main()

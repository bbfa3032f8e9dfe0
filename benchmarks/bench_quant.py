"""Quantize + dequantize throughput of every scheme on CPU, in GB/s of fp16 input processed.

One (1, 8, 4096, 128) fp16 tensor (8 MiB); per scheme the median of ``--repeats`` timed round trips after
one warm-up. Printed with the ratio to the ``fp16`` cast measured in the same run, and to ``x.clone()``
(a plain copy: the memory-bound ceiling a round trip that reads and writes the tensor could reach).
KVQuant runs uncalibrated (it fits k-means on every call) and calibrated (the fit done once, outside the
timing). ``--json`` prints the rows as JSON instead.

    python benchmarks/bench_quant.py [--repeats 5] [--threads N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402,F401  (puts the repository root on sys.path)
import torch

import kvlab.quant as kq

SHAPE = (1, 8, 4096, 128)
VARIANTS = [
    "int:bits=4",
    "int:bits=2,axis=channel,group=32,sym=false",
    "fp8:scale=tensor",
    "fp8:fmt=e5m2",
    "q4_0:rotate=hadamard",
    "signmag:v=2",
    "signmag:v=3",
    "signmag:v=4",
    "kvquant:bits=2,tensor=v",
]


def cases() -> list[tuple[str, kq.Quantizer]]:
    """(label, quantizer): the default config of every scheme (K and V where they differ), then variants."""
    out = []
    for spec in kq.available() + VARIANTS:
        q = kq.get(spec)
        if q.for_tensor("v") == q.for_tensor("k") or "tensor=" in spec:
            out.append((spec, q))
        else:
            out += [(f"{spec} [{w.upper()}]", q.for_tensor(w)) for w in ("k", "v")]
    return out


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(repeats: int) -> list[dict]:
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).half()
    nbytes = x.numel() * x.element_size()
    T, D = SHAPE[-2], SHAPE[-1]
    rows = [{"scheme": "copy (x.clone())", "seconds": median_seconds(x.clone, repeats), "bits": 16.0}]
    timed = cases()
    timed.append(("kvquant [K, calibrated]", kq.get("kvquant").calibrate(x)))
    for label, q in timed:
        rows.append({"scheme": label, "seconds": median_seconds(lambda q=q: q.roundtrip(x), repeats),
                     "bits": q.bits_per_value(T, D)})
    base = next(r["seconds"] for r in rows if r["scheme"] == "fp16")
    copy = rows[0]["seconds"]
    for r in rows:
        r["gb_per_s"] = nbytes / r["seconds"] / 1e9
        r["vs_fp16"] = base / r["seconds"]
        r["vs_copy"] = copy / r["seconds"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.repeats)
    if args.json:
        print(json.dumps({"shape": SHAPE, "threads": torch.get_num_threads(), "rows": rows}, indent=1))
        return
    print(f"quantize + dequantize, fp16 input {SHAPE} (8 MiB), CPU, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print(f"{'scheme':<46}{'bits/val':>9}{'ms':>10}{'GB/s':>8}{'vs fp16':>9}{'vs copy':>9}")
    for r in rows:
        print(f"{r['scheme']:<46}{r['bits']:>9.3f}{r['seconds'] * 1e3:>10.2f}{r['gb_per_s']:>8.3f}"
              f"{r['vs_fp16']:>9.3f}{r['vs_copy']:>9.3f}")


if __name__ == "__main__":
    main()

"""Host time per decode-attention call: what a decode loop without CUDA graphs pays in Python and launches.

Each wrapper is called back to back ``--calls`` times on a small cache (B=1, T=4096, Llama-3-8B heads: the GPU
work is a few microseconds, so the queue never fills and the host's time is what is measured), timed with
``time.perf_counter``; fp16 SDPA on the same tokens is the baseline, measured in the same run. Then a cProfile of
the CUDA kernel's wrapper (``--profile``). Usage: ``python benchmarks/bench_host_overhead.py [--calls N]
[--profile] [--out DIR]``. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_decode_attention as bd  # noqa: E402


def host_us(fn, calls: int) -> float:
    """Median over 5 rounds of the host microseconds per call of ``calls`` back-to-back calls."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return sorted(rounds)[2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the CUDA int2 wrapper")
    ap.add_argument("--out", default=None, help="folder for host_overhead_<device>.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_host_overhead: no CUDA device; nothing to time")
        return 0
    B, T = 1, 4096
    k, v, q, lengths = bd.random_inputs(B, T, 5)
    calls = {"sdpa fp16": functools.partial(bd.sdpa, q, k, v)}
    for bits in (4, 2):
        c = bd.kivi_cache(k, v, bits)
        calls[f"cuda int{bits} (auto variant)"] = functools.partial(bd.fused_kivi, q, c, lengths, T, bits, backend="cuda")
        calls[f"triton int{bits}"] = functools.partial(bd.fused_kivi, q, c, lengths, T, bits)
    g = bd.ggml_cache(k, v, "q4_0")
    calls["triton q4_0"] = functools.partial(bd.fused_ggml, q, g, lengths, T, "q4_0")
    rows = {name: host_us(fn, args.calls) for name, fn in calls.items()}
    base = rows["sdpa fp16"]
    print(f"{torch.cuda.get_device_name()}: host time per call, B={B} T={T}, {args.calls} calls back to back")
    for name, us in rows.items():
        print(f"  {name:26s} {us:7.1f} us  ({us / base:4.1f}x SDPA's)")
    if args.profile:
        fn = calls["cuda int2 (auto variant)"]
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
        print(s.getvalue())
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"host_overhead_{bd.device_tag(torch.cuda.get_device_name())}.json"), "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), B=B, T=T, calls=args.calls, host_us=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

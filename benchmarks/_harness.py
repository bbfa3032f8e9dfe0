"""The timing harness every GPU benchmark shares: L2 eviction, CUDA-event timing (median and spread), graph
replay, the device-to-device copy bandwidth of the run, and the repository root on ``sys.path``.

Importing this module puts the repository root first on ``sys.path``, so ``python benchmarks/bench_X.py``
runs from a plain checkout (kvlab need not be installed). Each bench script starts with::

    import os, sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _harness as H  # noqa: E402

Timing: :func:`bench` returns the median microseconds of ``fn()`` with L2 evicted before every call by reading
a 256 MB buffer (:func:`flush_l2`: nothing of the call's data is left in cache, and no dirty lines for the
timed call to write back, as ``triton.testing.do_bench``'s zeroing flush leaves them; ``FLUSH["mode"] = "zero"``
times that way). :func:`bench_stats` returns the median with the 10th and 90th percentiles.
"""

from __future__ import annotations

import os
import re
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

__all__ = ["FLUSH", "ROOT", "bench", "bench_graph", "bench_stats", "copy_bandwidth", "device_tag", "flush_l2",
           "log", "rel_err"]

FLUSH = {"mode": "read"}  # how bench() evicts L2 before each call: "read" (default) or "zero" (do_bench's)


def log(*a):
    print(*a, flush=True)


def device_tag(name: str) -> str:
    """A short lower-case tag for result file names: ``"NVIDIA H200"`` -> ``"h200"``."""
    m = re.search(r"(H100|H200|A100|L40S|B200|GH200)", name)
    return (m.group(1) if m else re.sub(r"[^A-Za-z0-9]+", "_", name)).lower()


def flush_l2() -> None:
    """Evict L2 by reading a 256 MB buffer: L2 is left holding clean lines of it, as before a decode step, where
    the preceding kernels wrote megabytes rather than L2's 50-60. (``triton.testing.do_bench`` zeroes the buffer
    instead; the timed call then also writes back up to 50 MB of dirty lines: about 10 us on an H100, run s8-1
    in KERNEL_NOTES.md.)"""
    if "buf" not in FLUSH:
        FLUSH["buf"] = torch.empty(64 << 20, dtype=torch.float32, device="cuda")
    FLUSH["buf"].sum()


def bench_stats(fn, warmup=25, rep=100) -> dict:
    """{"median", "p10", "p90", "n"} microseconds of fn() with L2 flushed before each call, after three untimed
    calls (compilation and the split planner's first look stay out). ``warmup`` and ``rep`` are milliseconds,
    as for do_bench. Each call is timed from the host's side, so Python and launch overhead count when they
    outlast the flush."""
    import triton.testing

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    if FLUSH["mode"] == "zero":
        q = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.1, 0.9])
        return {"median": q[0] * 1e3, "p10": q[1] * 1e3, "p90": q[2] * 1e3, "n": None}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush_l2()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = start.elapsed_time(end) / 5  # ms per flush + call
    for _ in range(max(1, int(warmup / estimate))):
        fn()
    n = max(5, int(rep / estimate))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush_l2()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))
    return {"median": statistics.median(times), "p10": times[n // 10], "p90": times[(9 * n) // 10], "n": n}


def bench(fn, warmup=25, rep=100) -> float:
    """Median microseconds of fn() (:func:`bench_stats`)."""
    return bench_stats(fn, warmup, rep)["median"]


def bench_graph(fn) -> float | None:
    """Median microseconds of one fn() replayed from a CUDA graph (None if fn cannot be captured)."""
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3
    except Exception as e:  # a call that cannot be captured: say so, keep going
        log(f"graph capture failed: {type(e).__name__}: {str(e)[:160]}")
        return None


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(1 << 28, device="cuda", dtype=torch.float32)  # 1 GiB read, 1 GiB written
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), warmup=10, rep=200)
    return 2 * src.numel() * 4 / (t * 1e-6)


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in fp32."""
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()

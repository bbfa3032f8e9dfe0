"""Baseline perplexity-evaluation throughput (tokens/s) of the embedded model on this machine.

Usage: python benchmarks/bench_ppl.py [--ctx 512] [--windows 8] [--repeats 3]
Prints the median wall time of one pass over the windows and the scored tokens per second.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402,F401  (puts the repository root on sys.path)
import torch

import kvlab
from kvlab.evaluation.evaluate import load_windows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    model, tok = kvlab.load_model()
    _, w = load_windows(tok, "pydoc", a.ctx, a.windows)
    kvlab.window_nll(model, w[:1], progress=False)  # warm-up
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        kvlab.window_nll(model, w, progress=False)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    scored = w.shape[0] * (w.shape[1] - 1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"baseline eval: {w.shape[0]} windows x ctx {a.ctx}: median {med:.2f} s over {a.repeats} runs "
          f"(min {min(times):.2f}, max {max(times):.2f}) -> {scored / med:.0f} scored tokens/s, "
          f"{w.numel() / med:.0f} input tokens/s")


if __name__ == "__main__":
    main()

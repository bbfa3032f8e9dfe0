"""Cost of fake-quant perplexity evaluation relative to the fp16 scheme, measured in the same run.

Target (issue 4): <= 1.25x the fp16 evaluation time for q4_0 and kivi-2 on CPU.
Usage: python benchmarks/bench_fakequant.py [--ctx 512] [--windows 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

import kvlab
from kvlab.evaluate import evaluate_policy, load_windows

SCHEMES = ["fp16", "q4_0", "kivi:bits=2,group=32,residual=128", "kivi:bits=4", "int:bits=8",
           "q4_0:rotate=hadamard", "signmag:v=2"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    model, tok = kvlab.load_model()
    _, w = load_windows(tok, "pydoc", a.ctx, a.windows)
    evaluate_policy(model, w[:1], "fp16", kl=False, progress=False)  # warm-up
    times = {s: [] for s in SCHEMES}
    for _ in range(a.repeats):  # interleaved, so drifting machine load hits every scheme alike
        for s in SCHEMES:
            times[s].append(evaluate_policy(model, w, s, kl=False, progress=False)["seconds"])
    base = statistics.median(times["fp16"])
    print(f"{os.cpu_count()} cores, torch {torch.__version__}; {a.windows} windows x ctx {a.ctx}, "
          f"median of {a.repeats} interleaved runs")
    print(f"{'scheme':<40} {'seconds':>8} {'x fp16':>7}")
    for s in SCHEMES:
        med = statistics.median(times[s])
        print(f"{s:<40} {med:8.2f} {med / base:7.2f}")


if __name__ == "__main__":
    main()

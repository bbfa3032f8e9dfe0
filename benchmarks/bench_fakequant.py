"""Cost of fake-quant perplexity evaluation relative to the fp16 scheme, measured in the same run.

Target (issue 4): <= 1.25x the fp16 evaluation time for q4_0 and kivi-2 on CPU.
Usage: python benchmarks/bench_fakequant.py [--ctx 512] [--windows 4] [--repeats 3] [--reference]

Schemes run interleaved, so drifting machine load hits every one alike. Wall time is what the issue
asks for; process CPU time (all threads) is printed beside it because it is far less sensitive to other
jobs on a shared machine. ``--reference`` adds, for the schemes with fp16 windows, a run through the
straightforward eager attention (``hooks._attend_reference``) in place of the blockwise SDPA path.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import contextmanager

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402,F401  (puts the repository root on sys.path)
import torch

import kvlab
from kvlab.emulation import hooks
from kvlab.evaluation.evaluate import evaluate_policy, load_windows
from kvlab.evaluation.ppl import window_nll

SCHEMES = ["fp16", "q4_0", "kivi:bits=2,group=32,residual=128", "kivi:bits=4", "int:bits=8",
           "q4_0:rotate=hadamard", "signmag:v=2"]
WINDOWED = ["kivi:bits=2,group=32,residual=128", "kivi:bits=4"]  # the schemes that take the blockwise path
REFERENCE = " (eager reference)"
PLAIN = "(plain model, no hooks)"


@contextmanager
def eager_reference():
    """Route hooks' mixed-version attention through the eager reference."""
    fast = hooks._attend

    def attend(state, query, kv, k_keys, vv, v_keys, attention_mask, scaling):
        out, _ = hooks._attend_reference(query, *hooks._reference_inputs(state, kv, k_keys),
                                         *hooks._reference_inputs(state, vv, v_keys), attention_mask, scaling)
        return out.transpose(1, 2).contiguous()

    hooks._attend = attend
    try:
        yield
    finally:
        hooks._attend = fast


def timed(model, windows, scheme) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one evaluation."""
    cpu = time.process_time()
    if scheme == PLAIN:
        t0 = time.perf_counter()
        window_nll(model, windows, progress=False)
        wall = time.perf_counter() - t0
    elif scheme.endswith(REFERENCE):
        with eager_reference():
            wall = evaluate_policy(model, windows, scheme[: -len(REFERENCE)], kl=False, progress=False)["seconds"]
    else:
        wall = evaluate_policy(model, windows, scheme, kl=False, progress=False)["seconds"]
    return wall, time.process_time() - cpu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reference", action="store_true", help="also time the eager reference attention")
    a = ap.parse_args()
    model, tok = kvlab.load_model()
    _, w = load_windows(tok, "pydoc", a.ctx, a.windows)
    evaluate_policy(model, w[:1], "fp16", kl=False, progress=False)  # warm-up
    schemes = [PLAIN] + SCHEMES + ([s + REFERENCE for s in WINDOWED] if a.reference else [])
    wall, cpu = {s: [] for s in schemes}, {s: [] for s in schemes}
    for _ in range(a.repeats):  # interleaved, so drifting machine load hits every scheme alike
        for s in schemes:
            t_wall, t_cpu = timed(model, w, s)
            wall[s].append(t_wall)
            cpu[s].append(t_cpu)
    base_wall, base_cpu = statistics.median(wall["fp16"]), statistics.median(cpu["fp16"])
    print(f"{os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}; {a.windows} "
          f"windows x ctx {a.ctx}, median of {a.repeats} interleaved runs")
    plain_wall = statistics.median(wall[PLAIN])
    print("x fp16: against the fp16 scheme through the same hooks (the issue's baseline); x plain: against the "
          "unmodified model's evaluation")
    print(f"{'scheme':<52} {'wall s':>7} {'x fp16':>7} {'x plain':>8} {'cpu s':>7} {'x fp16':>7}")
    for s in schemes:
        mw, mc = statistics.median(wall[s]), statistics.median(cpu[s])
        print(f"{s:<52} {mw:7.2f} {mw / base_wall:7.2f} {mw / plain_wall:8.2f} {mc:7.2f} {mc / base_cpu:7.2f}")


if __name__ == "__main__":
    main()

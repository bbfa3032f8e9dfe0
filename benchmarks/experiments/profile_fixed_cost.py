"""Where the fixed cost of a CUDA KIVI decode call goes: graph-replay and eager times at short and long
sequences, and from a torch.profiler trace of graph replays the decode kernel's and the split merge's GPU time
and the gap between them. Usage: ``python benchmarks/profile_fixed_cost.py [--out FILE.json]``; compare builds
with ``KVLAB_CUDA_CFLAGS`` (one rebuild each). Runs s8-5 and s8-6 (KERNEL_NOTES.md, v9) compared the merge launched as a
programmatic dependent of the decode kernel, and the window units staged ahead, with the kernel as it is. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/
import bench_decode_attention as bd  # noqa: E402


def kernel_spans(fn, replays: int = 30) -> dict:
    """Median GPU microseconds of the decode kernel, the merge, the gap between them and the whole call
    (decode start to merge end), from a profiler trace of ``replays`` CUDA-graph replays of ``fn``."""
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            fn()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            g.replay()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    main, merge, gap, whole = [], [], [], []
    for a, b in zip(kernels, kernels[1:]):
        if "kivi_decode" in a["name"] and "merge" in b["name"]:
            main.append(a["dur"])
            merge.append(b["dur"])
            gap.append(b["ts"] - (a["ts"] + a["dur"]))
            whole.append(b["ts"] + b["dur"] - a["ts"])
    med = statistics.median
    return dict(decode_us=med(main), merge_us=med(merge), gap_us=med(gap), call_us=med(whole)) if main else {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--points", default="1:4096,8:1024,8:4096,8:32768", help="B:T,... (default: run s8-5's)")
    ap.add_argument("--tunes", default=None,
                    help="folded-kernel tunings (kivi_cuda.TUNES names, e.g. b2s2,loads) for int4 and int2 instead of "
                         "s8-5's variants (registers int4, folded int4 / int2)")
    ap.add_argument("--splits", default="auto", help="with --tunes: splits per (sequence, kv head), auto or a number, ...")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_fixed_cost: no CUDA device")
        return 0
    rows = []
    print(f"{torch.cuda.get_device_name()}; KVLAB_CUDA_CFLAGS={os.environ.get('KVLAB_CUDA_CFLAGS', '')!r}")
    from kvlab.kernels import kivi_cuda

    points = [tuple(int(x) for x in pt.split(":")) for pt in args.points.split(",")]
    if args.tunes:
        combos = [(bits, "folded", tune, splits) for bits in (4, 2) for tune in args.tunes.split(",")
                  for splits in [None if x == "auto" else int(x) for x in args.splits.split(",")]
                  if bits == 2 or tune not in kivi_cuda.INT2_ONLY_TUNES]
    else:
        combos = [(4, "registers", None, None), (4, "folded", None, None), (2, "folded", None, None)]
    for B, T in points:
        k, v, q, lengths = bd.random_inputs(B, T, 6)
        for bits, variant, tune, splits in combos:
            c = bd.kivi_cache(k, v, bits)
            if tune is None:
                run = functools.partial(bd.fused_kivi, q, c, lengths, T, bits, backend="cuda", cuda_variant=variant)
            else:
                def run(c=c, bits=bits, tune=tune, T=T, q=q, lengths=lengths, splits=splits):
                    return kivi_cuda.kivi_decode_attention_cuda(
                        q, *bd.kivi_args(c), lengths, bits=bits, group=bd.GROUP, residual=bd.RESIDUAL,
                        qk_scale=bd.D**-0.5 * 1.4426950408889634, out=torch.empty_like(q), max_len=T, variant="folded",
                        chosen=True, tune=tune, num_splits=splits)
            label = variant if tune is None else f"folded:{tune}" + (f"/splits={splits}" if splits else "")
            r = dict(B=B, T=T, bits=bits, variant=label,
                     us=bd.bench(run), graph_us=bd.bench_graph(run), **kernel_spans(run))
            rows.append(r)
            print("  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
            del c
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), cflags=os.environ.get("KVLAB_CUDA_CFLAGS", ""),
                           rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

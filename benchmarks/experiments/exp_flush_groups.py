"""Experiment (eighth session, run s8-1; results/decode_attention_h100_s8run1_flush_groups.json): how much of the eager timings is the L2 flush's dirty write-back, and KIVI group size.

do_bench flushes L2 with ``zero_()`` on a 256 MB buffer: L2 is left full of dirty lines that the timed call
must write back. Compare: zero flush (do_bench), a read flush (sum over 256 MB: L2 left clean), zero then read,
and graph replays. Then the CUDA kernel at KIVI group 32, 64, 128 (B=8, T=32k).
"""
import functools
import json
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/
import bench_decode_attention as bd  # noqa: E402

FLUSH = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
FLUSH_F = FLUSH.view(torch.float32)


def timed(fn, flush, n=200):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        if flush == "zero":
            FLUSH.zero_()
        elif flush == "read":
            FLUSH_F.sum()
        elif flush == "zero+read":
            FLUSH.zero_()
            FLUSH_F.sum()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    t = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return t[n // 2] * 1e3


def all_ways(name, fn, nbytes, copy_bw, out):
    r = dict(name=name, bytes=nbytes)
    r["do_bench"] = triton.testing.do_bench(fn, return_mode="median") * 1e3
    for f in ("zero", "read", "zero+read", "none"):
        r[f] = timed(fn, f)
    r["graph"] = bd.bench_graph(fn)
    out.append(r)
    print(f"{name:28s} " + "  ".join(f"{k}={r[k]:8.1f}" for k in ("do_bench", "zero", "read", "zero+read", "none", "graph"))
          + f"  bw(read)={nbytes / (r['read'] * 1e-6) / copy_bw:5.1%} bw(graph)={nbytes / (r['graph'] * 1e-6) / copy_bw:5.1%}",
          flush=True)
    return r


def main():
    out = []
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    copy = functools.partial(dst.copy_, src)
    copy_bw = 2 * src.numel() * 4 / (triton.testing.do_bench(copy, warmup=10, rep=200, return_mode="median") * 1e-3)
    print(f"{torch.cuda.get_device_name()} copy bw (do_bench) {copy_bw / 1e12:.3f} TB/s", flush=True)
    r = all_ways("copy 2 GiB", copy, 2 * src.numel() * 4, copy_bw, out)
    print(f"copy bw from read flush {2 * src.numel() * 4 / (r['read'] * 1e-6) / 1e12:.3f} TB/s, graph "
          f"{2 * src.numel() * 4 / (r['graph'] * 1e-6) / 1e12:.3f}", flush=True)
    del src, dst
    rd = torch.randn(200 << 18, device="cuda")  # 200 MB read-only pass
    all_ways("read 200 MB (sum)", rd.sum, rd.numel() * 4, copy_bw, out)
    del rd
    B, T = 8, 32768
    k, v, q, lengths = bd.random_inputs(B, T, 3)
    all_ways("sdpa fp16", functools.partial(bd.sdpa, q, k, v), 2 * B * bd.HKV * T * bd.D * 2 + 2 * B * bd.HQ * bd.D * 2,
             copy_bw, out)
    import kvlab.kernels as K
    for group in (32, 64, 128):
        for bits in (4, 2):
            c = bd.kivi_cache(k, v, bits, group)
            ref = K.kivi_decode_attention_ref(q, c["k_codes"], c["k_scale"], c["k_min"], c["k_fp16"], c["v_codes"],
                                              c["v_scale"], c["v_min"], c["v_fp16"], lengths, bits=bits, group=group,
                                              residual=bd.RESIDUAL).float()
            for variant in ("auto", "registers", "staged", "folded"):
                run = functools.partial(bd.fused_kivi, q, c, lengths, T, bits, backend="cuda", group=group,
                                        cuda_variant=variant)
                try:
                    err = bd.rel_err(run(), ref)
                except ValueError as e:
                    print(f"group {group} int{bits} {variant}: {e}", flush=True)
                    continue
                r = all_ways(f"cuda int{bits} g{group} {variant}", run, bd.kivi_bytes(B, T, bits, group=group),
                             copy_bw, out)
                r.update(group=group, bits=bits, variant=variant, relerr_vs_ref=err)
                print(f"   err vs fp32 ref {err:.2e}", flush=True)
            del c
    os.makedirs(os.environ.get("OUT", "."), exist_ok=True)
    with open(os.path.join(os.environ.get("OUT", "."), "exp_flush_groups.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), copy_bw=copy_bw, rows=out), f, indent=1)


if __name__ == "__main__":
    main()

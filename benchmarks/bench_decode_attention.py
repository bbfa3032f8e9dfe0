"""Decode attention from quantized KV caches vs fp16 SDPA, Llama-3-8B attention geometry, on one GPU.

For B in {1, 8, 32} and T in {4k, 32k, 128k} (where memory allows): fp16 SDPA decode (the baseline),
the naive path (pure-torch unpack + dequantize + SDPA) and the fused Triton kernels (KIVI int4 / int2,
llama.cpp q4_0 / q8_0), with speedups over SDPA and the bandwidth reached on the bytes each one reads,
as a fraction of a device-to-device copy measured in the same run. Then quantize-on-append bandwidth.

Timing: the median of CUDA-event timings, L2 flushed before every call by reading a 256 MB buffer (so nothing is
served from cache between calls, and no dirty lines are left for the timed call to write back, as
``triton.testing.do_bench``'s zeroing flush leaves them: ``--flush zero`` times that way); each call is timed
from the host's side, so Python and launch overhead count when they outlast the flush. The ``graph`` columns replay the same call captured in a CUDA graph (what a
decode loop under graphs sees: GPU time only, L2 not flushed between replays). Usage: ``python benchmarks/bench_decode_attention.py [--out DIR] [--sweep]``.
Without CUDA it says so and exits 0 (the kernels' correctness runs in tests/test_kernels.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import sys
import time

import torch

HQ, HKV, D = 32, 8, 128  # Llama-3-8B: 32 query heads, 8 kv heads, head_dim 128
GROUP, RESIDUAL = 32, 128  # KIVI defaults (paper: group 32, residual 128)
BATCHES = (1, 8, 32)
KERNELS = ("kivi-int4", "kivi-int2", "cuda-int4", "cuda-int2", "q4_0", "q8_0")
LENGTHS = (4096, 32768, 131072)


def log(*a):
    print(*a, flush=True)


def device_tag(name: str) -> str:
    m = re.search(r"(H100|H200|A100|L40S|B200|GH200)", name)
    return (m.group(1) if m else re.sub(r"[^A-Za-z0-9]+", "_", name)).lower()


FLUSH = {"mode": "read"}  # how bench() evicts L2 before each call: "read" (default) or "zero" (do_bench's)


def flush_l2() -> None:
    """Evict L2 by reading a 256 MB buffer: L2 is left holding clean lines of it, as before a decode step, where
    the preceding kernels wrote megabytes rather than L2's 50. (``triton.testing.do_bench`` zeroes the buffer
    instead; the timed call then also writes back up to 50 MB of dirty lines: about 10 us on an H100, run s8-1
    in KERNEL_NOTES.md. ``--flush zero`` times that way.)"""
    if "buf" not in FLUSH:
        FLUSH["buf"] = torch.empty(64 << 20, dtype=torch.float32, device="cuda")
    FLUSH["buf"].sum()


def bench(fn, warmup=25, rep=100) -> float:
    """Median microseconds of fn() with L2 flushed before each call (:func:`flush_l2`; with ``--flush zero``
    ``do_bench``'s own), after three untimed calls (compilation, and the split planner learning the kernel's
    occupancy, stay out of the numbers). ``warmup`` and ``rep`` are milliseconds, as for do_bench."""
    import triton.testing

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    if FLUSH["mode"] == "zero":
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1e3
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
    n = max(1, int(rep / estimate))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush_l2()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[n // 2] * 1e3


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
    t = bench(functools.partial(torch.empty_like(src).copy_, src), warmup=10, rep=200)
    return 2 * src.numel() * 4 / (t * 1e-6)


def random_inputs(B: int, T: int, seed: int):
    """fp16 K, V (B, HKV, T, D) and one query token (B, HQ, 1, D) from a seeded CUDA generator; every
    sequence T tokens long (``lengths`` int32)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    k = torch.randn(B, HKV, T, D, device="cuda", dtype=torch.float16, generator=g)
    v = torch.randn(B, HKV, T, D, device="cuda", dtype=torch.float16, generator=g)
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.float16, generator=g)
    return k, v, q, torch.full((B,), T, dtype=torch.int32, device="cuda")


# ---- caches ------------------------------------------------------------------------------------------


def kivi_cache(k, v, bits, group=GROUP):
    """Quantize fp16 k, v (B, H, T, D) into a KIVI cache with the pack kernels (L = T for every sequence)."""
    import kvlab.kernels as K

    B, H, T, _ = k.shape
    nk, nv = T // RESIDUAL * RESIDUAL, max(0, T - RESIDUAL)
    c = dict(
        k_codes=torch.empty(B, H, D, T * bits // 8, dtype=torch.uint8, device="cuda"),
        k_scale=torch.empty(B, H, T // group, D, dtype=torch.float16, device="cuda"),
        k_min=torch.empty(B, H, T // group, D, dtype=torch.float16, device="cuda"),
        k_fp16=torch.zeros(B, H, RESIDUAL, D, dtype=torch.float16, device="cuda"),
        v_codes=torch.empty(B, H, T, D * bits // 8, dtype=torch.uint8, device="cuda"),
        v_scale=torch.empty(B, H, T, D // group, dtype=torch.float16, device="cuda"),
        v_min=torch.empty(B, H, T, D // group, dtype=torch.float16, device="cuda"),
        v_fp16=torch.zeros(B, H, RESIDUAL, D, dtype=torch.float16, device="cuda"),
    )
    chunk = 8192  # append in chunks: the inputs are slices of k and v, made contiguous a chunk at a time
    for t0 in range(0, nk, chunk):
        t1 = min(nk, t0 + chunk)
        K.kivi_pack_k(k[:, :, t0:t1].contiguous(), c["k_codes"], c["k_scale"], c["k_min"], t0, bits=bits,
                      group=group)
    for t0 in range(0, nv, chunk):
        t1 = min(nv, t0 + chunk)
        K.kivi_pack_v(v[:, :, t0:t1].contiguous(), c["v_codes"], c["v_scale"], c["v_min"], t0, bits=bits,
                      group=group)
    c["k_fp16"][:, :, : T - nk] = k[:, :, nk:]
    c["v_fp16"][:, :, : T - nv] = v[:, :, nv:]
    return c


def kivi_bytes(B, T, bits, nq=1, group=GROUP):
    nk, nv = T // RESIDUAL * RESIDUAL, max(0, T - RESIDUAL)
    per_head = (nk * D * bits / 8 + nk // group * D * 4 + (T - nk) * D * 2
                + nv * D * bits / 8 + nv * D // group * 4 + (T - nv) * D * 2)
    return B * HKV * per_head + 2 * B * HQ * nq * D * 2  # + Q read and output written


def ggml_cache(k, v, fmt):
    import kvlab.kernels as K

    B, H, T, _ = k.shape
    out = {}
    for name, x in (("k", k), ("v", v)):
        shapes = K.ggml_shapes(fmt, B, H, T, D)
        codes = torch.empty(shapes["codes"][0], dtype=shapes["codes"][1], device="cuda")
        d = torch.empty(shapes["d"][0], dtype=torch.float16, device="cuda")
        for t0 in range(0, T, 8192):
            K.ggml_pack(x[:, :, t0 : t0 + 8192].contiguous(), codes, d, t0, fmt=fmt)
        out[name] = (codes, d)
    return out


def ggml_bytes(B, T, fmt):
    per_tok = (D // 2 if fmt == "q4_0" else D) + D // 32 * 2
    return 2 * B * HKV * T * per_tok + 2 * B * HQ * D * 2


# ---- the contenders ------------------------------------------------------------------------------------


def sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def naive_kivi(q, c, T, bits):
    """Pure torch: unpack every code, dequantize to fp16, concatenate the windows, SDPA."""
    nk, nv = T // RESIDUAL * RESIDUAL, max(0, T - RESIDUAL)
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device="cuda")
    kc = ((c["k_codes"][..., : nk * bits // 8].unsqueeze(-1) >> shifts) & mask).flatten(-2)  # (B, H, D, nk)
    k = kc.transpose(-1, -2).half() * c["k_scale"].repeat_interleave(GROUP, dim=2)[:, :, :nk] \
        + c["k_min"].repeat_interleave(GROUP, dim=2)[:, :, :nk]
    vc = ((c["v_codes"][:, :, :nv].unsqueeze(-1) >> shifts) & mask).flatten(-2)  # (B, H, nv, D)
    v = vc.half() * c["v_scale"][:, :, :nv].repeat_interleave(GROUP, dim=-1) \
        + c["v_min"][:, :, :nv].repeat_interleave(GROUP, dim=-1)
    k = torch.cat([k, c["k_fp16"][:, :, : T - nk]], dim=2)
    v = torch.cat([v, c["v_fp16"][:, :, : T - nv]], dim=2)
    return sdpa(q, k, v)


def fused_kivi(q, c, lengths, T, bits, backend="triton", group=GROUP, **tune):
    import kvlab.kernels as K

    return K.kivi_decode_attention(q, c["k_codes"], c["k_scale"], c["k_min"], c["k_fp16"], c["v_codes"],
                                   c["v_scale"], c["v_min"], c["v_fp16"], lengths, bits=bits, group=group,
                                   residual=RESIDUAL, max_len=T, backend=backend, **tune)


def fused_ggml(q, c, lengths, T, fmt, **tune):
    import kvlab.kernels as K

    return K.ggml_decode_attention(q, *c["k"], *c["v"], lengths, k_fmt=fmt, v_fmt=fmt, max_len=T, **tune)


def resident_of(fn, tune) -> str:
    """CTAs per SM the split planner learnt for the kernel behind ``fn`` with ``tune`` (for the log)."""
    from kvlab.kernels import splitk

    hits = [v for k, v in splitk._RESIDENT.items()
            if ("kivi" in k[0]) == (fn is fused_kivi) and ("num_warps", str(tune["num_warps"])) in k[2]
            and ("BLOCK_N", str(tune["block_n"])) in k[2]
            and (("maxnreg", str(tune["max_regs"])) in k[2]) == (tune["max_regs"] is not None)]
    return ",".join(map(str, sorted(set(hits)))) or "?"


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


# ---- the runs ------------------------------------------------------------------------------------------


def sweep(results, copy_bw):
    """Tuning sweep at B=8, T=32k: block_n x num_warps x num_stages for each fused kernel."""
    B, T = 8, 32768
    k, v, q, lengths = random_inputs(B, T, 1)
    contenders = {
        "kivi-int4": (functools.partial(fused_kivi, q, kivi_cache(k, v, 4), lengths, T, 4), kivi_bytes(B, T, 4)),
        "kivi-int2": (functools.partial(fused_kivi, q, kivi_cache(k, v, 2), lengths, T, 2), kivi_bytes(B, T, 2)),
        "q4_0": (functools.partial(fused_ggml, q, ggml_cache(k, v, "q4_0"), lengths, T, "q4_0"),
                 ggml_bytes(B, T, "q4_0")),
    }
    best = {}
    # around the defaults (the best of a wider sweep, see KERNEL_NOTES.md): block, stages, register cap
    configs = [dict(block_n=bn, num_warps=4, num_stages=st, max_regs=mr)
               for bn, st, mr in ((64, 2, 128), (64, 3, 128), (64, 2, None), (128, 3, 128), (32, 2, 128))]
    for name, (run, nbytes) in contenders.items():
        base = run().float()  # the defaults: every tuning must compute the same function
        for tune in configs:
            try:
                err = rel_err(run(**tune), base)
                t = bench(functools.partial(run, **tune))
            except Exception as e:  # a config the compiler rejects (e.g. shared memory): skip it
                log(f"sweep {name} {tune}: failed: {type(e).__name__}: {str(e)[:160]}")
                continue
            if not err < 1e-2:
                log(f"sweep {name} {tune}: output differs from the defaults' (rel err {err:.3g}): not used")
                continue
            frac = nbytes / (t * 1e-6) / copy_bw
            results["sweep"].append(dict(kernel=name, B=B, T=T, us=t, bw_frac=frac, relerr_vs_default=err, **tune))
            log(f"sweep {name:10s} " + " ".join(f"{k}={v}" for k, v in tune.items())
                + f": {t:8.1f} us  {frac:5.1%} of copy bw  err vs defaults {err:.1e}"
                + f"  resident={resident_of(run.func, tune)}")
            if name not in best or t < best[name][0]:
                best[name] = (t, tune)
    return {n: tune for n, (t, tune) in best.items()}


def sweep_cuda(results, copy_bw, variants=("registers", "staged", "folded"), splits_list=(None, 4, 6, 8, 12)):
    """The CUDA kernel at B=8, T=32k, its variants in the same run: CTAs along the sequence per (sequence, kv
    head), automatic (None) and fixed; then time against the sequence length."""
    import kvlab.kernels as K

    B, T = 8, 32768
    k, v, q, lengths = random_inputs(B, T, 2)
    for bits in (4, 2):
        c = kivi_cache(k, v, bits)
        base = fused_kivi(q, c, lengths, T, bits, backend="cuda", cuda_variant="registers").float()
        # the pure-torch reference (dequantized in fp32, fp32 attention): each variant's own rounding error
        ref = K.kivi_decode_attention_ref(q, c["k_codes"], c["k_scale"], c["k_min"], c["k_fp16"], c["v_codes"],
                                          c["v_scale"], c["v_min"], c["v_fp16"], lengths, bits=bits, group=GROUP,
                                          residual=RESIDUAL).float()
        for variant in variants:
            run = functools.partial(fused_kivi, q, c, lengths, T, bits, backend="cuda", cuda_variant=variant)
            err_ref = rel_err(run(), ref)
            results["sweep"].append(dict(kernel=f"cuda-int{bits}-{variant}", B=B, T=T, relerr_vs_reference=err_ref))
            log(f"sweep cuda-int{bits} {variant:9s} error against the fp32 reference: {err_ref:.2e}")
            for splits in splits_list:
                err = rel_err(run(num_splits=splits), base)
                t = bench(functools.partial(run, num_splits=splits))
                tg = bench_graph(functools.partial(run, num_splits=splits))
                frac = kivi_bytes(B, T, bits) / (t * 1e-6) / copy_bw
                results["sweep"].append(dict(kernel=f"cuda-int{bits}-{variant}", B=B, T=T, num_splits=splits, us=t,
                                             graph_us=tg, bw_frac=frac, relerr_vs_registers=err))
                log(f"sweep cuda-int{bits} {variant:9s} num_splits={splits}: {t:8.1f} us (graph {tg:8.1f})  "
                    f"{frac:5.1%} of copy bw  err vs registers/automatic {err:.1e}")
        # time against sequence length at B=8 (same cache, shorter lengths): slope = the steady state,
        # intercept = the fixed cost of a call (launches, first loads, the window tokens, the merge)
        for variant in variants:
            for L in (200, 1024, 4096, 16384, 32768):
                lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
                run = functools.partial(fused_kivi, q, c, lens, L, bits, backend="cuda", cuda_variant=variant)
                t, tg = bench(run), bench_graph(run)
                results["sweep"].append(dict(kernel=f"cuda-int{bits}-{variant}", B=B, T=L, us=t, graph_us=tg))
                log(f"scaling cuda-int{bits} {variant:9s} L={L:6d}: {t:8.1f} us (graph {tg:8.1f})")


def bits_per_value(bits: int, group: int) -> float:
    """Stored bits per quantized K or V value: the code plus its share of an fp16 scale and an fp16 minimum."""
    return bits + 32 / group


def group_sweep(results, copy_bw, groups):
    """The CUDA kernel ("auto" variant) at B=8, T=32k for KIVI groups ``groups``: fewer scales per value read
    (``bits_per_value``) against the fp16 SDPA of the same run; each group's error against the fp32 reference."""
    import kvlab.kernels as K

    B, T = 8, 32768
    k, v, q, lengths = random_inputs(B, T, 4)
    sdpa_us = bench(functools.partial(sdpa, q, k, v))
    sdpa_graph = bench_graph(functools.partial(sdpa, q, k, v))
    rows = []
    for group in groups:
        for bits in (4, 2):
            c = kivi_cache(k, v, bits, group)
            args = (q, c["k_codes"], c["k_scale"], c["k_min"], c["k_fp16"], c["v_codes"], c["v_scale"], c["v_min"],
                    c["v_fp16"], lengths)
            ref = K.kivi_decode_attention_ref(*args, bits=bits, group=group, residual=RESIDUAL).float()
            run = functools.partial(fused_kivi, q, c, lengths, T, bits, backend="cuda", group=group)
            err = rel_err(run(), ref)
            t, tg = bench(run), bench_graph(run)
            variant = K.kivi_cuda.choose_variant(q, c["k_codes"], c["k_scale"], c["k_min"], c["v_codes"],
                                                 c["v_scale"], c["v_min"], bits, group)
            nbytes = kivi_bytes(B, T, bits, group=group)
            rows.append(dict(group=group, bits=bits, variant=variant, bits_per_value=bits_per_value(bits, group),
                             us=t, graph_us=tg, speedup=sdpa_us / t, graph_speedup=sdpa_graph / tg if tg else None,
                             bw_frac=nbytes / (t * 1e-6) / copy_bw, floor_speedup=(2 * B * HKV * T * D * 2) / nbytes,
                             relerr_vs_reference=err))
            log(f"group {group:3d} int{bits} ({variant}, {bits_per_value(bits, group):.3f} bits/value): {t:7.1f} us "
                f"(graph {tg:7.1f}), {sdpa_us / t:4.2f}x SDPA {sdpa_us:.1f}, {rows[-1]['bw_frac']:5.1%} of copy bw, "
                f"err vs fp32 ref {err:.2e}")
            del c
    results["groups"] = dict(B=B, T=T, sdpa_us=sdpa_us, sdpa_graph_us=sdpa_graph, rows=rows)


def grid_point(results, copy_bw, tunes, B, T):
    """Every contender at one (B, T); the fp16 K and V are dropped once the caches are built."""
    row = dict(B=B, T=T)
    k, v, q, lengths = random_inputs(B, T, B * 1000 + T)
    fp16_bytes = 2 * B * HKV * T * D * 2
    ref = sdpa(q, k, v)
    t = bench(functools.partial(sdpa, q, k, v))
    row["sdpa_us"] = t
    row["sdpa_bw"] = (fp16_bytes + 2 * B * HQ * D * 2) / (t * 1e-6) / copy_bw
    row["sdpa_graph_us"] = bench_graph(functools.partial(sdpa, q, k, v))
    runs = {}
    for bits in (4, 2):
        c = kivi_cache(k, v, bits)
        runs[f"kivi-int{bits}"] = (functools.partial(fused_kivi, q, c, lengths, T, bits, **tunes.get(f"kivi-int{bits}", {})),
                                   kivi_bytes(B, T, bits), c)
        runs[f"cuda-int{bits}"] = (functools.partial(fused_kivi, q, c, lengths, T, bits, backend="cuda"),
                                   kivi_bytes(B, T, bits), c)
    for fmt in ("q4_0", "q8_0"):
        runs[fmt] = (functools.partial(fused_ggml, q, ggml_cache(k, v, fmt), lengths, T, fmt,
                                       **tunes.get(fmt, tunes.get("q4_0", {}))), ggml_bytes(B, T, fmt), None)
    k = v = None  # free the fp16 cache before the naive path materialises its own
    torch.cuda.empty_cache()
    for name, (fn, nbytes, _) in runs.items():
        try:
            out = fn()
        except ValueError as e:  # the CUDA kernel could not be built here: say so, time the rest
            log(f"{name} at B={B} T={T}: {e}")
            continue
        t = bench(fn)
        row[f"{name}_us"] = t
        row[f"{name}_speedup"] = row["sdpa_us"] / t
        row[f"{name}_bw"] = nbytes / (t * 1e-6) / copy_bw
        row[f"{name}_relerr_vs_fp16"] = rel_err(out, ref)
        tg = bench_graph(fn)
        row[f"{name}_graph_us"] = tg
        if tg and row["sdpa_graph_us"]:
            row[f"{name}_graph_speedup"] = row["sdpa_graph_us"] / tg
            row[f"{name}_graph_bw"] = nbytes / (tg * 1e-6) / copy_bw
    for bits in (4, 2):
        if B * T <= 8 * 131072:
            try:
                t = bench(functools.partial(naive_kivi, q, runs[f"kivi-int{bits}"][2], T, bits), warmup=5, rep=50)
                row[f"naive-int{bits}_us"] = t
                row[f"naive-int{bits}_speedup"] = row["sdpa_us"] / t
            except torch.OutOfMemoryError:
                log(f"naive int{bits} at B={B} T={T}: out of memory")
            torch.cuda.empty_cache()
    return row


def main_grid(results, copy_bw, tunes, batches, lengths_, save):
    for B in batches:
        for T in lengths_:
            fp16_bytes = 2 * B * HKV * T * D * 2
            if 3.2 * fp16_bytes > torch.cuda.mem_get_info()[0]:
                log(f"skip B={B} T={T}: {fp16_bytes / 2**30:.1f} GiB of fp16 KV does not fit with the caches")
                continue
            row = grid_point(results, copy_bw, tunes, B, T)
            torch.cuda.empty_cache()
            results["grid"].append(row)
            save()
            log(json.dumps({k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items()}))


def append_bench(results, copy_bw):
    """Quantize-on-append: bulk (prefill-sized) appends for bandwidth, and single decode-step appends."""
    import kvlab.kernels as K

    B, T = 8, 8192
    g = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(B, HKV, T, D, device="cuda", dtype=torch.float16, generator=g)
    x1 = x[:, :, :1].contiguous()
    xr = x[:, :, :RESIDUAL].contiguous()
    rows = []

    def row(kernel, tokens, fn, moved):
        t = bench(fn)
        rows.append(dict(kernel=kernel, tokens=tokens, B=B, us=t,
                         bw_frac=None if moved is None else moved / (t * 1e-6) / copy_bw))

    for bits in (4, 2):
        kbuf = (torch.empty(B, HKV, D, T * bits // 8, dtype=torch.uint8, device="cuda"),
                torch.empty(B, HKV, T // GROUP, D, dtype=torch.float16, device="cuda"),
                torch.empty(B, HKV, T // GROUP, D, dtype=torch.float16, device="cuda"))
        vbuf = (torch.empty(B, HKV, T, D * bits // 8, dtype=torch.uint8, device="cuda"),
                torch.empty(B, HKV, T, D // GROUP, dtype=torch.float16, device="cuda"),
                torch.empty(B, HKV, T, D // GROUP, dtype=torch.float16, device="cuda"))
        moved = x.numel() * 2 + sum(t.numel() * t.element_size() for t in kbuf)
        pk = functools.partial(K.kivi_pack_k, bits=bits, group=GROUP)
        pv = functools.partial(K.kivi_pack_v, bits=bits, group=GROUP)
        row(f"kivi_pack_k int{bits}", T, functools.partial(pk, x, *kbuf, 0), moved)
        row(f"kivi_pack_v int{bits}", T, functools.partial(pv, x, *vbuf, 0), moved)
        # decode steps: one V token per sequence; one K residual chunk (R tokens) per sequence
        row(f"kivi_pack_v int{bits} (1 token)", 1, functools.partial(pv, x1, *vbuf, 100), None)
        row(f"kivi_pack_k int{bits} ({RESIDUAL} tokens)", RESIDUAL, functools.partial(pk, xr, *kbuf, 0), None)
    for fmt in ("q4_0", "q8_0"):
        shapes = K.ggml_shapes(fmt, B, HKV, T, D)
        codes = torch.empty(shapes["codes"][0], dtype=shapes["codes"][1], device="cuda")
        d = torch.empty(shapes["d"][0], dtype=torch.float16, device="cuda")
        moved = x.numel() * 2 + codes.numel() * codes.element_size() + d.numel() * 2
        row(f"ggml_pack {fmt}", T, functools.partial(K.ggml_pack, x, codes, d, 0, fmt=fmt), moved)
    results["append"] = rows
    for r in rows:
        bw = f"{r['bw_frac']:6.1%}" if r["bw_frac"] is not None else "     -"
        log(f"append {r['kernel']:34s} {r['us']:9.1f} us  {bw} of copy bw")


def table(results) -> str:
    lines = [f"device: {results['device']}   copy bandwidth (read+write): {results['copy_bw'] / 1e12:.2f} TB/s",
             f"Llama-3-8B attention: {HQ} q heads, {HKV} kv heads, D={D}, fp16; KIVI group={GROUP} "
             f"residual={RESIDUAL}; one query token; times are medians in us",
             "speedup = fp16 SDPA time / time; bw = bytes read (codes+scales+windows+Q) / time / copy bandwidth",
             ""]
    names = KERNELS
    hdr = (f"{'B':>3} {'T':>7} | {'sdpa':>8} {'bw':>5} | {'naive4':>8} | "
           + " | ".join(f"{n:>9} {'x':>5} {'bw':>5}" for n in names))
    lines += ["kivi-intN: the Triton kernel; cuda-intN: the CUDA C++ kernel (kvlab/kernels/csrc), same cache", "",
              hdr, "-" * len(hdr)]
    for r in results["grid"]:
        naive = f"{r['naive-int4_us']:8.1f}" if "naive-int4_us" in r else f"{'-':>8}"
        cells = [f"{r['sdpa_us']:8.1f} {r['sdpa_bw']:5.0%}", naive]
        for n in names:
            if n + "_us" in r:
                cells.append(f"{r[n + '_us']:9.1f} {r[n + '_speedup']:5.2f} {r[n + '_bw']:5.0%}")
            else:
                cells.append(f"{'-':>9} {'-':>5} {'-':>5}")
        lines.append(f"{r['B']:>3} {r['T']:>7} | " + " | ".join(cells))
    lines += ["", "the same calls replayed from CUDA graphs (no host overhead; L2 not flushed between replays):",
              f"{'B':>3} {'T':>7} | {'sdpa':>8} | " + " | ".join(f"{n:>9} {'x':>5} {'bw':>5}" for n in names)]
    for r in results["grid"]:
        cells = [f"{r['sdpa_graph_us']:8.1f}" if r.get("sdpa_graph_us") else f"{'-':>8}"]
        for n in names:
            if r.get(n + "_graph_speedup"):
                cells.append(f"{r[n + '_graph_us']:9.1f} {r[n + '_graph_speedup']:5.2f} {r[n + '_graph_bw']:5.0%}")
            else:
                cells.append(f"{'-':>9} {'-':>5} {'-':>5}")
        lines.append(f"{r['B']:>3} {r['T']:>7} | " + " | ".join(cells))
    lines.append("")
    for r in results.get("append", []):
        bw = f"{r['bw_frac']:5.0%} of copy bw" if r["bw_frac"] is not None else ""
        lines.append(f"append {r['kernel']:34s} {r['us']:9.1f} us  {bw}")
    if results.get("groups"):
        gs = results["groups"]
        lines += ["", f"the CUDA kernel (auto variant) against the KIVI group at B={gs['B']}, T={gs['T']} (fp16 SDPA "
                  f"{gs['sdpa_us']:.1f} us, graph {gs['sdpa_graph_us']:.1f}); floor x = fp16 bytes / bytes read",
                  f"{'group':>5} {'bits':>4} {'variant':>9} {'bits/val':>8} | {'us':>7} {'x':>5} {'bw':>5} | "
                  f"{'graph':>7} {'x':>5} | {'floor x':>7} | {'err':>7}"]
        for r in gs["rows"]:
            lines.append(f"{r['group']:>5} {r['bits']:>4} {r['variant']:>9} {r['bits_per_value']:8.3f} | "
                         f"{r['us']:7.1f} {r['speedup']:5.2f} {r['bw_frac']:5.0%} | {r['graph_us']:7.1f} "
                         f"{r['graph_speedup']:5.2f} | {r['floor_speedup']:7.2f} | {r['relerr_vs_reference']:7.1e}")
    goal = next((r for r in results["grid"] if r["B"] == 8 and r["T"] == 32768), None)
    for kind in ("kivi", "cuda"):
        if not goal or f"{kind}-int4_speedup" not in goal or f"{kind}-int2_speedup" not in goal:
            continue
        lines += ["", f"goals at B=8, T=32k ({'Triton' if kind == 'kivi' else 'CUDA C++'} kernel): "
                  f"int4 {goal[kind + '-int4_speedup']:.2f}x (goal 3.2x), int2 {goal[kind + '-int2_speedup']:.2f}x "
                  f"(goal 5x), bandwidth int4 {goal[kind + '-int4_bw']:.0%} / int2 {goal[kind + '-int2_bw']:.0%} "
                  "(goal 85%)"]
        if goal.get(f"{kind}-int4_graph_speedup") and goal.get(f"{kind}-int2_graph_speedup"):
            lines.append(f"  from CUDA graphs: int4 {goal[kind + '-int4_graph_speedup']:.2f}x, int2 "
                         f"{goal[kind + '-int2_graph_speedup']:.2f}x, bandwidth int4 "
                         f"{goal[kind + '-int4_graph_bw']:.0%} / int2 {goal[kind + '-int2_graph_bw']:.0%}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results", help="folder for decode_attention_<device>.txt/json")
    ap.add_argument("--sweep", action="store_true", help="try a few tunings at B=8, T=32k first; the grid uses the best")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    ap.add_argument("--no-append", action="store_true", help="skip the quantize-on-append timings")
    ap.add_argument("--flush", choices=("read", "zero"), default="read",
                    help="evict L2 before each timed call by reading 256 MB (default) or by do_bench's zeroing")
    ap.add_argument("--cuda-sweep", action="store_true",
                    help="time the CUDA kernel's variants and split counts at B=8, T=32k")
    ap.add_argument("--cuda-variants", default="registers,staged,folded", help="variants for --cuda-sweep")
    ap.add_argument("--cuda-splits", default="auto,4,6,8,12",
                    help="CTAs along the sequence for --cuda-sweep ('auto': the kernel's plan)")
    ap.add_argument("--cuda-sweep-only", action="store_true", help="stop after --cuda-sweep")
    ap.add_argument("--groups", default="32,64,128",
                    help="KIVI groups for the CUDA kernel at B=8, T=32k ('' skips); the grid uses group 32")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode_attention: no CUDA device; nothing to time (tests/test_kernels.py checks the kernels)")
        return 0
    import triton

    FLUSH["mode"] = args.flush
    name = torch.cuda.get_device_name()
    results = dict(device=name, torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                   started=time.strftime("%Y-%m-%d %H:%M:%S"), sweep=[], grid=[], group=GROUP, residual=RESIDUAL,
                   flush=args.flush)
    copy_bw = copy_bandwidth()
    results["copy_bw"] = copy_bw
    log(f"{name}: copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write)")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"decode_attention_{device_tag(name)}")

    def save():  # after every stage, so that a run cut short still leaves its numbers
        with open(stem + ".json", "w") as f:
            json.dump(results, f, indent=1)

    if args.cuda_sweep:
        splits_list = [None if x == "auto" else int(x) for x in args.cuda_splits.split(",")]
        sweep_cuda(results, copy_bw, tuple(args.cuda_variants.split(",")), splits_list)
        save()
        if args.cuda_sweep_only:
            return 0
    if args.groups:
        group_sweep(results, copy_bw, [int(g) for g in args.groups.split(",")])
        save()
    tunes = sweep(results, copy_bw) if args.sweep else {}
    results["tunes"] = tunes
    log(f"tuning used: {tunes or 'defaults'}")
    save()
    if not args.no_append:
        append_bench(results, copy_bw)
        save()
    main_grid(results, copy_bw, tunes, [int(b) for b in args.batches.split(",")],
              [int(t) for t in args.lengths.split(",")], save)
    text = table(results)
    save()
    with open(stem + ".txt", "w") as f:
        f.write(text + "\n")
    log("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

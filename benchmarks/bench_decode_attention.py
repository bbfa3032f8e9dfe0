"""Decode attention from quantized KV caches vs fp16 SDPA and FlashInfer, Llama-3-8B attention geometry, one GPU.

At each (B, T) point (``--points 8:32768,1:32768``, or the product of ``--batches`` and ``--lengths``): fp16 SDPA
decode (the baseline), the fused kvlab kernels (KIVI int4 / int2 in Triton and in CUDA C++, llama.cpp q4_0 /
q8_0 in Triton), FlashInfer's batch decode over a paged fp16 and fp8 cache when flashinfer is importable (skipped
with the reason otherwise), and with ``--naive`` the pure-torch unpack + dequantize + SDPA path. For each: the
median time and its 10th-90th percentile spread, the speedup over SDPA of the same run, the bandwidth reached on
the bytes it reads as a fraction of a device-to-device copy measured in the same run, the byte floor (SDPA's
bytes over its bytes: the speedup if both ran at the same bandwidth) and the fraction of that floor reached, and
its error against the fp32 attention over the cache it holds. Then the KIVI group sweep of the CUDA kernel and
the quantize-on-append bandwidth.

Timing (benchmarks/_harness.py): CUDA events, L2 evicted before every call by reading a 256 MB buffer; each
call is timed from the host's side, so Python and launch overhead count when they outlast the flush. The
``graph`` columns replay the same call captured in a CUDA graph (GPU time only, L2 not flushed between replays).
Usage: ``python benchmarks/bench_decode_attention.py [--out DIR] [--points B:T,...] [--kernels a,b] [--sweep]``.
Without CUDA it says so and exits 0 (the kernels' correctness runs in tests/kernels/).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402  (also puts the repository root on sys.path)
import torch  # noqa: E402

from kvlab.kernels import layout  # noqa: E402

HQ, HKV, D = 32, 8, 128  # Llama-3-8B: 32 query heads, 8 kv heads, head_dim 128
GROUP, RESIDUAL = 32, 128  # KIVI defaults (paper: group 32, residual 128)
BATCHES = (1, 8, 32)
KERNELS = ("kivi-int4", "kivi-int2", "cuda-int4", "cuda-int2", "q4_0", "q8_0", "fi-fp16", "fi-fp8")
LENGTHS = (4096, 32768, 131072)
FI_PAGE = 16  # FlashInfer's page size (tokens)

FLUSH, log, device_tag, flush_l2 = H.FLUSH, H.log, H.device_tag, H.flush_l2
bench, bench_stats, bench_graph, copy_bandwidth, rel_err = H.bench, H.bench_stats, H.bench_graph, H.copy_bandwidth, \
    H.rel_err


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
    """Quantize fp16 k, v (B, H, T, D) into a KIVI cache (:mod:`kvlab.kernels.layout`) with the pack kernels
    (L = T for every sequence); a dict of the eight buffers."""
    import kvlab.kernels as K

    B, H, T, _ = k.shape
    nk, nv = layout.kivi_counts(T, RESIDUAL)
    c = layout.kivi_empty(B, H, D, bits=bits, group=group, residual=RESIDUAL, cap_k=T, device="cuda")._asdict()
    chunk = 8192  # append in chunks: the inputs are slices of k and v, made contiguous a chunk at a time
    for t0 in range(0, nk, chunk):
        t1 = min(nk, t0 + chunk)
        K.kivi_pack_k(k[:, :, t0:t1].contiguous(), c["k_codes"], c["k_scale"], c["k_min"], t0, bits=bits,
                      group=group)
    for t0 in range(0, nv, chunk):
        t1 = min(nv, t0 + chunk)
        K.kivi_pack_v(v[:, :, t0:t1].contiguous(), c["v_codes"], c["v_scale"], c["v_min"], t0, bits=bits,
                      group=group)
    c["k_fp16"].zero_()
    c["v_fp16"].zero_()
    c["k_fp16"][:, :, : T - nk] = k[:, :, nk:]
    c["v_fp16"][:, :, : T - nv] = v[:, :, nv:]
    return c


def kivi_args(c) -> list:
    """The eight buffers of ``c`` in the kernels' argument order."""
    return [c[n] for n in layout.KIVI_BUFFERS]


def kivi_bytes(B, T, bits, nq=1, group=GROUP):
    """Bytes one decode call reads and writes: the stored cache (codes, scales and minima, windows), Q and the output."""
    cache = sum(layout.kivi_bytes(B, HKV, D, T, bits=bits, group=group, residual=RESIDUAL).values())
    return cache + 2 * B * HQ * nq * D * 2


def ggml_cache(k, v, fmt):
    import kvlab.kernels as K

    B, H, T, _ = k.shape
    out = {}
    for name, x in (("k", k), ("v", v)):
        shapes = layout.ggml_shapes(fmt, B, H, T, D)
        codes = torch.empty(shapes["codes"][0], dtype=shapes["codes"][1], device="cuda")
        d = torch.empty(shapes["d"][0], dtype=torch.float16, device="cuda")
        for t0 in range(0, T, 8192):
            K.ggml_pack(x[:, :, t0 : t0 + 8192].contiguous(), codes, d, t0, fmt=fmt)
        out[name] = (codes, d)
    return out


def ggml_bytes(B, T, fmt):
    return sum(layout.ggml_bytes(fmt, fmt, B, HKV, D, T).values()) + 2 * B * HQ * D * 2


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

    return K.kivi_decode_attention(q, *kivi_args(c), lengths, bits=bits, group=group, residual=RESIDUAL, max_len=T,
                                   backend=backend, **tune)


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
        ref = K.kivi_decode_attention_ref(q.float(), *kivi_args(c), lengths, bits=bits, group=GROUP,
                                          residual=RESIDUAL)
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


def tune_sweep(results, copy_bw, tunes, groups=(32, 128), splits_list=(None,)):
    """The folded CUDA kernel's experimental tunings (``kivi_cuda.TUNES``: CTAs per SM of the register budget,
    cp.async stages, and the loads-only / compute-only modes, which compute no attention) at B=8, T=32k beside
    the automatic variant and fp16 SDPA of the same run: us (eager, L2 evicted), graph us, the fraction of the
    byte floor, and each attention-computing tuning's error against the fp32 reference."""
    import kvlab.kernels as K
    from kvlab.kernels import kivi_cuda
    from kvlab.kernels.kivi_attention import LOG2E

    B, T = 8, 32768
    k, v, q, lengths = random_inputs(B, T, 5)
    sdpa_us = bench(functools.partial(sdpa, q, k, v))
    sdpa_bytes = 2 * B * HKV * T * D * 2 + 2 * B * HQ * D * 2
    log(f"tunes: fp16 SDPA {sdpa_us:.1f} us")
    rows = []
    for group in groups:
        for bits in (4, 2):
            c = kivi_cache(k, v, bits, group)
            ref = K.kivi_decode_attention_ref(q.float(), *kivi_args(c), lengths, bits=bits, group=group,
                                              residual=RESIDUAL)
            nbytes = kivi_bytes(B, T, bits, group=group)
            floor_x = sdpa_bytes / nbytes
            auto = functools.partial(fused_kivi, q, c, lengths, T, bits, backend="cuda", group=group)
            cands = [("auto", None, auto)]
            if group == GROUP:
                cands.append(("registers", None, functools.partial(auto, cuda_variant="registers")))
            for name in tunes:
                if bits != 2 and name in kivi_cuda.INT2_ONLY_TUNES:
                    continue
                for splits in splits_list:
                    def run(name=name, splits=splits, c=c, bits=bits, group=group):
                        out = torch.empty_like(q)
                        return kivi_cuda.kivi_decode_attention_cuda(
                            q, *kivi_args(c), lengths, bits=bits, group=group, residual=RESIDUAL,
                            qk_scale=D**-0.5 * LOG2E, out=out, max_len=T, num_splits=splits, variant="folded",
                            chosen=True, tune=name)
                    cands.append((f"folded:{name}" + (f" splits={splits}" if splits else ""), name, run))
            for label, name, run in cands:
                try:
                    out = run()
                    t, tg = bench(run), bench_graph(run)
                except Exception as e:  # an instance that does not exist or fails to launch: say so, go on
                    log(f"tune group {group} int{bits} {label}: failed: {type(e).__name__}: {str(e)[:200]}")
                    continue
                err = rel_err(out, ref) if name is None or kivi_cuda.COMPUTES_ATTENTION[name] else None
                row = dict(group=group, bits=bits, tune=label, us=t, graph_us=tg, speedup=sdpa_us / t,
                           floor_x=floor_x, of_floor=sdpa_us / t / floor_x, bw_frac=nbytes / (t * 1e-6) / copy_bw,
                           relerr_vs_reference=err)
                rows.append(row)
                log(f"tune group {group:3d} int{bits} {label:24s}: {t:7.1f} us (graph {tg:7.1f}) {sdpa_us / t:5.2f}x "
                    f"SDPA, {row['of_floor']:5.1%} of floor {floor_x:.2f}x, {row['bw_frac']:5.1%} of copy bw, err "
                    + (f"{err:.2e}" if err is not None else "- (no attention)"))
            del c
    results["tunes_sweep"] = dict(B=B, T=T, sdpa_us=sdpa_us, rows=rows)


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
    sdpa_bytes = 2 * B * HKV * T * D * 2 + 2 * B * HQ * D * 2  # K, V, Q and the output
    rows = []
    for group in groups:
        for bits in (4, 2):
            c = kivi_cache(k, v, bits, group)
            ref = K.kivi_decode_attention_ref(q.float(), *kivi_args(c), lengths, bits=bits, group=group,
                                              residual=RESIDUAL)
            run = functools.partial(fused_kivi, q, c, lengths, T, bits, backend="cuda", group=group)
            err = rel_err(run(), ref)
            st, tg = bench_stats(run), bench_graph(run)
            t = st["median"]
            variant = K.kivi_cuda.choose_variant(q, c["k_codes"], c["k_scale"], c["k_min"], c["v_codes"],
                                                 c["v_scale"], c["v_min"], bits, group)
            nbytes = kivi_bytes(B, T, bits, group=group)
            rows.append(dict(group=group, bits=bits, variant=variant, bits_per_value=bits_per_value(bits, group),
                             us=t, p10=st["p10"], p90=st["p90"], graph_us=tg, speedup=sdpa_us / t,
                             graph_speedup=sdpa_graph / tg if tg else None, bytes=nbytes,
                             bw_frac=nbytes / (t * 1e-6) / copy_bw, floor_speedup=sdpa_bytes / nbytes,
                             relerr_vs_reference=err))
            rows[-1]["of_floor"] = rows[-1]["speedup"] / rows[-1]["floor_speedup"]
            log(f"group {group:3d} int{bits} ({variant}, {bits_per_value(bits, group):.3f} bits/value): {t:7.1f} us "
                f"(graph {tg:7.1f}), {sdpa_us / t:4.2f}x SDPA {sdpa_us:.1f}, {rows[-1]['bw_frac']:5.1%} of copy bw, "
                f"{rows[-1]['of_floor']:5.1%} of its floor {rows[-1]['floor_speedup']:.2f}x, err vs fp32 ref {err:.2e}")
            del c
    results["groups"] = dict(B=B, T=T, sdpa_us=sdpa_us, sdpa_graph_us=sdpa_graph, rows=rows)


# ---- FlashInfer (the peer a user would pick instead), when it is importable ------------------------------

FI = {}  # "mod": the flashinfer module, or "error": why it is not used in this run


def flashinfer():
    """The flashinfer module, or None (the reason logged once and kept in ``FI["error"]``)."""
    if "mod" not in FI and "error" not in FI:
        try:
            import flashinfer as fi

            FI["mod"] = fi
            log(f"FlashInfer {getattr(fi, '__version__', '?')} from {os.path.dirname(fi.__file__)}")
        except Exception as e:  # not installed, or its import fails here: the other contenders still run
            FI["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            log(f"FlashInfer not used: {FI['error']}")
    return FI.get("mod")


def flashinfer_decode(q, k, v, kv_dtype):
    """FlashInfer's batch decode over a paged copy of fp16 k, v (B, H, T, D) stored as ``kv_dtype`` (float16 or
    float8_e4m3fn, unit scales): its ``BatchDecodeWithPagedKVCacheWrapper`` (NHD, pages of FI_PAGE tokens,
    tensor-core path), planned once. Returns (a call taking no arguments -> (B, HQ, 1, D), bytes it reads and
    writes, the paged cache), or None when FlashInfer is not importable or cannot build its kernel here."""
    fi = flashinfer()
    if fi is None:
        return None
    B, Hk, T, _ = k.shape
    pages = T // FI_PAGE
    kv = torch.empty(B * pages, 2, FI_PAGE, Hk, D, dtype=kv_dtype, device="cuda")  # (pages, K/V, page, H, D)
    for b in range(B):  # one sequence at a time: no second full-size fp16 copy
        for i, x in enumerate((k, v)):
            kv[b * pages : (b + 1) * pages, i] = x[b].reshape(Hk, pages, FI_PAGE, D).permute(1, 2, 0, 3).to(kv_dtype)
    indptr = torch.arange(0, B + 1, dtype=torch.int32, device="cuda") * pages
    indices = torch.arange(B * pages, dtype=torch.int32, device="cuda")
    last = torch.full((B,), FI_PAGE, dtype=torch.int32, device="cuda")
    try:
        if "workspace" not in FI:
            FI["workspace"] = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        w = fi.BatchDecodeWithPagedKVCacheWrapper(FI["workspace"], "NHD", use_tensor_cores=True)
        w.plan(indptr, indices, last, HQ, Hk, D, FI_PAGE, q_data_type=torch.float16, kv_data_type=kv_dtype)
        qf = q[:, :, 0].contiguous()  # (B, HQ, D)

        def run():
            return w.run(qf, kv).unsqueeze(2)

        run()
    except Exception as e:  # its JIT build or plan failing here: say so, keep the rest of the run
        FI["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        FI.pop("mod", None)
        log(f"FlashInfer failed ({kv_dtype}): {FI['error']}; not used for the rest of the run")
        return None
    nbytes = kv.numel() * kv.element_size() + 2 * B * HQ * D * 2
    return run, nbytes, kv


def attention_fp32(q, k, v):
    """fp32 attention of q (B, HQ, 1, D) over k, v (B, H, T, D) (any float dtype), one sequence at a time."""
    import kvlab.kernels as K

    return torch.stack([K.attention_ref(q[b], k[b], v[b], D**-0.5) for b in range(q.shape[0])])


def grid_point(results, copy_bw, tunes, B, T, kernels=KERNELS, naive=False):
    """Every contender in ``kernels`` at one (B, T), beside fp16 SDPA; the fp16 K and V are dropped once the
    caches are built. Per contender: median (and 10th / 90th percentile) us, speedup over SDPA, bytes it reads
    over the time as a fraction of the copy bandwidth (``bw``), the byte floor's speedup (SDPA's bytes over its
    bytes, ``floor_x``) and the fraction of it reached (``of_floor`` = speedup / floor_x); its error against the
    fp32 attention over the cache it holds (``relerr_vs_ref``) and over the original fp16 K, V (``relerr_vs_fp16``)."""
    import kvlab.kernels as K

    row = dict(B=B, T=T)
    k, v, q, lengths = random_inputs(B, T, B * 1000 + T)
    sdpa_bytes = 2 * B * HKV * T * D * 2 + 2 * B * HQ * D * 2
    ref16 = attention_fp32(q, k, v)  # the fp32 reference of the fp16 cache
    st = bench_stats(functools.partial(sdpa, q, k, v))
    row.update(sdpa_us=st["median"], sdpa_p10=st["p10"], sdpa_p90=st["p90"], sdpa_bytes=sdpa_bytes,
               sdpa_bw=sdpa_bytes / (st["median"] * 1e-6) / copy_bw,
               sdpa_relerr_vs_ref=rel_err(sdpa(q, k, v), ref16))
    row["sdpa_graph_us"] = bench_graph(functools.partial(sdpa, q, k, v))
    runs = {}  # name -> (call, bytes read, reference of the cache it holds)
    for bits in (4, 2):
        if f"kivi-int{bits}" not in kernels and f"cuda-int{bits}" not in kernels:
            continue
        c = kivi_cache(k, v, bits)
        ref = K.kivi_decode_attention_ref(q.float(), *kivi_args(c), lengths, bits=bits, group=GROUP,
                                          residual=RESIDUAL)
        runs[f"kivi-int{bits}"] = (functools.partial(fused_kivi, q, c, lengths, T, bits,
                                                     **tunes.get(f"kivi-int{bits}", {})), kivi_bytes(B, T, bits), ref)
        runs[f"cuda-int{bits}"] = (functools.partial(fused_kivi, q, c, lengths, T, bits, backend="cuda"),
                                   kivi_bytes(B, T, bits), ref)
        if naive:
            runs[f"naive-int{bits}"] = (functools.partial(naive_kivi, q, c, T, bits), kivi_bytes(B, T, bits), ref)
    for fmt in ("q4_0", "q8_0"):
        if fmt in kernels:
            g = ggml_cache(k, v, fmt)
            ref = attention_fp32(q, K.ggml_dequantize_ref(*g["k"], fmt), K.ggml_dequantize_ref(*g["v"], fmt))
            runs[fmt] = (functools.partial(fused_ggml, q, g, lengths, T, fmt, **tunes.get(fmt, tunes.get("q4_0", {}))),
                         ggml_bytes(B, T, fmt), ref)
    for name, dtype in (("fi-fp16", torch.float16), ("fi-fp8", torch.float8_e4m3fn)):
        if name in kernels:
            try:
                got = flashinfer_decode(q, k, v, dtype)
            except Exception:  # building its paged cache failed: log it, run the rest
                log(f"{name} at B={B} T={T} failed:\n{traceback.format_exc()}")
                got = None
            if got is not None:
                fn, nbytes, kv = got
                kr = torch.stack([kv[:, 0].view(B, -1, FI_PAGE, HKV, D)[b].flatten(0, 1).transpose(0, 1)
                                  for b in range(B)]) if dtype != torch.float16 else k
                vr = torch.stack([kv[:, 1].view(B, -1, FI_PAGE, HKV, D)[b].flatten(0, 1).transpose(0, 1)
                                  for b in range(B)]) if dtype != torch.float16 else v
                runs[name] = (fn, nbytes, attention_fp32(q, kr, vr) if dtype != torch.float16 else ref16)
                kr = vr = None
    k = v = None  # free the fp16 cache before the naive path materialises its own
    torch.cuda.empty_cache()
    for name, (fn, nbytes, ref) in runs.items():
        if name not in kernels and not name.startswith("naive"):
            continue
        try:
            out = fn()
        except ValueError as e:  # the CUDA kernel could not be built here: say so, time the rest
            log(f"{name} at B={B} T={T}: {e}")
            continue
        except torch.OutOfMemoryError:
            log(f"{name} at B={B} T={T}: out of memory")
            torch.cuda.empty_cache()
            continue
        except Exception:  # any other failure of one contender: log it, time the rest
            log(f"{name} at B={B} T={T} failed:\n{traceback.format_exc()}")
            continue
        st = bench_stats(fn, **(dict(warmup=5, rep=50) if name.startswith("naive") else {}))
        t = st["median"]
        row.update({f"{name}_us": t, f"{name}_p10": st["p10"], f"{name}_p90": st["p90"], f"{name}_bytes": nbytes,
                    f"{name}_speedup": row["sdpa_us"] / t, f"{name}_bw": nbytes / (t * 1e-6) / copy_bw,
                    f"{name}_floor_x": sdpa_bytes / nbytes,
                    f"{name}_relerr_vs_ref": rel_err(out, ref), f"{name}_relerr_vs_fp16": rel_err(out, ref16)})
        row[f"{name}_of_floor"] = row[f"{name}_speedup"] / row[f"{name}_floor_x"]
        if name.startswith("naive"):
            continue
        tg = bench_graph(fn)
        row[f"{name}_graph_us"] = tg
        if tg and row["sdpa_graph_us"]:
            row[f"{name}_graph_speedup"] = row["sdpa_graph_us"] / tg
            row[f"{name}_graph_bw"] = nbytes / (tg * 1e-6) / copy_bw
        out = None
    return row


def main_grid(results, copy_bw, tunes, points, save, kernels=KERNELS, naive=False):
    for B, T in points:
        fp16_bytes = 2 * B * HKV * T * D * 2
        if 3.2 * fp16_bytes > torch.cuda.mem_get_info()[0]:
            log(f"skip B={B} T={T}: {fp16_bytes / 2**30:.1f} GiB of fp16 KV does not fit with the caches")
            continue
        try:
            row = grid_point(results, copy_bw, tunes, B, T, kernels, naive)
        except Exception:  # one point failing: log it, run the others
            log(f"B={B} T={T} failed:\n{traceback.format_exc()}")
            torch.cuda.empty_cache()
            continue
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
        c = layout.kivi_empty(B, HKV, D, bits=bits, group=GROUP, residual=RESIDUAL, cap_k=T, device="cuda")
        kbuf, vbuf = (c.k_codes, c.k_scale, c.k_min), (c.v_codes, c.v_scale, c.v_min)
        moved = x.numel() * 2 + sum(t.numel() * t.element_size() for t in kbuf)
        pk = functools.partial(K.kivi_pack_k, bits=bits, group=GROUP)
        pv = functools.partial(K.kivi_pack_v, bits=bits, group=GROUP)
        row(f"kivi_pack_k int{bits}", T, functools.partial(pk, x, *kbuf, 0), moved)
        row(f"kivi_pack_v int{bits}", T, functools.partial(pv, x, *vbuf, 0), moved)
        # decode steps: one V token per sequence; one K residual chunk (R tokens) per sequence
        row(f"kivi_pack_v int{bits} (1 token)", 1, functools.partial(pv, x1, *vbuf, 100), None)
        row(f"kivi_pack_k int{bits} ({RESIDUAL} tokens)", RESIDUAL, functools.partial(pk, xr, *kbuf, 0), None)
    for fmt in ("q4_0", "q8_0"):
        shapes = layout.ggml_shapes(fmt, B, HKV, T, D)
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
             f"residual={RESIDUAL}; one query token; times are medians in us (L2 evicted before each call)",
             "x = fp16 SDPA time / time; bw = bytes read (cache + Q + output) / time / copy bandwidth; floor = fp16 "
             "SDPA's bytes / the bytes read (the speedup if both ran at the same bandwidth); of floor = x / floor",
             "kivi-intN: the Triton kernel; cuda-intN: the CUDA C++ kernel (kvlab/kernels/csrc), same cache; "
             f"fi-fp16 / fi-fp8: FlashInfer batch decode, paged ({FI_PAGE}-token pages), tensor cores, fp16 / "
             "fp8 e4m3 KV" + ("" if not results.get("flashinfer_error") else
                              f" (not run: {results['flashinfer_error']})"),
             ""]
    names = [n for n in KERNELS if any(n + "_us" in r for r in results["grid"])]
    hdr = (f"{'B':>3} {'T':>7} | {'sdpa':>8} {'bw':>5} | "
           + " | ".join(f"{n:>9} {'x':>5} {'floor':>5} {'of fl':>5}" for n in names))
    lines += [hdr, "-" * len(hdr)]
    for r in results["grid"]:
        cells = [f"{r['sdpa_us']:8.1f} {r['sdpa_bw']:5.0%}"]
        for n in names:
            if n + "_us" in r:
                cells.append(f"{r[n + '_us']:9.1f} {r[n + '_speedup']:5.2f} {r[n + '_floor_x']:5.2f} "
                             f"{r[n + '_of_floor']:5.0%}")
            else:
                cells.append(f"{'-':>9} {'-':>5} {'-':>5} {'-':>5}")
        lines.append(f"{r['B']:>3} {r['T']:>7} | " + " | ".join(cells))
    lines += ["", "spread (10th-90th percentile us) and error against the fp32 attention over the cache each holds:"]
    for r in results["grid"]:
        cells = [f"sdpa {r['sdpa_p10']:.1f}-{r['sdpa_p90']:.1f} ({r['sdpa_relerr_vs_ref']:.1e})"]
        cells += [f"{n} {r[n + '_p10']:.1f}-{r[n + '_p90']:.1f} ({r[n + '_relerr_vs_ref']:.1e})"
                  for n in names if n + "_us" in r]
        lines.append(f"{r['B']:>3} {r['T']:>7} | " + "; ".join(cells))
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
    naive = [r for r in results["grid"] if "naive-int4_us" in r]
    if naive:
        lines += ["", "naive (unpack + dequantize + SDPA in torch): "
                  + "; ".join(f"B={r['B']} T={r['T']} int4 {r['naive-int4_us']:.1f} us" for r in naive)]
    lines.append("")
    for r in results.get("append", []):
        bw = f"{r['bw_frac']:5.0%} of copy bw" if r["bw_frac"] is not None else ""
        lines.append(f"append {r['kernel']:34s} {r['us']:9.1f} us  {bw}")
    if results.get("groups"):
        gs = results["groups"]
        lines += ["", f"the CUDA kernel (auto variant) against the KIVI group at B={gs['B']}, T={gs['T']} (fp16 SDPA "
                  f"{gs['sdpa_us']:.1f} us, graph {gs['sdpa_graph_us']:.1f}); floor x = fp16 bytes / bytes read",
                  f"{'group':>5} {'bits':>4} {'variant':>9} {'bits/val':>8} | {'us':>7} {'x':>5} {'bw':>5} | "
                  f"{'graph':>7} {'x':>5} | {'floor x':>7} {'of fl':>5} | {'err':>7}"]
        for r in gs["rows"]:
            lines.append(f"{r['group']:>5} {r['bits']:>4} {r['variant']:>9} {r['bits_per_value']:8.3f} | "
                         f"{r['us']:7.1f} {r['speedup']:5.2f} {r['bw_frac']:5.0%} | {r['graph_us']:7.1f} "
                         f"{r['graph_speedup']:5.2f} | {r['floor_speedup']:7.2f} "
                         f"{r['speedup'] / r['floor_speedup']:5.0%} | {r['relerr_vs_reference']:7.1e}")
    goal = next((r for r in results["grid"] if r["B"] == 8 and r["T"] == 32768), None)
    for kind in ("kivi", "cuda"):
        if not goal or f"{kind}-int4_speedup" not in goal or f"{kind}-int2_speedup" not in goal:
            continue
        lines += ["", f"goals at B=8, T=32k ({'Triton' if kind == 'kivi' else 'CUDA C++'} kernel): "
                  f"int4 {goal[kind + '-int4_speedup']:.2f}x SDPA, {goal[kind + '-int4_of_floor']:.0%} of its floor "
                  f"{goal[kind + '-int4_floor_x']:.2f}x (goal 90%); int2 {goal[kind + '-int2_speedup']:.2f}x, "
                  f"{goal[kind + '-int2_of_floor']:.0%} of {goal[kind + '-int2_floor_x']:.2f}x (goal 90%)"]
        if goal.get("fi-fp8_us"):
            lines.append(f"  int4 against FlashInfer fp8: {goal['fi-fp8_us'] / goal[kind + '-int4_us']:.2f}x (goal 2x)")
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
    ap.add_argument("--cuda-sweep-only", action="store_true", help="stop after --cuda-sweep (and --cuda-tunes)")
    ap.add_argument("--cuda-tunes", default="",
                    help="experimental tunings of the folded CUDA kernel to time at B=8, T=32k (names of "
                         "kvlab.kernels.kivi_cuda.TUNES, comma-separated; 'all': every one)")
    ap.add_argument("--cuda-tune-splits", default="auto", help="CTAs along the sequence for --cuda-tunes")
    ap.add_argument("--points", default=None,
                    help="(B, T) points as B:T,B:T (e.g. 8:32768,1:32768); default the product of --batches, --lengths")
    ap.add_argument("--kernels", default=",".join(KERNELS), help=f"contenders in the grid, of {','.join(KERNELS)}")
    ap.add_argument("--naive", action="store_true", help="also time the pure-torch unpack + SDPA path in the grid")
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

    if args.cuda_tunes:
        from kvlab.kernels import kivi_cuda

        names = list(kivi_cuda.TUNES) if args.cuda_tunes == "all" else args.cuda_tunes.split(",")
        tsplits = [None if x == "auto" else int(x) for x in args.cuda_tune_splits.split(",")]
        tune_sweep(results, copy_bw, names, splits_list=tsplits)
        save()
    if args.cuda_sweep:
        splits_list = [None if x == "auto" else int(x) for x in args.cuda_splits.split(",")]
        sweep_cuda(results, copy_bw, tuple(args.cuda_variants.split(",")), splits_list)
        save()
    if args.cuda_sweep_only and (args.cuda_sweep or args.cuda_tunes):
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
    if args.points:
        points = [tuple(int(x) for x in p.split(":")) for p in args.points.split(",")]
    else:
        points = [(b, t) for b in map(int, args.batches.split(",")) for t in map(int, args.lengths.split(","))]
    kernels = tuple(args.kernels.split(","))
    bad = [k for k in kernels if k not in KERNELS]
    if bad:
        ap.error(f"--kernels {','.join(bad)}: not allowed; allowed: {','.join(KERNELS)}")
    main_grid(results, copy_bw, tunes, points, save, kernels, args.naive)
    results["flashinfer_error"] = FI.get("error")
    text = table(results)
    save()
    with open(stem + ".txt", "w") as f:
        f.write(text + "\n")
    log("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Greedy decoding through DynamicCache, CompressedCache (unfused) and FusedCache (kvlab.fused_cache), on CUDA.

A randomly initialised Llama with Llama-3-8B's layer geometry (hidden 4096, 32 query heads, 8 kv heads,
head_dim 128, MLP 14336) but few layers (``--layers``, 4) and a small vocabulary, in fp16. For each prompt
length T (``--lengths``), a batch of ``--batch`` random prompts is prefilled, ``--warmup`` decode steps run
untimed (Triton compiles, split plans), then ``--steps`` greedy steps are timed with
``torch.cuda.synchronize()`` around them. Every cache runs in the same process, one after the other, and
its figures are printed with their ratio to DynamicCache's of the same T:

- ``ms/step`` and ``tok/s`` (batch x steps / time) of the decode steps; ``prefill s`` (not the focus);
- ``cache MiB``: bytes held after the last step (DynamicCache: its keys and values; the others: their
  ``nbytes()["total"]``: codes, scales and minima, fp16 windows), and ``room MiB``, the allocated room
  beyond them (``nbytes()["reserved"]``);
- ``eff GB/s`` and ``of copy``: (weights + cache bytes) per step over the step time, and that as a fraction
  of the device-to-device copy bandwidth measured in the same run: how close a step is to only reading
  its weights and its cache once (the unfused cache moves far more than that: it rebuilds K/V each step);
- ``same``: generated tokens equal to the unfused CompressedCache's of the same scheme (random weights:
  near-ties make a few differ; the fp16 arithmetic of the fused kernel and of SDPA differ).

Then, with ``--graphs`` (default on), the same greedy steps with the host out of the way: for DynamicCache,
StaticCache and each FusedCache, after the prefill and the untimed eager steps, each of the ``--steps`` decode
steps is captured into its own CUDA graph (one memory pool, captured in the order they replay: a step's host
logic, e.g. where the cache appends, is baked into its graph, so a graph is one step of this decode, not a
reusable loop), then the graphs are replayed back to back and timed with CUDA events, step by step (median,
10th and 90th percentile) and in total. ``same`` there: tokens equal to that cache's own eager run (the graphs
replay the same kernels, so every token must match; a mismatch means the capture is wrong).

    python benchmarks/bench_fused_cache.py [--batch 8] [--lengths 4096 32768] [--steps 64] [--out FILE]

Without CUDA it prints that it needs one and exits 0 (``make bench`` runs every benchmark).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402  (also puts the repository root on sys.path)
import torch  # noqa: E402


def cache_bytes(cache) -> tuple[int, int]:
    """(bytes of K/V held, allocated room beyond them)."""
    if hasattr(cache, "nbytes"):
        nb = cache.nbytes()
        return nb["total"], nb["reserved"]
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)), 0


def run(model, kw: str, ids: torch.Tensor, cache, steps: int, warmup: int) -> dict:
    """Prefill ``ids`` (B, T), ``warmup`` untimed and ``steps`` timed greedy decode steps."""
    with torch.no_grad():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tok = model(input_ids=ids, logits_to_keep=1, **{kw: cache}).logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        for _ in range(warmup):
            tok = model(input_ids=tok, logits_to_keep=1, **{kw: cache}).logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        stats0 = torch.cuda.memory_stats()
        t2 = time.perf_counter()
        out = []
        for _ in range(steps):
            tok = model(input_ids=tok, logits_to_keep=1, **{kw: cache}).logits[:, -1].argmax(-1, keepdim=True)
            out.append(tok)
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        stats1 = torch.cuda.memory_stats()
    held, room = cache_bytes(cache)
    # device allocations (cudaMalloc) and allocator retries (cudaFree of cached blocks) during the timed steps
    allocs = {k: stats1.get(k, 0) - stats0.get(k, 0) for k in ("num_device_alloc", "num_alloc_retries")}
    return {"prefill_s": t1 - t0, "step_ms": (t3 - t2) / steps * 1e3, "tok_s": ids.shape[0] * steps / (t3 - t2),
            "bytes": held, "reserved": room, "tokens": torch.cat(out, dim=1).cpu(), **allocs}


def run_graphs(model, kw: str, ids: torch.Tensor, cache, steps: int, warmup: int, per_step: bool = True) -> dict:
    """Prefill ``ids`` (B, T), run ``warmup`` untimed eager steps and capture each of the next ``steps`` greedy
    decode steps into its own CUDA graph (``kvlab.storage.fused.capture_decode_steps``), then replay them back
    to back, timed with CUDA events (module docstring)."""
    from kvlab.storage.fused import capture_decode_steps

    with torch.no_grad():
        tok = model(input_ids=ids, logits_to_keep=1, **{kw: cache}).logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    graphs, tokens = capture_decode_steps(model, kw, cache, tok, steps, warmup=warmup, per_step=per_step)
    torch.cuda.synchronize()
    capture_s = time.perf_counter() - t0
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    events[0].record()
    for i, g in enumerate(graphs):
        g.replay()
        events[i + 1].record()
    torch.cuda.synchronize()
    times = sorted(events[i].elapsed_time(events[i + 1]) / (1 if per_step else steps) for i in range(len(graphs)))
    total_ms = events[0].elapsed_time(events[len(graphs)])
    held, room = cache_bytes(cache)
    del graphs
    return {"step_ms": total_ms / steps, "step_median_ms": statistics.median(times),
            "step_p10_ms": times[len(times) // 10], "step_p90_ms": times[(9 * len(times)) // 10],
            "per_step_graphs": per_step,
            "tok_s": ids.shape[0] * steps / (total_ms / 1e3), "capture_s": capture_s, "bytes": held, "reserved": room,
            "tokens": tokens.cpu()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 32768])
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the decode steps replayed from CUDA graphs (DynamicCache, StaticCache, FusedCache)")
    p.add_argument("--graph-mode", choices=("per-step", "one"), default="per-step",
                   help="one CUDA graph per decode step (default), or all timed steps in one graph")
    p.add_argument("--caches", default=None,
                   help="comma-separated cache labels to run (e.g. 'DynamicCache,FusedCache kivi-4'); default all")
    p.add_argument("--unfused", action=argparse.BooleanOptionalAction, default=True,
                   help="include the unfused CompressedCache (slow at long prompts)")
    p.add_argument("--out", default=None, help="also write the table here (and the numbers to OUT.json)")
    p.add_argument("--cudnn-sdpa", action="store_true",
                   help="leave PyTorch's cuDNN SDPA backend on (off by default: it builds an execution plan for "
                        "every new KV length, ~40-60 ms each, so whichever cache first meets a length pays it)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fused_cache: needs a CUDA device (the fused kernels); skipped")
        return 0

    if not args.cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    import transformers
    import triton
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

    from kvlab.storage import FusedCache, use_fused_attention
    from kvlab.storage.cache import CompressedCache, cache_kwarg

    cfg = LlamaConfig(num_hidden_layers=args.layers, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, intermediate_size=14336, vocab_size=args.vocab,
                      max_position_embeddings=max(args.lengths) + 1024, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).half().eval()
    kw = cache_kwarg(model)
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    bw = _harness.copy_bandwidth()
    names = {"kivi-4": "kivi:bits=4", "kivi-2": "kivi:bits=2"}
    variants = [("DynamicCache", "sdpa", lambda T: DynamicCache()),
                ("StaticCache", "sdpa", lambda T: StaticCache(config=model.config,
                                                              max_cache_len=T + args.warmup + args.steps))]
    for label, spec in names.items():
        if args.unfused:
            variants.append((f"CompressedCache {label}", "sdpa",
                             lambda T, s=spec: CompressedCache(s, config=model.config)))
    for label, spec in names.items():
        variants.append((f"FusedCache {label}", "fused",
                         lambda T, s=spec: FusedCache(s, config=model.config, max_len=T + args.warmup + args.steps)))

    if args.caches:
        wanted = [c.strip() for c in args.caches.split(",")]
        bad = [c for c in wanted if c not in {v[0] for v in variants}]
        if bad:
            p.error(f"--caches {bad}: not allowed; allowed: {', '.join(v[0] for v in variants)}")
        variants = [v for v in variants if v[0] in wanted]

    def use(impl: str) -> None:
        if impl == "fused":
            use_fused_attention(model)
        else:
            model.set_attn_implementation(impl)

    gen = torch.Generator(device="cuda").manual_seed(1)
    failed = {}  # label -> error; a failing cache is reported, the others still run
    for label, impl, make in variants:  # compile every kernel once, out of the timed runs
        use(impl)
        try:
            run(model, kw, torch.randint(0, args.vocab, (2, 600), device="cuda", generator=gen), make(600), 2, 2)
        except Exception as e:
            failed[label] = f"{type(e).__name__}: {e}"
            print(f"{label} FAILED: {failed[label]}", flush=True)

    rows = []
    prompts = {}  # T -> the prompts (batch, T): the graph runs below decode the same ones
    for T in args.lengths:
        ids = prompts[T] = torch.randint(0, args.vocab, (args.batch, T), device="cuda", generator=gen)
        for label, impl, make in variants:
            if label in failed:
                continue
            use(impl)
            cache = make(T)
            try:
                r = run(model, kw, ids, cache, args.steps, args.warmup)
            except Exception as e:
                failed[label] = f"T={T}: {type(e).__name__}: {e}"
                print(f"{label} FAILED: {failed[label]}", flush=True)
                continue
            finally:
                del cache
                gc.collect()
                torch.cuda.empty_cache()
            rows.append({"T": T, "cache": label, **r})
            print(f"T={T} {label}: {r['step_ms']:.2f} ms/step, {r['num_device_alloc']} cudaMalloc and "
                  f"{r['num_alloc_retries']} allocator retries in the timed steps", flush=True)

    graph_rows = []
    if args.graphs:
        for T in args.lengths:
            ids = prompts[T]
            for label, impl, make in variants:
                if label.startswith("CompressedCache") or label in failed:
                    continue
                use(impl)
                cache = make(T)
                print(f"T={T} {label}: capturing {args.steps} steps into CUDA graphs ({args.graph_mode})", flush=True)
                try:
                    r = run_graphs(model, kw, ids, cache, args.steps, args.warmup, args.graph_mode == "per-step")
                except Exception as e:
                    failed[f"graphs {label} T={T}"] = f"{type(e).__name__}: {str(e)[:300]}"
                    print(f"graphs {label} T={T} FAILED: {failed[f'graphs {label} T={T}']}", flush=True)
                    continue
                finally:
                    del cache
                    gc.collect()
                    torch.cuda.empty_cache()
                graph_rows.append({"T": T, "cache": label, **r})
                print(f"T={T} {label} from graphs: {r['step_ms']:.2f} ms/step (median {r['step_median_ms']:.2f}, "
                      f"capture {r['capture_s']:.1f} s)", flush=True)

    dev = torch.cuda.get_device_name()
    lines = [f"bench_fused_cache on {dev}; torch {torch.__version__}, triton {triton.__version__}, "
             f"transformers {transformers.__version__}",
             f"model: random Llama, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} "
             f"q heads, {cfg.num_key_value_heads} kv heads, head_dim {cfg.head_dim}, MLP {cfg.intermediate_size}, "
             f"vocab {cfg.vocab_size}, fp16 ({weights / 2**30:.2f} GiB of weights); batch {args.batch}, "
             f"{args.warmup} untimed + {args.steps} timed greedy steps after the prompt",
             f"device-to-device copy bandwidth measured in this run: {bw / 1e9:.0f} GB/s; cuDNN SDPA backend "
             f"{'on' if args.cudnn_sdpa else 'off (flash / memory-efficient SDPA)'}",
             *(f"FAILED {k}: {v}" for k, v in failed.items()), ""]
    head = (f"{'T':>6} {'cache':<24} {'prefill s':>9} {'ms/step':>8} {'tok/s':>8} {'x Dyn':>6} {'cache MiB':>10} "
            f"{'x Dyn':>6} {'room MiB':>9} {'eff GB/s':>9} {'of copy':>7} {'same':>9}")
    lines += [head, "-" * len(head)]
    for T in args.lengths:
        group = {r["cache"]: r for r in rows if r["T"] == T}
        base = group.get("DynamicCache")
        if base is None:
            continue
        for r in group.values():
            unfused = group.get(r["cache"].replace("FusedCache", "CompressedCache"))
            same = "" if unfused is None or unfused is r else \
                f"{int((r['tokens'] == unfused['tokens']).sum())}/{r['tokens'].numel()}"
            eff = (weights + r["bytes"]) / (r["step_ms"] / 1e3)
            lines.append(f"{T:>6} {r['cache']:<24} {r['prefill_s']:>9.2f} {r['step_ms']:>8.2f} {r['tok_s']:>8.0f} "
                         f"{r['tok_s'] / base['tok_s']:>6.2f} {r['bytes'] / 2**20:>10.1f} "
                         f"{r['bytes'] / base['bytes']:>6.3f} {r['reserved'] / 2**20:>9.1f} {eff / 1e9:>9.0f} "
                         f"{eff / bw:>7.2f} {same:>9}")
    if graph_rows:
        mode = "one graph per step" if args.graph_mode == "per-step" else f"all {args.steps} steps in one graph"
        lines += ["", f"the {args.steps} timed steps replayed from CUDA graphs, {mode} (module docstring); "
                  "same = tokens equal to the same cache's eager run",
                  f"{'T':>6} {'cache':<24} {'ms/step':>8} {'p10-p90':>13} {'tok/s':>8} {'x Dyn':>6} {'x Static':>8} "
                  f"{'cache MiB':>10} {'eff GB/s':>9} {'of copy':>7} {'same':>9}"]
        for T in args.lengths:
            group = {r["cache"]: r for r in graph_rows if r["T"] == T}
            eager = {r["cache"]: r for r in rows if r["T"] == T}
            dyn, static = group.get("DynamicCache"), group.get("StaticCache")
            for r in group.values():
                e = eager.get(r["cache"])
                same = "" if e is None else f"{int((r['tokens'] == e['tokens']).sum())}/{r['tokens'].numel()}"
                r["same_as_eager"] = same
                eff = (weights + r["bytes"]) / (r["step_ms"] / 1e3)
                xd = f"{dyn['step_ms'] / r['step_ms']:6.2f}" if dyn else f"{'-':>6}"
                xs = f"{static['step_ms'] / r['step_ms']:8.2f}" if static else f"{'-':>8}"
                lines.append(f"{T:>6} {r['cache']:<24} {r['step_ms']:>8.2f} "
                             f"{r['step_p10_ms']:>6.2f}-{r['step_p90_ms']:<6.2f} {r['tok_s']:>8.0f} {xd} {xs} "
                             f"{r['bytes'] / 2**20:>10.1f} {eff / 1e9:>9.0f} {eff / bw:>7.2f} {same:>9}")
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
        with open(args.out.rsplit(".", 1)[0] + ".json", "w") as f:
            json.dump({"device": dev, "copy_bw": bw, "weights_bytes": weights, "args": vars(args),
                       "failed": failed,
                       "rows": [{k: v for k, v in r.items() if k != "tokens"} for r in rows],
                       "graph_rows": [{k: v for k, v in r.items() if k != "tokens"} for r in graph_rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Greedy ``generate()`` through kvlab's ``CompressedCache`` and its peers: tokens/s and bytes held, on CPU.

The model (the embedded one unless ``--model``; fp32) reads a ``--prompt``-token pydoc prompt and generates ``--new`` tokens greedily
with each cache: transformers' ``DynamicCache`` (the baseline: fp32 K/V, as the model runs in fp32),
transformers' ``QuantizedCache`` with the ``quanto`` and ``hqq`` backends at 4 and 2 bits (group 64,
residual 128; note that it attends the prefill with the unquantized K/V and quantizes it only for later
steps), and ``CompressedCache`` with ``q8_0``, ``q4_0``, ``kivi-4`` and ``kivi-2`` (through its compiled CPU kernels;
``KVLAB_CPU_KERNELS=0`` measures its torch-ops fallback). Every variant runs once per
repeat, interleaved, so drifting machine load hits them alike; the medians are printed with their ratios
to ``DynamicCache`` measured in the same run. A logits processor timestamps every step, which splits the
prefill from the per-token decode. Bytes are those held at the end (prompt + new tokens), counted from
the tensors each cache keeps (codes, scales, minima, fp16/fp32 windows); "x fp16" compares them with an
fp16 cache of the same tokens (half of DynamicCache here). "same" counts the generated tokens equal to
DynamicCache's.

The second table is the cache's own accounting (``CompressedCache.nbytes()``) vs an fp16 cache for the
model's whole geometry at several lengths, from synthetic K/V written through the cache API.

"decode tok/s" is wall clock; "CPU tok/s" counts this thread's CPU time only, so that other jobs on a
shared machine do not blur the comparison.

    python benchmarks/bench_cache.py [--model gemma3-270m] [--caches "CompressedCache q8_0,..."] [--prompt 512]
        [--new 128] [--repeats 3] [--threads 1] [--lengths 128 2048 ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402,F401  (puts the repository root on sys.path)
import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, QuantizedCache

import kvlab
from kvlab.evaluation.evaluate import load_windows
from kvlab.kernels import cpu as cpu_kernels
from kvlab.storage.cache import CompressedCache, cache_kwarg

POLICIES = {"kivi-2": "kivi:bits=2", "kivi-4": "kivi:bits=4", "q4_0": "q4_0", "q8_0": "q8_0"}
LENGTHS = (128, 512, 1024, 2048, 8192)


def variants(config) -> dict:
    """label -> a function making a fresh cache (None: the model's default DynamicCache)."""
    out = {"DynamicCache": DynamicCache}
    for backend in ("quanto", "hqq"):
        for bits in (4, 2):
            out[f"HF QuantizedCache {backend} {bits}b"] = (
                lambda b=backend, n=bits: QuantizedCache(backend=b, config=config, nbits=n))
    for label in ("q8_0", "q4_0", "kivi-4", "kivi-2"):
        out[f"CompressedCache {label}"] = lambda s=POLICIES[label]: CompressedCache(s, config=config)
    return out


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in obj: plain tensors, tensor subclasses (quanto's QTensors, through their
    inner tensors), and dicts, lists and tuples of them (hqq's (codes, meta))."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n)) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def held_bytes(cache) -> int:
    """Bytes of K/V a cache holds: CompressedCache's own accounting, else every tensor of every layer."""
    if isinstance(cache, CompressedCache):
        return cache.nbytes()["total"]
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            total += tensor_bytes(getattr(layer, name, None))
    return total


class _Clock(LogitsProcessor):
    """Timestamps each generation step (called once per step, after the model's forward): wall clock, and
    this thread's CPU time (which other jobs on the machine do not inflate)."""

    def __init__(self):
        self.stamps: list[tuple[float, float]] = []

    def __call__(self, input_ids, scores):
        self.stamps.append((time.perf_counter(), time.thread_time()))
        return scores


def generate_once(model, ids, make_cache, new: int) -> dict:
    cache = make_cache()
    clock = _Clock()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quanto/hqq chatter
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             logits_processor=LogitsProcessorList([clock]), **{cache_kwarg(model): cache})
        t1 = time.perf_counter()
    (w0, c0), (w1, c1) = clock.stamps[0], clock.stamps[-1]
    steps = len(clock.stamps) - 1
    return {"prefill_s": w0 - t0, "decode_s_per_token": (w1 - w0) / steps, "decode_cpu_s_per_token": (c1 - c0) / steps,
            "total_s": t1 - t0, "bytes": held_bytes(cache),
            "reserved": cache.nbytes()["reserved"] if isinstance(cache, CompressedCache) else 0,
            "tokens": out[0, ids.shape[1]:].tolist()}


def run_generate(model, ids, new: int, repeats: int, only: list[str] | None = None) -> list[dict]:
    makers = variants(model.config)
    if only:
        unknown = [c for c in only if c not in makers]
        if unknown:
            raise SystemExit(f"--caches: unknown {unknown}; allowed: {', '.join(makers)}")
        makers = {k: m for k, m in makers.items() if k == "DynamicCache" or k in only}
    runs: dict[str, list[dict]] = {k: [] for k in makers}
    generate_once(model, ids[:, :64], DynamicCache, 4)  # warm-up
    for _ in range(repeats):  # interleaved
        for label, make in makers.items():
            try:
                runs[label].append(generate_once(model, ids, make, new))
            except Exception as e:  # a peer backend that does not run here is reported, not fatal
                runs[label].append({"error": f"{type(e).__name__}: {str(e)[:120]}"})
    rows = []
    for label, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            rows.append({"cache": label, "error": rs[0]["error"]})
            continue
        dec = statistics.median(r["decode_s_per_token"] for r in ok)
        cpu = statistics.median(r["decode_cpu_s_per_token"] for r in ok)
        rows.append({"cache": label, "prefill_s": statistics.median(r["prefill_s"] for r in ok),
                     "decode_tok_s": 1 / dec, "decode_cpu_tok_s": 1 / cpu,
                     "e2e_tok_s": new / statistics.median(r["total_s"] for r in ok),
                     "bytes": ok[0]["bytes"], "reserved": ok[0]["reserved"], "tokens": ok[0]["tokens"],
                     "repeats": len(ok)})
    base = rows[0]
    fp16_bytes = base["bytes"] * 2 / base_element_size(model)
    for r in rows:
        if "error" in r:
            continue
        r["decode_vs_dyn"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["decode_cpu_vs_dyn"] = r["decode_cpu_tok_s"] / base["decode_cpu_tok_s"]
        r["e2e_vs_dyn"] = r["e2e_tok_s"] / base["e2e_tok_s"]
        r["bytes_vs_dyn"] = base["bytes"] / r["bytes"]
        r["bytes_vs_fp16"] = fp16_bytes / r["bytes"]
        r["same_tokens"] = sum(a == b for a, b in zip(r["tokens"], base["tokens"]))
    return rows


def base_element_size(model) -> int:
    return torch.empty((), dtype=model.dtype).element_size()


def bytes_vs_length(config, lengths=LENGTHS) -> list[dict]:
    """CompressedCache.nbytes() for the model's whole geometry at each length, synthetic K/V written
    through the cache API (a prefill of T tokens), vs an fp16 cache of the same tokens: transformers'
    DynamicCache for the same config holding fp16 K/V, so sliding-window layers hold their window in both
    (``fp16_full_bytes``: what an fp16 cache would hold if every layer kept every token)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    L, H = text.num_hidden_layers, text.num_key_value_heads
    D = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    gen = torch.Generator().manual_seed(0)
    rows = []
    for T in lengths:
        k, v = torch.randn(2, 1, H, T, D, generator=gen)
        fp16 = DynamicCache(config=config)
        for layer in range(L):
            fp16.update(k.half(), v.half(), layer)
        row = {"tokens": T, "fp16_bytes": held_bytes(fp16), "fp16_full_bytes": 2 * L * H * T * D * 2}
        for label in ("kivi-2", "q4_0"):
            cache = CompressedCache(POLICIES[label], config=config)
            for layer in range(L):
                cache.update(k, v, layer)
            row[label] = cache.nbytes()["total"]
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default); on 2 "
                    "shared, loaded cores, 2 threads made decoding ~30x slower, hence 1")
    ap.add_argument("--model", default=None, help="model id or alias (default: the embedded model)")
    ap.add_argument("--caches", default="", help="comma-separated cache labels to run beside DynamicCache "
                    "(default: all)")
    ap.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS), help="tokens of the bytes table")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = kvlab.load_model(args.model) if args.model else kvlab.load_model()
    name = args.model or "embedded model"
    _, w = load_windows(tok, "pydoc", ctx=args.prompt, windows=1)  # BOS where the tokenizer adds one
    rows = run_generate(model, w, args.new, args.repeats, [c for c in args.caches.split(",") if c])
    sizes = bytes_vs_length(model.config, args.lengths)
    if args.json:
        for r in rows:
            r.pop("tokens", None)
        print(json.dumps({"model": name, "prompt": args.prompt, "new": args.new, "threads": torch.get_num_threads(),
                          "generate": rows, "bytes_vs_length": sizes}, indent=1))
        return
    print(f"greedy generate, {name} ({model.dtype}), prompt {args.prompt} + {args.new} new tokens, "
          f"CPU, {torch.get_num_threads()} threads, median of {args.repeats} interleaved runs")
    print(f"{'cache':<30}{'prefill s':>10}{'decode tok/s':>13}{'x dyn':>7}{'CPU tok/s':>10}{'x dyn':>7}"
          f"{'e2e tok/s':>10}{'x dyn':>7}{'KiB held':>10}{'x dyn':>7}{'x fp16':>7}{'same':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['cache']:<30}  did not run: {r['error']}")
            continue
        print(f"{r['cache']:<30}{r['prefill_s']:>10.2f}{r['decode_tok_s']:>13.2f}{r['decode_vs_dyn']:>7.2f}"
              f"{r['decode_cpu_tok_s']:>10.2f}{r['decode_cpu_vs_dyn']:>7.2f}"
              f"{r['e2e_tok_s']:>10.2f}{r['e2e_vs_dyn']:>7.2f}{r['bytes'] / 1024:>10.0f}"
              f"{r['bytes_vs_dyn']:>7.2f}{r['bytes_vs_fp16']:>7.2f}{r['same_tokens']:>6}")
    room = ", ".join(f"{r['cache'].split()[-1]} {r['reserved'] / 1024:.0f}" for r in rows if r.get("reserved"))
    print(f"(CompressedCache also holds room for later runs, not in 'KiB held': {room} KiB)")
    print("(CompressedCache quantized and decoded through "
          + ("its compiled CPU kernels, kvlab.cpu_kernels)" if cpu_kernels.ops() is not None
             else "torch ops: the compiled CPU kernels were unavailable or KVLAB_CPU_KERNELS=0)"))
    cfg = model.config.get_text_config(decoder=True)
    kinds = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    print(f"\nCompressedCache.nbytes() vs an fp16 cache, whole model ({cfg.num_hidden_layers} layers "
          f"({kinds.count('sliding_attention')} sliding-window) x {cfg.num_key_value_heads} kv heads x "
          f"head_dim {cfg.head_dim}), synthetic K/V; fp16 = DynamicCache holding fp16 K/V for the same config "
          "(sliding layers keep their window in both), full = fp16 if every layer kept every token")
    print(f"{'tokens':>7}{'fp16 KiB':>11}{'full KiB':>11}{'kivi-2 KiB':>12}{'x fp16':>8}{'q4_0 KiB':>10}{'x fp16':>8}")
    for s in sizes:
        print(f"{s['tokens']:>7}{s['fp16_bytes'] / 1024:>11.0f}{s['fp16_full_bytes'] / 1024:>11.0f}"
              f"{s['kivi-2'] / 1024:>12.0f}{s['fp16_bytes'] / s['kivi-2']:>8.2f}{s['q4_0'] / 1024:>10.0f}"
              f"{s['fp16_bytes'] / s['q4_0']:>8.2f}")


if __name__ == "__main__":
    main()

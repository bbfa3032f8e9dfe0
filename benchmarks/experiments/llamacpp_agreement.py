"""kvlab's ggml KV-cache deltas against llama.cpp's own, on one GGUF file and the same token windows.

Needs llama-cpp-python 0.3.x (``pip install llama-cpp-python==0.3.36``: it builds llama.cpp from source, 10-20
minutes on 2 cores), which kvlab does not depend on; ``--llama-path`` adds a site-packages folder holding it.

For each ggml type (K and V of that type) and each rotation setting (llama.cpp's Hadamard rotation of K/V, its
default for quantized caches, or ``LLAMA_ATTN_ROT_DISABLE=1``), the PPL delta against each tool's own fp16 cache:

* llama.cpp: CPU, flash attention, one window per ``eval`` (the whole window in one batch), every token after the
  window's first scored from its logits, exactly the token ids kvlab scores;
* kvlab ``storage``: the scheme as stored (the default emulation);
* kvlab ``+order``: K blocks cut in llama.cpp's channel order (``k=TYPE:order=interleaved``; V as stored);
* kvlab ``+order+compute``: also the query rounded as llama.cpp's CPU kernel rounds it (``compute=llama.cpp``).

Prints a table and writes ``--out``.json / .txt (per-window NLLs included, so the deltas can be recomputed).
Usage: ``python benchmarks/experiments/llamacpp_agreement.py --corpus wikitext-2-v1 --windows 24``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TYPE_IDS = {"f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8}  # ggml_type


def _llama_nll(gguf: Path, windows: np.ndarray, ggml_type: str, rotate: bool, threads: int) -> list[float]:
    """Per-window mean NLL of llama.cpp with K and V cached as ``ggml_type``."""
    if rotate:
        os.environ.pop("LLAMA_ATTN_ROT_DISABLE", None)
    else:
        os.environ["LLAMA_ATTN_ROT_DISABLE"] = "1"
    from llama_cpp import Llama

    n = int(windows.shape[1])
    llm = Llama(model_path=str(gguf), n_ctx=n, n_batch=n, n_ubatch=n, logits_all=True, flash_attn=True,
                type_k=TYPE_IDS[ggml_type], type_v=TYPE_IDS[ggml_type], n_threads=threads, seed=0, verbose=False)
    out = []
    for w in windows:
        llm.reset()
        llm.eval([int(t) for t in w])
        logits = np.asarray(llm.scores[:n], dtype=np.float64)  # (n, vocab): row t predicts token t + 1
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        out.append(float(-logp[np.arange(n - 1), w[1:]].mean()))
    del llm
    return out


def _delta(base: list[float], other: list[float]) -> float:
    """PPL change in percent: exp(mean NLL difference) - 1."""
    return 100 * (math.exp(float(np.mean(other)) - float(np.mean(base))) - 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="kvlab model alias (default: the embedded SmolLM2 GGUF)")
    ap.add_argument("--corpus", default="wikitext-2-v1")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--types", default="q8_0,q5_0,q4_1,q4_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-path", default=None, help="a site-packages folder holding llama_cpp")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/llamacpp_agreement"))
    args = ap.parse_args(argv)
    if args.llama_path:
        sys.path.append(args.llama_path)
    import llama_cpp
    import torch
    from tqdm.auto import tqdm

    from kvlab.evaluation.evaluate import evaluate_policy, load_windows
    from kvlab.model.loading import DEFAULT_MODEL, embedded_gguf_path, load_model

    torch.manual_seed(0)
    alias = args.model or DEFAULT_MODEL
    gguf = embedded_gguf_path(alias)
    model, tok = load_model(alias)
    corpus, w = load_windows(tok, args.corpus, args.ctx, args.windows, args.data_dir)
    ids = w.numpy()
    types = [t for t in args.types.split(",") if t]
    bad = [t for t in types if t not in TYPE_IDS or t == "f16"]
    if bad:
        raise SystemExit(f"--types: {bad[0]!r} is not allowed; allowed: {', '.join(t for t in TYPE_IDS if t != 'f16')}")

    def kvlab_nll(spec):
        return evaluate_policy(model, w, spec, kl=False, progress=False)["window_nll"]

    t0 = time.perf_counter()
    nll = {"llama.cpp/f16": _llama_nll(gguf, ids, "f16", False, args.threads), "kvlab/fp16": kvlab_nll("fp16")}
    rows = []
    for t in tqdm(types, desc="types"):
        for rot in (False, True):
            r = ",rotate=hadamard" if rot else ""
            specs = {
                "storage": f"{t}{':' + r[1:] if r else ''}",
                "+order": f"k={t}:order=interleaved{r};v={t}{':' + r[1:] if r else ''}",
                "+order+compute": f"k={t}:order=interleaved,compute=llama.cpp{r};v={t}{':' + r[1:] if r else ''}",
            }
            lc = _llama_nll(gguf, ids, t, rot, args.threads)
            nll[f"llama.cpp/{t}/{'rot' if rot else 'norot'}"] = lc
            row = {"type": t, "rotation": rot, "llama.cpp": _delta(nll["llama.cpp/f16"], lc)}
            for name, spec in specs.items():
                v = kvlab_nll(spec)
                nll[f"kvlab/{spec}"] = v
                row[name] = _delta(nll["kvlab/fp16"], v)
                row[f"{name} spec"] = spec
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    seconds = time.perf_counter() - t0

    base_lc = math.exp(float(np.mean(nll["llama.cpp/f16"])))
    base_kv = math.exp(float(np.mean(nll["kvlab/fp16"])))
    lines = [
        f"# kvlab vs llama.cpp KV-cache deltas ({alias}: {gguf.name}; {corpus}, ctx {args.ctx} x {w.shape[0]} windows, "
        f"{w.shape[0] * (args.ctx - 1)} scored tokens)",
        f"# llama-cpp-python {llama_cpp.__version__}, CPU ({platform.processor() or platform.machine()}, "
        f"{args.threads} threads), flash attention; kvlab emulation=prefill, float32; {seconds:.0f} s",
        f"# fp16 PPL: llama.cpp {base_lc:.4f}, kvlab {base_kv:.4f} ({100 * (base_kv / base_lc - 1):+.2f}%)",
        "# delta = PPL change vs the same tool's fp16 cache, in %; ratio = kvlab / llama.cpp",
        "| type | llama.cpp rotation | llama.cpp | kvlab storage (ratio) | +order (ratio) | +order+compute (ratio) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lc = r["llama.cpp"]
        cells = [f"{r[k]:+.2f}% ({r[k] / lc:.2f})" if abs(lc) > 1e-9 else f"{r[k]:+.2f}%"
                 for k in ("storage", "+order", "+order+compute")]
        lines.append(f"| {r['type']} | {'hadamard' if r['rotation'] else 'off'} | {lc:+.2f}% | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": alias, "gguf": gguf.name, "corpus": corpus, "ctx": args.ctx, "windows": int(w.shape[0]),
            "llama_cpp_python": llama_cpp.__version__, "threads": args.threads, "seconds": seconds,
            "ppl_fp16": {"llama.cpp": base_lc, "kvlab": base_kv}}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows, "window_nll": nll}, indent=1))
    tmp.replace(out.with_suffix(".json"))
    tmp = out.with_suffix(".txt.tmp")
    tmp.write_text(text + "\n")
    tmp.replace(out.with_suffix(".txt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where greedy decoding through a compressed cache first leaves DynamicCache's tokens, and the top-2 logit
margin there: a near-tie (small margin) flips under any small perturbation of K/V, so an early divergence with
a small margin says nothing against the cache. Prints both token lists and DynamicCache's per-step margins.

    python benchmarks/experiments/greedy_margin.py [--model gemma3-270m] [--scheme q8_0] [--prompt 512] [--new 6]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import _harness  # noqa: E402,F401  (puts the repository root on sys.path)
import torch
from transformers import DynamicCache

import kvlab
from kvlab.evaluation.evaluate import load_windows
from kvlab.storage.cache import CompressedCache, cache_kwarg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--scheme", default="q8_0")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=6)
    args = ap.parse_args()
    model, tok = kvlab.load_model(args.model) if args.model else kvlab.load_model()
    _, w = load_windows(tok, "pydoc", ctx=args.prompt, windows=1)  # BOS where the tokenizer adds one
    runs = {}
    for name, make in (("DynamicCache", lambda: DynamicCache(config=model.config)),
                       (f"CompressedCache {args.scheme}", lambda: CompressedCache(args.scheme, config=model.config))):
        with torch.no_grad():
            out = model.generate(w, attention_mask=torch.ones_like(w), max_new_tokens=args.new,
                                 min_new_tokens=args.new, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, **{cache_kwarg(model): make()})
        top2 = [s[0].topk(2).values for s in out.scores]
        runs[name] = (out.sequences[0, w.shape[1]:].tolist(), [float(t[0] - t[1]) for t in top2])
    print(f"{args.model or 'embedded model'}, pydoc prompt of {args.prompt} tokens, {args.new} greedy tokens")
    for name, (tokens, margins) in runs.items():
        print(f"{name:<28} tokens {tokens}\n{'':<28} top-2 margins {[round(m, 3) for m in margins]}")
    (a, ma), (b, _) = runs.values()
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    print("no divergence" if first is None else
          f"first divergence at generated token {first + 1}: DynamicCache's top-2 margin there {ma[first]:.3f}")


if __name__ == "__main__":
    main()

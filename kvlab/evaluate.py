"""High-level evaluation entry points shared by the CLI, the sweep and the notebooks."""

from __future__ import annotations

import sys
import warnings

from .corpus import load_corpus
from .models import DEFAULT_MODEL, load_model
from .ppl import PplResult, make_windows, tokenize, window_nll

__all__ = ["resolve_corpus", "load_windows", "baseline_ppl"]


def resolve_corpus(corpus: str, data_dir: str | None = None) -> tuple[str, str]:
    """``"auto"`` -> WikiText-2 (v1, test) if reachable, else Python's pydoc topics; returns (name, text)."""
    if corpus != "auto":
        return corpus, load_corpus(corpus, data_dir=data_dir)
    try:
        return "wikitext-2-v1", load_corpus("wikitext-2-v1", data_dir=data_dir)
    except FileNotFoundError:
        print("kvlab: WikiText-2 not reachable (no --data-dir/KVLAB_DATA_DIR, no hub); using corpus 'pydoc'",
              file=sys.stderr)
        return "pydoc", load_corpus("pydoc")


def load_windows(tokenizer, corpus: str = "auto", ctx: int = 512, windows: int = 24, data_dir=None):
    """Tokenize the corpus and cut (n, ctx) windows. Returns (corpus_name, windows)."""
    name, text = resolve_corpus(corpus, data_dir)
    ids = tokenize(tokenizer, text, max_tokens=ctx * windows)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w = make_windows(ids, ctx, windows)
    for c in caught:
        print(f"kvlab: {c.message}", file=sys.stderr)
    return name, w


def baseline_ppl(model_name=None, corpus="auto", ctx=512, windows=24, data_dir=None, progress=True,
                 model=None, tokenizer=None) -> PplResult:
    """Perplexity of the unmodified model."""
    if model is None:
        model, tokenizer = load_model(model_name)
    name, w = load_windows(tokenizer, corpus, ctx, windows, data_dir)
    nll = window_nll(model, w, progress=progress)
    return PplResult.from_nll(nll, w, model=model_name or DEFAULT_MODEL, corpus=name)

"""Evaluation: corpora, perplexity windows, the per-scheme harness, resumable sweeps, Q/K/V dumps and
lossless coding of dumped tensors."""

from kvlab.evaluation.corpus import CORPORA, load_corpus
from kvlab.evaluation.dump import dump, load_dump
from kvlab.evaluation.ppl import PplResult, make_windows, resolve_bos, tokenize, window_nll
from kvlab.evaluation.sweep import sweep

__all__ = ["CORPORA", "PplResult", "dump", "load_corpus", "load_dump", "make_windows", "resolve_bos", "sweep",
           "tokenize", "window_nll"]

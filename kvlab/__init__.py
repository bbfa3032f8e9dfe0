"""kvlab: a research lab for KV-cache compression in transformer LLMs."""

from kvlab import quant
from kvlab.emulation.hooks import capture, compress, measure
from kvlab.evaluation.corpus import CORPORA, load_corpus
from kvlab.evaluation.dump import dump, load_dump
from kvlab.evaluation.ppl import PplResult, make_windows, resolve_bos, tokenize, window_nll
from kvlab.evaluation.sweep import sweep
from kvlab.model.loading import DEFAULT_MODEL, load_model
from kvlab.quant.policy import Policy, parse_policy
from kvlab.storage.cache import CompressedCache

__all__ = [
    "CORPORA",
    "DEFAULT_MODEL",
    "CompressedCache",
    "Policy",
    "PplResult",
    "capture",
    "compress",
    "dump",
    "load_corpus",
    "load_dump",
    "load_model",
    "make_windows",
    "measure",
    "parse_policy",
    "quant",
    "resolve_bos",
    "sweep",
    "tokenize",
    "window_nll",
]

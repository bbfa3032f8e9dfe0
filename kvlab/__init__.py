"""kvlab: a research lab for KV-cache compression in transformer LLMs."""

from . import quant
from .cache import CompressedCache
from .corpus import CORPORA, load_corpus
from .dump import dump, load_dump
from .hooks import capture, compress, measure
from .models import DEFAULT_MODEL, load_model
from .policy import Policy, parse_policy
from .ppl import PplResult, make_windows, tokenize, window_nll
from .sweep import sweep

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
    "sweep",
    "tokenize",
    "window_nll",
]

"""kvlab: a research lab for KV-cache compression in transformer LLMs."""

from . import quant
from .corpus import CORPORA, load_corpus
from .models import DEFAULT_MODEL, load_model
from .ppl import PplResult, make_windows, tokenize, window_nll

__all__ = [
    "CORPORA",
    "DEFAULT_MODEL",
    "PplResult",
    "load_corpus",
    "load_model",
    "make_windows",
    "quant",
    "tokenize",
    "window_nll",
]

"""kvlab: a research lab for KV-cache compression in transformer LLMs."""

from . import quant

__all__ = ["quant"]

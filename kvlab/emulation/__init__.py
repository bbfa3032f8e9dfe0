"""Emulation: context managers that capture or replace Q/K/V inside any Hugging Face causal LM exactly as
decoding through a quantized cache would (decode-exact), and measure the error they cause."""

from kvlab.emulation.hooks import attention_modules, capture, compress, measure

__all__ = ["attention_modules", "capture", "compress", "measure"]

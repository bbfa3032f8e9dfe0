"""Storage: :class:`CompressedCache`, a drop-in transformers Cache holding each layer's K/V in a scheme's real
packed bytes, and (CUDA) the fused layers that decode attention straight from them."""

from kvlab.storage.cache import CompressedCache, FusedCache, cache_kwarg
from kvlab.storage.fused import use_fused_attention

__all__ = ["CompressedCache", "FusedCache", "cache_kwarg", "use_fused_attention"]

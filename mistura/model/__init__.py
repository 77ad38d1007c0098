"""The architecture, and nothing else: no I/O, no training, no command line."""

from mistura.model.cache import KVCache, LatentCache
from mistura.model.transformer import Transformer

__all__ = ["KVCache", "LatentCache", "Transformer"]

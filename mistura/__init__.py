"""mistura: build, train, compare and serve Transformer language models with Mixture-of-Experts.

import mistura
model = mistura.load("runs/quickstart")          # a ready model, in eval mode
logits = model(input_ids)                         # (B, T, V)
ids = model.generate(input_ids, max_new_tokens=50, temperature=0.8, top_k=50)
"""

from mistura.checkpoint import load, load_tokenizer
from mistura.config import ModelConfig
from mistura.model import KVCache, LatentCache, Transformer

__version__ = "0.1.0"
__all__ = ["KVCache", "LatentCache", "ModelConfig", "Transformer", "load", "load_tokenizer"]

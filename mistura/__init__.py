"""mistura: build, train, compare and serve Transformer language models with Mixture-of-Experts.

import mistura
model = mistura.load("runs/quickstart")          # a ready model, in eval mode
tokenizer = mistura.load_tokenizer("runs/quickstart")
logits = model(input_ids)                         # (B, T, V)
texts = mistura.generate_text(model, tokenizer, ["O amor é", "Capitu"], mistura.Sampling(max_new_tokens=50))
new_ids = mistura.generate(model, [[1, 523, 87]], mistura.Sampling(temperature=0))  # token ids in and out
"""

from mistura.checkpoint import load, load_tokenizer
from mistura.config import ModelConfig
from mistura.cpu_isa import avoid_faulting_amx
from mistura.infer.engine import generate
from mistura.infer.generate import generate_text
from mistura.infer.sampling import Sampling
from mistura.model import KVCache, LatentCache, Transformer

avoid_faulting_amx()

__version__ = "0.1.0"
__all__ = [
    "KVCache",
    "LatentCache",
    "ModelConfig",
    "Sampling",
    "Transformer",
    "generate",
    "generate_text",
    "load",
    "load_tokenizer",
]

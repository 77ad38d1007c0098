"""mistura: build, train, compare and serve Transformer language models with Mixture-of-Experts.

import mistura
model = mistura.load("runs/quickstart")          # a ready model, in eval mode
tokenizer = mistura.load_tokenizer("runs/quickstart")
logits = model(input_ids)                         # (B, T, V)
texts = mistura.generate_text(model, tokenizer, ["O amor é", "Capitu"], mistura.Sampling(max_new_tokens=50))
new_ids = mistura.generate(model, [[1, 523, 87]], mistura.Sampling(temperature=0))  # token ids in and out

The names below are imported on first use, so that importing one module of the package
(`mistura.checkpoint`, say) imports only what that module needs.
"""

from mistura._lazy import lazy_exports
from mistura.cpu_isa import avoid_faulting_amx

avoid_faulting_amx()

__version__ = "0.1.0"

# The public names, by the module that defines them.
_EXPORTS = {
    "mistura.config": ["ModelConfig"],
    "mistura.infer.engine": ["generate"],
    "mistura.infer.generate": ["generate_text"],
    "mistura.infer.sampling": ["Sampling"],
    "mistura.loading": ["load", "load_tokenizer"],
    "mistura.model": ["KVCache", "LatentCache", "Transformer"],
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

"""GGUF, the file format of llama.cpp (and Ollama, LM Studio), both ways.

- `export`: `to_gguf`, a mistura checkpoint as one GGUF file, streaming, in f32, f16, bf16, q8_0 or q4_0.
- `load`: `from_gguf`, a GGUF file as a mistura checkpoint.
- `archs`: the llama.cpp architectures: which one runs a model, and the checks on export.
- `names`: GGUF tensor names, and each architecture's table from them to mistura's.
- `layout`: where llama.cpp lays tensors out otherwise (rotary rows in pairs, deepseek2's attn_k_b/attn_v_b).
- `metadata`: the {arch}.* keys, written from a ModelConfig and read back into one.
- `tokenizer`: the byte-level BPE tokenizer as GGUF's tokenizer.ggml.* keys, and back.

The `gguf` package (llama.cpp's own) reads and writes the files: `pip install gguf`.
"""

from mistura.convert.gguf.export import to_gguf
from mistura.convert.gguf.load import from_gguf

__all__ = ["from_gguf", "to_gguf"]

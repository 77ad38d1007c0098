"""GGUF, the file format of llama.cpp (and Ollama, LM Studio), both ways.

- `export`: `to_gguf`, a mistura checkpoint as one GGUF file, streaming, in f32, f16, bf16, q8_0 or q4_0.
- `load`: `from_gguf`, a GGUF file as a mistura checkpoint.
- `archs`: the llama.cpp architectures, their name tables, checks and metadata.
- `tokenizer`: the byte-level BPE tokenizer as GGUF's tokenizer.ggml.* keys, and back.

The `gguf` package (llama.cpp's own) reads and writes the files: `pip install gguf`.
"""

from mistura.convert.gguf.export import to_gguf
from mistura.convert.gguf.load import from_gguf

__all__ = ["from_gguf", "to_gguf"]

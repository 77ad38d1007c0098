"""A GGUF file (llama.cpp's format) as a mistura checkpoint.

    >>> from_gguf("qwen.gguf", "ckpt/qwen")

Read with the `gguf` package's `GGUFReader` (memory-mapped), each tensor dequantised with
`gguf.quants.dequantize` to fp32, renamed and, for llama.cpp's `llama` and `deepseek2`,
its query and key rows put back in mistura's rotary order (see `layout`); deepseek2's
per-head attn_k_b and attn_v_b are joined back into kv_b_proj. The config comes from the file's
{arch}.* keys and the tokenizer from its tokenizer.ggml.* keys, with the chat template
as chat_template.jinja. The checkpoint appears whole or not at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from mistura.checkpoint import WEIGHTS_METADATA, checkpoint_directory, write_config
from mistura.config import ModelConfig
from mistura.convert.gguf.archs import find_arch
from mistura.convert.gguf.export import gguf_map
from mistura.convert.gguf.layout import joined_shapes, joined_tensor
from mistura.convert.gguf.metadata import Metadata
from mistura.convert.gguf.tokenizer import read_tokenizer
from mistura.convert.hf import new_folder
from mistura.errors import CheckpointError
from mistura.shards import tensor_bytes, write_weights


def from_gguf(path: str | Path, out_dir: str | Path) -> Path:
    """Write the GGUF file `path` as a mistura checkpoint directory `out_dir`, fp32 weights.

    A file that is not GGUF, or cut short, raises CheckpointError; an architecture or tokenizer
    that mistura does not read, ConfigError.
    """
    path = Path(path)
    out = new_folder(out_dir, path)
    reader = open_gguf(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    arch = find_arch(fields.get(gguf.Keys.General.ARCHITECTURE))
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    config = gguf_config(fields, set(tensors), arch.name)
    tokenizer = read_tokenizer(fields)
    mapped = gguf_map(config, arch)
    mapped.check(joined_shapes(config, {name: tuple(int(n) for n in reversed(t.shape)) for name, t in tensors.items()}))

    def stored(name: str) -> torch.Tensor:
        tensor = tensors[name]
        return torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))

    def read(name: str, index: int | None) -> torch.Tensor:
        return joined_tensor(config, name, stored)

    sizes = {name: tensor_bytes(shape, torch.float32) for name, shape in mapped.shapes.items()}
    with checkpoint_directory(out) as tmp:  # one tensor dequantised at a time, as from_hf streams
        write_config(tmp, config)
        write_weights(tmp, sizes, lambda name: mapped.ours(name, read), metadata=WEIGHTS_METADATA)
        tokenizer.save(str(tmp / "tokenizer.json"))
        template = fields.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
        if template:
            (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")
    return out


def open_gguf(path: Path) -> gguf.GGUFReader:
    """A reader of the GGUF file at `path`; a missing, foreign or truncated file is a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as err:  # bad magic, cut short: numpy reads past the end
        raise CheckpointError(f"{path} is not a readable GGUF file (not GGUF, or truncated): {err}") from err


def gguf_config(fields: dict[str, Any], tensors: set[str], arch: str) -> ModelConfig:
    """The `ModelConfig` of a GGUF file's metadata (its {arch}.* keys without the prefix) and tensor names."""
    meta = Metadata(fields, arch)
    embeddings = meta.get(gguf.Keys.LLM.VOCAB_SIZE) or len(meta.get(gguf.Keys.Tokenizer.LIST, []))
    return ModelConfig.from_dict(dict(find_arch(arch).config(meta, tensors), vocab_size=embeddings))

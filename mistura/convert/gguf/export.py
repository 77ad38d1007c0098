"""A mistura checkpoint as one GGUF file for llama.cpp, Ollama and LM Studio, written one tensor at a time.

    >>> to_gguf("runs/quickstart", "quickstart.gguf", type="q8_0")

The file is written with the `gguf` package's `GGUFWriter`, the writer of llama.cpp's own
converter, and quantised with `gguf.quants.quantize` (llama.cpp's block layouts). The
header (metadata and every tensor's name, shape and type) goes first, then each tensor
is read from the checkpoint, converted and written before the next is read: memory
stays near the largest tensor. The file appears whole under its name or not at all.
One mapped tensor may be stored as several: deepseek2's kv_b_proj as per-head attn_k_b
and attn_v_b (`layout.stored_tensors`).

Weights take the chosen type where llama.cpp's converter would: matrices of rows that
split into whole blocks; vectors (norms, biases), routers and learned positions stay f32,
and a q8_0/q4_0 matrix whose rows do not split into 32-value blocks falls back to f16.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm

from mistura.atomic import atomic_write
from mistura.chat_template import load_chat_template
from mistura.checkpoint import read_config, resolve, verify
from mistura.config import ModelConfig
from mistura.convert.gguf.archs import Arch, arch_for, rotary_rows
from mistura.convert.gguf.layout import stored_tensors
from mistura.convert.gguf.metadata import write_metadata
from mistura.convert.gguf.names import T, tensor_name
from mistura.convert.gguf.tokenizer import write_tokenizer
from mistura.convert.hf import check_export_source, is_hugging_face
from mistura.convert.mapping import TensorMap
from mistura.errors import CheckpointError, ConfigError
from mistura.model import Transformer
from mistura.shards import WeightFiles

Q = gguf.GGMLQuantizationType
TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
FILE_TYPES = {
    Q.F32: gguf.LlamaFileType.ALL_F32,
    Q.F16: gguf.LlamaFileType.MOSTLY_F16,
    Q.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
}
# Matrices llama.cpp's converter keeps in f32 whatever the type: routers (and the shared expert's gate), positions.
_KEPT_F32 = ("ffn_gate_inp", "position_embd")


def to_gguf(checkpoint: str | Path, out: str | Path, *, type: str = "f16", progress: bool = False) -> Path:
    """Write a mistura checkpoint (or a run's latest) as the GGUF file `out`, weights in `type`
    (f32, f16, bf16, q8_0, q4_0), with its tokenizer and chat template.

    A feature that llama.cpp's architecture for the model does not compute (collaborative
    experts, the adaptive RMSNorm, logit soft-capping, ...) raises ConfigError naming it,
    before anything is written.
    """
    qtype = _quant_type(type)
    directory = resolve(checkpoint)
    if is_hugging_face(directory):
        raise CheckpointError(f"{directory} is a Hugging Face folder: import it first with `mistura convert from-hf`")
    verify(directory)
    out = _new_file(out)
    config = read_config(directory)
    arch = arch_for(config)
    mapped = gguf_map(config, arch)
    tokenizer = directory / "tokenizer.json"
    if not tokenizer.is_file():
        raise CheckpointError(f"{directory} has no tokenizer.json: a GGUF file must carry the model's tokenizer")
    with WeightFiles(directory) as files:
        check_export_source(files, mapped, directory, f"llama.cpp's {arch.name}")
        shapes = gguf_shapes(config, mapped)
        types = {name: _tensor_type(name, shape, qtype) for name, shape in shapes.items()}
        # GGUFWriter opens files by path: it writes the temporary file that atomic_write renames at the end.
        with atomic_write(out) as file:
            writer = gguf.GGUFWriter(file.name, arch.name)
            try:
                _write_header(writer, config, arch, shapes, types, directory, qtype)
                for name in tqdm(mapped.hf_names(), desc=out.name, unit="tensor", disable=not progress):
                    for part, tensor in stored_tensors(config, name, mapped.theirs(name, files.read).float()).items():
                        writer.write_tensor_data(gguf.quants.quantize(tensor.numpy(), types[part]))
            finally:
                writer.close()
    return out


def gguf_map(config: ModelConfig, arch: Arch) -> TensorMap:
    """`arch`'s name table expanded for `Transformer(config)`: GGUF names as the map's Hugging Face side."""
    with torch.device("meta"):  # allocates nothing and runs no init
        model = Transformer(config)
    names = arch.names
    if arch.needs_output and config.tie_embeddings:
        names = names | {tensor_name(T.OUTPUT): "tok_emb.weight"}
    return TensorMap.build(
        model,
        names,
        n_layer=config.n_layer,
        rows=rotary_rows(config, arch),
        source=f"llama.cpp's {arch.name}",
    )


def gguf_shapes(config: ModelConfig, mapped: TensorMap) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of the GGUF file, in the order written (PyTorch's (out, in))."""
    return {
        part: tuple(tensor.shape)
        for name in mapped.hf_names()
        for part, tensor in stored_tensors(config, name, torch.empty(mapped.hf_shape(name), device="meta")).items()
    }


def _write_header(
    writer: gguf.GGUFWriter,
    config: ModelConfig,
    arch: Arch,
    shapes: dict[str, tuple[int, ...]],
    types: dict[str, Q],
    directory: Path,
    qtype: Q,
) -> None:
    """Metadata and tensor infos, the part of the file before the weights."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_file_type(FILE_TYPES[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_metadata(writer, config, arch.name)
    write_tokenizer(writer, directory / "tokenizer.json", config.vocab_size)
    template = load_chat_template(directory, default="").source
    if template:
        writer.add_chat_template(template)
    for name, kind in types.items():
        shape = shapes[name]
        block, size = gguf.GGML_QUANT_SIZES[kind]
        writer.add_tensor_info(name, shape, np.dtype(np.float32), math.prod(shape) // block * size, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()


def _tensor_type(name: str, shape: tuple[int, ...], qtype: Q) -> Q:
    """The type of one tensor in a file of `qtype`: see the module's docstring."""
    if len(shape) < 2 or any(kind in name for kind in _KEPT_F32):
        return Q.F32
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else Q.F16


def _quant_type(name: str) -> Q:
    if name not in TYPES:
        raise ConfigError(f"GGUF type {name!r} is not supported; choose one of {', '.join(TYPES)}")
    return TYPES[name]


def _new_file(out: str | Path) -> Path:
    """The output file: a .gguf name in an existing folder, not an existing folder itself."""
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"{out} is a folder: give the GGUF file's name, e.g. {out / 'model.gguf'}")
    if not out.parent.is_dir():
        raise ConfigError(f"{out.parent}: no such folder for the GGUF file")
    return out

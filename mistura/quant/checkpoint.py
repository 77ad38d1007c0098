"""Quantised checkpoint directories: written by `mistura quantize` (see quantize.py), read back by `mistura.load`.

A quantised checkpoint is an ordinary mistura checkpoint (config.json, model.safetensors,
tokenizer.json, manifest.json) whose config.json adds a `quantization` section, e.g.
{"format": "int4", "group_size": 128}, and whose weights file holds, for each quantised
layer, the tensors of its format (fp8.py, int8.py, int4.py) in place of `weight`.

Loading builds the full-precision model, swaps in empty quantised layers and loads the
file into them with `load_state_dict`, after checking every name, shape and code dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mistura.checkpoint import checkpoint_directory, read_weights, resolve, verify, write_model
from mistura.config import ModelConfig
from mistura.convert.fp8 import FP8
from mistura.errors import CheckpointError, ConfigError
from mistura.fields import from_dict
from mistura.model import Transformer
from mistura.quant.model import QuantConfig, quantized_skeleton
from mistura.shards import listed_files

SECTION = "quantization"  # config.json's key


def save_quantized(
    directory: str | Path, model: Transformer, quant: QuantConfig, tokenizer_file: Path | None = None
) -> Path:
    """Save a model quantised by `quantize_model` as a checkpoint directory, atomically."""
    directory = Path(directory)
    with checkpoint_directory(directory) as tmp:
        write_model(tmp, model, tokenizer_file)
        config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        (tmp / "config.json").write_text(json.dumps(config | {SECTION: quant.to_dict()}, indent=2), encoding="utf-8")
    return directory


def is_quantized(directory: Path) -> bool:
    """Whether config.json has a quantization section (an unreadable one is left to the loader to report)."""
    try:
        return SECTION in json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # unreadable, not UTF-8 or not JSON
        return False


def read_configs(directory: Path) -> tuple[ModelConfig, QuantConfig]:
    """The model config and quantisation recipe of a quantised checkpoint."""
    path = directory / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        quant = from_dict(QuantConfig, data.pop(SECTION), SECTION)
        return ModelConfig.from_dict(data), quant
    except (OSError, ValueError) as err:  # ConfigError is a ValueError too
        raise CheckpointError(f"{path}: {err}") from err


def load_quantized(
    directory: Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> Transformer:
    """A verified quantised checkpoint as a ready model in eval mode; `dtype` applies to the layers
    kept in full precision and to the activations, the quantised layers keep their formats."""
    verify(directory)
    config, quant = read_configs(directory)
    model = Transformer(config).to(dtype=dtype)
    try:
        quantized_skeleton(model, quant)
    except ConfigError as err:
        raise CheckpointError(f"{directory / 'config.json'}: {err}") from err
    model.to(device=device)
    state = read_weights(directory / "model.safetensors", model)
    _check_codes(state, model.state_dict(), str(directory))
    model.load_state_dict(state)
    return model.eval()


def _check_codes(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str) -> None:
    """The stored codes (integer or float8 tensors) have the dtype of the layers they load into."""
    for name, tensor in state.items():
        dtype = expected[name].dtype
        if tensor.dtype != dtype and (_is_code(tensor.dtype) or _is_code(dtype)):
            raise CheckpointError(f"{where}: tensor '{name}' is {tensor.dtype}, the layer stores {dtype}")


def _is_code(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point or dtype == FP8


def weights_bytes(directory: str | Path) -> int:
    """Bytes of a checkpoint's weight files (model.safetensors or its shards; not a run's training state)."""
    return sum(path.stat().st_size for path in listed_files(resolve(directory)))

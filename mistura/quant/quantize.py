"""`mistura quantize`: any model folder mistura loads, quantised into a new checkpoint."""

from __future__ import annotations

from pathlib import Path

from mistura.checkpoint import resolve
from mistura.errors import CheckpointError
from mistura.loading import load
from mistura.quant.checkpoint import is_quantized, save_quantized
from mistura.quant.model import QuantConfig, quantize_model


def quantize_checkpoint(src: str | Path, dst: str | Path, quant: QuantConfig) -> Path:
    """Write `dst`, a checkpoint of the model in `src` (checkpoint, run or Hugging Face folder) quantised."""
    directory = resolve(src)
    dst = Path(dst)
    if dst.resolve() == directory.resolve():
        raise CheckpointError(f"{dst}: the quantised checkpoint must go to another directory than {directory}")
    if is_quantized(directory):
        raise CheckpointError(f"{directory} is already quantised: quantise the full-precision model instead")
    model = quantize_model(load(directory), quant)
    tokenizer = directory / "tokenizer.json"
    return save_quantized(dst, model, quant, tokenizer if tokenizer.is_file() else None)

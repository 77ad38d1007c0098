"""`mistura.load`: any model folder mistura reads, as a ready model.

    model = mistura.load("runs/quickstart")            # a checkpoint, or a run's latest checkpoint
    model = mistura.load("hf/Qwen1.5-MoE-A2.7B")       # a Hugging Face folder, converted in memory
    tokenizer = mistura.load_tokenizer("runs/quickstart")

Each kind of folder is one entry of `FORMATS`: a test that recognises it and the function
that loads it. The entries are tried in order and the first that recognises the folder
loads it; the native checkpoint (mistura.checkpoint) comes last and takes the rest, so
a folder that is nothing at all is reported by the native loader (no manifest, no
config). A new format is one more entry here, and its module below this one.

This module sits above every format: the formats import mistura.checkpoint for its I/O,
and none of them imports this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from mistura.checkpoint import load_checkpoint, resolve
from mistura.convert.hf import is_hugging_face, load_hf
from mistura.convert.parallel import is_model_parallel, load_model_parallel
from mistura.data.tokenizer import load_tokenizer as read_tokenizer
from mistura.lora.checkpoint import adapter_base, is_adapter, load_adapted
from mistura.model import Transformer
from mistura.quant.checkpoint import is_quantized, load_quantized

Device = str | torch.device | None


@dataclass(frozen=True)
class Format:
    """One kind of model folder: how to recognise it, how to load it (device and dtype as `load` takes them)."""

    name: str
    recognise: Callable[[Path], bool]
    load: Callable[[Path, Device, torch.dtype | None], Transformer]


FORMATS = (
    Format("LoRA adapter folder", is_adapter, lambda folder, device, dtype: load_adapted(folder, load, device, dtype)),
    Format("Hugging Face folder", is_hugging_face, load_hf),
    Format("model-parallel folder", is_model_parallel, load_model_parallel),
    Format("quantised checkpoint", is_quantized, load_quantized),
    Format("mistura checkpoint", lambda directory: True, load_checkpoint),
)


def load(path: str | Path, device: Device = None, dtype: torch.dtype | None = None) -> Transformer:
    """A checkpoint, a run's latest checkpoint, a Hugging Face folder, a model-parallel folder
    (its rank files merged), a quantised checkpoint (see mistura.quant) or a LoRA adapter folder
    (the base it names, adapted; see mistura.lora), as a ready model in eval mode, on `device`
    and in `dtype` if given."""
    directory = locate(path)
    return find_format(directory).load(directory, device, dtype)


def locate(path: str | Path) -> Path:
    """The folder `load` reads: an adapter folder as it is (it has no config.json), else `resolve(path)`."""
    return Path(path) if is_adapter(Path(path)) else resolve(path)


def find_format(directory: Path) -> Format:
    """The first entry of FORMATS that recognises `directory`."""
    return next(entry for entry in FORMATS if entry.recognise(directory))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer saved with a checkpoint (or a run's latest checkpoint); an adapter folder's is its base's."""
    if is_adapter(Path(path)):
        return load_tokenizer(adapter_base(path))
    return read_tokenizer(resolve(path) / "tokenizer.json")

"""Checkpoint conversion between mistura and other formats.

- `hf`: Hugging Face folders both ways (`from_hf`, `to_hf`), streaming.
- `hf_models`: per Hugging Face model type, a name table, a config reader and a writer.
- `mapping`: a name table expanded for one model, read in both directions.
- `shards`: safetensors weights in one file or in shards with an index, read and written lazily.
- `fp8`, `parallel`: FP8 block quantisation, model-parallel checkpoints.

`mistura.checkpoint` reads weights through `shards`, and the converters build on
`mistura.checkpoint`; so importing this package imports no converter, and
`from mistura.convert import from_hf` loads `hf` on first use.
"""

import importlib
from typing import Any

__all__ = ["config_from_hf", "from_hf", "hf_config", "load_hf_folder", "state_dict_from_hf", "to_hf"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("mistura.convert.hf"), name)
    raise AttributeError(f"module 'mistura.convert' has no attribute {name!r}")

"""What mistura knows about each Hugging Face `model_type`: a name table, a config reader and a config writer.

Each family module of this package registers its model types here with `register`: an
`HFModelType` per model type, and the function that picks one of them for export.

A name table maps Hugging Face parameter names, with `{i}` for the layer index, to
mistura names. Most entries are renames. A tuple of targets marks a fused tensor, split
along its first dimension in the order given (GPT-2's `c_attn` holds q, k, then v).
`{e}` stands for the expert index: checkpoints store each routed expert's linears on
their own, `experts.{e}.gate_proj.weight` (F, D), and mistura stacks the experts' slices
into one (E, F, D) tensor. `transposed` lists the names stored as (in, out), the
transpose of `nn.Linear`, as GPT-2's `Conv1D` does. An entry applies only where the
config has its target: a bias only with biases, the dense MLP's names only in dense
layers, the experts' only in expert layers. The tables are plain dicts that
`mistura.convert.mapping` reads both ways: import and export share them.

A config reader turns config.json into a `ModelConfig`. An option that changes the
computation but that mistura does not implement raises ConfigError: building a slightly
different model without a word would be worse. A config writer does the inverse, for
export; it need not refuse anything itself, since `mistura.convert.hf.hf_config` reads
what it wrote back with the reader and refuses any computed field that changed.

Where the layout of the stored tensors depends on config.json, two more functions of it
say how: `row_orders`, the rows that mistura orders otherwise (DeepSeek-V3's interleaved
rotary channels), and `passed_over`, stored modules that mistura does not run
(DeepSeek-V3's multi-token-prediction layers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mistura.config import ModelConfig
from mistura.convert.mapping import Names
from mistura.errors import ConfigError


@dataclass(frozen=True)
class HFModelType:
    """How to read and write one Hugging Face `model_type` (its first four fields may be given in order)."""

    read_config: Callable[[dict[str, Any]], ModelConfig]
    write_config: Callable[[ModelConfig], dict[str, Any]]  # config.json fields, bar model_type, dtype, token ids
    architecture: str  # the causal-LM class config.json names, for AutoModelForCausalLM
    names: Names
    prefix: str = "model."  # what *ForCausalLM puts before the base model's names
    transposed: frozenset[str] = frozenset()  # HF templates stored as (in, out)
    ignored: tuple[str, ...] = ()  # HF templates of buffers that hold no weights
    # HF template -> the order of its rows in mistura (ours = hf[rows]), for a config.json and its ModelConfig.
    row_orders: Callable[[dict[str, Any], ModelConfig], dict[str, torch.Tensor]] = lambda hf, config: {}
    # Prefixes of stored HF names that import passes over, for a config.json and its ModelConfig.
    passed_over: Callable[[dict[str, Any], ModelConfig], tuple[str, ...]] = lambda hf, config: ()


# A family's choice for export: the model type of its own with a config's architecture, or None.
Pick = Callable[[ModelConfig], str | None]

MODEL_TYPES: dict[str, HFModelType] = {}
_PICKS: list[Pick] = []


def register(pick: Pick, **model_types: HFModelType) -> None:
    """Add a family: its model types, by name, and `pick`, its choice for export. A family picks only
    architectures that no other family has, so the order in which families register does not matter."""
    taken = MODEL_TYPES.keys() & model_types.keys()
    if taken:
        raise ValueError(f"Hugging Face model types registered twice: {', '.join(sorted(taken))}")
    MODEL_TYPES.update(model_types)
    _PICKS.append(pick)


def find_model_type(name: Any) -> HFModelType:
    """The entry of MODEL_TYPES for `name`, or a ConfigError listing the supported ones."""
    if name is None:
        raise ConfigError("config.json names no model_type: not a Hugging Face model config")
    if name not in MODEL_TYPES:
        raise ConfigError(
            f"Hugging Face model_type {name!r} is not supported; supported: {', '.join(sorted(MODEL_TYPES))}"
        )
    return MODEL_TYPES[name]


def model_type_for(config: ModelConfig) -> str:
    """The Hugging Face model_type with `config`'s architecture, told by its structure alone.

    Each family answers for its own architectures (see the `_export_type` of each). The
    choice may still miss a feature: `mistura.convert.hf.hf_config` checks.
    """
    for pick in _PICKS:
        model_type = pick(config)
        if model_type is not None:
            return model_type
    raise ConfigError(f"no Hugging Face model type has the architecture of {config.name!r}")

"""Import Hugging Face checkpoints: a folder with config.json and safetensors weights.

A Hugging Face checkpoint folder holds `config.json` and the weights: one
`model.safetensors`, or shards listed by `model.safetensors.index.json`.

- `config_from_hf` turns config.json into a `ModelConfig`, with the reader that
  `hf_models.MODEL_TYPES` holds for its `model_type`.
- `state_dict_from_hf` expands that model type's name table (Hugging Face name ->
  mistura name, `{i}` standing for the layer index) for every layer. It checks that the
  checkpoint has exactly the expected tensors, with the expected shapes, then renames
  each tensor, transposes those stored as (in, out) and splits the fused ones. The
  expected shapes come from a mistura model built on the meta device, so they cannot
  drift from the model code.
- `load_hf_folder` reads a folder and does both; `from_hf` also builds the model.

    >>> model = from_hf("path/to/folder")
    >>> config, state_dict = load_hf_folder("path/to/folder")

Weights are read with safetensors only. A pickled `pytorch_model.bin` can run arbitrary
code while it loads, so it is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from mistura.config import ModelConfig
from mistura.convert.hf_models import find_model_type
from mistura.errors import CheckpointError, ConfigError
from mistura.model import Transformer

Tensors = dict[str, torch.Tensor]
Shapes = dict[str, tuple[int, ...]]


def from_hf(path: str | Path) -> Transformer:
    """An fp32 mistura `Transformer`, in eval mode, with the weights of a Hugging Face folder."""
    config, state_dict = load_hf_folder(path)
    model = Transformer(config)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def load_hf_folder(path: str | Path) -> tuple[ModelConfig, Tensors]:
    """The mistura config and state dict of a Hugging Face checkpoint folder.

    Tensors keep the checkpoint's dtype. A problem with the files raises CheckpointError;
    a config that mistura cannot express raises ConfigError.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    hf_config = _read_json(folder / "config.json")
    config = config_from_hf(hf_config)
    return config, state_dict_from_hf(hf_config["model_type"], _read_weights(folder), config)


def config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face config.json, given as a dict.

    An option that mistura cannot reproduce raises ConfigError. Dropout rates are training
    choices, not part of the weights: they keep mistura's defaults (no dropout). Options
    missing from the dict take the defaults of the Hugging Face config class.
    """
    return find_model_type(hf_config.get("model_type")).read_config(hf_config)


def state_dict_from_hf(model_type: str, tensors: Tensors, config: ModelConfig) -> Tensors:
    """Hugging Face `tensors` renamed and reshaped into a state dict of `Transformer(config)`.

    Every parameter must come from exactly one checkpoint tensor of the expected shape,
    and every checkpoint tensor must be used, otherwise CheckpointError names the tensor.
    Buffers that hold no weights (GPT-2's causal mask) are skipped. With tied embeddings
    the head is the embedding: a stored copy of it is skipped, as Hugging Face does.
    Checkpoints of the bare base model (`GPT2Model`, `LlamaModel`) load too.
    """
    hf_type = find_model_type(model_type)
    shapes, tied = _parameter_shapes(config)
    rules = _expand(hf_type.names, config.n_layer)
    required = {hf: rule for hf, rule in rules.items() if all(t in shapes for t in rule.targets)}
    _check_covered(model_type, shapes, required)
    # Stored copies of tied parameters, and buffers that hold no weights.
    skipped = {hf for hf, rule in rules.items() if all(t in tied for t in rule.targets)}
    skipped |= {name.format(i=i) for name in hf_type.ignored for i in range(config.n_layer)}
    tensors = _with_prefix(tensors, hf_type.prefix)
    _check_names(tensors, required, skipped)
    state_dict: Tensors = {}
    for hf_name, rule in required.items():
        transposed = rule.template in hf_type.transposed
        state_dict |= _split(hf_name, tensors[hf_name], rule.targets, shapes, transposed)
    return state_dict | {alias: state_dict[owner] for alias, owner in tied.items()}


# ---------------------------------------------------------------------------------------
# Mapping and checking tensors.


class Rule(NamedTuple):
    """Where one concrete Hugging Face tensor goes."""

    template: str  # its name in the table, with `{i}`
    targets: tuple[str, ...]  # the mistura parameters it holds, in order along dim 0


def _parameter_shapes(config: ModelConfig) -> tuple[Shapes, dict[str, str]]:
    """Shapes of the parameters of `Transformer(config)`, and its tied names (alias -> owner).

    The model is built on the meta device, which allocates nothing and runs no init.
    """
    with torch.device("meta"):
        model = Transformer(config)
    shapes: Shapes = {}
    tied: dict[str, str] = {}
    owners: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in owners:
            tied[name] = owners[id(param)]
        else:
            owners[id(param)] = name
            shapes[name] = tuple(param.shape)
    return shapes, tied


def _expand(names: dict[str, str | tuple[str, ...]], n_layer: int) -> dict[str, Rule]:
    """The table with `{i}` replaced by every layer index: concrete HF name -> Rule."""
    rules: dict[str, Rule] = {}
    for template, ours in names.items():
        targets = (ours,) if isinstance(ours, str) else ours
        for i in range(n_layer) if "{i}" in template else (0,):
            rules[template.format(i=i)] = Rule(template, tuple(t.format(i=i) for t in targets))
    return rules


def _check_covered(model_type: str, shapes: Shapes, required: dict[str, Rule]) -> None:
    """Every mistura parameter needs a Hugging Face source; an adaptive norm's alpha has none."""
    covered = {target for rule in required.values() for target in rule.targets}
    uncovered = [name for name in shapes if name not in covered]
    if uncovered:
        raise ConfigError(f"the config has parameters that {model_type} checkpoints lack: {_some(uncovered)}")


def _with_prefix(tensors: Tensors, prefix: str) -> Tensors:
    """Names as *ForCausalLM saves them: the bare base model leaves out the prefix."""
    if any(name.startswith(prefix) for name in tensors):
        return tensors
    return {prefix + name: tensor for name, tensor in tensors.items()}


def _check_names(tensors: Tensors, required: dict[str, Rule], skipped: set[str]) -> None:
    missing = [name for name in required if name not in tensors]
    if missing:
        raise CheckpointError(
            f"the checkpoint is missing {_some(missing)} (the source of {', '.join(required[missing[0]].targets)})"
        )
    extra = sorted(name for name in tensors if name not in required and name not in skipped)
    if extra:
        raise CheckpointError(
            f"the checkpoint has unexpected tensors {_some(extra)} "
            "(a different architecture, or a config.json that does not match the weights?)"
        )


def _split(
    hf_name: str,
    tensor: torch.Tensor,
    targets: tuple[str, ...],
    shapes: Shapes,
    transposed: bool,
) -> Tensors:
    """One checkpoint tensor as mistura tensors: transposed if stored (in, out), split by rows."""
    rows = [shapes[target][0] for target in targets]
    expected = (sum(rows), *shapes[targets[0]][1:])
    if transposed:
        expected = expected[::-1]
    if tuple(tensor.shape) != expected:
        raise CheckpointError(
            f"{hf_name}: shape {tuple(tensor.shape)} in the checkpoint, expected {expected} for {', '.join(targets)}"
        )
    if transposed:
        tensor = tensor.t()
    return {target: part.contiguous() for target, part in zip(targets, tensor.split(rows))}


def _some(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


# ---------------------------------------------------------------------------------------
# Reading files.


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read JSON ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _read_weights(folder: Path) -> Tensors:
    """All tensors of `model.safetensors`, or of the shards its index lists."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return _read_safetensors(single)
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' of tensor name -> shard file")
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        return {
            name: tensor
            for shard, names in shards.items()
            for name, tensor in _read_safetensors(folder / shard, names).items()
        }
    pickled = " (pickled *.bin weights are refused: convert them to safetensors)"
    raise CheckpointError(
        f"{folder}: no model.safetensors or model.safetensors.index.json"
        + (pickled if any(folder.glob("*.bin")) else "")
    )


def _read_safetensors(path: Path, names: list[str] | None = None) -> Tensors:
    """The tensors `names` (default: all) of one safetensors file."""
    try:
        with safe_open(path, framework="pt") as file:
            stored = list(file.keys())
            absent = sorted(set(names or ()) - set(stored))
            if absent:
                raise CheckpointError(f"{path}: lacks {_some(absent)}, which the index places here")
            return {name: file.get_tensor(name) for name in (stored if names is None else names)}
    except (OSError, SafetensorError) as err:  # a missing shard, a truncated or corrupt file
        raise CheckpointError(f"{path}: cannot read safetensors ({err})") from err

"""Import Hugging Face checkpoints: a folder with config.json and safetensors weights.

A Hugging Face checkpoint folder holds `config.json` and the weights: one
`model.safetensors`, or shards listed by `model.safetensors.index.json`.

- `config_from_hf` turns config.json into a `ModelConfig`, with the reader that
  `hf_models.MODEL_TYPES` holds for its `model_type`.
- `state_dict_from_hf` expands that model type's name table (Hugging Face name ->
  mistura name, `{i}` standing for the layer index and `{e}` for the expert index) for
  every layer and expert. It checks that the checkpoint has exactly the expected tensors,
  with the expected shapes, then renames each tensor, transposes those stored as
  (in, out), splits the fused ones and stacks the experts' tensors. The expected shapes
  come from a mistura model built on the meta device, so they cannot drift from the
  model code.
- `convert_state_dict` does the same for any module and table: one MoE block, say.
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
from torch import nn

from mistura.config import ModelConfig
from mistura.convert.hf_models import Names, find_model_type
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
    choices, not part of the weights: they keep mistura's defaults (no dropout). So do the
    MoE auxiliary losses, router jitter and capacity: imported experts route dropless, as
    Hugging Face's do, and no balance loss is on. (Were it mapped, Hugging Face's
    router_aux_loss_coef weighs a balance loss top_k times mistura's `balance_loss`.)
    Options missing from the dict take the defaults of the Hugging Face config class.
    """
    return find_model_type(hf_config.get("model_type")).read_config(hf_config)


def state_dict_from_hf(model_type: str, tensors: Tensors, config: ModelConfig) -> Tensors:
    """Hugging Face `tensors` renamed and reshaped into a state dict of `Transformer(config)`.

    Checkpoints of the bare base model (`GPT2Model`, `LlamaModel`) load too. The rules are
    `convert_state_dict`'s.
    """
    hf_type = find_model_type(model_type)
    with torch.device("meta"):  # allocates nothing and runs no init
        model = Transformer(config)
    return convert_state_dict(
        model,
        _with_prefix(tensors, hf_type.prefix),
        hf_type.names,
        n_layer=config.n_layer,
        n_experts=config.moe.n_experts if config.moe is not None else 0,
        transposed=hf_type.transposed,
        ignored=hf_type.ignored,
        source=f"{model_type} checkpoints",
    )


def convert_state_dict(
    module: nn.Module,
    tensors: Tensors,
    names: Names,
    *,
    n_layer: int = 0,
    n_experts: int = 0,
    transposed: frozenset[str] = frozenset(),
    ignored: tuple[str, ...] = (),
    source: str = "the checkpoint",
) -> Tensors:
    """Hugging Face `tensors` renamed and reshaped by the name table `names` into a state dict of `module`.

    `{i}` in the table runs over n_layer layers, `{e}` over n_experts experts; `transposed`
    and `ignored` list templates of tensors stored as (in, out) and of buffers that hold no
    weights. Only the shapes of `module` are read, so it may live on the meta device.

    Every parameter must come from exactly one checkpoint tensor of the expected shape,
    and every checkpoint tensor must be used, otherwise CheckpointError names the tensor.
    With tied parameters (GPT-2's head is its embedding) a stored copy is skipped, as
    Hugging Face does. A persistent buffer that the table gives no source is zero: the
    router's selection bias, which only DeepSeek-V3 checkpoints hold (zero selects plain top-k).
    """
    shapes, tied, buffers = _expected_shapes(module)
    rules = _expand(names, n_layer, n_experts)
    required = {hf: rule for hf, rule in rules.items() if all(t in shapes for t in rule.targets)}
    _check_covered(source, [name for name in shapes if name not in buffers], required)
    # Stored copies of tied parameters, and buffers that hold no weights.
    skipped = {hf for hf, rule in rules.items() if all(t in tied for t in rule.targets)}
    skipped |= {name.format(i=i) for name in ignored for i in range(n_layer)}
    _check_names(tensors, required, skipped)
    state_dict = _renamed(tensors, required, shapes, transposed)
    state_dict |= {name: torch.zeros(shapes[name]) for name in buffers - state_dict.keys()}
    return state_dict | {alias: state_dict[owner] for alias, owner in tied.items()}


# ---------------------------------------------------------------------------------------
# Mapping and checking tensors.


class Rule(NamedTuple):
    """Where one concrete Hugging Face tensor goes."""

    template: str  # its name in the table, with `{i}` and `{e}`
    targets: tuple[str, ...]  # the mistura tensors it holds, in order along dim 0
    expert: int | None  # with `{e}`: the slice of the stacked targets it fills


def _expected_shapes(module: nn.Module) -> tuple[Shapes, dict[str, str], set[str]]:
    """Shapes of the parameters and persistent buffers of `module`, its tied names
    (alias -> owner), and which names are buffers."""
    shapes: Shapes = {}
    tied: dict[str, str] = {}
    owners: dict[int, str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in owners:
            tied[name] = owners[id(param)]
        else:
            owners[id(param)] = name
            shapes[name] = tuple(param.shape)
    buffers = {name for name in module.state_dict(keep_vars=True) if name not in shapes and name not in tied}
    shapes |= {name: tuple(module.get_buffer(name).shape) for name in buffers}
    return shapes, tied, buffers


def _expand(names: Names, n_layer: int, n_experts: int) -> dict[str, Rule]:
    """The table with `{i}` and `{e}` replaced by every layer and expert index: concrete HF name -> Rule."""
    rules: dict[str, Rule] = {}
    for template, ours in names.items():
        targets = (ours,) if isinstance(ours, str) else ours
        for i in range(n_layer) if "{i}" in template else (0,):
            for e in range(n_experts) if "{e}" in template else (None,):
                rules[template.format(i=i, e=e)] = Rule(template, tuple(t.format(i=i) for t in targets), e)
    return rules


def _check_covered(source: str, parameters: list[str], required: dict[str, Rule]) -> None:
    """Every mistura parameter needs a Hugging Face source; an adaptive norm's alpha has none."""
    covered = {target for rule in required.values() for target in rule.targets}
    uncovered = [name for name in parameters if name not in covered]
    if uncovered:
        raise ConfigError(f"the config has parameters with no source in {source}: {_some(uncovered)}")


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


def _renamed(tensors: Tensors, required: dict[str, Rule], shapes: Shapes, transposed: frozenset[str]) -> Tensors:
    """The required tensors under mistura's names; the experts' slices stacked in expert order."""
    state_dict: Tensors = {}
    experts: dict[str, list[torch.Tensor]] = {}  # stacked target -> its experts' slices
    for hf_name, rule in required.items():  # `_expand` lists the experts in order
        parts = _split(hf_name, tensors[hf_name], rule, shapes, rule.template in transposed)
        if rule.expert is None:
            state_dict |= parts
        else:
            for target, part in parts.items():
                experts.setdefault(target, []).append(part)
    return state_dict | {target: torch.stack(slices) for target, slices in experts.items()}


def _split(hf_name: str, tensor: torch.Tensor, rule: Rule, shapes: Shapes, transposed: bool) -> Tensors:
    """One checkpoint tensor as mistura tensors: transposed if stored (in, out), split by rows.

    An expert's tensor fills one slice of its stacked targets, so it lacks their first dimension.
    """
    target_shapes = [shapes[target] if rule.expert is None else shapes[target][1:] for target in rule.targets]
    rows = [shape[0] for shape in target_shapes]
    expected = (sum(rows), *target_shapes[0][1:])
    if transposed:
        expected = expected[::-1]
    if tuple(tensor.shape) != expected:
        raise CheckpointError(
            f"{hf_name}: shape {tuple(tensor.shape)} in the checkpoint, "
            f"expected {expected} for {', '.join(rule.targets)}"
        )
    if transposed:
        tensor = tensor.t()
    return {target: part.contiguous() for target, part in zip(rule.targets, tensor.split(rows))}


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

"""Hugging Face checkpoints both ways: a folder with config.json and safetensors weights.

A Hugging Face folder holds `config.json` and the weights: one `model.safetensors`, or
shards listed by `model.safetensors.index.json` (see `shards`).

    >>> from_hf("hf/Qwen3-30B-A3B", "ckpt/qwen3", dtype="bf16")   # streaming import -> checkpoint
    >>> to_hf("runs/quickstart", "hf/quickstart")                    # streaming export -> HF folder
    >>> model = from_hf("hf/Qwen1.5-MoE-A2.7B")                      # in memory (what mistura.load does)

The model type's entry in `families.MODEL_TYPES` supplies a name table, a config reader
and a config writer; `mapping.TensorMap` expands the table for the model and builds each
tensor of either side from the other's. Both conversions stream: every tensor of the
output is built from only the input tensors it needs, read lazily, and written into
shards of at most max_shard_size bytes, one shard in memory at a time.

- `config_from_hf` turns config.json into a `ModelConfig` (import); `hf_config` turns a
  `ModelConfig` into config.json (export) and refuses any feature the model type cannot
  express, by reading it back.
- Import checks that the checkpoint has exactly the expected tensors, with the expected
  shapes, before it writes anything; export checks the mistura checkpoint the same way.

Weights are read with safetensors only. A pickled `pytorch_model.bin` can run arbitrary
code while it loads, so it is refused.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, overload

import torch
from tokenizers import Tokenizer
from torch import nn

from mistura.atomic import atomic_directory
from mistura.checkpoint import (
    MANIFEST,
    WEIGHTS_METADATA,
    check_shapes,
    checkpoint_directory,
    read_config,
    resolve,
    verify,
    write_config,
)
from mistura.config import ModelConfig
from mistura.convert.families import find_model_type, model_type_for
from mistura.convert.mapping import Names, Read, TensorMap, some
from mistura.convert.parallel import write_model_parallel
from mistura.data.tokenizer import BOS, BOS_ID, EOS, EOS_ID, PAD, PAD_ID
from mistura.errors import CheckpointError, ConfigError
from mistura.model import Transformer
from mistura.shards import (
    DEFAULT_SHARD_SIZE,
    WeightFiles,
    parse_dtype,
    parse_size,
    tensor_bytes,
    write_weights,
)

Tensors = dict[str, torch.Tensor]

# Tokenizer files that travel with the weights, both ways.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# A mistura tokenizer's special tokens, by the names Hugging Face gives their roles.
SPECIAL_TOKENS = {"pad": (PAD, PAD_ID), "bos": (BOS, BOS_ID), "eos": (EOS, EOS_ID)}

# Fields that do not change what a model computes once trained: its name, initialisation,
# dropout, and the MoE options that act only in training (capacity drops assignments in
# training mode only; evaluation is dropless, as Hugging Face's models are).
_TRAINING_ONLY = {"name", "init_std", "scaled_init", "attn_dropout", "resid_dropout", "mlp_dropout",
                  "first_dense_layers"}  # fmt: skip
_MOE_TRAINING_ONLY = {"capacity_factor", "balance_bias_rate", "aux_loss_weight", "seq_aux_loss_weight", "z_loss_weight",
                      "entropy_weight", "diversity_loss_weight"}  # fmt: skip


@overload
def from_hf(hf_dir: str | Path, *, dtype: torch.dtype | str | None = None) -> Transformer: ...


@overload
def from_hf(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
    progress: bool = False,
    model_parallel: int | None = None,
) -> Path: ...


def from_hf(
    hf_dir, out_dir=None, *, dtype=None, max_shard_size=DEFAULT_SHARD_SIZE, progress=False, model_parallel=None
):
    """Import a Hugging Face folder: as a mistura `Transformer` in memory, in eval mode (fp32
    unless `dtype`), or with `out_dir` into a mistura checkpoint directory, one tensor at a time.

    Converting, each mistura tensor is read from just the Hugging Face tensors it needs (a
    layer's stacked experts read that layer's expert tensors) and written into shards of
    at most max_shard_size bytes ("5GB", "500MB" or a count). Tensors keep their dtype
    unless `dtype` ("bf16", torch.float32, ...) is given. The tokenizer files come along.
    The checkpoint appears whole or not at all. With `model_parallel` n, the output is
    instead n rank files split for tensor and expert parallelism (mistura.convert.parallel),
    written one rank at a time; `mistura.load` merges them back. Stored modules that take no part in the
    model's logits, DeepSeek-V3's multi-token-prediction layers, are left out, as
    Hugging Face's own model leaves them out.
    """
    cast, limit = parse_dtype(dtype), parse_size(max_shard_size)
    if out_dir is None:
        config, state_dict = load_hf_folder(hf_dir)
        model = Transformer(config)
        model.load_state_dict(state_dict, strict=True)
        return model.to(dtype=cast).eval()
    folder, model_type, config, mapped = _open_hf(hf_dir)
    out = new_folder(out_dir, folder)
    with WeightFiles(folder) as files:
        read, stored_dtype = _hf_reader(files, mapped, find_model_type(model_type).prefix)
        dtypes = {name: cast or stored_dtype(sources[0]) for name, sources in mapped.feeds.items()}
        dtypes |= {name: cast or files.main_dtype() for name in mapped.unfed}  # buffers no Hugging Face tensor holds

        def build(name: str) -> torch.Tensor:
            return mapped.ours(name, read).to(dtypes[name])

        if model_parallel is not None:
            tokenizer = folder / "tokenizer.json"
            return write_model_parallel(
                out,
                config,
                build,
                list(mapped.shapes),
                model_parallel,
                tokenizer if tokenizer.is_file() else None,
                progress,
            )
        sizes = {name: tensor_bytes(shape, dtypes[name]) for name, shape in mapped.shapes.items()}
        with checkpoint_directory(out) as tmp:
            write_config(tmp, config)
            write_weights(tmp, sizes, build, limit, WEIGHTS_METADATA, progress)
            _copy_tokenizer(folder, tmp)
    return out


def load_hf(directory: Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Transformer:
    """A Hugging Face folder as a ready mistura model in eval mode (`mistura.load`'s entry for these folders)."""
    return from_hf(directory).to(device=device, dtype=dtype)


def is_hugging_face(directory: Path) -> bool:
    """A Hugging Face folder: its config.json names a `model_type` and it has no mistura manifest."""
    if (directory / MANIFEST).exists():
        return False
    try:
        return "model_type" in json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # unreadable, not UTF-8 or not JSON
        return False


def to_hf(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    model_type: str | None = None,
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
    progress: bool = False,
) -> Path:
    """Write a mistura checkpoint (or a run's latest) as a Hugging Face folder that
    `AutoModelForCausalLM.from_pretrained` loads with no custom code.

    The model type is the one the architecture calls for (`model_type_for`) unless
    `model_type` names an equivalent one (mistral for a Llama-shaped model, say). A
    feature that the model type cannot express raises ConfigError naming it, before
    anything is written. Tensors stream as in `from_hf` and keep their dtype, which
    config.json states. A mistura tokenizer.json comes along with a tokenizer_config.json,
    so `AutoTokenizer` loads it too.

    Tensors are written in mistura's layout where a model type allows two: a DeepSeek-V3
    model imported from a checkpoint with interleaved rotary channels comes back with the
    same outputs, its rotary rows de-interleaved and config.json saying rope_interleave false.
    """
    limit = parse_size(max_shard_size)
    directory = resolve(checkpoint)
    if is_hugging_face(directory):
        raise CheckpointError(f"{directory} is already a Hugging Face folder")
    out = new_folder(out_dir, directory)
    verify(directory)
    config = read_config(directory)
    model_type = model_type or model_type_for(config)
    written = hf_config(config, model_type)
    mapped = tensor_map(model_type, config, written)
    with WeightFiles(directory) as files:
        check_export_source(files, mapped, directory, f"Hugging Face's {model_type}")
        sizes = {
            name: tensor_bytes(mapped.hf_shape(name), files.dtype(mapped.rules[name].targets[0]))
            for name in mapped.hf_names()
        }
        with atomic_directory(out) as tmp:
            token_ids = _export_tokenizer(directory, tmp, config)
            written |= {"dtype": str(files.main_dtype()).removeprefix("torch."), **token_ids}
            (tmp / "config.json").write_text(json.dumps(written, indent=2), encoding="utf-8")
            write_weights(tmp, sizes, lambda name: mapped.theirs(name, files.read), limit, {"format": "pt"}, progress)
    return out


def check_export_source(files: WeightFiles, mapped: TensorMap, directory: Path, target: str) -> None:
    """A checkpoint's tensors are those the map expects, and no buffer that `target` has no tensor for is set."""
    check_shapes(files.shapes, mapped.shapes, str(directory))
    for name in mapped.unfed:
        if files.read(name).count_nonzero():
            raise ConfigError(f"{name} is not zero, and {target} has no tensor to hold it")


def load_hf_folder(path: str | Path) -> tuple[ModelConfig, Tensors]:
    """The mistura config and state dict of a Hugging Face checkpoint folder.

    Tensors keep the checkpoint's dtype. A problem with the files raises CheckpointError;
    a config that mistura cannot express raises ConfigError.
    """
    folder, model_type, config, mapped = _open_hf(path)
    with WeightFiles(folder) as files:
        read, _ = _hf_reader(files, mapped, find_model_type(model_type).prefix)
        return config, _state_dict(mapped, read)


def config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face config.json, given as a dict.

    An option that mistura cannot reproduce raises ConfigError. Dropout rates are training
    choices, not part of the weights: they keep mistura's defaults (no dropout). So do the
    MoE auxiliary losses, router jitter and capacity: imported experts route dropless, as
    Hugging Face's do, and no balance loss is on. (Were it mapped, Hugging Face's
    router_aux_loss_coef weighs a balance loss top_k times mistura's `balance_loss`.)
    Options missing from the dict take the defaults of the Hugging Face config class.
    """
    quantization = hf_config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        if method == "fp8":
            raise ConfigError(
                "the weights are FP8-quantised (quantization_config.quant_method 'fp8'): "
                "convert them to bf16 first with `mistura convert fp8-to-bf16 HF_DIR OUT_DIR`"
            )
        raise ConfigError(f"quantised checkpoints (quant_method {method!r}) are not supported")
    return find_model_type(hf_config.get("model_type")).read_config(hf_config)


def hf_config(config: ModelConfig, model_type: str | None = None) -> dict[str, Any]:
    """The Hugging Face config.json of `config` as `model_type` (default: `model_type_for`),
    without dtype and token ids.

    What the writer wrote is read back with the importer's reader: any field that changes
    what the model computes and does not come back the same raises ConfigError naming it,
    so export never builds a slightly different model in silence.
    """
    model_type = model_type or model_type_for(config)
    hf_type = find_model_type(model_type)
    moc = [i for i, kind in enumerate(config.layer_mlp) if kind == "moc"]
    if moc:
        raise ConfigError(f"collaborative experts (layer kind 'moc', layers {moc}) have no Hugging Face equivalent")
    written = {"architectures": [hf_type.architecture], "model_type": model_type, **hf_type.write_config(config)}
    try:
        read_back = hf_type.read_config(written)
    except ConfigError as err:
        raise ConfigError(f"cannot export as Hugging Face's {model_type}: {err}") from err
    ours, theirs = _computed_fields(config), _computed_fields(read_back)
    lost = [f"{key}={ours.get(key)!r}" for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key)]
    if lost:
        raise ConfigError(
            f"Hugging Face's {model_type} cannot express {some(sorted(lost), 5)} "
            "(choose another model type, or a config without these features)"
        )
    return written


def tensor_map(model_type: str, config: ModelConfig, hf: dict[str, Any] | None = None) -> TensorMap:
    """The name table of `model_type` expanded for `Transformer(config)`.

    `hf`, the config.json, decides what the layout of the tensors may depend on (the row
    order of DeepSeek-V3's rotary channels, its multi-token-prediction layers); None
    stands for a config.json with Hugging Face's defaults.
    """
    hf_type, hf = find_model_type(model_type), hf or {}
    with torch.device("meta"):  # allocates nothing and runs no init
        model = Transformer(config)
    return TensorMap.build(
        model,
        hf_type.names,
        n_layer=config.n_layer,
        n_experts=config.moe.n_experts if config.moe is not None else 0,
        transposed=hf_type.transposed,
        ignored=hf_type.ignored,
        rows=hf_type.row_orders(hf, config),
        passed_over=hf_type.passed_over(hf, config),
        source=f"{model_type} checkpoints",
    )


def state_dict_from_hf(
    model_type: str, tensors: Tensors, config: ModelConfig, hf: dict[str, Any] | None = None
) -> Tensors:
    """Hugging Face `tensors` renamed and reshaped into a state dict of `Transformer(config)`,
    laid out as config.json `hf` says (see `tensor_map`).

    Checkpoints of the bare base model (`GPT2Model`, `LlamaModel`) load too.
    """
    stored = _hf_names(tensors, find_model_type(model_type).prefix)
    return _from_tensors(tensor_map(model_type, config, hf), {name: tensors[s] for name, s in stored.items()})


def convert_state_dict(module: nn.Module, tensors: Tensors, names: Names, **options: Any) -> Tensors:
    """Hugging Face `tensors` renamed and reshaped by the name table `names` into a state dict
    of `module` (one MoE block, say); `options` are `TensorMap.build`'s."""
    return _from_tensors(TensorMap.build(module, names, **options), tensors)


# ---------------------------------------------------------------------------------------
# Helpers.


def _computed_fields(config: ModelConfig) -> dict[str, Any]:
    """The fields that decide a model's outputs, flattened (moe.top_k), leaving out those its layers never use."""
    fields = {key: value for key, value in config.to_dict().items() if key not in _TRAINING_ONLY}
    moe = fields.pop("moe", None)
    kinds = set(config.layer_mlp)
    if "dense" not in kinds:
        del fields["d_ff"], fields["mlp"]
    if config.position == "learned":
        del fields["rope_theta"]
    if moe is not None and kinds != {"dense"}:
        unused = _MOE_TRAINING_ONLY | ({"moc_heads"} if "moc" not in kinds else set())
        fields |= {f"moe.{key}": value for key, value in moe.items() if key not in unused}
    return fields


def new_folder(out_dir: str | Path, source: Path) -> Path:
    """The output folder of a conversion: never its input, never a folder that holds anything."""
    out = Path(out_dir)
    if out.resolve() == source.resolve():
        raise ConfigError(f"{out}: the output folder must not be the input folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not an empty folder: choose a new output folder")
    return out


def _open_hf(path: str | Path) -> tuple[Path, str, ModelConfig, TensorMap]:
    """A Hugging Face folder's path, model type, mistura config and tensor map."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    if (folder / MANIFEST).is_file():
        raise CheckpointError(f"{folder} is a mistura checkpoint already, not a Hugging Face folder")
    hf = read_json(folder / "config.json")
    config = config_from_hf(hf)
    return folder, hf["model_type"], config, tensor_map(hf["model_type"], config, hf)


def _hf_reader(files: WeightFiles, mapped: TensorMap, prefix: str) -> tuple[Read, Callable[[str], torch.dtype]]:
    """Readers of a folder's tensors and of their dtypes, by the names *ForCausalLM gives them,
    once the names and shapes are checked against the map."""
    stored = _hf_names(files.shapes, prefix)
    mapped.check({name: files.shapes[s] for name, s in stored.items()})
    return lambda name, index: files.read(stored[name], index), lambda name: files.dtype(stored[name])


def _from_tensors(mapped: TensorMap, tensors: Tensors) -> Tensors:
    """A state dict from Hugging Face tensors held in memory, once their names and shapes are checked."""
    mapped.check({name: tuple(tensor.shape) for name, tensor in tensors.items()})
    return _state_dict(mapped, lambda name, index: tensors[name] if index is None else tensors[name][index])


def _hf_names(names: Iterable[str], prefix: str) -> dict[str, str]:
    """Name as *ForCausalLM saves it -> stored name; the bare base model leaves out the prefix."""
    if any(name.startswith(prefix) for name in names):
        return {name: name for name in names}
    return {prefix + name: name for name in names}


def _state_dict(mapped: TensorMap, read: Read) -> Tensors:
    """Every mistura tensor of the map, tied aliases included."""
    state_dict = {name: mapped.ours(name, read) for name in mapped.shapes}
    return state_dict | {alias: state_dict[owner] for alias, owner in mapped.tied.items()}


def _copy_tokenizer(source: Path, target: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)


def _export_tokenizer(checkpoint: Path, folder: Path, config: ModelConfig) -> dict[str, int | None]:
    """Copy the tokenizer files into a Hugging Face folder; the token ids its config.json names.

    A mistura tokenizer gets a tokenizer_config.json naming its special tokens, unless the
    checkpoint carries one (imported from Hugging Face in the first place).
    """
    _copy_tokenizer(checkpoint, folder)
    ids = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if not (folder / "tokenizer.json").is_file():
        return ids
    try:
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as err:  # tokenizers raises a bare Exception for any unreadable file
        raise CheckpointError(f"{checkpoint / 'tokenizer.json'} is not a tokenizer file: {err}") from err
    special = {
        role: (token, id_) for role, (token, id_) in SPECIAL_TOKENS.items() if tokenizer.token_to_id(token) == id_
    }
    if not (folder / "tokenizer_config.json").is_file():
        tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.max_seq_len}
        tokenizer_config |= {f"{role}_token": token for role, (token, _) in special.items()}
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    return ids | {f"{role}_token_id": id_ for role, (_, id_) in special.items()}


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # unreadable, not UTF-8 or not JSON
        raise CheckpointError(f"{path}: cannot read JSON ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data

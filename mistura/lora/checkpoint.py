"""Adapter folders: a LoRA adapter saved alone, small, and read back onto its base.

    <dir>/adapter_config.json    {"format": "mistura-lora", "lora": LoRAConfig, "layers": [adapted layers],
                                  "base": {"path": hint, "config": ModelConfig, "config_sha256": ...}}
    <dir>/adapter.safetensors    the adapters' tensors: <layer>.lora_A (r, in), <layer>.lora_B (out, r),
                                 and for routed experts <layer>.lora_A.<proj> (E, r, in), .lora_B.<proj> (E, out, r)
    <dir>/manifest.json          size and sha256 of the two, written last (see mistura.checkpoint)

The folder appears whole or not at all. Loading verifies the manifest, then compares the
base's config with the one the adapter was made for: a field that changes the tensors or
what they compute (d_model, n_layer, vocab_size, ...) refuses the load by name, before the
model changes. Training-only fields (name, initialisation, dropout) may differ. The base
path is a hint, kept for `mistura.load(adapter)` and `mistura lora merge`; the base itself
may be full precision or quantised (QLoRA), in any format `mistura.load` reads.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mistura.checkpoint import WEIGHTS_METADATA, checkpoint_directory, verify
from mistura.errors import CheckpointError, ConfigError
from mistura.lora.config import LoRAConfig
from mistura.lora.model import adapter_state, load_adapter_state, lora_config, lora_layers
from mistura.model import Transformer

CONFIG = "adapter_config.json"
WEIGHTS = "adapter.safetensors"
FORMAT = "mistura-lora"
# ModelConfig fields that change neither the tensors nor what they compute once trained.
TRAINING_ONLY = {"name", "init_std", "scaled_init", "attn_dropout", "resid_dropout", "mlp_dropout",
                 "first_dense_layers", "moe.capacity_factor", "moe.balance_bias_rate", "moe.aux_loss_weight",
                 "moe.seq_aux_loss_weight", "moe.z_loss_weight", "moe.entropy_weight",
                 "moe.diversity_loss_weight"}  # fmt: skip


def save_adapter(model: Transformer, directory: str | Path, base: str | Path | None = None) -> Path:
    """Save `model`'s adapters alone as an adapter folder, atomically; `base`, the base's path, is kept as a hint."""
    directory = Path(directory)
    config = lora_config(model)
    base_config = model.config.to_dict()
    metadata = {
        "format": FORMAT,
        "lora": config.to_dict(),
        "layers": list(lora_layers(model)),
        "base": {
            "path": None if base is None else str(Path(base).resolve()),
            "config": base_config,
            "config_sha256": _fingerprint(base_config),
        },
    }
    with checkpoint_directory(directory) as tmp:
        (tmp / CONFIG).write_text(json.dumps(metadata, indent=2), encoding="utf-8")
        save_file(adapter_state(model), tmp / WEIGHTS, metadata=WEIGHTS_METADATA)
    return directory


def is_adapter(directory: Path) -> bool:
    """Whether `directory` is a mistura adapter folder (a PEFT folder, with its own adapter_config.json, is not)."""
    try:
        return json.loads((directory / CONFIG).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, or not an object
        return False


def load_adapter(model: Transformer, directory: str | Path) -> Transformer:
    """Adapt `model` in place with the adapter folder's tensors, once the adapter is known to be made for it."""
    directory = Path(directory)
    config, metadata = read_adapter_config(directory)
    check_base(metadata["base"]["config"], model.config.to_dict(), str(directory / CONFIG))
    load_adapter_state(model, config, read_adapter_weights(directory), str(directory / WEIGHTS))
    return model


def read_adapter_config(directory: Path) -> tuple[LoRAConfig, dict[str, Any]]:
    """The LoRAConfig of a verified adapter folder, and its whole adapter_config.json."""
    if not directory.is_dir():
        raise CheckpointError(f"adapter not found: {directory}")
    verify(directory)
    path = directory / CONFIG
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
            raise ConfigError(f'not a mistura adapter config (expected "format": "{FORMAT}")')
        config = LoRAConfig.from_dict(metadata["lora"])
        if not isinstance(metadata["base"]["config"], dict):
            raise ConfigError("base.config is not a mapping")
    except KeyError as err:
        raise CheckpointError(f"{path}: missing key {err}") from err
    except (OSError, ValueError, TypeError) as err:  # ConfigError is a ValueError too
        raise CheckpointError(f"{path}: {err}") from err
    return config, metadata


def read_adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err


def check_base(made_for: dict[str, Any], base: dict[str, Any], where: str) -> None:
    """CheckpointError naming the fields in which `base`'s config differs from the one the adapter was made for."""
    if _fingerprint(made_for) == _fingerprint(base):
        return
    ours, theirs = _flat(made_for), _flat(base)
    differ = sorted(key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key))
    if differ:
        shown = ", ".join(f"{key}={ours.get(key)!r} (this base: {theirs.get(key)!r})" for key in differ[:5])
        raise CheckpointError(f"{where}: the adapter was made for another base: {shown}")


def adapter_base(directory: str | Path) -> Path:
    """The base path an adapter folder names; CheckpointError where it names none or it is gone."""
    _, metadata = read_adapter_config(Path(directory))
    base = metadata["base"].get("path")
    if base is None or not Path(base).exists():
        where = "names no base" if base is None else f"names the base {base}, which is not there"
        raise CheckpointError(f"{Path(directory) / CONFIG} {where}: give the base checkpoint explicitly (--base)")
    return Path(base)


def load_adapted(
    directory: Path,
    load: Callable[[Path, Any, torch.dtype | None], Transformer],
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Transformer:
    """The base an adapter folder names, loaded by `load` (mistura.load), with the adapter applied, in eval mode."""
    return load_adapter(load(adapter_base(directory), device, dtype), directory).eval()


def _fingerprint(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict with its sections flattened (moe.top_k) and the training-only fields left out."""
    flat = {}
    for key, value in config.items():
        flat |= {f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value}
    return {key: value for key, value in flat.items() if key not in TRAINING_ONLY}

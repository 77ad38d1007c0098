"""The training state saved beside the weights: everything `--resume` needs to continue exactly.

    train_state.json          step, seconds spent training (for a time budget), data
                              loader position, optimizer hyper-parameters, the resolved
                              run config
    train_state.safetensors   optimizer moments, RNG states, and with EMA on the raw
                              (non-averaged) weights, since model.safetensors then
                              holds the average

A distributed checkpoint (see mistura.parallel.dcp) keeps the optimizer's tensors and the raw
weights in its shards instead; its train_state.safetensors holds the RNG states alone.

Tensors go to safetensors and everything else to JSON: nothing is pickled, so a
checkpoint from an untrusted source cannot run code when loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mistura.errors import CheckpointError

STATE_JSON = "train_state.json"
STATE_TENSORS = "train_state.safetensors"


def save_state(
    directory: Path,
    *,
    step: int,
    train_seconds: float,
    optimizer: torch.optim.Optimizer | list[dict[str, Any]],
    loader_state: dict[str, Any],
    run_config: dict[str, Any],
    extra_tensors: dict[str, torch.Tensor] | None = None,
    extra_state: dict[str, Any] | None = None,
) -> None:
    """Write the training state into `directory` (tensors: optimizer.*, rng.*, and `extra_tensors` as given;
    `extra_state`, JSON values, under "extra"). For a distributed checkpoint, whose shards hold the optimizer's
    tensors, `optimizer` is its param groups alone."""
    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer_meta = _add_optimizer(optimizer, tensors)
    else:
        optimizer_meta = {"param_groups": optimizer, "scalars": {}}
    for name, value in (extra_tensors or {}).items():
        tensors[name] = value.detach().contiguous().cpu()
    save_file(tensors, directory / STATE_TENSORS)
    meta = {
        "step": step,
        "train_seconds": train_seconds,
        "loader": loader_state,
        "optimizer": optimizer_meta,
        "run_config": run_config,
        "extra": extra_state or {},
    }
    (directory / STATE_JSON).write_text(json.dumps(meta, indent=1), encoding="utf-8")


def _add_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Put the optimizer's tensors into `tensors` (optimizer.<index>.<slot>); the rest, as JSON values."""
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, slots in opt["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return {"param_groups": opt["param_groups"], "scalars": scalars}


def load_state(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON part and the tensors of a saved training state."""
    json_path, tensor_path = directory / STATE_JSON, directory / STATE_TENSORS
    if not json_path.is_file() or not tensor_path.is_file():
        raise CheckpointError(f"{directory} has no training state ({STATE_JSON}, {STATE_TENSORS}): cannot resume")
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
        tensors = load_file(tensor_path)
    except (json.JSONDecodeError, SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read the training state in {directory}: {err}") from err
    return meta, tensors


def train_seconds(meta: dict[str, Any]) -> float:
    """The seconds a saved run had spent training; 0 for a state saved before they were recorded."""
    return float(meta.get("train_seconds", 0.0))


def restore_optimizer(optimizer: torch.optim.Optimizer, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, slots in meta["optimizer"]["scalars"].items():
        state.setdefault(int(index), {}).update(slots)
    expected = sum(len(g["params"]) for g in optimizer.param_groups)
    saved = sum(len(g["params"]) for g in meta["optimizer"]["param_groups"])
    if saved != expected:
        raise CheckpointError(f"the saved optimizer holds {saved} parameters, this model has {expected}")
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])

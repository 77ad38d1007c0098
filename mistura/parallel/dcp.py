"""Distributed checkpoints with torch.distributed.checkpoint (DCP): every process writes its own shards.

A sharded run (parallel.data_parallel: fsdp) saves each checkpoint as one folder:

    checkpoints/step-0000020/
        shards/shard-00001-model-00001-of-00001.safetensors, shard-00002-...   one file per process:
              its shards of "model" (the weights evaluation uses, the EMA average when on), of the
              optimizer's moments ("optimizer") and, with EMA, of the trained weights ("raw")
        config.json, tokenizer.json, train_state.json (with the optimizer's hyper-parameters),
        train_state.safetensors (RNG), manifest.json (every file, the shards included)

The shard files are safetensors, written and read through DCP's Hugging Face storage: each file's
header records where its pieces sit in the whole tensors, so reading a checkpoint unpickles
nothing, and a checkpoint saved by N processes loads at any other number, one process included:
`load` reshards into whatever layout the receiving tensors have (DTensor shards or plain
tensors). `mistura.load` and `mistura convert from-distributed` read such a folder as a whole model.

Saving is atomic as every mistura checkpoint is: rank 0 opens a hidden staging folder and tells
the others its name, all write their shards into it, and rank 0, once DCP has gathered every
process's write results, writes the rest and the manifest and renames the folder into place. A
run killed while saving leaves only the hidden folder, which resuming ignores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh

from mistura.checkpoint import SHARDS, checkpoint_directory, stored_names
from mistura.model import Transformer
from mistura.parallel import distributed, expert

Tensors = dict[str, Any]  # nested dicts of tensors, by parameter name


def save(final: Path, tensors: Tensors, write_rest: Callable[[Path], None]) -> None:
    """Every process: write its shards of `tensors` into the checkpoint `final`; rank 0 adds the files
    `write_rest` writes into the staging folder, then the checkpoint appears whole."""
    staging = checkpoint_directory(final) if distributed.is_main() else contextlib.nullcontext()
    with staging as folder:
        folder = _broadcast(folder)
        dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(folder / SHARDS), save_distributed=True))
        if distributed.is_main():
            write_rest(folder)
    distributed.barrier()  # nobody goes on before the checkpoint is in place


def load(directory: Path, tensors: Tensors) -> None:
    """Fill `tensors` in place from a distributed checkpoint, resharded to their layout."""
    dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(directory / SHARDS)))


def training_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    averaged: torch.nn.Module | None = None,
    expert_mesh: DeviceMesh | None = None,
) -> tuple[Tensors, list[dict[str, Any]]]:
    """What a sharded run saves and resumes: its tensors (weights and optimizer moments, by parameter name)
    and the optimizer's param groups (JSON values). With EMA, `averaged` is the average that "model" holds
    and the trained weights go under "raw". With experts split over `expert_mesh`, their entries are
    DTensors of the whole stacks (see mistura.parallel.expert.as_global_)."""
    optimizer_state = get_optimizer_state_dict(model, optimizer)
    tensors = {"model": weights(averaged if averaged is not None else model), "optimizer": optimizer_state["state"]}
    if averaged is not None:
        tensors["raw"] = weights(model)
    if expert_mesh is not None:
        for part in tensors.values():
            expert.as_global_(part, model, expert_mesh)
    return tensors, optimizer_state["param_groups"]


def weights(model: Transformer) -> Tensors:
    """The model's parameters and buffers by name, a tied head once (as its embedding), as the native format."""
    state = get_model_state_dict(model)
    return {name: state[name] for name in stored_names(model)}


def restore(
    directory: Path,
    param_groups: list[dict[str, Any]],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    averaged: torch.nn.Module | None = None,
    expert_mesh: DeviceMesh | None = None,
) -> None:
    """Load a checkpoint `training_state` saved (its param groups read back from JSON) into the model, its
    optimizer and the EMA average."""
    tensors, _ = training_state(model, optimizer, averaged, expert_mesh)
    load(directory, tensors)
    for part in tensors.values():
        expert.as_local_(part, model)
    weights = tensors["raw"] if averaged is not None else tensors["model"]
    optimizer_state = {"state": tensors["optimizer"], "param_groups": param_groups}
    # Not strict: a tied head is its embedding, loaded under that name; `load` has found every other name.
    options = StateDictOptions(strict=False)
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optimizer_state, options=options)
    if averaged is not None:
        set_model_state_dict(averaged, tensors["model"], options=options)


def _broadcast(folder: Path | None) -> Path:
    """Rank 0's staging folder, on every process."""
    if not distributed.initialized():
        return folder
    names = [str(folder) if folder is not None else None]
    dist.broadcast_object_list(names, src=0)
    return Path(names[0])

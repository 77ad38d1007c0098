"""Checkpoint directories, the unit every command exchanges.

    <dir>/config.json         the model config (ModelConfig.to_dict)
    <dir>/model.safetensors   the weights (a tied lm_head is stored once, as tok_emb)
    <dir>/tokenizer.json      the tokenizer the model was trained with
    <dir>/manifest.json       byte size and sha256 of every other file, written last

A large model's weights may instead come in shards, `model-00001-of-0000N.safetensors`
and so on, listed by `model.safetensors.index.json`: Hugging Face's layout, which
conversions write (see mistura.shards); training writes the single file. Loading
reads either, one tensor at a time, and the manifest covers every shard and the index.

A sharded training run (parallel.data_parallel: fsdp) writes its weights as a distributed
checkpoint instead, one safetensors file of shards per process in `<dir>/shards/` (see
mistura.parallel.dcp); loading reads those files into the whole model just the same.

Training runs add their state files (see mistura.train.state). A run directory keeps
its checkpoints as `<run>/checkpoints/step-XXXXXXX`; anything that takes a checkpoint
also takes the run directory and uses its latest checkpoint.

Directories are written under a temporary name and renamed into place, so a crash
never leaves a half-written checkpoint; loading verifies the manifest, so a truncated
or edited file is reported by name instead of failing deep inside torch.

This module is the native format only, and the I/O the other formats build on (atomic
directories, manifests, shape checks); `mistura.load` (mistura.loading) recognises every
format and dispatches, and nothing here imports a converter.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mistura.atomic import atomic_directory
from mistura.config import ModelConfig
from mistura.errors import CheckpointError, ConfigError
from mistura.model import Transformer
from mistura.shards import WeightFiles

MANIFEST = "manifest.json"
SHARDS = "shards"  # a distributed checkpoint's folder of per-process safetensors files
STEP_PREFIX = "step-"
WEIGHTS_METADATA = {"format": "pt", "mistura": "1"}


@contextmanager
def checkpoint_directory(final: Path) -> Iterator[Path]:
    """An atomic directory (see mistura.atomic) whose manifest is written last, just before the rename."""
    with atomic_directory(final) as tmp:
        yield tmp
        _write_manifest(tmp)


def _write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(directory: Path) -> None:
    """Check every file against the manifest: present, same size, same hash."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory} has no {MANIFEST}: not a complete mistura checkpoint")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except ValueError as err:  # not UTF-8, or not JSON
        raise CheckpointError(f"{manifest_path} is corrupt: {err}") from err
    if not isinstance(manifest, dict) or not all(_is_entry(entry) for entry in manifest.values()):
        raise CheckpointError(f"{manifest_path} is corrupt: expected an object of file name -> {{bytes, sha256}}")
    for name, expected in manifest.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{path} is truncated or altered: {size} bytes, expected {expected['bytes']}")
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path} does not match its checksum: the file is corrupt")


def _is_entry(entry: object) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)


def write_model(directory: Path, model: Transformer, tokenizer_file: Path | None = None) -> None:
    """Write config.json, model.safetensors and (if given) tokenizer.json into `directory`."""
    write_model_info(directory, model.config, tokenizer_file)
    save_file(weights_of(model), directory / "model.safetensors", metadata=WEIGHTS_METADATA)


def write_model_info(directory: Path, config: ModelConfig, tokenizer_file: Path | None = None) -> None:
    """Write the files beside a model's weights: config.json and (if given) tokenizer.json."""
    write_config(directory, config)
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, directory / "tokenizer.json")


def write_config(directory: Path, config: ModelConfig) -> None:
    (directory / "config.json").write_text(json.dumps(config.to_dict(), indent=2), encoding="utf-8")


def weights_of(model: Transformer) -> dict[str, torch.Tensor]:
    """The tensors to store: the state dict on the CPU, a tied lm_head stored once (as tok_emb)."""
    state = model.state_dict()
    return {name: state[name].detach().contiguous().cpu() for name in stored_names(model)}


def stored_names(model: Transformer) -> list[str]:
    """The state-dict names a checkpoint stores: all but a tied lm_head, which is tok_emb."""
    tied = model.config.tie_embeddings
    return [name for name in model.state_dict() if not (tied and is_head(name))]


def is_head(name: str) -> bool:
    """Whether a state-dict name is the lm_head's weight, at the top or inside a wrapper (backbone.lm_head.weight)."""
    return name == "lm_head.weight" or name.endswith(".lm_head.weight")


def save_model(directory: str | Path, model: Transformer, tokenizer_file: Path | None = None) -> Path:
    """Save a model (and its tokenizer) as a standalone checkpoint directory, atomically."""
    directory = Path(directory)
    with checkpoint_directory(directory) as tmp:
        write_model(tmp, model, tokenizer_file)
    return directory


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest `step-*` checkpoint of a run directory, or None."""
    steps = sorted((run_dir / "checkpoints").glob(f"{STEP_PREFIX}*"))
    return steps[-1] if steps else None


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint or run directory path."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if (path / "config.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path} is neither a checkpoint (no config.json) nor a run with checkpoints/")
    return latest


def load_checkpoint(
    directory: Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> Transformer:
    """A native checkpoint directory, verified against its manifest, as a ready model in eval mode."""
    verify(directory)
    model = Transformer(read_config(directory))
    load_weights(directory, model)
    return model.to(device=device, dtype=dtype).eval()


def read_config(directory: Path) -> ModelConfig:
    """The model config of a checkpoint directory; a bad one is a CheckpointError naming the file."""
    try:
        return ModelConfig.from_json(directory / "config.json")
    except ConfigError as err:
        raise CheckpointError(f"{directory / 'config.json'}: {err}") from err


@torch.no_grad()
def load_weights(directory: Path, model: Transformer) -> None:
    """Copy a checkpoint's weights into `model`: model.safetensors, the shards its index lists, or a
    distributed checkpoint's files.

    Every name and shape is checked before the first copy; then one tensor at a time is
    read, so loading needs little memory beyond the model's.
    """
    if is_distributed(directory):
        return _load_distributed(directory, model)
    state = model.state_dict()
    with WeightFiles(directory) as files:
        check_shapes(files.shapes, {name: tuple(state[name].shape) for name in stored_names(model)}, str(directory))
        for name in files.shapes:
            state[name].copy_(files.read(name))


def is_distributed(directory: Path) -> bool:
    """Whether a checkpoint directory is a distributed checkpoint (see mistura.parallel.dcp)."""
    return (directory / SHARDS).is_dir()


def _load_distributed(directory: Path, model: Transformer) -> None:
    """The "model" tensors of a distributed checkpoint, whole, into this process's `model`."""
    reader = dcp.HuggingFaceStorageReader(str(directory / SHARDS))
    try:
        stored = reader.read_metadata().state_dict_metadata
    except (SafetensorError, OSError, ValueError, KeyError) as err:  # a shard's header unreadable or not DCP's
        raise CheckpointError(f"{directory / SHARDS}: not a readable distributed checkpoint ({err})") from err
    shapes = {name[len("model.") :]: tuple(meta.size) for name, meta in stored.items() if name.startswith("model.")}
    state = {name: tensor for name, tensor in model.state_dict().items() if name in stored_names(model)}
    check_shapes(shapes, {name: tuple(tensor.shape) for name, tensor in state.items()}, str(directory))
    with warnings.catch_warnings():  # DCP warns that it reads in one process, which is the point here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": state}, storage_reader=reader, no_dist=True)


def read_weights(path: Path, model: Transformer) -> dict[str, torch.Tensor]:
    """Read a safetensors file and check its tensors against `model`'s, naming any mismatch."""
    return complete_weights(read_tensors(path), model, str(path))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; an unreadable one is a CheckpointError naming it."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err


def complete_weights(state: dict[str, torch.Tensor], model: Transformer, where: str) -> dict[str, torch.Tensor]:
    """Stored tensors (see weights_of) as a full state dict for `model`, checked against it."""
    if model.config.tie_embeddings:
        embeddings = {name: name.removesuffix("lm_head.weight") + "tok_emb.weight" for name in model.state_dict()}
        state = state | {head: state[emb] for head, emb in embeddings.items() if is_head(head) and emb in state}
    check_state(state, model.state_dict(), where)
    return state


def check_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str) -> None:
    """Raise CheckpointError naming missing, unexpected or mis-shaped tensors."""
    check_shapes(
        {name: tuple(tensor.shape) for name, tensor in state.items()},
        {name: tuple(tensor.shape) for name, tensor in expected.items()},
        where,
    )


def check_shapes(shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str) -> None:
    """`check_state` on names and shapes alone, as a file's header gives them."""
    check_names(shapes, expected, where)
    for name, shape in shapes.items():
        if tuple(shape) != tuple(expected[name]):
            raise CheckpointError(
                f"{where}: tensor '{name}' has shape {tuple(shape)}, the config expects {tuple(expected[name])}"
            )


def check_names(names: Iterable[str], expected: Iterable[str], where: str) -> None:
    """Raise CheckpointError naming the tensors missing from `names`, or unexpected in it."""
    names, expected = set(names), set(expected)
    missing, unexpected = sorted(expected - names), sorted(names - expected)
    if missing:
        raise CheckpointError(f"{where}: missing tensor(s) {_some(missing)} for this model config")
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensor(s) {_some(unexpected)} for this model config")


def _some(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")

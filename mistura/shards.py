"""Safetensors weights as mistura and Hugging Face folders both hold them: one file, or shards and an index.

    model.safetensors                    every tensor, when they fit in one shard
    model-00001-of-00003.safetensors     otherwise shards of at most max_shard_size bytes each, ...
    model.safetensors.index.json         ... listed by {"metadata": {"total_size": bytes}, "weight_map": {tensor: file}}

Conversions stream through this module, so a model larger than memory converts:
`WeightFiles` reads one tensor at a time (or one slice of a stacked tensor), from
memory-mapped files of which at most one is open; `write_weights` plans the shards from
the tensors' sizes, then builds and saves them one at a time, so at most one output shard
is in memory.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mistura.errors import CheckpointError, ConfigError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_SIZE = "5GB"  # Hugging Face's long-time default

# Element types as safetensors headers name them.
STORED_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

# The dtypes a conversion may cast to, as users spell them.
DTYPE_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}

# Hugging Face counts "5GB" in powers of ten and "5GiB" in powers of two.
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class WeightFiles:
    """The tensors of a weights folder, read one at a time; use it as a context manager.

    Opening reads every file's header, so the names, shapes and dtypes are known, and a
    missing, truncated or corrupt file is reported by name, before any tensor is read.
    Only the index decides which tensors a shard holds.
    """

    def __init__(self, folder: str | Path):
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._stored_dtypes: dict[str, str] = {}
        self._file_of: dict[str, Path] = {}
        for path, names in listed_files(Path(folder)).items():
            with _reading(path), safe_open(path, framework="pt") as file:
                absent = sorted(set(names or ()) - set(file.keys()))
                if absent:
                    raise CheckpointError(f"{path}: lacks {', '.join(absent)}, which the index places here")
                for name in names or file.keys():
                    tensor = file.get_slice(name)
                    self.shapes[name] = tuple(tensor.get_shape())
                    self._stored_dtypes[name] = tensor.get_dtype()
                    self._file_of[name] = path
        self._open = ExitStack()
        self._open_path: Path | None = None
        self._file: Any = None

    def read(self, name: str, index: int | None = None) -> torch.Tensor:
        """Tensor `name`, or with `index` its slice [index] alone (one expert of a stacked tensor)."""
        path = self._file_of[name]
        with _reading(path):
            if path != self._open_path:  # at most one file open
                self._open.close()
                self._file = self._open.enter_context(safe_open(path, framework="pt"))
                self._open_path = path
            return self._file.get_tensor(name) if index is None else self._file.get_slice(name)[index]

    def dtype(self, name: str) -> torch.dtype:
        stored = self._stored_dtypes[name]
        if stored not in STORED_DTYPES:
            raise CheckpointError(f"{self._file_of[name]}: {name} has dtype {stored}, which mistura cannot read")
        return STORED_DTYPES[stored]

    def main_dtype(self) -> torch.dtype:
        """The dtype that most tensors have: the checkpoint's dtype, as Hugging Face's config.json states it."""
        stored = Counter(self._stored_dtypes.values()).most_common(1)[0][0]
        return STORED_DTYPES.get(stored, torch.float32)

    def close(self) -> None:
        self._open.close()
        self._open_path = None

    def __enter__(self) -> WeightFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_weights(
    folder: Path,
    sizes: dict[str, int],
    build: Callable[[str], torch.Tensor],
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
    metadata: dict[str, str] | None = None,
    progress: bool = False,
) -> None:
    """Build the tensors that `sizes` names (name -> bytes), in its order, and save them in shards.

    Consecutive tensors fill a shard up to max_shard_size bytes; a larger tensor gets a
    shard of its own. One shard is written as model.safetensors, several as numbered
    shards plus their index. Each shard is built, saved and dropped before the next.
    """
    shards = _pack(sizes, parse_size(max_shard_size))
    count = len(shards)
    files = [SINGLE] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    weight_map: dict[str, str] = {}
    total = 0
    for file, names in zip(files, shards):
        tensors = {name: build(name) for name in tqdm(names, desc=file, unit="tensor", disable=not progress)}
        save_file(tensors, folder / file, metadata=metadata)
        weight_map |= dict.fromkeys(names, file)
        total += sum(tensor.nbytes for tensor in tensors.values())
    if count > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")


def tensor_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def parse_size(size: int | str, what: str = "max_shard_size") -> int:
    """Bytes from a count or a size such as "5GB" (5 * 10^9 bytes), "500MB" or "2GiB"; errors name `what`."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", size)
        unit = match.group(2).upper() if match else None
        if unit not in _SIZE_UNITS:
            raise ConfigError(f"{what}: expected a size such as 5GB, 500MB or 2GiB, got {size!r}")
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value < 1:
        raise ConfigError(f"{what}: must be at least one byte, got {size!r}")
    return value


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A dtype from its name ("bf16", "float32", ...); None stays None (keep the stored dtypes)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE_NAMES:
        raise ConfigError(f"dtype: expected one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    return DTYPE_NAMES[dtype]


def _pack(sizes: dict[str, int], max_shard_size: int) -> list[list[str]]:
    """Consecutive names grouped greedily into shards of at most max_shard_size bytes."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def listed_files(folder: Path) -> dict[Path, list[str] | None]:
    """Each weights file of the folder, with the tensors the index places in it (None: all of them)."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    single, index = folder / SINGLE, folder / INDEX
    if single.is_file():
        return {single: None}
    if not index.is_file():
        pickled = " (pickled *.bin weights are refused: convert them to safetensors)"
        raise CheckpointError(f"{folder}: no {SINGLE} or {INDEX}" + (pickled if any(folder.glob("*.bin")) else ""))
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{index}: cannot read JSON ({err})") from err
    valid = isinstance(weight_map, dict) and all(
        isinstance(file, str) and Path(file).name == file for file in weight_map.values()
    )
    if not valid:
        raise CheckpointError(f"{index}: no 'weight_map' of tensor name -> shard file in this folder")
    files: dict[Path, list[str]] = {}
    for name, file in weight_map.items():
        files.setdefault(folder / file, []).append(name)
    return files


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    try:
        yield
    except (OSError, SafetensorError) as err:  # a missing shard, a truncated or corrupt file
        raise CheckpointError(f"{path}: cannot read safetensors ({err})") from err

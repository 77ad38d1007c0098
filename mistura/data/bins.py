"""Token bins: one flat file of token ids per split, and random training windows read from it.

A bin is the raw array of ids, nothing else (no header): uint16 when every id fits
(vocabularies up to 65,536), uint32 beyond, so its dtype is recorded in meta.json.
It is read through a read-only memory map, so a corpus larger than RAM costs nothing
until its windows are touched.

`BatchLoader` draws each batch from `batch_size` random offsets:

    x = tokens[o : o + T]          the model's input          (B, T)
    y = tokens[o + 1 : o + T + 1]  the next token at each spot (B, T)

Batch number i draws its offsets from a generator seeded with (seed, i), not from one
running generator, so the loader's whole state is two integers: a resumed run gets
exactly the batches the interrupted one would have seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mistura.atomic import atomic_write
from mistura.errors import CheckpointError, ConfigError, DataError


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id below `vocab_size`."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def write_tokens(ids: Sequence[int] | np.ndarray, path: str | Path, vocab_size: int) -> str:
    """Write `ids` as a bin at `path` and return its dtype's name ("uint16" or "uint32")."""
    dtype = token_dtype(vocab_size)
    array = np.asarray(ids)
    if array.size == 0:
        raise DataError(f"no tokens to write to {path}")
    if array.min() < 0 or array.max() >= vocab_size:
        raise DataError(f"token ids for {path} must lie in [0, {vocab_size}), got [{array.min()}, {array.max()}]")
    with atomic_write(path) as file:
        array.astype(dtype).tofile(file)
    return dtype.name


def open_tokens(path: str | Path, dtype: str | np.dtype) -> np.memmap:
    """Map a bin read-only; an empty, missing or truncated file is an error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"token file {path} does not exist")
    size, itemsize = path.stat().st_size, np.dtype(dtype).itemsize
    if size == 0:
        raise DataError(f"token file {path} is empty")
    if size % itemsize:
        raise DataError(f"token file {path} has {size} bytes, not a whole number of {np.dtype(dtype).name} ids")
    return np.memmap(path, dtype=dtype, mode="r")


class SeededBatches:
    """A batch source whose batch i depends on (seed, i) alone, so that its state is those two integers."""

    seed: int
    batches_drawn: int

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a `state_dict()`: the next batch is the one that followed it."""
        try:
            self.seed, self.batches_drawn = int(state["seed"]), int(state["batches_drawn"])
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(
                f"batch loader state must hold integer 'seed' and 'batches_drawn', got {state!r}"
            ) from error


class BatchLoader(SeededBatches):
    """Random (x, y) windows from a token array, reproducible batch by batch.

    `rows` keeps only those rows of each batch, reading only their tokens: a data-parallel process's part
    of the global batch, which every process draws alike (the same offsets, from the same seed).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        block_size: int,
        seed: int,
        device: str | torch.device = "cpu",
        rows: slice = slice(None),
    ) -> None:
        if batch_size < 1 or block_size < 1 or seed < 0:
            raise ConfigError(
                f"batch_size and block_size must be positive and seed non-negative, "
                f"got {batch_size}, {block_size} and {seed}"
            )
        if len(tokens) < block_size + 1:
            raise DataError(
                f"the token file holds {len(tokens)} tokens, too few for one window of "
                f"block_size + 1 = {block_size + 1}; lower block_size or use more text"
            )
        self.tokens = tokens
        self.batch_size = batch_size
        self.block_size = block_size
        self.seed = seed
        self.device = torch.device(device)
        self.rows = rows
        self.batches_drawn = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y), both int64 of shape (batch_size, block_size) on the device (or the rows kept)."""
        rng = np.random.default_rng([self.seed, self.batches_drawn])
        offsets = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)[self.rows]  # (B,)
        positions = offsets[:, None] + np.arange(self.block_size)  # (B, T)
        x = torch.from_numpy(self.tokens[positions].astype(np.int64))
        y = torch.from_numpy(self.tokens[positions + 1].astype(np.int64))
        self.batches_drawn += 1
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

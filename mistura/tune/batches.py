"""Fine-tuning batches: examples in a seeded order, epoch after epoch, each batch padded to its longest example.

    x  (B, T)  each example's ids but the last, then PAD_ID
    y  (B, T)  each example's labels but the first (the next token where it is learnt), then IGNORE

Padding goes on the right, so under the causal mask no real token attends to one, and
its labels leave it out of the loss. The examples come as one stream: epoch e visits
every example once, in the order of a permutation seeded with (seed, e), and batch k is
positions k * B to (k + 1) * B of the stream (a batch may straddle two epochs). The state
is two integers, as for mistura.data.bins.BatchLoader: a resumed run draws exactly the
batches the interrupted one would have.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from mistura.data.bins import SeededBatches
from mistura.data.tokenizer import PAD_ID
from mistura.errors import ConfigError
from mistura.train.loop import IGNORE
from mistura.tune.encode import Example


def collate(examples: Sequence[Example], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of the examples, right-padded to the longest (see the module docstring)."""
    length = max(len(example.ids) for example in examples) - 1
    x = torch.full((len(examples), length), PAD_ID, dtype=torch.long)
    y = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        x[row, : len(example.ids) - 1] = torch.tensor(example.ids[:-1])
        y[row, : len(example.labels) - 1] = torch.tensor(example.labels[1:])
    return x.to(device), y.to(device)


class ExampleBatches(SeededBatches):
    """Training batches of `batch_size` examples, reproducible batch by batch (a mistura.train.loop.Batches)."""

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int, device: torch.device | str = "cpu"):
        if not examples or batch_size < 1 or seed < 0:
            raise ConfigError(
                f"batches need examples, a positive batch size and a non-negative seed, got {len(examples)} "
                f"examples, batch size {batch_size} and seed {seed}"
            )
        self.examples, self.batch_size, self.seed, self.device = examples, batch_size, seed, torch.device(device)
        self.batches_drawn = 0
        self.lengths = np.array([len(example.ids) - 1 for example in examples])  # input tokens of each

    def order(self, epoch: int) -> np.ndarray:
        """The examples' order in `epoch`."""
        return _permutation(self.seed, epoch, len(self.examples))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.batches_drawn * self.batch_size
        chosen = [self.example_at(position) for position in range(start, start + self.batch_size)]
        self.batches_drawn += 1
        return collate(chosen, self.device)

    def example_at(self, position: int) -> Example:
        epoch, index = divmod(position, len(self.examples))
        return self.examples[self.order(epoch)[index]]

    @property
    def tokens_drawn(self) -> int:
        """The input tokens (padding left out) of every batch drawn so far."""
        epochs, rest = divmod(self.batches_drawn * self.batch_size, len(self.examples))
        return int(epochs * self.lengths.sum() + self.lengths[self.order(epochs)[:rest]].sum())


def fixed_batches(examples: Sequence[Example], batch_size: int, limit: int, device: torch.device | str):
    """The first `limit` batches of `batch_size` examples, in order: validation's, the same every time."""
    starts = range(0, len(examples), batch_size)[:limit]
    return (collate(examples[start : start + batch_size], device) for start in starts)


@lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, count: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(count)

"""Fine-tuning batches: examples in a seeded order, epoch after epoch, each batch padded to its longest example.

    x  (B, T)  each example's ids but the last, then PAD_ID
    y  (B, T)  each example's labels but the first (the next token where it is learnt), then IGNORE

Padding goes on the right, so under the causal mask no real token attends to one, and
its labels leave it out of the loss. The examples come as one stream: epoch e visits
every example once, in the order of a permutation seeded with (seed, e), and batch k is
positions k * B to (k + 1) * B of the stream (a batch may straddle two epochs). The state
is two integers, as for mistura.data.bins.BatchLoader: a resumed run draws exactly the
batches the interrupted one would have.

Preference pairs (PairBatches) are drawn the same way, a pair at a time, and a batch of
B pairs is one of 2B rows: the chosen conversations first, then the rejected ones in the
same order, so rows b and B + b are a pair.
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

Pair = tuple[Example, Example]  # the chosen and the rejected conversation of a preference pair


def collate(
    examples: Sequence[Example], device: torch.device | str = "cpu", shift: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of the examples, right-padded to the longest (see the module docstring); with shift=False,
    each example's whole ids and its labels at the same positions, for a head that scores tokens."""
    cut = int(shift)
    length = max(len(example.ids) for example in examples) - cut
    x = torch.full((len(examples), length), PAD_ID, dtype=torch.long)
    y = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        x[row, : len(example.ids) - cut] = torch.tensor(example.ids[: len(example.ids) - cut])
        y[row, : len(example.labels) - cut] = torch.tensor(example.labels[cut:])
    return x.to(device), y.to(device)


class ExampleBatches(SeededBatches):
    """Training batches of `batch_size` examples, reproducible batch by batch (a mistura.train.loop.Batches)."""

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        seed: int,
        device: torch.device | str = "cpu",
        shift: bool = True,
    ):
        if not examples or batch_size < 1 or seed < 0:
            raise ConfigError(
                f"batches need examples, a positive batch size and a non-negative seed, got {len(examples)} "
                f"examples, batch size {batch_size} and seed {seed}"
            )
        self.examples, self.batch_size, self.seed, self.device = examples, batch_size, seed, torch.device(device)
        self.shift = shift  # collate's: (x, y) shifted for next-token losses, or not for a scoring head
        self.batches_drawn = 0
        self.lengths = np.array([self.length(example) for example in examples])  # input tokens of each

    def order(self, epoch: int) -> np.ndarray:
        """The examples' order in `epoch`."""
        return _permutation(self.seed, epoch, len(self.examples))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.batches_drawn * self.batch_size
        chosen = [self.example_at(position) for position in range(start, start + self.batch_size)]
        self.batches_drawn += 1
        return self.collate(chosen, self.device, self.shift)

    collate = staticmethod(collate)

    @staticmethod
    def length(example: Example) -> int:
        """The input tokens an item adds to a batch."""
        return len(example.ids) - 1

    def example_at(self, position: int) -> Example:
        epoch, index = divmod(position, len(self.examples))
        return self.examples[self.order(epoch)[index]]

    @property
    def tokens_drawn(self) -> int:
        """The input tokens (padding left out) of every batch drawn so far."""
        epochs, rest = divmod(self.batches_drawn * self.batch_size, len(self.examples))
        return int(epochs * self.lengths.sum() + self.lengths[self.order(epochs)[:rest]].sum())


def collate_pairs(
    pairs: Sequence[Pair], device: torch.device | str = "cpu", shift: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of 2B rows for B (chosen, rejected) pairs: the chosen examples, then the rejected ones."""
    return collate([chosen for chosen, _ in pairs] + [rejected for _, rejected in pairs], device, shift)


class PairBatches(ExampleBatches):
    """Training batches of `batch_size` preference pairs as 2 * batch_size rows (see collate_pairs)."""

    collate = staticmethod(collate_pairs)

    @staticmethod
    def length(pair: Pair) -> int:
        return sum(len(example.ids) - 1 for example in pair)


def fixed_batches(
    items: Sequence, batch_size: int, limit: int, device: torch.device | str, collate_fn=collate, shift: bool = True
):
    """The first `limit` batches of `batch_size` examples (or pairs, with collate_pairs), in order: validation's,
    the same every time."""
    starts = range(0, len(items), batch_size)[:limit]
    return (collate_fn(items[start : start + batch_size], device, shift) for start in starts)


@lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, count: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(count)

"""Which KV block holds what: the bookkeeping of a PagePool's blocks (mistura.model.paged), with prefix caching.

Every block has a reference count: the sequences whose tables hold it. A block at count 0 is free.

Prefix caching (as vLLM's automatic prefix caching): once a block is full, it is named by a digest of
its tokens and of every token before it (the digest of the previous block chained in), and listed
under that name. A new prompt walks its full blocks in order and takes each listed one it finds,
counting a reference, instead of computing it again; the first miss ends the walk. A listed block
whose count falls to 0 keeps its contents and its name, evictable: it is reused, least recently
released first, only when no never-named block is free, and then loses its name.

Blocks shared by several sequences (a cached prefix, or the n completions of one prompt) are only read;
a sequence that must write into a shared, partly filled block copies it first (copy-on-write,
`writable`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Iterator

import numpy as np


class OutOfBlocks(Exception):
    """No block is free: the scheduler preempts a sequence, or waits."""


class BlockManager:
    def __init__(self, n_blocks: int, block_size: int, prefix_caching: bool = True):
        self.n_blocks, self.block_size, self.prefix_caching = n_blocks, block_size, prefix_caching
        self.refs = [0] * n_blocks
        self.free: deque[int] = deque(range(n_blocks))  # never named, or no longer
        self.evictable: OrderedDict[int, None] = OrderedDict()  # named, count 0, oldest first
        self.named: dict[bytes, int] = {}
        self.name_of: dict[int, bytes] = {}

    @property
    def available(self) -> int:
        return len(self.free) + len(self.evictable)

    @property
    def used(self) -> int:
        """Blocks some sequence holds."""
        return self.n_blocks - self.available

    def allocate(self) -> int:
        """A free block, now held once: a never-named one first, else the least recently released named one."""
        if self.free:
            block = self.free.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.named[self.name_of.pop(block)]
        else:
            raise OutOfBlocks
        self.refs[block] = 1
        return block

    def hold(self, block: int) -> None:
        """One more reference to `block`."""
        if self.refs[block] == 0:
            self.evictable.pop(block)
        self.refs[block] += 1

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each of `blocks`; a named one kept for later prompts, the others freed."""
        for block in reversed(blocks):  # a table's last blocks, the least shared, are evicted first
            self.refs[block] -= 1
            if self.refs[block] < 0:
                raise RuntimeError(f"KV block {block} released more often than held: a bug in the engine")
            if self.refs[block] == 0:
                if block in self.name_of:
                    self.evictable[block] = None
                else:
                    self.free.append(block)

    def writable(self, table: list[int], index: int) -> int | None:
        """Make table[index] this sequence's alone before it writes there: if shared, swap in a new block, which
        the caller fills with the old one's contents; returns the old block, or None when nothing was swapped."""
        block = table[index]
        if self.refs[block] == 1:
            return None
        table[index] = self.allocate()
        self.release([block])
        return block

    def cached_prefix(self, tokens: list[int]) -> tuple[list[int], list[bytes]]:
        """The listed blocks that hold the longest run of full blocks of `tokens`, each now held once more, and
        their names."""
        blocks, names = [], []
        for name in self.names(tokens) if self.prefix_caching else ():
            block = self.named.get(name)
            if block is None:
                break
            self.hold(block)
            blocks.append(block)
            names.append(name)
        return blocks, names

    def name(self, table: list[int], names: list[bytes], tokens: list[int], computed: int) -> None:
        """List the blocks of `table` that `computed` tokens have filled since the sequence's last call, adding
        their names to `names` (those of its full blocks so far)."""
        if not self.prefix_caching:
            return
        P, done = self.block_size, len(names)
        for index, name in enumerate(self.names(tokens[done * P : computed], names[-1] if names else b""), done):
            block = table[index]
            if block not in self.name_of and name not in self.named:
                self.named[name], self.name_of[block] = block, name
            names.append(name)

    def names(self, tokens: list[int], previous: bytes = b"") -> Iterator[bytes]:
        """The name of each full block of `tokens`, which follow the block named `previous` (b"": the start):
        the digest of its tokens and of the previous block's name; computed as they are asked for."""
        P = self.block_size
        for row in np.asarray(tokens[: len(tokens) // P * P], dtype=np.int64).reshape(-1, P):
            previous = hashlib.sha256(previous + row.tobytes()).digest()
            yield previous

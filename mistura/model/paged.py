"""The paged KV cache: one pool of fixed-size blocks that every sequence a server runs shares (vLLM's layout).

    pool = PagePool(model, n_blocks=64, block_size=16)          # allocated once
    batch = pool.batch([PagedRow(table, start, new_tokens), ...])  # one forward's input and view of the pool
    hidden = model.hidden_states(batch.ids, batch.cache)          # then row b's last new token: batch.last[b]

Legend: L layers, N blocks (in the pool) or new tokens (in a forward), P block size, H_kv key/value heads,
B rows in a forward, S a row's context after the forward (start + its new tokens).

A sequence owns a block table, the ids of the blocks that hold its positions in order: position j of the
sequence lives in block table[j // P], slot j % P, that is pool slot table[j // P] * P + j % P. Blocks
need not be contiguous, so sequences grow a block at a time, free theirs when they end, and share the
blocks of a common prefix (which block holds what is mistura.serve.blocks's bookkeeping).

Each forward writes the new tokens' keys and values into their slots (index_copy_ into the pool) and
reads the contexts back through the tables (one gather per layer), then attends with a mask. Decoding,
each row brings one token: the rows go side by side (B, 1), each reading its own context (B, S), padded
to the longest and masked. When some row brings a prefill chunk, all new tokens are packed into one row
(1, N), as varlen attention kernels take them, reading all contexts one after the other (1, sum S) under
a block-diagonal causal mask: no row's tokens are padded to another's length, so a long chunk does not
multiply the decodes' cost. The pool is allocated once; nothing is reallocated as sequences come and go.

For MLA the pages hold what its LatentCache holds, the latent and the rotary key of each token
(kv_lora_rank + qk_rope_head_dim values per token and layer), and the absorbed path attends over them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mistura.errors import ConfigError
from mistura.model.cache import KVCache, LatentCache
from mistura.model.transformer import Transformer


@dataclass(frozen=True)
class PagedRow:
    """One sequence in a forward: its block table, how many of its positions are cached, its new tokens."""

    table: list[int]
    start: int
    tokens: list[int]


@dataclass
class PagedBatch:
    """One forward's input: its token ids, the cache it reads and writes through, and where each row's new
    tokens sit in the flattened output (B * T or N positions)."""

    ids: torch.Tensor  # (B, 1) one token per row, or (1, N) all rows' new tokens packed
    cache: KVCache | LatentCache
    places: list[torch.Tensor]  # row b's new tokens' indices into ids.view(-1)

    @property
    def last(self) -> torch.Tensor:
        """(B,): where each row's last new token sits."""
        return torch.stack([place[-1] for place in self.places])


class PagePool:
    """The blocks of all sequences, for every layer: latent (L, N * P, r + D_rope) for an MLA model, else keys
    (L, N * P, H_kv, D_k) and values (L, N * P, H_kv, D_v), on the model's device and dtype."""

    def __init__(self, model: Transformer, n_blocks: int, block_size: int):
        if n_blocks < 1 or block_size < 1:
            raise ConfigError(f"a paged KV cache needs >= 1 block of >= 1 position, got {n_blocks} x {block_size}")
        self.n_blocks, self.block_size = n_blocks, block_size
        param = model.tok_emb.weight
        self.latent = model.config.mla is not None
        slots = n_blocks * block_size
        self.tensors = [
            torch.zeros(model.config.n_layer, slots, *shape, dtype=param.dtype, device=param.device)
            for shape in token_shapes(model)
        ]

    @staticmethod
    def block_bytes(model: Transformer, block_size: int) -> int:
        """The memory one block takes over all layers."""
        per_token = sum(math.prod(shape) for shape in token_shapes(model))
        return model.config.n_layer * block_size * per_token * model.tok_emb.weight.element_size()

    def copy_block(self, source: int, target: int) -> None:
        """Copy block `source`'s contents into block `target` (copy-on-write of a shared block)."""
        P = self.block_size
        for tensor in self.tensors:
            tensor[:, target * P : (target + 1) * P] = tensor[:, source * P : (source + 1) * P]

    def batch(self, rows: list[PagedRow]) -> PagedBatch:
        """The input of one forward over `rows`: one token per row side by side when each brings one (decoding),
        else every row's new tokens packed into one row, attending to its own context alone (prefill chunks
        beside decodes), so no row is padded to another's length."""
        device = self.tensors[0].device
        layout = _side_by_side if all(len(row.tokens) == 1 for row in rows) else _packed
        ids, places, read, write, mask, positions = layout(rows, self.block_size, device)
        kind = PagedLatentCache if self.latent else PagedKVCache
        return PagedBatch(ids, kind(self, read, write, (mask, positions)), places)


def token_shapes(model: Transformer) -> list[tuple[int, ...]]:
    """What one token stores per layer: [(r + D_rope,)] for MLA, [(H_kv, D_k), (H_kv, D_v)] otherwise."""
    config = model.config
    if config.mla is not None:
        return [(config.mla.kv_lora_rank + config.mla.qk_rope_head_dim,)]
    return [(config.n_kv_head, config.head_dim)] * 2


def _slots(rows: list[PagedRow], owner: torch.Tensor, position: torch.Tensor, block_size: int) -> torch.Tensor:
    """The pool slot of each (row `owner`, `position`) pair: through the row's table."""
    width = max(len(row.table) for row in rows)
    tables = torch.tensor([row.table + [0] * (width - len(row.table)) for row in rows], device=position.device)
    return tables[owner, position // block_size] * block_size + position % block_size


def _side_by_side(rows: list[PagedRow], block_size: int, device: torch.device) -> tuple:
    """B rows of one new token each: ids (B, 1); each row reads its context (B, S), padded with its last
    position, masked."""
    ends = torch.tensor([row.start + 1 for row in rows], device=device)[:, None]  # (B, 1)
    j = torch.arange(int(ends.max()), device=device)  # (S,)
    owner = torch.arange(len(rows), device=device)[:, None]  # (B, 1)
    read = _slots(rows, owner, torch.minimum(j, ends - 1), block_size)  # (B, S)
    ids = torch.tensor([row.tokens for row in rows], device=device)  # (B, 1)
    mask = (j < ends)[:, None, None, :]  # (B, 1, 1, S)
    return ids, list(owner), read, read[:, -1], mask, ends - 1  # a row's last column: its new token's slot


def _packed(rows: list[PagedRow], block_size: int, device: torch.device) -> tuple:
    """All rows' N new tokens as one row (1, N), reading all rows' contexts one after the other (1, sum S): new
    token t of row b, at position p, sees row b's positions 0 .. p and nothing of the other rows."""
    index = torch.arange(len(rows), device=device)
    counts = torch.tensor([len(row.tokens) for row in rows], device=device)
    starts = torch.tensor([row.start for row in rows], device=device)
    ends = starts + counts
    offsets = ends.cumsum(0) - ends  # where each row's context begins in the packed keys
    owner = torch.repeat_interleave(index, counts)  # (N,) each new token's row
    positions = starts[owner] + torch.arange(len(owner), device=device) - (counts.cumsum(0) - counts)[owner]
    key_owner = torch.repeat_interleave(index, ends)  # (sum S,)
    key_position = torch.arange(len(key_owner), device=device) - offsets[key_owner]
    read = _slots(rows, key_owner, key_position, block_size)  # (sum S,)
    mask = (owner[:, None] == key_owner[None, :]) & (key_position[None, :] <= positions[:, None])  # (N, sum S)
    ids = torch.tensor([token for row in rows for token in row.tokens], device=device)[None, :]  # (1, N)
    places = list(torch.arange(len(owner), device=device).split(counts.tolist()))
    return ids, places, read[None, :], read[offsets[owner] + positions], mask[None, None], positions[None, :]


class _PagedView:
    """A forward's view of a PagePool: the slots its new tokens go to (`write`, in order), the slots each row
    of the input reads (`read`), and the mask and positions the model attends with (`frame`)."""

    def __init__(self, pool: PagePool, read: torch.Tensor, write: torch.Tensor, frame: tuple):
        self.pool, self.read, self.write, self.frame = pool, read, write, frame
        self.pos, self.pad, self.tensor_parallel = 0, None, 1
        self.max_len = int(frame[1].max()) + 1  # the longest row's length: packed, a row holds several sequences

    def end(self, length: int) -> int:
        return self.max_len

    def store(self, layer: int, *new: torch.Tensor) -> list[torch.Tensor]:
        """Write each of `new` (B, T, ...) at the new tokens' slots of `layer`; each pool tensor read back
        through the input rows' slots (B, S, ...)."""
        out = []
        for tensor, values in zip(self.pool.tensors, new, strict=True):
            tensor[layer].index_copy_(0, self.write, values.flatten(0, 1).to(tensor.dtype))
            out.append(tensor[layer][self.read])
        return out


class PagedKVCache(_PagedView, KVCache):
    """Per-head keys and values in the pool's pages (grouped-query attention, MLA's naive path)."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H_kv, T, D); return each row's keys and values (B, H_kv, S, D)."""
        keys, values = self.store(layer, k.transpose(1, 2), v.transpose(1, 2))  # (B, S, H_kv, D)
        return keys.transpose(1, 2), values.transpose(1, 2)


class PagedLatentCache(_PagedView, LatentCache):
    """MLA's latent and rotary key in the pool's pages, for the absorbed path."""

    def update(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        """Store c_kv (B, T, r) and k_pe (B, T, D_rope); return each row's [c_kv, k_pe] (B, S, r + D_rope)."""
        (latent,) = self.store(layer, torch.cat([c_kv, k_pe], dim=-1))
        return latent

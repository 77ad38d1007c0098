"""The paged KV cache: one pool of fixed-size blocks that every sequence a server runs shares (vLLM's layout).

    pool = PagePool(model, n_blocks=64, block_size=16)        # allocated once
    cache = pool.batch([PagedRow(table, start, length), ...])  # one forward's view of the pool
    logits = model(ids (B, T), cache)                           # row b: its `length` new tokens, right-padded

Legend: L layers, N blocks, P block size, H_kv key/value heads, B rows in a forward, T new tokens of the
longest row, S the longest row's context after the forward (start + length).

A sequence owns a block table, the ids of the blocks that hold its positions in order: position j of the
sequence lives in block table[j // P], slot j % P, that is pool slot table[j // P] * P + j % P. Blocks
need not be contiguous, so sequences grow a block at a time, free theirs when they end, and share the
blocks of a common prefix (which block holds what is mistura.serve.blocks's bookkeeping).

Each forward writes the new tokens' keys and values into their slots (index_copy_ into the pool) and
reads every row's context back through its table (one gather per layer), then attends with a mask:
row b's query t, at position start_b + t, sees its positions 0 .. start_b + t. Rows are right-padded to
T new tokens; a padding query sees its row's last real position, so no softmax row is empty, and its
output is ignored. The pool is allocated once; nothing is reallocated as sequences come and go.

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
    """One sequence in a forward: its block table, how many positions are cached (start), how many it adds."""

    table: list[int]
    start: int
    length: int


class PagePool:
    """The blocks of all sequences, for every layer: latent (L, N * P, r + D_rope) for an MLA model, else keys
    (L, N * P, H_kv, D_k) and values (L, N * P, H_kv, D_v), on the model's device and dtype."""

    def __init__(self, model: Transformer, n_blocks: int, block_size: int):
        if n_blocks < 1 or block_size < 1:
            raise ConfigError(f"a paged KV cache needs >= 1 block of >= 1 position, got {n_blocks} x {block_size}")
        self.n_blocks, self.block_size = n_blocks, block_size
        param = model.tok_emb.weight
        self.latent = model.config.mla is not None
        shapes = token_shapes(model)
        slots = n_blocks * block_size
        self.tensors = [
            torch.zeros(model.config.n_layer, slots, *shape, dtype=param.dtype, device=param.device) for shape in shapes
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

    def batch(self, rows: list[PagedRow]) -> KVCache | LatentCache:
        """The cache one forward over `rows` reads and writes through."""
        kind = PagedLatentCache if self.latent else PagedKVCache
        return kind(self, rows)


def token_shapes(model: Transformer) -> list[tuple[int, ...]]:
    """What one token stores per layer: [(r + D_rope,)] for MLA, [(H_kv, D_k), (H_kv, D_v)] otherwise."""
    config = model.config
    if config.mla is not None:
        return [(config.mla.kv_lora_rank + config.mla.qk_rope_head_dim,)]
    return [(config.n_kv_head, config.head_dim)] * 2


class _PagedView:
    """A forward's view of a PagePool: where its new tokens go (`write`, the slots of the valid ones), what each
    row reads (`read` (B, S) slots), and the mask and positions the model attends with (`frame`)."""

    def __init__(self, pool: PagePool, rows: list[PagedRow]):
        device = pool.tensors[0].device
        P = pool.block_size
        start = torch.tensor([row.start for row in rows], device=device)[:, None]  # (B, 1)
        length = torch.tensor([row.length for row in rows], device=device)[:, None]
        end = start + length  # (B, 1)
        T, S = int(length.max()), int(end.max())
        t = torch.arange(T, device=device)[None, :]  # (1, T)
        positions = torch.minimum(start + t, end - 1)  # (B, T): a padding query sits at its row's last position
        j = torch.arange(S, device=device)  # (S,)
        width = max(len(row.table) for row in rows)
        tables = torch.tensor([row.table + [0] * (width - len(row.table)) for row in rows], device=device)
        slots = tables.gather(1, (j // P).clamp(max=width - 1).expand(len(rows), S)) * P + j % P  # (B, S)
        self.read = torch.where(j < end, slots, 0)  # (B, S): beyond a row's context, slot 0, masked
        self.valid = t < length  # (B, T): the real new tokens
        self.write = self.read.gather(1, positions)[self.valid]  # (n,) their slots
        mask = (j[None, None, :] <= positions[:, :, None]) & (j < end)[:, None, :]  # (B, T, S)
        self.pool, self.frame = pool, (mask[:, None], positions)
        self.pos, self.pad, self.max_len, self.tensor_parallel = 0, None, S, 1

    def store(self, layer: int, *new: torch.Tensor) -> list[torch.Tensor]:
        """Write each of `new` (B, T, ...) at its valid tokens' slots of `layer`; each pool tensor read back
        through the rows' tables (B, S, ...)."""
        out = []
        for tensor, values in zip(self.pool.tensors, new, strict=True):
            tensor[layer].index_copy_(0, self.write, values[self.valid].to(tensor.dtype))
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

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

Each forward packs all rows' N new tokens into one row (1, N), as varlen attention kernels take them,
single-token rows (decodes) first; each layer writes the new tokens' keys and values into their slots
(index_copy_ into the pool), and its attention reads every row's context through its table
(mistura.model.paged_attention): `gather` reads each context out of the pool and runs SDPA, `flex` runs
FlexAttention on the pool in place. No row is padded to another's length, so a long prefill chunk does
not multiply the decodes' cost. The pool is allocated once; nothing is reallocated as sequences come and go.

For MLA the pages hold what its LatentCache holds, the latent and the rotary key of each token
(kv_lora_rank + qk_rope_head_dim values per token and layer), and the absorbed path attends over them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mistura.errors import ConfigError
from mistura.model.cache import AttendingCache, KVCache, LatentCache
from mistura.model.paged_attention import (
    ATTENTION,
    FlexLayout,
    GatherLayout,
    Rows,
    flex_attention,
    gather_attention,
    query_buckets,
)
from mistura.model.transformer import Transformer


@dataclass(frozen=True)
class PagedRow:
    """One sequence in a forward: its block table, how many of its positions are cached, its new tokens."""

    table: list[int]
    start: int
    tokens: list[int]


@dataclass
class PagedBatch:
    """One forward's input: every row's new tokens packed in one row, the cache it reads and writes through,
    and where each row's new tokens sit in it."""

    ids: torch.Tensor  # (1, N)
    cache: PagedKVCache | PagedLatentCache
    places: list[torch.Tensor]  # row b's new tokens' indices into ids[0]

    @property
    def last(self) -> torch.Tensor:
        """(B,): where each row's last new token sits."""
        return torch.stack([place[-1] for place in self.places])


class PagePool:
    """The blocks of all sequences, for every layer: latent (L, N * P, r + D_rope) for an MLA model, else keys
    (L, N * P, H_kv, D_k) and values (L, N * P, H_kv, D_v), on the model's device and dtype; `attention`
    names how forwards read them (mistura.model.paged_attention)."""

    def __init__(self, model: Transformer, n_blocks: int, block_size: int, attention: str = "gather"):
        if n_blocks < 1 or block_size < 1:
            raise ConfigError(f"a paged KV cache needs >= 1 block of >= 1 position, got {n_blocks} x {block_size}")
        if attention not in ATTENTION:
            raise ConfigError(f"paged attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
        param = model.tok_emb.weight
        if attention == "flex" and param.device.type != "cpu":
            raise ConfigError(
                "flex paged attention runs on the CPU only: its block mask holds one query per block, and Triton's "
                "flex kernels need blocks of at least 16 queries; use gather attention on a GPU"
            )
        self.n_blocks, self.block_size, self.attention = n_blocks, block_size, attention
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
        """The input of one forward over `rows`: their new tokens packed, single-token rows first."""
        device = self.tensors[0].device
        order = sorted(range(len(rows)), key=lambda b: len(rows[b].tokens) > 1)
        packed = Rows(
            [rows[b].table for b in order],
            [rows[b].start for b in order],
            [len(rows[b].tokens) for b in order],
            self.block_size,
            device,
        )
        write = packed.slots(packed.owner, packed.positions)  # (N,)
        if self.attention == "gather":
            layout = GatherLayout(packed, self.tensors[0].dtype)
        else:
            layout = FlexLayout(packed, self.n_blocks)
        ids = torch.tensor([token for b in order for token in rows[b].tokens], device=device)[None, :]  # (1, N)
        places = torch.arange(len(write), device=device).split(packed.counts)
        kind = PagedLatentCache if self.latent else PagedKVCache
        cache = kind(self, write, packed.positions, layout)
        where = {b: i for i, b in enumerate(order)}
        return PagedBatch(ids, cache, [places[where[b]] for b in range(len(rows))])

    def warm_up(self, model: Transformer, max_tokens: int) -> None:
        """Compile the flex kernel for each query bucket up to `max_tokens` (seconds each on a CPU), so that no
        request waits for it. It writes into block 0: call it before the pool serves."""
        if self.attention != "flex":
            return
        buckets = query_buckets(max_tokens)
        limit = torch._dynamo.config.recompile_limit  # past it, torch.compile would fall back to eager flex
        torch._dynamo.config.recompile_limit = max(limit, 2 * len(buckets))
        for n in buckets:
            with torch.inference_mode():
                batch = self.batch([PagedRow([0], 0, [0])] * n)
                model.hidden_states(batch.ids, batch.cache)


def token_shapes(model: Transformer) -> list[tuple[int, ...]]:
    """What one token stores per layer: [(r + D_rope,)] for MLA, [(H_kv, D_k), (H_kv, D_v)] otherwise."""
    config = model.config
    if config.mla is not None:
        return [(config.mla.kv_lora_rank + config.mla.qk_rope_head_dim,)]
    return [(config.n_kv_head, config.head_dim)] * 2


class _PagedView(AttendingCache):
    """A forward's view of a PagePool: the slots its new tokens go to (`write`, in order), their positions,
    and how its attention reads the pool (`layout`)."""

    def __init__(self, pool: PagePool, write: torch.Tensor, positions: torch.Tensor, layout):
        self.pool, self.write, self.layout = pool, write, layout
        self.positions = positions[None]  # (1, N)
        self.pos, self.pad, self.tensor_parallel = 0, None, 1
        self.max_len = int(positions.max()) + 1  # the longest row's length: a packed row holds several sequences

    def end(self, length: int) -> int:
        return self.max_len

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale) -> torch.Tensor:
        kernel = gather_attention if self.pool.attention == "gather" else flex_attention
        return kernel(q, keys, values, self.layout, scale)

    def _store(self, layer: int, *new: torch.Tensor) -> None:
        """Write each of `new` (1, N, ...) at the new tokens' slots of `layer`."""
        for tensor, values in zip(self.pool.tensors, new, strict=True):
            tensor[layer].index_copy_(0, self.write, values[0].to(tensor.dtype))


class PagedKVCache(_PagedView, KVCache):
    """Per-head keys and values in the pool's pages (grouped-query attention)."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale=None) -> torch.Tensor:
        """Store k, v (1, H_kv, N, D); q (1, H, N, D) attends over each row's keys and values: (1, H, N, D_v)."""
        self._store(layer, k.transpose(1, 2), v.transpose(1, 2))
        keys, values = (tensor[layer] for tensor in self.pool.tensors)  # (N_slots, H_kv, D)
        return self._attend(q, keys, values, scale)


class PagedLatentCache(_PagedView, LatentCache):
    """MLA's latent and rotary key in the pool's pages, for the absorbed path."""

    def attend(
        self, layer: int, q: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, *, scale=None
    ) -> torch.Tensor:
        """Store c_kv (1, N, r) and k_pe (1, N, D_rope); q (1, H, N, r + D_rope) attends over each row's
        [c_kv, k_pe] as its single key head, whose first r channels are the values: (1, H, N, r)."""
        self._store(layer, torch.cat([c_kv, k_pe], dim=-1))
        latent = self.pool.tensors[0][layer][:, None]  # (N_slots, 1, r + D_rope)
        return self._attend(q, latent, latent[..., : c_kv.shape[-1]], scale)

"""Attention through block tables: the two ways a paged forward's queries read their keys and values.

A paged forward (mistura.model.paged) packs every row's new tokens into one row of N queries
q (1, H, N, E); the pool of one layer holds keys (N_slots, H_kv, E) and values (N_slots, H_kv, E_v),
row b's position j at slot table_b[j // P] * P + j % P. Query i belongs to row b at position p and
sees row b's positions 0 .. p. Both ways give the output (1, H, N, E_v) and agree to float rounding:

- `gather`: each row's context is read out of the pool through its table (one indexing per layer, a
  transient copy), then attended with PyTorch's SDPA. Single-token rows (decodes) go side by side,
  each over its own context, padded to the longest and masked; a row with several new tokens (a
  prefill chunk) attends over its context alone under a causal mask. No row waits on another's
  length, and no query meets another row's keys. The query heads that share a key/value head are
  folded into the query length, so GQA and MLA's single latent head need no per-head copy.
- `flex`: FlexAttention reads the pool in place. A BlockMask lists, for each query, its row's blocks
  (`BlockMask.from_kv_blocks`, blocks of P slots), so the kernel visits those blocks alone; a mask_mod
  keeps the positions up to the query's. Compiled (`torch.compile`), it is one fused C++ kernel.
  Compiled code is specialised to N, so queries are padded to a bucket (a power of two, at least
  MIN_QUERIES); padded queries have no blocks. Uncompiled, FlexAttention scores every query against
  the whole pool (exact, through the mask_mod, but slow): tests only. CPU only: Triton's flex
  kernels take query blocks of at least 16 (their BLOCK_M), and here each query is its own block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTENTION = ("gather", "flex")
MIN_QUERIES = 16  # the smallest query bucket of the compiled flex kernel


@dataclass
class Rows:
    """Where each row of a paged forward stands: its block table, its first new position, its number of new
    tokens (rows with one new token first); `owner` and `positions` (N,) give each new token's row and position."""

    tables: list[list[int]]
    starts: list[int]
    counts: list[int]
    block_size: int
    device: torch.device

    def __post_init__(self):
        counts = torch.tensor(self.counts, device=self.device)
        self.owner = torch.repeat_interleave(torch.arange(len(self.counts), device=self.device), counts)  # (N,)
        offset = torch.arange(len(self.owner), device=self.device) - (counts.cumsum(0) - counts)[self.owner]
        self.positions = torch.tensor(self.starts, device=self.device)[self.owner] + offset  # (N,) each token's
        width = max(len(table) for table in self.tables)
        self.padded = torch.tensor([table + [0] * (width - len(table)) for table in self.tables], device=self.device)

    @property
    def decodes(self) -> int:
        """How many leading rows bring a single token."""
        return next((b for b, count in enumerate(self.counts) if count > 1), len(self.counts))

    def slots(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The pool slots of (row, position) pairs, `rows` broadcast against `positions`."""
        return self.padded[rows, positions // self.block_size] * self.block_size + positions % self.block_size


class GatherLayout:
    """What `gather_attention` reads, worked out once per forward for all layers."""

    def __init__(self, rows: Rows, dtype: torch.dtype):
        device, d = rows.device, rows.decodes
        ends = torch.tensor(rows.starts[:d], device=device) + 1  # (B_d,)
        j = torch.arange(int(ends.max()) if d else 0, device=device)  # (S,)
        last = torch.minimum(j[None, :], ends[:, None] - 1)  # (B_d, S): past its end, a row rereads its last
        self.decode_read = rows.slots(torch.arange(d, device=device)[:, None], last) if d else None  # (B_d, S)
        self.decode_mask = additive(j[None, :] < ends[:, None], dtype)[:, None, None, :]  # (B_d, 1, 1, S)
        self.chunks = []  # each other row's (first query, last + 1, slots read (S_b,), causal mask (T_b, S_b))
        first = d
        for b in range(d, len(rows.counts)):
            start, count = rows.starts[b], rows.counts[b]
            keys = torch.arange(start + count, device=device)
            mask = keys[None, :] <= torch.arange(start, start + count, device=device)[:, None]
            read = rows.slots(torch.tensor(b, device=device), keys)
            self.chunks.append((first, first + count, read, additive(mask, dtype)))
            first += count


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True: attend) as SDPA adds it to the scores, converted once for all layers."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def gather_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layout: GatherLayout, scale: float | None
) -> torch.Tensor:
    """q (1, H, N, E) over keys (N_slots, H_kv, E) and values (N_slots, H_kv, E_v): (1, H, N, E_v)."""
    H, H_kv = q.shape[1], keys.shape[1]
    G = H // H_kv  # query heads per key/value head
    out = []
    if layout.decode_read is not None:
        B = layout.decode_read.shape[0]
        qd = q[0, :, :B].transpose(0, 1).reshape(B, H_kv, G, -1)  # (B_d, H_kv, G, E): a row's heads as its queries
        k, v = (t.transpose(1, 2) for t in _read(keys, values, layout.decode_read))  # (B_d, H_kv, S, E)
        y = F.scaled_dot_product_attention(qd, k, v, attn_mask=layout.decode_mask, scale=scale)  # (B_d, H_kv, G, E_v)
        out.append(y.reshape(B, H, -1).transpose(0, 1)[None])  # (1, H, B_d, E_v)
    for first, stop, read, mask in layout.chunks:
        T = stop - first
        qc = q[:, :, first:stop].reshape(1, H_kv, G * T, -1)  # (1, H_kv, G * T, E): query g * T + t
        k, v = (t.transpose(0, 1)[None] for t in _read(keys, values, read))  # (1, H_kv, S_b, E)
        y = F.scaled_dot_product_attention(qc, k, v, attn_mask=mask.repeat(G, 1), scale=scale)
        out.append(y.reshape(1, H, T, -1))
    return torch.cat(out, dim=2)


def _read(keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values at `slots`; values that are the keys' first channels (MLA's latent) read once."""

    def take(pool: torch.Tensor) -> torch.Tensor:  # index_select: one row copy per slot
        return pool.index_select(0, slots.flatten()).unflatten(0, slots.shape)

    k = take(keys)
    same = values.data_ptr() == keys.data_ptr() and values.stride() == keys.stride()
    return k, k[..., : values.shape[-1]] if same else take(values)


def query_bucket(n: int) -> int:
    """The padded query count the compiled flex kernel runs for n queries."""
    return max(MIN_QUERIES, 1 << (n - 1).bit_length())


def query_buckets(most: int) -> list[int]:
    """Every bucket that forwards of at most `most` tokens use."""
    buckets = [MIN_QUERIES]
    while buckets[-1] < most:
        buckets.append(2 * buckets[-1])
    return buckets


class FlexLayout:
    """The BlockMask of one forward, for all layers: query i (padded to a bucket) visits its row's blocks, and
    within them the positions up to its own."""

    def __init__(self, rows: Rows, n_blocks: int):
        from torch.nn.attention.flex_attention import BlockMask

        device, P = rows.device, rows.block_size
        self.queries = len(rows.owner)
        pad = query_bucket(self.queries) - self.queries
        B, width = rows.padded.shape
        length = torch.tensor([len(table) for table in rows.tables], device=device)  # (B,)
        logical = torch.arange(width, device=device).expand(B, width)  # (B, width) each table entry's index
        real = logical < length[:, None]  # the padded tables' real entries
        # Per row, with a last row of no blocks for the padding queries: the blocks it visits, in order, and
        # the logical index of each of its blocks in the pool (-1: not its block).
        visits = torch.zeros(B + 1, n_blocks, dtype=torch.int32, device=device)
        visits[:B, :width] = rows.padded
        place = torch.full((B + 1, n_blocks), -1, dtype=torch.int32, device=device)
        place[torch.arange(B, device=device)[:, None].expand(B, width)[real], rows.padded[real]] = logical[real].int()
        count = torch.cat([length, length.new_zeros(1)]).int()
        owner = torch.cat([rows.owner, rows.owner.new_full((pad,), B)])  # (N_pad,)
        position = torch.cat([rows.positions, rows.positions.new_full((pad,), -1)]).int()  # (N_pad,)
        kv_indices, kv_count, block_of = visits[owner], count[owner], place[owner]  # per query

        def mask_mod(b, h, q_idx, kv_idx):
            logical = block_of[q_idx, kv_idx // P]  # -1: not the query's row's block
            return (logical >= 0) & (logical * P + kv_idx % P <= position[q_idx])

        self.block_mask = BlockMask.from_kv_blocks(
            kv_count[None, None],
            kv_indices[None, None],
            BLOCK_SIZE=(1, P),
            mask_mod=mask_mod,
            seq_lengths=(len(owner), n_blocks * P),
        )


_compiled = None


def flex_kernel():
    """FlexAttention compiled once per process, specialised to each shape (its query bucket)."""
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def flex_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layout: FlexLayout, scale: float | None
) -> torch.Tensor:
    """q (1, H, N, E) over the pool's keys (N_slots, H_kv, E) and values (N_slots, H_kv, E_v), in place:
    (1, H, N, E_v)."""
    N = layout.queries
    q = F.pad(q, (0, 0, 0, layout.block_mask.shape[-2] - N))  # (1, H, N_pad, E)
    k, v = keys.permute(1, 0, 2)[None], values.permute(1, 0, 2)[None]  # views (1, H_kv, N_slots, E)
    y = flex_kernel()(q, k, v, block_mask=layout.block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return y[:, :, :N]

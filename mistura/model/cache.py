"""Caches for incremental decoding.

Each forward pass with a cache writes the new tokens' entries at positions
[pos, pos + T) of preallocated buffers and attends over [0, pos + T); the model then
advances `pos`. Nothing is reallocated or copied while decoding. Two kinds:

- `KVCache`: per-head keys and values, what grouped-query attention (and MLA's naive
  path) attends over.
- `LatentCache`: MLA's compressed cache, the latent and the shared rotary key of each
  token, kv_lora_rank + qk_rope_head_dim values per token and layer, from which the
  absorbed path attends without ever expanding per-head keys and values.

The attention module picks its path by the kind of cache it is given. An `AttendingCache`
(mistura.model.paged's) runs the attention itself, through its rows' block tables.

Under tensor parallelism (mistura.parallel.tensor) a rank runs n_kv_head / tensor_parallel
of the key/value heads, and its KVCache holds those alone; the LatentCache holds no
per-head values, so every rank keeps the whole of it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from mistura.config import ModelConfig
from mistura.errors import ConfigError


class Cache(ABC):
    """Where decoding stands: tokens [0, pos) are cached, out of room for max_len.

    A batch of prompts of different lengths is left-padded to a common length: `pad`
    (B,) then holds each row's count of padding slots at the start, which the model
    masks out of attention and leaves out of positions (row b's slot i is position
    i - pad[b]). None means no padding. `tensor_parallel` is the number of ranks that
    split the heads (1: a single process). `positions` (B, T), the positions of one
    forward's new tokens, is set by caches whose rows each stand at their own position
    (mistura.model.paged, whose attention follows its block tables); None here.
    """

    positions: torch.Tensor | None = None

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        tensor_parallel: int = 1,
    ):
        self.max_len = max_len
        self.pos = 0
        self.pad: torch.Tensor | None = None
        self.tensor_parallel = tensor_parallel
        self.allocate(config, (config.n_layer, batch_size), max_len, dtype, device)

    @abstractmethod
    def allocate(self, config: ModelConfig, shape: tuple[int, int], max_len: int, dtype: torch.dtype, device) -> None:
        """Create the buffers, once, for `shape` (L, B) and max_len positions."""

    def end(self, length: int) -> int:
        """How long the longest row is once `length` new tokens are in."""
        return self.pos + length

    def advance(self, length: int) -> None:
        self.pos += length

    def rewind(self, pos: int) -> None:
        """Forget the tokens from `pos` on (e.g. rejected speculative drafts); later writes overwrite them."""
        if not 0 <= pos <= self.pos:
            raise ConfigError(f"cannot rewind a cache holding {self.pos} tokens to position {pos}")
        self.pos = pos

    def reset(self) -> None:
        self.pos = 0
        self.pad = None


class KVCache(Cache):
    """Keys and values for `n_layer` layers: buffers (L, B, H_kv, max_len, D_k) and (L, B, H_kv, max_len, D_v).

    D_k = D_v = head_dim for grouped-query attention; with MLA, keys have
    qk_nope_head_dim + qk_rope_head_dim channels and values v_head_dim. H_kv is
    n_kv_head / tensor_parallel: a tensor-parallel rank caches its own heads.
    """

    def allocate(self, config: ModelConfig, shape: tuple[int, int], max_len: int, dtype: torch.dtype, device) -> None:
        mla = config.mla
        k_dim, v_dim = (mla.qk_head_dim, mla.v_head_dim) if mla else (config.head_dim, config.head_dim)
        shape = (*shape, config.n_kv_head // self.tensor_parallel, max_len)
        self.k = torch.zeros(*shape, k_dim, dtype=dtype, device=device)
        self.v = torch.zeros(*shape, v_dim, dtype=dtype, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H_kv, T, D) for `layer`; return all keys and values so far (B, H_kv, pos + T, D)."""
        end = self.pos + k.shape[2]
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class LatentCache(Cache):
    """MLA's latent c_kv (L, B, max_len, kv_lora_rank) and roped shared key k_pe (L, B, max_len, D_rope).

    Both are views of one buffer (L, B, max_len, kv_lora_rank + D_rope), so `update` hands
    the absorbed attention its keys [c_kv, k_pe] in one piece, and their first
    kv_lora_rank channels are its values, without a copy.
    """

    def allocate(self, config: ModelConfig, shape: tuple[int, int], max_len: int, dtype: torch.dtype, device) -> None:
        if config.mla is None:
            raise ConfigError("LatentCache: the model has no latent attention (model.mla); use KVCache")
        rank, rope_dim = config.mla.kv_lora_rank, config.mla.qk_rope_head_dim
        self.latent = torch.zeros(*shape, max_len, rank + rope_dim, dtype=dtype, device=device)
        self.c_kv, self.k_pe = self.latent[..., :rank], self.latent[..., rank:]  # slices: views that accept writes

    def update(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        """Store c_kv (B, T, r) and k_pe (B, T, D_rope) for `layer`; return all [c_kv, k_pe] (B, pos + T, r + D_r)."""
        end = self.pos + c_kv.shape[1]
        self.c_kv[layer, :, self.pos : end] = c_kv
        self.k_pe[layer, :, self.pos : end] = k_pe
        return self.latent[layer, :, :end]


class AttendingCache(Cache):
    """A cache whose rows are read through block tables (mistura.model.paged): `attend` stores the new tokens'
    entries for a layer and runs that layer's attention of the queries over them itself."""

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, *new: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """q (1, H, N, E) and the new tokens' entries, as `update` takes them: the attention output (1, H, N, E_v)."""

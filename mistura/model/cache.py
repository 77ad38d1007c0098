"""KV cache for incremental decoding.

One preallocated buffer holds the keys and values of every layer. Each forward pass
with a cache writes the new tokens' keys/values at positions [pos, pos + T) and
attends over [0, pos + T); the model then advances `pos`. Nothing is reallocated or
copied while decoding.
"""

from __future__ import annotations

import torch

from mistura.config import ModelConfig


class KVCache:
    """Keys and values for `n_layer` layers: each buffer is (L, B, H_kv, max_len, D)."""

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H_kv, T, D) for `layer`; return all keys and values so far (B, H_kv, pos + T, D)."""
        end = self.pos + k.shape[2]
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, length: int) -> None:
        self.pos += length

    def reset(self) -> None:
        self.pos = 0

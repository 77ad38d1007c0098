"""Causal self-attention with grouped-query heads, on PyTorch's scaled_dot_product_attention.

Queries have `n_head` heads; keys and values have `n_kv_head` heads, each shared by
n_head / n_kv_head query heads (GQA; equal counts give classic multi-head attention).
Separate q/k/v/o projections keep the Hugging Face mapping one-to-one and make LoRA
and quantisation plain module swaps.

The forward pass reads the head counts off the projections' widths: a tensor-parallel
rank (mistura.parallel.tensor), whose q/k/v projections hold whole heads, runs its own
n_head / n query and n_kv_head / n key/value heads with this same code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mistura.config import ModelConfig
from mistura.model.cache import AttendingCache, KVCache
from mistura.model.norm import RMSNorm
from mistura.model.rope import apply_rope


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.dropout = config.attn_dropout
        self.q_proj = nn.Linear(config.d_model, self.n_head * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.d_model, self.n_kv_head * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.d_model, self.n_kv_head * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.d_model, bias=config.bias)
        # Qwen3 normalises each query and key head, which keeps attention logits bounded.
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D_model)
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None,
        mask: torch.Tensor | None = None,  # (B, 1, T, S) for padded batches, else causal
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, -1, self.head_dim)).transpose(1, 2)  # (B, H, T, D)
        k = self.k_norm(self.k_proj(x).view(B, T, -1, self.head_dim)).transpose(1, 2)  # (B, H_kv, T, D)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if isinstance(cache, AttendingCache):  # paged: it reads each row's context through its block table
            return self.o_proj(cache.attend(self.layer, q, k, v).transpose(1, 2).reshape(B, T, -1))
        start = 0
        if cache is not None:
            start = cache.pos
            k, v = cache.update(self.layer, k, v)  # (B, H_kv, start + T, D)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            **causal_mask_args(mask, start, T, x.device),
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, H * D) -> (B, T, D_model)


def causal_mask_args(mask: torch.Tensor | None, start: int, length: int, device: torch.device) -> dict:
    """SDPA's attn_mask / is_causal for `length` new queries after `start` cached tokens.

    A given mask wins; a single query sees every cached key (no mask); a prompt from
    the start is plain causal; new tokens after cached ones need the prefix mask.
    """
    if mask is not None:
        return {"attn_mask": mask}
    if length == 1:
        return {}
    if start == 0:
        return {"is_causal": True}
    return {"attn_mask": prefix_causal_mask(start, length, device)}


def prefix_causal_mask(start: int, length: int, device: torch.device) -> torch.Tensor:
    """(T, start + T) boolean mask: query i, at absolute position start + i, sees keys 0 .. start + i."""
    rows = torch.arange(start, start + length, device=device)[:, None]
    cols = torch.arange(start + length, device=device)[None, :]
    return cols <= rows


def padded_causal_mask(pad: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """(B, 1, T, start + T) boolean mask for left-padded rows: row b's keys before pad[b] are hidden.

    A padding slot's query sees itself alone, so no softmax row is empty.
    """
    causal = prefix_causal_mask(start, length, pad.device)  # (T, S)
    cols = torch.arange(start + length, device=pad.device)
    real = cols[None, :] >= pad[:, None]  # (B, S)
    itself = cols[None, :] == torch.arange(start, start + length, device=pad.device)[:, None]  # (T, S)
    return ((causal & real[:, None, :]) | itself)[:, None]

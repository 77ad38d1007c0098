"""Multi-head Latent Attention (MLA; DeepSeek-V2, arXiv:2405.04434), with a naive and an absorbed path.

Legend: B batch, T new tokens, S cached + new tokens, H heads, r kv_lora_rank,
D_nope / D_rope / D_v the per-head widths of mla.

Every token's keys and values come from one small latent: kv_a_proj maps x to a latent
c_kv (r channels, then RMSNorm) and to one rotary key k_pe (D_rope channels) that all
heads share; kv_b_proj expands the latent into each head's key part k_nope and value:

    c_kv, k_pe   = split(kv_a_proj(x))                      (B, T, r), (B, T, D_rope)
    k_nope_h     = W_uk_h c_kv,   v_h = W_uv_h c_kv          rows of kv_b_proj, per head h
    q_h          = [q_nope_h, q_pe_h]                        q_proj, or q_a_proj -> q_a_norm -> q_b_proj
    score_h      = (q_nope_h . k_nope_h + rope(q_pe_h) . rope(k_pe)) * scale

RoPE is decoupled: it rotates only the q_pe / k_pe channels. A rotation between W_uk and
c_kv would depend on the position, and W_uk could no longer be folded into the query.

The same weights run two ways:
- naive (training, no cache, or a `KVCache`): expand every head's keys and values and
  run ordinary attention; a KVCache then holds H * (D_nope + D_rope + D_v) values per
  token and layer.
- absorbed (decoding with a `LatentCache`): cache only [c_kv, k_pe], r + D_rope values
  per token and layer, and fold kv_b_proj into the computation instead: since
  q_nope . (W_uk c) = (W_uk^T q_nope) . c, each head's query moves into latent space,
  and since the attention-weighted sum of W_uv c is W_uv times the weighted sum of c,
  W_uv is applied once to the attention output. Attention then runs over the latent as
  multi-query attention with a single key/value head.

The head count is read off q's width: a tensor-parallel rank (mistura.parallel.tensor),
whose q and kv_b_proj hold whole heads, runs its own n_head / n heads with this same code,
over the whole latent cache (it is not per head).

Parameter layouts equal Hugging Face's DeepseekV3Attention (kv_a_proj is its
kv_a_proj_with_mqa, q_a_norm / kv_a_norm its q_a_layernorm / kv_a_layernorm), with
rotary channels paired as (i, i + D_rope/2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mistura.config import ModelConfig
from mistura.model.attention import causal_mask_args, prefix_causal_mask
from mistura.model.cache import AttendingCache, KVCache, LatentCache
from mistura.model.norm import RMSNorm
from mistura.model.rope import apply_rope, yarn_mscale


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        mla = config.mla
        self.layer = layer
        self.n_head, self.rank = config.n_head, mla.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        self.dropout = config.attn_dropout
        self.q_lora = mla.q_lora_rank is not None
        q_out = self.n_head * mla.qk_head_dim
        if self.q_lora:
            self.q_a_proj = nn.Linear(config.d_model, mla.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(mla.q_lora_rank, config.norm_eps)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, q_out, bias=False)
        else:
            self.q_proj = nn.Linear(config.d_model, q_out, bias=False)
        self.kv_a_proj = nn.Linear(config.d_model, self.rank + self.rope_dim, bias=False)
        self.kv_a_norm = RMSNorm(self.rank, config.norm_eps)
        self.kv_b_proj = nn.Linear(self.rank, self.n_head * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_head * self.v_dim, config.d_model, bias=False)
        self.scale = mla.qk_head_dim**-0.5
        yarn = config.yarn
        if yarn is not None and yarn.mscale_all_dim:
            # DeepSeek applies YaRN's temperature to every channel of q and k, not only to the
            # rotary ones through cos/sin (whose factor is 1 when mscale == mscale_all_dim).
            self.scale *= yarn_mscale(yarn.factor, yarn.mscale_all_dim) ** 2

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D_model)
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | LatentCache | None,
        mask: torch.Tensor | None = None,  # (B, 1, T, S) for padded batches, else causal
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q = q.view(B, T, -1, self.nope_dim + self.rope_dim).transpose(1, 2)  # (B, H, T, D_nope + D_rope)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj(x).split([self.rank, self.rope_dim], dim=-1)  # (B, T, r), (B, T, D_rope)
        c_kv = self.kv_a_norm(c_kv)
        q_pe = apply_rope(q_pe, *rope)
        k_pe = apply_rope(k_pe[:, None], *rope)  # (B, 1, T, D_rope): one rotary key for all heads
        if isinstance(cache, LatentCache):
            y = self._absorbed(q_nope, q_pe, c_kv, k_pe[:, 0], cache, mask)
        else:
            y = self._naive(q_nope, q_pe, c_kv, k_pe, cache, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, H * D_v) -> (B, T, D_model)

    def _naive(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        c_kv: torch.Tensor,
        k_pe: torch.Tensor,
        cache: KVCache | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Every head's keys and values expanded from the latent, then ordinary attention: (B, H, T, D_v)."""
        B, H, T, _ = q_nope.shape
        kv = self.kv_b_proj(c_kv).view(B, T, H, self.nope_dim + self.v_dim).transpose(1, 2)  # (B, H, T, D_nope + D_v)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)  # (B, H, T, D_nope + D_rope)
        k = torch.cat((k_nope, k_pe.expand(-1, H, -1, -1)), dim=-1)
        start = 0
        if cache is not None:
            start = cache.pos
            k, v = cache.update(self.layer, k, v)  # (B, H, S, D)
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            **causal_mask_args(mask, start, T, q.device),
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.scale,
        )

    def _absorbed(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        c_kv: torch.Tensor,
        k_pe: torch.Tensor,
        cache: LatentCache,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attention over the cached latent with kv_b_proj folded into query and output: (B, H, T, D_v)."""
        B, H, T, _ = q_nope.shape
        w_kv = local_part(self.kv_b_proj.weight).view(H, self.nope_dim + self.v_dim, self.rank)
        w_uk, w_uv = w_kv.split([self.nope_dim, self.v_dim], dim=1)  # (H, D_nope, r), (H, D_v, r)
        q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # (B, H, T, r)
        q = torch.cat((q_latent, q_pe), dim=-1)  # (B, H, T, r + D_rope)
        if isinstance(cache, AttendingCache):
            y = cache.attend(self.layer, q, c_kv, k_pe, scale=self.scale)
        else:
            y = self._latent_attention(q, c_kv, k_pe, cache, mask)
        return torch.einsum("bhtr,hvr->bhtv", y, w_uv)

    def _latent_attention(
        self, q: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, cache: LatentCache, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """q (B, H, T, r + D_rope) over the cached [c_kv, k_pe] as one key head whose first r channels are the
        values: (B, H, T, r). Folding the heads into the query length makes it one attention of H * T queries,
        with no per-head copy of the cache."""
        B, H, T, _ = q.shape
        start = cache.pos
        keys = cache.update(self.layer, c_kv, k_pe)[:, None]  # (B, 1, S, r + D_rope); values: its first r
        if mask is None and T > 1:
            mask = prefix_causal_mask(start, T, q.device)
        return F.scaled_dot_product_attention(
            q.reshape(B, 1, H * T, -1),
            keys,
            keys[..., : self.rank],
            attn_mask=torch.cat([mask] * H, dim=-2) if mask is not None else None,  # row h*T + t: head h, query t
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.scale,
        ).view(B, H, T, self.rank)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a tensor this process holds: a DTensor's local shard under tensor parallelism, else the tensor.

    Duck-typed, so that single-process code never imports torch.distributed.
    """
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor

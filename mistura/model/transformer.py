"""The decoder-only Transformer: embeddings, a stack of pre-norm blocks, a language-model head.

    tokens (B, T) -> embed (+ learned positions) -> N x Block -> norm -> lm_head -> logits (B, T, V)
    Block: x = x + attn(norm(x)); x = x + mlp(norm(x))

The same class expresses GPT-2 (LayerNorm, GELU, learned positions, biases, tied
embeddings), Llama (RMSNorm, SwiGLU, RoPE, GQA, no biases) and DeepSeek-V2/V3 (latent
attention, YaRN, DeepSeekMoE layers); `ModelConfig` picks.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mistura.config import ModelConfig
from mistura.errors import ConfigError
from mistura.model.attention import Attention, padded_causal_mask
from mistura.model.cache import Cache, KVCache, LatentCache
from mistura.model.mla import MultiHeadLatentAttention
from mistura.model.mlp import dense_mlp
from mistura.model.moe import CollaborativeExperts, GroupedExperts, MoEAux, MoELayer, Router
from mistura.model.norm import RMSNorm, build_norm
from mistura.model.rope import RotaryEmbedding

# The MLP of each layer, by the kind config.layer_mlp names; expert layers also return a MoEAux.
LAYER_MLPS = {"dense": dense_mlp, "moe": MoELayer, "moc": CollaborativeExperts}


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = build_norm(config)
        self.attn = MultiHeadLatentAttention(config, layer) if config.mla is not None else Attention(config, layer)
        self.mlp_norm = build_norm(config)
        self.routed = config.layer_mlp[layer] != "dense"
        self.mlp = LAYER_MLPS[config.layer_mlp[layer]](config)
        self.resid_dropout = nn.Dropout(config.resid_dropout)

    def forward(self, x, rope, cache, mask=None) -> tuple[torch.Tensor, MoEAux | None]:
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), rope, cache, mask))
        if self.routed:
            y, aux = self.mlp(self.mlp_norm(x))
            return x + y, aux
        return x + self.mlp(self.mlp_norm(x)), None


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        learned = config.position == "learned"
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model) if learned else None
        self.rope = (
            None if learned else RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta, config.yarn)
        )
        self.emb_dropout = nn.Dropout(config.resid_dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = build_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.activation_checkpointing = False  # recompute blocks in backward to save memory
        self.tensor_parallel = 1  # ranks that split the heads (mistura.parallel.tensor): its caches hold its own
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter; norms start as the identity.

        | parameters                           | init                                   |
        |--------------------------------------|----------------------------------------|
        | embeddings, linear weights, lm_head  | normal(0, init_std)                    |
        | attention o_proj, MLP down_proj      | normal(0, init_std / sqrt(2 n_layer))  |
        |                                      | when scaled_init (GPT-2's residual     |
        |                                      | scaling: the stream's variance stays   |
        |                                      | flat with depth)                       |
        | routed experts (stacked weights),    | as linear weights; down_proj residual  |
        | MultiheadAttention input projections |                                        |
        | biases, router selection bias        | zero                                   |
        | norm weights and alpha               | one                                    |
        """
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layer) if self.config.scaled_init else std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_residual = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, 0.0, residual_std if is_residual else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.MultiheadAttention):  # collaborative experts' attentions
                nn.init.normal_(module.in_proj_weight, 0.0, std)
                if module.in_proj_bias is not None:
                    nn.init.zeros_(module.in_proj_bias)
            elif isinstance(module, GroupedExperts):
                module.reset_parameters(std, residual_std)
            elif isinstance(module, Router):
                module.expert_bias.zero_()
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.reset_parameters()

    def forward(
        self, idx: torch.Tensor, cache: Cache | None = None, return_aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[MoEAux]]:
        """Logits (B, T, V) for token ids idx (B, T); with a cache, idx continues the cached tokens.

        With return_aux, also the MoEAux of every expert layer (auxiliary losses, load, statistics).
        """
        x, auxes = self.hidden_states(idx, cache, return_aux=True)
        logits = self.logits(x)
        return (logits, auxes) if return_aux else logits

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of final hidden states (B, T, D): the lm_head, soft-capped when the config says."""
        logits = self.lm_head(x)
        cap = self.config.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def hidden_states(
        self, idx: torch.Tensor, cache: Cache | None = None, return_aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[MoEAux]]:
        """The final normed hidden states norm(h_N) (B, T, D) that the lm_head reads, for token ids idx (B, T).

        What a reward or value head reads instead of the logits; cache and return_aux as in forward.
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        self._check_length(start + T if cache is None else cache.end(T), cache)
        mask, positions = self._frame(start, T, cache, idx.device)
        x = self.tok_emb(idx)  # (B, T, D)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device) if positions is None else positions)
        x = self.emb_dropout(x)
        if self.rope is None:
            rope = None
        else:
            rope = self.rope(start, T) if positions is None else self.rope.at(positions)
        auxes = []
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x, aux = checkpoint(block, x, rope, cache, mask, use_reentrant=False)
            else:
                x, aux = block(x, rope, cache, mask)
            if aux is not None:
                auxes.append(aux)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)  # (B, T, D)
        return (x, auxes) if return_aux else x

    @staticmethod
    def _frame(
        start: int, length: int, cache: Cache | None, device: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The attention mask (B, 1, T, S) and positions (B, T) of the new tokens where rows differ: a left-padded
        batch (its padding slots at position 0) or a paged one, whose cache gives its positions (and no mask: it
        attends through its block tables); None, None where every row continues at `start` with plain causal
        attention."""
        if cache is None:
            return None, None
        if cache.positions is not None:
            return None, cache.positions
        if cache.pad is None:
            return None, None
        slots = torch.arange(start, start + length, device=device)
        return padded_causal_mask(cache.pad, start, length), (slots[None, :] - cache.pad[:, None]).clamp(min=0)

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters, those each token uses, and the embeddings'.

        A token uses every parameter except the routed experts it is not sent to: in a
        MoE layer only top_k of the n_experts experts' weights are active.
        `active_non_embedding` also leaves out the input lookup tables (token and learned
        position embeddings), of which a token reads a single row; a tied table stays in,
        as the lm_head multiplies by all of it. DeepSeek's "activated parameters" count
        this way (lm_head in, input embedding out).
        """
        total = sum(p.numel() for p in self.parameters())  # a tied lm_head is counted once
        embedding = sum(m.weight.numel() for m in (self.tok_emb, self.pos_emb) if m is not None)
        inactive = 0
        for module in self.modules():
            if isinstance(module, MoELayer):
                per_expert = sum(p[0].numel() for p in module.experts.parameters())
                inactive += (module.config.n_experts - module.config.top_k) * per_expert
        lookup = embedding - (self.tok_emb.weight.numel() if self.config.tie_embeddings else 0)
        active = total - inactive
        return {"total": total, "active": active, "active_non_embedding": active - lookup, "embedding": embedding}

    def balance_step(self) -> None:
        """After an optimizer step: move each router's selection bias toward equal expert load."""
        for module in self.modules():
            if isinstance(module, Router):
                module.balance_step()

    def _check_length(self, end: int, cache: Cache | None) -> None:
        if end > self.config.max_seq_len:
            raise ConfigError(f"sequence of {end} tokens exceeds the model's max_seq_len={self.config.max_seq_len}")
        if cache is not None and end > cache.max_len:
            raise ConfigError(f"sequence of {end} tokens exceeds the KV cache length {cache.max_len}")

    def new_cache(self, batch_size: int, max_len: int | None = None, latent: bool = True) -> Cache:
        """A cache on this model's device and dtype, for up to max_len (default max_seq_len) tokens.

        MLA models get a LatentCache (the absorbed path) unless latent=False asks for the
        expanded per-head KVCache (the naive path); other models always get a KVCache.
        """
        param = self.tok_emb.weight
        kind = LatentCache if self.config.mla is not None and latent else KVCache
        max_len = max_len or self.config.max_seq_len
        return kind(self.config, batch_size, max_len, param.dtype, param.device, self.tensor_parallel)

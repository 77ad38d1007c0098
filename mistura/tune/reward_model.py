"""Scalar heads on a mistura Transformer: a reward model for preferences, a value head for PPO's critic.

    h = backbone.hidden_states(ids)          (B, T, D) the final normed states the lm_head would read
    v = ValueHead(h) = h w + b               (B, T)    a scalar per token: PPO's V(s_t)
    r = v[b, last real token of row b]       (B,)      the reward of the whole sequence

The reward is read at the last real token, which under causal attention has seen the whole
sequence; rows are right-padded (real tokens first, then padding, mask 1 then 0), so padding
comes after every real token and never changes its state. As in InstructGPT (Ouyang et al. 2022)
and TRL's reward models (AutoModelForSequenceClassification, the score at the last non-pad token).
"""

from __future__ import annotations

import torch
from torch import nn

from mistura.model import Transformer
from mistura.tune.masked import last_index


class ValueHead(nn.Module):
    """A linear map from hidden states (B, T, D) to one scalar per token (B, T), in the head's own dtype."""

    def __init__(self, d_model: int, init_std: float = 0.02):
        super().__init__()
        self.proj = nn.Linear(d_model, 1)
        nn.init.normal_(self.proj.weight, 0.0, init_std)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.to(self.proj.weight.dtype)).squeeze(-1)  # (B, T)


class RewardModel(nn.Module):
    """A Transformer backbone with a ValueHead: per-token scores (values) and the sequence's reward (forward)."""

    def __init__(self, backbone: Transformer):
        super().__init__()
        self.backbone = backbone
        self.head = ValueHead(backbone.config.d_model, backbone.config.init_std)

    def values(self, idx: torch.Tensor) -> torch.Tensor:
        """The head's scalar at every position (B, T) of token ids idx (B, T): a PPO critic's V(s_t)."""
        return self.head(self.backbone.hidden_states(idx))

    def forward(self, idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The reward (B,) of each right-padded row of idx (B, T): the score at its last token where mask is 1."""
        scores = self.values(idx)  # (B, T)
        rows = torch.arange(idx.size(0), device=idx.device)
        return scores[rows, last_index(mask)]

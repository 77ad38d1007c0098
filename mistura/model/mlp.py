"""Position-wise MLPs: GELU (GPT-2) and SwiGLU (Llama, Shazeer 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mistura.config import ModelConfig


class GeluMLP(nn.Module):
    """down(gelu(up(x))); `approximate="tanh"` is GPT-2's "gelu_new"."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.approximate = "tanh" if config.mlp == "gelu_tanh" else "none"
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.mlp_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.gelu(self.up_proj(x), approximate=self.approximate)))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): a gated MLP with a SiLU gate."""

    def __init__(self, d_model: int, hidden: int, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=bias)
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


def dense_mlp(config: ModelConfig) -> nn.Module:
    """The dense MLP of a layer, of the kind config.mlp names."""
    if config.mlp == "swiglu":
        return SwiGLU(config.d_model, config.d_ff, config.bias, config.mlp_dropout)
    return GeluMLP(config)

"""Normalisation layers: LayerNorm (GPT-2) and RMSNorm (Llama), optionally adaptive (seed 000)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mistura.config import ModelConfig


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, with the statistics in fp32 as Llama computes them.

    With `adaptive=True` a learnable scalar `alpha` (initialised to 1) multiplies the
    result, so each layer can tune how strongly it normalises (seed 000's NormaRMS).
    """

    def __init__(self, dim: int, eps: float, adaptive: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.alpha = nn.Parameter(torch.empty(())) if adaptive else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.alpha is not None:
            nn.init.ones_(self.alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight
        return y * self.alpha if self.alpha is not None else y


def build_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "layernorm":
        return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)
    return RMSNorm(config.d_model, config.norm_eps, config.adaptive_norm)

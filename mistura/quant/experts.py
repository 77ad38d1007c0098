"""Routed experts with quantised weights: a quantised linear layer per expert and projection.

`GroupedExperts` keeps each projection as one stacked (E, out, in) tensor and multiplies
each expert's contiguous rows by its own slice. Here each slice is a `QuantLinear`, so
`gate_proj`, `up_proj` and `down_proj` are lists of E layers and checkpoints store
`...experts.gate_proj.3.weight` and its scales. GroupedExperts' forward runs unchanged: only
its per-expert product is replaced, a loop over the experts, as its own fallback does.
"""

from __future__ import annotations

import torch
from torch import nn

from mistura.model.moe import GroupedExperts
from mistura.quant.linear import QuantLinear

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class QuantExperts(GroupedExperts):
    def __init__(self, n_experts: int, d_model: int, d_expert: int, linear: type[QuantLinear], group_size: int | None):
        nn.Module.__init__(self)  # not GroupedExperts.__init__, which allocates the full-precision stacks
        shapes = {"gate_proj": (d_model, d_expert), "up_proj": (d_model, d_expert), "down_proj": (d_expert, d_model)}
        for name, (in_features, out_features) in shapes.items():
            layers = nn.ModuleList(linear(in_features, out_features, False, group_size) for _ in range(n_experts))
            setattr(self, name, layers)

    @classmethod
    def like(cls, experts: GroupedExperts, linear: type[QuantLinear], group_size: int | None) -> QuantExperts:
        """Empty quantised experts of the shape of `experts`."""
        n_experts, d_expert, d_model = experts.gate_proj.shape
        return cls(n_experts, d_model, d_expert, linear, group_size)

    @torch.no_grad()
    def quantize_from(self, experts: GroupedExperts) -> QuantExperts:
        """Fill every expert's layers from the stacked weights of `experts`; returns self."""
        for name in PROJECTIONS:
            for layer, weight in zip(getattr(self, name), getattr(experts, name)):
                layer.quantize_(weight.detach().float())
        return self

    @staticmethod
    def _matmul(x: torch.Tensor, weight: nn.ModuleList, counts: torch.Tensor) -> torch.Tensor:
        """Row group e of x (A, in) through expert e's layer -> (A, out)."""
        return torch.cat([layer(rows) for layer, rows in zip(weight, x.split(counts.tolist()))])

    def extra_repr(self) -> str:
        return f"experts={len(self.gate_proj)}"

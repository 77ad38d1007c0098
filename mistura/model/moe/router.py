"""Routers: which top_k experts each token goes to, and with what weight.

Legend: N tokens, D model width, E experts, K experts per token, G expert groups.

Scores are computed in fp32 whatever the autocast dtype, since small logit differences
decide the routing. One class covers the family:
- Switch / Mixtral / Qwen: softmax over experts, top-k, optionally renormalised.
- DeepSeek-V3: sigmoid scores; a per-expert bias, added for *selection only*, steers load
  without an auxiliary loss; group-limited routing first keeps the topk_groups groups
  with the best sum of their two highest scores; the weights are the unbiased scores,
  renormalised, times route_scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mistura.config import MoEConfig


@dataclass
class Routing:
    experts: torch.Tensor  # (N, K) chosen expert ids
    weights: torch.Tensor  # (N, K) their gate weights, fp32
    scores: torch.Tensor  # (N, E) fp32 scores: softmax probabilities or sigmoid affinities
    logits: torch.Tensor  # (N, E) fp32 router logits


class Router(nn.Module):
    def __init__(self, d_model: int, config: MoEConfig):
        super().__init__()
        self.config = config
        self.gate = nn.Linear(d_model, config.n_experts, bias=False)
        # Aux-loss-free balancing: a selection-only bias, updated by `balance_step`, never by gradients.
        self.register_buffer("expert_bias", torch.zeros(config.n_experts))
        self.register_buffer("load", torch.zeros(config.n_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> Routing:  # x (N, D)
        cfg = self.config
        with torch.autocast(x.device.type, enabled=False):  # autocast would run the gate in bf16
            logits = F.linear(x.float(), self.gate.weight.float())  # (N, E)
        scores = logits.softmax(-1) if cfg.scoring == "softmax" else logits.sigmoid()
        choice = scores + self.expert_bias  # zero unless trained by balance_step or imported
        if cfg.n_groups > 1:
            choice = self._limit_to_best_groups(choice)
        experts = choice.topk(cfg.top_k, dim=-1, sorted=False).indices  # (N, K)
        weights = scores.gather(-1, experts)  # (N, K)
        if cfg.norm_topk:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        if self.training and cfg.balance_bias_rate > 0:
            self.load += torch.bincount(experts.flatten(), minlength=cfg.n_experts).to(self.load.dtype)
        return Routing(experts, weights * cfg.route_scale, scores, logits)

    def _limit_to_best_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Mask (to -inf) every expert outside the topk_groups best groups of each token."""
        cfg = self.config
        grouped = choice.view(choice.shape[0], cfg.n_groups, -1)  # (N, G, E / G)
        group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # (N, G)
        best = group_score.topk(cfg.topk_groups, dim=-1).indices  # (N, topk_groups)
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)  # (N, G)
        return grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)

    @torch.no_grad()
    def balance_step(self) -> None:
        """Nudge each expert's selection bias toward equal load: +rate if under-loaded, -rate if over."""
        if self.load.sum() == 0:
            return
        self.expert_bias += self.config.balance_bias_rate * torch.sign(self.load.mean() - self.load)
        self.load.zero_()

"""Mixture of Collaborative Experts (MoC, seed 003): experts that read each other's answers.

Legend: B batch, T time, N = B * T tokens, D model width, E experts, K experts per token,
F expert width, H heads of the two small attentions.

In a top-k MoE layer the router reads only the token, and the K chosen experts never see
one another: their outputs are just summed with the gate weights. MoC changes both ends.

1. Router contextualisation. Every expert answers every token: (N, E, D). A small
   self-attention runs over the E answers of each token (the E answers are the sequence,
   the N tokens are the batch), so each answer is re-read in the light of the others.
   The router logits add a linear gate on the token and a linear score of each
   contextualised answer, in fp32:

       logits[n, e] = g_e . x[n] + s . context[n, e]

   The K largest logits are kept; the softmax over those K gives the K weights.
2. Collaborative fusion. The K selected answers attend to each other with a second
   self-attention (the seed calls it cross-attention: each selected expert reads its
   peers, itself included), each answer adds its refinement (a residual), and the router
   weights sum the K refined answers into one output per token.

Dense by design: all E experts run for every token, because the router needs their
answers before it chooses. Per token that is E expert MLPs where a top-k MoE runs K
(3 E D F against 3 K D F multiply-adds), plus the two attentions, short (E and K
positions) but as wide as the model: their projections add about 4 (E + K) D^2. In
moc-tiny (D 256, F 192, E 4, K 2) that is 2.16M multiply-adds per token against 0.29M
for a top-2 MoE of the same experts, 7.3 times as many, most of them in the attentions.
Nothing is dropped and no token waits for capacity, so training, evaluation and cached
decoding route alike; every parameter is active for every token.

The auxiliary loss (its two weights in MoEConfig) sums:
- balance: `balance_loss`, the variance of the experts' mean routing probabilities,
  scaled to be 0 when even and E - 1 when one expert takes every token. It uses the
  soft probabilities, not the hard top-k counts, so its gradient reaches the router;
  the hard counts come back as `MoEAux.load`.
- diversity: `diversity_loss`, one minus the normalised entropy of the fusion attention,
  so minimising it spreads each selected expert's attention over its peers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mistura.config import ModelConfig
from mistura.errors import ConfigError
from mistura.model.moe.experts import GroupedExperts
from mistura.model.moe.layer import MoEAux
from mistura.model.moe.router import Routing


class CollaborativeExperts(nn.Module):
    """A MoC layer, x (B, T, D) -> (y (B, T, D), MoEAux); the MLP of layer kind "moc".

    Dense in compute, unlike `MoELayer`: every token runs all E experts and two small
    attentions (7.3 times a top-2 MoE's multiply-adds in moc-tiny; see the module docstring).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = moe = config.moe
        D, E = config.d_model, moe.n_experts
        if D % moe.moc_heads:
            raise ConfigError(f"model.moe.moc_heads: {moe.moc_heads} heads do not divide d_model={D}")
        self.experts = GroupedExperts(E, D, moe.d_expert)
        self.router_attn = nn.MultiheadAttention(D, moe.moc_heads, bias=config.bias, batch_first=True)
        self.gate = nn.Linear(D, E, bias=False)  # the token's vote for each expert
        self.score = nn.Linear(D, 1, bias=False)  # the vote of each contextualised answer
        self.fusion_attn = nn.MultiheadAttention(D, moe.moc_heads, bias=config.bias, batch_first=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:  # x (B, T, D)
        B, T, D = x.shape
        flat = x.reshape(B * T, D)  # (N, D)
        answers = self.expert_outputs(flat)  # (N, E, D)
        routing = self.route(flat, answers)
        selected = answers.take_along_dim(routing.experts[..., None], dim=1)  # (N, K, D)
        fused, fusion_weights = self.fuse(selected)  # (N, K, D), (N, H, K, K)
        y = (routing.weights[..., None].to(fused.dtype) * fused).sum(1)  # (N, D)
        return y.view(B, T, D), self._aux(routing, fusion_weights)

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's answer to every token, (N, D) -> (N, E, D).

        The stacked weights of `GroupedExperts`, applied densely: gate and up are each one
        matmul (N, D) @ (D, E * F), down is a matmul batched over the experts.
        """
        w = self.experts
        gate = torch.einsum("nd,efd->nef", x, w.gate_proj)  # (N, E, F)
        up = torch.einsum("nd,efd->nef", x, w.up_proj)  # (N, E, F)
        return torch.einsum("nef,edf->ned", F.silu(gate) * up, w.down_proj)

    def route(self, x: torch.Tensor, answers: torch.Tensor) -> Routing:
        """Top-K experts of each token (x (N, D)), chosen from the token and the answers (N, E, D)."""
        context, _ = self.router_attn(answers, answers, answers, need_weights=False)  # (N, E, D)
        with torch.autocast(x.device.type, enabled=False):  # small logit gaps decide the choice
            logits = F.linear(x.float(), self.gate.weight.float())  # (N, E)
            logits = logits + F.linear(context.float(), self.score.weight.float()).squeeze(-1)
        top = logits.topk(self.config.top_k, dim=-1)  # (N, K)
        return Routing(top.indices, top.values.softmax(-1), logits.softmax(-1), logits)

    def fuse(self, selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The K selected answers (N, K, D), each refined by attending to all K: the refined
        answers (N, K, D) and the attention weights of every head (N, H, K, K)."""
        refinement, weights = self.fusion_attn(
            selected, selected, selected, need_weights=True, average_attn_weights=False
        )
        return selected + refinement, weights

    def _aux(self, routing: Routing, fusion_weights: torch.Tensor) -> MoEAux:
        cfg = self.config
        losses = {"balance_loss": balance_loss(routing.scores), "diversity_loss": diversity_loss(fusion_weights)}
        loss = cfg.aux_loss_weight * losses["balance_loss"] + cfg.diversity_loss_weight * losses["diversity_loss"]
        load = torch.bincount(routing.experts.flatten(), minlength=cfg.n_experts).float()  # (E,)
        stats = {name: value.detach() for name, value in losses.items()}
        stats["entropy"] = _entropy(routing.scores).mean().detach()
        stats["dropped_fraction"] = torch.zeros((), device=load.device)
        return MoEAux(loss, load, stats)


def balance_loss(probs: torch.Tensor) -> torch.Tensor:
    """E^2 * Var_e(P_e), P_e the mean over tokens of expert e's routing probability (probs (N, E)).

    P sums to one, so its mean is 1/E and the scaled variance is P's squared coefficient
    of variation: 0 when every expert gets an even share, E - 1 when one gets everything.
    """
    E = probs.shape[-1]
    return E**2 * probs.mean(0).var(correction=0)


def diversity_loss(weights: torch.Tensor) -> torch.Tensor:
    """1 - mean over tokens, heads and queries of H(a) / log K, for fusion weights (N, H, K, K).

    H(a) = -sum_j a_j log a_j is the entropy of one selected expert's attention over the
    K selected experts; log K is its largest value. The loss is 0 when each expert
    attends evenly to all K, 1 when it attends to one only; with K = 1 there is no
    choice to spread, and the loss is 0.
    """
    K = weights.shape[-1]
    if K == 1:
        return weights.new_zeros((), dtype=torch.float32)
    return 1 - _entropy(weights.float()).mean() / math.log(K)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of the distributions along the last dimension."""
    return -(p * p.clamp_min(1e-20).log()).sum(-1)

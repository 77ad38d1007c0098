"""A Mixture-of-Experts MLP layer: router -> grouped experts -> weighted combine (+ shared experts).

Legend: B batch, T time, N = B * T tokens, D model width, E experts, K experts per token,
A kept assignments.

Dispatch never loops over tokens: the N * K (token, expert) assignments are sorted by
expert (stably, so each expert sees its tokens in order), the token rows are gathered
once into expert-contiguous order, the experts run as one grouped matmul, and the outputs,
scaled by their gate weights, are scatter-added back to their tokens.

Expert parallelism (mistura.parallel.expert) replaces only `_run_experts`: the sorted rows travel
to the ranks that hold their experts and back; routing, capacity and the combine stay here.

Capacity (training only): each expert takes at most ceil(capacity_factor * N * K / E)
assignments; the later ones in token order are dropped and contribute nothing, so the
token's residual carries it. Evaluation and generation are dropless, so decoding with a
KV cache sees the same routing as a full forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mistura.config import ModelConfig
from mistura.model.mlp import SwiGLU
from mistura.model.moe.experts import GroupedExperts
from mistura.model.moe.router import Router, Routing


@dataclass
class MoEAux:
    """What a MoE layer reports besides its output."""

    loss: torch.Tensor  # weighted sum of the layer's auxiliary losses (differentiable), scalar
    load: torch.Tensor  # (E,) assignments routed to each expert, before capacity dropping
    stats: dict[str, torch.Tensor]  # detached scalars: dropped, entropy and each aux loss


class MoELayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = moe = config.moe
        self.router = Router(config.d_model, moe)
        self.experts = GroupedExperts(moe.n_experts, config.d_model, moe.d_expert)
        self.shared = SwiGLU(config.d_model, moe.d_shared) if moe.d_shared else None
        self.shared_gate = nn.Linear(config.d_model, 1, bias=False) if moe.shared_gate else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:  # x (B, T, D)
        B, T, D = x.shape
        flat = x.reshape(B * T, D)  # (N, D)
        routing = self.router(flat)
        load = torch.bincount(routing.experts.flatten(), minlength=self.config.n_experts)  # (E,)
        y, dropped = self._dispatch(flat, routing, load)
        if self.shared is not None:
            shared = self.shared(flat)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(flat)) * shared
            y = y + shared
        return y.view(B, T, D), self._aux(routing, load.float(), B, T, dropped)

    def _dispatch(self, x: torch.Tensor, routing: Routing, counts: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Experts' weighted outputs summed per token (N, D), and how many assignments were dropped.

        counts (E,) holds the assignments per expert, before any capacity dropping.
        """
        N, K = routing.experts.shape
        expert_of = routing.experts.flatten()  # (N * K,) token-major
        order = expert_of.argsort(stable=True)  # assignments grouped by expert
        if self.training and self.config.capacity_factor is not None:
            order, counts = self._apply_capacity(order, expert_of[order], counts, N * K)
        token = order // K  # (A,)
        weights = routing.weights.flatten()[order, None].to(x.dtype)  # (A, 1)
        # index_select, not x[token]: its backward is an index_add_, where indexing's is an
        # accumulating index_put_, several times slower on CPU.
        out = self._run_experts(x.index_select(0, token), counts, weights)  # (A, D), weighted
        y = torch.zeros_like(x).index_add_(0, token, out)
        return y, N * K - order.numel()

    def _run_experts(self, rows: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """rows (A, D) sorted by expert, counts (E,) rows per expert -> their experts' outputs times weights (A, 1)."""
        return self.experts(rows, counts, weights)

    def _apply_capacity(self, order, sorted_experts, counts, n_assignments):
        """Keep each expert's first `capacity` assignments (in token order); drop the rest."""
        capacity = math.ceil(self.config.capacity_factor * n_assignments / self.config.n_experts)
        starts = counts.cumsum(0) - counts  # (E,) where each expert's run begins
        rank = torch.arange(n_assignments, device=order.device) - starts[sorted_experts]  # place within its expert
        return order[rank < capacity], counts.clamp(max=capacity)

    def _aux(self, routing: Routing, load: torch.Tensor, B: int, T: int, dropped: int) -> MoEAux:
        cfg = self.config
        E, K, N = cfg.n_experts, cfg.top_k, B * T
        probs = routing.scores / routing.scores.sum(-1, keepdim=True)  # (N, E) routing distribution
        mean_probs = probs.mean(0)  # (E,)
        losses = {
            # Switch Transformer: E * sum_i f_i * P_i, f_i = share of the N * K assignments; 1 when balanced.
            "balance_loss": E * (load / (N * K) * mean_probs).sum(),
            "z_loss": torch.logsumexp(routing.logits, dim=-1).pow(2).mean(),
            "seq_aux_loss": _sequence_balance_loss(routing, probs, B, T, E, K),
            # log E - H(mean routing distribution): zero when experts are used evenly.
            "entropy_loss": math.log(E) + (mean_probs * mean_probs.clamp_min(1e-20).log()).sum(),
        }
        weights = {
            "balance_loss": cfg.aux_loss_weight,
            "z_loss": cfg.z_loss_weight,
            "seq_aux_loss": cfg.seq_aux_loss_weight,
            "entropy_loss": cfg.entropy_weight,
        }
        loss = sum(weights[name] * value for name, value in losses.items() if weights[name] > 0)
        entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1).mean()
        stats = {name: value.detach() for name, value in losses.items()}
        stats["entropy"] = entropy.detach()
        stats["dropped_fraction"] = torch.tensor(dropped / (N * K))
        return MoEAux(torch.as_tensor(loss, dtype=torch.float32, device=load.device), load, stats)


def _sequence_balance_loss(routing: Routing, probs: torch.Tensor, B: int, T: int, E: int, K: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss: mean over sequences of sum_i f_i * P_i,
    f_i = E / (K * T) * (assignments to i in the sequence), P_i = mean routing probability of i."""
    one_hot = torch.zeros(B * T, E, device=probs.device).scatter_(1, routing.experts, 1.0)  # (N, E)
    f = one_hot.view(B, T, E).sum(1) * (E / (K * T))  # (B, E)
    return (f * probs.view(B, T, E).mean(1)).sum(-1).mean()

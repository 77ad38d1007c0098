"""Expert-usage metrics of every MoE layer, accumulated over a window of forward passes.

Per layer L (numbered in the model), over the assignments seen since the last summary:
    moe/L/load_i        share of assignments routed to expert i (sums to 1)
    moe/L/max_util      max_i load_i * E (1.0: perfectly even; E: one expert takes all)
    moe/L/min_util      min_i load_i * E
    moe/L/load_cv       coefficient of variation of the load (std / mean)
    moe/L/dead_experts  experts that received no assignment
    moe/L/entropy       mean per-token routing entropy (nats)
    moe/L/dropped_fraction, balance_loss, z_loss, seq_aux_loss, entropy_loss (window means;
                        collaborative layers report balance_loss and diversity_loss)
"""

from __future__ import annotations

from collections import defaultdict

import torch

from mistura.model.moe import MoEAux


class MoEMonitor:
    def __init__(self, layers: list[int]):
        self.layers = layers  # model layer index of each MoE layer, in order
        self.reset()

    def reset(self) -> None:
        self.load: dict[int, torch.Tensor] = {}
        self.sums: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.passes = 0

    def update(self, auxes: list[MoEAux]) -> None:
        self.passes += 1
        for layer, aux in zip(self.layers, auxes, strict=True):
            load = aux.load.detach().cpu()
            self.load[layer] = self.load[layer] + load if layer in self.load else load
            for name, value in aux.stats.items():
                self.sums[layer][name] += float(value)

    def summary(self) -> dict[str, float]:
        """The window's metrics as flat `moe/L/name` keys; then starts a new window."""
        metrics: dict[str, float] = {}
        for layer, load in self.load.items():
            share = load / load.sum()
            prefix = f"moe/{layer}/"
            metrics.update({f"{prefix}load_{i}": float(v) for i, v in enumerate(share)})
            metrics[prefix + "max_util"] = float(share.max() * len(share))
            metrics[prefix + "min_util"] = float(share.min() * len(share))
            metrics[prefix + "load_cv"] = float(share.std(correction=0) / share.mean())
            metrics[prefix + "dead_experts"] = int((load == 0).sum())
            metrics.update({prefix + name: total / self.passes for name, total in self.sums[layer].items()})
        self.reset()
        return metrics

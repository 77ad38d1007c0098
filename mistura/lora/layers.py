"""LoRA layers: a frozen base layer plus a trainable low-rank update, y = base(x) + s B A dropout(x).

Legend: A assignments sorted by expert, E experts, r rank.

- `LoRALinear` wraps an `nn.Linear` or a quantised `QuantLinear`: A (r, in), B (out, r).
- `LoRAExperts` wraps routed experts (`GroupedExperts` or `QuantExperts`), keeping their
  stacked layout: every expert has its own pair per projection, A (E, r, in) and B (E, out, r),
  and the update runs as two more grouped matmuls over the same expert-sorted rows, with no
  loop over experts. The experts' forward (the SwiGLU) is inherited: only `project` grows.

A starts as PEFT's (Kaiming-uniform, bound 1 / sqrt(in)), B at zero. The adapters stay in
full precision (fp32) whatever the base computes in: the input is cast for them and their
update cast back. `merge` folds s B A into a full-precision base weight, `unmerge` takes it
out again; a quantised base cannot hold the sum (see mistura.lora.merge).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mistura.errors import ConfigError
from mistura.lora.config import LoRAConfig
from mistura.model.moe.experts import GroupedExperts, grouped_matmul
from mistura.quant.experts import PROJECTIONS, QuantExperts


class Mergeable:
    """`merge` and `unmerge` for a LoRA layer whose `_add(sign)` adds sign * s B A to its base's weights."""

    merged: bool

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base's weights; the layer then computes as its base alone."""
        self._fold(True)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take a merged update out of the base's weights again."""
        self._fold(False)

    def _fold(self, merge: bool) -> None:
        if self.merged != merge:
            check_mergeable(self.base, type(self.base).__name__)
            self._add(1 if merge else -1)
            self.merged = merge


class LoRALinear(Mergeable, nn.Module):
    def __init__(self, base: nn.Module, config: LoRAConfig):
        super().__init__()
        self.base, self.config, self.merged = base, config, False
        self.in_features, self.out_features = base.in_features, base.out_features
        device = next(iter(base.state_dict().values())).device
        self.lora_A = nn.Parameter(_uniform(torch.empty(config.rank, self.in_features, device=device)))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.rank, device=device))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        y = self.base(x)
        if self.merged:
            return y
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A) * self.config.scale  # (..., r), narrow
        return y + F.linear(h, self.lora_B).to(y.dtype)

    def delta(self) -> torch.Tensor:
        """s B A (out, in), the update the adapter adds to the weight."""
        return self.config.scale * self.lora_B @ self.lora_A

    @property
    def weight(self) -> torch.Tensor:
        """The adapted weight (out, in), for code that reads a layer's matrix (MLA's absorbed decoding)."""
        weight = self.base.weight if isinstance(self.base, nn.Linear) else self.base.dequantize()
        return weight if self.merged else weight + self.delta().to(weight.dtype)

    def _add(self, sign: int) -> None:
        self.base.weight.add_(sign * self.delta().to(self.base.weight.dtype))

    def extra_repr(self) -> str:
        return f"rank={self.config.rank}, scale={self.config.scale:g}, merged={self.merged}"


class LoRAExperts(Mergeable, GroupedExperts):
    def __init__(self, base: GroupedExperts, config: LoRAConfig):
        nn.Module.__init__(self)  # not GroupedExperts.__init__, which allocates the experts' weights
        self.base, self.config, self.merged = base, config, False
        device = next(iter(base.state_dict().values())).device
        shapes = {name: projection_shape(base, name) for name in PROJECTIONS}  # (E, out, in)
        r = config.rank
        self.lora_A = nn.ParameterDict(
            {name: _uniform(torch.empty(E, r, d_in, device=device)) for name, (E, _, d_in) in shapes.items()}
        )
        self.lora_B = nn.ParameterDict(
            {name: torch.zeros(E, d_out, r, device=device) for name, (E, d_out, _) in shapes.items()}
        )
        self.dropout = nn.Dropout(config.dropout)

    def project(self, name: str, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The base's projection of row group e by expert e, plus expert e's update: (A, in) -> (A, out)."""
        y = self.base.project(name, x, counts)
        if self.merged:
            return y
        h = grouped_matmul(self.dropout(x).to(self.lora_A[name].dtype), self.lora_A[name], counts)  # (A, r)
        return y + grouped_matmul(h * self.config.scale, self.lora_B[name], counts).to(y.dtype)

    def delta(self, name: str) -> torch.Tensor:
        """s B A (E, out, in) for projection `name`, one update per expert."""
        return self.config.scale * self.lora_B[name] @ self.lora_A[name]

    def _add(self, sign: int) -> None:
        for name in PROJECTIONS:
            weight = getattr(self.base, name)
            weight.add_(sign * self.delta(name).to(weight.dtype))

    def extra_repr(self) -> str:
        return f"experts={len(self.lora_A['gate_proj'])}, rank={self.config.rank}, merged={self.merged}"


def _uniform(a: torch.Tensor) -> torch.Tensor:
    """PEFT's init of A (..., r, in): Kaiming-uniform with a = sqrt(5), which is uniform in +-1 / sqrt(in)."""
    bound = a.shape[-1] ** -0.5
    return nn.init.uniform_(a, -bound, bound)


def projection_shape(experts: GroupedExperts, name: str) -> tuple[int, int, int]:
    """(E, out, in) of a projection of full-precision or quantised experts."""
    if isinstance(experts, QuantExperts):
        layers = getattr(experts, name)
        return len(layers), layers[0].out_features, layers[0].in_features
    return tuple(getattr(experts, name).shape)


def check_mergeable(base: nn.Module, name: str) -> None:
    """ConfigError unless `base`, the layer `name`, is full precision: a quantised weight cannot hold a merge."""
    if not isinstance(base, (nn.Linear, GroupedExperts)) or isinstance(base, QuantExperts):
        raise ConfigError(
            f"cannot merge LoRA into the quantised layer {name}: its weights cannot hold the sum; "
            "merged_model() (`mistura lora merge`) folds the adapters into the dequantised base, in full precision"
        )

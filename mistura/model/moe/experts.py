"""Routed experts as stacked weights, run as one grouped matmul over expert-sorted tokens.

Legend: A assignments (token, expert) sorted by expert, D model width, F expert width,
E experts. Each expert is a SwiGLU MLP; expert e's weights are slices [e] of three
(E, out, in) tensors, laid out like nn.Linear so Hugging Face weights map one to one.

`torch._grouped_mm` multiplies each contiguous group of rows by its own expert's matrix
in one call (on CUDA and, since PyTorch 2.8, on CPU). Where it is missing, a loop over
the contiguous per-expert slices does the same with one host sync for the group sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


class GroupedExperts(nn.Module):
    def __init__(self, n_experts: int, d_model: int, d_expert: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, d_expert, d_model))
        self.up_proj = nn.Parameter(torch.empty(n_experts, d_expert, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, residual_std: float | None = None) -> None:
        nn.init.normal_(self.gate_proj, 0.0, std)
        nn.init.normal_(self.up_proj, 0.0, std)
        nn.init.normal_(self.down_proj, 0.0, std if residual_std is None else residual_std)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """x (A, D) sorted by expert, counts (E,) rows per expert -> (A, D), each row times its weight (A, 1).

        The down projection is linear, so a row's weight may scale its input (A, F) or its
        output (A, D): the narrower one, which costs fewer multiplications forward and back.
        """
        hidden = F.silu(self.project("gate_proj", x, counts)) * self.project("up_proj", x, counts)
        if weights is None:
            return self.project("down_proj", hidden, counts)
        if hidden.shape[1] < x.shape[1]:
            return self.project("down_proj", hidden * weights, counts)
        return self.project("down_proj", hidden, counts) * weights

    def project(self, name: str, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Row group e of x (A, in) through expert e's projection `name` (gate_proj, up_proj, down_proj) -> (A, out).

        The one place a projection runs: quantised experts swap the product (`_matmul`), LoRA adds to it.
        """
        return self._matmul(x, getattr(self, name), counts)

    @staticmethod
    def _matmul(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """`project`'s product for stacked weights (E, out, in); quantised experts swap it."""
        return grouped_matmul(x, weight, counts)

    def extra_repr(self) -> str:
        n_experts, d_expert, d_model = self.gate_proj.shape
        return f"experts={n_experts}, d_model={d_model}, d_expert={d_expert}"


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row group e of x times weight[e].T; x (A, in), weight (E, out, in), counts (E,) -> (A, out)."""
    # The kernels need 16-byte aligned rows: the in and out widths times the element size.
    aligned = all(width * x.element_size() % 16 == 0 for width in weight.shape[-2:])
    grouped = HAS_GROUPED_MM and aligned and x.dtype == weight.dtype and x.shape[0] > 0
    if grouped and (x.device.type == "cpu" or x.dtype == torch.bfloat16):  # CUDA kernels take bf16
        offsets = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    pieces = x.split(counts.tolist())
    return torch.cat([piece @ weight[e].T for e, piece in enumerate(pieces)])

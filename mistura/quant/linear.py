"""The common shape of a quantised linear layer: y = x W^T + b with W (out, in) stored in few bits.

A subclass per format (fp8.py, int8.py, int4.py) registers the tensors a checkpoint
stores for W, fills them from a full-precision weight (`quantize_`), says which W they
stand for (`dequantize`) and computes the product (`matmul`), with a fast kernel where
one fits and otherwise by the reference semantics `x @ dequantize().T`. The bias, if
any, stays in full precision. A layer is built empty from its shape, as loading needs,
and filled by `quantize_` or by `load_state_dict`. The layer is frozen but passes gradients
on to its input (`FrozenProduct`), so adapters trained on a quantised model (QLoRA) get theirs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


class QuantLinear(nn.Module, ABC):
    format: ClassVar[str]  # the name `mistura quantize --format` takes

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @abstractmethod
    def quantize_(self, weight: torch.Tensor) -> None:
        """Store weight (out, in), a full-precision matrix, in this layer's format."""

    @abstractmethod
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (out, in) that the stored tensors stand for."""

    @abstractmethod
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, in) @ W^T -> (M, out) in x's dtype."""

    @classmethod
    def like(cls, linear: nn.Linear, group_size: int | None) -> QuantLinear:
        """An empty layer of the shape of `linear`."""
        return cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)

    @torch.no_grad()
    def quantize_from(self, linear: nn.Linear) -> QuantLinear:
        """Fill this layer from `linear`, a full-precision layer of the same shape; returns self."""
        self.quantize_(linear.weight.detach().float())
        if self.bias is not None:
            self.bias.copy_(linear.bias.detach())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        y = FrozenProduct.apply(x.reshape(-1, self.in_features), self).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The product by definition, x (M, in) @ dequantize().T: the path where no kernel fits."""
        return F.linear(x, self.dequantize(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format={self.format}, group_size={self.group_size}"
        )


class FrozenProduct(torch.autograd.Function):
    """`layer.matmul(x)`, differentiable in x: the CPU kernels have no backward, and the weight is frozen,
    so the gradient x receives is grad @ W through the dequantised weight (QLoRA trains adapters this way)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:  # (M, in) -> (M, out)
        ctx.layer = layer
        return layer.matmul(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # (M, out) -> (M, in)
        return grad @ ctx.layer.dequantize(grad.dtype), None

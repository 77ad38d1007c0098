"""int8 weight-only quantisation: symmetric, one scale per group of `group_size` input channels.

    NAME.weight        int8 (out, in)                  q = round(W / s), in [-127, 127]
    NAME.weight_scale  bfloat16 (out, in / group_size)   s = amax(|W| in the group) / 127

so that W ~= q * s. An all-zero group gets s = 1. Activations stay in floating point.

The default group is the whole input row (group_size = in_features): one scale per output
channel. That is what PyTorch's CPU kernel `_weight_int8pack_mm` takes, and with 255 levels
a row's scale costs little: Gaussian weights in rows of 1024 come back with an RMS error of
0.8 % of their standard deviation, against 0.65 % with groups of 128.
At batch 1 on 2 cores (K, N from 1024 to 4096) the kernel multiplies 3 to 12 times as
fast as an fp32 matmul, reading a quarter of the bytes. A smaller group is stored and
loaded alike, but no CPU kernel takes it: such a layer, or one on another device, runs
the reference path (dequantise, then matmul), correct and slower than fp32.

The kernel takes bfloat16 activations: x is cast for the product and the result cast
back, a relative rounding of 2^-9 per element, below the weights' own error.
"""

from __future__ import annotations

import torch

from mistura.quant.linear import QuantLinear

LEVELS = 127  # symmetric: -127..127, so that q and -q are both representable
# The CPU kernel mishandles an input width that is not a multiple of its vector width (in
# PyTorch 2.13, in_features 8 and 24 give inf, 30 crashes the process): it gets multiples of 32 only.
KERNEL_MULTIPLE = 32


class Int8Linear(QuantLinear):
    format = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int | None = None):
        group_size = group_size or in_features
        super().__init__(in_features, out_features, bias, group_size)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, in_features // group_size, dtype=torch.bfloat16))

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor) -> None:
        groups = weight.unflatten(-1, (-1, self.group_size))  # (out, G, group)
        amax = groups.abs().amax(-1)  # (out, G)
        scale = torch.where(amax > 0, amax / LEVELS, 1.0).to(torch.bfloat16)
        # Against the stored (rounded) scale, so that q * s is what the layer computes.
        q = (groups / scale.float()[..., None]).round().clamp(-LEVELS, LEVELS)
        self.weight.copy_(q.flatten(-2))
        self.weight_scale.copy_(scale)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        groups = self.weight.unflatten(-1, (-1, self.group_size)).float()  # (out, G, group)
        return (groups * self.weight_scale.float()[..., None]).flatten(-2).to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and self.group_size == self.in_features and self.in_features % KERNEL_MULTIPLE == 0:
            scale = self.weight_scale[:, 0].to(torch.bfloat16)  # (out,)
            return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.weight, scale).to(x.dtype)
        return self.reference(x)

"""FP8 linear layers in DeepSeek-V3's format: e4m3 weights in 128 x 128 blocks, e4m3 activations per 1 x 128.

    NAME.weight            float8_e4m3fn (out, in)
    NAME.weight_scale_inv  float32 (ceil(out / 128), ceil(in / 128))

the tensors `mistura.convert.fp8.quantize_fp8_blocks` makes (its docstring gives the error
bound), under DeepSeek's names. At run time the activations are quantised too, one scale per
group of 128 consecutive input channels (`quantize_fp8_groups`), and the product is the sum
over the blocks of the 8-bit products times both scales.

Two paths compute it. On CUDA with Triton and FP8 tensor cores, `mistura.quant.triton_fp8`'s
kernels keep both operands in 8 bits. Elsewhere, the PyTorch path is the reference
semantics: quantise the activations, dequantise them and the weight, matmul in the
activations' dtype. On a CPU that is slower than the full-precision layer, since the whole
weight is expanded at every call: FP8 here buys size on disk and in memory, not speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mistura.convert.fp8 import (
    FP8,
    GROUP,
    dequantize_fp8_blocks,
    dequantize_fp8_groups,
    quantize_fp8_blocks,
    quantize_fp8_groups,
)
from mistura.quant.linear import QuantLinear


class Fp8Linear(QuantLinear):
    format = "fp8"

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = GROUP):
        super().__init__(in_features, out_features, bias, group_size)
        blocks = (-(-out_features // group_size), -(-in_features // group_size))
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8))
        self.register_buffer("weight_scale_inv", torch.ones(blocks))

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor) -> None:
        q, scale_inv = quantize_fp8_blocks(weight, (self.group_size, self.group_size))
        self.weight.copy_(q)
        self.weight_scale_inv.copy_(scale_inv)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_fp8_blocks(self.weight, self.weight_scale_inv, (self.group_size, self.group_size), dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from mistura.quant import triton_fp8  # imported here: it imports triton, which CPU runs never need

            if triton_fp8.available():
                return triton_fp8.fp8_linear(x, self.weight, self.weight_scale_inv, self.group_size)
        q, scale = quantize_fp8_groups(x, self.group_size)
        return F.linear(dequantize_fp8_groups(q, scale, self.group_size, x.dtype), self.dequantize(x.dtype))

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts every floating-point tensor, and float8 counts as one: cast
        # the codes back. Every e4m3 value is exact in bf16, fp16 and fp32, so nothing is lost.
        super()._apply(fn, recurse)
        self.weight = self.weight.to(FP8)
        return self

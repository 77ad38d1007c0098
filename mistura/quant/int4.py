"""int4 weight-only quantisation: asymmetric, a scale and a zero point per group of input channels.

    NAME.weight        uint8 (out, in / 2)                two codes q in [0, 15] per byte: column 2j in
                                                          the low four bits, column 2j + 1 in the high four
    NAME.weight_scale  bfloat16 (out, in / group_size)    s = (max - min of the group) / 15
    NAME.weight_zero   bfloat16 (out, in / group_size)    z = min + 8 s

so that W ~= (q - 8) s + z: the 16 levels span the group's own [min, max], not a symmetric
[-amax, amax], which a group leaning to one side would half waste. A constant group gets
s = 1. The default group of 128 input channels is seed 001's 4-bit scheme (AWQ's and GPTQ's
default): Gaussian weights come back with an RMS error of 10 % of their standard deviation
(8 % with groups of 32), against 2.6 % for fp8 and 0.8 % for int8.

On the CPU, PyTorch's `_weight_int4pack_mm_for_cpu` (the kernel gpt-fast and torchao use)
multiplies bfloat16 activations by the codes in its own tiled layout, with the scales and
zero points as one (in / group_size, out, 2) tensor. That layout depends on the CPU's
vector width and the PyTorch version, so checkpoints store the plain layout above and each
layer builds the kernel's (`packed`, `scales_and_zeros`, not saved) when it is quantised or
loaded on the CPU: both copies stay in memory, one byte per weight in all. The kernel takes
groups of 32, 64, 128 or 256 and out_features a multiple of 16; other layers, and layers on
other devices, run the reference path (dequantise, then matmul).
"""

from __future__ import annotations

import torch

from mistura.quant.linear import QuantLinear

LEVELS = 15  # codes 0..15; code 8 stands for the zero point z
KERNEL_GROUPS = (32, 64, 128, 256)
KERNEL_OUT_MULTIPLE = 16


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Codes (..., 2n) in [0, 15] -> bytes uint8 (..., n): even columns low, odd columns high."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Bytes uint8 (..., n) -> codes uint8 (..., 2n), the inverse of pack_nibbles."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


class Int4Linear(QuantLinear):
    format = "int4"

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = 128):
        super().__init__(in_features, out_features, bias, group_size)
        groups = in_features // group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=torch.bfloat16))
        self.register_buffer("weight_zero", torch.zeros(out_features, groups, dtype=torch.bfloat16))
        self.register_buffer("packed", None, persistent=False)
        self.register_buffer("scales_and_zeros", None, persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module.pack_for_cpu())

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor) -> None:
        groups = weight.unflatten(-1, (-1, self.group_size))  # (out, G, group)
        low, high = groups.amin(-1), groups.amax(-1)  # (out, G)
        scale = torch.where(high > low, (high - low) / LEVELS, 1.0).to(torch.bfloat16)
        zero = (low + 8 * scale.float()).to(torch.bfloat16)
        # Against the stored (rounded) scale and zero point, so that (q - 8) s + z is what the layer computes.
        q = ((groups - zero.float()[..., None]) / scale.float()[..., None] + 8).round().clamp(0, LEVELS)
        self.weight.copy_(pack_nibbles(q.flatten(-2)))
        self.weight_scale.copy_(scale)
        self.weight_zero.copy_(zero)
        self.pack_for_cpu()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = unpack_nibbles(self.weight).unflatten(-1, (-1, self.group_size)).float()  # (out, G, group)
        scale, zero = self.weight_scale.float()[..., None], self.weight_zero.float()[..., None]
        return ((q - 8) * scale + zero).flatten(-2).to(dtype)

    def pack_for_cpu(self) -> None:
        """Build the CPU kernel's layout of the stored codes, where the kernel takes this layer."""
        fits = self.group_size in KERNEL_GROUPS and self.out_features % KERNEL_OUT_MULTIPLE == 0
        if not fits or self.weight.device.type != "cpu":
            self.packed = self.scales_and_zeros = None
            return
        codes = unpack_nibbles(self.weight).to(torch.int32)  # (out, in)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        pairs = torch.stack((self.weight_scale, self.weight_zero), dim=-1)  # (out, G, 2)
        self.scales_and_zeros = pairs.transpose(0, 1).contiguous()  # (G, out, 2)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and self.packed is not None:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.to(torch.bfloat16), self.packed, self.group_size, self.scales_and_zeros.to(torch.bfloat16)
            )
            return y.to(x.dtype)
        return self.reference(x)

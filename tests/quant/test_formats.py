"""Each quantised linear layer: what it stores, what it gives back, its kernels against the reference path."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mistura.convert.fp8 import FP8, dequantize_fp8_groups, quantize_fp8_groups
from mistura.quant.fp8 import Fp8Linear
from mistura.quant.int4 import Int4Linear, pack_nibbles, unpack_nibbles
from mistura.quant.int8 import Int8Linear

# Relative RMS error of each format on Gaussian weights of 1024 inputs, as the modules' docstrings give it.
STATED_ERROR = {
    ("int8", None): 0.008,
    ("int8", 128): 0.0065,
    ("int4", 128): 0.10,
    ("int4", 32): 0.078,
    ("fp8", 128): 0.026,
}
LAYERS = {"fp8": Fp8Linear, "int8": Int8Linear, "int4": Int4Linear}


def quantized(fmt: str, group_size: int | None, out_features: int = 64, in_features: int = 256, bias: bool = False):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    return linear, LAYERS[fmt].like(linear, group_size).quantize_from(linear)


@pytest.mark.parametrize(("fmt", "group_size"), list(STATED_ERROR))
def test_weight_error_is_the_stated_precision(fmt, group_size):
    torch.manual_seed(0)
    weight = torch.randn(256, 1024)
    layer = LAYERS[fmt](1024, 256, False, group_size)
    layer.quantize_(weight)
    error = (layer.dequantize() - weight).pow(2).mean().sqrt() / weight.std()
    assert error == pytest.approx(STATED_ERROR[fmt, group_size], rel=0.1)


def test_stored_tensors_have_the_format_dtypes_and_shapes():
    shapes = {
        "fp8": {"weight": (FP8, (64, 256)), "weight_scale_inv": (torch.float32, (1, 2))},
        "int8": {"weight": (torch.int8, (64, 256)), "weight_scale": (torch.bfloat16, (64, 1))},
        "int4": {
            "weight": (torch.uint8, (64, 128)),
            "weight_scale": (torch.bfloat16, (64, 2)),
            "weight_zero": (torch.bfloat16, (64, 2)),
        },
    }
    for fmt, expected in shapes.items():
        _, layer = quantized(fmt, None if fmt == "int8" else 128)
        stored = {name: (t.dtype, tuple(t.shape)) for name, t in layer.state_dict().items()}
        assert stored == expected, fmt


def test_int8_codes_are_within_half_a_step_of_the_weight():
    linear, layer = quantized("int8", 64)
    step = layer.weight_scale.float().repeat_interleave(64, dim=1)
    assert ((layer.dequantize() - linear.weight).abs() <= 0.5 * step * 1.01).all()
    assert layer.weight.abs().max() == 127


def test_int4_codes_span_each_group_and_stay_within_half_a_step():
    linear, layer = quantized("int4", 32)
    step = layer.weight_scale.float().repeat_interleave(32, dim=1)
    assert ((layer.dequantize() - linear.weight).abs() <= 0.5 * step * 1.05).all()
    codes = unpack_nibbles(layer.weight).view(64, 8, 32)
    assert (codes.amin(-1) == 0).all() and (codes.amax(-1) == 15).all()  # asymmetric: both ends used


def test_nibbles_round_trip_and_pack_two_per_byte():
    codes = torch.arange(16, dtype=torch.uint8).repeat(3, 2)  # (3, 32)
    packed = pack_nibbles(codes)
    assert packed.shape == (3, 16) and packed[0, 0] == 0 | (1 << 4)
    assert torch.equal(unpack_nibbles(packed), codes)


def test_zero_groups_come_back_as_zeros():
    for fmt, group_size in (("fp8", 128), ("int8", 32), ("int4", 32)):
        layer = LAYERS[fmt](64, 16, False, group_size)
        layer.quantize_(torch.zeros(16, 64))
        assert torch.equal(layer.dequantize(), torch.zeros(16, 64)), fmt


@pytest.mark.parametrize(("fmt", "group_size"), [("int8", None), ("int4", 32), ("int4", 128)])
def test_cpu_kernels_match_the_reference_path(fmt, group_size):
    _, layer = quantized(fmt, group_size, bias=True)
    x = torch.randn(5, 256)
    # The kernels take bf16 activations: the reference with the same rounding agrees to fp32 sums.
    expected = layer.reference(x.bfloat16().float())
    assert torch.allclose(layer.matmul(x), expected, rtol=1e-2, atol=1e-3 * expected.abs().max())
    assert torch.allclose(layer(x), expected + layer.bias, rtol=1e-2, atol=1e-3 * expected.abs().max())


def test_cpu_kernels_are_taken_where_they_fit(monkeypatch):
    calls = []
    for op in ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu"):
        kernel = getattr(torch.ops.aten, op)
        monkeypatch.setattr(torch.ops.aten, op, lambda *a, kernel=kernel, op=op: calls.append(op) or kernel(*a))
    x = torch.randn(2, 256)
    for fmt, group_size, out_features in [("int8", None, 64), ("int4", 32, 64), ("int8", 64, 64), ("int4", 32, 24)]:
        _, layer = quantized(fmt, group_size, out_features)
        layer(x)
    # int8 in groups (not whole rows) and int4 with 24 outputs (not a multiple of 16) take the reference path.
    assert calls == ["_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu"]


def test_fp8_quantises_the_activations_per_group_of_128():
    linear, layer = quantized("fp8", 128, in_features=320)  # an edge group of 64 inputs
    x = torch.randn(3, 320) * torch.logspace(-2, 2, 320)
    q, scale = quantize_fp8_groups(x)
    expected = F.linear(dequantize_fp8_groups(q, scale, dtype=torch.float32), layer.dequantize())
    assert torch.equal(layer(x), expected)
    assert not torch.equal(layer(x), F.linear(x, layer.dequantize()))  # the activations lost precision


def test_fp8_codes_survive_a_dtype_cast():
    _, layer = quantized("fp8", 128)
    before = layer.weight.clone()
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == FP8 and torch.equal(layer.weight.view(torch.uint8), before.view(torch.uint8))
    assert layer(torch.randn(2, 256, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_int4_kernel_layout_is_rebuilt_when_loading():
    _, source = quantized("int4", 32)
    layer = Int4Linear(256, 64, False, 32)
    assert layer.packed is None  # an empty layer has no codes to lay out yet
    layer.load_state_dict(source.state_dict())
    assert layer.packed is not None
    x = torch.randn(2, 256)
    assert torch.equal(layer(x), source(x))
    assert set(source.state_dict()) == {"weight", "weight_scale", "weight_zero"}  # the kernel layout is not saved

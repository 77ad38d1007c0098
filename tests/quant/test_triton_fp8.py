"""The Triton FP8 kernels against the PyTorch path of mistura.convert.fp8.

The kernel tests run where the kernels can: compiled, on a GPU with FP8 support (compute
capability 8.9+), or under Triton's interpreter on the CPU. Triton reads TRITON_INTERPRET
once, when it is first imported, and a process that imported it compiled cannot interpret;
so on a machine without such a GPU, `test_kernels_under_the_interpreter` runs this file again
in a fresh process with TRITON_INTERPRET=1, and the rest of the suite never sees the variable.
Without triton, only the test of the missing-triton error runs.

The references are computed on the CPU, whose PyTorch divides as IEEE says; on CUDA, PyTorch
divides by a Python scalar through its reciprocal, so `quantize_fp8_groups` there can put a
scale one ulp away from the CPU's and the kernels'.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mistura.convert.fp8 import dequantize_fp8_blocks, dequantize_fp8_groups, quantize_fp8_blocks, quantize_fp8_groups
from mistura.errors import ConfigError
from mistura.quant import triton_fp8

HAS_TRITON = triton_fp8.triton is not None
RUNS_KERNELS = triton_fp8.INTERPRETED or triton_fp8.available()
DEVICE = "cpu" if triton_fp8.INTERPRETED else "cuda"
needs_kernels = pytest.mark.skipif(
    not RUNS_KERNELS,
    reason="needs triton and a CUDA GPU with FP8, or TRITON_INTERPRET=1 (test_kernels_under_the_interpreter sets it)",
)


@pytest.mark.skipif(
    not HAS_TRITON or RUNS_KERNELS, reason="for triton without an FP8 GPU: runs the kernel tests under the interpreter"
)
def test_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    others = "not test_kernels_under_the_interpreter and not test_compiled_kernels_refuse_cpu_tensors"
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-k", others, __file__]
    run = subprocess.run(command, env=env, cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


def activations(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random activations (..., K) whose 128-wide groups span six orders of magnitude. The first
    group of the first row is all zero; the last group of the last row holds values about 1e-5
    times its largest, which land among e4m3's subnormals once scaled."""
    torch.manual_seed(0)
    K = shape[-1]
    groups = -(-K // 128)
    x = torch.randn(shape) * torch.logspace(-3, 3, steps=groups).repeat_interleave(128)[:K]
    rows = x.view(-1, K)
    rows[0, :128] = 0.0
    last = (groups - 1) * 128
    rows[-1, last:] = torch.randn(K - last) * 1e-5
    rows[-1, last] = 1.0
    return x.to(DEVICE, dtype)


def weights(shape: tuple[int, ...], block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return quantize_fp8_blocks(torch.randn(shape, device=DEVICE) * 0.02, (block_size, block_size))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def assert_close_to_fp32(y: torch.Tensor, expected: torch.Tensor) -> None:
    """y, a product of FP8 operands (fp32 or rounded to bf16), against the same product on the CPU in fp32:
    within 1e-4 of the largest output (the sums run in another order), and bf16's rounding, 2^-9 of itself."""
    assert y.shape == expected.shape
    rtol = 2**-8 if y.dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(y.cpu().float(), expected, rtol=rtol, atol=1e-4 * expected.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 320), (5, 128), (64,)])
def test_act_quant_matches_pytorch_bit_for_bit(shape, dtype):
    x = activations(shape, dtype)
    q, scale = triton_fp8.act_quant(x)
    expected_q, expected_scale = quantize_fp8_groups(x.cpu())
    assert same_bits(q.cpu(), expected_q)
    assert same_bits(scale.cpu(), expected_scale)


@needs_kernels
def test_act_quant_scales_an_all_zero_group_by_one():
    q, scale = triton_fp8.act_quant(torch.zeros(3, 256, device=DEVICE))
    assert torch.equal(scale, torch.ones(3, 2, device=DEVICE))
    assert not q.float().any()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(200, 320), (3, 130, 64)])
def test_weight_dequant_matches_pytorch_bit_for_bit(shape, dtype):
    q, scale_inv = weights(shape)
    y = triton_fp8.weight_dequant(q, scale_inv, dtype=dtype)
    assert same_bits(y.cpu(), dequantize_fp8_blocks(q.cpu(), scale_inv.cpu(), dtype=dtype))


@needs_kernels
@pytest.mark.parametrize("a_shape, n", [((2, 3, 320), 200), ((33, 64), 384)])
def test_fp8_gemm_matches_the_dequantised_matmul(a_shape, n):
    a, a_scale = quantize_fp8_groups(activations(a_shape))
    b, b_scale_inv = weights((n, a_shape[-1]))
    a32 = dequantize_fp8_groups(a.cpu(), a_scale.cpu(), dtype=torch.float32)  # (..., K)
    b32 = dequantize_fp8_blocks(b.cpu(), b_scale_inv.cpu(), dtype=torch.float32)  # (N, K)
    expected = a32 @ b32.T  # (..., N)
    assert_close_to_fp32(triton_fp8.fp8_gemm(a, a_scale, b, b_scale_inv, dtype=torch.float32), expected)
    y = triton_fp8.fp8_gemm(a, a_scale, b, b_scale_inv)
    assert y.dtype == torch.bfloat16
    assert_close_to_fp32(y, expected)


@needs_kernels
@pytest.mark.parametrize("block_size", [32, 128])
def test_fp8_linear_quantises_activations_on_the_fly(block_size):
    x = activations((4, 256), torch.bfloat16)
    weight, scale_inv = weights((96, 256), block_size)
    y = triton_fp8.fp8_linear(x, weight, scale_inv, block_size)
    expected = F.linear(
        dequantize_fp8_groups(*quantize_fp8_groups(x.cpu(), block_size), block_size, torch.float32),
        dequantize_fp8_blocks(weight.cpu(), scale_inv.cpu(), (block_size, block_size), torch.float32),
    )
    assert y.dtype == torch.bfloat16
    assert_close_to_fp32(y, expected)


@needs_kernels
def test_empty_inputs_give_empty_outputs():
    q, scale = triton_fp8.act_quant(torch.zeros(0, 256, device=DEVICE))
    assert q.shape == (0, 256) and scale.shape == (0, 2)
    assert triton_fp8.fp8_gemm(q, scale, *weights((64, 256))).shape == (0, 64)


def quantised(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_fp8_groups(torch.randn(shape, device=DEVICE))


# name -> (a bad call, what its error message says)
BAD_CALLS = {
    "int activations": (lambda: triton_fp8.act_quant(torch.ones(4, 128, dtype=torch.int32, device=DEVICE)), "floating"),
    "block of 100": (lambda: triton_fp8.act_quant(torch.randn(4, 128, device=DEVICE), block_size=100), "power of two"),
    "block of 16": (lambda: triton_fp8.act_quant(torch.randn(4, 128, device=DEVICE), block_size=16), "at least 32"),
    "bf16 weight": (
        lambda: triton_fp8.weight_dequant(torch.randn(64, 256, device=DEVICE), weights((64, 256))[1]),
        "e4m3",
    ),
    "scale shape": (
        lambda: triton_fp8.weight_dequant(weights((64, 256))[0], torch.ones(1, 1, device=DEVICE)),
        "(1, 2)",
    ),
    "int output": (lambda: triton_fp8.weight_dequant(*weights((64, 256)), dtype=torch.int8), "bfloat16, float16"),
    "K differs": (lambda: triton_fp8.fp8_gemm(*quantised((4, 128)), *weights((64, 256))), "same K"),
    "activation scales": (
        lambda: triton_fp8.fp8_gemm(quantised((4, 256))[0], torch.ones(4, 3, device=DEVICE), *weights((64, 256))),
        "activation scales must be float32 of shape (4, 2)",
    ),
}


@needs_kernels
@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_inputs_raise_config_error(case):
    call, message = BAD_CALLS[case]
    with pytest.raises(ConfigError, match=re.escape(message)):
        call()


@pytest.mark.skipif(not HAS_TRITON or triton_fp8.INTERPRETED, reason="needs triton compiling, not interpreting")
def test_compiled_kernels_refuse_cpu_tensors():
    with pytest.raises(ConfigError, match="CUDA tensors"):
        triton_fp8.act_quant(torch.randn(2, 128))


def test_without_triton_the_kernels_are_unavailable(monkeypatch):
    monkeypatch.setattr(triton_fp8, "triton", None)
    assert not triton_fp8.available()
    with pytest.raises(ConfigError, match="pip install triton"):
        triton_fp8.act_quant(torch.randn(2, 128))

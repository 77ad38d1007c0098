"""The Triton FP8 kernels against the PyTorch path and a bf16 matmul, on one CUDA GPU.

For each weight shape N x K (out x in features) and each number of tokens M, in one run:
- act_quant: quantising the activations x (M, K) bf16 per 1 x 128 group, Triton against
  `mistura.convert.fp8.quantize_fp8_groups`;
- weight_dequant: the (N, K) FP8 weight to bf16, Triton against `dequantize_fp8_blocks`;
- a linear layer y = x W^T four ways: `fp8_linear` (act_quant + fp8_gemm), `fp8_gemm` alone on
  activations already quantised, the PyTorch path (dequantise W to bf16, then a bf16 matmul:
  what a quantised layer does without Triton), and a bf16 matmul on bf16 weights (the layer
  before quantisation).
Times are medians of `triton.testing.do_bench` (which empties the L2 cache before each call),
after the GEMM's autotuning. Ratios > 1 mean the Triton kernel is faster. Before timing, each
shape checks fp8_linear against the dequantised matmul in fp32.

A first table gives the host time of one call (tiny shapes, the GPU idle): where a layer's GPU
time is shorter, as for a few tokens, the Python launches set the pace unless the caller
replays the step as a CUDA graph.

    python benchmarks/fp8_kernels.py
    python benchmarks/fp8_kernels.py --tokens 1 64 4096 --shapes 7168x2048 2048x7168

Without triton and a CUDA GPU with FP8 support (compute capability 8.9+), it says so and exits 0.
"""

import argparse
import time

import torch
import torch.nn.functional as F

from mistura.convert.fp8 import (
    dequantize_fp8_blocks,
    dequantize_fp8_groups,
    quantize_fp8_blocks,
    quantize_fp8_groups,
)
from mistura.quant import triton_fp8


def median_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def host_us(fn, calls: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def host_costs() -> None:
    w16 = torch.randn(256, 256, device="cuda").bfloat16()
    w, w_s = quantize_fp8_blocks(w16)
    x = torch.randn(1, 256, device="cuda").bfloat16()
    q, s = triton_fp8.act_quant(x)
    calls = {
        "act_quant": lambda: triton_fp8.act_quant(x),
        "weight_dequant": lambda: triton_fp8.weight_dequant(w, w_s),
        "fp8_gemm": lambda: triton_fp8.fp8_gemm(q, s, w, w_s),
        "fp8_linear": lambda: triton_fp8.fp8_linear(x, w, w_s),
        "F.linear (bf16)": lambda: F.linear(x, w16),
    }
    print("| call | host us per call |\n|---|---|")
    for name, fn in calls.items():
        print(f"| {name} | {host_us(fn):.1f} |")
    print()


def shape(text: str) -> tuple[int, int]:
    n, _, k = text.partition("x")
    return int(n), int(k)


def bench_shape(n: int, k: int, tokens: list[int]) -> None:
    torch.manual_seed(0)
    w16 = (torch.randn(n, k, device="cuda") * 0.02).bfloat16()  # (N, K)
    w, w_s = quantize_fp8_blocks(w16)
    dequant = median_ms(lambda: dequantize_fp8_blocks(w, w_s)) / median_ms(lambda: triton_fp8.weight_dequant(w, w_s))
    for m in tokens:
        print(bench_tokens(torch.randn(m, k, device="cuda").bfloat16(), w16, w, w_s, dequant), flush=True)


def bench_tokens(x: torch.Tensor, w16: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor, dequant: float) -> str:
    """One table row: x (M, K) through the layer of weight w16 (N, K), quantised to w, w_s."""
    (m, k), n = x.shape, w.shape[0]
    q, s = triton_fp8.act_quant(x)
    y = triton_fp8.fp8_linear(x, w, w_s)  # (M, N); the first call for (N, K) autotunes the GEMM
    x32 = dequantize_fp8_groups(q, s, dtype=torch.float32)  # (M, K)
    expected = F.linear(x32, dequantize_fp8_blocks(w, w_s, dtype=torch.float32))  # (M, N)
    error = ((y.float() - expected).abs().max() / expected.abs().max()).item()
    t = {
        "act triton": median_ms(lambda: triton_fp8.act_quant(x)),
        "act torch": median_ms(lambda: quantize_fp8_groups(x)),
        "fp8_linear": median_ms(lambda: triton_fp8.fp8_linear(x, w, w_s)),
        "fp8_gemm": median_ms(lambda: triton_fp8.fp8_gemm(q, s, w, w_s)),
        "torch path": median_ms(lambda: F.linear(x, dequantize_fp8_blocks(w, w_s))),
        "bf16": median_ms(lambda: F.linear(x, w16)),
    }
    tflops = 2 * m * n * k / t["fp8_gemm"] / 1e9
    return (
        f"| {n}x{k} | {m} | {t['act torch'] / t['act triton']:.1f}x | {dequant:.1f}x "
        f"| {t['fp8_linear'] * 1e3:.1f} | {t['fp8_gemm'] * 1e3:.1f} ({tflops:.0f} TFLOP/s) "
        f"| {t['torch path'] * 1e3:.1f} | {t['bf16'] * 1e3:.1f} "
        f"| {t['torch path'] / t['fp8_linear']:.2f}x | {t['bf16'] / t['fp8_linear']:.2f}x "
        f"| {t['bf16'] / t['fp8_gemm']:.2f}x | {error:.1e} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 1024, 4096], help="values of M")
    parser.add_argument(
        "--shapes",
        type=shape,
        nargs="+",
        default=[(4096, 4096), (14336, 4096), (4096, 14336)],
        help="weights as NxK (default: Llama-3-8B's attention output, MLP up and MLP down)",
    )
    args = parser.parse_args()
    if not triton_fp8.available():
        print("benchmarks/fp8_kernels.py needs triton and a CUDA GPU with FP8 support (compute capability 8.9+)")
        return
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton_fp8.triton.__version__}\n")
    host_costs()
    print(
        "| N x K | M | act_quant vs torch | weight_dequant vs torch | fp8_linear us | fp8_gemm us "
        "| torch path us | bf16 us | fp8_linear vs torch path | fp8_linear vs bf16 | fp8_gemm vs bf16 | max error |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n, k in args.shapes:
        bench_shape(n, k, args.tokens)


if __name__ == "__main__":
    main()

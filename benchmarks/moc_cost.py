"""Cost of a collaborative-experts (MoC) layer against a top-k MoE layer of the same experts.

Both layers take the expert settings of a preset (default moc-tiny: 4 experts of width 192,
top-2); the MoE layer is dropless. Each step is one forward and backward in fp32 of the
layer alone, on a fixed random input (B, T, D), with a fixed random output gradient plus
the layer's auxiliary loss. Timing interleaves the two: after a warm-up, each round times
a few steps of each in turn, so that slow drifts of the machine hit both alike. A figure
is the median step time over all timed steps.

The script also prints the multiply-adds per token that the docstring of
mistura.model.moe.moc counts: MoC runs all E experts and two attentions, MoE K experts.

    python benchmarks/moc_cost.py                          # (8, 256, 256) on moc-tiny's experts
    python benchmarks/moc_cost.py --batch 4 --seq 128      # another input shape
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

from mistura.config import ModelConfig
from mistura.model.moe import CollaborativeExperts, MoELayer


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ModelConfig.from_name(args.preset)
    layers = {"moc": CollaborativeExperts(config), "moe": MoELayer(config)}
    x = torch.randn(args.batch, args.seq, config.d_model)
    grad = torch.randn_like(x)
    times = time_interleaved(layers, x, grad, args)
    report(config, args, times)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="moc-tiny", help="a preset with a moe section")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per layer in each round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    return parser.parse_args()


def step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    layer.zero_grad(set_to_none=True)
    y, aux = layer(x)
    ((y * grad).sum() + aux.loss).backward()


def time_interleaved(layers: dict[str, nn.Module], x, grad, args) -> dict[str, list[float]]:
    for layer in layers.values():
        for _ in range(args.warmup):
            step(layer, x, grad)
    times: dict[str, list[float]] = {name: [] for name in layers}
    for _ in range(args.rounds):
        for name, layer in layers.items():
            for _ in range(args.steps):
                start = time.perf_counter()
                step(layer, x, grad)
                times[name].append(time.perf_counter() - start)
    return times


def report(config: ModelConfig, args: argparse.Namespace, times: dict[str, list[float]]) -> None:
    moe, D = config.moe, config.d_model
    E, K, F = moe.n_experts, moe.top_k, moe.d_expert
    flops = {"moc": 3 * E * D * F + 4 * (E + K) * D * D, "moe": 3 * K * D * F}  # multiply-adds per token
    median = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads")
    print(f"{args.preset}: E={E} experts of width F={F}, top-{K}, D={D}; input ({args.batch}, {args.seq}, {D})")
    for name, ts in times.items():
        print(
            f"{name}: median {median[name] * 1e3:7.1f} ms  (min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f})"
            f"  {flops[name] / 1e6:.2f}M multiply-adds per token"
        )
    print(f"moc / moe time: {median['moc'] / median['moe']:.2f}x  (multiply-adds: {flops['moc'] / flops['moe']:.2f}x)")


if __name__ == "__main__":
    main()

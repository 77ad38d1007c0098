"""Training throughput of mistura's Transformer against Hugging Face's LlamaForCausalLM.

Both models have the same shape and the same weights: the Hugging Face model is built from
a config and copied into mistura through the production importer (mistura.convert.hf).
They see the same batch and run the same step: forward, cross-entropy on all positions,
backward, and optionally an AdamW step, in fp32. Their losses must agree before timing.

Timing interleaves the two. After a warm-up, each round times a few steps of mistura,
then a few of Hugging Face, so that slow drifts of the machine (frequency, other
processes) hit both alike. A model's figure is the median step time over all its timed
steps. The output ends with a Markdown table row ready to paste.

    python benchmarks/train_throughput.py                        # a small Llama
    python benchmarks/train_throughput.py --layers 8 --adamw     # deeper, with optimiser step
    python benchmarks/train_throughput.py --compile              # torch.compile both models
    python benchmarks/train_throughput.py --profile              # plus the ops that cost most
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import transformers

from mistura.convert.hf import config_from_hf, state_dict_from_hf
from mistura.model import Transformer

Forward = Callable[[torch.Tensor], torch.Tensor]  # ids (B, T) -> logits (B, T, V)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    hf_model, model = build_models(args)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    inputs, targets = ids[:, :-1], ids[:, 1:]  # (B, T) each: predict the next token
    runners = {
        "mistura": Runner(model, model, args),
        "hf": Runner(hf_model, lambda x: hf_model(input_ids=x, use_cache=False).logits, args),
    }
    check_same_loss(runners, inputs, targets)
    times = time_interleaved(runners, inputs, targets, args)
    report(args, times)
    if args.profile:
        for name, runner in runners.items():
            profile(name, runner, inputs, targets)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shape = parser.add_argument_group("model shape and batch")
    shape.add_argument("--d-model", type=int, default=256)
    shape.add_argument("--layers", type=int, default=4)
    shape.add_argument("--heads", type=int, default=8)
    shape.add_argument("--kv-heads", type=int, default=4)
    shape.add_argument("--d-ff", type=int, default=704)
    shape.add_argument("--vocab", type=int, default=8192)
    shape.add_argument("--seq", type=int, default=256)
    shape.add_argument("--batch", type=int, default=8)
    shape.add_argument("--tie", action="store_true", help="tie the head to the embedding")
    timing = parser.add_argument_group("timing")
    timing.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    timing.add_argument("--rounds", type=int, default=5)
    timing.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    timing.add_argument("--adamw", action="store_true", help="add an AdamW step to each step")
    timing.add_argument("--compile", action="store_true", help="torch.compile both models")
    timing.add_argument("--profile", action="store_true", help="print each model's costliest ops")
    timing.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    timing.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def build_models(args: argparse.Namespace) -> tuple[torch.nn.Module, Transformer]:
    """A Hugging Face Llama from a config, and a mistura copy of it made by the importer."""
    hf_config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.d_model,
        intermediate_size=args.d_ff,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq,
        tie_word_embeddings=args.tie,
        attn_implementation="sdpa",
    )
    hf_model = transformers.LlamaForCausalLM(hf_config).train()
    config = config_from_hf(hf_config.to_dict())
    model = Transformer(config).train()
    model.load_state_dict(state_dict_from_hf("llama", hf_model.state_dict(), config), strict=True)
    return hf_model, model


class Runner:
    """One model's training step: forward, loss, backward, optional AdamW step."""

    def __init__(self, module: torch.nn.Module, forward: Forward, args: argparse.Namespace):
        self.module = module
        self.forward = torch.compile(forward) if args.compile else forward
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4) if args.adamw else None

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.forward(inputs)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Seconds taken by one training step."""
        start = time.perf_counter()
        self.loss(inputs, targets).backward()
        if self.optimizer is not None:
            self.optimizer.step()
        self.module.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def check_same_loss(runners: dict[str, Runner], inputs: torch.Tensor, targets: torch.Tensor) -> None:
    """Same weights and batch must give the same loss, or the comparison is meaningless."""
    with torch.no_grad():
        losses = {name: runner.loss(inputs, targets).item() for name, runner in runners.items()}
    if abs(losses["mistura"] - losses["hf"]) > 1e-4:
        raise SystemExit(f"the models disagree before timing: losses {losses}")
    print(f"loss before timing: mistura {losses['mistura']:.6f}, hf {losses['hf']:.6f}")


def time_interleaved(
    runners: dict[str, Runner], inputs: torch.Tensor, targets: torch.Tensor, args: argparse.Namespace
) -> dict[str, list[float]]:
    """Seconds of each timed step of each model, in alternating rounds after a warm-up."""
    for runner in runners.values():
        for _ in range(args.warmup):
            runner.step(inputs, targets)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            times[name] += [runner.step(inputs, targets) for _ in range(args.steps)]
    return times


def report(args: argparse.Namespace, times: dict[str, list[float]]) -> None:
    """Median throughput of each model, the spread of its step times, and a Markdown row."""
    tokens = args.batch * args.seq
    rate = {name: tokens / statistics.median(steps) for name, steps in times.items()}
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    for name, steps in times.items():
        low, median, high = (1e3 * t for t in (min(steps), statistics.median(steps), max(steps)))
        print(f"{name:8s} {median:8.1f} ms/step (min {low:.1f}, max {high:.1f}) {rate[name]:10.0f} tokens/s")
    print(f"mistura/hf throughput ratio: {rate['mistura'] / rate['hf']:.3f}")
    print(f"peak RSS of the process (both models): {peak_mib:.0f} MiB")
    step = "fwd+bwd" + ("+AdamW" if args.adamw else "") + (", compiled" if args.compile else "")
    shape = (
        f"d{args.d_model} L{args.layers} H{args.heads}/{args.kv_heads} ff{args.d_ff} "
        f"V{args.vocab}{' tied' if args.tie else ''}"
    )
    device = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print()
    print("| shape | batch x seq | step | device | mistura tok/s | HF tok/s | mistura/HF | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {shape} | {args.batch} x {args.seq} | {step} | {device} | {rate['mistura']:.0f} "
        f"| {rate['hf']:.0f} | {rate['mistura'] / rate['hf']:.3f} | {peak_mib:.0f} MiB |"
    )


def profile(name: str, runner: Runner, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    """The ops of one training step that take the most CPU time, themselves (not children)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        runner.step(inputs, targets)
    print(f"\n== {name}: one training step, ops by self CPU time ==")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()

"""Quantised checkpoints against fp32: size on disk, validation perplexity and greedy decoding speed.

Quality, on a trained model: the quickstart run (runs/quickstart; trained first, with
--train-steps steps of configs/quickstart.yaml, if it is missing) is quantised to each
format with `mistura quantize`'s library call and loaded back with `mistura.load`. The
figures are the size of model.safetensors and the perplexity over the same --eval-batches
random windows of the validation tokens (data/machado-4k/val.bin).

Speed, where decoding is bound by reading the weights: a Llama of ~144M parameters
(width 1024, 12 layers, GQA 16/4 heads, SwiGLU 2816, vocabulary 8192) with random weights,
quantised in memory. Each round decodes the same 16-token prompt greedily to --new-tokens
tokens (batch 1, no EOS) with every format, interleaved; the figure is the median over
rounds of new tokens per second (prefill included), and its ratio to fp32 in the same run;
the weight bytes are what a checkpoint of each would store.
fp8 runs its PyTorch reference path on the CPU, which expands every weight at every step:
it is timed on --fp8-tokens tokens only.

    python benchmarks/quantize.py
    python benchmarks/quantize.py --threads 1 --rounds 5 --new-tokens 64
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import mistura
from mistura.checkpoint import weights_of
from mistura.cli import main as mistura_cli
from mistura.config import ModelConfig
from mistura.data.bins import BatchLoader, open_tokens
from mistura.data.prepare import load_meta
from mistura.infer.engine import generate
from mistura.infer.sampling import Sampling
from mistura.model import Transformer
from mistura.quant import QuantConfig, quantize_checkpoint, quantize_model, weights_bytes

LLAMA_144M = dict(vocab_size=8192, d_model=1024, n_layer=12, n_head=16, n_kv_head=4, d_ff=2816, max_seq_len=512)
FORMATS = ("fp8", "int8", "int4")


def trained_checkpoint(run: Path, steps: int) -> Path:
    if not run.exists():
        print(f"{run} is missing: training configs/quickstart.yaml for {steps} steps")
        argv = ["train", "configs/quickstart.yaml", "--no-progress", "--set", f"train.max_steps={steps}"]
        if mistura_cli([*argv, "--set", f"train.out_dir={run}"]) != 0:
            raise SystemExit("training failed")
    return run


@torch.no_grad()
def perplexity(model: Transformer, data: Path, batches: int) -> float:
    tokens = open_tokens(data / "val.bin", load_meta(data)["dtype"])
    loader = BatchLoader(tokens, batch_size=16, block_size=model.config.max_seq_len, seed=0)
    losses = []
    for _ in range(batches):
        x, y = loader.next_batch()
        losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
    return math.exp(sum(losses) / len(losses))


def quality(run: Path, data: Path, recipes: dict[str, QuantConfig], batches: int) -> None:
    model = mistura.load(run)
    full, base = weights_bytes(run), perplexity(model, data, batches)
    window = model.config.max_seq_len
    print(f"\nquality: {run} ({model.config.name}), perplexity over {batches} x 16 x {window} validation tokens")
    print(f"{'format':<22} | {'model.safetensors':>17} | {'vs fp32':>7} | {'perplexity':>10} | change")
    print(f"{'fp32':<22} | {full:>17,} | {1:>6.2f}x | {base:>10.2f} |")
    with tempfile.TemporaryDirectory() as folder:
        for name, quant in recipes.items():
            out = quantize_checkpoint(run, Path(folder) / name, quant)
            size, ppl = weights_bytes(out), perplexity(mistura.load(out), data, batches)
            label = f"{name} (group {quant.group_size or 'row'})"
            print(f"{label:<22} | {size:>17,} | {full / size:>6.2f}x | {ppl:>10.2f} | {100 * (ppl / base - 1):+.2f} %")


def speed(rounds: int, new_tokens: int, fp8_tokens: int) -> None:
    torch.manual_seed(0)
    fp32 = Transformer(ModelConfig.from_name("llama-tiny", **LLAMA_144M)).eval()
    models = {"fp32": fp32} | {f: quantize_model(copy.deepcopy(fp32), QuantConfig(f)) for f in FORMATS}
    tokens = {name: fp8_tokens if name == "fp8" else new_tokens for name in models}
    prompt = torch.randint(3, LLAMA_144M["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(1))
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            generate(model, prompt, Sampling(max_new_tokens=tokens[name], temperature=0))
            times[name].append(time.perf_counter() - start)
    params = sum(p.numel() for p in fp32.parameters())
    print(f"\nspeed: Llama {params / 1e6:.0f}M, random weights, batch 1, median of {rounds} rounds")
    print(f"{'format':<6} | {'weight bytes':>13} | {'new tokens':>10} | {'tokens/s':>8} | vs fp32")
    rate = {name: tokens[name] / statistics.median(t) for name, t in times.items()}
    for name, model in models.items():
        size = sum(t.nbytes for t in weights_of(model).values())
        print(f"{name:<6} | {size:>13,} | {tokens[name]:>10} | {rate[name]:>8.1f} | {rate[name] / rate['fp32']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/quickstart", help="trained run or checkpoint for the quality table")
    parser.add_argument("--data", default="data/machado-4k", help="its prepared data folder (val.bin)")
    parser.add_argument("--train-steps", type=int, default=300, help="steps to train the run if it is missing")
    parser.add_argument("--int4-group-size", type=int, default=64, help="llama-tiny's MLP width 704 takes 64, not 128")
    parser.add_argument("--eval-batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--fp8-tokens", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, load average {os.getloadavg()[0]:.1f} at the start")
    recipes = {
        "fp8": QuantConfig("fp8"),
        "int8": QuantConfig("int8"),
        "int4": QuantConfig("int4", args.int4_group_size),
    }
    quality(trained_checkpoint(Path(args.run), args.train_steps), Path(args.data), recipes, args.eval_batches)
    speed(args.rounds, args.new_tokens, args.fp8_tokens)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()

"""LoRA training steps against full fine-tuning of the same model, and against PEFT's LoRA on its Hugging Face export.

One model shape, three ways to train it, each in its own process so that each peak memory is its own:

- `full`: mistura, every parameter trained (AdamW);
- `lora`: mistura with LoRA (`mistura.lora.apply_lora`, rank --rank on --targets), base frozen;
- `peft`: the same base exported by `mistura convert to-hf` and loaded by `AutoModelForCausalLM`,
  with PEFT's LoRA of the same rank on the same layers (`mistura lora export-peft` names them).

A step is forward, cross-entropy on every position, backward and an AdamW step, in fp32, on
the same random batch. Before timing, the LoRA and PEFT losses must agree (same weights,
same adapters). Each worker times --steps steps after --warmup and reports the median step
time, the peak RSS of its process and what the step added to the memory of the built model
(peak RSS minus RSS before the first step: activations, gradients, optimizer state). The
three workers run --rounds times, interleaved, and each one's fastest round counts, so
that other processes on the CPU slow all three alike.
The last lines are ratios: LoRA against full fine-tuning, and mistura's LoRA against PEFT's.

    python benchmarks/lora.py                               # Llama ~24M, batch 8 x 256, r=8 on all-linear
    python benchmarks/lora.py --moe                         # with 8 routed experts per layer (top-2): experts too
    python benchmarks/lora.py --threads 2 --steps 8 --rank 16
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import mistura
from mistura.checkpoint import save_model
from mistura.config import ModelConfig
from mistura.convert.hf import to_hf
from mistura.lora import LoRAConfig, apply_lora, export_peft, save_adapter, trainable_share
from mistura.model import Transformer

LLAMA = dict(vocab_size=8192, d_model=512, n_layer=6, n_head=8, n_kv_head=4, d_ff=1408, max_seq_len=256)
MOE = dict(layer_mlp=["moe"] * 6, moe=dict(n_experts=8, top_k=2, d_expert=512, norm_topk=True))  # Mixtral-like
WORKERS = ("full", "lora", "peft")


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    with tempfile.TemporaryDirectory() as folder:
        prepare(args, Path(folder))
        rounds = [{name: run_worker(name, folder) for name in WORKERS} for _ in range(args.rounds)]
    results = {name: min((r[name] for r in rounds), key=lambda result: result["step_s"]) for name in WORKERS}
    report(args, results)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moe", action="store_true", help="routed experts in every layer (adapted too, with --targets all)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", nargs="+", help="LoRA targets (default: all-linear, or all with --moe)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="timed steps per worker")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=2, help="interleaved runs of the workers; the fastest counts")
    p.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.targets = tuple(args.targets or (["all"] if args.moe else ["all-linear"]))
    return args


def prepare(args: argparse.Namespace, folder: Path) -> None:
    """The base checkpoint, its Hugging Face export, a LoRA adapter with random B and its PEFT export."""
    torch.manual_seed(0)
    config = ModelConfig.from_dict({**LLAMA, **(MOE if args.moe else {}), "name": "bench"})
    base = save_model(folder / "base", Transformer(config))
    to_hf(base, folder / "hf")
    model = apply_lora(mistura.load(base), lora_config(args))
    with torch.no_grad():  # a non-zero update, so that both sides compute it
        for name, param in model.named_parameters():
            if ".lora_B" in name:
                param.normal_(0, 0.01)
    export_peft(save_adapter(model, folder / "adapter", base=base), folder / "peft")
    (folder / "args.json").write_text(json.dumps(vars(args)))


def lora_config(args) -> LoRAConfig:
    return LoRAConfig(rank=args.rank, alpha=2 * args.rank, targets=tuple(args.targets))


def run_worker(name: str, folder: str) -> dict:
    argv = [sys.executable, __file__, "--worker", name, "--folder", folder]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker {name} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def worker(args: argparse.Namespace) -> dict:
    folder, name = Path(args.folder), args.worker
    args = argparse.Namespace(**json.loads((folder / "args.json").read_text()))  # the shape and timing flags
    torch.set_num_threads(args.threads)
    model, forward = build(name, folder)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, LLAMA["vocab_size"], (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1))
    loss = step(forward, optimizer, ids)  # the first step's loss, before any update: the same on every side
    before = rss_mib()
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        step(forward, optimizer, ids)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    trainable = sum(p.numel() for p in params)
    total = trainable_share(model).total if name != "peft" else sum(p.numel() for p in model.parameters())
    return dict(
        step_s=statistics.median(times),
        loss=loss,
        peak_mib=peak_rss_mib(),
        step_mib=peak_rss_mib() - before,
        trainable=trainable,
        total=total,
    )


def build(name: str, folder: Path):
    """The model to train and its forward, ids (B, T) -> logits (B, T, V)."""
    if name == "peft":
        import peft
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(folder / "hf", dtype=torch.float32)
        with warnings.catch_warnings():  # PEFT warns of rank_pattern keys for parameters, which it applies
            warnings.simplefilter("ignore")
            model = peft.PeftModel.from_pretrained(hf, folder / "peft", is_trainable=True)
        return model.train(), lambda ids: model(ids).logits
    model = mistura.load(folder / "adapter" if name == "lora" else folder / "base")  # an adapter's base is frozen
    return model.train(), model


def step(forward, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    logits = forward(ids[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(args: argparse.Namespace, results: dict[str, dict]) -> None:
    shape = "Mixtral-like, 8 experts top-2" if args.moe else "Llama"
    print(f"{shape} {LLAMA['n_layer']} x {LLAMA['d_model']}, batch {args.batch} x {args.seq}, fp32, AdamW, "
          f"{args.threads} threads; LoRA r={args.rank} on {', '.join(args.targets)}")  # fmt: skip
    print(f"{'':<6} | {'step':>8} | {'tokens/s':>8} | {'peak RSS':>9} | {'step adds':>9} | {'trainable':>20} | loss")
    tokens = args.batch * args.seq
    for name, r in results.items():
        share = f"{r['trainable']:,} ({r['trainable'] / r['total']:.2%})"
        print(f"{name:<6} | {r['step_s']:>7.3f}s | {tokens / r['step_s']:>8,.0f} | {r['peak_mib']:>6,.0f} MiB | "
              f"{r['step_mib']:>6,.0f} MiB | {share:>20} | {r['loss']:.5f}")  # fmt: skip
    full, lora, peft = results["full"], results["lora"], results["peft"]
    if abs(lora["loss"] - peft["loss"]) > 1e-3:
        print(f"warning: LoRA and PEFT losses differ ({lora['loss']:.6f} vs {peft['loss']:.6f})")
    print(ratios("LoRA vs full fine-tuning", lora, full))
    print(ratios("mistura LoRA vs PEFT LoRA", lora, peft))


def ratios(label: str, ours: dict, theirs: dict) -> str:
    keys = {"step time": "step_s", "peak RSS": "peak_mib", "step memory": "step_mib"}
    return f"{label}: " + ", ".join(f"{name} {ours[key] / theirs[key]:.2f}x" for name, key in keys.items())


if __name__ == "__main__":
    main()

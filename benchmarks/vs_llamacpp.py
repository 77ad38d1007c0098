"""Greedy decode speed of mistura against llama.cpp on the same weights, in one run (issue 19).

For each model size the script

1. writes the checkpoint as GGUF files (f32, q8_0, q4_0) with `mistura.convert.gguf.to_gguf`,
   and loads it into mistura three times: fp32, int8 and int4 (`mistura.quant`);
2. decodes greedily, at batch 1 and batch 8, --new-tokens tokens after a prompt of
   --prompt-len random token ids per row, with every contender in turn for --rounds rounds:
   mistura through its engine (`mistura.infer.engine.generate`), llama.cpp through
   llama-cpp-python's low-level API (one sequence per row, the argmax of each row's logits);
3. times the decode steps alone: from the first new token (after the prefill) to the last, so
   tokens/s = batch x (new tokens - 1) / seconds; a figure is the median round;
4. profiles mistura's decode step at batch 1 (torch.profiler) and sorts its time into
   matmuls, attention, norms, casts and copies, the other ops, and what runs outside any op.

Sizes: `4M`, the quickstart model (runs/quickstart, trained), and `100M`, a random-weights
Llama of 99.8M parameters (12 layers, width 768, 12 query and 4 key/value heads, MLP 2816) with
the quickstart's tokenizer. Both sides run on --threads threads (torch.set_num_threads,
llama.cpp's n_threads). Every llama.cpp model runs in its own subprocess, so that a crash
is reported in the table instead of ending the run. llama.cpp runs without its extra buffer
types (`use_extra_bufts=False`: no AMX or repacked copies of q8_0 / q4_0 weights): with them,
llama-cpp-python 0.3.36 segfaults on every q8_0 and q4_0 file on an AMX CPU (Sapphire Rapids).
torch.compile'd contenders compile (mode "default", dynamic=True) during an untimed warm-up round.

    python benchmarks/vs_llamacpp.py
    python benchmarks/vs_llamacpp.py --sizes 4M --new-tokens 32 --rounds 2
    python benchmarks/vs_llamacpp.py --compile fp32 int8 int4    # the table in BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

import mistura
from mistura.checkpoint import resolve, save_model
from mistura.config import ModelConfig
from mistura.convert.gguf import to_gguf
from mistura.infer.engine import compile_for_decoding, generate
from mistura.infer.sampling import Sampling
from mistura.model import Transformer
from mistura.quant.model import QuantConfig, quantize_model

QUICKSTART = "runs/quickstart"
FORMATS = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}  # mistura's format -> the GGUF type that matches it
BATCHES = (1, 8)
BIG = dict(n_layer=12, d_model=768, n_head=12, n_kv_head=4, head_dim=64, d_ff=2816, max_seq_len=256)
# torch.profiler op names -> the category they count in
CATEGORIES = {
    "matmul": ("mm", "addmm", "bmm", "_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu"),
    "attention": ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math"),
    "norm": ("_fused_rms_norm", "rms_norm", "rsqrt", "pow", "mean"),
    "casts and copies": ("copy_", "_to_copy", "to", "empty", "empty_strided", "contiguous", "clone"),
}


def random_llama(directory: Path) -> Path:
    """A random-weights Llama of ~100M parameters with the quickstart's tokenizer, saved in `directory`."""
    tokenizer = resolve(QUICKSTART) / "tokenizer.json"
    vocab = mistura.load_tokenizer(QUICKSTART).get_vocab_size()
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("llama-tiny", vocab_size=vocab, **BIG))
    return save_model(directory / "llama-100m", model, tokenizer)


def mistura_models(checkpoint: Path) -> dict[str, Transformer]:
    """The checkpoint in fp32 and quantised: int8 with a scale per row, int4 in groups of 32 as q4_0's blocks."""
    models = {"fp32": mistura.load(checkpoint)}
    models["int8"] = quantize_model(mistura.load(checkpoint), QuantConfig("int8"))
    models["int4"] = quantize_model(mistura.load(checkpoint), QuantConfig("int4", group_size=32))
    return {name: model.eval() for name, model in models.items()}


def mistura_decode(model: Transformer, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    """Seconds from the first new token to the last, and the new tokens, of a greedy engine run."""
    marks: list[float] = []
    out = generate(
        model,
        prompts,
        Sampling(max_new_tokens=new_tokens, temperature=0),
        on_token=lambda _: marks.append(time.perf_counter()),
    )
    return marks[-1] - marks[0], out


class LlamaCpp:
    """A llama.cpp model served by a subprocess of this script (--llama-worker), which may crash."""

    def __init__(self, path: Path, threads: int, context: int):
        command = [sys.executable, __file__, "--llama-worker", str(path), "--threads", str(threads)]
        command += ["--context", str(context)]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )

    def decode(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]] | None:
        """As mistura_decode; None once the subprocess has died."""
        if self.process.poll() is not None:
            return None
        try:
            self.process.stdin.write(json.dumps({"prompts": prompts, "new_tokens": new_tokens}) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            return None
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            return None
        reply = json.loads(line)
        return reply["seconds"], reply["tokens"]

    def status(self) -> str:
        code = self.process.poll()
        return "crashed (segfault)" if code == -11 else f"crashed (exit {code})"

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait()


def serve_llama(path: str, threads: int, context: int) -> None:
    """The worker: load the GGUF file, then answer one decode job per line of stdin with one line of JSON."""
    import llama_cpp as lc

    lc.llama_backend_init()
    model_params = lc.llama_model_default_params()
    model_params.use_extra_bufts = False  # see the module docstring
    model = lc.llama_model_load_from_file(path.encode(), model_params)
    params = lc.llama_context_default_params()
    params.n_seq_max = max(BATCHES)
    params.n_ctx = params.n_batch = params.n_ubatch = context * max(BATCHES)
    params.n_threads = params.n_threads_batch = threads
    ctx = lc.llama_init_from_model(model, params)
    vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    batch = lc.llama_batch_init(params.n_batch, 0, 1)
    for line in sys.stdin:
        job = json.loads(line)
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        print(json.dumps(llama_decode_rows(lc, ctx, batch, vocab, job["prompts"], job["new_tokens"])), flush=True)


def llama_decode_rows(lc, ctx, batch, vocab: int, prompts: list[list[int]], new_tokens: int) -> dict:
    """Greedy decoding of every prompt as its own sequence; seconds as in mistura_decode."""
    import numpy as np

    def step(rows: list[list[int]], start: int) -> list[int]:  # each row's tokens from position start; its argmax
        n = 0
        for seq, row in enumerate(rows):
            for i, token in enumerate(row):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, start + i, 1
                batch.seq_id[n][0], batch.logits[n] = seq, i == len(row) - 1
                n += 1
        batch.n_tokens = n
        if lc.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        logits = np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(len(rows), vocab))
        return logits.argmax(-1).tolist()

    tokens = [step(prompts, 0)]
    start = time.perf_counter()
    for i in range(new_tokens - 1):
        tokens.append(step([[t] for t in tokens[-1]], len(prompts[0]) + i))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": [list(row) for row in zip(*tokens, strict=True)]}


def measure(checkpoint: Path, workdir: Path, args: argparse.Namespace) -> tuple[list[dict], dict[str, Transformer]]:
    """Per batch size: tokens/s of every contender (the median round) and its greedy tokens; mistura's models."""
    models = mistura_models(checkpoint)
    decoders = {name: partial(mistura_decode, model) for name, model in models.items()}
    for name in args.compile:
        decoders[f"{name} compiled"] = partial(mistura_decode, compile_for_decoding(models[name]))
    context = args.prompt_len + args.new_tokens
    llamas = {}
    for gguf_type in FORMATS.values():
        path = to_gguf(checkpoint, workdir / f"{checkpoint.name}-{gguf_type}.gguf", type=gguf_type)
        llamas[gguf_type] = LlamaCpp(path, args.threads, context)
        decoders[gguf_type] = llamas[gguf_type].decode
    generator = torch.Generator().manual_seed(0)
    vocab = models["fp32"].config.vocab_size
    rows = []
    for batch in BATCHES:
        prompts = torch.randint(3, vocab, (batch, args.prompt_len), generator=generator).tolist()
        times: dict[str, list[float]] = {name: [] for name in decoders}
        outputs: dict[str, list[list[int]]] = {}
        for round_ in range(args.rounds + 1):  # round 0 warms up (and compiles)
            for name, decode in decoders.items():
                result = decode(prompts, args.new_tokens)
                if result is not None and round_ > 0:
                    times[name].append(result[0])
                    outputs[name] = result[1]
        tokens = batch * (args.new_tokens - 1)
        rate = {name: tokens / statistics.median(t) if t else llamas[name].status() for name, t in times.items()}
        rows.append(dict(batch=batch, rate=rate, outputs=outputs))
    for llama in llamas.values():
        llama.close()
    return rows, models


def agreement(ours: list[list[int]], theirs: list[list[int]] | None) -> str:
    """How many greedy tokens agree, row by row up to the first difference (which greedy decoding carries on)."""
    if theirs is None:
        return "-"
    same = 0
    for a, b in zip(ours, theirs, strict=True):
        same += next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    return f"{same}/{sum(map(len, ours))}"


@torch.no_grad()
def profile_step(model: Transformer, steps: int = 32, context: int = 32) -> dict:
    """Where a batch-1 decode step's time goes: ms per category of ops, per step, and op calls per step.

    The profiler slows every op down: each category gets its share of the profiled step's time
    (self times, so nested ops count once), applied to the step timed without the profiler.
    """
    cache = model.new_cache(1, context + 4 + 2 * steps)
    logits = model(torch.randint(3, model.config.vocab_size, (1, context)), cache)[:, -1]
    for _ in range(4):  # warm-up
        logits = model(logits.argmax(-1)[:, None], cache)[:, -1]
    start = time.perf_counter()
    for _ in range(steps):
        logits = model(logits.argmax(-1)[:, None], cache)[:, -1]
    wall = (time.perf_counter() - start) / steps
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            logits = model(logits.argmax(-1)[:, None], cache)[:, -1]
    profiled = (time.perf_counter() - start) / steps
    ms = {name: 0.0 for name in [*CATEGORIES, "other ops"]}
    calls = 0
    for event in prof.key_averages():
        op = event.key.removeprefix("aten::")
        category = next((c for c, ops in CATEGORIES.items() if op in ops), "other ops")
        ms[category] += event.self_cpu_time_total / 1e3 / steps
        calls += event.count
    ms = {name: value * wall / profiled for name, value in ms.items()}  # shares of the profiled step, of the real one
    ms["outside ops (Python)"] = max(wall * 1e3 - sum(ms.values()), 0.0)
    return dict(step_ms=wall * 1e3, ms=ms, ops=calls / steps)


def print_table(results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    print(
        f"\ngreedy decode, tokens/s (prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.threads} threads, "
        f"median of {args.rounds} rounds); 'agree': greedy tokens equal to eager mistura's in the same weights, "
        "each row counted up to its first difference\n"
    )
    print(
        "| model | batch | weights | mistura | compiled | llama.cpp | mistura / llama.cpp | compiled / llama.cpp "
        "| agree: compiled | agree: llama.cpp |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for size, rows in results.items():
        for row in rows:
            rate, outputs = row["rate"], row["outputs"]
            for fmt, gguf_type in FORMATS.items():
                ours, compiled, theirs = rate[fmt], rate.get(f"{fmt} compiled", "-"), rate[gguf_type]
                cells = [
                    f"{fmt} / {gguf_type}",
                    _rate(ours),
                    _rate(compiled),
                    _rate(theirs),
                    _ratio(ours, theirs),
                    _ratio(compiled, theirs),
                    agreement(outputs[fmt], outputs.get(f"{fmt} compiled")),
                    agreement(outputs[fmt], outputs.get(gguf_type)),
                ]
                print(f"| {size} | {row['batch']} | {' | '.join(cells)} |")


def _rate(value: float | str) -> str:
    return f"{value:,.0f}" if isinstance(value, float) else value


def _ratio(ours: float | str, theirs: float | str) -> str:
    return f"{ours / theirs:.2f}x" if isinstance(ours, float) and isinstance(theirs, float) else "-"


def print_profile(profiles: dict[str, dict]) -> None:
    print(
        "\nmistura's decode step at batch 1, ms per step (torch.profiler self times, scaled to the unprofiled step)\n"
    )
    names = list(next(iter(profiles.values()))["ms"])
    print(f"| model | step ms | op calls per step | {' | '.join(names)} |")
    print("|---|---:|---:|" + "---:|" * len(names))
    for label, p in profiles.items():
        cells = " | ".join(f"{p['ms'][n]:.2f} ({100 * p['ms'][n] / p['step_ms']:.0f} %)" for n in names)
        print(f"| {label} | {p['step_ms']:.2f} | {p['ops']:.0f} | {cells} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["4M", "100M"], choices=["4M", "100M"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; the median counts")
    parser.add_argument("--threads", type=int, default=2, help="torch threads and llama.cpp's n_threads")
    parser.add_argument(
        "--compile",
        nargs="+",
        default=[],
        choices=list(FORMATS),
        help="also time these formats torch.compile'd (each adds about a minute of compiling per size)",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the profile of mistura's decode step")
    parser.add_argument("--llama-worker", help=argparse.SUPPRESS)
    parser.add_argument("--context", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.llama_worker:
        return serve_llama(args.llama_worker, args.threads, args.context)
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # every compiled model shares Transformer.forward's code object
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    results, profiles = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            checkpoint = resolve(QUICKSTART) if size == "4M" else random_llama(Path(tmp))
            results[size], models = measure(checkpoint, Path(tmp), args)
            if not args.no_profile:
                profiles |= {f"{size} {name}": profile_step(model) for name, model in models.items()}
            print(f"{size} done, load average {os.getloadavg()[0]:.1f}", flush=True)
    print_table(results, args)
    if profiles:
        print_profile(profiles)


if __name__ == "__main__":
    main()
